"""Type aliases shared by xent's modules."""

from __future__ import annotations

from types import ModuleType
from typing import Any, Literal, TypeAlias

Array: TypeAlias = Any
"""An array of any namespace that array-api-compat recognises."""

Namespace: TypeAlias = ModuleType
"""An array API namespace (``array_api_compat.numpy``, ``jax.numpy``, ...)."""

Reduction: TypeAlias = Literal["mean", "sum", "none"]

__all__ = ["Array", "Namespace", "Reduction"]
