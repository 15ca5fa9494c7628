"""Dask: always lazy; every task xent adds runs under its errstate; block-wise primitives, and
the plain loss as xent's NumPy loss on each block of rows."""

from __future__ import annotations

import contextlib
import math
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
from ._generic import Backend, IndexOptions
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


def _log_sum_block(x: np.ndarray, shift: np.ndarray, *, axis: int) -> Any:
    with _errstate():
        return _NUMPY.log_sum(x, shift, axis)


_NUMPY = _NumpyNative(np)

_FUSED_DTYPES = frozenset(map(np.dtype, (np.float16, np.float32, np.float64)))
"""The input dtypes of NumPy's fused pass, which each block of the fused loss runs."""


def _on_numpy(a: Any) -> bool:
    """Whether ``a`` is a Dask array whose blocks are plain NumPy arrays."""
    return isinstance(a, da.Array) and type(a._meta) is np.ndarray


def _fused_loss(
    x: da.Array, y: da.Array, weight: da.Array | None, options: IndexOptions
) -> da.Array:
    """The loss of :meth:`Native.fused_index_plan`: one task per row block runs xent's NumPy
    loss on the block; ``"sum"`` and ``"mean"`` add one task that totals the blocks' parts."""
    axis, _, ignore_index, smoothing, reduction = options
    dims = string.ascii_letters[: x.ndim + 1]
    rows, part = dims[:axis] + dims[axis + 1 : -1], dims[-1]
    args: list[Any] = [x, dims[:-1], y, rows]
    if weight is not None:
        # In one block, as the classes are: blockwise would otherwise split them to match.
        args += [weight if weight.numblocks[0] == 1 else weight.rechunk(-1), dims[axis]]
    # The class index is not in the output: without `concatenate`, each task gets the one
    # block along it in a list, where concatenating would copy it.
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


def _block_losses(
    x: list[np.ndarray],
    y: np.ndarray,
    w: list[np.ndarray] | None = None,
    *,
    axis: int,
    ignore_index: int,
    smoothing: float,
) -> np.ndarray:
    """The per-position losses of one row block (``x`` and ``w`` as one-block lists)."""
    from .._cross_entropy import cross_entropy

    loss = cross_entropy(
        x[0], y, axis=axis, weight=None if w is None else w[0], ignore_index=ignore_index,
        label_smoothing=smoothing, reduction="none", validate=False,
    )  # fmt: skip
    return np.asarray(loss)


def _block_parts(
    x: list[np.ndarray],
    y: np.ndarray,
    w: list[np.ndarray] | None = None,
    *,
    axis: int,
    ignore_index: int,
    smoothing: float,
    mean: bool,
) -> np.ndarray:
    """One row block's sum of losses, and where ``mean`` its part of the mean's denominator,
    in the compute dtype, shaped ``(1, ..., 1, parts)``."""
    from .._cross_entropy import cross_entropy

    block, weight = x[0], None if w is None else w[0]
    dtype = _compute_dtype(block.dtype)
    # float16 widened first (exactly), so that its blocks' sums add up in float32 as on
    # xent's general path, not rounded to float16 each.
    total = cross_entropy(
        block.astype(dtype, copy=False), y, axis=axis, weight=weight,
        ignore_index=ignore_index, label_smoothing=smoothing, reduction="sum", validate=False,
    )  # fmt: skip
    parts = [total]
    if mean:
        parts.append(_denominator(y, weight, block.shape[axis], ignore_index, dtype))
    return np.asarray(parts, dtype=dtype).reshape((1,) * y.ndim + (len(parts),))


def _denominator(
    y: np.ndarray, weight: np.ndarray | None, classes: int, ignore_index: int, dtype: Any
) -> Any:
    """The block's part of what ``"mean"`` divides by: its positions not ignored, or the sum
    of their labels' class weights. An invalid label's weight is any class's: its loss is
    NaN, and so is the mean."""
    own = np.iinfo(y.dtype)
    # Only a label equal to ignore_index in its own dtype is ignored (none where it is out of
    # the dtype's range), as xent's general path decides.
    kept = y != ignore_index if own.min <= ignore_index <= own.max else None
    if weight is None:
        return y.size if kept is None else np.count_nonzero(kept)
    valid = (y >= 0) & (y < classes)
    label_weight = weight.astype(dtype, copy=False)[np.where(valid, y, 0)]
    return np.sum(label_weight, where=True if kept is None else kept, dtype=dtype)


def _total(parts: list[Any], *, mean: bool, out_dtype: Any) -> np.ndarray:
    """The loss from every block's :func:`_block_parts` (nested lists, one level per row
    axis): the sum, or the sum over the denominator (0 / 0 = NaN where every position is
    ignored), in ``out_dtype``."""
    sums = np.sum([p.reshape(-1) for p in flatten(parts)], axis=0)
    total = sums[0] / sums[1] if mean else sums[0]
    return np.asarray(total).astype(out_dtype, copy=False)


class Native(Backend):
    """Block-wise log-sum-exp and take_along_axis: each block runs NumPy's chunked kernels; the
    plain loss of NumPy blocks whose classes sit in one: xent's NumPy loss on each row block."""

    native = True

    def logsumexp(self, x: Array, axis: int) -> tuple[Array, Array]:
        x = da.asarray(x)
        if x.numblocks[axis] != 1 or 0 in x.shape:
            # Classes split over blocks (or an empty array) go through Dask's tree reductions.
            return super().logsumexp(x, axis)
        chunks = tuple((1,) * len(c) if i == axis else c for i, c in enumerate(x.chunks))
        shift = da.map_blocks(_shift_block, x, axis=axis, chunks=chunks, dtype=x.dtype)
        log_sum = da.map_blocks(_log_sum_block, x, shift, axis=axis, chunks=chunks, dtype=x.dtype)
        return shift, log_sum

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
        axis = options.axis
        if (
            not (_on_numpy(input) and _on_numpy(target))
            or input.dtype not in _FUSED_DTYPES
            or target.dtype.kind not in "iu"
            or 0 in input.shape
            or math.isnan(input.shape[axis])
        ):
            return None

        def plan(input: Array, target: Array, weight: Array | None) -> Array | None:
            if input.numblocks[axis] != 1 or (weight is not None and not _on_numpy(weight)):
                return None
            return _fused_loss(input, target, weight, options)

        return plan


class NativeBackend(Native, Facts):
    """The facts with the native overrides on top."""
