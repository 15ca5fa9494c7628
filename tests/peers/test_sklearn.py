"""scikit-learn's own `log_loss` tests, ported: xent on every backend, against the literal values
of `sklearn/metrics/tests/test_classification.py` (`test_log_loss`, `test_log_loss_eps_auto`,
`test_log_loss_eps_auto_float16`) and against live `sklearn.metrics.log_loss` (run on NumPy
copies). `log_loss(y_true, y_prob)` is xent's `cross_entropy(y_prob, labels, from_logits=False)`
with the labels encoded as 0..C-1 in sorted order (a 1-D `y_prob` is the probability of the
positive class: `binary_cross_entropy(y_prob, y_true, from_logits=False)`).

Differences by design, asserted as xent documents them:
- Clipping: xent clips probabilities to `[eps, 1 - eps]` with `eps=1e-7` (Keras' rule);
  scikit-learn clips to the dtype's machine epsilon. With `eps=np.finfo(np.float64).eps` xent
  gives scikit-learn's values at the boundaries. `eps=0` is refused (`ValueError`: `eps` must
  lie in (0, 0.5)), where scikit-learn up to 1.2 accepted it and returned `inf`.
- Renormalisation: xent divides each row by its sum before clipping. scikit-learn up to 1.4
  renormalised too (its literal values 1.0383217 and 1.0630345 come from then); since 1.5 it
  warns and uses the rows as given. xent gives the literal values; rows that sum to one agree
  with live scikit-learn.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _helpers import to_numpy, to_xp, xp_assert_close

import xent

# scikit-learn's `assert_almost_equal` (7 decimals, or 6 where the test says so)
DECIMAL_7 = {"rtol": 0.0, "atol": 1.5e-7}
DECIMAL_6 = {"rtol": 0.0, "atol": 1.5e-6}
F64_EPS = float(np.finfo(np.float64).eps)


def _log_loss(xp: Any, y_prob: Any, labels: Any, **kw: Any) -> Any:
    return xent.cross_entropy(
        to_xp(xp, np.asarray(y_prob, dtype=np.float64)),
        to_xp(xp, np.asarray(labels)),
        from_logits=False,
        **kw,
    )


def _binary_log_loss(xp: Any, y_prob: Any, y_true: Any, **kw: Any) -> Any:
    return xent.binary_cross_entropy(
        to_xp(xp, np.asarray(y_prob, dtype=np.float64)),
        to_xp(xp, np.asarray(y_true, dtype=np.float64)),
        from_logits=False,
        **kw,
    )


@pytest.fixture(scope="module")
def log_loss() -> Any:
    """Live `sklearn.metrics.log_loss` (scikit-learn is installed in some CI sessions only; the
    literal values above run everywhere)."""
    metrics = pytest.importorskip(
        "sklearn.metrics", reason="the live reference values come from scikit-learn"
    )
    return metrics.log_loss


MULTICLASS_TRUE = [1, 0, 2]
MULTICLASS_PROB = [[0.2, 0.7, 0.1], [0.6, 0.2, 0.2], [0.6, 0.1, 0.3]]


def test_log_loss_binary_symbolic_labels(xp: Any) -> None:
    """`test_log_loss`, binary case with symbolic labels ("no" < "yes"): the mean of
    `-bernoulli.logpmf`, as two-class probabilities and as the positive-class probability."""
    y_true = np.array(["no", "no", "no", "yes", "yes", "yes"])
    y_prob = np.array(
        [[0.5, 0.5], [0.1, 0.9], [0.01, 0.99], [0.9, 0.1], [0.75, 0.25], [0.001, 0.999]]
    )
    labels = (y_true == "yes").astype(np.int64)
    want = -np.mean(np.log(np.where(labels == 1, y_prob[:, 1], y_prob[:, 0])))
    xp_assert_close(_log_loss(xp, y_prob, labels), want, xp=xp, dtype="float64", **DECIMAL_7)
    xp_assert_close(_binary_log_loss(xp, y_prob[:, 1], labels), want, xp=xp, dtype="float64",
                    **DECIMAL_7)  # fmt: skip


def test_log_loss_multiclass(xp: Any) -> None:
    """`test_log_loss`, multiclass case: 0.6904911 (`normalize=True`, xent's "mean"); doubled,
    `normalize=False` gives 0.6904911 * 6 (xent's "sum")."""
    got = _log_loss(xp, MULTICLASS_PROB, MULTICLASS_TRUE)
    xp_assert_close(got, 0.6904911, xp=xp, dtype="float64", **DECIMAL_7)
    doubled = _log_loss(xp, MULTICLASS_PROB * 2, MULTICLASS_TRUE * 2, reduction="sum")
    xp_assert_close(doubled, 0.6904911 * 6, xp=xp, dtype="float64", **DECIMAL_6)


def test_log_loss_eps_clipping(xp: Any) -> None:
    """`test_log_loss`, "check eps and handling of absolute zero and one probabilities":
    one-hot boolean predictions with `eps=0.1`. Difference by design: xent renormalises, then
    clips to [0.1, 0.9] (the right class costs -log 0.9, a wrong one -log 0.1); scikit-learn
    up to 1.2 clipped and then renormalised."""
    y_prob = (np.asarray(MULTICLASS_PROB * 2) > 0.5).astype(np.float64)
    y_true = np.array(MULTICLASS_TRUE * 2)
    right = y_prob[np.arange(6), y_true] == 1
    want = np.mean(np.where(right, -np.log(0.9), -np.log(0.1)))
    xp_assert_close(_log_loss(xp, y_prob, y_true, eps=0.1), want, xp=xp, dtype="float64")


@pytest.mark.parametrize(
    ("y_true", "y_prob"),
    [([0, 1], [0.0, 1.0]), ([0, 1], [0.0, 0.0]), ([0, 1], [1.0, 1.0])],
    ids=["right", "one-wrong-0", "one-wrong-1"],
)
def test_log_loss_binary_boundaries(xp: Any, y_true: list[int], y_prob: list[float]) -> None:
    """`test_log_loss`, "binary case: check correct boundary values for eps = 0" (0, inf, inf).
    xent refuses `eps=0` (by design: `eps` in (0, 0.5)); with the float64 machine epsilon it
    gives live scikit-learn's clipped values, and with its default 1e-7 the documented ones."""
    with pytest.raises(ValueError, match="eps"):
        _binary_log_loss(xp, y_prob, y_true, eps=0.0)
    t = np.asarray(y_true)
    for eps in (F64_EPS, 1e-7):
        p = np.clip(y_prob, eps, 1 - eps)
        want = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
        got = _binary_log_loss(xp, y_prob, y_true, **({} if eps == 1e-7 else {"eps": eps}))
        xp_assert_close(got, want, xp=xp, dtype="float64", rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "y_prob",
    [[[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0.5, 0.5], [0, 1, 0], [0, 0, 1]]],
    ids=["right", "one-wrong"],
)
def test_log_loss_multiclass_boundaries(xp: Any, y_prob: list[list[float]]) -> None:
    """`test_log_loss`, "multiclass case: check correct boundary values for eps = 0" (0, inf):
    as for the binary case, `eps=0` is refused and the machine epsilon gives scikit-learn's
    values."""
    y_true = [0, 1, 2]
    with pytest.raises(ValueError, match="eps"):
        _log_loss(xp, y_prob, y_true, eps=0.0)
    picked = np.asarray(y_prob, dtype=np.float64)[np.arange(3), y_true]
    want = -np.mean(np.log(np.clip(picked, F64_EPS, 1 - F64_EPS)))
    got = _log_loss(xp, y_prob, y_true, eps=F64_EPS)
    xp_assert_close(got, want, xp=xp, dtype="float64", rtol=1e-12, atol=1e-15)


def test_log_loss_class_count_mismatch(xp: Any) -> None:
    """`test_log_loss`, "raise error if number of classes are not equal": three labels, two
    columns. xent sees label 2 out of range for C = 2: `ValueError` where labels are concrete,
    NaN lazily (Dask)."""
    from _helpers import is_concrete_host

    y_prob = [[0.2, 0.7], [0.6, 0.5], [0.4, 0.1]]
    if is_concrete_host():
        with pytest.raises(ValueError, match="2"):
            _log_loss(xp, y_prob, MULTICLASS_TRUE)
    else:
        xp_assert_close(_log_loss(xp, y_prob, MULTICLASS_TRUE), np.nan, xp=xp, dtype="float64")


def test_log_loss_string_labels_renormalised(xp: Any) -> None:
    """`test_log_loss`, "case when y_true is a string array object" (and
    `test_log_loss_pandas_input`'s values, without pandas): rows that do not sum to one,
    1.0383217 (renormalised; scikit-learn >= 1.5 no longer renormalises: by design xent keeps
    the renormalisation)."""
    y_true = np.array(["ham", "spam", "spam", "ham"])
    y_prob = np.array([[0.2, 0.7], [0.6, 0.5], [0.4, 0.1], [0.7, 0.2]])
    labels = (y_true == "spam").astype(np.int64)
    got = _log_loss(xp, y_prob, labels)
    xp_assert_close(got, 1.0383217, xp=xp, dtype="float64", **DECIMAL_6)


def test_log_loss_labels_argument(xp: Any) -> None:
    """`test_log_loss`, "works when the labels argument is used": y_true [2, 2] with
    `labels=[1, 2]` is class index 1: -mean(log 0.9)."""
    y_score = np.array([[0.1, 0.9], [0.1, 0.9]])
    got = _log_loss(xp, y_score, [1, 1])
    want = -np.mean(np.log(y_score[:, 1]))
    xp_assert_close(got, want, xp=xp, dtype="float64", **DECIMAL_7)


def test_log_loss_labels_not_all_present(xp: Any) -> None:
    """`test_log_loss`, "ensure labels work when len(np.unique(y_true)) != y_pred.shape[1]":
    y_true [1, 2, 2] with `labels=[1, 2, 3]`, rows not summing to one: 1.0630345 (renormalised,
    as above)."""
    y_score = np.array([[0.2, 0.7, 0.3], [0.6, 0.5, 0.3], [0.3, 0.9, 0.1]])
    got = _log_loss(xp, y_score, [0, 1, 1])
    xp_assert_close(got, 1.0630345, xp=xp, dtype="float64", **DECIMAL_6)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_log_loss_eps_auto(xp: Any, dtype: str) -> None:
    """`test_log_loss_eps_auto` (float32, float64) and `test_log_loss_eps_auto_float16`:
    predictions equal to the 0/1 targets give a finite loss in every dtype."""
    y = np.array([0.0, 1.0])
    got = xent.binary_cross_entropy(
        to_xp(xp, y, dtype=dtype), to_xp(xp, y, dtype=dtype), from_logits=False
    )
    assert np.isfinite(to_numpy(got))
    # both elements cost -log(1 - 1e-7), with 1 - 1e-7 rounded to float32 below float64
    one_minus_eps = 1 - 1e-7 if dtype == "float64" else float(np.float32(1 - 1e-7))
    xp_assert_close(got, -np.log(one_minus_eps), xp=xp, dtype=dtype, rtol=0.02, atol=0.0)


def test_log_loss_sample_weight(xp: Any, rng: np.random.Generator) -> None:
    """`log_loss(sample_weight=...)` is the weighted average (`np.average`), xent's "mean" with
    `sample_weight`, for class indices and for the binary form; the invariances of
    `test_common.py::check_sample_weight_invariance`: unit weights change nothing, scaling the
    weights changes nothing, integer weights equal repeated samples."""
    y_prob = rng.dirichlet(np.ones(3), size=8)
    y_true = rng.integers(0, 3, size=8)
    y_true[:3] = [0, 1, 2]
    w = rng.integers(1, 4, size=8).astype(np.float64)
    sw = to_xp(xp, w)
    got = _log_loss(xp, y_prob, y_true, sample_weight=sw)
    want = np.average(-np.log(y_prob[np.arange(8), y_true]), weights=w)
    xp_assert_close(got, want, xp=xp, dtype="float64")
    unit = _log_loss(xp, y_prob, y_true, sample_weight=to_xp(xp, np.ones(8)))
    xp_assert_close(unit, to_numpy(_log_loss(xp, y_prob, y_true)), xp=xp, dtype="float64")
    scaled = _log_loss(xp, y_prob, y_true, sample_weight=to_xp(xp, w * 3.5))
    xp_assert_close(scaled, to_numpy(got), xp=xp, dtype="float64")
    repeated = _log_loss(
        xp, np.repeat(y_prob, w.astype(int), axis=0), np.repeat(y_true, w.astype(int))
    )
    xp_assert_close(repeated, to_numpy(got), xp=xp, dtype="float64")
    p1 = rng.uniform(0.05, 0.95, size=8)
    t1 = rng.integers(0, 2, size=8)
    t1[:2] = [0, 1]
    binary = _binary_log_loss(xp, p1, t1, weight=to_xp(xp, w), reduction="sum")
    want = np.sum(-w * np.log(np.where(t1 == 1, p1, 1 - p1)))
    xp_assert_close(binary, want, xp=xp, dtype="float64")


# --- against live scikit-learn ----------------------------------------------------------------

_RNG = np.random.default_rng(20)
_RANDOM_PROB = _RNG.dirichlet(np.ones(4), size=12)
_RANDOM_TRUE = _RNG.integers(0, 4, size=12)
_WEIGHTS = _RNG.integers(1, 4, size=12).astype(np.float64)
_STRINGS = np.array(["no", "no", "no", "yes", "yes", "yes"])
_STRING_PROB = np.array(
    [[0.5, 0.5], [0.1, 0.9], [0.01, 0.99], [0.9, 0.1], [0.75, 0.25], [0.001, 0.999]]
)
_HAM = np.array([[0.2, 0.7], [0.6, 0.5], [0.4, 0.1], [0.7, 0.2]])
_SCORE2 = np.array([[0.2, 0.7, 0.3], [0.6, 0.5, 0.3], [0.3, 0.9, 0.1]])


def _rows(p: np.ndarray) -> np.ndarray:
    return p / p.sum(axis=1, keepdims=True)


# name: (log_loss arguments, xent arguments: probabilities, labels, options, binary or not).
# Rows that do not sum to one are normalised first (scikit-learn >= 1.5 no longer does it).
LIVE_CASES: dict[str, tuple[tuple[Any, ...], dict[str, Any], tuple[Any, ...], dict[str, Any]]] = {
    "binary-symbolic": ((_STRINGS, _STRING_PROB), {}, (_STRING_PROB, [0, 0, 0, 1, 1, 1]), {}),
    "multiclass": ((MULTICLASS_TRUE, MULTICLASS_PROB), {}, (MULTICLASS_PROB, MULTICLASS_TRUE), {}),
    "multiclass-normalize-False": (
        (MULTICLASS_TRUE * 2, MULTICLASS_PROB * 2),
        {"normalize": False},
        (MULTICLASS_PROB * 2, MULTICLASS_TRUE * 2),
        {"reduction": "sum"},
    ),
    "binary-boundary-right": (([0, 1], [0.0, 1.0]), {}, ([0.0, 1.0], [0, 1]), {"binary": True}),
    "binary-boundary-wrong-0": (([0, 1], [0.0, 0.0]), {}, ([0.0, 0.0], [0, 1]), {"binary": True}),
    "binary-boundary-wrong-1": (([0, 1], [1.0, 1.0]), {}, ([1.0, 1.0], [0, 1]), {"binary": True}),
    "multiclass-boundary-right": (([0, 1, 2], np.eye(3)), {}, (np.eye(3), [0, 1, 2]), {}),
    "multiclass-boundary-wrong": (
        ([0, 1, 2], [[0, 0.5, 0.5], [0, 1, 0], [0, 0, 1]]),
        {},
        ([[0, 0.5, 0.5], [0, 1, 0], [0, 0, 1]], [0, 1, 2]),
        {},
    ),
    "string-labels": (
        (np.array(["ham", "spam", "spam", "ham"]), _rows(_HAM)), {}, (_HAM, [0, 1, 1, 0]), {},
    ),
    "labels-argument": (([2, 2], [[0.1, 0.9], [0.1, 0.9]]), {"labels": [1, 2]},
                        ([[0.1, 0.9], [0.1, 0.9]], [1, 1]), {}),
    "labels-not-all-present": (
        ([1, 2, 2], _rows(_SCORE2)), {"labels": [1, 2, 3]}, (_SCORE2, [0, 1, 1]), {},
    ),
    "random": ((_RANDOM_TRUE, _RANDOM_PROB), {"labels": [0, 1, 2, 3]},
               (_RANDOM_PROB, _RANDOM_TRUE), {}),
    "random-normalize-False": (
        (_RANDOM_TRUE, _RANDOM_PROB),
        {"labels": [0, 1, 2, 3], "normalize": False},
        (_RANDOM_PROB, _RANDOM_TRUE),
        {"reduction": "sum"},
    ),
    "random-sample_weight": (
        (_RANDOM_TRUE, _RANDOM_PROB),
        {"labels": [0, 1, 2, 3], "sample_weight": _WEIGHTS},
        (_RANDOM_PROB, _RANDOM_TRUE),
        {"sample_weight": _WEIGHTS},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LIVE_CASES))
def test_matches_live_sklearn(xp: Any, log_loss: Any, case: str) -> None:
    """The cases of `test_log_loss` above (and random ones, with `sample_weight`) against live
    `sklearn.metrics.log_loss`; at the 0/1 boundaries with xent's `eps` set to scikit-learn's
    (the float64 machine epsilon)."""
    sk_args, sk_kw, (y_prob, labels), kw = LIVE_CASES[case]
    want = float(log_loss(*sk_args, **sk_kw))
    kw = dict(kw)
    if "sample_weight" in kw:
        kw["sample_weight"] = to_xp(xp, kw["sample_weight"])
    if "boundary" in case:
        kw["eps"] = F64_EPS
    if kw.pop("binary", False):
        got = _binary_log_loss(xp, y_prob, labels, **kw)
    else:
        got = _log_loss(xp, y_prob, labels, **kw)
    xp_assert_close(got, want, xp=xp, dtype="float64", rtol=1e-12, atol=1e-15)
