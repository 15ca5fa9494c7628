"""NumPy: floating-point warnings silenced for masked rows; chunked, in-place primitives."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .._compat import array_namespace
from .._typing import Array
from . import _numpy_dense, _numpy_softmax
from ._generic import SAFE_SUMS, Backend, BinaryOptions, IndexOptions

NAMESPACE = array_namespace(np.empty(0))
"""array-api-compat's namespace for NumPy arrays."""

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


def _workers(n: int, nbytes: int) -> int:
    """The threads :func:`_in_parallel` splits ``n`` rows of ``nbytes`` over (1: this one)."""
    return 1 if nbytes < _PARALLEL_BYTES else max(1, min(_threads(), n))


def _in_parallel(work: Callable[[int, int], None], n: int, nbytes: int) -> None:
    """``work(lo, hi)`` over the rows ``[0, n)``, in contiguous ranges, one per thread."""
    global _pool
    threads = _workers(n, nbytes)
    if threads < 2:
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


_HUGE_PAGE_BYTES = 2**21
"""The span of a transparent huge page (x86-64, arm64 with 4 KiB base pages)."""


def _fresh(shape: tuple[int, ...], dtype: Any, threads: int | None = None) -> np.ndarray:
    """An uninitialised array whose rows (along the last axis) :func:`_in_parallel` fills
    (or whose parts it fills over ``threads`` threads).

    Those split over threads are touched once per huge page from this thread first, so that the
    page faults of fresh memory (NumPy asks for transparent huge pages above 4 MiB) come one
    after another rather than from every thread at once. Where two threads took those faults
    together, a 64 MiB gradient took 75 ms instead of 8 ms in some processes (2 vCPUs; after
    other libraries had run, see ``docs/benchmarks.md``); touched first it takes 9 ms
    everywhere.
    """
    out = np.empty(shape, dtype)
    if threads is None:
        threads = _workers(out.size // max(1, shape[-1]), out.nbytes) if out.ndim else 1
    if threads > 1:
        flat = out.reshape(-1)
        flat[:: max(1, _HUGE_PAGE_BYTES // out.itemsize)] = 0
    return out


_FUSED_DTYPES = frozenset(map(np.dtype, (np.float16, np.float32, np.float64)))

_NARROW_BYTES = 80
"""Rows of at most this many bytes (20 float32 classes) are reduced in a transposed copy: NumPy
reduces a short contiguous axis row by row at some 20 ns a row (more than the arithmetic of a
few dozen classes), while a reduction across rows runs as a few long vectorised passes. Wider
rows pay more for the strided copy than the one row reduction of the unshifted pass costs."""

_NARROW_GRAD_BYTES = 64
"""The same for the gradient, which copies the block back into the row layout."""

_NARROW_ROWS = 64
"""Fewer rows than this stay in the row layout whatever their width: the transposed copy costs
more than the per-row reductions it saves."""

_NARROW_BLOCK_BYTES = 2**18
"""The transposed block: the strided copies in and out run fastest on blocks well inside L2."""

_UNSHIFTED_ELEMENTS = 2**13
"""Blocks of at least this many elements first try the exponentials of the logits themselves,
with no row max and no subtraction (two of the four passes over the block); smaller ones
subtract the row max at once (the checks of the unshifted sums cost more than they save)."""

_UNSIGNED = {np.dtype(t): np.dtype(t.replace("i", "u")) for t in ("i1", "i2", "i4", "i8")}

_FEW_LABELS = 16
"""At most this many labels are checked in Python: cheaper than a NumPy reduction."""


_Rows = tuple[np.ndarray, np.ndarray, tuple[int, ...], np.ndarray | None]
"""``(logits, labels, per-position shape, ignored)``: the logits as ``(A, C, B)`` (``A`` the
product of the axes before the class axis, ``B`` of those after it), the labels as a vector of
``A * B``, ``ignored`` (None where no label is ``ignore_index``) marking the positions whose
labels, set to 0 in ``labels``, equal ``ignore_index``."""


class _Smooth(NamedTuple):
    """What label smoothing asks of the passes besides the exp-sum: per position ``sums``
    (written: ``sum_c w_c * (lse - x_c)``, ``w`` the class weights ``weight``, all 1 where it
    is None, ``weight_sum`` their sum; made as ``W * log(sum_c exp(x_c - s)) - sum_c w_c *
    (x_c - s)`` from the block in cache, with the shift ``s`` of the exponentials, 0 or the
    max, so that logits far from 0 lose nothing to cancellation) and, for the gradient,
    ``spread`` (the factor of each position's ``-w_c`` term: its scale times ``e / C``) and
    ``at_label`` (what is subtracted at its label: its scale times ``(1 - e) * w_label``; None
    where ``e`` is 1). ``spread`` and ``at_label`` are per position, or one number."""

    weight: np.ndarray | None
    weight_sum: Any
    sums: np.ndarray
    spread: Any = None
    at_label: Any = None


def _smooth_map(smooth: _Smooth | None, f: Callable[[np.ndarray], np.ndarray]) -> _Smooth | None:
    """``smooth`` with ``f`` applied to its per-position arrays (``spread`` and ``at_label``
    where they are not one number)."""
    if smooth is None:
        return None
    return smooth._replace(
        sums=f(smooth.sums),
        spread=smooth.spread if np.ndim(smooth.spread) == 0 else f(smooth.spread),
        at_label=smooth.at_label if np.ndim(smooth.at_label) == 0 else f(smooth.at_label),
    )


def _smooth_part(smooth: _Smooth | None, index: Any) -> _Smooth | None:
    """``smooth`` with its per-position arrays indexed by ``index`` (a block's positions)."""
    return _smooth_map(smooth, lambda v: v[index])


def _class_weighted_sum(block: np.ndarray, smooth: _Smooth | None, axis: int) -> None:
    """``smooth.sums = sum_c weight_c * block_c`` along ``axis`` (the classes) of ``block``,
    in its dtype (nothing where ``smooth`` is None)."""
    if smooth is None:
        return
    if smooth.weight is None:
        block.sum(axis=axis, out=smooth.sums)
    elif axis == block.ndim - 1:
        np.matmul(block, smooth.weight, out=smooth.sums)
    else:
        np.matmul(smooth.weight, block, out=smooth.sums)


def _spread_sums(smooth: _Smooth | None, total: np.ndarray) -> None:
    """``smooth.sums``, holding :func:`_class_weighted_sum` of the shifted logits, made
    ``W * log(total) - sums`` (``total`` the sums of their exponentials)."""
    if smooth is not None:
        np.subtract(np.log(total) * smooth.weight_sum, smooth.sums, out=smooth.sums)


def _dense_grad(
    buf: np.ndarray, factor: Any, total: np.ndarray, smooth: _Smooth | None, axis: int
) -> Any:
    """``buf``'s exponentials (classes along ``axis``) made the gradient in place but for the
    label's term: ``exp * factor / total``, less ``spread * weight_c`` where smoothing; returns
    what is to be subtracted at each position's label (None: nothing)."""
    scale = factor / total

    def per(v: Any) -> Any:
        return v if np.ndim(v) == 0 else np.expand_dims(v, axis)

    if smooth is None:
        buf *= per(scale)
        return factor
    spread = smooth.spread
    if smooth.weight is None:
        buf *= per(scale)
        buf -= per(spread)
    else:
        # (exp * scale / spread - w) * spread: no block-sized temporary; 0 where the spread is
        # (an ignored position, whose scale is 0 too).
        ratio = np.divide(scale, spread, out=np.zeros_like(scale), where=spread != 0)
        buf *= per(ratio)
        buf -= smooth.weight.reshape([-1 if i == axis else 1 for i in range(buf.ndim)])
        buf *= per(spread)
    return smooth.at_label


def _plain_case(x: np.ndarray, y: np.ndarray, options: IndexOptions) -> bool:
    """Whether the fused paths serve arrays of these dtypes and shapes with these options (the
    layout and the label values aside)."""
    c = x.shape[options.axis] if 0 <= options.axis < x.ndim else 0
    return x.dtype in _FUSED_DTYPES and c != 0 and x.size != 0 and y.dtype.kind in "iu"


def _plain_rows(x: np.ndarray, y: np.ndarray, ignore_index: int, axis: int) -> _Rows | None:
    """The logits and labels of a :func:`_plain_case` where its layout and labels let the fused
    paths serve it (C-contiguous, every label a class or ``ignore_index``), else None."""
    if not x.flags.c_contiguous:
        return None
    c = x.shape[axis]
    labels = y.reshape(-1)
    ignored = None
    if 0 <= ignore_index < c:
        # An ignore_index that is a class: the labels equal to it are no class of the loss.
        ignored = labels == ignore_index
        if ignored.any():
            labels = np.where(ignored, 0, labels).astype(labels.dtype, copy=False)
        else:
            ignored = None
        if _outside(labels, c):
            return None
    elif _outside(labels, c):
        ignored = labels == ignore_index
        labels = np.where(ignored, 0, labels).astype(labels.dtype, copy=False)
        if not ignored.any() or _outside(labels, c):
            return None
    return x.reshape(math.prod(x.shape[:axis]), c, -1), labels, y.shape, ignored


_Order = tuple[int, ...] | None


def _memory_order(
    x: np.ndarray, y: np.ndarray, axis: int
) -> tuple[np.ndarray, np.ndarray, int, _Order, _Order] | None:
    """``(x, y, axis, x_order, y_order)``: ``x``'s axes in the order of its memory (outermost
    first) where that makes it C-contiguous, ``y``'s axes to match and the class axis's place,
    with the permutations applied (None: the identity); None where no order does (gaps, an
    overlap, a negative stride). A Fortran-ordered matrix, a channels-last ``(N, C, H, W)``:
    views, never copies."""
    if x.flags.c_contiguous:
        return x, y, axis, None, None
    order = tuple(sorted(range(x.ndim), key=lambda i: (x.shape[i] != 1, -x.strides[i])))
    moved = x.transpose(order)
    if not moved.flags.c_contiguous:
        return None
    y_order = tuple(i if i < axis else i - 1 for i in order if i != axis)
    same = y_order == tuple(range(len(y_order)))
    return (
        moved,
        (y if same else y.transpose(y_order)),
        order.index(axis),
        order,
        (None if same else y_order),
    )


def _back(a: Any, order: _Order) -> Any:
    """``a``, of axes permuted by ``order`` (see :func:`_memory_order`), in the caller's order."""
    if order is None:
        return a
    return np.asarray(a).transpose(np.argsort(order))


def _outside(labels: np.ndarray, classes: int) -> bool:
    """Whether any label lies outside ``[0, classes)``."""
    if labels.size <= _FEW_LABELS:
        few = labels.tolist()
        return min(few) < 0 or max(few) >= classes
    if labels.dtype.kind == "i" and classes > 2 ** (8 * labels.itemsize - 1):
        return bool(labels.min() < 0)  # the dtype holds no label >= classes
    # One max of the labels read as unsigned: a negative label wraps to at least 2**(bits-1),
    # above every class.
    unsigned = _UNSIGNED.get(labels.dtype)
    if unsigned is None:  # unsigned already, or not in the native byte order
        unsigned = np.dtype(labels.dtype.str.replace("i", "u"))
    return bool(labels.view(unsigned).max() >= classes)


def _row_pass(
    rows: np.ndarray,
    labels: np.ndarray,
    dtype: np.dtype[Any],
    factor: Any,
    grad: np.ndarray | None,
    smooth: _Smooth | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(picked, total)`` per row with the loss ``log(total) - picked``: either
    ``x[label] - shift`` and ``sum(exp(x - shift))`` with ``shift`` the row max, or (the
    unshifted sums of :data:`_UNSHIFTED_ELEMENTS`) 0 and ``sum(exp(x)) / exp(x[label])``;
    computed in ``dtype`` a cache-sized block of rows at a time (its passes all find it in
    cache), threaded by row ranges for large inputs.

    With ``grad`` given, the same exponentials become its rows in place:
    ``exp(x - shift) * factor / total``, less ``factor`` at the label (``factor`` per row, or
    one number). A row whose max is +inf or NaN gets a NaN ``total`` (the general path shifts
    it by 0 instead); so does a row of -inf, whose loss is NaN on either path.

    With ``smooth`` given, its ``sums`` are filled from the same blocks, and the gradient's rows
    take its terms (:func:`_dense_grad`).
    """
    n, c = rows.shape
    row_bytes = c * dtype.itemsize
    narrow = n >= _NARROW_ROWS and row_bytes <= (
        _NARROW_BYTES if grad is None else _NARROW_GRAD_BYTES
    )
    step = max(1, (_NARROW_BLOCK_BYTES if narrow else _BLOCK_BYTES) // row_bytes)
    # Where the gradient has the compute dtype and the row layout, it is its own scratch.
    own = grad is not None and not narrow and grad.dtype == dtype

    def scratch(size: int) -> np.ndarray | None:
        return None if own else np.empty((c, size) if narrow else (size, c), dtype)

    picked = np.empty(n, dtype)
    total = np.empty(n, dtype)
    if n <= step:
        # One block: no loop, no threads.
        _block(rows, labels, picked, total, scratch(n), factor, grad, narrow, smooth)
        return picked, total

    def work(lo: int, hi: int) -> None:
        mine = scratch(min(step, hi - lo))
        for start in range(lo, hi, step):
            rows_here = slice(start, min(start + step, hi))
            size = rows_here.stop - start
            buf = None if mine is None else mine[:, :size] if narrow else mine[:size]
            _block(
                rows[rows_here],
                labels[rows_here],
                picked[rows_here],
                total[rows_here],
                buf,
                factor if np.ndim(factor) == 0 else factor[rows_here],
                None if grad is None else grad[rows_here],
                narrow,
                _smooth_part(smooth, rows_here),
            )

    _in_parallel(work, n, n * c * dtype.itemsize)
    return picked, total


def _block(
    block: np.ndarray,
    labels: np.ndarray,
    picked: np.ndarray,
    total: np.ndarray,
    buf: np.ndarray | None,
    factor: Any,
    grad: np.ndarray | None,
    narrow: bool,
    smooth: _Smooth | None = None,
) -> None:
    """:func:`_row_pass` on one block of rows, its exponentials in ``buf`` (the transposed
    block where ``narrow``), or in ``grad`` itself where ``buf`` is None."""
    at = (np.arange(len(labels)), labels)
    source = block
    if narrow:
        assert buf is not None
        source = block.T
        _load(buf, source)
        block = buf
        at = at[::-1]
    elif buf is None:
        assert grad is not None
        buf = grad
    elif block.dtype != buf.dtype:
        _load(buf, block)
        block = buf
    if buf.size >= _UNSHIFTED_ELEMENTS and _unshifted(
        block, buf, at, picked, total, factor, 0 if narrow else 1, smooth
    ):
        if grad is not None and buf is not grad:
            _store(grad, buf.T if narrow else buf)
        return
    if block is buf:
        _load(buf, source)  # the exponentials above overwrote the copy
    m = block.max(axis=0 if narrow else 1, keepdims=True)
    np.subtract(block, m, out=buf)
    picked[...] = buf[at]
    _class_weighted_sum(buf, smooth, 0 if narrow else 1)
    np.exp(buf, out=buf)
    buf.sum(axis=0 if narrow else 1, out=total)
    _spread_sums(smooth, total)
    if grad is None:
        return
    label = _dense_grad(buf, factor, total, smooth, 0 if narrow else 1)
    if label is not None:
        buf[at] -= label
    if buf is not grad:
        _store(grad, buf.T if narrow else buf)


def _unshifted(
    block: np.ndarray,
    buf: np.ndarray,
    at: tuple[np.ndarray, np.ndarray],
    picked: np.ndarray,
    total: np.ndarray,
    factor: Any,
    axis: int,
    smooth: _Smooth | None = None,
) -> bool:
    """:func:`_block`'s pass with no shift: ``exp(block)`` into ``buf`` (it may be ``block``),
    summed along ``axis``; True where every sum is safe (``SAFE_SUMS``), its results and
    the gradient's rows (``factor`` not None) then in ``picked``, ``total`` and ``buf``; False
    where the caller must start the block again, ``buf`` overwritten.

    The loss is ``log(sum / exp(x[label]))``, as exact as the shifted pass's where the label's
    logit dominates its row; where its exponential is below ``tiny`` (a loss of tens or more)
    it is ``log(sum) - x[label]`` instead.
    """
    low, high, tiny = SAFE_SUMS[buf.dtype.name]
    np.copyto(picked, block[at])
    _class_weighted_sum(block, smooth, axis)
    np.exp(block, out=buf)
    buf.sum(axis=axis, out=total)
    if not (low <= total.min() and total.max() <= high):  # NaN fails both
        return False
    _spread_sums(smooth, total)
    label_term = buf[at]
    if factor is not None:
        label = _dense_grad(buf, factor, total, smooth, axis)
        if label is not None:
            buf[at] -= label
    kept = label_term >= tiny
    np.divide(total, label_term, out=total, where=kept)
    np.copyto(picked, 0, where=kept)
    return True


def _pass(
    x: np.ndarray,
    labels: np.ndarray,
    dtype: np.dtype[Any],
    factor: Any,
    smooth: _Smooth | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """``(picked, total, grad)`` per position of logits ``(A, C, B)`` as :func:`_row_pass`
    gives them, the gradient (of ``x``'s shape and dtype) only where ``factor`` is not None: the
    rows of ``(A, C)`` where ``B`` is 1 (the class axis last), else :func:`_slab_pass` (None
    where it declines ``smooth``)."""
    a, c, b = x.shape
    if b != 1:
        return _slab_pass(x, labels, dtype, factor, smooth)
    rows = x.reshape(a, c)
    grad = None if factor is None else _fresh(rows.shape, x.dtype)
    return (*_row_pass(rows, labels, dtype, factor, grad, smooth), grad)


_PAIRWISE_CLASSES = 16
"""More classes than this are summed pairwise across the block's rows (halves added, then
halves of those...): NumPy sums along an axis that is not the innermost one element after
another, an error that grows with the classes (a confident position's loss, near 1e-5, came
out a fifth off with 300 float32 classes), where a sum along contiguous rows is pairwise.
Fewer are summed in one call (the pairwise sum's few more calls cost more)."""


def _class_sum(e: np.ndarray, total: np.ndarray, spare: np.ndarray | None) -> None:
    """``total = e.sum(axis=1)`` for a block ``(k, C, n)``, pairwise where ``C`` exceeds
    :data:`_PAIRWISE_CLASSES`; the first halves summed into ``spare`` (``(k, >= C // 2 + 1,
    n)``), or in ``e`` itself (overwritten) where ``spare`` is None."""
    c = e.shape[1]
    if c <= _PAIRWISE_CLASSES:
        e.sum(axis=1, out=total)
        return
    while c > 2:
        half = c // 2
        dst = e if spare is None else spare
        np.add(e[:, :half], e[:, half : 2 * half], out=dst[:, :half])
        if c % 2:  # the odd row goes on as it is: every row is added at most log2(C) times
            np.copyto(dst[:, half], e[:, 2 * half])
        e, spare, c = dst, None, half + c % 2
    np.add(e[:, 0], e[:, 1], out=total)


def _offsets(k: int, n: int, slab: int) -> np.ndarray:
    """``(k, n)``: ``i * slab + j``, the offset of position ``(i, j)`` of a block of ``k``
    slabs of ``slab`` elements, ``n`` wide (read-only: it may be shared)."""
    columns = np.arange(n, dtype=np.intp)
    out = columns[None, :] if k == 1 else np.add.outer(np.arange(k, dtype=np.intp) * slab, columns)
    out.flags.writeable = False
    return out


_remembered_offsets = functools.lru_cache(maxsize=64)(_offsets)

_INDEX_CACHE_ELEMENTS = 2**14
"""Offsets of :func:`_slab_index` up to this many are remembered (a small input's few
microseconds); larger ones, made for blocks whose work dwarfs them, are not kept."""


def _slab_index(k: int, n: int, slab: int) -> np.ndarray:
    """:func:`_offsets`, remembered where small."""
    if k * n <= _INDEX_CACHE_ELEMENTS:
        return _remembered_offsets(k, n, slab)
    return _offsets(k, n, slab)


_SLAB_BLOCK_BYTES = 2**22
"""The block of :func:`_slab_pass` (in the compute dtype): larger than the rows' (each block's
few dozen NumPy calls, and its reductions across rows, cost less per element there; it took
some 20% less time than 1 MiB blocks at 8 x 21 x 256 x 256, 30% less at 16 x 1000 x 512, whose
slabs then fit whole), the scratch of both threads still within the L3 cache."""

_RUN_BYTES = 2**14
"""Slabs larger than a block are split into blocks of columns that hold every class where
those columns are at least this wide: a block's rows are then read as runs long enough for the
memory's prefetch. Narrower ones (many classes) are read a chunk of classes at a time instead
(:func:`_chunk_pass`), in contiguous runs: the loss took a tenth less time there at 1000
classes (runs of 4 KiB), a quarter less at 32000 (128 bytes)."""

_GRAD_RUN_BYTES = 2**7
"""The same for the gradient, for which the chunks of classes read the input twice: blocks of
columns took as long or less down to runs of 128 bytes (32000 classes), twice as long at 40
bytes (100000 classes: the cache lines of a row are split between blocks)."""

_CHUNK_ROWS = 16
"""The fewest classes in a chunk of :func:`_chunk_pass` (its columns, at most all of them,
fill the rest of the block)."""


def _slab_pass(
    x: np.ndarray,
    labels: np.ndarray,
    dtype: np.dtype[Any],
    factor: Any,
    smooth: _Smooth | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """:func:`_row_pass` for logits ``(A, C, B)`` whose class axis is not the last: per
    position ``(a, b)`` the reductions run over the ``C`` values ``x[a, :, b]``, across the
    ``C`` rows of a block, each row a contiguous run of the input. A block holds whole ``(C,
    B)`` slabs; where a slab is larger, ``B``-columns of one, or (where those columns would be
    narrow) the slab is read a chunk of classes at a time (:func:`_chunk_pass`). Threaded by
    blocks for large inputs; nothing of the input's size is written but ``grad``, in the
    input's layout."""
    a, c, b = x.shape
    slab = c * b
    # A float16 gradient is written from the block through _store's temporaries, each of the
    # block's size: those of 4 MiB blocks took twice as long as those of the rows' blocks.
    narrow = factor is not None and x.dtype != dtype
    block = max(1, (_BLOCK_BYTES if narrow else _SLAB_BLOCK_BYTES) // dtype.itemsize)
    nbytes = x.size * dtype.itemsize
    chunked = False
    if slab <= block:
        k, n = min(a, block // slab), b
    else:
        k, n = 1, max(1, min(b, block // c))
        run = _RUN_BYTES if factor is None else _GRAD_RUN_BYTES
        chunked = n < b and n * dtype.itemsize < run
    columns = -(-b // n)
    units = -(-a // k) * columns
    grad = None if factor is None else _fresh(x.shape, x.dtype, _workers(units, nbytes))
    # Where the gradient has the compute dtype, its contiguous blocks are their own scratch
    # (as blocks of columns, strided, they ran slower).
    own = grad is not None and grad.dtype == dtype
    flat = x.reshape(-1)
    flat_grad = None if grad is None else grad.reshape(-1)
    per_position = isinstance(factor, np.ndarray)
    factors = factor.reshape(a, b) if per_position else factor
    positions = labels.reshape(a, b)
    smooth = _smooth_map(smooth, lambda v: v.reshape(a, b))
    picked = np.empty((a, b), dtype)
    total = np.empty((a, b), dtype)

    def blocks(i: int, cols: slice, step: int, scratch: list[np.ndarray]) -> None:
        """:func:`_slab_block` over the slabs ``[i, i + k)``, ``step`` of ``cols`` at a time
        (``k`` 1 where ``cols`` are not all of them)."""
        rows = slice(i, min(i + k, a))
        for start in range(cols.start, cols.stop, step):
            part = slice(start, min(start + step, cols.stop))
            kk, nn = rows.stop - rows.start, part.stop - start
            spare = None
            if grad is not None and c > _PAIRWISE_CLASSES:
                spare = _scratch(scratch, 1, kk * (c // 2 + 1) * nn, dtype)
                spare = spare.reshape(kk, c // 2 + 1, nn)
            _slab_block(
                x[rows, :, part],
                positions[rows, part],
                picked[rows, part],
                total[rows, part],
                None if own and nn == b else _scratch(scratch, 0, kk * c * nn, dtype),
                spare,
                flat,
                rows.start * slab + start,
                b,
                _slab_index(kk, nn, slab),
                factors[rows, part] if per_position else factors,
                None if grad is None else grad[rows, :, part],
                flat_grad,
                _smooth_part(smooth, (rows, part)),
            )

    if chunked:
        _chunk_pass(x, positions, picked, total, factors, grad, own, dtype, block, blocks, smooth)
        return picked.reshape(-1), total.reshape(-1), grad
    if units == 1 and (grad is None or own):
        # One block of whole slabs (a small input): no loop, no threads.
        half = c // 2 + 1
        _slab_block(
            x,
            positions,
            picked,
            total,
            None if grad is not None else np.empty(x.size, dtype),
            None if grad is None or c <= _PAIRWISE_CLASSES else np.empty((a, half, b), dtype),
            flat,
            0,
            b,
            _slab_index(a, b, slab),
            factors,
            grad,
            flat_grad,
            smooth,
        )
        return picked.reshape(-1), total.reshape(-1), grad

    def work(lo: int, hi: int) -> None:
        scratch: list[np.ndarray] = []  # this thread's buffers, made as they are needed
        for unit in range(lo, hi):
            i, j = divmod(unit, columns)
            blocks(i * k, slice(j * n, min(j * n + n, b)), n, scratch)

    if units == 1:
        work(0, 1)  # one block: no threads
    else:
        _in_parallel(work, units, nbytes)
    return picked.reshape(-1), total.reshape(-1), grad


def _scratch(buffers: list[np.ndarray], i: int, size: int, dtype: np.dtype[Any]) -> np.ndarray:
    """The first ``size`` elements of the ``i``-th of a thread's scratch buffers, (re)made at
    least that large."""
    while len(buffers) <= i:
        buffers.append(np.empty(0, dtype))
    if buffers[i].size < size:
        buffers[i] = np.empty(size, dtype)
    return buffers[i][:size]


def _chunk_pass(
    x: np.ndarray,
    positions: np.ndarray,
    picked: np.ndarray,
    total: np.ndarray,
    factor: Any,
    grad: np.ndarray | None,
    own: bool,
    dtype: np.dtype[Any],
    block: int,
    blocks: Callable[[int, slice, int, list[np.ndarray]], None],
    smooth: _Smooth | None = None,
) -> None:
    """:func:`_slab_pass` for slabs read a chunk of classes at a time: the columns of a slab
    (all of them, or as many as leave :data:`_CHUNK_ROWS` classes to a block), each chunk's
    rows contiguous runs. Each position's logits are shifted by its label's (the label's term
    is exactly 1, the loss ``log(sum(exp(x - x[label])))``), the chunks' sums added pairwise;
    the gradient is made from the same exponentials in a second pass over the chunks (of
    ``block`` elements, :func:`_slab_pass`'s). Where few slabs are to share the threads, each
    slab's chunks are split between them, their sums added after.

    With ``smooth``, each chunk's ``sum_c w_c * (x_c - x[label])`` is taken before its
    exponentials and the chunks' added as their sums are, the gradient's chunks take its terms
    (:func:`_dense_grad`).

    Columns whose sum is beyond the safe ones (a loss of some 80 or more in float32) or NaN are
    computed again by ``blocks`` (:func:`_slab_pass`'s blocks of columns that hold every class,
    shifted by their max where needed)."""
    a, c, b = x.shape
    n = min(b, max(1, block // _CHUNK_ROWS))
    rows = max(1, block // n)
    columns = -(-b // n)
    groups = a * columns
    chunks = -(-c // rows)
    nbytes = x.size * dtype.itemsize
    threads = _workers(groups * chunks, nbytes)
    parts = 1 if groups % threads == 0 or groups >= 4 * threads else min(chunks, threads)
    units = groups * parts
    flat = x.reshape(-1)
    at = np.multiply(positions, b, dtype=np.intp)
    at += np.add.outer(np.arange(a, dtype=np.intp) * (c * b), np.arange(b, dtype=np.intp))
    shift = flat.take(at).astype(dtype, copy=False)  # each label's logit
    sums = np.empty((parts, a, b), dtype)
    spreads = None if smooth is None else np.empty((parts, a, b), dtype)

    def unit(u: int) -> tuple[int, slice, range]:
        """The slab, columns and chunks (their first classes) of unit ``u``."""
        group, part = divmod(u, parts)
        i, j = divmod(group, columns)
        first = chunks * part // parts * rows
        last = min(c, chunks * (part + 1) // parts * rows)
        return i, slice(j * n, min(j * n + n, b)), range(first, last, rows)

    def shifted(i: int, cols: slice, start: int, out: np.ndarray) -> np.ndarray:
        """``x - shift`` for the chunk of classes at ``start``, in ``out`` (of the chunk's
        shape, or flat scratch)."""
        chunk = x[i, start : start + rows, cols]
        if out.ndim == 1:
            out = out[: chunk.size].reshape(chunk.shape)
        if chunk.dtype == out.dtype:
            np.subtract(chunk, shift[i, cols], out=out)
        else:
            _load(out, chunk)
            out -= shift[i, cols]
        return out

    def exps(i: int, cols: slice, start: int, out: np.ndarray) -> np.ndarray:
        """``exp(x - shift)`` for the chunk of classes at ``start``, as :func:`shifted`."""
        out = shifted(i, cols, start, out)
        return np.exp(out, out=out)

    def chunk_smooth(start: int, n_rows: int, where: Any) -> _Smooth | None:
        """``smooth`` for the chunk at ``start`` (its weights) and the positions ``where``."""
        part = _smooth_part(smooth, where)
        if part is None or part.weight is None:
            return part
        return part._replace(weight=part.weight[start : start + n_rows])

    def sum_chunks(lo: int, hi: int) -> None:
        buf = np.empty(rows * n, dtype)
        for u in range(lo, hi):
            i, cols, starts = unit(u)
            # Sums of 2**level chunks: of the exponentials, and (smoothing) of w_c (x_c - shift).
            partial: list[tuple[int, np.ndarray, np.ndarray | None]] = []
            for start in starts:
                d = shifted(i, cols, start, buf)
                t = None
                if smooth is not None:
                    t = np.empty(d.shape[1], dtype)
                    w = smooth.weight
                    part = _Smooth(None if w is None else w[start : start + len(d)], 0, t)
                    _class_weighted_sum(d, part, 0)
                e = np.exp(d, out=d)
                s = np.empty((1, e.shape[1]), dtype)
                _class_sum(e[None], s, None)
                level = 0
                while partial and partial[-1][0] == level:
                    _, s_before, t_before = partial.pop()
                    s += s_before
                    if t is not None:
                        t += t_before
                    level += 1
                partial.append((level, s, t))
            _, s, t = partial.pop()
            while partial:
                _, s_before, t_before = partial.pop()
                s += s_before
                if t is not None:
                    t += t_before
            sums[u % parts, i, cols] = s[0]
            if spreads is not None:
                spreads[u % parts, i, cols] = t

    def run(work: Callable[[int, int], None]) -> None:
        if units == 1:
            work(0, 1)
        else:
            _in_parallel(work, units, nbytes)

    run(sum_chunks)
    np.sum(sums, axis=0, out=total)
    if smooth is not None:
        assert spreads is not None
        np.sum(spreads, axis=0, out=smooth.sums)
        _spread_sums(smooth, total)
    high = SAFE_SUMS[dtype.name][1]
    unsafe = ~(total <= high)  # NaN too
    picked.fill(0)
    if grad is not None:
        scale = factor / total
        per_position = np.ndim(factor) != 0

        def write(lo: int, hi: int) -> None:
            buf = None if own else np.empty(rows * n, dtype)
            for u in range(lo, hi):
                i, cols, starts = unit(u)
                for start in starts:
                    g = grad[i, start : start + rows, cols]
                    e = exps(i, cols, start, g if buf is None else buf)
                    if smooth is None:
                        e *= scale[i, cols]
                    else:
                        f = factor[i, cols] if per_position else factor
                        _dense_grad(e, f, total[i, cols], chunk_smooth(start, len(e), (i, cols)), 0)
                    if buf is not None:
                        _store(g, e)

        run(write)
        # The label's exponential is exactly 1.
        label = scale - factor
        if smooth is not None:
            label = scale - smooth.spread * (
                1 if smooth.weight is None else smooth.weight[positions]
            )
            if smooth.at_label is not None:
                label -= smooth.at_label
        grad.reshape(-1)[at] = label
    if unsafe.any():
        scratch: list[np.ndarray] = []
        slabs, at_column = np.nonzero(unsafe)
        for group in np.unique(slabs * columns + at_column // n).tolist():
            i, j = divmod(group, columns)
            blocks(i, slice(j * n, min(j * n + n, b)), max(1, block // c), scratch)


def _slab_block(
    block: np.ndarray,
    labels: np.ndarray,
    picked: np.ndarray,
    total: np.ndarray,
    buf: np.ndarray | None,
    spare: np.ndarray | None,
    flat: np.ndarray,
    offset: int,
    stride: int,
    base: np.ndarray,
    factor: Any,
    grad: np.ndarray | None,
    flat_grad: np.ndarray | None,
    smooth: _Smooth | None = None,
) -> None:
    """:func:`_slab_pass` on one block ``(k, C, n)`` of the logits, which starts at ``offset``
    in ``flat`` (the logits, flattened; ``flat_grad`` the gradient's) with a class every
    ``stride`` elements; its exponentials in ``buf`` (flat, of the block's size), or in
    ``grad``'s block itself where ``buf`` is None, summed by :func:`_class_sum` with ``spare``
    (None for the loss alone). ``base`` is :func:`_slab_index` for the block: each position's
    offset both in ``buf`` and, ``offset`` added, in ``flat`` (a block either has whole slabs,
    ``n == stride``, or part of one, ``k == 1``).

    The unshifted sums need the label's logit only where its exponential is below ``tiny``:
    it is read from ``flat`` then alone (gathered from a block not yet in cache, it took as
    long as the exponentials)."""
    n = block.shape[2]

    def in_flat() -> np.ndarray:
        """Each label's logit in ``flat`` (and its gradient in ``flat_grad``)."""
        at = np.multiply(labels, stride, dtype=np.intp)
        at += base
        at += offset
        return at

    if buf is None:
        assert grad is not None
        assert flat_grad is not None
        work, work_flat, at = grad, flat_grad, in_flat()
    else:
        work, work_flat = buf.reshape(block.shape), buf
        at = np.multiply(labels, n, dtype=np.intp)
        at += base

    def gradient() -> None:
        """The block's exponentials in ``work`` made its gradient, stored where apart."""
        if grad is None:
            return
        label = _dense_grad(work, factor, total, smooth, 1)
        if label is not None:
            work_flat[at] -= label
        if buf is not None:
            _store(grad, work)

    source = block
    if block.dtype != work.dtype:
        _load(work, block)
        block = work
    if work.size >= _UNSHIFTED_ELEMENTS:
        low, high, tiny = SAFE_SUMS[work.dtype.name]
        _class_weighted_sum(block, smooth, 1)
        np.exp(block, out=work)
        label_term = work_flat.take(at)
        _class_sum(work, total, spare)
        if low <= total.min() and total.max() <= high:  # NaN fails both
            _spread_sums(smooth, total)
            gradient()
            kept = label_term >= tiny
            if kept.all():
                np.divide(total, label_term, out=total)
                picked.fill(0)
            else:
                np.divide(total, label_term, out=total, where=kept)
                np.copyto(picked, np.where(kept, 0, flat.take(at if buf is None else in_flat())))
            return
        if block is work:
            _load(work, source)  # the exponentials overwrote the copy
    m = block.max(axis=1, keepdims=True)
    np.subtract(block, m, out=work)
    np.copyto(picked, work_flat.take(at))
    _class_weighted_sum(work, smooth, 1)
    np.exp(work, out=work)
    _class_sum(work, total, spare)
    _spread_sums(smooth, total)
    gradient()


_CAST_ELEMENTS = 1024
"""Blocks of fewer elements are cast to and from float16 by NumPy, whatever its speed."""

_HALF_BITS = np.array(0x8FFFE000, np.uint32).view(np.int32)
"""Where a float16's sign, exponent and mantissa land in a float32 after a shift by 13."""


def _load(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src``, exactly; float16 into float32 from the bits.

    NumPy's cast of float16 runs at some 2 ns an element; a shift of the bits (sign-extended,
    the extra copies of the sign cleared) and a multiply by ``2**112`` (float32's exponent bias
    less float16's; exact, subnormals included) take a tenth of that. An inf or NaN comes out
    of it as a finite value of at least ``2**16``, which no float16 reaches: then NumPy's cast.
    """
    if src.dtype != np.float16 or dst.dtype != np.float32 or dst.size < _CAST_ELEMENTS:
        np.copyto(dst, src)
        return
    bits = dst.view(np.int32)
    np.left_shift(src.view(np.int16), 13, out=bits, dtype=np.int32)
    bits &= _HALF_BITS
    dst *= 2.0**112
    if not (dst.min() > -(2.0**16) and dst.max() < 2.0**16):
        np.copyto(dst, src)


def _store(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src``, rounded to ``dst``'s dtype as NumPy's cast rounds it.

    NumPy's cast of a float32 that lands among float16's subnormals (below 2**-14, as most of
    a wide softmax does) takes some 50 ns an element (an underflow assist each): those are
    written from their bits instead, ``round(|v| * 2**24)`` with the sign on top (a dozen NumPy
    calls: small blocks take the cast).
    """
    if dst.dtype != np.float16 or src.size < _CAST_ELEMENTS:
        np.copyto(dst, src)
        return
    size = abs(src)
    tiny = size < 2.0**-14
    np.copyto(dst, np.where(tiny, 0, src))
    size *= 2.0**24
    bits = np.rint(size, out=size).astype(np.uint16)
    bits |= np.signbit(src).astype(np.uint16) << 15
    np.copyto(dst.view(np.uint16), bits, where=tiny)


def _compute_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """float16 computes in float32; float32 and float64 in their own dtype."""
    return np.dtype(np.float32) if dtype.itemsize < 4 else dtype


def _label_weight(
    weight: Array | None, labels: np.ndarray, ignored: np.ndarray | None, dtype: np.dtype[Any]
) -> np.ndarray | None:
    """Each row's weight in the sum: its label's class weight, 0 where ignored (None: all 1)."""
    label_weight = None if weight is None else np.asarray(weight).astype(dtype, copy=False)[labels]
    if ignored is not None:
        kept = ~ignored
        label_weight = kept.astype(dtype) if label_weight is None else label_weight * kept
    return label_weight


def _class_weights(weight: Array | None, dtype: np.dtype[Any]) -> np.ndarray | None:
    """The class weights as a vector of ``dtype`` (None: none)."""
    return None if weight is None else np.asarray(weight).astype(dtype, copy=False).reshape(-1)


def _ratio_safe(factor: Any, spread: Any, dtype: np.dtype[Any]) -> bool:
    """Whether :func:`_dense_grad`'s ``(exp * factor / (total * spread) - w) * spread`` keeps
    ``exp * factor / total``'s precision: ``spread`` a normal number wherever ``factor`` is not
    0, and ``factor / spread`` over the least sum of :data:`SAFE_SUMS` finite (a smoothing of
    some 1e-30 or less, or weights of that spread, are left to the general path)."""
    info = np.finfo(dtype)
    kept = np.asarray(factor) != 0
    spread = np.broadcast_to(spread, kept.shape)[kept]
    if not spread.size:
        return True
    if not spread.min() >= info.tiny:
        return False
    ratio = np.broadcast_to(factor, kept.shape)[kept] / spread
    return bool(ratio.max() <= info.max * SAFE_SUMS[dtype.name][0])


def _weight_sum(weight: np.ndarray | None, classes: int) -> Any:
    """``W``: the class weights' sum (the classes where there are none)."""
    return classes if weight is None else np.sum(weight)


def _count(rows: int, label_weight: np.ndarray | None) -> Any:
    """What the mean divides by: the rows, or the sum of their weights."""
    return rows if label_weight is None else np.sum(label_weight)


def _loss(
    out_dtype: np.dtype[Any],
    shape: tuple[int, ...],
    picked: np.ndarray,
    total: np.ndarray,
    label_weight: np.ndarray | None,
    reduction: str,
) -> Any:
    """The reduced loss from :func:`_row_pass`'s ``(picked, total)``, in ``out_dtype``; None
    where a row is NaN (its shift may differ from the general path's). Writes ``total``."""
    loss = np.log(total, out=total)
    loss -= picked
    if label_weight is not None:
        loss *= label_weight
    return _reduced(loss, shape, label_weight, reduction, out_dtype)


def _reduced(
    loss: np.ndarray,
    shape: tuple[int, ...],
    label_weight: np.ndarray | None,
    reduction: str,
    out_dtype: np.dtype[Any],
) -> Any:
    """Per-position losses under ``reduction``, in ``out_dtype``; None where one is not
    finite (NaN, or ``inf``: a masked target logit, or a term of the pass that overflowed
    where the loss itself need not, such as the smoothing's weighted gaps of logits at the
    dtype's max of both signs), so that xent's general path, which keeps every finite loss
    finite, answers those rare calls."""
    out = loss.sum()
    if not np.isfinite(out):
        return None
    if reduction == "none":
        out = loss.reshape(shape)
    elif reduction == "mean":
        out = out / _count(loss.size, label_weight)
    return out if out.dtype == out_dtype else out.astype(out_dtype)


def _smoothed_loss(
    x: np.ndarray,
    shape: tuple[int, ...],
    picked: np.ndarray,
    total: np.ndarray,
    label_weight: np.ndarray | None,
    ignored: np.ndarray | None,
    smooth: _Smooth,
    smoothing: float,
    reduction: str,
) -> Any:
    """:func:`_loss` with label smoothing ``e``: per position ``(1 - e) * w_y * (lse - x_y) +
    (e / C) * sum_c w_c * (lse - x_c)`` (the last sum ``smooth.sums``), 0 where ignored; the
    mean divides by the unsmoothed denominator. None where a position is NaN, ignored ones
    included (as :func:`_loss`). Writes ``total`` and ``smooth.sums``."""
    c = x.shape[1]
    plain = np.log(total, out=total)
    plain -= picked  # lse - x_y
    spread = smooth.sums
    spread *= smoothing / c
    if smoothing != 1.0:  # with e == 1 the label's term is left out (an infinite one too)
        plain *= 1.0 - smoothing
        if label_weight is not None:
            plain *= label_weight
        spread += plain
    loss = spread
    if ignored is not None:
        np.multiply(loss, 0, out=loss, where=ignored)  # a NaN stays NaN
    return _reduced(loss, shape, label_weight, reduction, x.dtype)


def row_shift(block: np.ndarray, out: np.ndarray) -> None:
    """xent's shift of each row of ``block`` (classes last) into ``out`` (``(rows, 1)``): its
    max, 0 where that is not finite."""
    np.maximum.reduce(block, axis=1, keepdims=True, out=out)
    out[~np.isfinite(out)] = 0


class Facts(Backend):
    """NumPy arrays are concrete and in host memory."""

    name = "numpy"

    def is_lazy(self, x: Array) -> bool:
        return False

    def device(self, x: Array) -> Any:
        return "cpu"  # array-api-compat's answer for every NumPy array, without its look-ups

    def placement(self, x: Array) -> Any:
        return "cpu"

    def unsupported(self, x: Array) -> str | None:
        if isinstance(x, np.ma.MaskedArray):
            return "a NumPy masked array (convert with `.filled(...)` or `np.asarray`)"
        return None

    def dense_together(self, a: Array, b: Array) -> bool:
        # Every NumPy array is on the CPU; only subclasses (masked arrays) go to the checks.
        return type(a) is np.ndarray and type(b) is np.ndarray

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
                    row_shift(block, m)
                np.subtract(block, m, out=buf)
                np.exp(buf, out=buf)
                np.sum(buf, axis=1, keepdims=True, out=out[start:stop])

        _in_parallel(work, rows.shape[0], rows.nbytes)
        np.log(out, out=out)
        return out.reshape(shift.shape)

    def fused_index_plan(
        self, input: Array, target: Array, options: IndexOptions
    ) -> Callable[[Array, Array, Array | None], Array | None] | None:
        # The plain loss of C-contiguous logits whose labels are all in [0, C) or ignored (one
        # max reads them): one pass of max, exp and sum, with no mask, where or gather of the
        # general path. The dtypes, shapes and options are judged here, once; each call judges
        # its layout and labels, and hands anything else, and any NaN row, back to the core.
        if not _plain_case(np.asarray(input), np.asarray(target), options):
            return None
        axis, _, ignore_index, smoothing, reduction = options

        def plan(input: Array, target: Array, weight: Array | None) -> Array | None:
            moved = _memory_order(np.asarray(input), np.asarray(target), axis)
            if moved is None:
                return None
            x, y, ax, _, y_order = moved
            plain = _plain_rows(x, y, ignore_index, ax)
            if plain is None:
                return None
            loss = self._fused_loss(plain, weight, reduction, smoothing)
            return _back(loss, y_order) if loss is not None and reduction == "none" else loss

        return plan

    def _fused_loss(
        self, plain: _Rows, weight: Array | None, reduction: str, smoothing: float = 0.0
    ) -> Array | None:
        x, labels, shape, ignored = plain
        dtype = _compute_dtype(x.dtype)
        with self.quiet():
            label_weight = _label_weight(weight, labels, ignored, dtype)
            if not smoothing:
                done = _pass(x, labels, dtype, None)
                assert done is not None  # declined only with smoothing
                picked, total, _ = done
                return _loss(x.dtype, shape, picked, total, label_weight, reduction)
            w = _class_weights(weight, dtype)
            smooth = _Smooth(w, _weight_sum(w, x.shape[1]), np.empty(labels.size, dtype))
            done = _pass(x, labels, dtype, None, smooth)
            if done is None:
                return None
            picked, total, _ = done
            return _smoothed_loss(
                x, shape, picked, total, label_weight, ignored, smooth, smoothing, reduction
            )

    def fused_index_loss_and_grad(
        self, input: Array, target: Array, options: IndexOptions
    ) -> tuple[Array, Array] | None:
        # The same pass, its exponentials scaled in place into the gradient:
        # d loss_n / d x = f_n (softmax_n - onehot(y_n)), f_n the row's weight in the sum.
        x, y = np.asarray(input), np.asarray(target)
        if not _plain_case(x, y, options):
            return None
        moved = _memory_order(x, y, options.axis)
        if moved is None:
            return None
        x, y, axis, x_order, y_order = moved
        both = self._loss_and_grad(x, y, options._replace(axis=axis))
        if both is None or (x_order is None and y_order is None):
            return both
        loss, grad = both
        return (_back(loss, y_order) if loss.ndim else loss), _back(grad, x_order)

    def _loss_and_grad(
        self, x: np.ndarray, y: np.ndarray, options: IndexOptions
    ) -> tuple[Array, Array] | None:
        """:meth:`fused_index_loss_and_grad` of a C-contiguous ``x``."""
        axis, weight, ignore_index, smoothing, reduction = options
        plain = _plain_rows(x, y, ignore_index, axis)
        if plain is None:
            return None
        if smoothing:
            return self._smoothed_loss_and_grad(plain, weight, reduction, smoothing, x.shape)
        logits, labels, shape, ignored = plain
        dtype = _compute_dtype(x.dtype)
        with self.quiet():
            label_weight = _label_weight(weight, labels, ignored, dtype)
            factor: np.ndarray | Any = dtype.type(1) if label_weight is None else label_weight
            if reduction == "mean":
                factor = factor / _count(labels.size, label_weight)
                if ignored is not None:
                    # 0, not 0 / 0, where every row is ignored (as on the general path).
                    np.copyto(factor, 0, where=ignored)
            done = _pass(logits, labels, dtype, factor)
            assert done is not None  # declined only with smoothing
            picked, total, grad = done
            loss = _loss(x.dtype, shape, picked, total, label_weight, reduction)
        assert grad is not None
        return None if loss is None else (loss, grad.reshape(x.shape))

    def _smoothed_loss_and_grad(
        self,
        plain: _Rows,
        weight: Array | None,
        reduction: str,
        smoothing: float,
        input_shape: tuple[int, ...],
    ) -> tuple[Array, Array] | None:
        # d loss_n / d x_c = s_n (a_n p_c - (1 - e) w_y [c = y] - (e / C) w_c), with s_n the
        # position's scale (1, or 1 / the mean's denominator; 0 where ignored) and
        # a_n = (1 - e) w_y + (e / C) W.
        x, labels, shape, ignored = plain
        c = x.shape[1]
        dtype = _compute_dtype(x.dtype)
        with self.quiet():
            label_weight = _label_weight(weight, labels, ignored, dtype)
            w = _class_weights(weight, dtype)
            scale: np.ndarray | Any = dtype.type(1)
            if reduction == "mean":
                scale = scale / _count(labels.size, label_weight)
            if ignored is not None:
                # 0, not 0 / 0, where every position is ignored (as on the general path).
                scale = np.where(ignored, dtype.type(0), scale).astype(dtype, copy=False)
            spread = scale * (smoothing / c)
            at_label = None
            factor = spread * _weight_sum(w, c)
            if smoothing != 1.0:
                at_label = scale * (1.0 - smoothing)
                if label_weight is not None:
                    at_label = at_label * label_weight
                factor = factor + at_label
            if w is not None and not _ratio_safe(factor, spread, dtype):
                return None
            smooth = _Smooth(w, _weight_sum(w, c), np.empty(labels.size, dtype), spread, at_label)
            done = _pass(x, labels, dtype, factor, smooth)
            if done is None:
                return None
            picked, total, grad = done
            loss = _smoothed_loss(
                x, shape, picked, total, label_weight, ignored, smooth, smoothing, reduction
            )
        assert grad is not None
        return None if loss is None else (loss, grad.reshape(input_shape))

    def fused_prob_plan(
        self, input: Array, target: Array, options: IndexOptions
    ) -> Callable[[Array, Array, Array | None], Array | None] | None:
        # One blocked pass (_numpy_dense.prob_loss), which hands any non-finite result back.
        axis, _, _, smoothing, reduction = options

        def plan(input: Array, target: Array, weight: Array | None) -> Array | None:
            done = _numpy_dense.prob_loss(
                input, target, weight, axis, smoothing, reduction, with_grad=False
            )
            return None if done is None else done[0]

        return plan

    def fused_prob_loss_and_grad(
        self, input: Array, target: Array, options: IndexOptions
    ) -> tuple[Array, Array] | None:
        axis, weight, _, smoothing, reduction = options
        done = _numpy_dense.prob_loss(
            input, target, weight, axis, smoothing, reduction, with_grad=True
        )
        return None if done is None else (done[0], done[1])

    def fused_binary_loss(
        self, input: Array, target: Array, options: BinaryOptions
    ) -> Array | None:
        done = _numpy_dense.binary_loss(input, target, options, with_grad=False)
        return None if done is None else done[0]

    def fused_softmax(self, kind: str, x: Array, axis: int) -> Array | None:
        return _numpy_softmax.fused(kind, x, axis)

    def fused_binary_loss_and_grad(
        self, input: Array, target: Array, options: BinaryOptions
    ) -> tuple[Array, Array] | None:
        done = _numpy_dense.binary_loss(input, target, options, with_grad=True)
        return None if done is None else (done[0], done[1])

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
        whole = axis % x.ndim != x.ndim - 1 or x.size == 0 or shape != x.shape
        out = x if writable else np.empty(shape, dtype=x.dtype) if whole else _fresh(shape, x.dtype)
        if whole:
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
        # The product straight into the reused buffer (or a new one) and the bias added in
        # place: no second array of the logits' size, and no new one per block.
        if h.dtype != dtype or weight.dtype != dtype:
            return super().linear_logits(h, weight, bias, dtype, out)
        out = np.matmul(h, weight.T, out=out)
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
