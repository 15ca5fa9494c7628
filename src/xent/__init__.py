"""xent: one cross-entropy for every array library.

Written once against the Python array API standard and dispatched through array-api-compat,
so the same functions take NumPy, PyTorch, JAX, CuPy, Dask and array-api-strict arrays and
return arrays of the same library and device.
"""

from __future__ import annotations

from ._binary import binary_cross_entropy, binary_cross_entropy_and_grad
from ._cross_entropy import cross_entropy, cross_entropy_and_grad
from ._linear import linear_cross_entropy, linear_cross_entropy_and_grad
from ._softmax import log_softmax, logsumexp, softmax

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "binary_cross_entropy",
    "binary_cross_entropy_and_grad",
    "cross_entropy",
    "cross_entropy_and_grad",
    "linear_cross_entropy",
    "linear_cross_entropy_and_grad",
    "log_softmax",
    "logsumexp",
    "softmax",
]
