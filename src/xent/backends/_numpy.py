"""NumPy: floating-point warnings silenced for masked rows; chunked, in-place primitives."""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .._typing import Array
from ._generic import Backend

_BLOCK_BYTES = 2**20
"""Size of the scratch block of rows: small enough to stay in cache between the subtract, the
``exp`` and the sum, large enough that NumPy's per-call overhead is amortised. The user's arrays
are never written."""


_PARALLEL_BYTES = 16 * 2**20
"""Inputs at least this large are split by rows over a thread pool (NumPy's ufuncs release the
GIL, so the threads run the exp on every core); smaller ones stay on the calling thread."""

_pool: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None
"""The pool and the process it was made in: a forked child has none of its threads."""


def _threads() -> int:
    """The cores this process may run on, at most 8."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return max(1, min(8, len(cores) if cores is not None else (os.cpu_count() or 1)))


def _in_parallel(work: Callable[[int, int], None], n: int, nbytes: int) -> None:
    """``work(lo, hi)`` over the rows ``[0, n)``, in contiguous ranges, one per thread."""
    global _pool
    threads = min(_threads(), n)
    if threads < 2 or nbytes < _PARALLEL_BYTES:
        work(0, n)
        return
    if _pool is None or _pool[0] != os.getpid():
        _pool = (
            os.getpid(),
            concurrent.futures.ThreadPoolExecutor(_threads(), thread_name_prefix="xent"),
        )
    pool = _pool[1]
    settings = np.geterr()  # the caller's errstate is context-local: carry it to the threads

    def run(lo: int, hi: int) -> None:
        with np.errstate(**settings):
            work(lo, hi)

    bounds = [n * i // threads for i in range(threads + 1)]
    futures = [pool.submit(run, lo, hi) for lo, hi in itertools.pairwise(bounds)]
    for f in futures:
        f.result()


_FUSED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _plain_rows(
    input: Array, target: Array, axis: int, ignore_index: int, label_smoothing: float
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]] | None:
    """``(rows, labels, per-row shape)`` where the fused paths serve the call, else None."""
    x, y = np.asarray(input), np.asarray(target)
    c = x.shape[-1] if x.ndim else 0
    if (
        x.dtype not in _FUSED_DTYPES
        or axis != x.ndim - 1
        or x.ndim > 2
        or x.size == 0
        or label_smoothing
        or not x.flags.c_contiguous
        or 0 <= ignore_index < c
    ):
        return None
    labels = y.reshape(-1)
    if labels.min() < 0 or labels.max() >= c:
        return None
    return x.reshape(-1, c), labels, y.shape


class Facts(Backend):
    """NumPy arrays are concrete and in host memory."""

    name = "numpy"

    def is_lazy(self, x: Array) -> bool:
        return False

    def unsupported(self, x: Array) -> str | None:
        if isinstance(x, np.ma.MaskedArray):
            return "a NumPy masked array (convert with `.filled(...)` or `np.asarray`)"
        return None

    def quiet(self) -> contextlib.AbstractContextManager[Any]:
        return np.errstate(divide="ignore", invalid="ignore", over="ignore")


class Native(Backend):
    """Row-chunked log-sum-exp with one bounded scratch buffer; in-place updates of xent's own."""

    native = True

    def logsumexp(self, x: Array, axis: int) -> tuple[Array, Array]:
        x = np.asarray(x)
        if axis % x.ndim != x.ndim - 1 or x.size == 0 or not x.flags.c_contiguous:
            return super().logsumexp(x, axis)
        keep = (*x.shape[:-1], 1)
        shift = np.empty(keep, dtype=x.dtype)
        return shift, self._log_sum(x, shift, find_shift=True)

    def log_sum(self, x: Array, shift: Array, axis: int) -> Array:
        """``log(sum(exp(x - shift)))`` along ``axis`` for a given ``shift``."""
        if axis % x.ndim != x.ndim - 1 or x.size == 0 or not x.flags.c_contiguous:
            return np.log(np.sum(np.exp(x - shift), axis=axis, keepdims=True))
        return self._log_sum(x, shift, find_shift=False)

    def _log_sum(self, x: np.ndarray, shift: np.ndarray, *, find_shift: bool) -> np.ndarray:
        c = x.shape[-1]
        rows = x.reshape(-1, c)
        shifts = shift.reshape(-1, 1)
        out = np.empty((rows.shape[0], 1), dtype=x.dtype)
        step = max(1, _BLOCK_BYTES // (c * x.dtype.itemsize))

        def work(lo: int, hi: int) -> None:
            # A block of rows is read from memory once: its max, the subtract, the exp and the
            # sum all find it (or the scratch copy) in cache.
            scratch = np.empty((min(step, hi - lo), c), dtype=x.dtype)
            for start in range(lo, hi, step):
                stop = min(start + step, hi)
                block = rows[start:stop]
                buf = scratch[: stop - start]
                m = shifts[start:stop]
                if find_shift:
                    np.max(block, axis=1, keepdims=True, out=m)
                    m[~np.isfinite(m)] = 0
                np.subtract(block, m, out=buf)
                np.exp(buf, out=buf)
                np.sum(buf, axis=1, keepdims=True, out=out[start:stop])

        _in_parallel(work, rows.shape[0], rows.nbytes)
        np.log(out, out=out)
        return out.reshape(shift.shape)

    def fused_index_loss(
        self,
        input: Array,
        target: Array,
        *,
        axis: int,
        weight: Array | None,
        ignore_index: int,
        label_smoothing: float,
        reduction: str,
    ) -> Array | None:
        # The plain loss of C-contiguous rows whose labels are all in [0, C) (one min and one
        # max read them), with no mask, where and errstate of the general path: at small sizes
        # those cost more than the arithmetic. Anything else goes back to the core.
        plain = _plain_rows(input, target, axis, ignore_index, label_smoothing)
        if plain is None:
            return None
        rows, labels, shape = plain
        picked = rows[np.arange(rows.shape[0]), labels]
        with self.quiet():
            return self._plain_loss(rows, picked, labels, shape, weight, reduction)

    def fused_index_loss_and_grad(
        self,
        input: Array,
        target: Array,
        *,
        axis: int,
        weight: Array | None,
        ignore_index: int,
        label_smoothing: float,
        reduction: str,
    ) -> tuple[Array, Array] | None:
        # Inputs that fit one scratch block with finite row maxima: the exponentials of the
        # loss become the gradient in place (larger ones take the threaded blocked path).
        plain = _plain_rows(input, target, axis, ignore_index, label_smoothing)
        if plain is None or plain[0].nbytes > _BLOCK_BYTES:
            return None
        rows, labels, shape = plain
        n = rows.shape[0]
        index = np.arange(n)
        with self.quiet():
            shift = np.max(rows, axis=1)
            if not np.max(shift) < np.inf:
                return None
            grad = rows - shift[:, None]
            np.exp(grad, out=grad)
            total = np.sum(grad, axis=1)
            loss = np.log(total) - (rows[index, labels] - shift)
            # d loss_n / d x = f_n (softmax_n - onehot(y_n)), f_n the row's weight in the sum.
            factor = np.ones(n, dtype=rows.dtype)
            if weight is not None:
                factor = np.asarray(weight).astype(rows.dtype, copy=False)[labels]
                loss *= factor
            if reduction == "none":
                out = loss.reshape(shape)
            else:
                out = np.sum(loss)
                if reduction == "mean":
                    count = rows.dtype.type(n) if weight is None else np.sum(factor)
                    out = out / count
                    factor = factor / count
            grad *= (factor / total)[:, None]
            grad[index, labels] -= factor
        return out, grad.reshape(np.shape(input))

    def _plain_loss(
        self,
        rows: np.ndarray,
        picked: np.ndarray,
        labels: np.ndarray,
        shape: tuple[int, ...],
        weight: Array | None,
        reduction: str,
    ) -> Array:
        shift = np.max(rows, axis=1) if rows.nbytes <= _BLOCK_BYTES else None
        # A row max of +inf or NaN takes the general shift of 0 (a row of -inf gives NaN
        # either way).
        if shift is not None and np.max(shift) < np.inf:
            scratch = rows - shift[:, None]
            np.exp(scratch, out=scratch)
            log_sum = np.log(np.sum(scratch, axis=1))
        else:
            shift, log_sum = (a.reshape(-1) for a in self.logsumexp(rows, 1))
        loss = log_sum - (picked - shift)
        if weight is not None:
            label_weight = np.asarray(weight).astype(rows.dtype, copy=False)[labels]
            loss *= label_weight
        if reduction == "none":
            return loss.reshape(shape)
        total = np.sum(loss)
        if reduction == "sum":
            return total
        count = rows.dtype.type(labels.size) if weight is None else np.sum(label_weight)
        return total / count

    def softmax_from_lse(
        self,
        x: Array,
        shift: Array,
        log_sum: Array,
        axis: int,
        scale: Array | None = None,
        *,
        overwrite: bool = False,
    ) -> Array:
        # One full-size allocation (the result; none where x may be overwritten), filled a
        # cache-sized block of rows at a time: the subtracts, the exp and the scale all find
        # the block in cache.
        x = np.asarray(x)
        shape = np.broadcast_shapes(x.shape, shift.shape)
        writable = overwrite and shape == x.shape and x.flags.writeable
        out = x if writable else np.empty(shape, dtype=x.dtype)
        if axis % x.ndim != x.ndim - 1 or x.size == 0 or out.shape != x.shape:
            np.subtract(x, shift, out=out)
            out -= log_sum
            np.exp(out, out=out)
            if scale is not None:
                out *= scale
            return out
        c = x.shape[-1]
        rows, dst = x.reshape(-1, c), out.reshape(-1, c)
        keep = (*x.shape[:-1], 1)
        m, ls = (np.broadcast_to(a, keep).reshape(-1, 1) for a in (shift, log_sum))
        factor = None if scale is None else np.broadcast_to(scale, keep).reshape(-1, 1)
        step = max(1, _BLOCK_BYTES // (c * x.dtype.itemsize))

        def work(lo: int, hi: int) -> None:
            for start in range(lo, hi, step):
                block = slice(start, min(start + step, hi))
                buf = dst[block]
                np.subtract(rows[block], m[block], out=buf)
                buf -= ls[block]
                np.exp(buf, out=buf)
                if factor is not None:
                    buf *= factor[block]

        _in_parallel(work, rows.shape[0], rows.nbytes)
        return out

    def fill_rows(self, g: Array, mask: Array, value: float) -> Array:
        np.copyto(g, np.asarray(value, dtype=g.dtype), where=mask)
        return g

    def take_along_axis(self, x: Array, index: Array, axis: int) -> Array:
        return np.take_along_axis(np.asarray(x), np.asarray(index), axis=axis)

    def subtract_at(self, g: Array, index: Array, values: Array, axis: int) -> Array:
        picked = np.take_along_axis(g, index, axis=axis)
        np.put_along_axis(g, index, picked - values, axis=axis)
        return g

    def scratch(self, shape: tuple[int, ...], dtype: Any, like: Array) -> Array | None:
        return np.empty(shape, dtype=dtype)

    def linear_logits(
        self, h: Array, weight: Array, bias: Array | None, dtype: Any, out: Array | None
    ) -> Array:
        # The product straight into the reused buffer and the bias added in place: no new
        # block-sized array (and its page faults) per block.
        if out is None or h.dtype != dtype or weight.dtype != dtype:
            return super().linear_logits(h, weight, bias, dtype, out)
        np.matmul(h, weight.T, out=out)
        if bias is not None:
            np.add(out, bias.astype(dtype, copy=False), out=out)
        return out

    def matmul_add(self, acc: Array, a: Array, b: Array) -> Array:
        # In place, a slab of acc's rows at a time: no temporary of acc's full size.
        step = max(1, _BLOCK_BYTES // max(1, b.shape[-1] * acc.itemsize))
        for start in range(0, acc.shape[0], step):
            acc[start : start + step] += a[:, start : start + step].T @ b
        return acc


class NativeBackend(Native, Facts):
    """The facts with the native overrides on top."""
