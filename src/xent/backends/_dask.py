"""Dask: always lazy; every task xent adds runs under its errstate; block-wise primitives."""

from __future__ import annotations

import contextlib
import string
from collections.abc import Callable
from typing import Any

import dask.array as da
import numpy as np
from dask._task_spec import Task
from dask.base import tokenize
from dask.blockwise import Blockwise
from dask.highlevelgraph import HighLevelGraph, Layer, MaterializedLayer

from .._typing import Array
from ._generic import Backend
from ._numpy import Native as _NumpyNative


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


class Native(Backend):
    """Block-wise log-sum-exp and take_along_axis: each block runs NumPy's chunked kernels."""

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


class NativeBackend(Native, Facts):
    """The facts with the native overrides on top."""
