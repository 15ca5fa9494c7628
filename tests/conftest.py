"""The `xp` fixture: every conformance test runs on every backend, with native overrides on and off.

`pytest --backend numpy --backend dask` restricts the run to the named backends. Backends whose
library is not installed, or whose device (CUDA, a JAX GPU) is absent, are skipped with the reason.
A test that only makes sense on some backends says so with `@pytest.mark.only_backends(...)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import array_api_compat
import numpy as np
import pytest
from _helpers import Backend, Current, set_current
from hypothesis import HealthCheck, settings

import xent

settings.register_profile(
    "xent",
    max_examples=30,
    deadline=None,
    # The `xp` fixture is function-scoped on purpose (it toggles the native overrides around
    # each test); every example of a test runs on the same backend, so sharing it is correct.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("xent")

_NAMES = [b.value for b in Backend]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        action="append",
        choices=_NAMES,
        default=None,
        help="run only on this backend (repeatable); default: all of " + ", ".join(_NAMES),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "only_backends(*backends): run the test only on these `_helpers.Backend` members",
    )


def _selected(config: pytest.Config) -> list[Backend]:
    names = config.getoption("--backend")
    return list(Backend) if not names else [Backend(n) for n in dict.fromkeys(names)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    backends = _selected(metafunc.config)
    for marker in metafunc.definition.iter_markers("only_backends"):
        backends = [b for b in backends if b in marker.args]
    params = [
        pytest.param((b, native), id=f"{b.value}-{'native' if native else 'generic'}")
        for b in backends
        for native in (True, False)
    ]
    metafunc.parametrize("backend", params, indirect=True)


def _setup(backend: Backend) -> tuple[Any, Any]:
    """Import the backend (skipping with the reason when it or its device is missing) and return
    its array-API namespace and the device test arrays go to."""
    if backend.like(Backend.NUMPY):
        return array_api_compat.array_namespace(np.empty(0)), None
    if backend is Backend.ARRAY_API_STRICT:
        xp = pytest.importorskip("array_api_strict")
        return xp, xp.asarray(0.0).device
    if backend.like(Backend.TORCH):
        torch = pytest.importorskip("torch")
        if backend is Backend.TORCH_CUDA:
            if not torch.cuda.is_available():
                pytest.skip("torch_cuda: torch.cuda.is_available() is False (no CUDA device)")
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        return array_api_compat.array_namespace(torch.empty(0)), device
    if backend.like(Backend.JAX):
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        if backend is Backend.JAX_GPU:
            try:
                device = jax.devices("gpu")[0]
            except RuntimeError as exc:
                pytest.skip(f"jax_gpu: no JAX GPU device ({exc})")
        else:
            device = jax.devices("cpu")[0]
        import jax.numpy as jnp

        return jnp, device
    if backend is Backend.DASK:
        da = pytest.importorskip("dask.array")
        return array_api_compat.array_namespace(da.empty(0)), None
    if backend is Backend.CUPY:
        cupy = pytest.importorskip("cupy")
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDA driver missing: cupy imports but cannot run
            pytest.skip(f"cupy: no CUDA runtime ({exc})")
        if count == 0:
            pytest.skip("cupy: no CUDA device")
        return array_api_compat.array_namespace(cupy.empty(0)), cupy.cuda.Device()
    raise AssertionError(backend)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The backend under test; native overrides are switched as the test id says and restored."""
    which, native = request.param
    xp, device = _setup(which)
    previous = xent.backends.set_native(native)
    set_current(Current(backend=which, xp=xp, device=device, native=native))
    try:
        yield which
    finally:
        set_current(None)
        xent.backends.set_native(previous)


@pytest.fixture
def xp(backend: Backend) -> Any:
    """The array-API namespace of the backend under test (array-api-compat's, jax.numpy, or
    array_api_strict)."""
    from _helpers import current

    return current().xp


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator seeded from the test's name, so every backend sees the same data."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.originalname))
    return np.random.default_rng(seed)
