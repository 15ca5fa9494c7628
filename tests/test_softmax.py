"""`xent.logsumexp`, `xent.log_softmax` and `xent.softmax` against the float64 reference."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import _reference as ref
import numpy as np
import pytest
from _helpers import (
    Backend,
    current,
    dtype_eps,
    property_settings,
    to_numpy,
    to_xp,
    xp_assert_close,
)
from hypothesis import given
from hypothesis import strategies as st

import xent

FUNCS = ("logsumexp", "log_softmax", "softmax")


def _ref(name: str, x: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
    if name == "logsumexp":
        return ref.logsumexp(x, axis=axis, keepdims=keepdims)
    return getattr(ref, name)(x, axis=axis)


def _xent(name: str, x: Any, axis: int, keepdims: bool = False) -> Any:
    if name == "logsumexp":
        return xent.logsumexp(x, axis=axis, keepdims=keepdims)
    return getattr(xent, name)(x, axis=axis)


@st.composite
def cases(draw: Any) -> dict[str, Any]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if current().backend.like(Backend.JAX):  # few shapes: eager JAX compiles each one
        shape = draw(st.sampled_from([(5,), (0, 3), (3, 4), (2, 1, 3)]))
    else:
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    if shape[axis] == 0:
        axis = -1
    if len(shape) > 1 and draw(st.integers(0, 5)) == 0:  # an empty batch axis
        other = [i for i in range(len(shape)) if i != axis % len(shape)]
        empty = draw(st.sampled_from(other))
        shape = tuple(0 if i == empty else n for i, n in enumerate(shape))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    scale = draw(st.sampled_from([1.0, 30.0]))
    x = rng.normal(size=shape) * scale
    x[rng.uniform(size=shape) < 0.1] = -np.inf
    np.moveaxis(x, axis, -1)[..., 0] = 0.0  # masked classes, but never a fully masked row
    return {
        "x": x.astype(dtype),
        "axis": axis,
        "dtype": dtype,
        "scale": scale,
        "keepdims": draw(st.booleans()),
    }


def _tol(case: dict[str, Any]) -> dict[str, float]:
    if case["dtype"] == "float64":
        return {"rtol": 1e-12, "atol": 1e-12}
    return {"rtol": 2e-6 * case["scale"], "atol": 2e-6 * case["scale"]}


class TestAxes:
    """Any axis equals moving it last; `keepdims` keeps a unit axis."""

    @pytest.mark.parametrize("name", FUNCS)
    @pytest.mark.parametrize("axis", [0, 1, 2, -1, -2, -3])
    def test_any_axis_equals_moving_it_last(
        self, xp: Any, rng: np.random.Generator, name: str, axis: int
    ) -> None:
        x = rng.normal(size=(2, 3, 4)) * 3
        got = _xent(name, to_xp(xp, x), axis)
        last = _xent(name, to_xp(xp, np.moveaxis(x, axis, -1)), -1)
        want = to_numpy(last) if name == "logsumexp" else np.moveaxis(to_numpy(last), -1, axis)
        xp_assert_close(got, want, xp=xp, dtype="float64")

    @pytest.mark.parametrize("axis", [0, -1])
    def test_logsumexp_keepdims_keeps_a_unit_axis(
        self, xp: Any, rng: np.random.Generator, axis: int
    ) -> None:
        x = rng.normal(size=(3, 4))
        got = xent.logsumexp(to_xp(xp, x), axis=axis, keepdims=True)
        xp_assert_close(got, ref.logsumexp(x, axis=axis, keepdims=True), xp=xp, dtype="float64")


class TestPrecision:
    """Low precision is computed in float32 and returned in the input dtype, without overflow."""

    @pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
    @pytest.mark.parametrize("name", FUNCS)
    def test_values_at_dtype_max_do_not_overflow(self, xp: Any, dtype: str, name: str) -> None:
        big = 3.3895313892515355e38 if dtype == "bfloat16" else float(np.finfo(dtype).max)
        x = np.array([[big, big, 0.0], [big, big / 2, 0.0], [-big, -big, -big]])
        x_xp = to_xp(xp, x, dtype=dtype)
        got = _xent(name, x_xp, -1)
        assert np.all(np.isfinite(to_numpy(got))), to_numpy(got)
        want = _ref(name, to_numpy(x_xp), -1)
        # logsumexp(big, big) = big + log 2 rounds to big in float32 and float64, so the O(1) part
        # of a log-probability next to a logit of size `big` may be lost; probabilities may not.
        atol = 1e-6 if name == "softmax" or dtype == "float16" else 1.5
        xp_assert_close(got, want, xp=xp, dtype=dtype, rtol=2 * dtype_eps(dtype), atol=atol)

    @pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
    @pytest.mark.parametrize("name", FUNCS)
    def test_low_precision_is_computed_in_float32_and_returned_in_input_dtype(
        self, xp: Any, rng: np.random.Generator, dtype: str, name: str
    ) -> None:
        x_xp = to_xp(xp, rng.normal(size=(4, 300)) * 3, dtype=dtype)
        got = _xent(name, x_xp, -1)
        want = _ref(name, to_numpy(x_xp), -1)
        atol = 1e-7 if dtype == "float16" else 1e-30  # float16 subnormals are spaced 6e-8 apart
        xp_assert_close(got, want, xp=xp, dtype=dtype, rtol=dtype_eps(dtype), atol=atol)


class TestSpecialValues:
    """`-inf` entries are masked; a NaN poisons only its row."""

    def test_minus_inf_entries_are_masked(self, xp: Any) -> None:
        x = np.array([[0.0, -np.inf, 1.0], [-np.inf, -np.inf, 2.0], [-np.inf, -np.inf, -np.inf]])
        lse = xent.logsumexp(to_xp(xp, x))
        xp_assert_close(lse, [np.log(1 + np.e), 2.0, -np.inf], xp=xp, dtype="float64")
        p = to_numpy(xent.softmax(to_xp(xp, x)))
        np.testing.assert_allclose(
            p[:2], [[1 / (1 + np.e), 0.0, np.e / (1 + np.e)], [0, 0, 1]], rtol=1e-12, atol=0
        )
        lp = to_numpy(xent.log_softmax(to_xp(xp, x)))
        assert lp[0, 1] == -np.inf
        assert lp[1, 0] == -np.inf
        np.testing.assert_allclose(lp[1, 2], 0.0, atol=0)

    @pytest.mark.parametrize("name", FUNCS)
    def test_nan_poisons_only_its_row(self, xp: Any, rng: np.random.Generator, name: str) -> None:
        x = rng.normal(size=(3, 4))
        x[1, 2] = np.nan
        got = to_numpy(_xent(name, to_xp(xp, x), -1))
        assert np.all(np.isnan(got[1]))
        np.testing.assert_allclose(got[[0, 2]], _ref(name, x[[0, 2]], -1), rtol=1e-12)


class TestInputsAreNotModified:
    """No function writes into the array it is given."""

    @pytest.mark.parametrize("name", FUNCS)
    def test_input_is_not_modified(self, xp: Any, rng: np.random.Generator, name: str) -> None:
        x = rng.normal(size=(3, 4))
        x[0, 0] = -np.inf
        x_xp = to_xp(xp, x)
        to_numpy(_xent(name, x_xp, -1))
        to_numpy(_xent(name, x_xp, 0))
        np.testing.assert_array_equal(to_numpy(x_xp), x)


class TestAgainstReference:
    """`logsumexp`, `log_softmax` and `softmax` agree with the reference and with each other."""

    @pytest.mark.parametrize("name", FUNCS)
    def test_matches_reference_on_random_cases(self, xp: Any, name: str) -> None:
        @property_settings()
        @given(case=cases())
        def check(case: dict[str, Any]) -> None:
            x, axis = case["x"], case["axis"]
            got = _xent(name, to_xp(xp, x), axis, case["keepdims"])
            want = _ref(name, x, axis, case["keepdims"])
            xp_assert_close(got, want, xp=xp, dtype=case["dtype"], **_tol(case))

        check()

    def test_softmax_rows_sum_to_one_and_match_log_softmax(self, xp: Any) -> None:
        @property_settings()
        @given(case=cases())
        def check(case: dict[str, Any]) -> None:
            x, axis = to_xp(xp, case["x"]), case["axis"]
            p = to_numpy(xent.softmax(x, axis=axis)).astype(np.float64)
            lp = to_numpy(xent.log_softmax(x, axis=axis)).astype(np.float64)
            finite_rows = np.any(np.isfinite(case["x"]), axis=axis)
            sums = np.sum(p, axis=axis)
            tol = 1e-12 if case["dtype"] == "float64" else 1e-5
            np.testing.assert_allclose(sums[finite_rows], 1.0, rtol=0, atol=tol * p.shape[axis])
            assert np.all((p >= 0) & (p <= 1) | np.isnan(p))
            with np.errstate(all="ignore"):
                np.testing.assert_allclose(np.exp(lp), p, rtol=tol, atol=tol)

        check()

    def test_shifting_the_input_shifts_logsumexp_and_leaves_softmax(self, xp: Any) -> None:
        @property_settings()
        @given(case=cases(), shift=st.floats(-100, 100))
        def check(case: dict[str, Any], shift: float) -> None:
            if case["dtype"] != "float64":
                return  # the shifted input is not exactly representable in float32
            x, axis = case["x"], case["axis"]
            lse = to_numpy(xent.logsumexp(to_xp(xp, x), axis=axis))
            shifted = to_xp(xp, x + shift)
            xp_assert_close(
                xent.logsumexp(shifted, axis=axis),
                lse + shift,
                xp=xp,
                dtype="float64",
                rtol=1e-12,
                atol=1e-11 * (1 + abs(shift) + case["scale"]),
            )
            xp_assert_close(
                xent.softmax(shifted, axis=axis),
                to_numpy(xent.softmax(to_xp(xp, x), axis=axis)),
                xp=xp,
                dtype="float64",
                rtol=1e-9,
                atol=1e-12,
            )

        check()

    @pytest.mark.parametrize("name", FUNCS)
    def test_explicit_xp_gives_the_same_result(
        self, xp: Any, rng: np.random.Generator, name: str
    ) -> None:
        x = rng.normal(size=(3, 4))
        got = getattr(xent, name)(to_xp(xp, x), axis=-1, xp=xp)
        xp_assert_close(got, _ref(name, x, -1), xp=xp, dtype="float64")

    def test_inputs_larger_than_the_native_blocks_match_the_reference(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        """16 MiB of float32 logits: the chunked NumPy and PyTorch paths take many blocks of rows
        (NumPy on several threads); rows that are all -inf, hold +inf or NaN sit at block edges and
        in between. The gradient goes through the same blocks."""
        n, c = 420, 10_000
        x = rng.normal(size=(n, c)).astype(np.float32) * 4
        x[0] = -np.inf
        x[7, 3] = np.inf
        x[8, 5] = np.nan
        x[209, :-1] = -np.inf
        x[n - 1, 17] = np.nan
        x64 = x.astype(np.float64)
        want = ref.logsumexp(x64)
        got = to_numpy(xent.logsumexp(to_xp(xp, x)))
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=2e-6)
        np.testing.assert_array_equal(got[~finite], want[~finite])  # -inf, inf and NaN as such
        labels = rng.integers(0, c, size=n)
        loss, grad = xent.cross_entropy_and_grad(to_xp(xp, x), to_xp(xp, labels), reduction="none")
        losses, grad = to_numpy(loss), to_numpy(grad)
        expected = ref.cross_entropy(x64, labels, reduction="none")
        ok = np.isfinite(expected)
        np.testing.assert_allclose(losses[ok], expected[ok], rtol=2e-5, atol=1e-4)
        np.testing.assert_array_equal(np.isnan(losses), np.isnan(expected))
        with np.errstate(invalid="ignore"):  # the non-finite rows, which `ok` leaves out
            want_grad = np.exp(x64 - want[:, None])
        want_grad[np.arange(n), labels] -= 1.0
        np.testing.assert_allclose(grad[ok], want_grad[ok], rtol=1e-4, atol=1e-6)


_FORK_SCRIPT = """
import os
import numpy as np
import xent

x = np.random.default_rng(0).normal(size=(1024, 8192)).astype(np.float32)  # 32 MiB: threaded
y = np.zeros(1024, dtype=np.int64)
parent = float(xent.cross_entropy(x, y))
pid = os.fork()
if pid == 0:
    os._exit(0 if float(xent.cross_entropy(x, y)) == parent else 1)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""


class TestThreads:
    """NumPy's threaded kernels still work in a forked child."""

    @pytest.mark.only_backends(Backend.NUMPY)
    @pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
    def test_numpy_threads_work_in_a_forked_child(self, xp: Any) -> None:
        """A forked child (DataLoader workers, multiprocessing) has none of the parent's pool
        threads; xent must make a new pool there instead of waiting forever on the old one."""
        proc = subprocess.run(
            [sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
