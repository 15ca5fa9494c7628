"""The backend layer: the only part of xent that may import an array library.

:func:`lookup` gives the core a :class:`Backend` for a namespace: the generic primitives, the
backend's facts (traced, lazy, on the host), and, unless switched off, its native overrides.
The switch (:func:`set_native`, or ``XENT_NATIVE=0`` in the environment) leaves the facts on,
since they decide correctness (when labels can be checked), and turns every override off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType

from .._compat import (
    is_array_api_strict_namespace,
    is_cupy_namespace,
    is_dask_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
)
from .._typing import Namespace
from ._generic import Backend, BinaryOptions, GradRule, IndexOptions, scaled_gap

__all__ = [
    "Backend",
    "BinaryOptions",
    "GradRule",
    "IndexOptions",
    "lookup",
    "namespace_of",
    "native_enabled",
    "same_library",
    "scaled_gap",
    "set_native",
]

_native = os.environ.get("XENT_NATIVE", "1").strip().lower() not in {"0", "false", "off", "no"}
_cache: dict[tuple[int, bool], Backend] = {}


def _load_numpy() -> ModuleType:
    from . import _numpy as module

    return module


def _load_torch() -> ModuleType:
    from . import _torch as module

    return module


def _load_jax() -> ModuleType:
    from . import _jax as module

    return module


def _load_dask() -> ModuleType:
    from . import _dask as module

    return module


def _load_strict() -> ModuleType:
    from . import _strict as module

    return module


def _load_cupy() -> ModuleType:
    from . import _cupy as module

    return module


# One row per backend: how to recognise its namespace, and how to import its module (plain
# import statements, which torch.compile can trace on a cold cache, unlike importlib).
_TABLE: tuple[tuple[Callable[[Namespace], bool], Callable[[], ModuleType]], ...] = (
    (is_numpy_namespace, _load_numpy),
    (is_torch_namespace, _load_torch),
    (is_jax_namespace, _load_jax),
    (is_dask_namespace, _load_dask),
    (is_cupy_namespace, _load_cupy),
    (is_array_api_strict_namespace, _load_strict),
)


# Array classes recognised by name, for the libraries whose compilers trace xent's calls
# (torch.compile warns about array-api-compat's `functools.lru_cache` type tests, which a
# cold trace would reach), and for NumPy, whose calls then find their checks remembered. The
# module gives the namespace (``NAMESPACE``).
_ARRAY_CLASSES: dict[tuple[str, str], Callable[[], ModuleType]] = {
    ("torch", "Tensor"): _load_torch,
    ("numpy", "ndarray"): _load_numpy,
}
_by_namespace: dict[int, ModuleType] = {}
_by_class: dict[type, Namespace | None] = {}
"""The answer of :func:`namespace_of` per class (the walk over the class's bases, once)."""


def namespace_of(x: object) -> Namespace | None:
    """The namespace of ``x`` where its class is one of the registered array classes."""
    kind = type(x)
    if kind in _by_class:
        return _by_class[kind]
    found: Namespace | None = None
    for cls in kind.__mro__:
        load = _ARRAY_CLASSES.get((cls.__module__, cls.__qualname__))
        if load is not None:
            module = load()
            found = module.NAMESPACE
            _by_namespace[id(found)] = module
            break
    _by_class[kind] = found
    return found


def set_native(enabled: bool) -> bool:
    """Turn the backends' native overrides on or off; return the previous setting.

    Parameters
    ----------
    enabled : bool
        False runs every namespace through the generic, standard-only primitives (the
        backends' facts stay in force).

    Returns
    -------
    bool
        The setting before the call, so a caller can restore it.

    Examples
    --------
    >>> from xent.backends import set_native
    >>> previous = set_native(False)
    >>> _ = set_native(previous)
    """
    global _native
    previous, _native = _native, bool(enabled)
    return previous


def native_enabled() -> bool:
    """Whether the backends' native overrides are in use."""
    return _native


def lookup(xp: Namespace) -> Backend:
    """The :class:`Backend` that serves namespace ``xp`` under the current switch."""
    key = (id(xp), _native)
    backend = _cache.get(key)
    if backend is None:
        backend = _build(xp, _native)
        _cache[key] = backend
    return backend


def same_library(given: object, found: Namespace) -> bool:
    """Whether ``given`` (a user's ``xp=``: a namespace or a plain library module such as
    ``torch``) names the library of namespace ``found``."""
    if not isinstance(given, ModuleType):
        return False
    return any(recognises(given) and recognises(found) for recognises, _ in _TABLE)


def _build(xp: Namespace, native: bool) -> Backend:
    known = _by_namespace.get(id(xp))
    if known is not None:
        cls: type[Backend] = known.NativeBackend if native else known.Facts
        return cls(xp)
    for recognises, load in _TABLE:
        if recognises(xp):
            module = load()
            cls = module.NativeBackend if native else module.Facts
            return cls(xp)
    return Backend(xp)
