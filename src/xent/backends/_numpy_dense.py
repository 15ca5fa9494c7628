"""NumPy: the losses over dense targets (class probabilities, binary labels) in one blocked pass.

Each block of rows is read once and worked on in scratch buffers that stay in cache: no
full-size temporary per operation, as the general path (and a plain NumPy expression) makes.
Where a result is not finite (an infinite logit, a class at ``-inf`` that the target gives no
mass, NaN), the formulas here and the general path's may disagree between ``inf`` and NaN, so
such calls decline (None) and the general path answers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._typing import Array
from . import _numpy
from ._generic import BinaryOptions

_BINARY_BLOCK_ELEMENTS = 2**16
"""Elements per block of the binary loss: its three to six scratch buffers (256 KiB each in
float32) stay in the core's cache between the operations. Measured against 2^13 to 2^17 at
4096 x 64 .. 16384 x 100 (two cores): 2^16 and 2^17 alike, smaller blocks up to 2.9x slower
(NumPy's per-call cost)."""

_PROB_BLOCK_ELEMENTS = 2**17
"""Elements per block of the probability loss (two or four scratch buffers): 5-12% faster
than 2^16 at 512 x 1000 and 16384 x 100, as fast at 32 x 1000 and 4096 x 64."""


def _step(block: int, inner: int) -> int:
    """Rows per block of ``block`` elements, for rows of ``inner`` elements (at least one)."""
    return max(1, block // max(1, inner))


def _staged(block: np.ndarray, buffer: np.ndarray | None, k: int) -> np.ndarray:
    """``block`` (of ``k`` rows) itself, or copied into ``buffer``'s first ``k`` rows (cast to
    the compute dtype, or to be written in place) where there is one."""
    if buffer is None:
        return block
    np.copyto(buffer[:k], block)
    return buffer[:k]


def _result(total: Any, reduction: str, count: int, values: np.ndarray, dtype: Any) -> Any:
    """The loss under ``reduction`` from the per-element or per-row losses ``values`` (kept for
    ``"none"``) and their ``total``, in ``dtype``; None where ``total`` is not finite."""
    if not math.isfinite(total):
        return None
    if reduction == "none":
        out = values
    else:
        kind = values.dtype.type
        out = kind(total) / kind(count) if reduction == "mean" else kind(total)
    return out.astype(dtype) if out.dtype != dtype else out


# --------------------------------------------------------------------------- binary
def binary_loss(
    input: Array, target: Array, options: BinaryOptions, *, with_grad: bool
) -> tuple[Any, np.ndarray | None] | None:
    """The binary cross-entropy of logits (and, ``with_grad``, the gradient of ``sum(loss)``),
    or None.

    Per element, with ``y`` smoothed and ``p`` the positive weight (1 without):
    ``log1p(exp(-|x|)) (p y + 1 - y) + (1 - y) max(x, 0) + p y max(-x, 0)`` (the general
    path's ``-(p y log sigmoid(x) + (1 - y) log sigmoid(-x))``: a sum of terms that are not
    negative, so nothing cancels, and no ``exp`` overflows), times the element weight; the
    gradient ``sigmoid(x) (p y + 1 - y) - p y``, times the weight.
    """
    weight, pos_weight, smoothing, reduction = options
    x = np.asarray(input)
    if x.dtype not in _numpy._FUSED_DTYPES or x.size == 0:
        return None
    shape = x.shape
    if x.ndim == 0:
        x = x.reshape(1)
    ct = _numpy._compute_dtype(x.dtype)
    full = x.shape

    def spread(a: Array | None) -> np.ndarray | None:
        if a is None:
            return None
        return np.broadcast_to(np.asarray(a).astype(ct, copy=False), shape).reshape(full)

    y = np.asarray(target).reshape(full)
    w, pw = spread(weight), spread(pos_weight)
    n = full[0]
    inner = x.size // n
    step = _step(_BINARY_BLOCK_ELEMENTS, inner)
    sums: dict[int, Any] = {}  # each block's sum, by its first row
    out = np.empty(full, ct) if reduction == "none" else None
    grad = None
    r = 1.0
    if with_grad:
        grad = np.empty(full, x.dtype)
        r = 1.0 / x.size if reduction == "mean" else 1.0
    cast_x = x.dtype != ct
    cast_y = smoothing or y.dtype != ct

    def work(lo: int, hi: int) -> None:
        block = (min(step, hi - lo), *full[1:])
        t = np.empty(block, ct) if out is None or grad is not None else None
        u, v = np.empty(block, ct), np.empty(block, ct)
        xs = np.empty(block, ct) if cast_x else None
        ys = np.empty(block, ct) if cast_y else None
        ps = np.empty(block, ct) if pw is not None else None
        fs = np.empty(block, ct) if pw is not None else None  # p y + 1 - y
        zero = np.zeros(block, ct)
        for start in range(lo, hi, step):
            rows = slice(start, min(start + step, hi))
            k = rows.stop - rows.start
            # "none" writes the losses in place; the gradient needs the buffer after them
            tb = t[:k] if t is not None else out[rows]  # type: ignore[index]  # t or out
            ub, vb = u[:k], v[:k]
            xb = _staged(x[rows], xs, k)
            yb = _staged(y[rows], ys, k)
            if smoothing:  # on the staged copy (smoothing stages y)
                yb *= 1.0 - smoothing
                yb += smoothing / 2
            pos = yb  # p y
            if ps is not None:
                assert pw is not None
                pos = ps[:k]
                np.multiply(pw[rows], yb, out=pos)
            # max(x, 0) against an array of zeros: NumPy's loop for a scalar operand is
            # not vectorised (2.7x as long at 256K float32 elements)
            np.maximum(xb, zero[:k], out=ub)
            np.subtract(xb, ub, out=vb)  # min(x, 0), exactly
            np.subtract(vb, ub, out=tb)  # -|x|
            # log1p(exp(-|x|)), times p y + 1 - y with positive weights
            np.exp(tb, out=tb)
            np.log1p(tb, out=tb)
            if fs is not None:
                fb = fs[:k]
                np.subtract(1, yb, out=fb)
                fb += pos
                tb *= fb
            vb *= pos
            tb -= vb  # p y max(-x, 0)
            np.subtract(1, yb, out=vb)  # exact where y is near 1
            vb *= ub
            tb += vb  # (1 - y) max(x, 0)
            if w is not None:
                tb *= w[rows]
            if out is None:
                sums[start] = np.add.reduce(tb, axis=None)
            elif t is not None:
                out[rows] = tb
            if grad is None:
                continue
            # sigmoid(x) = 1 / (1 + exp(-x)); exp overflows to inf for x below about -88 in
            # float32, giving 0, as it should.
            np.negative(xb, out=tb)
            np.exp(tb, out=tb)
            tb += 1
            np.divide(1, tb, out=tb)
            if fs is not None:
                tb *= fs[:k]  # p y + 1 - y, from the loss
            tb -= pos
            if w is not None:
                tb *= w[rows]
            if r != 1.0:
                tb *= r
            grad[rows] = tb

    with np.errstate(all="ignore"):
        _numpy._in_parallel(work, n, x.nbytes * 4)
        if out is not None:
            values = out
            total = np.add.reduce(out, axis=None)
        elif len(sums) == 1:
            values = total = next(iter(sums.values()))
        else:
            values = np.asarray([sums[k] for k in sorted(sums)], ct)
            total = np.add.reduce(values)
        # float16 overflow in the cast back: inf, without a warning (as on the general path)
        loss = _result(total, reduction, x.size, values, input.dtype)
    if loss is None:
        return None
    if reduction == "none":
        loss = loss.reshape(shape)
    return loss, None if grad is None else grad.reshape(shape)


# --------------------------------------------------------------------------- probabilities
def prob_loss(
    input: Array,
    target: Array,
    weight: Array | None,
    axis: int,
    smoothing: float,
    reduction: str,
    *,
    with_grad: bool,
) -> tuple[Any, np.ndarray | None] | None:
    """The cross-entropy of logits and probability targets along ``axis`` (and, with
    ``with_grad``, the gradient of ``sum(loss)``), or None.

    Per row, with ``m = w q`` (``q`` smoothed), ``d = x - max(x)`` and ``ls = log(sum(exp(d)))``:
    ``ls sum(m) - sum(m d)`` (two sums of non-negative terms where the weights are, so no
    cancellation); the gradient ``softmax(x) sum(m) - m``. Logits and targets in another
    layout than C-contiguous rows with the classes last are copied to it first (two passes,
    where the general path makes about ten), the gradient given back as a view in the input's
    axis order.
    """
    x, q = np.asarray(input), np.asarray(target)
    if x.dtype not in _numpy._FUSED_DTYPES or x.ndim == 0 or x.size == 0 or q.shape != x.shape:
        return None
    if axis != x.ndim - 1 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(np.moveaxis(x, axis, -1))
        q = np.moveaxis(q, axis, -1)
        done = prob_loss(x, q, weight, x.ndim - 1, smoothing, reduction, with_grad=with_grad)
        if done is None or done[1] is None:
            return done
        return done[0], np.moveaxis(done[1], -1, axis)
    ct = _numpy._compute_dtype(x.dtype)
    c = x.shape[-1]
    rows_x, rows_q = x.reshape(-1, c), q.reshape(-1, c)
    n = rows_x.shape[0]
    w = None if weight is None else np.asarray(weight).astype(ct, copy=False).reshape(1, c)
    step = _step(_PROB_BLOCK_ELEMENTS, c)
    per = np.empty(n, ct)
    grad = np.empty(rows_x.shape, x.dtype) if with_grad else None
    r = 1.0 / n if reduction == "mean" else 1.0
    cast_x = x.dtype != ct
    cast_q = smoothing or q.dtype != ct or w is not None

    def work(lo: int, hi: int) -> None:
        block = (min(step, hi - lo), c)
        t, u = np.empty(block, ct), np.empty(block, ct)
        xs = np.empty(block, ct) if cast_x else None
        ms = np.empty(block, ct) if cast_q else None
        shift, mass, dot = (np.empty((block[0], 1), ct) for _ in range(3))
        for start in range(lo, hi, step):
            rows = slice(start, min(start + step, hi))
            k = rows.stop - rows.start
            tb, ub = t[:k], u[:k]
            sb, mb, db = shift[:k], mass[:k], dot[:k]
            xb = _staged(rows_x[rows], xs, k)
            qb = _staged(rows_q[rows], ms, k)
            # on the staged copy (smoothing and weights stage the targets)
            if smoothing:
                qb *= 1.0 - smoothing
                qb += smoothing / c
            if w is not None:
                qb *= w
            np.maximum.reduce(xb, axis=1, keepdims=True, out=sb)
            np.subtract(xb, sb, out=tb)  # d
            np.add.reduce(qb, axis=1, keepdims=True, out=mb)
            np.multiply(qb, tb, out=ub)
            np.add.reduce(ub, axis=1, keepdims=True, out=db)
            np.exp(tb, out=tb)
            np.add.reduce(tb, axis=1, keepdims=True, out=sb)  # the shift is no longer needed
            if grad is not None:
                # softmax * sum(m) - m, times r
                np.divide(mb, sb, out=ub[:, :1])
                tb *= ub[:, :1]
                tb -= qb
                if r != 1.0:
                    tb *= r
                grad[rows] = tb
            np.log(sb, out=sb)
            sb *= mb
            sb -= db
            per[rows] = sb[:, 0]

    with np.errstate(all="ignore"):
        _numpy._in_parallel(work, n, x.nbytes * 3)
        total = np.add.reduce(per)
        loss = _result(total, reduction, n, per, x.dtype)
    if loss is None:
        return None
    if reduction == "none":
        loss = loss.reshape(x.shape[:-1])
    return loss, None if grad is None else grad.reshape(x.shape)
