"""The one place xent imports array-api-compat from.

A library that vendors xent (``theirpkg/_vendor/xent``) may ship its own
``theirpkg/_vendor/_array_api_compat_vendor.py`` hook, as SciPy and scikit-learn do for
array-api-extra; xent then uses that module's functions instead of the top-level
``array_api_compat`` package.
"""

from __future__ import annotations

try:
    from .._array_api_compat_vendor import (  # type: ignore[import-not-found,unused-ignore]
        array_namespace,
        device,
        is_array_api_obj,
        is_array_api_strict_namespace,
        is_cupy_namespace,
        is_dask_namespace,
        is_jax_namespace,
        is_lazy_array,
        is_numpy_namespace,
        is_torch_namespace,
    )
except ImportError:
    from array_api_compat import (
        array_namespace,
        device,
        is_array_api_obj,
        is_array_api_strict_namespace,
        is_cupy_namespace,
        is_dask_namespace,
        is_jax_namespace,
        is_lazy_array,
        is_numpy_namespace,
        is_torch_namespace,
    )

__all__ = [
    "array_namespace",
    "device",
    "is_array_api_obj",
    "is_array_api_strict_namespace",
    "is_cupy_namespace",
    "is_dask_namespace",
    "is_jax_namespace",
    "is_lazy_array",
    "is_numpy_namespace",
    "is_torch_namespace",
]
