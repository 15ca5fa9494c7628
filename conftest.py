"""pytest's settings for the doctests of ``src/xent`` (``pytest --doctest-modules src/xent``).

A backend module imports its library at the top, so one whose library is not installed (CuPy
without a GPU, or PyTorch, JAX and Dask in the ``minimal`` session) is not collected; no example
in ``src/xent`` needs anything but NumPy and array-api-strict.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_LIBRARIES = ("cupy", "dask", "jax", "torch")
"""A backend module is named for the library it imports (``_torch.py``, ``_jax_linear.py``,
``_collectives_torch.py``, ...)."""

collect_ignore = [
    f"src/xent/backends/{path.name}"
    for path in sorted((Path(__file__).parent / "src/xent/backends").glob("_*.py"))
    for library in _LIBRARIES
    if library in path.stem and importlib.util.find_spec(library) is None
]
