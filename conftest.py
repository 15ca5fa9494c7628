"""pytest's settings for the doctests of ``src/xent`` (``pytest --doctest-modules src/xent``).

A backend module imports its library at the top, so one whose library is not installed (CuPy
without a GPU, or PyTorch, JAX and Dask in the ``minimal`` session) is not collected; no example
in ``src/xent`` needs anything but NumPy and array-api-strict.
"""

from __future__ import annotations

import importlib.util

_LIBRARIES = {"_cupy": "cupy", "_dask": "dask", "_jax": "jax", "_torch": "torch"}

collect_ignore = [
    f"src/xent/backends/{module}.py"
    for module, library in _LIBRARIES.items()
    if importlib.util.find_spec(library) is None
]
