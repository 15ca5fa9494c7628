"""`xent.cross_entropy` and `xent.cross_entropy_and_grad` against the float64 reference
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
    is_lazy,
    property_settings,
    to_numpy,
    to_xp,
    xp_assert_close,
)
from hypothesis import given
from hypothesis import strategies as st

import xent

REDUCTIONS = ("mean", "sum", "none")


def _softmax_rows(rng: np.random.Generator, shape: tuple[int, ...], axis: int = -1) -> np.ndarray:
    """Random probability vectors along `axis` (some exact zeros, as in one-hot targets)."""
    t = rng.exponential(size=shape)
    t[rng.uniform(size=shape) < 0.2] = 0.0
    t = np.moveaxis(t, axis, -1)
    t[..., 0] += 1e-3  # never an all-zero row
    t /= t.sum(axis=-1, keepdims=True)
    return np.moveaxis(t, -1, axis)


@st.composite
def cases(draw: Any, *, probabilities: bool) -> dict[str, Any]:
    """A random problem: shape, class axis, data and every option of docs/semantics.md."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if current().backend.like(Backend.JAX):  # few shapes: eager JAX compiles each one
        batch = draw(st.sampled_from([(0,), (5,), (2, 3)]))
        n_classes = draw(st.sampled_from([1, 4]))
    else:
        batch = (draw(st.integers(0, 5)), *draw(st.lists(st.integers(1, 3), max_size=2)))
        n_classes = draw(st.integers(1, 6))
    pos = draw(st.integers(0, len(batch)))
    shape = (*batch[:pos], n_classes, *batch[pos:])
    axis = pos if draw(st.booleans()) else pos - len(shape)
    from_logits = draw(st.booleans()) if draw(st.integers(0, 3)) == 0 else True
    dtype = draw(st.sampled_from(["float32", "float64"]))
    scale = draw(st.sampled_from([1.0, 8.0]))
    if from_logits:
        x = rng.normal(size=shape) * scale
    else:
        x = rng.uniform(0.0, 2.0, size=shape)
        x[rng.uniform(size=shape) < 0.1] = 0.0
        np.moveaxis(x, axis, -1)[..., 0] += 0.5  # renormalising an all-zero row is 0/0
    x = x.astype(dtype)
    opts: dict[str, Any] = {
        "axis": axis,
        "from_logits": from_logits,
        "label_smoothing": draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0])),
        "reduction": draw(st.sampled_from(REDUCTIONS)),
    }
    if draw(st.booleans()):
        opts["weight"] = rng.uniform(0.1, 2.0, size=n_classes).astype(dtype)
    sw = draw(st.sampled_from(["none", "full", "broadcast", "scalar"]))
    if sw == "full":
        opts["sample_weight"] = rng.uniform(0.0, 2.0, size=batch).astype(dtype)
    elif sw == "broadcast":
        opts["sample_weight"] = rng.uniform(0.0, 2.0, size=batch[-1:]).astype(dtype)
    elif sw == "scalar":
        opts["sample_weight"] = np.asarray(rng.uniform(0.5, 2.0), dtype=dtype)
    if from_logits:
        opts["z_loss"] = draw(st.sampled_from([0.0, 0.0, 1e-3, 0.5]))
        opts["softcap"] = draw(st.sampled_from([None, None, 2.0, 30.0]))
    if probabilities:
        t = _softmax_rows(rng, shape, axis).astype(dtype)
    else:
        t = rng.integers(0, n_classes, size=batch)
        ignore = draw(st.sampled_from([-100, -1, 0, n_classes - 1, n_classes + 3]))
        opts["ignore_index"] = ignore
        t[rng.uniform(size=batch) < 0.25] = ignore
        t = t.astype(draw(st.sampled_from(["int64", "int32", "int16"])))
    return {"x": x, "t": t, "dtype": dtype, "opts": opts, "scale": scale}


def _run(xp: Any, case: dict[str, Any], func: Any = None) -> Any:
    func = xent.cross_entropy if func is None else func
    opts = dict(case["opts"])
    for name in ("weight", "sample_weight"):
        if name in opts:
            opts[name] = to_xp(xp, opts[name])
    return func(to_xp(xp, case["x"]), to_xp(xp, case["t"]), **opts)


def _tol(case: dict[str, Any]) -> dict[str, float]:
    if case["dtype"] == "float64":
        return {"rtol": 1e-10, "atol": 1e-10}
    # float32: rounding scales with the logits' magnitude (lse - x_t cancels) and z_loss's lse**2.
    lse_scale = 1.0 + case["scale"] * 4.0
    if case["opts"].get("z_loss"):
        lse_scale = lse_scale**2
    return {"rtol": 5e-5, "atol": 5e-6 * lse_scale}


class TestAgainstReference:
    """Random problems agree with the float64 reference, with NumPy and with the loss's invariants."""

    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    def test_matches_reference_on_random_cases(self, xp: Any, probabilities: bool) -> None:
        @property_settings()
        @given(case=cases(probabilities=probabilities))
        def check(case: dict[str, Any]) -> None:
            got = _run(xp, case)
            want = ref.cross_entropy(case["x"], case["t"], clip_dtype=case["dtype"], **case["opts"])
            xp_assert_close(got, want, xp=xp, dtype=case["dtype"], **_tol(case))

        check()

    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    def test_loss_is_invariant_to_a_per_row_shift_of_the_logits(
        self, xp: Any, probabilities: bool
    ) -> None:
        @property_settings()
        @given(case=cases(probabilities=probabilities), shift_seed=st.integers(0, 2**32 - 1))
        def check(case: dict[str, Any], shift_seed: int) -> None:
            # softcap and z_loss depend on the logits themselves, not only on their softmax
            opts = {**case["opts"], "from_logits": True, "softcap": None, "z_loss": 0.0}
            x = case["x"]
            if not case["opts"]["from_logits"]:
                x = np.log(x + 0.1).astype(x.dtype)
            case = {**case, "x": x, "opts": opts}
            shift = np.random.default_rng(shift_seed).uniform(-50, 50, size=x.shape)
            shift = np.take(shift, [0], axis=opts["axis"])  # one constant per row
            shifted = {**case, "x": (x.astype(np.float64) + shift).astype(x.dtype)}
            # the float32 shift itself rounds the logits by up to eps * 58
            tol = _tol(case) if case["dtype"] == "float64" else {"rtol": 1e-4, "atol": 2e-4}
            xp_assert_close(
                _run(xp, shifted), to_numpy(_run(xp, case)), xp=xp, dtype=case["dtype"], **tol
            )

        check()

    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    def test_loss_without_z_loss_is_nonnegative(self, xp: Any, probabilities: bool) -> None:
        @property_settings()
        @given(case=cases(probabilities=probabilities))
        def check(case: dict[str, Any]) -> None:
            opts = {**case["opts"], "z_loss": 0.0} if case["opts"]["from_logits"] else case["opts"]
            loss = to_numpy(_run(xp, {**case, "opts": opts}))
            assert np.all((loss >= 0) | np.isnan(loss)), loss
            # NaN only where the reference has it (all ignored / empty mean)
            want = ref.cross_entropy(case["x"], case["t"], clip_dtype=case["dtype"], **opts)
            np.testing.assert_array_equal(np.isnan(loss), np.isnan(want))

        check()

    def test_backend_agrees_with_numpy(self, xp: Any) -> None:
        @property_settings()
        @given(case=cases(probabilities=False))
        def check(case: dict[str, Any]) -> None:
            on_numpy = xent.cross_entropy(case["x"], case["t"], **case["opts"])
            assert isinstance(on_numpy, np.ndarray | np.generic)
            xp_assert_close(
                _run(xp, case),
                np.asarray(on_numpy, dtype=np.float64),
                xp=xp,
                dtype=case["dtype"],
                **_tol(case),
            )

        check()

    def test_explicit_xp_gives_the_same_result(self, xp: Any, rng: np.random.Generator) -> None:
        x = rng.normal(size=(5, 4))
        t = rng.integers(0, 4, size=5)
        got = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="none", xp=xp)
        xp_assert_close(got, ref.cross_entropy(x, t, reduction="none"), xp=xp, dtype="float64")

    def test_one_hot_probabilities_equal_class_indices(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        x = rng.normal(size=(6, 5)) * 3
        t = rng.integers(0, 5, size=6)
        w = rng.uniform(0.5, 2.0, size=5)
        one_hot = np.eye(5)[t]
        for e in (0.0, 0.3):
            for reduction in ("sum", "none"):
                by_index = xent.cross_entropy(
                    to_xp(xp, x),
                    to_xp(xp, t),
                    weight=to_xp(xp, w),
                    label_smoothing=e,
                    reduction=reduction,
                )
                by_prob = xent.cross_entropy(
                    to_xp(xp, x),
                    to_xp(xp, one_hot),
                    weight=to_xp(xp, w),
                    label_smoothing=e,
                    reduction=reduction,
                )
                xp_assert_close(by_prob, to_numpy(by_index), xp=xp, dtype="float64")


class TestReductions:
    """`mean` divides by the weight of the valid targets; empty batches give NaN and 0."""

    def test_mean_divides_by_weight_of_valid_targets(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        x = rng.normal(size=(6, 4))
        t = np.array([0, 3, -100, 1, 3, -100])
        w = np.array([0.5, 1.0, 2.0, 4.0])
        s = np.array([1.0, 2.0, 3.0, 0.5, 1.5, 7.0])
        kw = {"weight": to_xp(xp, w), "sample_weight": to_xp(xp, s)}
        total = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="sum", **kw)
        mean = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="mean", **kw)
        valid = t != -100
        denominator = np.sum(s[valid] * w[t[valid]])  # 0.5 + 2*4 + 0.5*1 + 1.5*4 = 15
        assert denominator == 15.0
        xp_assert_close(mean, to_numpy(total) / denominator, xp=xp, dtype="float64")
        xp_assert_close(
            mean,
            ref.cross_entropy(x, t, reduction="mean", weight=w, sample_weight=s),
            xp=xp,
            dtype="float64",
        )

    def test_probability_mean_divides_by_sum_of_sample_weights(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        x = rng.normal(size=(2, 3, 4))
        t = _softmax_rows(rng, x.shape)
        w = rng.uniform(0.5, 2.0, size=4)
        s = rng.uniform(0.5, 2.0, size=(2, 3))
        kw = {"weight": to_xp(xp, w), "sample_weight": to_xp(xp, s)}
        total = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="sum", **kw)
        mean = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="mean", **kw)
        xp_assert_close(mean, to_numpy(total) / s.sum(), xp=xp, dtype="float64")
        plain_total = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="sum")
        plain_mean = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="mean")
        xp_assert_close(plain_mean, to_numpy(plain_total) / 6, xp=xp, dtype="float64")

    @pytest.mark.parametrize(
        ("x_shape", "labels"),
        [((3, 4), [-100, -100, -100]), ((0, 4), []), ((0, 4, 2), np.zeros((0, 2), dtype=np.int64))],
        ids=["all-ignored", "empty", "empty-Kdim"],
    )
    def test_mean_of_nothing_is_nan_sum_is_zero(
        self, xp: Any, x_shape: tuple[int, ...], labels: Any
    ) -> None:
        x = np.ones(x_shape)
        t = np.asarray(labels, dtype=np.int64)
        axis = 1
        mean = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), axis=axis)
        xp_assert_close(mean, np.nan, xp=xp, dtype="float64")
        total = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), axis=axis, reduction="sum")
        xp_assert_close(total, 0.0, xp=xp, dtype="float64")
        none = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), axis=axis, reduction="none")
        xp_assert_close(none, np.zeros(t.shape), xp=xp, dtype="float64")

    def test_empty_probability_mean_is_nan(self, xp: Any) -> None:
        x = np.zeros((0, 3))
        mean = xent.cross_entropy(to_xp(xp, x), to_xp(xp, x))
        xp_assert_close(mean, np.nan, xp=xp, dtype="float64")


class TestSpecialValues:
    """`-inf` logits mask classes; NaN and `+inf` stay in their own row."""

    @pytest.mark.parametrize("dtype", ["float32", "float64"])
    def test_minus_inf_logits_off_target_equal_dropping_the_class(
        self, xp: Any, rng: np.random.Generator, dtype: str
    ) -> None:
        x = rng.normal(size=(5, 6)).astype(dtype)
        t = np.array([0, 2, 5, 1, 3])
        masked = x.copy()
        masked[:, 4] = -np.inf
        masked[0, 1] = -np.inf
        for reduction in REDUCTIONS:
            got = xent.cross_entropy(to_xp(xp, masked), to_xp(xp, t), reduction=reduction)
            want = ref.cross_entropy(masked, t, reduction=reduction)
            assert np.all(np.isfinite(want))
            xp_assert_close(got, want, xp=xp, dtype=dtype)
        # the same as never having had class 4 (labels above it shift down by one)
        dropped = np.delete(x, 4, axis=1)
        dropped[0, 1] = -np.inf
        got = xent.cross_entropy(to_xp(xp, masked), to_xp(xp, t), reduction="none")
        want = ref.cross_entropy(dropped, np.where(t > 4, t - 1, t), reduction="none")
        xp_assert_close(got, want, xp=xp, dtype=dtype)

    def test_minus_inf_probability_column_with_zero_target_is_ignored(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        x = rng.normal(size=(3, 4))
        x[:, 2] = -np.inf
        t = _softmax_rows(rng, (3, 4))
        t[:, 2] = 0.0
        t /= t.sum(axis=1, keepdims=True)
        got = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="none")
        want = ref.cross_entropy(x, t, reduction="none")
        assert np.all(np.isfinite(want))
        xp_assert_close(got, want, xp=xp, dtype="float64")

    def test_target_at_minus_inf_gives_inf(self, xp: Any) -> None:
        x = np.array([[0.0, -np.inf, 1.0], [0.5, 0.2, 0.1]])
        t = np.array([1, 0])
        none = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="none")
        xp_assert_close(none, ref.cross_entropy(x, t, reduction="none"), xp=xp, dtype="float64")
        assert to_numpy(none)[0] == np.inf
        mean = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t))
        xp_assert_close(mean, np.inf, xp=xp, dtype="float64")

    @pytest.mark.parametrize("smoothing", [1.0, 0.5])
    def test_target_at_minus_inf_gives_inf_with_any_smoothing(
        self, xp: Any, smoothing: float
    ) -> None:
        """With ``label_smoothing=1`` the label's term has weight 0: it is left out, not
        ``0 * inf`` (PyTorch gives NaN there), so the loss is the spread's ``inf``."""
        x = np.array([[0.0, -np.inf, 1.0], [0.5, 0.2, 0.1]])
        t = np.array([1, 0])
        w = np.array([0.5, 2.0, 1.0])
        for options in ({}, {"weight": to_xp(xp, w)}):
            loss, grad = xent.cross_entropy_and_grad(
                to_xp(xp, x), to_xp(xp, t), label_smoothing=smoothing, reduction="none",
                **options,
            )  # fmt: skip
            want = ref.cross_entropy(
                x, t, label_smoothing=smoothing, reduction="none",
                weight=None if not options else w,
            )  # fmt: skip
            assert want[0] == np.inf
            xp_assert_close(loss, want, xp=xp, dtype="float64")
            assert np.isfinite(to_numpy(grad)).all()

    def test_row_of_only_minus_inf_gives_nan_for_that_row(self, xp: Any) -> None:
        x = np.array([[-np.inf, -np.inf, -np.inf], [0.5, 0.2, 0.1], [1.0, -np.inf, 0.0]])
        t = np.array([1, 0, 2])
        got = to_numpy(xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="none"))
        assert np.isnan(got[0])
        np.testing.assert_allclose(
            got[1:], ref.cross_entropy(x[1:], t[1:], reduction="none"), rtol=1e-12
        )

    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    def test_nan_logit_poisons_only_its_row(
        self, xp: Any, rng: np.random.Generator, probabilities: bool
    ) -> None:
        x = rng.normal(size=(4, 5))
        x[2, 3] = np.nan
        t = _softmax_rows(rng, x.shape) if probabilities else np.array([0, 1, 0, 4])
        got = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="none", label_smoothing=0.1)
        want = ref.cross_entropy(x, t, reduction="none", label_smoothing=0.1)
        assert np.isnan(want[2])
        assert np.all(np.isfinite(np.delete(want, 2)))
        xp_assert_close(got, want, xp=xp, dtype="float64")
        mean = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t))
        xp_assert_close(mean, np.nan, xp=xp, dtype="float64")


class TestPrecision:
    """Low precision is computed in float32 and returned in the input dtype, without overflow."""

    @pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    @pytest.mark.parametrize("reduction", REDUCTIONS)
    def test_low_precision_is_computed_in_float32_and_returned_in_input_dtype(
        self, xp: Any, rng: np.random.Generator, dtype: str, probabilities: bool, reduction: str
    ) -> None:
        n_classes = 50
        x_xp = to_xp(xp, rng.normal(size=(16, n_classes)) * 4, dtype=dtype)
        if probabilities:
            t_xp = to_xp(xp, _softmax_rows(rng, (16, n_classes)), dtype=dtype)
        else:
            t_xp = to_xp(xp, rng.integers(0, n_classes, size=16))
        got = xent.cross_entropy(x_xp, t_xp, reduction=reduction, label_smoothing=0.1)
        # the reference sees exactly the rounded values the backend holds
        want = ref.cross_entropy(
            to_numpy(x_xp), to_numpy(t_xp), reduction=reduction, label_smoothing=0.1
        )
        xp_assert_close(got, want, xp=xp, dtype=dtype, rtol=dtype_eps(dtype), atol=0.0)

    @pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
    def test_logits_at_dtype_max_do_not_overflow(self, xp: Any, dtype: str) -> None:
        big = float(np.finfo(np.float32 if dtype == "bfloat16" else dtype).max)
        if dtype == "bfloat16":
            big = 3.3895313892515355e38  # largest finite bfloat16
        x = np.array(
            [[big, big, 0.0], [big, 0.0, 0.0], [big, big / 2, -big / 2], [-big, -big, -big]]
        )
        t = np.array([0, 1, 0, 0])
        x_xp = to_xp(xp, x, dtype=dtype)
        for reduction in ("none", "sum"):
            got = xent.cross_entropy(x_xp, to_xp(xp, t), reduction=reduction)
            loss = to_numpy(got)
            assert np.all(np.isfinite(loss)), f"overflow: {loss}"
            want = ref.cross_entropy(to_numpy(x_xp), t, reduction=reduction)
            # lse - x_t may lose the O(1) part next to a logit of size `big` in the dtype itself
            xp_assert_close(
                got,
                want,
                xp=xp,
                dtype=dtype,
                rtol=4 * dtype_eps(dtype),
                atol=4 * dtype_eps(dtype) * big,
            )


class TestOptions:
    """The class axis, sample weights, z-loss, softcap, label dtypes and probability inputs."""

    @pytest.mark.parametrize("axis", [0, 1, -1, -2])
    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    def test_any_class_axis_equals_moving_it_last(
        self, xp: Any, rng: np.random.Generator, axis: int, probabilities: bool
    ) -> None:
        x = rng.normal(size=(3, 4, 5)) * 2
        moved = np.moveaxis(x, axis, -1)
        if probabilities:
            t_moved = _softmax_rows(rng, moved.shape)
            t = np.moveaxis(t_moved, -1, axis)
        else:
            t = t_moved = rng.integers(0, x.shape[axis], size=moved.shape[:-1])
        w = rng.uniform(0.5, 2.0, size=x.shape[axis])
        for reduction in REDUCTIONS:
            kw = {"reduction": reduction, "label_smoothing": 0.2}
            got = xent.cross_entropy(
                to_xp(xp, x), to_xp(xp, t), axis=axis, weight=to_xp(xp, w), **kw
            )
            last = xent.cross_entropy(
                to_xp(xp, moved), to_xp(xp, t_moved), weight=to_xp(xp, w), **kw
            )
            xp_assert_close(got, to_numpy(last), xp=xp, dtype="float64")
            xp_assert_close(
                got, ref.cross_entropy(moved, t_moved, weight=w, **kw), xp=xp, dtype="float64"
            )

    @pytest.mark.parametrize("sw_shape", [(), (1,), (3,), (2, 1), (2, 3)])
    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    def test_sample_weight_broadcasts_to_per_example_shape(
        self, xp: Any, rng: np.random.Generator, sw_shape: tuple[int, ...], probabilities: bool
    ) -> None:
        x = rng.normal(size=(2, 3, 4))
        t = _softmax_rows(rng, x.shape) if probabilities else rng.integers(0, 4, size=(2, 3))
        s = rng.uniform(0.1, 2.0, size=sw_shape)
        for reduction in REDUCTIONS:
            got = xent.cross_entropy(
                to_xp(xp, x), to_xp(xp, t), sample_weight=to_xp(xp, s), reduction=reduction
            )
            full = np.broadcast_to(s, (2, 3))
            want = ref.cross_entropy(x, t, sample_weight=full, reduction=reduction)
            xp_assert_close(got, want, xp=xp, dtype="float64")

    def test_z_loss_adds_scaled_squared_logsumexp_except_where_ignored(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        x = rng.normal(size=(5, 7)) * 3
        t = np.array([1, -100, 6, 0, 3])
        s = 0.25
        base = to_numpy(xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="none"))
        with_z = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="none", z_loss=s)
        lse = ref.logsumexp(x, axis=-1)
        xp_assert_close(with_z, base + np.where(t == -100, 0.0, s * lse**2), xp=xp, dtype="float64")
        assert to_numpy(with_z)[1] == 0.0
        mean = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), z_loss=s)
        xp_assert_close(mean, ref.cross_entropy(x, t, z_loss=s), xp=xp, dtype="float64")

    def test_z_loss_applies_to_probability_targets(self, xp: Any, rng: np.random.Generator) -> None:
        x = rng.normal(size=(4, 3)) * 3
        t = _softmax_rows(rng, x.shape)
        got = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="none", z_loss=1e-2)
        xp_assert_close(
            got, ref.cross_entropy(x, t, reduction="none", z_loss=1e-2), xp=xp, dtype="float64"
        )

    @pytest.mark.parametrize("softcap", [0.5, 5.0, 50.0])
    def test_softcap_equals_capping_the_logits_first(
        self, xp: Any, rng: np.random.Generator, softcap: float
    ) -> None:
        x = rng.normal(size=(6, 5)) * 20
        t = rng.integers(0, 5, size=6)
        capped = softcap * np.tanh(x / softcap)
        for reduction in REDUCTIONS:
            got = xent.cross_entropy(
                to_xp(xp, x), to_xp(xp, t), softcap=softcap, reduction=reduction, z_loss=1e-3
            )
            plain = xent.cross_entropy(
                to_xp(xp, capped), to_xp(xp, t), reduction=reduction, z_loss=1e-3
            )
            xp_assert_close(got, to_numpy(plain), xp=xp, dtype="float64")
            xp_assert_close(
                got,
                ref.cross_entropy(x, t, softcap=softcap, reduction=reduction, z_loss=1e-3),
                xp=xp,
                dtype="float64",
            )

    @pytest.mark.parametrize(
        "label_dtype", ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
    )
    def test_integer_targets_of_any_width(
        self, xp: Any, rng: np.random.Generator, label_dtype: str
    ) -> None:
        x = rng.normal(size=(2, 5, 3))
        t = rng.integers(0, 5, size=(2, 3))
        w = rng.uniform(0.5, 2.0, size=5)
        ignore = 4  # representable in every width
        t[0, 1] = ignore
        for reduction in REDUCTIONS:
            got = xent.cross_entropy(
                to_xp(xp, x),
                to_xp(xp, t, dtype=label_dtype),
                axis=1,
                weight=to_xp(xp, w),
                ignore_index=ignore,
                label_smoothing=0.1,
                reduction=reduction,
            )
            want = ref.cross_entropy(
                x,
                t,
                axis=1,
                weight=w,
                ignore_index=ignore,
                label_smoothing=0.1,
                reduction=reduction,
            )
            xp_assert_close(got, want, xp=xp, dtype="float64")

    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    def test_from_probabilities_renormalises_and_clips(
        self, xp: Any, rng: np.random.Generator, probabilities: bool
    ) -> None:
        p = rng.uniform(0.0, 3.0, size=(5, 4))  # not normalised
        p[0, 2] = 0.0  # clipped to eps
        p[1] = [0.0, 5.0, 0.0, 0.0]  # clipped to 1 - eps
        t = _softmax_rows(rng, p.shape) if probabilities else np.array([2, 1, 0, 3, 1])
        for eps in (1e-7, 1e-3):
            for reduction in REDUCTIONS:
                got = xent.cross_entropy(
                    to_xp(xp, p), to_xp(xp, t), from_logits=False, eps=eps, reduction=reduction
                )
                want = ref.cross_entropy(p, t, from_logits=False, eps=eps, reduction=reduction)
                xp_assert_close(got, want, xp=xp, dtype="float64")
        loss0 = to_numpy(
            xent.cross_entropy(to_xp(xp, p), to_xp(xp, t), from_logits=False, reduction="none")
        )
        if not probabilities:
            assert loss0[0] == pytest.approx(-np.log(1e-7), rel=1e-12)


class TestUnvalidatedLabels:
    """Labels outside `[0, C)` give NaN, never an index error, where values are not checked."""

    @pytest.mark.parametrize("bad", [5, -1, 7, 100], ids=lambda b: f"label{b}")
    @pytest.mark.parametrize("validate", [False, None])
    def test_invalid_label_gives_nan_where_not_validated(
        self, xp: Any, rng: np.random.Generator, bad: int, validate: bool | None
    ) -> None:
        from _helpers import is_concrete_host

        if validate is None and is_concrete_host():
            pytest.skip(
                "validate=None checks concrete host labels (test_validation covers the raise)"
            )
        x = rng.normal(size=(4, 5))
        t = np.array([0, bad, 2, 4])
        none = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="none", validate=validate)
        want = ref.cross_entropy(x, t, reduction="none")
        assert np.isnan(want[1])
        xp_assert_close(none, want, xp=xp, dtype="float64")
        for reduction in ("mean", "sum"):
            for smoothing in (0.0, 0.1):
                got = xent.cross_entropy(
                    to_xp(xp, x),
                    to_xp(xp, t),
                    reduction=reduction,
                    label_smoothing=smoothing,
                    validate=validate,
                )
                xp_assert_close(got, np.nan, xp=xp, dtype="float64")

    def test_invalid_label_with_weights_gives_nan_not_an_index_error(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        x = rng.normal(size=(3, 4))
        t = np.array([0, 9, 1])
        w = rng.uniform(0.5, 2.0, size=4)
        got = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), weight=to_xp(xp, w), validate=False)
        xp_assert_close(got, np.nan, xp=xp, dtype="float64")


class TestInputsAreNotModified:
    """No function writes into the arrays it is given."""

    def test_inputs_are_not_modified(self, xp: Any, rng: np.random.Generator) -> None:
        x = rng.normal(size=(4, 5))
        x[0, 1] = -np.inf
        t = np.array([0, 2, -100, 4])
        tp = _softmax_rows(rng, x.shape)
        w = rng.uniform(0.5, 2.0, size=5)
        s = rng.uniform(0.5, 2.0, size=4)
        arrays = {
            name: to_xp(xp, a)
            for name, a in {
                "x": x,
                "t": t,
                "tp": tp,
                "w": w,
                "s": s,
                "p": np.abs(x[:, ::-1]) + 0.1,
            }.items()
        }
        before = {name: to_numpy(a).copy() for name, a in arrays.items()}
        a = arrays
        for target in (a["t"], a["tp"]):
            kw = {"weight": a["w"], "sample_weight": a["s"], "label_smoothing": 0.1}
            to_numpy(xent.cross_entropy(a["x"], target, z_loss=1e-3, softcap=5.0, **kw))
            to_numpy(xent.cross_entropy(a["p"], target, from_logits=False, **kw))
            for out in xent.cross_entropy_and_grad(a["x"], target, z_loss=1e-3, **kw):
                to_numpy(out)
            for out in xent.cross_entropy_and_grad(a["p"], target, from_logits=False, **kw):
                to_numpy(out)
        for name, arr in arrays.items():
            np.testing.assert_array_equal(to_numpy(arr), before[name], err_msg=name)


class TestIgnoreIndex:
    """Targets equal to `ignore_index` add nothing to the loss, its mean or the gradient."""

    @pytest.mark.parametrize("label_dtype", ["uint8", "uint16", "uint32", "uint64"])
    def test_unsigned_labels_work_with_negative_ignore_index(
        self, xp: Any, rng: np.random.Generator, label_dtype: str
    ) -> None:
        x = rng.normal(size=(6, 4))
        t = rng.integers(0, 4, size=6)
        got = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t, dtype=label_dtype), reduction="none")
        xp_assert_close(got, ref.cross_entropy(x, t, reduction="none"), xp=xp, dtype="float64")
        got = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t, dtype=label_dtype), ignore_index=-1)
        xp_assert_close(got, ref.cross_entropy(x, t), xp=xp, dtype="float64")

    def test_unsigned_labels_can_be_ignored_at_their_max(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        x = rng.normal(size=(5, 4))
        t = np.array([1, 255, 3, 255, 0])
        for reduction in REDUCTIONS:
            got = xent.cross_entropy(
                to_xp(xp, x), to_xp(xp, t, dtype="uint8"), ignore_index=255, reduction=reduction
            )
            want = ref.cross_entropy(x, t, ignore_index=255, reduction=reduction)
            xp_assert_close(got, want, xp=xp, dtype="float64")

    def test_nan_logit_in_an_ignored_row_is_ignored(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        x = rng.normal(size=(3, 4))
        x[1, 2] = np.nan
        t = np.array([0, -100, 3])
        got = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t))
        xp_assert_close(got, ref.cross_entropy(x, t), xp=xp, dtype="float64")
        assert np.isfinite(to_numpy(got))

    def test_and_grad_of_ignored_rows_is_zero(self, xp: Any, rng: np.random.Generator) -> None:
        x = rng.normal(size=(4, 3))
        t = np.array([0, -100, 2, -100])
        _, grad = xent.cross_entropy_and_grad(
            to_xp(xp, x), to_xp(xp, t), label_smoothing=0.3, z_loss=0.1
        )
        g = to_numpy(grad)
        assert np.all(g[[1, 3]] == 0.0)
        assert np.all(g[[0, 2]] != 0.0)

    @pytest.mark.eager("validate=True reads the labels: a Dask compute by design")
    def test_ignore_index_label_is_valid(self, xp: Any, rng: np.random.Generator) -> None:
        x = to_xp(xp, rng.normal(size=(3, 5)))
        for ignore in (-100, 7, -1):
            t = to_xp(xp, np.array([0, ignore, 4]))
            out = xent.cross_entropy(x, t, ignore_index=ignore, validate=True)
            assert np.isfinite(to_numpy(out))

    @pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probabilities-in"])
    def test_ignored_rows_get_exactly_zero_gradient(
        self, xp: Any, rng: np.random.Generator, from_logits: bool
    ) -> None:
        shape = (4, 3, 5)  # K-dimensional, classes on axis 1
        x = rng.normal(size=shape) * 2 if from_logits else rng.uniform(0.1, 1.0, size=shape)
        t = rng.integers(0, 3, size=(4, 5))
        ignored = rng.uniform(size=t.shape) < 0.4
        ignored[0, 0], ignored[0, 1] = True, False
        t = np.where(ignored, 7, t)
        o: dict[str, Any] = {
            "axis": 1, "ignore_index": 7, "label_smoothing": 0.2, "from_logits": from_logits,
            "weight": rng.uniform(0.5, 2.0, size=3), "sample_weight": rng.uniform(0.5, 2.0, size=(4, 5)),
        }  # fmt: skip
        if from_logits:
            o.update(z_loss=0.1, softcap=3.0)
        _, grad = xent.cross_entropy_and_grad(
            to_xp(xp, x),
            to_xp(xp, t),
            **{k: to_xp(xp, v) if isinstance(v, np.ndarray) else v for k, v in o.items()},
        )
        g = np.moveaxis(to_numpy(grad), 1, -1)
        assert np.all(g[ignored] == 0.0), g[ignored]
        assert np.all(np.any(g[~ignored] != 0.0, axis=-1))
        want = ref.numerical_grad(lambda v: ref.cross_entropy(v, t, **o), x)
        xp_assert_close(
            grad,
            want,
            xp=xp,
            dtype="float64",
            rtol=1e-6,
            atol=1e-7 * max(1.0, float(np.max(np.abs(want), initial=0.0))),
        )

    @pytest.mark.eager("validate=True reads the labels: a Dask compute by design")
    def test_ignore_index_matches_only_its_value(self, xp: Any) -> None:
        x = to_xp(xp, np.zeros((3, 4)))
        t = to_xp(xp, np.asarray([3, 255, 2], dtype=np.uint8))
        loss = xent.cross_entropy(x, t, ignore_index=255, reduction="none")
        xp_assert_close(loss, [np.log(4.0), 0.0, np.log(4.0)], xp=xp, dtype="float64")
        with pytest.raises(ValueError, match="label 255 at position"):
            xent.cross_entropy(x, t, ignore_index=-1, validate=True)

    @pytest.mark.parametrize("func", ["cross_entropy", "cross_entropy_and_grad"])
    def test_non_default_ignore_index_is_rejected(self, xp: Any, func: str) -> None:
        x = to_xp(xp, np.zeros((2, 3)))
        t = to_xp(xp, np.full((2, 3), 1 / 3))
        with pytest.raises(ValueError, match="`ignore_index` applies to class-index targets"):
            getattr(xent, func)(x, t, ignore_index=0)
        assert np.isfinite(to_numpy(xent.cross_entropy(x, t, ignore_index=-100)))

    @pytest.mark.parametrize("value", [None, 0.5, "x", -100.0])
    def test_ignore_index_takes_integers_only(self, xp: Any, value: Any) -> None:
        x = to_xp(xp, np.zeros((2, 3)))
        with pytest.raises(TypeError, match=r"`ignore_index` must be an integer .*, got"):
            xent.cross_entropy(x, to_xp(xp, np.asarray([0, 1])), ignore_index=value)


# --- cross_entropy_and_grad -------------------------------------------------------------------

GRAD_OPTIONS = {
    "plain": {},
    "weighted-smoothed-ignored": {"weight": True, "label_smoothing": 0.2, "ignore": True},
    "sample-weight-sum": {"sample_weight": True, "reduction": "sum"},
    "z-loss-softcap-none": {"z_loss": 0.1, "softcap": 3.0, "reduction": "none"},
    "everything": {
        "weight": True,
        "sample_weight": True,
        "label_smoothing": 0.1,
        "ignore": True,
        "z_loss": 0.01,
        "softcap": 4.0,
    },
}


class TestAndGrad:
    """`cross_entropy_and_grad` returns the loss and its gradient, in the input dtype."""

    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    @pytest.mark.parametrize("option_set", list(GRAD_OPTIONS))
    @pytest.mark.parametrize("axis", [-1, 1])
    def test_and_grad_returns_the_loss_and_its_gradient(
        self, xp: Any, rng: np.random.Generator, probabilities: bool, option_set: str, axis: int
    ) -> None:
        spec = GRAD_OPTIONS[option_set]
        x = rng.normal(size=(4, 5, 3)) * 2
        n_classes = x.shape[axis]
        batch = tuple(np.delete(x.shape, axis % 3))
        if probabilities:
            t = _softmax_rows(rng, x.shape, axis)
        else:
            t = rng.integers(0, n_classes, size=batch)
            if spec.get("ignore"):
                t[0, 0] = t[2, 1] = -100
        opts: dict[str, Any] = {"axis": axis, "reduction": spec.get("reduction", "mean")}
        for name in ("label_smoothing", "z_loss", "softcap"):
            if name in spec:
                opts[name] = spec[name]
        np_opts = dict(opts)
        xp_opts = dict(opts)
        if spec.get("weight"):
            np_opts["weight"] = rng.uniform(0.5, 2.0, size=n_classes)
            xp_opts["weight"] = to_xp(xp, np_opts["weight"])
        if spec.get("sample_weight"):
            np_opts["sample_weight"] = rng.uniform(0.5, 2.0, size=batch)
            xp_opts["sample_weight"] = to_xp(xp, np_opts["sample_weight"])

        loss, grad = xent.cross_entropy_and_grad(to_xp(xp, x), to_xp(xp, t), **xp_opts)
        want_loss = ref.cross_entropy(x, t, **np_opts)
        want_grad = ref.numerical_grad(lambda v: ref.cross_entropy(v, t, **np_opts), x)
        xp_assert_close(loss, want_loss, xp=xp, dtype="float64")
        xp_assert_close(grad, want_grad, xp=xp, dtype="float64", rtol=1e-6, atol=1e-8)
        xp_assert_close(
            loss,
            to_numpy(xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), **xp_opts)),
            xp=xp,
            dtype="float64",
        )

    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    def test_and_grad_from_probabilities_matches_finite_differences(
        self, xp: Any, rng: np.random.Generator, probabilities: bool
    ) -> None:
        p = rng.uniform(0.2, 1.0, size=(4, 3))  # away from the clip bounds
        t = _softmax_rows(rng, p.shape) if probabilities else np.array([0, 2, 1, 1])
        w = rng.uniform(0.5, 2.0, size=3)
        kw = {"from_logits": False, "label_smoothing": 0.1}
        loss, grad = xent.cross_entropy_and_grad(
            to_xp(xp, p), to_xp(xp, t), weight=to_xp(xp, w), **kw
        )
        xp_assert_close(loss, ref.cross_entropy(p, t, weight=w, **kw), xp=xp, dtype="float64")
        want = ref.numerical_grad(lambda v: ref.cross_entropy(v, t, weight=w, **kw), p)
        xp_assert_close(grad, want, xp=xp, dtype="float64", rtol=1e-6, atol=1e-8)

    @pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
    def test_and_grad_returns_gradient_in_input_dtype(
        self, xp: Any, rng: np.random.Generator, dtype: str
    ) -> None:
        x_xp = to_xp(xp, rng.normal(size=(6, 10)), dtype=dtype)
        t = rng.integers(0, 10, size=6)
        loss, grad = xent.cross_entropy_and_grad(x_xp, to_xp(xp, t))
        x64 = to_numpy(x_xp)
        want = ref.numerical_grad(lambda v: ref.cross_entropy(v, t), x64)
        # float32 computes in float32 (a few eps); float16/bfloat16 round a float32 result once
        rtol, atol = {"float32": (2e-5, 1e-7), "float16": (dtype_eps(dtype), 1e-7)}.get(
            dtype, (dtype_eps(dtype), 1e-30)
        )
        xp_assert_close(loss, ref.cross_entropy(x64, t), xp=xp, dtype=dtype, rtol=rtol, atol=atol)
        xp_assert_close(grad, want, xp=xp, dtype=dtype, rtol=rtol, atol=atol)

    def test_and_grad_invalid_label_gives_nan_gradient_row(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        x = rng.normal(size=(3, 4))
        t = np.array([0, 4, 1])
        loss, grad = xent.cross_entropy_and_grad(
            to_xp(xp, x), to_xp(xp, t), reduction="none", validate=False
        )
        got_loss, g = to_numpy(loss), to_numpy(grad)
        assert np.isnan(got_loss[1])
        assert np.all(np.isfinite(got_loss[[0, 2]]))
        assert np.all(np.isnan(g[1]))
        assert np.all(np.isfinite(g[[0, 2]]))


class TestState:
    """`xent.state()` names the backend that runs."""

    def test_state_names_the_running_backend(self, xp: Any, backend: Backend) -> None:
        # guards the fixture itself: the namespace, the device and the native switch are what the
        # test id says
        state = current()
        assert state.backend is backend
        assert state.xp is xp
        assert is_lazy() == (backend is Backend.DASK)
        arr = to_xp(xp, np.zeros((3, 5)))
        if backend is Backend.NUMPY_READONLY:
            assert not arr.flags.writeable
        if backend is Backend.DASK:
            assert len(arr.chunks[0]) > 1
            assert len(arr.chunks[1]) > 1
        if backend.like(Backend.JAX):
            assert to_xp(xp, np.zeros(2)).dtype == xp.float64, "jax_enable_x64 is off"


# --- adversarial inputs ---------------------------------------------------------------------


def _finite_max(a: np.ndarray, axis: Any = None, keepdims: bool = False) -> Any:
    return np.max(np.where(np.isfinite(a), np.abs(a), 0.0), axis=axis, keepdims=keepdims)


@st.composite
def adversarial_cases(draw: Any, *, probabilities: bool) -> dict[str, Any]:
    """A hostile but valid problem: any float dtype and label width, views, size-1 and empty
    axes, logits near the dtype's max, `-inf` masks, NaN rows, ignored rows, every option."""
    rng = np.random.default_rng(draw(adv.seeds()))
    if current().backend.like(Backend.JAX):  # few shapes: eager JAX compiles each one
        batch = draw(st.sampled_from([(4,), (0, 3)]))
        n_classes = 3
    else:
        batch = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
        n_classes = draw(st.integers(1, 5))
    pos = draw(st.integers(0, len(batch)))
    shape = (*batch[:pos], n_classes, *batch[pos:])
    axis = pos if draw(st.booleans()) else pos - len(shape)
    dtype = draw(st.sampled_from(adv.float_dtypes()))
    from_logits = draw(st.sampled_from([True, True, True, False]))
    extremes = draw(st.booleans())
    # Huge logits: 1/256 of the dtype's max, so that no sum of at most 27 weighted terms
    # overflows where the float64 reference does not.
    top = float(np.finfo(np.float32 if dtype == "bfloat16" else dtype).max)
    # The rows are written into a contiguous array with the class axis last (its reshape is a
    # view), which is then moved to `axis`.
    moved = np.empty((*(n for i, n in enumerate(shape) if i != axis % len(shape)), n_classes))
    rows = moved.reshape(-1, n_classes)
    for row in rows:
        if from_logits:
            row[:] = rng.normal(size=n_classes) * draw(st.sampled_from([1.0, 30.0]))
        else:
            row[:] = rng.uniform(0.0, 2.0, size=n_classes) * (rng.uniform(size=n_classes) > 0.2)
            row[0] += 0.25
        kind = draw(st.sampled_from(["plain", "huge", "masked", "all_masked", "nan"]))
        if not extremes or kind == "plain":
            continue
        j = rng.integers(n_classes)
        if kind == "huge":
            row[j] = top / 256 if not from_logits else rng.choice([-1.0, 1.0]) * top / 256
        elif kind == "nan":
            row[j] = np.nan
        elif from_logits and kind == "masked":
            row[rng.uniform(size=n_classes) < 0.5] = -np.inf
        elif from_logits:
            row[:] = -np.inf
        else:
            row[:] = 0.0  # renormalising an all-zero row is 0 / 0: NaN
    x = np.ascontiguousarray(np.moveaxis(moved, -1, axis))
    opts: dict[str, Any] = {
        "axis": axis,
        "from_logits": from_logits,
        "label_smoothing": draw(st.sampled_from([0.0, 0.1, 1.0])),
        "reduction": draw(st.sampled_from(REDUCTIONS)),
    }
    if from_logits:
        opts["z_loss"] = draw(st.sampled_from([0.0, 1e-3]))
        opts["softcap"] = draw(st.sampled_from([None, 4.0, float(np.finfo(np.float32).max) / 4]))
    if draw(st.booleans()):
        opts["weight"] = rng.uniform(0.5, 2.0, size=n_classes)
    sw = draw(st.sampled_from(["none", "full", "broadcast"]))
    if sw == "full":
        opts["sample_weight"] = rng.uniform(0.5, 2.0, size=batch)
    elif sw == "broadcast" and batch:
        opts["sample_weight"] = rng.uniform(0.5, 2.0, size=batch[-1:])
    if probabilities:
        t = _softmax_rows(rng, shape, axis)
        target_dtype = draw(st.sampled_from(adv.float_dtypes()))
    else:
        target_dtype = draw(st.sampled_from(adv.label_dtypes()))
        info = np.iinfo(target_dtype)
        ignore = draw(st.sampled_from([-100, -1, 0, n_classes - 1, int(info.max)]))
        t = rng.integers(0, n_classes, size=batch).astype(target_dtype)
        if info.min <= ignore <= info.max:
            share = draw(st.sampled_from([0.0, 0.3, 1.0]))  # 1.0: every row ignored
            t[rng.uniform(size=batch) < share] = ignore
        opts["ignore_index"] = ignore
    return {
        "x": x, "t": t, "dtype": dtype, "target_dtype": target_dtype, "opts": opts,
        "layout": draw(st.sampled_from(adv.layouts())),
    }  # fmt: skip


def _out_dtype(dtype: str) -> str:
    return {">f4": "float32", ">f8": "float64"}.get(dtype, dtype)


class TestAdversarialInputs:
    """Value and `cross_entropy_and_grad` gradient against the float64 reference."""

    def _check(self, xp: Any, case: dict[str, Any]) -> None:
        opts = dict(case["opts"])
        x = adv.place(xp, case["x"], dtype=case["dtype"], layout=case["layout"])
        if np.issubdtype(case["t"].dtype, np.integer):
            t = to_xp(xp, case["t"])
        else:
            t = adv.place(xp, case["t"], dtype=case["target_dtype"], layout=case["layout"])
        for name in ("weight", "sample_weight"):
            if name in opts:
                opts[name] = to_xp(xp, opts[name])
        loss = xent.cross_entropy(x, t, **opts)
        and_loss, grad = xent.cross_entropy_and_grad(x, t, **opts)

        ref_opts = dict(case["opts"], clip_dtype=adv.compute_dtype(case["dtype"]))
        xr = adv.reference_input(x)
        tr = to_numpy(t) if np.issubdtype(case["t"].dtype, np.integer) else adv.reference_input(t)
        want = ref.cross_entropy(xr, tr, **ref_opts)
        want_grad = ref.cross_entropy_grad(xr, tr, **ref_opts)

        eps = adv.compute_eps(case["dtype"])
        axis = case["opts"]["axis"]
        # The loss's rounding error scales with the logits' size (times the classes, for the
        # smoothing sum, and squared for z_loss); weights and sample weights are at most 2.
        with np.errstate(over="ignore"):
            if case["opts"]["from_logits"]:
                size = 1.0 + _finite_max(xr, axis=axis)
            else:
                size = np.full(np.sum(xr, axis=axis).shape, 20.0)  # -log(eps) and the clip
            z = case["opts"].get("z_loss", 0.0)
            size = size * (xr.shape[axis] + 1) + (z * size**2 if z else 0.0)
            if case["opts"]["reduction"] != "none":
                size = np.sum(size) if size.size else 0.0
            atol = 256 * eps * (1.0 + size)
            grad_atol = 64 * eps * (1.0 + (_finite_max(want_grad) if want_grad.size else 0.0))
        out = _out_dtype(case["dtype"])
        adv.assert_matches(loss, want, dtype=out, atol=atol, what="loss", case=case)
        adv.assert_matches(and_loss, want, dtype=out, atol=atol, what="and_grad loss", case=case)
        adv.assert_matches(grad, want_grad, dtype=out, atol=grad_atol, what="grad", case=case)

    @pytest.mark.parametrize(
        ("rows", "softcap", "reduction"),
        [
            # Logits at the dtype's max of both signs: each gap `lse - x` of the smoothing sum
            # overflows, its share (e / C) w (lse - x) does not.
            ([[1.0, -1.0, 0.0, 0.5], [-1.0, 1.0, 1.0, -1.0]], None, "mean"),
            ([[1.0, -1.0, 0.0, 0.5], [-1.0, 1.0, 1.0, -1.0]], None, "none"),
            # A softcap near the max, where a masked class becomes -softcap: the class-weighted
            # sum overflows before it is scaled (found by the property below, strict backend).
            ([[0.3, -np.inf, 0.2, 0.8], [2.0, -np.inf, -np.inf, -np.inf]], 0.25, "mean"),
            ([[0.3, -np.inf, 0.2, 0.8], [2.0, -np.inf, -np.inf, -np.inf]], 0.25, "none"),
        ],
    )
    def test_smoothing_share_stays_finite_where_the_loss_is(
        self, xp: Any, rows: list[list[float]], softcap: float | None, reduction: str
    ) -> None:
        big = float(np.finfo(np.float32).max)
        x = np.asarray(rows) * (big if softcap is None else 1.0)
        case = {
            "x": x, "t": np.asarray([0, 2], dtype=np.int64), "dtype": "float32",
            "target_dtype": "int64", "layout": "contiguous",
            "opts": {
                "axis": -1, "from_logits": True, "label_smoothing": 0.1, "reduction": reduction,
                "z_loss": 0.0, "softcap": None if softcap is None else softcap * big,
                "weight": np.asarray([1.39, 0.89, 1.76, 1.26]), "ignore_index": -100,
            },
        }  # fmt: skip
        want = ref.cross_entropy(adv.reference_input(to_xp(xp, x, dtype="float32")),
                                 case["t"], **dict(case["opts"], clip_dtype=np.float32))  # fmt: skip
        assert np.all(np.isfinite(want))
        assert np.all(np.abs(want) < big)
        self._check(xp, case)

    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    def test_matches_reference(self, xp: Any, probabilities: bool) -> None:
        @adv.settings()
        @given(case=adversarial_cases(probabilities=probabilities))
        def check(case: dict[str, Any]) -> None:
            self._check(xp, case)

        check()


# --------------------------------------------------------------------------- issue 7 classes
class TestLabelsNeverWrap:
    """Labels are checked in their own dtype: an unsigned value that the cast to the index
    dtype would wrap onto ``ignore_index`` (or a class) is invalid, never ignored."""

    @pytest.mark.eager("validate=True reads the labels: a Dask compute by design")
    @pytest.mark.parametrize(("dtype", "bits"), [("uint64", 64), ("uint32", 32), ("int64", 64)])
    def test_wrapping_values_are_invalid(self, xp: Any, dtype: str, bits: int) -> None:
        value = 2**bits - 100 if dtype.startswith("u") else 2**63 - 100
        x = to_xp(xp, np.zeros((2, 3)))
        t = to_xp(xp, np.asarray([1, value], dtype=dtype))
        with pytest.raises(ValueError, match=f"label {value} at position"):
            xent.cross_entropy(x, t, validate=True)
        loss = xent.cross_entropy(x, t, validate=False, reduction="none")
        xp_assert_close(loss, [np.log(3.0), np.nan], xp=xp, dtype="float64")
        _, grad = xent.cross_entropy_and_grad(x, t, validate=False)
        assert np.isnan(to_numpy(grad)[1]).all()
        assert np.isfinite(to_numpy(grad)[0]).all()


class TestDtypeByKindAndWidth:
    """Compute dtypes follow the input's kind and width, not dtype identity: big-endian and
    extended-precision (``longdouble``) floats compute in float64 and return their own dtype."""

    @pytest.mark.only_backends(Backend.NUMPY, Backend.NUMPY_READONLY)
    @pytest.mark.parametrize("dtype", [">f8", "<f8", np.longdouble, ">f4"])
    def test_every_function_keeps_the_precision(self, xp: Any, dtype: Any) -> None:
        x64 = np.asarray([[1000.0, 0.001, 0.002], [0.5, 0.25, 0.125]])
        t = np.asarray([1, 0])
        x = x64.astype(dtype)
        wide = np.dtype(dtype).itemsize > 4
        rtol = 1e-12 if wide else 1e-5
        want = ref.cross_entropy(x64.astype(np.dtype(dtype).newbyteorder("=")), t)
        loss, grad = xent.cross_entropy_and_grad(x, t)
        # 0-d NumPy results are scalars, which always have the native byte order.
        assert loss.dtype == np.dtype(dtype).newbyteorder("=")
        assert grad.dtype == np.dtype(dtype)
        np.testing.assert_allclose(float(loss), want, rtol=rtol)
        np.testing.assert_allclose(float(xent.cross_entropy(x, t)), want, rtol=rtol)
        lse = xent.logsumexp(x)
        assert lse.dtype == np.dtype(dtype)
        np.testing.assert_allclose(
            lse.astype(np.float64)[1], np.log(np.exp(x64[1]).sum()), rtol=rtol
        )
        bce = xent.binary_cross_entropy(x[1], np.asarray([1.0, 0.0, 1.0]), reduction="none")
        assert bce.dtype == np.dtype(dtype)
        # 1000 vs 999.99902: the float32 answer differs in the 7th digit.
        np.testing.assert_allclose(float(xent.log_softmax(x)[0, 1]), -999.999, rtol=rtol)


class TestHugeSoftcap:
    """A softcap too large for ``x / softcap`` or ``softcap * tanh`` in the dtype degrades to
    no cap, for the loss and its gradient, in float32 and float64."""

    @pytest.mark.parametrize(
        ("dtype", "cap"), [("float32", 1e38), ("float32", 3e38), ("float32", 1e300),
                           ("float64", 1e300), ("float64", 1e200), ("float32", 1e10)]
    )  # fmt: skip
    def test_matches_no_cap(self, xp: Any, dtype: str, cap: float) -> None:
        x_np = np.asarray([[1.0, 2.0, 3.0], [-0.5, 0.25, 4.0]])
        t = to_xp(xp, np.asarray([2, 0]))
        x = to_xp(xp, x_np, dtype=dtype)
        want_loss, want_grad = xent.cross_entropy_and_grad(to_xp(xp, x_np), t, reduction="none")
        loss, grad = xent.cross_entropy_and_grad(x, t, softcap=cap, reduction="none")
        xp_assert_close(loss, to_numpy(want_loss), xp=xp, dtype=dtype)
        xp_assert_close(grad, to_numpy(want_grad), xp=xp, dtype=dtype)
        xp_assert_close(
            xent.cross_entropy(x, t, softcap=cap, reduction="none"), to_numpy(want_loss),
            xp=xp, dtype=dtype,
        )  # fmt: skip

    def test_infinite_logits_go_to_the_cap(self, xp: Any) -> None:
        x = to_xp(xp, np.asarray([[-np.inf, 0.0, 1.0]]), dtype="float32")
        loss = xent.cross_entropy(x, to_xp(xp, np.asarray([2])), softcap=1e38)
        assert np.isfinite(to_numpy(loss)).all()


class TestNonFiniteRows:
    """One answer per backend and switch position: a row holding +inf computes
    ``exp(x - logsumexp)`` entry by entry (0 at finite logits, NaN at +inf); an ignored row has
    loss 0 and gradient ``0 * softmax`` (NaN where its logits are NaN)."""

    def test_plus_inf_row(self, xp: Any) -> None:
        x = to_xp(xp, np.asarray([[1.0, np.inf, 0.0], [1.0, 2.0, 3.0]]))
        p = to_numpy(xent.softmax(x))
        np.testing.assert_array_equal(p[0], [0.0, np.nan, 0.0])
        lp = to_numpy(xent.log_softmax(x))
        np.testing.assert_array_equal(lp[0], [-np.inf, np.nan, -np.inf])
        assert to_numpy(xent.logsumexp(x))[0] == np.inf
        loss, grad = xent.cross_entropy_and_grad(x, to_xp(xp, np.asarray([0, 1])), reduction="none")
        assert to_numpy(loss)[0] == np.inf
        np.testing.assert_array_equal(to_numpy(grad)[0], [-1.0, np.nan, 0.0])

    def test_ignored_row_holding_nan(self, xp: Any) -> None:
        x = to_xp(xp, np.asarray([[np.nan, 1.0, 0.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))
        t = to_xp(xp, np.asarray([-100, 1, -100]))
        loss, grad = xent.cross_entropy_and_grad(x, t, reduction="none")
        np.testing.assert_array_equal(to_numpy(loss)[[0, 2]], [0.0, 0.0])
        assert np.isnan(to_numpy(grad)[0]).all()
        np.testing.assert_array_equal(to_numpy(grad)[2], [0.0, 0.0, 0.0])

    def test_float16_overflow_is_inf_without_warning(self, xp: Any) -> None:
        import warnings

        x = to_xp(xp, np.asarray([[-60000.0, 60000.0]] * 2), dtype="float16")
        t = to_xp(xp, np.asarray([0, 0]))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss = to_numpy(xent.cross_entropy(x, t, reduction="sum"))
            z = to_xp(xp, np.asarray([-60000.0, 60000.0]), dtype="float16")
            bce = to_numpy(xent.binary_cross_entropy(z, z < 0, reduction="sum"))
        assert loss == np.inf
        assert bce == np.inf


@pytest.mark.only_backends(Backend.DASK)
class TestUnknownChunkSizes:
    """Dask arrays whose sizes are unknown until computed (boolean indexing) are accepted where
    the shapes can match; the loss, its mean and gradient are those of the known arrays."""

    @pytest.mark.parametrize("kind", ["index", "prob"])
    def test_boolean_indexed_rows(self, xp: Any, kind: str, rng: np.random.Generator) -> None:
        x_np = rng.normal(size=(12, 5))
        keep = rng.random(12) > 0.4
        t_np = rng.integers(0, 5, size=12) if kind == "index" else _probs(rng, (12, 5))
        x, t, m = to_xp(xp, x_np), to_xp(xp, t_np), to_xp(xp, keep)
        loss, grad = xent.cross_entropy_and_grad(x[m], t[m])
        want_loss, want_grad = xent.cross_entropy_and_grad(
            to_xp(xp, x_np[keep]), to_xp(xp, t_np[keep])
        )
        np.testing.assert_allclose(to_numpy(loss), to_numpy(want_loss), rtol=1e-12)
        np.testing.assert_allclose(to_numpy(grad), to_numpy(want_grad), rtol=1e-12)
        bce = xent.binary_cross_entropy(
            x[m][:, 0], t[m][:, 0] if kind == "prob" else x[m][:, 1] > 0
        )
        want = xent.binary_cross_entropy(
            to_xp(xp, x_np[keep][:, 0]),
            to_xp(xp, t_np[keep][:, 0] if kind == "prob" else x_np[keep][:, 1] > 0),
        )
        np.testing.assert_allclose(to_numpy(bce), to_numpy(want), rtol=1e-12)


def _probs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    z = rng.random(shape)
    return z / z.sum(axis=-1, keepdims=True)
