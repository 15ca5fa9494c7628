"""Dask: always lazy; warnings of masked rows silenced; block-wise log-sum-exp and gather."""

from __future__ import annotations

import contextlib
from typing import Any

import dask.array as da
import numpy as np

from .._typing import Array
from ._generic import Backend
from ._numpy import Native as _NumpyNative


class Facts(Backend):
    """Reading a Dask array computes its graph, so xent never does it unasked."""

    name = "dask"

    def is_lazy(self, x: Array) -> bool:
        return True

    def quiet(self) -> contextlib.AbstractContextManager[Any]:
        return np.errstate(divide="ignore", invalid="ignore", over="ignore")


def _gather_block(x: np.ndarray, index: np.ndarray, *, axis: int, offset: np.ndarray) -> Any:
    local = index - offset
    inside = (local >= 0) & (local < x.shape[axis])
    picked = np.take_along_axis(x, np.where(inside, local, 0), axis=axis)
    return np.where(inside, picked, 0)


def _shift_block(x: np.ndarray, *, axis: int) -> Any:
    with np.errstate(invalid="ignore"):
        shift = np.max(x, axis=axis, keepdims=True)
    return np.where(np.isfinite(shift), shift, np.zeros((), dtype=x.dtype))


def _log_sum_block(x: np.ndarray, shift: np.ndarray, *, axis: int) -> Any:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
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
        index = da.asarray(index).rechunk(
            tuple(1 if i == axis else c for i, c in enumerate(x.chunks))
        )
        starts = np.cumsum((0, *x.chunks[axis][:-1]))
        parts = []
        for k, start in enumerate(starts):
            block = x.blocks[tuple(k if i == axis else slice(None) for i in range(x.ndim))]
            parts.append(
                da.map_blocks(
                    _gather_block,
                    block,
                    index,
                    axis=axis,
                    offset=np.asarray(start, dtype=index.dtype),
                    dtype=x.dtype,
                    chunks=index.chunks,
                )
            )
        return sum(parts[1:], parts[0])


class NativeBackend(Native, Facts):
    """The facts with the native overrides on top."""
