"""Backends, conversions and comparisons shared by the conformance suite.

Every test builds its inputs in NumPy, moves them onto the backend under test with `to_xp`,
and compares xent's result with `xp_assert_close`, which checks namespace, device, dtype,
shape and values together.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from enum import Enum
from functools import partial
from typing import Any

import array_api_compat
import numpy as np
import pytest

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendRow",
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
    """The array libraries and devices the suite runs on; the value is the `--backend` name.

    Each member has one row in `BACKENDS` (below): adding a backend to the suite means adding a
    member here and its row there, and nothing else on the test side.
    """

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
    def row(self) -> BackendRow:
        return BACKENDS[self]

    @property
    def modname(self) -> str:
        return self.row.library

    def like(self, *others: Backend) -> bool:
        """True if `self` runs on the same library as one of `others` (TORCH is like TORCH_CUDA)."""
        return any(self.modname == other.modname for other in others)


@dataclasses.dataclass(frozen=True)
class BackendRow:
    """Everything the suite needs to know about one backend.

    `setup(module)` takes the imported `library` and returns the array-API namespace and the
    device that test arrays go to (None: the library's default), skipping with the reason when
    the device is absent. `convert(xp, a, device)` moves a NumPy array there. `concrete_host`:
    label values are concrete and in host memory, so `validate=None` checks them. `lazy`: values
    are not known before `.compute()`. `deferred`: tests call xent's public functions through
    array-api-extra's `patch_lazy_xp_functions` (under `jax.jit` on JAX, failing on any compute
    on Dask). `examples`: hypothesis examples per property test (eager
    JAX compiles every new shape, Dask builds a graph per call, so they get fewer).
    """

    library: str
    setup: Callable[[Any], tuple[Any, Any]]
    convert: Callable[[Any, np.ndarray, Any], Any]
    concrete_host: bool
    lazy: bool = False
    deferred: bool = False
    examples: int = 30


def _numpy_setup(np_: Any) -> tuple[Any, Any]:
    return array_api_compat.array_namespace(np_.empty(0)), None


def _numpy_readonly(xp: Any, a: np.ndarray, device: Any) -> Any:
    a.flags.writeable = False
    return a


def _strict_setup(strict: Any) -> tuple[Any, Any]:
    # A device other than the default one: a result that silently lands on the default device
    # (an `asarray` or `zeros` without `device=`) fails the device check of `xp_assert_close`.
    return strict, strict.Device("device1")


def _torch_setup(torch: Any, *, cuda: bool) -> tuple[Any, Any]:
    xp = array_api_compat.array_namespace(torch.empty(0))
    if not cuda:
        return xp, torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("torch_cuda: torch.cuda.is_available() is False (no CUDA device)")
    return xp, torch.device("cuda", torch.cuda.current_device())


def _jax_setup(jax: Any, *, gpu: bool) -> tuple[Any, Any]:
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    if not gpu:
        return jnp, jax.devices("cpu")[0]
    try:
        return jnp, jax.devices("gpu")[0]
    except RuntimeError as exc:
        pytest.skip(f"jax_gpu: no JAX GPU device ({exc})")


def _dask_setup(da: Any) -> tuple[Any, Any]:
    return array_api_compat.array_namespace(da.empty(0)), None


def _dask_convert(xp: Any, a: np.ndarray, device: Any) -> Any:
    import dask.array as da

    # Two chunks on every axis of two or more elements (rows and classes alike, ragged for odd
    # sizes), so every reduction over the class axis crosses a chunk boundary while graphs stay
    # small enough for a fast suite.
    chunks = tuple(max(1, math.ceil(n / 2)) for n in a.shape)
    return da.from_array(a, chunks=chunks)  # type: ignore[no-untyped-call]


def _cupy_setup(cupy: Any) -> tuple[Any, Any]:
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing: cupy imports but cannot run
        pytest.skip(f"cupy: no CUDA runtime ({exc})")
    if count == 0:
        pytest.skip("cupy: no CUDA device")
    return array_api_compat.array_namespace(cupy.empty(0)), cupy.cuda.Device()


def _asarray(xp: Any, a: np.ndarray, device: Any) -> Any:
    return xp.asarray(a, device=device)


BACKENDS: dict[Backend, BackendRow] = {
    Backend.NUMPY: BackendRow("numpy", _numpy_setup, _asarray, concrete_host=True),
    Backend.NUMPY_READONLY: BackendRow("numpy", _numpy_setup, _numpy_readonly, concrete_host=True),
    Backend.ARRAY_API_STRICT: BackendRow(
        "array_api_strict", _strict_setup, _asarray, concrete_host=True
    ),
    Backend.TORCH: BackendRow(
        "torch", partial(_torch_setup, cuda=False), _asarray, concrete_host=True
    ),
    Backend.TORCH_CUDA: BackendRow(
        "torch", partial(_torch_setup, cuda=True), _asarray, concrete_host=False
    ),
    Backend.JAX: BackendRow(
        "jax",
        partial(_jax_setup, gpu=False),
        _asarray,
        concrete_host=True,
        deferred=True,
        examples=10,
    ),
    Backend.JAX_GPU: BackendRow(
        "jax",
        partial(_jax_setup, gpu=True),
        _asarray,
        concrete_host=False,
        deferred=True,
        examples=10,
    ),
    Backend.DASK: BackendRow(
        "dask.array",
        _dask_setup,
        _dask_convert,
        concrete_host=False,
        lazy=True,
        deferred=True,
        examples=12,
    ),
    Backend.CUPY: BackendRow("cupy", _cupy_setup, _asarray, concrete_host=False),
}
"""One row per `Backend` member."""


@dataclasses.dataclass(frozen=True)
class Current:
    """What the `xp` fixture set up for the running test."""

    backend: Backend
    xp: Any
    device: Any
    native: bool
    traced: bool = False  # xent's functions run under jax.jit (the `eager`-less JAX tests)


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
    return current().backend.row.lazy


def is_concrete_host() -> bool:
    """True where label values are concrete and in host memory, so `validate=None` checks them
    (not under the fixture's `jax.jit` patch, where they are tracers)."""
    state = current()
    return state.backend.row.concrete_host and not state.traced


def property_settings() -> Any:
    """Hypothesis settings for a property test of the running backend (`BackendRow.examples`)."""
    from hypothesis import settings

    return settings(max_examples=current().backend.row.examples)


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
    out = state.backend.row.convert(xp, np.array(a, copy=True), state.device)
    if dtype is not None:
        out = xp.astype(out, xp_dtype(xp, dtype))
        if state.backend is Backend.NUMPY_READONLY:
            out.flags.writeable = False
    return out


def to_numpy(x: Any, /) -> np.ndarray:
    """Bring any backend's array back to NumPy (computing Dask graphs; bfloat16 to float32)."""
    if array_api_compat.is_dask_array(x):
        x = x.compute()  # type: ignore[no-untyped-call]
    if array_api_compat.is_torch_array(x):
        import torch

        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return np.asarray(x.cpu().numpy())
    if array_api_compat.is_jax_array(x):
        import jax.numpy as jnp

        if x.dtype == jnp.bfloat16:
            x = x.astype(jnp.float32)
        return np.asarray(x)
    if array_api_compat.is_cupy_array(x):
        return np.asarray(x.get())
    if array_api_compat.is_array_api_strict_namespace(array_api_compat.array_namespace(x)):
        import array_api_strict

        # array-api-strict refuses to hand an array on a non-default device to NumPy.
        x = x.to_device(array_api_strict.Device())
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


def jax_long_rows(monkeypatch: pytest.MonkeyPatch, *, pieces: bool = True) -> list[Any]:
    """JAX's sums of long rows on small inputs: rows of more than 8 classes count as long, from
    4 rows on, cut in pieces of at least 2 classes where their number splits (``pieces``; else
    never), or in groups of 4 to 1 rows. Returns the list of the plans taken from now on."""
    from xent.backends import _jax

    monkeypatch.setattr(_jax, "_LONG_ROWS", 8)
    monkeypatch.setattr(_jax, "_MANY_ROWS", 4)
    monkeypatch.setattr(_jax, "_GROUP_ROWS", 4)
    monkeypatch.setattr(_jax, "_LEAST_PIECE", 2 if pieces else 10**9)
    plans: list[Any] = []
    planned = _jax._long_rows

    def spied(*args: Any, **kwargs: Any) -> Any:
        plans.append(planned(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(_jax, "_long_rows", spied)
    return plans
