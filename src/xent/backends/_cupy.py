"""CuPy: values live on the GPU; fused element-wise kernels."""

from __future__ import annotations

import cupy as cp

from .._typing import Array
from ._generic import Backend


class Facts(Backend):
    """Reading CuPy values costs a device sync, so the default validation skips it."""

    name = "cupy"

    def is_lazy(self, x: Array) -> bool:
        return False

    def on_host(self, x: Array) -> bool:
        return False


_log_sum_kernel = cp.ReductionKernel(
    "T x, T m",
    "T y",
    "exp(x - m)",
    "a + b",
    "y = log(a)",
    "0",
    "xent_log_sum_exp",
)


_softmax_kernel = cp.ElementwiseKernel(
    "T x, T m, T s, T k",
    "T y",
    "y = exp((x - m) - s) * k",
    "xent_scaled_softmax",
)


class Native(Backend):
    """Fused kernels: exp-sum-log reduction, scaled softmax; in-place row fills."""

    native = True

    def logsumexp(self, x: Array, axis: int) -> tuple[Array, Array]:
        shift = cp.max(x, axis=axis, keepdims=True)
        shift = cp.where(cp.isfinite(shift), shift, 0).astype(x.dtype)
        return shift, _log_sum_kernel(x, shift, axis=axis, keepdims=True)

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
        k = cp.ones((), dtype=x.dtype) if scale is None else scale.astype(x.dtype, copy=False)
        return _softmax_kernel(x, shift, log_sum, k)

    def take_along_axis(self, x: Array, index: Array, axis: int) -> Array:
        return cp.take_along_axis(x, index, axis=axis)

    def fill_rows(self, g: Array, mask: Array, value: float) -> Array:
        cp.copyto(g, cp.asarray(value, dtype=g.dtype), where=mask)
        return g


class NativeBackend(Native, Facts):
    """The facts with the native overrides on top."""
