"""NumPy: floating-point warnings silenced for masked rows; chunked, in-place primitives."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from .._typing import Array
from ._generic import Backend

_SCRATCH_BYTES = 16 * 2**20
"""Bound on the scratch buffer of the chunked primitives (the user's arrays are never written)."""


class Facts(Backend):
    """NumPy arrays are concrete and in host memory."""

    name = "numpy"

    def is_lazy(self, x: Array) -> bool:
        return False

    def quiet(self) -> contextlib.AbstractContextManager[Any]:
        return np.errstate(divide="ignore", invalid="ignore", over="ignore")


class Native(Backend):
    """Row-chunked log-sum-exp with one bounded scratch buffer; in-place updates of xent's own."""

    native = True

    def logsumexp(self, x: Array, axis: int) -> tuple[Array, Array]:
        x = np.asarray(x)
        if axis != x.ndim - 1:
            return super().logsumexp(x, axis)
        c = x.shape[-1]
        rows = x.reshape(-1, c)
        shift = np.empty((rows.shape[0], 1), dtype=x.dtype)
        log_sum = np.empty_like(shift)
        step = max(1, _SCRATCH_BYTES // max(1, c * x.dtype.itemsize))
        scratch = np.empty((min(step, rows.shape[0]), c), dtype=x.dtype)
        for start in range(0, rows.shape[0], step):
            block = rows[start : start + step]
            buf = scratch[: block.shape[0]]
            m = shift[start : start + step]
            np.max(block, axis=1, keepdims=True, out=m)
            m[~np.isfinite(m)] = 0
            np.subtract(block, m, out=buf)
            np.exp(buf, out=buf)
            s = log_sum[start : start + step]
            np.sum(buf, axis=1, keepdims=True, out=s)
            np.log(s, out=s)
        keep = (*x.shape[:-1], 1)
        return shift.reshape(keep), log_sum.reshape(keep)

    def softmax_from_lse(self, x: Array, shift: Array, log_sum: Array, axis: int) -> Array:
        out = np.subtract(x, shift)
        out -= log_sum
        return np.exp(out, out=out)

    def take_along_axis(self, x: Array, index: Array, axis: int) -> Array:
        return np.take_along_axis(np.asarray(x), np.asarray(index), axis=axis)

    def subtract_at(self, g: Array, index: Array, values: Array, axis: int) -> Array:
        picked = np.take_along_axis(g, index, axis=axis)
        np.put_along_axis(g, index, picked - values, axis=axis)
        return g


class NativeBackend(Native, Facts):
    """The facts with the native overrides on top."""
