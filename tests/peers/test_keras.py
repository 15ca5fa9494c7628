"""Keras 3's own cross-entropy tests, ported: xent on every backend, against the literal values
of `keras/src/losses/losses_test.py` (classes `BinaryCrossentropyTest`,
`CategoricalCrossentropyTest`, `SparseCategoricalCrossentropyTest`) and against live Keras on
JAX (run once per case on NumPy copies).

Keras computes in float32, so the inputs are float32. Its `assertAlmostEqual` checks 3 decimals
(`|a - b| < 1.5e-3`), its `assertAllClose` `rtol = atol = 1e-6`; the literal values are checked
at that precision, live Keras tighter.

Differences by design, asserted as xent documents them:
- "mean" with `sample_weight`: Keras' `sum_over_batch_size` divides the weighted sum by the
  number of examples; xent's "mean" is the weighted mean (divides by the sum of the weights).
  Keras' value is xent's "sum" divided by N, which the tests check too.
- The target's dtype says what it is: an integer one-hot target is read as class indices (and
  refused for its shape), where Keras casts it to float; pass one-hot targets as floats.
- Class indices have `input.shape` without `axis`; Keras also squeezes a trailing axis of 1
  (`y_true` of shape (N, 1)), which xent refuses.
- `binary_cross_entropy(reduction="none")` is per element; Keras averages the last axis first.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from _helpers import to_numpy, to_xp, xp_assert_close

import xent

REDUCTIONS = ("mean", "sum", "none")
KERAS_REDUCTIONS = {"mean": "sum_over_batch_size", "sum": "sum", "none": None}
# `testing.TestCase.assertAlmostEqual` (3 decimals) and `assertAllClose` (1e-6)
ALMOST = {"rtol": 0.0, "atol": 1.5e-3}
ALL_CLOSE = {"rtol": 1e-6, "atol": 1e-6}


@pytest.fixture(scope="module")
def keras() -> Iterator[Any]:
    pytest.importorskip("jax", reason="live Keras runs on its JAX backend")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_BACKEND", "jax")
        keras = pytest.importorskip("keras", reason="the live reference values come from Keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"keras was imported earlier with the {keras.backend.backend()} backend")
    return keras


def _f32(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _ce(xp: Any, x: Any, t: Any, **kw: Any) -> Any:
    t = np.asarray(t)
    t = t if t.dtype.kind in "iu" else _f32(t)
    if kw.get("sample_weight") is not None:
        kw["sample_weight"] = to_xp(xp, _f32(kw["sample_weight"]))
    return xent.cross_entropy(to_xp(xp, _f32(x)), to_xp(xp, t), **kw)


def _bce(xp: Any, x: Any, t: Any, **kw: Any) -> Any:
    if kw.get("weight") is not None:
        kw["weight"] = to_xp(xp, _f32(kw["weight"]))
    return xent.binary_cross_entropy(to_xp(xp, _f32(x)), to_xp(xp, _f32(t)), **kw)


IDENTITY = np.eye(3)
PROBS = [[0.9, 0.05, 0.05], [0.5, 0.89, 0.6], [0.05, 0.01, 0.94]]
LOGITS = [[8.0, 1.0, 1.0], [0.0, 9.0, 1.0], [2.0, 3.0, 5.0]]
CORRECT_LOGITS = [[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]]
SAMPLE_WEIGHT = np.array([1.2, 3.4, 5.6])

# (input, from_logits, unweighted mean, Keras' mean with sample_weight 2.3, Keras' mean with
# SAMPLE_WEIGHT): `test_unweighted`, `test_scalar_weighted`, `test_sample_weighted` of both
# `CategoricalCrossentropyTest` and `SparseCategoricalCrossentropyTest`.
WEIGHTED_CASES = {
    "probabilities": (PROBS, False, 0.3239, 0.7449, 1.0696),
    "logits": (LOGITS, True, 0.0573, 0.1317, 0.31829),
}


def _target(kind: str) -> np.ndarray:
    return IDENTITY.astype(np.float32) if kind == "categorical" else np.array([0, 1, 2])


KINDS = ["categorical", "sparse"]


# --- CategoricalCrossentropyTest / SparseCategoricalCrossentropyTest --------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_all_correct_unweighted(xp: Any, kind: str) -> None:
    """`(Sparse)CategoricalCrossentropyTest.test_all_correct_unweighted`: identity probabilities
    (clipped to [1e-7, 1 - 1e-7]) and confident logits give (almost) 0."""
    t = _target(kind)
    xp_assert_close(_ce(xp, IDENTITY, t, from_logits=False), 0.0, xp=xp, dtype="float32",
                    **ALMOST)  # fmt: skip
    xp_assert_close(_ce(xp, CORRECT_LOGITS, t), 0.0, xp=xp, dtype="float32", **ALMOST)


@pytest.mark.parametrize("case", list(WEIGHTED_CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_unweighted(xp: Any, kind: str, case: str) -> None:
    """`(Sparse)CategoricalCrossentropyTest.test_unweighted`: 0.3239 (probabilities, the second
    row renormalised) and 0.0573 (logits)."""
    x, from_logits, mean, _, _ = WEIGHTED_CASES[case]
    got = _ce(xp, x, _target(kind), from_logits=from_logits)
    xp_assert_close(got, mean, xp=xp, dtype="float32", **ALMOST)


@pytest.mark.parametrize("case", list(WEIGHTED_CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_scalar_weighted(xp: Any, kind: str, case: str) -> None:
    """`(Sparse)CategoricalCrossentropyTest.test_scalar_weighted`: Keras gives 2.3 x the mean
    (0.7449, 0.1317). Difference by design: xent's "mean" is the weighted mean, so a constant
    weight cancels; Keras' value is xent's "sum" / N."""
    x, from_logits, mean, keras_value, _ = WEIGHTED_CASES[case]
    kw = {"from_logits": from_logits, "sample_weight": np.full(3, 2.3)}
    got = _ce(xp, x, _target(kind), **kw)
    xp_assert_close(got, mean, xp=xp, dtype="float32", **ALMOST)
    total = _ce(xp, x, _target(kind), reduction="sum", **kw)
    xp_assert_close(total, keras_value * 3, xp=xp, dtype="float32", rtol=0, atol=3 * 1.5e-3)


@pytest.mark.parametrize("case", list(WEIGHTED_CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_sample_weighted(xp: Any, kind: str, case: str) -> None:
    """`(Sparse)CategoricalCrossentropyTest.test_sample_weighted`: weights (1.2, 3.4, 5.6) give
    1.0696 / 0.31829 in Keras = sum(s * l) / N; xent's "mean" is sum(s * l) / sum(s) (by design),
    its "sum" / N is Keras' value."""
    x, from_logits, _, _, keras_value = WEIGHTED_CASES[case]
    kw = {"from_logits": from_logits, "sample_weight": SAMPLE_WEIGHT}
    total = _ce(xp, x, _target(kind), reduction="sum", **kw)
    xp_assert_close(total, keras_value * 3, xp=xp, dtype="float32", rtol=0, atol=3 * 1.5e-3)
    mean = _ce(xp, x, _target(kind), **kw)
    want = keras_value * 3 / SAMPLE_WEIGHT.sum()
    xp_assert_close(mean, want, xp=xp, dtype="float32", rtol=0, atol=1.5e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_no_reduction(xp: Any, kind: str) -> None:
    """`(Sparse)CategoricalCrossentropyTest.test_no_reduction`: per-example logit losses."""
    got = _ce(xp, LOGITS, _target(kind), reduction="none")
    xp_assert_close(got, [0.001822, 0.000459, 0.169846], xp=xp, dtype="float32", **ALL_CLOSE)


@pytest.mark.parametrize("kind", KINDS)
def test_label_smoothing(xp: Any, kind: str) -> None:
    """`CategoricalCrossentropyTest.test_label_smoothing` and `test_label_smoothing_ndarray`:
    logits (100, -100, -100), smoothing 0.1: 400 * 0.1 / 3 (and the same for class indices)."""
    t = np.array([[1.0, 0.0, 0.0]]) if kind == "categorical" else np.array([0])
    got = _ce(xp, [[100.0, -100.0, -100.0]], t, label_smoothing=0.1)
    xp_assert_close(got, 400.0 * 0.1 / 3.0, xp=xp, dtype="float32", **ALMOST)


def test_label_smoothing_with_axis(xp: Any) -> None:
    """`CategoricalCrossentropyTest.test_label_smoothing_with_axis`: (batch, classes, spatial)
    probabilities, `axis=1`, smoothing 0.1."""
    t = _f32([[[1, 0], [0, 1], [0, 0]], [[0, 1], [1, 0], [0, 0]]])
    p = _f32([[[0.8, 0.1], [0.1, 0.8], [0.1, 0.1]], [[0.1, 0.8], [0.8, 0.1], [0.1, 0.1]]])
    smoothed = t * 0.9 + 0.1 / 3
    want = np.mean(-np.sum(smoothed * np.log(p), axis=1))
    got = _ce(xp, p, t, axis=1, from_logits=False, label_smoothing=0.1)
    xp_assert_close(got, want, xp=xp, dtype="float32", rtol=0, atol=1.5e-5)


def test_shape_mismatch(xp: Any) -> None:
    """`CategoricalCrossentropyTest.test_shape_mismatch` (and Sparse's squeeze): labels of shape
    (3, 1) for a (3, 3) input are refused. Keras' sparse loss squeezes the trailing 1; xent
    refuses it (by design: class indices have the input's shape without `axis`)."""
    with pytest.raises(ValueError, match=r"\(3, 1\)"):
        _ce(xp, PROBS, np.array([[0], [1], [2]]), from_logits=False)


def test_integer_one_hot_target_is_refused(xp: Any) -> None:
    """`CategoricalCrossentropyTest.test_all_correct_unweighted` passes an int64 one-hot
    `y_true`, which Keras casts to float. Difference by design: xent reads an integer target as
    class indices, so a (3, 3) int64 target for a (3, 3) input is refused naming both shapes."""
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        _ce(xp, IDENTITY, IDENTITY.astype(np.int64), from_logits=False)


def test_ignore_class(xp: Any) -> None:
    """`SparseCategoricalCrossentropyTest.test_ignore_class`: label -1 ignored, per-example
    losses [[0, 1.480129]]; its mean divides by the one example not ignored."""
    x = [[[0.854, 0.698, 0.598], [0.088, 0.86, 0.018]]]
    t = np.array([[-1, 2]])
    got = _ce(xp, x, t, ignore_index=-1, reduction="none")
    xp_assert_close(got, [[0.0, 1.480129]], xp=xp, dtype="float32", **ALL_CLOSE)
    xp_assert_close(_ce(xp, x, t, ignore_index=-1), 1.480129, xp=xp, dtype="float32", **ALL_CLOSE)


SEGMENT_TRUE_2 = np.array([[0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]])
SEGMENT_TRUE_3 = np.array([[0, 1, 2, 0], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]])


def _segmentation(case: str) -> tuple[np.ndarray, np.ndarray, float]:
    """The inputs of `test_binary_segmentation` / `test_multi_class_segmentation` (4 x 4 pixels):
    a perfect prediction, and one with a few wrong pixels."""
    if case.startswith("binary"):
        t, c = SEGMENT_TRUE_2, 2
        wrong = {(0, 3): [0.2, 0.8], (3, 3): [0.6, 0.4]}
        expected = -np.log(0.2) - np.log(0.4)
    else:
        t, c = SEGMENT_TRUE_3, 3
        wrong = {(0, 3): [0.2, 0.0, 0.8], (1, 0): [0.7, 0.3, 0.0], (3, 2): [0.5, 0.5, 0.0]}
        expected = -np.log(0.2) - np.log(0.3) - np.log(0.5)
    p = np.eye(c)[t]
    if case.endswith("wrong"):
        for (i, j), row in wrong.items():
            p[i, j] = row
        return p, t, expected / 16.0
    return p, t, 0.0


SEGMENTATIONS = ["binary", "binary-wrong", "multi_class", "multi_class-wrong"]


@pytest.mark.parametrize("case", SEGMENTATIONS)
def test_segmentation(xp: Any, case: str) -> None:
    """`SparseCategoricalCrossentropyTest.test_binary_segmentation` and
    `test_multi_class_segmentation`: probabilities (4, 4, C), mean over the 16 pixels."""
    p, t, want = _segmentation(case)
    got = _ce(xp, p, t, from_logits=False)
    xp_assert_close(got, want, xp=xp, dtype="float32", **ALL_CLOSE)


@pytest.mark.parametrize("case", SEGMENTATIONS)
def test_segmentation_different_axis(xp: Any, case: str) -> None:
    """`SparseCategoricalCrossentropyTest.test_binary_segmentation_different_axis` and
    `test_multi_class_segmentation_different_axis` (the torch-backend branch; Keras on JAX and
    TensorFlow refuses `axis=0`): classes first (`axis=0`), then a batch of three (`axis=1`)."""
    p, t, want = _segmentation(case)
    p0 = np.moveaxis(p, 2, 0)
    xp_assert_close(_ce(xp, p0, t, axis=0, from_logits=False), want, xp=xp, dtype="float32",
                    **ALL_CLOSE)  # fmt: skip
    p1 = np.stack([p0, p0, p0])
    t1 = np.stack([t, t, t])
    xp_assert_close(_ce(xp, p1, t1, axis=1, from_logits=False), want, xp=xp, dtype="float32",
                    **ALL_CLOSE)  # fmt: skip


# --- BinaryCrossentropyTest -------------------------------------------------------------------

BCE_TRUE = np.array([1, 0, 1, 0]).reshape(2, 2)
BCE_PRED = np.array([1, 1, 1, 0]).reshape(2, 2)
BCE_LOGIT_TRUE = np.array([[1, 0, 1], [0, 1, 1]])
BCE_LOGITS = [[10.0, -10.0, 10.0], [10.0, 10.0, -10.0]]

# (input, target, from_logits, weight, Keras' value): test_all_correct_unweighted,
# test_unweighted, test_scalar_weighted and test_sample_weighted of `BinaryCrossentropyTest`.
# Keras' per-example weight of a row is a (N, 1) weight here: xent's "mean" is the plain mean
# over elements, which is Keras' mean of row means.
BCE_CASES = {
    "all_correct": (IDENTITY, IDENTITY, False, None, 0.0),
    "all_correct-logits": (
        [[10.0, -10.0, -10.0], [-10.0, 10.0, -10.0], [-10.0, -10.0, 10.0]],
        IDENTITY,
        True,
        None,
        0.0,
    ),
    "unweighted": (
        [[0.9, 0.1, 0.2], [0.3, 0.8, 0.1], [0.1, 0.2, 0.7]],
        IDENTITY,
        False,
        None,
        0.20046903,
    ),
    "unweighted-clipped": (BCE_PRED, BCE_TRUE, False, None, 3.98559),
    "unweighted-logits": (BCE_LOGITS, BCE_LOGIT_TRUE, True, None, 3.3333),
    "scalar_weighted": (BCE_PRED, BCE_TRUE, False, 2.3, 9.1668),
    "scalar_weighted-logits": (BCE_LOGITS, BCE_LOGIT_TRUE, True, 2.3, 7.666),
    "sample_weighted": (BCE_PRED, BCE_TRUE, False, [[1.2], [3.4]], 4.7827),
    "sample_weighted-logits": (BCE_LOGITS, BCE_LOGIT_TRUE, True, [[4.0], [3.0]], 10.0),
}


@pytest.mark.parametrize("case", list(BCE_CASES))
def test_binary_crossentropy(xp: Any, case: str) -> None:
    """`BinaryCrossentropyTest.test_all_correct_unweighted`, `test_unweighted` (0.20046903,
    3.98559: probabilities 0 and 1 clipped to 1e-7 in float32, 3.3333), `test_scalar_weighted`
    (9.1668, 7.666) and `test_sample_weighted` (4.7827, 10.0)."""
    x, t, from_logits, w, want = BCE_CASES[case]
    weight = None if w is None else np.broadcast_to(np.asarray(w), np.shape(x))
    got = _bce(xp, x, t, from_logits=from_logits, weight=weight)
    xp_assert_close(got, want, xp=xp, dtype="float32", **ALMOST)


def test_binary_no_reduction(xp: Any) -> None:
    """`BinaryCrossentropyTest.test_no_reduction`: Keras' per-row [0, 6.666] is the mean over the
    last axis of xent's per-element "none" (by design, xent's "none" keeps every element)."""
    got = _bce(xp, BCE_LOGITS, BCE_LOGIT_TRUE, reduction="none")
    assert tuple(got.shape) == (2, 3)
    np.testing.assert_allclose(to_numpy(got).mean(axis=-1), [0.0, 6.666], atol=1e-3)


def test_binary_label_smoothing(xp: Any) -> None:
    """`BinaryCrossentropyTest.test_label_smoothing`: (10 + 5 * 0.1) / 3."""
    got = _bce(xp, [[10.0, -10.0, -10.0]], [[1, 0, 1]], label_smoothing=0.1)
    xp_assert_close(got, (10.0 + 5.0 * 0.1) / 3.0, xp=xp, dtype="float32", **ALMOST)


def test_binary_shape_mismatch(xp: Any) -> None:
    """`BinaryCrossentropyTest.test_shape_mismatch`: (3, 1) targets for (3, 3) probabilities."""
    with pytest.raises(ValueError, match="target"):
        _bce(xp, PROBS, [[0], [1], [1]], from_logits=False)


# --- the same cases against live Keras --------------------------------------------------------

_LIVE: dict[str, Any] = {}


def _keras_value(keras: Any, key: str, make: Any) -> np.ndarray:
    """Live Keras, once per case for every backend of the run."""
    if key not in _LIVE:
        _LIVE[key] = np.asarray(make(), dtype=np.float64)
    return np.asarray(_LIVE[key])


@pytest.mark.parametrize("case", list(BCE_CASES))
def test_binary_crossentropy_matches_live_keras(xp: Any, keras: Any, case: str) -> None:
    """The `BinaryCrossentropyTest` cases above against live `keras.losses.BinaryCrossentropy`."""
    x, t, from_logits, w, _ = BCE_CASES[case]
    sample_weight = None if w is None else np.asarray(w, np.float32).reshape(-1)

    def make() -> Any:
        loss = keras.losses.BinaryCrossentropy(from_logits=from_logits)
        if sample_weight is not None and sample_weight.size == 1:
            return loss(_f32(t), _f32(x), sample_weight=float(sample_weight[0]))
        return loss(_f32(t), _f32(x), sample_weight=sample_weight)

    want = _keras_value(keras, f"bce-{case}", make)
    weight = None if w is None else np.broadcast_to(np.asarray(w), np.shape(x))
    got = _bce(xp, x, t, from_logits=from_logits, weight=weight)
    xp_assert_close(got, want, xp=xp, dtype="float32", rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("case", list(WEIGHTED_CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_sample_weighted_matches_live_keras(xp: Any, keras: Any, kind: str, case: str) -> None:
    """`test_sample_weighted` against live Keras: Keras' "mean" (`sum_over_batch_size`) is
    xent's "sum" / N; "none" is the same per-example loss times the weight."""
    x, from_logits, _, _, _ = WEIGHTED_CASES[case]
    t = _target(kind)
    cls = (
        keras.losses.CategoricalCrossentropy
        if kind == "categorical"
        else keras.losses.SparseCategoricalCrossentropy
    )
    for reduction in ("mean", "none"):
        loss = cls(from_logits=from_logits, reduction=KERAS_REDUCTIONS[reduction])
        want = _keras_value(
            keras,
            f"{kind}-{case}-{reduction}",
            lambda loss=loss: loss(t, _f32(x), sample_weight=_f32(SAMPLE_WEIGHT)),
        )
        kw = {"from_logits": from_logits, "sample_weight": SAMPLE_WEIGHT}
        if reduction == "mean":
            got = _ce(xp, x, t, reduction="sum", **kw)
            xp_assert_close(got, want * 3, xp=xp, dtype="float32", rtol=2e-6, atol=2e-6)
        else:
            got = _ce(xp, x, t, reduction="none", **kw)
            xp_assert_close(got, want, xp=xp, dtype="float32", rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("case", SEGMENTATIONS)
def test_segmentation_matches_live_keras(xp: Any, keras: Any, case: str) -> None:
    """`test_binary_segmentation` / `test_multi_class_segmentation` against live Keras."""
    p, t, _ = _segmentation(case)
    want = _keras_value(
        keras, f"segmentation-{case}",
        lambda: keras.losses.SparseCategoricalCrossentropy()(t, _f32(p)),
    )  # fmt: skip
    xp_assert_close(_ce(xp, p, t, from_logits=False), want, xp=xp, dtype="float32", rtol=2e-6,
                    atol=2e-6)  # fmt: skip


def test_ignore_class_matches_live_keras(xp: Any, keras: Any) -> None:
    """`test_ignore_class` against live Keras, "mean" too: with `ignore_class` Keras divides by
    the number of examples not ignored, as xent does."""
    x = _f32([[[0.854, 0.698, 0.598], [0.088, 0.86, 0.018], [0.5, 0.1, 0.2]]])
    t = np.array([[-1, 2, 0]])
    for reduction, keras_reduction in KERAS_REDUCTIONS.items():
        loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=-1, reduction=keras_reduction
        )
        want = _keras_value(keras, f"ignore-{reduction}", lambda loss=loss: loss(t, x))
        got = _ce(xp, x, t, ignore_index=-1, reduction=reduction)
        xp_assert_close(got, want, xp=xp, dtype="float32", rtol=2e-6, atol=2e-6, err_msg=reduction)


# --- random grids against live Keras (formerly tests/test_references.py) ----------------------


def _unnormalised_probabilities(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    p = rng.uniform(0.0, 2.0, size=shape)
    p[rng.uniform(size=shape) < 0.15] = 0.0  # clipped to eps
    p[..., 0] += 0.1
    return p.astype(np.float32)


@pytest.mark.parametrize("from_logits", [False, True], ids=["probabilities", "logits"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["e0", "e0.1"])
@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4)], ids=["N,C", "N,T,C"])
def test_categorical_matches_keras(
    xp: Any,
    keras: Any,
    rng: np.random.Generator,
    from_logits: bool,
    label_smoothing: float,
    shape: tuple[int, ...],
) -> None:
    if from_logits:
        x = (rng.normal(size=shape) * 3).astype(np.float32)
    else:
        x = _unnormalised_probabilities(rng, shape)
    t = np.eye(shape[-1], dtype=np.float32)[rng.integers(0, shape[-1], size=shape[:-1])]
    t[0] = rng.dirichlet(np.ones(shape[-1]), size=shape[1:-1] or None).astype(np.float32)
    for reduction, keras_reduction in KERAS_REDUCTIONS.items():
        loss = keras.losses.CategoricalCrossentropy(
            from_logits=from_logits, label_smoothing=label_smoothing, reduction=keras_reduction
        )
        want = np.asarray(loss(t, x), dtype=np.float64)
        got = xent.cross_entropy(
            to_xp(xp, x),
            to_xp(xp, t),
            from_logits=from_logits,
            label_smoothing=label_smoothing,
            reduction=reduction,
        )
        xp_assert_close(got, want, xp=xp, dtype="float32", rtol=2e-6, atol=2e-6, err_msg=reduction)


@pytest.mark.parametrize("from_logits", [False, True], ids=["probabilities", "logits"])
@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4)], ids=["N,C", "N,T,C"])
@pytest.mark.parametrize("label_dtype", ["int64", "int32", "uint8"])
def test_sparse_categorical_matches_keras(
    xp: Any,
    keras: Any,
    rng: np.random.Generator,
    from_logits: bool,
    shape: tuple[int, ...],
    label_dtype: str,
) -> None:
    if from_logits:
        x = (rng.normal(size=shape) * 3).astype(np.float32)
    else:
        x = _unnormalised_probabilities(rng, shape)
    t = rng.integers(0, shape[-1], size=shape[:-1]).astype(label_dtype)
    for reduction, keras_reduction in KERAS_REDUCTIONS.items():
        loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=from_logits, reduction=keras_reduction
        )
        want = np.asarray(loss(t, x), dtype=np.float64)
        got = xent.cross_entropy(
            to_xp(xp, x), to_xp(xp, t), from_logits=from_logits, reduction=reduction
        )
        xp_assert_close(got, want, xp=xp, dtype="float32", rtol=2e-6, atol=2e-6, err_msg=reduction)


@pytest.mark.parametrize("from_logits", [False, True], ids=["probabilities", "logits"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2], ids=["e0", "e0.2"])
def test_binary_matches_keras(
    xp: Any, keras: Any, rng: np.random.Generator, from_logits: bool, label_smoothing: float
) -> None:
    if from_logits:
        x = (rng.normal(size=(4, 6)) * 3).astype(np.float32)
    else:
        x = rng.uniform(size=(4, 6)).astype(np.float32)
        x[0, :3] = [0.0, 1.0, 1e-9]  # clipped
    t = rng.uniform(size=(4, 6)).astype(np.float32)
    t[1] = np.round(t[1])
    kw = {"from_logits": from_logits, "label_smoothing": label_smoothing}
    # Keras averages over the last axis first, then reduces over the rest
    mean = keras.losses.BinaryCrossentropy(reduction="sum_over_batch_size", **kw)
    got = xent.binary_cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="mean", **kw)
    xp_assert_close(
        got, np.asarray(mean(t, x), dtype=np.float64), xp=xp, dtype="float32", rtol=2e-6, atol=2e-6
    )
    per_row = np.asarray(keras.losses.BinaryCrossentropy(reduction=None, **kw)(t, x))
    none = xent.binary_cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="none", **kw)
    np.testing.assert_allclose(to_numpy(none).mean(axis=-1), per_row, rtol=2e-6, atol=2e-6)


# Keras 3 values, recorded from live Keras, for small worked examples of sparse and dense
# targets, logits and probabilities.
SEED_000_LOGITS = [
    [
        -0.07976019,
        1.4097637,
        0.31711328,
        -0.56984025,
        -0.2769775,
        0.14477172,
        0.6587809,
        0.03351004,
        0.24701062,
        0.55834836,
    ],
    [
        0.07477544,
        0.7773567,
        -0.09413219,
        0.00184567,
        0.0491263,
        0.19461593,
        0.47267246,
        0.02392993,
        0.56105083,
        0.22566506,
    ],
]
SEED_CASES = {
    "000-sparse-logits": (SEED_000_LOGITS, [9, 0], True, "mean", 2.3179154),
    "001-probabilities-class1": ([[0.1, 0.8, 0.1]], [[0.0, 1.0, 0.0]], False, "mean", 0.2231436),
    "001-probabilities-class0": ([[0.9, 0.05, 0.05]], [[1.0, 0.0, 0.0]], False, "mean", 0.1053605),
    "001-logits-sum": (
        [[2.0, 5.0, 1.0], [7.0, 1.0, 0.5]],
        [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]],
        True,
        "sum",
        0.0698582,
    ),
    "001-logits-none": (
        [[2.0, 5.0, 1.0], [7.0, 1.0, 0.5]],
        [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]],
        True,
        "none",
        [0.0658839, 0.0039743],
    ),
    "001-sparse-logits-mean": ([[2.0, 5.0, 1.0], [7.0, 1.0, 0.5]], [1, 0], True, "mean", 0.0349291),
    "002-sparse-probabilities": (
        [[0.1, 0.8, 0.1], [0.2, 0.3, 0.5]],
        [1, 2],
        False,
        "mean",
        0.4581454,
    ),
    "002-sparse-probabilities-3d": (
        [[[0.1, 0.8, 0.1], [0.2, 0.3, 0.5]], [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]],
        [[1, 2], [0, 1]],
        False,
        "mean",
        0.3740273,
    ),
    "002-sparse-logits": ([[1.0, 2.0, 0.5], [-1.0, 0.0, 1.0]], [1, 2], True, "mean", 0.4359874),
}


@pytest.mark.parametrize("case", list(SEED_CASES))
def test_seed_examples_give_keras_values(xp: Any, case: str) -> None:
    dtype = "float32"  # what Keras computed in
    x, t, from_logits, reduction, keras_value = SEED_CASES[case]
    t_np = np.asarray(t)
    target = to_xp(xp, t_np if t_np.dtype.kind == "i" else t_np.astype(dtype))
    got = xent.cross_entropy(
        to_xp(xp, np.asarray(x, dtype=dtype)), target, from_logits=from_logits, reduction=reduction
    )
    # Keras printed float32 results to 7-8 significant digits
    xp_assert_close(got, keras_value, xp=xp, dtype=dtype, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", list(SEED_CASES))
def test_seed_values_are_what_keras_computes(keras: Any, case: str) -> None:
    # guards the table above: the live Keras gives the recorded values
    x, t, from_logits, reduction, keras_value = SEED_CASES[case]
    t_np = np.asarray(t)
    cls = (
        keras.losses.SparseCategoricalCrossentropy
        if t_np.dtype.kind == "i"
        else keras.losses.CategoricalCrossentropy
    )
    loss = cls(from_logits=from_logits, reduction=KERAS_REDUCTIONS[reduction])
    got = np.asarray(
        loss(
            t_np if t_np.dtype.kind == "i" else t_np.astype(np.float32),
            np.asarray(x, dtype=np.float32),
        )
    )
    np.testing.assert_allclose(got, keras_value, rtol=1e-6, atol=1e-7)
