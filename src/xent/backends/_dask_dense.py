"""Dask: the losses over dense targets (class probabilities, binary labels) of NumPy blocks as
xent's NumPy loss (and gradient) on each block: one or two graph layers, and one task that
totals the blocks for ``"sum"`` and ``"mean"``, where the general path's primitives build
some twenty to thirty.

The probability loss takes blocks of whole rows (the classes in one block); the binary loss,
element-wise, any blocks. The targets (and element weights) are rechunked to the logits'
blocks where they differ. A block whose loss is not finite takes the NumPy backend's general
path inside its task, so every element comes out as on xent's general path.
"""

from __future__ import annotations

import math
import operator
import string
from typing import Any

import dask.array as da
import numpy as np

from .._typing import Array
from . import _dask, _numpy
from ._generic import BinaryOptions, IndexOptions


def _served(x: Array, *others: Array | None) -> bool:
    """Whether the dense fast path serves these arrays: NumPy blocks, logits of a dtype
    NumPy's pass takes, a known, non-empty shape."""
    return (
        _dask._on_numpy(x)
        and all(o is None or _dask._on_numpy(o) for o in others)
        and x.dtype in _dask._FUSED_DTYPES
        and not any(math.isnan(n) for n in x.shape)
        and 0 not in x.shape
    )


def _aligned(a: da.Array | None, x: da.Array) -> da.Array | None:
    """``a`` broadcast to ``x``'s shape and split into ``x``'s blocks (None stays None)."""
    if a is None:
        return None
    if tuple(a.shape) != tuple(x.shape):
        a = da.broadcast_to(a, x.shape)
    return a if a.chunks == x.chunks else a.rechunk(x.chunks)


def _args(a: da.Array | None, index: str) -> list[Any]:
    return [None, None] if a is None else [a, index]


def _first(a: Any) -> Any:
    """A block, out of the one-block list blockwise hands a contracted index."""
    return a[0] if isinstance(a, list) else a


# --------------------------------------------------------------------------- blocks
def _binary_block(
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray | None,
    pw: np.ndarray | None,
    *,
    smoothing: float,
    reduction: str,
    with_grad: bool,
    scale: float,
) -> Any:
    """One block's binary losses (``"none"``), or their sum in the compute dtype shaped
    ``(1, ..., 1)``; with ``with_grad`` the pair of that and the block's gradient of the
    loss, times ``scale`` (the mean's ``1 / count``)."""
    from .._binary import binary_cross_entropy, binary_cross_entropy_and_grad

    options: dict[str, Any] = {"weight": w, "pos_weight": pw, "label_smoothing": smoothing}
    block = x if reduction == "none" else x.astype(_numpy._compute_dtype(x.dtype), copy=False)
    per: Any = "none" if reduction == "none" else "sum"
    if not with_grad:
        loss = np.asarray(binary_cross_entropy(block, y, reduction=per, **options))
        return loss if per == "none" else loss.reshape((1,) * x.ndim)
    loss, grad = binary_cross_entropy_and_grad(block, y, reduction=per, **options)
    if scale != 1.0:
        grad = grad * grad.dtype.type(scale)
    return np.asarray(loss), grad.astype(x.dtype, copy=False)


def _prob_block(
    x: Any,
    q: Any,
    w: Any,
    *,
    axis: int,
    smoothing: float,
    reduction: str,
    with_grad: bool,
    scale: float,
) -> Any:
    """One row block's probability losses (``"none"``), or their sum in the compute dtype
    shaped ``(1, ..., 1)`` without the class axis; with ``with_grad`` the pair of that and
    the gradient times ``scale``."""
    from .._cross_entropy import cross_entropy, cross_entropy_and_grad

    x, q, w = _first(x), _first(q), _first(w)
    options: dict[str, Any] = {"axis": axis, "weight": w, "label_smoothing": smoothing}
    block = x if reduction == "none" else x.astype(_numpy._compute_dtype(x.dtype), copy=False)
    per: Any = "none" if reduction == "none" else "sum"
    if not with_grad:
        loss = np.asarray(cross_entropy(block, q, reduction=per, **options))
        return loss if per == "none" else loss.reshape((1,) * (x.ndim - 1))
    loss, grad = cross_entropy_and_grad(block, q, reduction=per, **options)
    if scale != 1.0:
        grad = grad * grad.dtype.type(scale)
    return np.asarray(loss), grad.astype(x.dtype, copy=False)


def _sum_parts(parts: Any, *, count: float | None, out_dtype: Any) -> np.ndarray:
    """The loss from every block's sum (a tuple's first item where the blocks are pairs):
    their sum, over ``count`` for the mean, in ``out_dtype``."""
    leaves = _dask._leaves(parts)
    total = np.sum([p[0] if isinstance(p, tuple) else p.reshape(()) for p in leaves])
    if count is not None:
        total = total / count
    return np.asarray(total).astype(out_dtype, copy=False)


def _graph(
    func: Any,
    x: da.Array,
    out: str,
    args: list[Any],
    *,
    reduction: str,
    with_grad: bool,
    count: float,
    grad_axes: dict[str, int],
    **given: Any,
) -> Any:
    """The loss (and gradient) from ``func`` run on each block: ``out`` the indices of a
    block's per-position losses, ``args`` blockwise's arrays and indices."""
    dims = string.ascii_letters[: x.ndim]
    dtype = _numpy._compute_dtype(x.dtype)
    mean = reduction == "mean"
    scale = 1.0 / count if mean and with_grad else 1.0
    quiet = _dask._Quiet(func)
    keep = {"reduction": reduction, "with_grad": with_grad, "scale": scale, **given}
    if not with_grad:
        if reduction == "none":
            meta = np.empty((0,) * len(out), dtype=x.dtype)
            return da.blockwise(quiet, out, *args, dtype=x.dtype, meta=meta, **keep)
        parts = da.blockwise(
            quiet, out, *args, adjust_chunks=dict.fromkeys(out, 1), dtype=dtype,
            meta=np.empty((0,) * len(out), dtype=dtype), **keep,
        )  # fmt: skip
        return da.blockwise(
            _dask._Quiet(_sum_parts), "", parts, out, dtype=x.dtype,
            meta=np.empty((), dtype=x.dtype), count=count if mean else None,
            out_dtype=x.dtype,
        )  # fmt: skip
    # Each block of `pairs` is a (loss, gradient) tuple, read only by the layers below.
    pairs = da.blockwise(
        quiet, out, *args, dtype=x.dtype, meta=np.empty((0,) * len(out), dtype=x.dtype), **keep
    )
    if reduction == "none":
        loss = da.blockwise(
            operator.getitem, out, pairs, out, 0, None, dtype=x.dtype,
            meta=np.empty((0,) * len(out), dtype=x.dtype),
        )  # fmt: skip
    else:
        loss = da.blockwise(
            _dask._Quiet(_sum_parts), "", pairs, out, dtype=x.dtype,
            meta=np.empty((), dtype=x.dtype), count=count if mean else None,
            out_dtype=x.dtype,
        )  # fmt: skip
    grad = da.blockwise(
        operator.getitem, dims, pairs, out, 1, None, new_axes=grad_axes, dtype=x.dtype,
        meta=np.empty((0,) * x.ndim, dtype=x.dtype),
    )  # fmt: skip
    return loss, grad


# --------------------------------------------------------------------------- entries
def binary_loss(input: Array, target: Array, options: BinaryOptions, *, with_grad: bool) -> Any:
    """The binary loss of logits (and with ``with_grad`` the pair with its gradient) of NumPy
    blocks, or None where this path does not serve them."""
    weight, pos_weight, smoothing, reduction = options
    if not _served(input, target, weight, pos_weight) or input.ndim == 0:
        return None
    x = input
    y = _aligned(target, x)
    w, pw = _aligned(weight, x), _aligned(pos_weight, x)
    dims = string.ascii_letters[: x.ndim]
    args = [x, dims, y, dims, *_args(w, dims), *_args(pw, dims)]
    return _graph(
        _binary_block, x, dims, args, reduction=reduction, with_grad=with_grad,
        count=float(math.prod(x.shape)), grad_axes={}, smoothing=smoothing,
    )  # fmt: skip


def prob_loss(input: Array, target: Array, options: IndexOptions, *, with_grad: bool) -> Any:
    """The probability loss (and with ``with_grad`` the pair with its gradient) of NumPy
    blocks whose classes sit in one, or None where this path does not serve them."""
    axis, weight, _, smoothing, reduction = options
    if (
        not _served(input, target, weight)
        or input.numblocks[axis] != 1
        or tuple(target.shape) != tuple(input.shape)
    ):
        return None
    x = input
    q = _aligned(target, x)
    dims = string.ascii_letters[: x.ndim]
    rows = dims[:axis] + dims[axis + 1 :]
    w = None if weight is None else (weight if weight.numblocks[0] == 1 else weight.rechunk(-1))
    args = [x, dims, q, dims, *_args(w, dims[axis])]
    return _graph(
        _prob_block, x, rows, args, reduction=reduction, with_grad=with_grad,
        count=float(math.prod(x.shape) // x.shape[axis]), grad_axes={dims[axis]: x.shape[axis]},
        axis=axis, smoothing=smoothing,
    )  # fmt: skip
