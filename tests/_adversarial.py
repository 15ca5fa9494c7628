"""Strategies and checks shared by the adversarial property tests (`class TestAdversarialInputs`).

They draw what a hostile caller can pass on the backend under test: every floating dtype it has
(float16, bfloat16, big-endian NumPy floats), every integer label width, non-contiguous,
transposed and strided views, size-1 and empty axes, logits near the dtype's max, `-inf` and NaN,
and compare with the float64 reference, with tolerances scaled by the dtype's eps and the
problem's magnitude. Non-finite results must match the reference exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from _helpers import Backend, current, dtype_eps, property_settings, to_numpy, to_xp
from hypothesis import strategies as st

__all__ = [
    "assert_matches",
    "compute_dtype",
    "compute_eps",
    "float_dtypes",
    "label_dtypes",
    "layouts",
    "place",
    "reference_input",
    "seeds",
    "settings",
]


def float_dtypes() -> list[str]:
    """The input dtypes of the running backend; ``>f4``/``>f8`` are non-native byte orders."""
    backend, xp = current().backend, current().xp
    names = ["float32", "float64"]
    names += [name for name in ("float16", "bfloat16") if hasattr(xp, name)]
    if backend is Backend.DASK:
        names.append("float16")  # Dask holds NumPy's float16 blocks, unnamed in its namespace
    if backend.like(Backend.NUMPY, Backend.DASK):
        names += [">f4", ">f8"]
    return names


def label_dtypes() -> list[str]:
    """Every integer width, signed and unsigned."""
    return ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]


def layouts() -> list[str]:
    return ["contiguous", "transposed", "strided"]


def place(xp: Any, a: np.ndarray, /, *, dtype: str, layout: str) -> Any:
    """``a`` on the backend as ``dtype``, laid out as a view when ``layout`` asks for one:
    ``transposed`` is a permuted view of a reversed-axes array, ``strided`` takes every other
    element of an array twice as large along each axis."""
    if dtype.startswith(">") or not hasattr(xp, dtype):
        a, name = a.astype(dtype), None
    else:
        name = dtype
    if layout == "transposed" and a.ndim > 1:
        order = tuple(reversed(range(a.ndim)))
        return xp.permute_dims(
            to_xp(xp, np.ascontiguousarray(a.transpose(order)), dtype=name), order
        )
    if layout == "strided" and a.size:
        big = np.zeros(tuple(2 * n for n in a.shape), dtype=a.dtype)
        big[tuple(slice(None, None, 2) for _ in a.shape)] = a
        return to_xp(xp, big, dtype=name)[tuple(slice(None, None, 2) for _ in a.shape)]
    return to_xp(xp, a, dtype=name)


def reference_input(x: Any) -> np.ndarray:
    """The values xent actually received (rounded to their dtype), in float64."""
    return to_numpy(x).astype(np.float64)


def compute_dtype(dtype: str) -> str:
    """The dtype xent computes in: float64 for 64-bit floats, float32 for every narrower one."""
    return "float64" if dtype in {"float64", ">f8"} else "float32"


def compute_eps(dtype: str) -> float:
    return dtype_eps(compute_dtype(dtype))


def output_eps(dtype: str) -> float:
    return dtype_eps({">f4": "float32", ">f8": "float64"}.get(dtype, dtype))


def _rounded(want: np.ndarray, dtype: str) -> np.ndarray:
    """The float64 reference rounded to the output dtype (overflow to inf included); bfloat16
    shares float32's range, and its rounding is within the tolerance."""
    name = {"bfloat16": "float32", ">f4": "float32", ">f8": "float64"}.get(dtype, dtype)
    with np.errstate(over="ignore"):
        return np.asarray(want, dtype=np.float64).astype(name).astype(np.float64)


def assert_matches(
    got: Any, want: Any, /, *, dtype: str, atol: float, what: str, case: Any
) -> None:
    """``got`` equals the float64 ``want`` rounded to ``dtype``: non-finite entries exactly (NaN
    for NaN, infinities with their sign), finite ones within ``2 eps(dtype) * |want| + atol``."""
    actual = to_numpy(got).astype(np.float64)
    expected = _rounded(np.asarray(want, dtype=np.float64), dtype)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, want {expected.shape}"
    detail = f"{what} of case {case}"
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"NaN {detail}")
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(
        np.where(finite, 0.0, actual), np.where(finite, 0.0, expected), err_msg=f"inf {detail}"
    )
    with np.errstate(invalid="ignore", over="ignore"):
        error = np.abs(np.where(finite, actual - expected, 0.0))
    bound = atol + 2 * output_eps(dtype) * np.abs(np.where(finite, expected, 0.0))
    if np.any(error > bound):
        worst = np.unravel_index(np.argmax(error - bound), error.shape)
        raise AssertionError(
            f"{detail}: at {worst} got {actual[worst]!r}, want {expected[worst]!r} "
            f"(error {error[worst]:.3g} > bound {bound[worst]:.3g})"
        )


def settings() -> Any:
    """``property_settings()``, with fewer examples on JAX, where every new combination of
    dtype, layout and option compiles its eager operations anew (seconds each), and on Dask,
    which builds and computes a graph per call."""
    from hypothesis import settings as hypothesis_settings

    if current().backend.like(Backend.JAX):
        return hypothesis_settings(max_examples=3)
    if current().backend is Backend.DASK:
        return hypothesis_settings(max_examples=6)
    return property_settings()


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**32 - 1)
