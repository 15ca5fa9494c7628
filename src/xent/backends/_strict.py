"""array-api-strict: only facts (it computes with NumPy, whose warnings masked rows would raise).

It has no native overrides on purpose: it exists to prove the core uses only the standard.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from .._typing import Array
from ._generic import Backend


class Facts(Backend):
    """array-api-strict arrays are concrete and in host memory."""

    name = "array_api_strict"

    def is_lazy(self, x: Array) -> bool:
        return False

    def quiet(self) -> contextlib.AbstractContextManager[Any]:
        return np.errstate(divide="ignore", invalid="ignore", over="ignore")


NativeBackend = Facts
