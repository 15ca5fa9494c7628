"""Optax's own cross-entropy tests, ported: xent on every backend against the literal values of
`optax/losses/_classification_test.py` (`SoftmaxCrossEntropyTest`,
`SafeSoftmaxCrossEntropyTest`, `SoftmaxCrossEntropyWithIntegerLabelsTest`,
`SigmoidCrossEntropyTest`) and against live Optax (run on NumPy copies).

Optax masks with `where=`; xent has no such argument, so the masked cases use what xent offers
for the same question: a `-inf` logit is a masked class (with target 0 it drops out), and a
per-example weight of 0 drops an example.

Differences by design, asserted as xent documents them:
- A row whose classes are all masked: Optax's `where=` gives 0; xent's all-`-inf` row gives NaN
  (an example with nothing to predict has no loss; drop it with `sample_weight=0`, which gives 0).
- One class axis: Optax's integer-label loss takes a tuple of axes; xent takes one axis, so the
  classes are flattened into one axis first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _helpers import to_numpy, to_xp, xp_assert_close
from _peers import AUTODIFF, autodiff_grad
from _reference import numerical_grad

import xent

YS = np.array([[10.0, 1.0, -2.0], [1.0, 4.0, 0.2]], dtype=np.float32)
TS = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
EXP = np.array([9.00013, 3.0696733], dtype=np.float32)
INT_TS = np.array([1, 0], dtype=np.int32)
# Optax compares with atol=1e-4
OPTAX_TOL = {"rtol": 0.0, "atol": 1e-4}


@pytest.fixture(scope="module")
def optax() -> Any:
    jax = pytest.importorskip("jax", reason="live Optax runs on JAX")
    jax.config.update("jax_enable_x64", True)
    return pytest.importorskip("optax", reason="the live reference values come from Optax")


def _log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


# --- SoftmaxCrossEntropyTest ------------------------------------------------------------------


@pytest.mark.parametrize("target", ["probabilities", "integer"])
def test_scalar(xp: Any, target: str) -> None:
    """`SoftmaxCrossEntropyTest.test_scalar` and
    `SoftmaxCrossEntropyWithIntegerLabelsTest.test_consistent_with_softmax_cross_entropy_scalar`:
    one example (a 1-D input) gives a 0-d loss of 9.00013."""
    t = TS[0] if target == "probabilities" else INT_TS[0]
    got = xent.cross_entropy(to_xp(xp, YS[0]), to_xp(xp, np.asarray(t)), reduction="none")
    xp_assert_close(got, EXP[0], xp=xp, dtype="float32", **OPTAX_TOL)


@pytest.mark.parametrize("target", ["probabilities", "integer"])
def test_batched(xp: Any, target: str) -> None:
    """`SoftmaxCrossEntropyTest.test_batched` and
    `SoftmaxCrossEntropyWithIntegerLabelsTest.test_consistent_with_softmax_cross_entropy_batched`:
    [9.00013, 3.0696733]."""
    t = TS if target == "probabilities" else INT_TS
    got = xent.cross_entropy(to_xp(xp, YS), to_xp(xp, t), reduction="none")
    xp_assert_close(got, EXP, xp=xp, dtype="float32", **OPTAX_TOL)


@pytest.mark.parametrize("target", ["probabilities", "integer"])
def test_per_logit_mask(xp: Any, target: str) -> None:
    """`SoftmaxCrossEntropyTest.test_per_logit_mask` (and the integer-label one): mask
    [[1, 0, 0], [0, 0, 0]] as `-inf` logits. Optax gives 0 for the fully masked second row;
    xent's all-`-inf` row gives NaN (by design); with class indices, labelling the row
    `ignore_index` gives Optax's loss of 0. Its gradient is `0 * softmax(row)`, NaN for a row
    whose softmax is NaN, as PyTorch's `F.cross_entropy` gives it (Optax's `where=` gives 0)."""
    where = np.array([[1, 0, 0], [0, 0, 0]], dtype=bool)
    x = np.where(where, YS, -np.inf).astype(np.float32)
    t = TS if target == "probabilities" else INT_TS
    got = to_numpy(xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="none"))
    assert np.isnan(got[1])
    if target == "integer":
        ignored = np.array([0, -100], dtype=np.int32)
        loss, grad = xent.cross_entropy_and_grad(to_xp(xp, x), to_xp(xp, ignored), reduction="none")
        xp_assert_close(loss, [0.0, 0.0], xp=xp, dtype="float32", rtol=0, atol=0)
        want = np.array([[0.0, 0.0, 0.0], [np.nan, np.nan, np.nan]])
        xp_assert_close(grad, want, xp=xp, dtype="float32", rtol=0, atol=0)


@pytest.mark.parametrize("target", ["probabilities", "integer"])
def test_gradient(xp: Any, target: str) -> None:
    """`SoftmaxCrossEntropyTest.test_gradient` / `SoftmaxCrossEntropyWithIntegerLabelsTest.
    test_gradient`: `check_grads` with respect to the logits (finite differences, float64), and
    finite gradients where an example is masked out (`where=[True, False]`; here
    `sample_weight=[1, 0]`)."""
    x = YS.astype(np.float64)
    t = TS.astype(np.float64) if target == "probabilities" else INT_TS
    _, grad = xent.cross_entropy_and_grad(to_xp(xp, x), to_xp(xp, t), reduction="none")

    def loss(a: np.ndarray) -> Any:
        return to_numpy(xent.cross_entropy(to_xp(xp, a), to_xp(xp, t), reduction="none"))

    xp_assert_close(grad, numerical_grad(loss, x), xp=xp, dtype="float64", rtol=1e-6, atol=1e-7)
    _, masked = xent.cross_entropy_and_grad(
        to_xp(xp, x), to_xp(xp, t), sample_weight=to_xp(xp, np.array([1.0, 0.0]))
    )
    assert np.isfinite(to_numpy(masked)).all()
    np.testing.assert_array_equal(to_numpy(masked)[1], 0.0)


@pytest.mark.only_backends(*AUTODIFF)
def test_gradient_with_respect_to_labels(xp: Any) -> None:
    """`SoftmaxCrossEntropyTest.test_gradient`: `check_grads(softmax_cross_entropy, (ys, ts))`
    differentiates the labels too: d loss / d labels = -log_softmax(ys), also where a label is
    0."""
    x = YS.astype(np.float64)
    t = TS.astype(np.float64)

    def loss(a: Any, b: Any) -> Any:
        return xent.cross_entropy(a, b, reduction="none")

    got = autodiff_grad(xp, loss, [x, t], wrt=1)
    np.testing.assert_allclose(got, -_log_softmax(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [5, 10])
def test_mask(xp: Any, size: int) -> None:
    """`SoftmaxCrossEntropyTest.test_mask`: dropping classes equals masking them (Optax's
    `where=`; here a `-inf` logit with target 0)."""
    rng = np.random.default_rng(size)
    preds = rng.normal(size=size)
    targets = rng.dirichlet(np.ones(size))
    mask = rng.integers(0, 2, size=size).astype(bool)
    mask[0] = True
    kept = xent.cross_entropy(to_xp(xp, preds[mask]), to_xp(xp, targets[mask]), reduction="none")
    masked = xent.cross_entropy(
        to_xp(xp, np.where(mask, preds, -np.inf)),
        to_xp(xp, np.where(mask, targets, 0.0)),
        reduction="none",
    )
    xp_assert_close(masked, to_numpy(kept), xp=xp, dtype="float64")


@pytest.mark.parametrize("target", ["probabilities", "integer"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_axis(xp: Any, rng: np.random.Generator, axis: int, target: str) -> None:
    """`SoftmaxCrossEntropyTest.test_axis` and `SoftmaxCrossEntropyWithIntegerLabelsTest.
    test_axis`: shape (4, 5, 6), class axis 0, 1 or 2 equals moving it last."""
    shape = (4, 5, 6)
    preds = rng.normal(size=shape)
    if target == "probabilities":
        targets = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])
        moved = np.moveaxis(targets, axis, -1)
    else:
        targets = rng.integers(0, shape[axis], size=shape[:axis] + shape[axis + 1 :])
        moved = targets
    got = xent.cross_entropy(to_xp(xp, preds), to_xp(xp, targets), axis=axis, reduction="none")
    want = xent.cross_entropy(
        to_xp(xp, np.moveaxis(preds, axis, -1)), to_xp(xp, moved), reduction="none"
    )
    xp_assert_close(got, to_numpy(want), xp=xp, dtype="float64")


# --- SafeSoftmaxCrossEntropyTest --------------------------------------------------------------

SAFE_YS = np.array(
    [
        [10.0, 1.0, -2.0],
        [1.0, 4.0, 0.2],
        [-np.inf, 0.0, 0.0],
        [-np.inf, 0.0, 0.0],
        [-np.inf, 0.0, -np.inf],
    ],
    dtype=np.float32,
)
SAFE_TS = np.array(
    [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.4, 0.3, 0.3], [0.0, 1.0, 0.0]],
    dtype=np.float32,
)
SAFE_EXP = np.array([9.00013, 3.0696733, 0.693147, np.inf, 0.0], dtype=np.float32)


def test_safe_batched(xp: Any) -> None:
    """`SafeSoftmaxCrossEntropyTest.test_batched`: `-inf` logits with target 0 drop out, with
    target mass they give `+inf` (xent's `-inf` semantics are Optax's safe ones)."""
    got = xent.cross_entropy(to_xp(xp, SAFE_YS), to_xp(xp, SAFE_TS), reduction="none")
    xp_assert_close(got, SAFE_EXP, xp=xp, dtype="float32", **OPTAX_TOL)


def test_safe_gradient_and_plain_implementation(xp: Any) -> None:
    """`SafeSoftmaxCrossEntropyTest.test_gradient` and `test_against_plain_implementation`: on
    finite rows the gradient is softmax - target; on the row with a `-inf` logit and target 0,
    the masked class gets gradient 0."""
    x = SAFE_YS.astype(np.float64)[[0, 1, 2, 4]]
    t = SAFE_TS.astype(np.float64)[[0, 1, 2, 4]]
    _, grad = xent.cross_entropy_and_grad(to_xp(xp, x), to_xp(xp, t), reduction="none")
    p = np.exp(_log_softmax(x))
    xp_assert_close(grad, p - t, xp=xp, dtype="float64")


# --- SoftmaxCrossEntropyWithIntegerLabelsTest.test_axes ---------------------------------------

AXES = [(1, 3), (3, 2), (2, 3), (-3, -1), (-1, -2), (-2, -1), (0, 1, 3), (-4, -3, -1)]


@pytest.mark.parametrize("axes", AXES, ids=str)
def test_axes_matches_optax(xp: Any, optax: Any, axes: tuple[int, ...]) -> None:
    """`SoftmaxCrossEntropyWithIntegerLabelsTest.test_axes`: classes spread over several axes of a
    (2, 3, 4, 5) input. xent takes one class axis (by design): the class axes are moved last and
    flattened, which must give Optax's multi-axis value."""
    shape = (2, 3, 4, 5)
    ndim = len(shape)
    logits_axis = tuple((a + ndim) % ndim for a in axes)
    labels_axis = tuple(a for a in range(ndim) if a not in logits_axis)
    n_classes = int(np.prod([shape[a] for a in logits_axis]))
    rng = np.random.default_rng(sum(logits_axis))
    x = rng.uniform(size=shape)
    t = rng.integers(0, n_classes - 1, size=tuple(shape[a] for a in labels_axis))
    want = np.asarray(optax.losses.softmax_cross_entropy_with_integer_labels(x, t, axes))
    flat = np.transpose(x, labels_axis + logits_axis).reshape(*t.shape, n_classes)
    got = xent.cross_entropy(to_xp(xp, flat), to_xp(xp, t), reduction="none")
    xp_assert_close(got, want, xp=xp, dtype="float64")


# --- SigmoidCrossEntropyTest ------------------------------------------------------------------

SIGMOID_CASES = [
    ([-1e09, -1e-09], [1.0, 0.0], 5e08),
    ([-1e09, -1e-09], [0.0, 1.0], 0.3465736),
    ([1e09, 1e-09], [1.0, 0.0], 0.3465736),
    ([1e09, 1e-09], [0.0, 1.0], 5e08),
    ([-1e09, 1e-09], [1.0, 0.0], 5e08),
    ([-1e09, 1e-09], [0.0, 1.0], 0.3465736),
    ([1e09, -1e-09], [1.0, 0.0], 0.3465736),
    ([1e09, -1e-09], [0.0, 1.0], 5e08),
    ([0.0, 0.0], [1.0, 0.0], 0.6931472),
    ([0.0, 0.0], [0.0, 1.0], 0.6931472),
]


@pytest.mark.parametrize(("preds", "labels", "expected"), SIGMOID_CASES)
def test_sigmoid_cross_entropy(
    xp: Any, preds: list[float], labels: list[float], expected: float
) -> None:
    """`SigmoidCrossEntropyTest.test_sigmoid_cross_entropy`: logits of +-1e9 and +-1e-9, the mean
    of `sigmoid_binary_cross_entropy` (rtol = atol = 1e-6)."""
    got = xent.binary_cross_entropy(to_xp(xp, np.array(preds)), to_xp(xp, np.array(labels)))
    xp_assert_close(got, expected, xp=xp, dtype="float64", rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("preds", "labels", "expected"), SIGMOID_CASES[:4] + SIGMOID_CASES[8:])
def test_sigmoid_cross_entropy_gradient(
    xp: Any, preds: list[float], labels: list[float], expected: float
) -> None:
    """The same inputs, gradient: `sigmoid(x) - y` per element (finite at +-1e9)."""
    x = np.array(preds)
    y = np.array(labels)
    _, grad = xent.binary_cross_entropy_and_grad(to_xp(xp, x), to_xp(xp, y), reduction="sum")
    sigmoid = 0.5 * (1 + np.tanh(x / 2))
    xp_assert_close(grad, sigmoid - y, xp=xp, dtype="float64")


# --- against live Optax (formerly tests/test_references.py) -----------------------------------


def _tol(dtype: str) -> dict[str, float]:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == "float64" else {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 4)], ids=["N,C", "N,C,d"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_integer_labels_match_optax(
    xp: Any, optax: Any, rng: np.random.Generator, shape: tuple[int, ...], dtype: str
) -> None:
    x = (rng.normal(size=shape) * 3).astype(dtype)
    t = rng.integers(0, shape[1], size=(shape[0], *shape[2:]))
    want = np.asarray(
        optax.softmax_cross_entropy_with_integer_labels(x, t, axis=1), dtype=np.float64
    )
    got = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), axis=1, reduction="none")
    xp_assert_close(got, want, xp=xp, dtype=dtype, **_tol(dtype))
    mean = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), axis=1)
    xp_assert_close(mean, want.mean(), xp=xp, dtype=dtype, **_tol(dtype))


@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 4)], ids=["N,C", "N,C,d"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_probability_targets_match_optax(
    xp: Any, optax: Any, rng: np.random.Generator, shape: tuple[int, ...], dtype: str
) -> None:
    x = (rng.normal(size=shape) * 3).astype(dtype)
    t = np.moveaxis(rng.dirichlet(np.ones(shape[1]), size=(shape[0], *shape[2:])), -1, 1)
    t = t.astype(dtype)
    want = np.asarray(optax.softmax_cross_entropy(x, t, axis=1), dtype=np.float64)
    got = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), axis=1, reduction="none")
    xp_assert_close(got, want, xp=xp, dtype=dtype, **_tol(dtype))


def test_safe_softmax_cross_entropy_matches_optax(xp: Any, optax: Any) -> None:
    """`SafeSoftmaxCrossEntropyTest.test_batched` against live `safe_softmax_cross_entropy`."""
    want = np.asarray(optax.losses.safe_softmax_cross_entropy(SAFE_YS, SAFE_TS))
    got = xent.cross_entropy(to_xp(xp, SAFE_YS), to_xp(xp, SAFE_TS), reduction="none")
    xp_assert_close(got, want, xp=xp, dtype="float32")


def test_smoothed_labels_match_optax(xp: Any, optax: Any, rng: np.random.Generator) -> None:
    x = rng.normal(size=(6, 5)) * 3
    t = rng.integers(0, 5, size=6)
    smoothed = np.asarray(optax.smooth_labels(np.eye(5)[t], 0.3))
    want = np.asarray(optax.softmax_cross_entropy(x, smoothed))
    got = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), label_smoothing=0.3, reduction="none")
    xp_assert_close(got, want, xp=xp, dtype="float64")


def test_binary_matches_optax(xp: Any, optax: Any, rng: np.random.Generator) -> None:
    x = rng.normal(size=(4, 3)) * 3
    t = rng.uniform(size=(4, 3))
    want = np.asarray(optax.sigmoid_binary_cross_entropy(x, t))
    got = xent.binary_cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="none")
    xp_assert_close(got, want, xp=xp, dtype="float64")
