"""Dask: always lazy; every task xent adds runs under its errstate; block-wise primitives, and
the plain loss (and its gradient) as xent's NumPy loss (and gradient) on each block of rows."""

from __future__ import annotations

import contextlib
import math
import operator
import string
from collections.abc import Callable
from typing import Any

import dask.array as da
import numpy as np
from dask._task_spec import Task
from dask.base import tokenize
from dask.blockwise import Blockwise
from dask.core import flatten
from dask.highlevelgraph import HighLevelGraph, Layer, MaterializedLayer

from .._typing import Array
from . import _dask_dense
from ._generic import Backend, BinaryOptions, IndexOptions
from ._numpy import Native as _NumpyNative
from ._numpy import _compute_dtype


def _errstate() -> contextlib.AbstractContextManager[Any]:
    # Underflow too: the exp of a logit far below its row's max is 0 by design, and a caller's
    # np.seterr(all="raise") would otherwise raise on it in any task of xent's.
    return np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore")


class _Quiet:
    """A block function that runs under xent's errstate, on whichever thread or worker the
    scheduler runs it (the caller's ``np.seterr`` would otherwise apply there)."""

    __slots__ = ("func",)

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _errstate():
            return self.func(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Quiet, (self.func,))

    def __dask_tokenize__(self) -> Any:
        return ("xent-quiet", tokenize(self.func))

    def __repr__(self) -> str:
        return f"quiet({self.func!r})"


def _quiet_task(task: Any) -> Any:
    """``task`` (a ``Task`` or a legacy ``(func, *args)`` tuple) with every function in it,
    nested ones included, wrapped in :class:`_Quiet`; data, aliases and keys unchanged."""
    if type(task) is Task:
        func = task.func if isinstance(task.func, _Quiet) else _Quiet(task.func)
        args = tuple(_quiet_task(a) for a in task.args)
        kwargs = {k: _quiet_task(v) for k, v in task.kwargs.items()}
        return Task(task.key, func, *args, _data_producer=task.data_producer, **kwargs)
    if type(task) is tuple and task and callable(task[0]):
        func = task[0] if isinstance(task[0], _Quiet) else _Quiet(task[0])
        return (func, *(_quiet_task(a) for a in task[1:]))
    return task


def _quiet_layer(layer: Layer) -> Layer:
    if isinstance(layer, Blockwise):
        # Rebuilt as a Blockwise layer, so Dask still fuses it with its neighbours.
        return Blockwise(
            layer.output,
            layer.output_indices,
            _quiet_task(layer.task),
            layer.indices,
            layer.numblocks,
            concatenate=layer.concatenate,
            new_axes=layer.new_axes,
            output_blocks=layer.output_blocks,
            annotations=layer.annotations,
            io_deps=layer.io_deps,
        )
    tasks = {key: _quiet_task(task) for key, task in layer.items()}
    return MaterializedLayer(tasks, annotations=layer.annotations)


class Facts(Backend):
    """Reading a Dask array computes its graph, so xent never does it unasked."""

    name = "dask"

    def is_lazy(self, x: Array) -> bool:
        return True

    def quiet(self) -> contextlib.AbstractContextManager[Any]:
        return _errstate()

    def finish(self, result: Array, *inputs: Array | None) -> Array:
        """``result`` with every task xent added to its graph (the layers that no input's
        graph holds) run under xent's errstate: the graph computes later, outside
        :meth:`quiet`, where the caller's ``np.seterr(all="raise")`` would raise on the
        ``log(0)`` of a masked row. The inputs' own tasks are left as they are."""
        graph = result.__dask_graph__()
        theirs: set[str] = set()
        for x in inputs:
            if x is not None and hasattr(x, "__dask_graph__"):
                theirs.update(x.__dask_graph__().layers)
        layers = {
            name: layer if name in theirs else _quiet_layer(layer)
            for name, layer in graph.layers.items()
        }
        quiet = HighLevelGraph(layers, dict(graph.dependencies))
        return da.Array(quiet, result.name, result.chunks, meta=result._meta)


def _gather_block(x: np.ndarray, labels: np.ndarray, classes: np.ndarray, *, axis: int) -> Any:
    """This block's part of the gather: the picked entry where the label falls in the block's
    classes (whose first number is ``classes[0]``), else 0."""
    local = np.expand_dims(labels, axis) - classes[:1]
    inside = (local >= 0) & (local < x.shape[axis])
    with _errstate():
        picked = np.take_along_axis(x, np.where(inside, local, 0), axis=axis)
        return np.where(inside, picked, np.zeros((), dtype=x.dtype))


def _shift_block(x: np.ndarray, *, axis: int) -> Any:
    with _errstate():
        shift = np.max(x, axis=axis, keepdims=True)
    return np.where(np.isfinite(shift), shift, np.zeros((), dtype=x.dtype))


def _row_max(x: Any, axis: Any = None, keepdims: bool = False, **kwargs: Any) -> Any:
    """The max along ``axis`` of a block or of the blocks' maxima, ``-inf`` for an empty one
    (which has no identity to reduce from); ``kwargs``: what Dask passes as well (a
    ``computing_meta`` flag)."""
    with _errstate():
        return np.max(x, axis=axis, keepdims=keepdims, initial=-np.inf)


def _log_sum_block(x: np.ndarray, shift: np.ndarray, *, axis: int) -> Any:
    with _errstate():
        return _NUMPY.log_sum(x, shift, axis)


_NUMPY = _NumpyNative(np)

_FUSED_DTYPES = frozenset(map(np.dtype, (np.float16, np.float32, np.float64)))
"""The input dtypes of NumPy's fused pass, which each block of the fused loss runs."""


def _on_numpy(a: Any) -> bool:
    """Whether ``a`` is a Dask array whose blocks are plain NumPy arrays."""
    return isinstance(a, da.Array) and type(a._meta) is np.ndarray


def _fused_case(x: Array, y: Array, options: IndexOptions) -> bool:
    """Whether the fused loss serves arrays of these types, dtypes and shapes (their blocks
    and the class weights aside): NumPy blocks, logits of a dtype NumPy's fused pass takes,
    integer labels, and classes of a known, non-zero number."""
    return (
        _on_numpy(x)
        and _on_numpy(y)
        and x.dtype in _FUSED_DTYPES
        and y.dtype.kind in "iu"
        and 0 not in x.shape
        and not math.isnan(x.shape[options.axis])
    )


def _fused_blocks(x: da.Array, weight: Array | None, axis: int) -> bool:
    """Whether the classes sit in one block of ``x``, and the class weights are NumPy blocks."""
    return x.numblocks[axis] == 1 and (weight is None or _on_numpy(weight))


def _weight_args(weight: da.Array | None, index: str) -> list[Any]:
    """The class weights and their index as blockwise takes them (a literal None where there
    are none), in one block as the classes are: blockwise would otherwise split them to match."""
    if weight is None:
        return [None, None]
    return [weight if weight.numblocks[0] == 1 else weight.rechunk(-1), index]


def _fused_loss(
    x: da.Array, y: da.Array, weight: da.Array | None, options: IndexOptions
) -> da.Array:
    """The loss of :meth:`Native.fused_index_plan`: one task per row block runs xent's NumPy
    loss on the block; ``"sum"`` and ``"mean"`` add one task that totals the blocks' parts."""
    axis, _, ignore_index, smoothing, reduction = options
    dims = string.ascii_letters[: x.ndim + 1]
    rows, part = dims[:axis] + dims[axis + 1 : -1], dims[-1]
    # The class index is not in the output: without `concatenate`, each task gets the one
    # block along it in a list, where concatenating would copy it.
    args = [x, dims[:-1], y, rows, *_weight_args(weight, dims[axis])]
    given = {"axis": axis, "ignore_index": ignore_index, "smoothing": smoothing}
    if reduction == "none":
        meta = np.empty((0,) * len(rows), dtype=x.dtype)
        return da.blockwise(_Quiet(_block_losses), rows, *args, dtype=x.dtype, meta=meta, **given)
    mean = reduction == "mean"
    dtype = _compute_dtype(x.dtype)
    parts = da.blockwise(
        _Quiet(_block_parts), rows + part, *args, new_axes={part: 2 if mean else 1},
        adjust_chunks=dict.fromkeys(rows, 1), dtype=dtype,
        meta=np.empty((0,) * (len(rows) + 1), dtype=dtype), mean=mean, **given,
    )  # fmt: skip
    return da.blockwise(
        _Quiet(_total), "", parts, rows + part, dtype=x.dtype,
        meta=np.empty((), dtype=x.dtype), mean=mean, out_dtype=x.dtype,
    )  # fmt: skip


def _fused_loss_and_grad(
    x: da.Array, y: da.Array, weight: da.Array | None, options: IndexOptions
) -> tuple[da.Array, da.Array]:
    """The loss and gradient of :meth:`Native.fused_index_loss_and_grad`: one task per row
    block runs xent's NumPy loss and gradient on the block and gives both (two layers take
    them apart, one totals the losses for ``"sum"`` and ``"mean"``). The mean's denominator
    depends on the labels alone: one task counts it first, so that each block's gradient
    is scaled as it is made and no block waits for the others."""
    axis, _, ignore_index, smoothing, reduction = options
    dims = string.ascii_letters[: x.ndim]
    rows = dims[:axis] + dims[axis + 1 :]
    dtype = _compute_dtype(x.dtype)
    weights = _weight_args(weight, dims[axis])
    denominator: list[Any] = [None, None]
    if reduction == "mean":
        count = da.blockwise(
            _Quiet(_denominator_total), "", y, rows, *weights, dtype=dtype,
            meta=np.empty((), dtype=dtype), classes=x.shape[axis], ignore_index=ignore_index,
            out_dtype=dtype,
        )  # fmt: skip
        denominator = [count, ""]
    # Each block of `pairs` is a (loss, gradient) tuple, read only by the layers below.
    pairs = da.blockwise(
        _Quiet(_block_loss_and_grad), rows, x, dims, y, rows, *weights, *denominator,
        dtype=x.dtype, meta=np.empty((0,) * len(rows), dtype=x.dtype), axis=axis,
        ignore_index=ignore_index, smoothing=smoothing, reduction=reduction,
    )  # fmt: skip
    if reduction == "none":
        loss = da.blockwise(
            operator.getitem, rows, pairs, rows, 0, None, dtype=x.dtype,
            meta=np.empty((0,) * len(rows), dtype=x.dtype),
        )  # fmt: skip
    else:
        loss = da.blockwise(
            _Quiet(_pairs_total), "", pairs, rows, *denominator, dtype=x.dtype,
            meta=np.empty((), dtype=x.dtype), out_dtype=x.dtype,
        )  # fmt: skip
    grad = da.blockwise(
        operator.getitem, dims, pairs, rows, 1, None, new_axes={dims[axis]: x.shape[axis]},
        dtype=x.dtype, meta=np.empty((0,) * x.ndim, dtype=x.dtype),
    )  # fmt: skip
    return loss, grad


def _block_losses(
    x: list[np.ndarray],
    y: np.ndarray,
    w: list[np.ndarray] | None,
    *,
    axis: int,
    ignore_index: int,
    smoothing: float,
) -> np.ndarray:
    """The per-position losses of one row block (``x`` and ``w`` as one-block lists)."""
    from .._cross_entropy import cross_entropy

    options = _block_options(w, axis, ignore_index, smoothing)
    return np.asarray(cross_entropy(x[0], y, reduction="none", **options))


def _block_parts(
    x: list[np.ndarray],
    y: np.ndarray,
    w: list[np.ndarray] | None,
    *,
    axis: int,
    ignore_index: int,
    smoothing: float,
    mean: bool,
) -> np.ndarray:
    """One row block's sum of losses, and where ``mean`` its part of the mean's denominator,
    in the compute dtype, shaped ``(1, ..., 1, parts)``."""
    from .._cross_entropy import cross_entropy

    block, options = x[0], _block_options(w, axis, ignore_index, smoothing)
    dtype = _compute_dtype(block.dtype)
    # float16 widened first (exactly), so that its blocks' sums add up in float32 as on
    # xent's general path, not rounded to float16 each.
    parts = [cross_entropy(block.astype(dtype, copy=False), y, reduction="sum", **options)]
    if mean:
        weight = options["weight"]
        parts.append(_denominator(y, weight, block.shape[axis], ignore_index, dtype))
    return np.asarray(parts, dtype=dtype).reshape((1,) * y.ndim + (len(parts),))


def _block_loss_and_grad(
    x: list[np.ndarray],
    y: np.ndarray,
    w: list[np.ndarray] | None,
    count: np.ndarray | None,
    *,
    axis: int,
    ignore_index: int,
    smoothing: float,
    reduction: str,
) -> tuple[np.ndarray, np.ndarray]:
    """One row block's losses (per position for ``"none"``, else their sum in the compute
    dtype) and the gradient of the loss, divided by the mean's denominator ``count`` (None
    for the other reductions)."""
    from .._cross_entropy import cross_entropy_and_grad

    block, options = x[0], _block_options(w, axis, ignore_index, smoothing)
    if reduction == "none":
        loss, grad = cross_entropy_and_grad(block, y, reduction="none", **options)
        return np.asarray(loss), grad
    # float16 widened first (exactly): the sum adds up and the gradient is scaled in float32,
    # each rounded to float16 once, as on xent's general path.
    loss, grad = cross_entropy_and_grad(
        block.astype(_compute_dtype(block.dtype), copy=False), y, reduction="sum", **options
    )
    if count is not None:
        scale = 1 / count
        # No position counts (every one ignored, or class weights that sum to 0): the
        # general path's 0 times the softmax where ignored, 1 / 0 times the rest.
        kept = None if np.isfinite(scale) else _kept(y, ignore_index)
        where = True if kept is None else np.expand_dims(kept, axis)
        np.multiply(grad, scale, out=grad, where=where)
    return np.asarray(loss), grad.astype(block.dtype, copy=False)


def _block_options(
    w: list[np.ndarray] | None, axis: int, ignore_index: int, smoothing: float
) -> dict[str, Any]:
    """The options of xent's NumPy loss on one block: the class weights out of their one-block
    list, and no label check (an invalid label gives NaN, as on a lazy backend)."""
    return {
        "axis": axis, "weight": None if w is None else w[0], "ignore_index": ignore_index,
        "label_smoothing": smoothing, "validate": False,
    }  # fmt: skip


def _kept(y: np.ndarray, ignore_index: int) -> np.ndarray | None:
    """Where the labels are not ``ignore_index`` (None: everywhere). Only a label equal to it
    in its own dtype is ignored (none where it is out of the dtype's range), as xent's general
    path decides."""
    own = np.iinfo(y.dtype)
    return y != ignore_index if own.min <= ignore_index <= own.max else None


def _denominator(
    y: np.ndarray, weight: np.ndarray | None, classes: int, ignore_index: int, dtype: Any
) -> Any:
    """The block's part of what ``"mean"`` divides by: its positions not ignored, or the sum
    of their labels' class weights. An invalid label's weight is any class's: its loss is
    NaN, and so is the mean."""
    kept = _kept(y, ignore_index)
    if weight is None:
        return y.size if kept is None else np.count_nonzero(kept)
    valid = (y >= 0) & (y < classes)
    label_weight = weight.astype(dtype, copy=False)[np.where(valid, y, 0)]
    return np.sum(label_weight, where=True if kept is None else kept, dtype=dtype)


def _denominator_total(
    y: Any, w: list[np.ndarray] | None, *, classes: int, ignore_index: int, out_dtype: Any
) -> np.ndarray:
    """What ``"mean"`` divides by, from every block of labels, in ``out_dtype``."""
    weight = None if w is None else w[0]
    parts = [_denominator(b, weight, classes, ignore_index, out_dtype) for b in _leaves(y)]
    return np.asarray(sum(parts), dtype=out_dtype)


def _leaves(nested: Any) -> list[Any]:
    """The blocks that a task of blockwise gets for indices it contracts: nested lists, one
    level per index (the block itself where there is none)."""
    return list(flatten(nested)) if isinstance(nested, list) else [nested]


def _total(parts: list[Any], *, mean: bool, out_dtype: Any) -> np.ndarray:
    """The loss from every block's :func:`_block_parts`: the sum, or the sum over the
    denominator (0 / 0 = NaN where every position is ignored), in ``out_dtype``."""
    sums = np.sum([p.reshape(-1) for p in _leaves(parts)], axis=0)
    total = sums[0] / sums[1] if mean else sums[0]
    return np.asarray(total).astype(out_dtype, copy=False)


def _pairs_total(pairs: Any, count: np.ndarray | None, *, out_dtype: Any) -> np.ndarray:
    """The loss from every block's :func:`_block_loss_and_grad`: the sum of their sums, over
    the mean's denominator ``count`` (None for the sum), in ``out_dtype``."""
    total = np.sum([pair[0] for pair in _leaves(pairs)])
    if count is not None:
        total = total / count
    return np.asarray(total).astype(out_dtype, copy=False)


class Native(Backend):
    """Block-wise log-sum-exp and take_along_axis: each block runs NumPy's chunked kernels; the
    plain loss and gradient of NumPy blocks whose classes sit in one: xent's NumPy loss and
    gradient on each row block."""

    native = True

    def logsumexp(self, x: Array, axis: int) -> tuple[Array, Array]:
        x = da.asarray(x)
        if 0 in x.shape or x.numblocks[axis] != 1:
            # Classes split over blocks (or an empty array) go through tree reductions (the
            # max through row_max below).
            return super().logsumexp(x, axis)
        chunks = tuple((1,) * len(c) if i == axis else c for i, c in enumerate(x.chunks))
        shift = da.map_blocks(_shift_block, x, axis=axis, chunks=chunks, dtype=x.dtype)
        log_sum = da.map_blocks(_log_sum_block, x, shift, axis=axis, chunks=chunks, dtype=x.dtype)
        return shift, log_sum

    def row_max(self, x: Array, axis: int) -> Array:
        x = da.asarray(x)
        if 0 in x.shape:
            return super().row_max(x, axis)
        # A tree reduction whose blocks may be empty: Dask's `max` fails on an empty block of
        # rows, which boolean indexing makes (its chunk step returns a (1, 0) array there).
        return da.reduction(
            x, _Quiet(_row_max), _Quiet(_row_max), axis=axis, keepdims=True, dtype=x.dtype,
            meta=np.empty((0,) * x.ndim, dtype=x.dtype),
        )  # fmt: skip

    def take_along_axis(self, x: Array, index: Array, axis: int) -> Array:
        x = da.asarray(x)
        if 0 in x.shape or 0 in index.shape:
            # Empty blocks carry no labels; the one-hot reduction gets the shapes right.
            return super().take_along_axis(x, index, axis)
        axis = axis % x.ndim
        # One pass: every block of classes gathers the labels that fall in it (0 elsewhere),
        # and one tree reduction adds the per-block parts, exactly (one term is not 0).
        dims = string.ascii_letters[: x.ndim]
        rows = dims[:axis] + dims[axis + 1 :]
        labels = da.squeeze(da.asarray(index), axis=axis)
        classes = da.arange(x.shape[axis], chunks=x.chunks[axis], dtype=labels.dtype)
        parts = da.blockwise(
            _gather_block, dims, x, dims, labels, rows, classes, dims[axis],
            axis=axis, dtype=x.dtype, adjust_chunks={dims[axis]: 1},
        )  # fmt: skip
        return da.sum(parts, axis=axis, keepdims=True)

    def fused_index_plan(
        self, input: Array, target: Array, options: IndexOptions
    ) -> Callable[[Array, Array, Array | None], Array | None] | None:
        # Row blocks of NumPy arrays whose classes sit in one block: each task runs xent's own
        # NumPy loss on its block (NumPy's fused pass; xent's general path for NaN rows and
        # invalid labels, which validate=False makes NaN), one or two graph layers where the
        # primitives build some thirty. Anything else takes the core's path.
        if not _fused_case(input, target, options):
            return None

        def plan(input: Array, target: Array, weight: Array | None) -> Array | None:
            if not _fused_blocks(input, weight, options.axis):
                return None
            return _fused_loss(input, target, weight, options)

        return plan

    def fused_index_loss_and_grad(
        self, input: Array, target: Array, options: IndexOptions
    ) -> tuple[Array, Array] | None:
        # The same blocks, each running xent's NumPy loss and gradient.
        if not (
            _fused_case(input, target, options)
            and _fused_blocks(input, options.weight, options.axis)
        ):
            return None
        return _fused_loss_and_grad(input, target, options.weight, options)

    def fused_prob_plan(
        self, input: Array, target: Array, options: IndexOptions
    ) -> Callable[[Array, Array, Array | None], Array | None] | None:
        # Row blocks of NumPy arrays whose classes sit in one block: each task runs xent's
        # NumPy probability loss on its block (backends/_dask_dense.py).
        def plan(input: Array, target: Array, weight: Array | None) -> Array | None:
            given = options._replace(weight=weight)
            return _dask_dense.prob_loss(input, target, given, with_grad=False)

        return plan

    def fused_prob_loss_and_grad(
        self, input: Array, target: Array, options: IndexOptions
    ) -> tuple[Array, Array] | None:
        return _dask_dense.prob_loss(input, target, options, with_grad=True)

    def fused_binary_loss(
        self, input: Array, target: Array, options: BinaryOptions
    ) -> Array | None:
        # Any blocks of NumPy arrays: each task runs xent's NumPy binary loss on its block.
        return _dask_dense.binary_loss(input, target, options, with_grad=False)

    def fused_binary_loss_and_grad(
        self, input: Array, target: Array, options: BinaryOptions
    ) -> tuple[Array, Array] | None:
        return _dask_dense.binary_loss(input, target, options, with_grad=True)


class NativeBackend(Native, Facts):
    """The facts with the native overrides on top."""
