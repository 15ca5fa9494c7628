"""Backends, conversions and comparisons shared by the conformance suite.

Every test builds its inputs in NumPy, moves them onto the backend under test with `to_xp`,
and compares xent's result with `xp_assert_close`, which checks namespace, device, dtype,
shape and values together.
"""

from __future__ import annotations

import dataclasses
import math
from enum import Enum
from typing import Any

import array_api_compat
import numpy as np
import pytest

__all__ = [
    "Backend",
    "current",
    "dtype_eps",
    "is_concrete_host",
    "is_lazy",
    "property_settings",
    "to_numpy",
    "to_xp",
    "xp_assert_close",
    "xp_assert_equal",
]


class Backend(Enum):
    """The array libraries and devices the suite runs on; the value is the `--backend` name."""

    NUMPY = "numpy"
    NUMPY_READONLY = "numpy_readonly"
    ARRAY_API_STRICT = "array_api_strict"
    TORCH = "torch"
    TORCH_CUDA = "torch_cuda"
    JAX = "jax"
    JAX_GPU = "jax_gpu"
    DASK = "dask"
    CUPY = "cupy"

    @property
    def modname(self) -> str:
        return {
            Backend.NUMPY: "numpy",
            Backend.NUMPY_READONLY: "numpy",
            Backend.ARRAY_API_STRICT: "array_api_strict",
            Backend.TORCH: "torch",
            Backend.TORCH_CUDA: "torch",
            Backend.JAX: "jax",
            Backend.JAX_GPU: "jax",
            Backend.DASK: "dask.array",
            Backend.CUPY: "cupy",
        }[self]

    def like(self, *others: Backend) -> bool:
        return any(self.modname == other.modname for other in others)


@dataclasses.dataclass(frozen=True)
class Current:
    """What the `xp` fixture set up for the running test."""

    backend: Backend
    xp: Any
    device: Any
    native: bool


_current: Current | None = None


def set_current(state: Current | None) -> None:
    global _current
    _current = state


def current() -> Current:
    if _current is None:
        msg = "no backend is set up: request the `xp` fixture"
        raise RuntimeError(msg)
    return _current


def is_lazy() -> bool:
    """True where values are not known until `.compute()` (Dask)."""
    return current().backend is Backend.DASK


def is_concrete_host() -> bool:
    """True where label values are concrete and in host memory, so `validate=None` checks them."""
    return current().backend in {
        Backend.NUMPY,
        Backend.NUMPY_READONLY,
        Backend.ARRAY_API_STRICT,
        Backend.TORCH,
        Backend.JAX,
    }


def _dask_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    # Two chunks on every axis of two or more elements (rows and classes alike, ragged for odd
    # sizes), so every reduction over the class axis crosses a chunk boundary while graphs stay
    # small enough for a fast suite.
    return tuple(max(1, math.ceil(n / 2)) for n in shape)


# Examples per hypothesis test. Eager JAX compiles every new shape (seconds each with xent's
# native overrides) and Dask builds a graph per call, so they get fewer random cases.
_EXAMPLES = {Backend.JAX: 10, Backend.JAX_GPU: 10, Backend.DASK: 12}


def property_settings() -> Any:
    """Hypothesis settings for a property test of the running backend (see `_EXAMPLES`)."""
    from hypothesis import settings

    return settings(max_examples=_EXAMPLES.get(current().backend, 30))


def xp_dtype(xp: Any, name: str) -> Any:
    """The dtype called `name` in `xp`; skips (with the reason) where `xp` has no such dtype."""
    dtype = getattr(xp, name, None)
    if dtype is None:
        pytest.skip(f"{getattr(xp, '__name__', xp)} has no dtype {name}")
    return dtype


def to_xp(xp: Any, a: Any, /, *, dtype: str | None = None) -> Any:
    """Convert a NumPy array (or nested list) into an array of the backend under test.

    `dtype` is a dtype name ("float32", "bfloat16", "uint8", ...) resolved in `xp`; by default the
    NumPy dtype is kept. Arrays land on the fixture's device; NUMPY_READONLY arrays are read-only
    and Dask arrays are chunked along every axis.
    """
    a = np.asarray(a)
    state = _current
    if state is None or state.xp is not xp:
        msg = "to_xp needs the namespace yielded by the `xp` fixture of the running test"
        raise RuntimeError(msg)
    backend = state.backend
    target = None if dtype is None else xp_dtype(xp, dtype)

    if backend.like(Backend.NUMPY):
        out = np.array(a, copy=True)
        if target is not None:
            out = out.astype(target)
        if backend is Backend.NUMPY_READONLY:
            out.flags.writeable = False
        return out
    if backend is Backend.ARRAY_API_STRICT:
        out = xp.asarray(np.array(a, copy=True))
        return out if target is None else xp.astype(out, target)
    if backend.like(Backend.TORCH):
        import torch

        out = torch.asarray(np.array(a, copy=True), device=state.device)
        return out if target is None else out.to(target)
    if backend.like(Backend.JAX):
        import jax

        out = jax.device_put(np.array(a, copy=True), state.device)
        return out if target is None else out.astype(target)
    if backend is Backend.DASK:
        import dask.array as da

        out = da.from_array(np.array(a, copy=True), chunks=_dask_chunks(a.shape))
        return out if target is None else out.astype(target)
    if backend is Backend.CUPY:
        import cupy

        out = cupy.asarray(a)
        return out if target is None else out.astype(target)
    raise AssertionError(backend)


def to_numpy(x: Any, /) -> np.ndarray:
    """Bring any backend's array back to NumPy (computing Dask graphs; bfloat16 to float32)."""
    if array_api_compat.is_dask_array(x):
        x = x.compute()
    if array_api_compat.is_torch_array(x):
        import torch

        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.cpu().numpy()
    if array_api_compat.is_jax_array(x):
        import jax.numpy as jnp

        if x.dtype == jnp.bfloat16:
            x = x.astype(jnp.float32)
        return np.asarray(x)
    if array_api_compat.is_cupy_array(x):
        return x.get()
    return np.asarray(x)


_TOLERANCES = {
    # (rtol, atol). float16/bfloat16 results are computed in float32 and rounded once, so they
    # are within half an ulp of the true value: one eps leaves a factor of two of slack while
    # still catching a computation done in the low precision.
    "float64": (1e-11, 1e-11),
    "float32": (2e-5, 2e-5),
    "float16": (float(np.finfo(np.float16).eps), 1e-7),
    "bfloat16": (2.0**-7, 1e-30),
}


def dtype_eps(name: str) -> float:
    return {"bfloat16": 2.0**-7}.get(name) or float(np.finfo(name).eps)


def _check_meta(actual: Any, expected_shape: tuple[int, ...], *, xp: Any, dtype: str) -> None:
    ns = array_api_compat.array_namespace(actual)
    assert ns is xp, f"result namespace {ns.__name__} is not {xp.__name__}"
    want = xp_dtype(xp, dtype)
    assert actual.dtype == want, f"result dtype {actual.dtype} is not {want}"
    assert tuple(actual.shape) == tuple(expected_shape), (
        f"result shape {tuple(actual.shape)} is not {tuple(expected_shape)}"
    )
    state = _current
    if state is not None and state.xp is xp and state.device is not None:
        got = array_api_compat.device(actual)
        assert got == state.device, f"result on device {got}, inputs on {state.device}"


def xp_assert_close(
    actual: Any,
    desired: Any,
    /,
    *,
    xp: Any,
    dtype: str,
    rtol: float | None = None,
    atol: float | None = None,
    err_msg: str = "",
) -> None:
    """Assert `actual` is an `xp` array of `dtype` on the test's device, shaped and valued like
    `desired` (a NumPy array or number, usually the float64 reference). NaN matches NaN and
    infinities must match exactly."""
    desired = np.asarray(desired, dtype=np.float64)
    _check_meta(actual, desired.shape, xp=xp, dtype=dtype)
    default_rtol, default_atol = _TOLERANCES.get(dtype, (0.0, 0.0))
    np.testing.assert_allclose(
        to_numpy(actual).astype(np.float64),
        desired,
        rtol=default_rtol if rtol is None else rtol,
        atol=default_atol if atol is None else atol,
        equal_nan=True,
        err_msg=err_msg,
    )


def xp_assert_equal(
    actual: Any, desired: Any, /, *, xp: Any, dtype: str, err_msg: str = ""
) -> None:
    """Like `xp_assert_close` with zero tolerance."""
    xp_assert_close(actual, desired, xp=xp, dtype=dtype, rtol=0.0, atol=0.0, err_msg=err_msg)
