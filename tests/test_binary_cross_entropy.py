"""`xent.binary_cross_entropy` and its `_and_grad` twin against the float64 reference
(docs/semantics.md)."""

from __future__ import annotations

from typing import Any

import _adversarial as adv
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

REDUCTIONS = ("mean", "sum", "none")


@st.composite
def cases(draw: Any) -> dict[str, Any]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if current().backend.like(Backend.JAX):  # few shapes: eager JAX compiles each one
        shape = draw(st.sampled_from([(0,), (5,), (2, 3), (2, 1, 3)]))
    else:
        shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    from_logits = draw(st.booleans()) if draw(st.integers(0, 2)) == 0 else True
    if from_logits:
        x = rng.normal(size=shape) * draw(st.sampled_from([1.0, 10.0]))
    else:
        x = rng.uniform(0.0, 1.0, size=shape)
        x[rng.uniform(size=shape) < 0.1] = 0.0
        x[rng.uniform(size=shape) < 0.1] = 1.0
    kind = draw(st.sampled_from(["float", "bool", "int"]))
    if kind == "float":
        t = rng.uniform(0.0, 1.0, size=shape).astype(dtype)
    else:
        t = rng.integers(0, 2, size=shape).astype(kind)
    opts: dict[str, Any] = {
        "from_logits": from_logits,
        "label_smoothing": draw(st.sampled_from([0.0, 0.0, 0.1, 1.0])),
        "reduction": draw(st.sampled_from(REDUCTIONS)),
    }
    # weight / pos_weight: any shape that broadcasts to the input (a trailing slice, with ones)
    for name in ("weight", "pos_weight"):
        k = draw(st.integers(-1, len(shape)))
        if k >= 0:
            wshape = tuple(1 if draw(st.booleans()) else n for n in shape[len(shape) - k :])
            opts[name] = rng.uniform(0.1, 3.0, size=wshape).astype(dtype)
    return {"x": x.astype(dtype), "t": t, "dtype": dtype, "opts": opts}


def _run(xp: Any, case: dict[str, Any], func: Any = None) -> Any:
    func = xent.binary_cross_entropy if func is None else func
    opts = dict(case["opts"])
    for name in ("weight", "pos_weight"):
        if name in opts:
            opts[name] = to_xp(xp, opts[name])
    return func(to_xp(xp, case["x"]), to_xp(xp, case["t"]), **opts)


def _tol(case: dict[str, Any]) -> dict[str, float]:
    return (
        {"rtol": 1e-10, "atol": 1e-10}
        if case["dtype"] == "float64"
        else {"rtol": 5e-5, "atol": 5e-5}
    )


class TestAgainstReference:
    """Random problems agree with the float64 reference and with NumPy; targets of any dtype."""

    def test_matches_reference_on_random_cases(self, xp: Any) -> None:
        @property_settings()
        @given(case=cases())
        def check(case: dict[str, Any]) -> None:
            got = _run(xp, case)
            want = ref.binary_cross_entropy(
                case["x"], case["t"], clip_dtype=case["dtype"], **case["opts"]
            )
            xp_assert_close(got, want, xp=xp, dtype=case["dtype"], **_tol(case))

        check()

    def test_loss_is_nonnegative(self, xp: Any) -> None:
        @property_settings()
        @given(case=cases())
        def check(case: dict[str, Any]) -> None:
            loss = to_numpy(_run(xp, case))
            assert np.all((loss >= 0) | np.isnan(loss)), loss
            assert not np.any(np.isnan(loss)) or case["x"].size == 0  # only an empty mean is NaN

        check()

    def test_backend_agrees_with_numpy(self, xp: Any) -> None:
        @property_settings()
        @given(case=cases())
        def check(case: dict[str, Any]) -> None:
            on_numpy = xent.binary_cross_entropy(case["x"], case["t"], **case["opts"])
            xp_assert_close(
                _run(xp, case),
                np.asarray(on_numpy, dtype=np.float64),
                xp=xp,
                dtype=case["dtype"],
                **_tol(case),
            )

        check()

    @pytest.mark.parametrize("kind", ["bool", "int8", "uint8", "int64"])
    def test_bool_and_integer_targets_equal_float_targets(
        self, xp: Any, rng: np.random.Generator, kind: str
    ) -> None:
        x = rng.normal(size=(4, 3))
        t = rng.integers(0, 2, size=(4, 3))
        for reduction in REDUCTIONS:
            got = xent.binary_cross_entropy(
                to_xp(xp, x), to_xp(xp, t, dtype=kind), reduction=reduction, label_smoothing=0.2
            )
            as_float = xent.binary_cross_entropy(
                to_xp(xp, x),
                to_xp(xp, t.astype(np.float64)),
                reduction=reduction,
                label_smoothing=0.2,
            )
            xp_assert_close(got, to_numpy(as_float), xp=xp, dtype="float64")
            xp_assert_close(
                got,
                ref.binary_cross_entropy(x, t, reduction=reduction, label_smoothing=0.2),
                xp=xp,
                dtype="float64",
            )


class TestReductions:
    """`mean` is the plain mean over every element; an empty input gives NaN and 0."""

    def test_mean_is_the_plain_mean_over_all_elements(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        x = rng.normal(size=(3, 4))
        t = rng.uniform(size=(3, 4))
        w = rng.uniform(0.5, 5.0, size=(3, 1))
        kw = {"weight": to_xp(xp, w), "pos_weight": to_xp(xp, np.array([1.0, 2.0, 3.0, 4.0]))}
        total = xent.binary_cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="sum", **kw)
        mean = xent.binary_cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="mean", **kw)
        xp_assert_close(mean, to_numpy(total) / 12, xp=xp, dtype="float64")

    def test_empty_input_mean_is_nan_sum_is_zero(self, xp: Any) -> None:
        x = np.zeros((0, 3))
        xp_assert_close(
            xent.binary_cross_entropy(to_xp(xp, x), to_xp(xp, x)), np.nan, xp=xp, dtype="float64"
        )
        xp_assert_close(
            xent.binary_cross_entropy(to_xp(xp, x), to_xp(xp, x), reduction="sum"),
            0.0,
            xp=xp,
            dtype="float64",
        )
        xp_assert_close(
            xent.binary_cross_entropy(to_xp(xp, x), to_xp(xp, x), reduction="none"),
            np.zeros((0, 3)),
            xp=xp,
            dtype="float64",
        )


class TestOptions:
    """Weights broadcast to the input; probability inputs clip to `eps`."""

    def test_weights_broadcast_to_the_input(self, xp: Any, rng: np.random.Generator) -> None:
        x = rng.normal(size=(2, 3, 4))
        t = rng.uniform(size=x.shape)
        for wshape, pshape in [((4,), (4,)), ((3, 1), (1, 4)), ((2, 1, 1), ()), ((), (3, 4))]:
            w = rng.uniform(0.5, 2.0, size=wshape)
            pw = rng.uniform(0.5, 2.0, size=pshape)
            got = xent.binary_cross_entropy(
                to_xp(xp, x),
                to_xp(xp, t),
                weight=to_xp(xp, w),
                pos_weight=to_xp(xp, pw),
                reduction="none",
            )
            want = ref.binary_cross_entropy(x, t, weight=w, pos_weight=pw, reduction="none")
            xp_assert_close(got, want, xp=xp, dtype="float64", err_msg=f"{wshape}, {pshape}")

    @pytest.mark.parametrize("eps", [1e-7, 1e-2])
    def test_from_probabilities_clips_to_eps(self, xp: Any, eps: float) -> None:
        p = np.array([0.0, 1.0, 0.5, 1e-9, 1.0 - 1e-9, 0.3])
        t = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.25])
        for reduction in REDUCTIONS:
            got = xent.binary_cross_entropy(
                to_xp(xp, p), to_xp(xp, t), from_logits=False, eps=eps, reduction=reduction
            )
            want = ref.binary_cross_entropy(p, t, from_logits=False, eps=eps, reduction=reduction)
            assert np.all(np.isfinite(want))
            xp_assert_close(got, want, xp=xp, dtype="float64")


class TestSpecialValues:
    """A NaN input poisons only its own element."""

    def test_nan_input_poisons_only_its_element(self, xp: Any, rng: np.random.Generator) -> None:
        x = rng.normal(size=(3, 3))
        x[1, 2] = np.nan
        t = rng.uniform(size=(3, 3))
        got = to_numpy(xent.binary_cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="none"))
        assert np.isnan(got[1, 2])
        assert np.sum(np.isnan(got)) == 1
        mean = xent.binary_cross_entropy(to_xp(xp, x), to_xp(xp, t))
        xp_assert_close(mean, np.nan, xp=xp, dtype="float64")


class TestPrecision:
    """Low precision is computed in float32 and returned in the input dtype, without overflow."""

    @pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
    @pytest.mark.parametrize("reduction", REDUCTIONS)
    def test_low_precision_is_computed_in_float32_and_returned_in_input_dtype(
        self, xp: Any, rng: np.random.Generator, dtype: str, reduction: str
    ) -> None:
        x_xp = to_xp(xp, rng.normal(size=(8, 16)) * 4, dtype=dtype)
        t_xp = to_xp(xp, rng.uniform(size=(8, 16)), dtype=dtype)
        got = xent.binary_cross_entropy(x_xp, t_xp, reduction=reduction, label_smoothing=0.1)
        want = ref.binary_cross_entropy(
            to_numpy(x_xp), to_numpy(t_xp), reduction=reduction, label_smoothing=0.1
        )
        atol = 1e-7 if dtype == "float16" else 0.0  # float16 subnormals are spaced 6e-8 apart
        xp_assert_close(got, want, xp=xp, dtype=dtype, rtol=dtype_eps(dtype), atol=atol)

    @pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
    def test_logits_at_dtype_max_do_not_overflow(self, xp: Any, dtype: str) -> None:
        big = 3.3895313892515355e38 if dtype == "bfloat16" else float(np.finfo(dtype).max)
        x = np.array([big, -big, big, -big])
        t = np.array([1.0, 0.0, 0.0, 1.0])
        x_xp = to_xp(xp, x, dtype=dtype)
        got = xent.binary_cross_entropy(x_xp, to_xp(xp, t, dtype=dtype), reduction="none")
        assert np.all(np.isfinite(to_numpy(got)))
        want = ref.binary_cross_entropy(to_numpy(x_xp), t, reduction="none")
        np.testing.assert_array_equal(want, [0.0, 0.0, to_numpy(x_xp)[2], to_numpy(x_xp)[2]])
        xp_assert_close(got, want, xp=xp, dtype=dtype, rtol=dtype_eps(dtype), atol=0.0)


class TestInputsAreNotModified:
    """No function writes into the arrays it is given."""

    def test_inputs_are_not_modified(self, xp: Any, rng: np.random.Generator) -> None:
        arrays = {
            "x": rng.normal(size=(3, 4)),
            "p": rng.uniform(size=(3, 4)),
            "t": rng.uniform(size=(3, 4)),
            "w": rng.uniform(0.5, 2, size=(4,)),
            "pw": rng.uniform(0.5, 2, size=(3, 1)),
        }
        on_xp = {k: to_xp(xp, v) for k, v in arrays.items()}
        kw = {"weight": on_xp["w"], "pos_weight": on_xp["pw"], "label_smoothing": 0.1}
        to_numpy(xent.binary_cross_entropy(on_xp["x"], on_xp["t"], **kw))
        to_numpy(xent.binary_cross_entropy(on_xp["p"], on_xp["t"], from_logits=False, **kw))
        for out in xent.binary_cross_entropy_and_grad(on_xp["x"], on_xp["t"], **kw):
            to_numpy(out)
        for out in xent.binary_cross_entropy_and_grad(
            on_xp["p"], on_xp["t"], from_logits=False, **kw
        ):
            to_numpy(out)
        for name, arr in on_xp.items():
            np.testing.assert_array_equal(to_numpy(arr), arrays[name], err_msg=name)


class TestAndGrad:
    """`binary_cross_entropy_and_grad` returns the loss and its gradient, in the input dtype."""

    @pytest.mark.parametrize("from_logits", [True, False])
    @pytest.mark.parametrize("reduction", REDUCTIONS)
    def test_and_grad_returns_the_loss_and_its_gradient(
        self, xp: Any, rng: np.random.Generator, from_logits: bool, reduction: str
    ) -> None:
        x = rng.normal(size=(3, 4)) if from_logits else rng.uniform(0.1, 0.9, size=(3, 4))
        t = rng.uniform(size=(3, 4))
        w = rng.uniform(0.5, 2.0, size=(3, 1))
        pw = rng.uniform(0.5, 2.0, size=(4,))
        kw = {"from_logits": from_logits, "reduction": reduction, "label_smoothing": 0.1}
        loss, grad = xent.binary_cross_entropy_and_grad(
            to_xp(xp, x), to_xp(xp, t), weight=to_xp(xp, w), pos_weight=to_xp(xp, pw), **kw
        )
        want = ref.binary_cross_entropy(x, t, weight=w, pos_weight=pw, **kw)
        xp_assert_close(loss, want, xp=xp, dtype="float64")
        want_grad = ref.numerical_grad(
            lambda v: ref.binary_cross_entropy(v, t, weight=w, pos_weight=pw, **kw), x
        )
        xp_assert_close(grad, want_grad, xp=xp, dtype="float64", rtol=1e-6, atol=1e-8)

    @pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
    def test_and_grad_returns_gradient_in_input_dtype(
        self, xp: Any, rng: np.random.Generator, dtype: str
    ) -> None:
        x_xp = to_xp(xp, rng.normal(size=(4, 5)), dtype=dtype)
        t_xp = to_xp(xp, rng.integers(0, 2, size=(4, 5)), dtype=dtype)
        loss, grad = xent.binary_cross_entropy_and_grad(x_xp, t_xp, reduction="sum")
        x64, t64 = to_numpy(x_xp), to_numpy(t_xp)
        want = ref.numerical_grad(lambda v: ref.binary_cross_entropy(v, t64, reduction="sum"), x64)
        rtol, atol = {"float32": (2e-5, 1e-7), "float16": (dtype_eps(dtype), 1e-7)}.get(
            dtype, (dtype_eps(dtype), 1e-30)
        )
        xp_assert_close(
            loss,
            ref.binary_cross_entropy(x64, t64, reduction="sum"),
            xp=xp,
            dtype=dtype,
            rtol=rtol,
            atol=atol,
        )
        xp_assert_close(grad, want, xp=xp, dtype=dtype, rtol=rtol, atol=atol)


# --- adversarial inputs ---------------------------------------------------------------------


@st.composite
def adversarial_cases(draw: Any) -> dict[str, Any]:
    """A hostile but valid problem: any float dtype, bool or any integer width of 0/1 targets,
    views, size-1 and empty axes, logits near the dtype's max, NaN, every option."""
    rng = np.random.default_rng(draw(adv.seeds()))
    if current().backend.like(Backend.JAX):  # few shapes: eager JAX compiles each one
        shape = draw(st.sampled_from([(4,), (2, 0)]))
    else:
        shape = tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from(adv.float_dtypes()))
    from_logits = draw(st.sampled_from([True, True, False]))
    # Huge logits: 1/256 of the dtype's max, so that no sum of at most 27 weighted terms
    # overflows where the float64 reference does not.
    top = float(np.finfo(np.float32 if dtype == "bfloat16" else dtype).max)
    if from_logits:
        x = rng.normal(size=shape) * draw(st.sampled_from([1.0, 30.0]))
        huge = rng.uniform(size=shape) < draw(st.sampled_from([0.0, 0.3]))
        x[huge] = rng.choice([-1.0, 1.0], size=shape)[huge] * top / 256
    else:
        x = rng.uniform(0.0, 1.0, size=shape)
        x[rng.uniform(size=shape) < 0.2] = 0.0
        x[rng.uniform(size=shape) < 0.2] = 1.0
    x[rng.uniform(size=shape) < draw(st.sampled_from([0.0, 0.1]))] = np.nan
    kind = draw(st.sampled_from(["float", "bool", *adv.label_dtypes()]))
    if kind == "float":
        t = rng.uniform(0.0, 1.0, size=shape)
        t[rng.uniform(size=shape) < 0.3] = 1.0
    else:
        t = rng.integers(0, 2, size=shape).astype(kind)
    opts: dict[str, Any] = {
        "from_logits": from_logits,
        "label_smoothing": draw(st.sampled_from([0.0, 0.1, 1.0])),
        "reduction": draw(st.sampled_from(REDUCTIONS)),
    }
    for name in ("weight", "pos_weight"):
        k = draw(st.integers(-1, len(shape)))
        if k >= 0:
            wshape = tuple(1 if draw(st.booleans()) else n for n in shape[len(shape) - k :])
            opts[name] = rng.uniform(0.5, 2.0, size=wshape)
    return {
        "x": x, "t": t, "dtype": dtype, "opts": opts,
        "target_dtype": draw(st.sampled_from(adv.float_dtypes())),
        "layout": draw(st.sampled_from(adv.layouts())),
    }  # fmt: skip


class TestAdversarialInputs:
    """Value and `binary_cross_entropy_and_grad` gradient against the float64 reference."""

    def _check(self, xp: Any, case: dict[str, Any]) -> None:
        opts = dict(case["opts"])
        x = adv.place(xp, case["x"], dtype=case["dtype"], layout=case["layout"])
        floating = np.issubdtype(case["t"].dtype, np.floating)
        if floating:
            t = adv.place(xp, case["t"], dtype=case["target_dtype"], layout=case["layout"])
        else:
            t = adv.place(xp, case["t"], dtype=str(case["t"].dtype), layout=case["layout"])
        for name in ("weight", "pos_weight"):
            if name in opts:
                opts[name] = to_xp(xp, opts[name])
        loss = xent.binary_cross_entropy(x, t, **opts)
        and_loss, grad = xent.binary_cross_entropy_and_grad(x, t, **opts)

        ref_opts = dict(case["opts"], clip_dtype=adv.compute_dtype(case["dtype"]))
        xr = adv.reference_input(x)
        tr = adv.reference_input(t)
        want = ref.binary_cross_entropy(xr, tr, **ref_opts)
        want_grad = ref.binary_cross_entropy_grad(xr, tr, **ref_opts)

        eps = adv.compute_eps(case["dtype"])
        # The rounding error scales with the logits' size (-log(eps) for probabilities); weights
        # are at most 2, so each element's loss is within 4 (1 + |x|).
        with np.errstate(over="ignore"):
            size = (
                1.0 + np.where(np.isfinite(xr), np.abs(xr), 0.0)
                if case["opts"]["from_logits"]
                else np.full(xr.shape, 20.0)
            )
            if case["opts"]["reduction"] == "sum":
                size = np.sum(size)
            elif case["opts"]["reduction"] == "mean":
                size = np.mean(size) if size.size else 0.0
            atol = 64 * eps * 4.0 * (1.0 + size)
            finite = want_grad[np.isfinite(want_grad)]
            grad_atol = 64 * eps * (1.0 + (np.max(np.abs(finite)) if finite.size else 0.0))
        out = {">f4": "float32", ">f8": "float64"}.get(case["dtype"], case["dtype"])
        adv.assert_matches(loss, want, dtype=out, atol=atol, what="loss", case=case)
        adv.assert_matches(and_loss, want, dtype=out, atol=atol, what="and_grad loss", case=case)
        adv.assert_matches(grad, want_grad, dtype=out, atol=grad_atol, what="grad", case=case)

    def test_matches_reference(self, xp: Any) -> None:
        @adv.settings()
        @given(case=adversarial_cases())
        def check(case: dict[str, Any]) -> None:
            self._check(xp, case)

        check()
