"""The `xp` fixture: every conformance test runs on every backend, with native overrides on and off.

`pytest --backend numpy --backend dask` restricts the run to the named backends; a test whose
backends are all outside the run is deselected (counted as "deselected", not skipped). Backends
whose library is not installed, or whose device (CUDA, a JAX GPU) is absent, are skipped with the
reason. A test that only makes sense on some backends says so with
`@pytest.mark.only_backends(...)`; on a test without the fixture, the marker deselects it from
runs that include none of those backends.

The fixture is as strict as array-api-extra's: xent's public functions, called as `xent.NAME`
from a test, run under `jax.jit` on JAX and fail on any Dask compute before their result is
returned (array-api-extra's `lazy_xp_function` / `patch_lazy_xp_functions`); array-api-strict
runs on a device other than its default one, with data-dependent shapes, boolean indexing and
every extension switched off. A test that checks what only eager execution does (an error that
needs concrete values) says so, with the reason, in `@pytest.mark.eager("why")`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from _helpers import Backend, Current, current, set_current
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
_NONE_SELECTED = "xent_no_backend_selected"


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
    config.addinivalue_line(
        "markers",
        "eager(reason): call xent eagerly on JAX and Dask (not under jax.jit, computes allowed);"
        " the reason says what the test checks that needs it",
    )
    config.addinivalue_line("markers", f"{_NONE_SELECTED}: deselected, see conftest.py")


def selected_backends(config: pytest.Config) -> list[Backend]:
    """The backends of this run (`--backend`, default all)."""
    names = config.getoption("--backend")
    return list(Backend) if not names else [Backend(n) for n in dict.fromkeys(names)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    backends = selected_backends(metafunc.config)
    for marker in metafunc.definition.iter_markers("only_backends"):
        backends = [b for b in backends if b in marker.args]
    params = [
        pytest.param((b, native), id=f"{b.value}-{'native' if native else 'generic'}")
        for b in backends
        for native in (True, False)
    ]
    if not params:
        # Rather than pytest's "got empty parameter set" skip: one placeholder, deselected below.
        marks = getattr(pytest.mark, _NONE_SELECTED)
        params = [pytest.param(None, id="no-backend", marks=marks)]
    metafunc.parametrize("backend", params, indirect=True)


def _outside_run(item: pytest.Item, selected: list[Backend]) -> bool:
    if item.get_closest_marker(_NONE_SELECTED):
        return True
    if "backend" in getattr(item, "fixturenames", ()):
        return False
    # A test without the fixture (a README block) may still belong to some backends' runs.
    return any(
        not set(marker.args) & set(selected) for marker in item.iter_markers("only_backends")
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    selected = selected_backends(config)
    dropped = [item for item in items if _outside_run(item, selected)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not _outside_run(item, selected)]


def _eager_reason(request: pytest.FixtureRequest) -> str | None:
    marker = request.node.get_closest_marker("eager")
    if marker is None:
        return None
    if not (marker.args and isinstance(marker.args[0], str) and marker.args[0].strip()):
        pytest.fail("@pytest.mark.eager needs the reason as its argument", pytrace=False)
    return str(marker.args[0])


def _patch_lazy(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, xp: Any
) -> contextlib.AbstractContextManager[None]:
    """array-api-extra's patching of xent's public functions for the running test (imported
    here, not at the top: the `minimal` session has no array-api-extra and no deferred backend)."""
    from array_api_extra.testing import lazy_xp_function, patch_lazy_xp_functions

    for name in xent.__all__:
        function = getattr(xent, name)
        if callable(function) and not hasattr(function, "_lazy_xp_function"):
            lazy_xp_function(function)
    # patch_lazy_xp_functions looks for the tagged functions in the test module's globals and
    # its `lazy_xp_modules`; naming xent there from here covers every test module.
    monkeypatch.setattr(request.module, "lazy_xp_modules", [xent], raising=False)
    return patch_lazy_xp_functions(request, xp=xp)


@contextlib.contextmanager
def _strict_flags(which: Backend, xp: Any) -> Iterator[None]:
    if which is not Backend.ARRAY_API_STRICT:
        yield
        return
    with xp.ArrayAPIStrictFlags(
        boolean_indexing=False, data_dependent_shapes=False, enabled_extensions=()
    ):
        yield


@pytest.fixture
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    """The backend under test; native overrides are switched as the test id says and restored.

    On JAX and Dask, `xent.NAME(...)` in the test module runs under `jax.jit` / fails on a Dask
    compute, unless the test is marked `eager`.
    """
    which, native = request.param
    row = which.row
    xp, device = row.setup(pytest.importorskip(row.library))
    lazy: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    patched = row.deferred and _eager_reason(request) is None
    if patched:
        lazy = _patch_lazy(request, monkeypatch, xp)
    previous = xent.backends.set_native(native)
    set_current(Current(backend=which, xp=xp, device=device, native=native, traced=patched))
    try:
        with _strict_flags(which, xp), lazy:
            yield which
    finally:
        set_current(None)
        xent.backends.set_native(previous)


@pytest.fixture
def xp(backend: Backend) -> Any:
    """The array-API namespace of the backend under test (array-api-compat's, jax.numpy, or
    array_api_strict)."""
    return current().xp


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator seeded from the test's name, so every backend sees the same data."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.originalname))
    return np.random.default_rng(seed)
