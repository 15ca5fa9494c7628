"""TensorFlow's own cross-entropy tests, ported with their literal expected values (TensorFlow is
not a test dependency): xent on every backend.

Sources (TensorFlow repository):
- `tensorflow/python/kernel_tests/nn_ops/xent_op_test_base.py` (`XentOpTestBase`, the
  `softmax_cross_entropy_with_logits` kernel and its `_npXent` NumPy reference);
- `tensorflow/python/kernel_tests/nn_ops/sparse_xent_op_test_base.py` (`SparseXentOpTestBase`);
- `tensorflow/python/kernel_tests/losses_test.py` (`SoftmaxCrossEntropyLossTest`,
  `SparseSoftmaxCrossEntropyLossTest`, `SigmoidCrossEntropyLossTest`, `LogLossTest`).

Differences by design, asserted as xent documents them:
- `tf.losses` reduce with `SUM_BY_NONZERO_WEIGHTS`: the weighted sum divided by the number of
  non-zero weights. xent's "mean" for cross-entropy is the weighted mean (divided by the sum of
  the weights: NaN when they are all 0), and for binary cross-entropy the plain mean over
  elements; TensorFlow's value is xent's "sum" divided by the count of non-zero weights.
- The kernels' gradient with respect to the logits is `softmax - labels`, which assumes the
  labels sum to 1; xent returns the exact derivative `softmax * sum(labels) - labels` (as
  PyTorch's autograd does).
- TensorFlow broadcasts labels against logits; xent requires the input's shape (probabilities)
  or the input's shape without the class axis (indices), and raises `ValueError` otherwise.
- Out-of-range labels: TensorFlow raises on CPU and gives NaN on GPU; xent raises `ValueError`
  where labels are concrete on the host and gives NaN elsewhere (and with `validate=False`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _helpers import is_concrete_host, to_numpy, to_xp, xp_assert_close
from _peers import AUTODIFF, autodiff_grad, autodiff_hessian
from _reference import numerical_grad

import xent

# `assertAllClose` / `assertAlmostEqual(..., 3)` tolerances of the TensorFlow tests
RTOL_1E3 = {"rtol": 1e-3, "atol": 1e-3}
PLACES_3 = {"rtol": 0.0, "atol": 5e-4}

LOGITS = [[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]]
SOFT_LABELS = [[0.0, 0.0, 0.0, 1.0], [0.0, 0.5, 0.5, 0.0]]


def _np_xent(labels: Any, logits: Any, dim: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """`XentOpTestBase._npXent`: the NumPy reference of the tests (its gradient assumes labels
    summing to 1)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    e = np.exp(logits - np.max(logits, axis=dim, keepdims=True))
    probs = e / np.sum(e, axis=dim, keepdims=True)
    return -np.sum(labels * np.log(probs + 1.0e-20), axis=dim), probs - labels


def _ce_and_grad(xp: Any, x: Any, t: Any, *, dtype: str = "float64", **kw: Any) -> Any:
    t = np.asarray(t)
    t_b = to_xp(xp, t) if t.dtype.kind in "iu" else to_xp(xp, t, dtype=dtype)
    return xent.cross_entropy_and_grad(
        to_xp(xp, np.asarray(x), dtype=dtype), t_b, reduction="none", **kw
    )


# --- XentOpTestBase ---------------------------------------------------------------------------


def test_np_xent(xp: Any) -> None:
    """`XentOpTestBase.testNpXent`: loss [1.3862, 1.9401] and gradient
    [[0.25, 0.25, 0.25, -0.75], [0.0321, -0.4129, -0.2632, 0.6439]]."""
    loss, grad = _ce_and_grad(xp, LOGITS, SOFT_LABELS)
    xp_assert_close(loss, [1.3862, 1.9401], xp=xp, dtype="float64", **RTOL_1E3)
    want = [[0.25, 0.25, 0.25, -0.75], [0.0321, -0.4129, -0.2632, 0.6439]]
    xp_assert_close(grad, want, xp=xp, dtype="float64", **RTOL_1E3)


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_single_class(xp: Any, dtype: str) -> None:
    """`XentOpTestBase.testSingleClass`: one class, labels [-1, 0, 1, 1]: loss 0. TensorFlow's
    kernel returns the gradient [2, 1, 0, 0] (`softmax - labels`); the loss is constant in the
    logits, so xent's (exact) gradient is 0, as PyTorch's autograd gives (by design)."""
    labels = [[-1.0], [0.0], [1.0], [1.0]]
    logits = [[1.0], [-1.0], [0.0], [1.0]]
    loss, grad = _ce_and_grad(xp, logits, labels, dtype=dtype)
    xp_assert_close(loss, [0.0] * 4, xp=xp, dtype=dtype, rtol=0, atol=0)
    xp_assert_close(grad, np.zeros((4, 1)), xp=xp, dtype=dtype, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("labels", "logits"),
    [
        ([[0.0, 0.0, 0.0, 1.0]], LOGITS),
        ([[1.0]], [[1.0], [2.0]]),
        (
            [[0.0], [2.0], [0.25]],
            [[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]],
        ),
    ],
    ids=["row", "one-class", "column"],
)
def test_labels_broadcast(xp: Any, labels: Any, logits: Any) -> None:
    """`XentOpTestBase.testLabelsBroadcast`: TensorFlow broadcasts the labels; xent does not (by
    design) and names both shapes."""
    with pytest.raises(ValueError, match="shape"):
        _ce_and_grad(xp, logits, labels)


def test_shape_mismatch(xp: Any) -> None:
    """`XentOpTestBase.testShapeMismatch`: labels (2, 3) for logits (2, 2)."""
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        _ce_and_grad(xp, [[0.0, 1.0], [2.0, 3.0]], [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_dtypes(xp: Any, dtype: str) -> None:
    """`XentOpTestBase.testHalf`, `testBfloat16`, `testFloat`, `testDouble`: `_npXent`'s loss and
    gradient in every floating dtype (computed in float32 for the 16-bit ones)."""
    want_loss, want_grad = _np_xent(SOFT_LABELS, LOGITS)
    loss, grad = _ce_and_grad(xp, LOGITS, SOFT_LABELS, dtype=dtype)
    xp_assert_close(loss, want_loss, xp=xp, dtype=dtype)
    xp_assert_close(grad, want_grad, xp=xp, dtype=dtype)


GRADIENT_LABELS = np.array([0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.5]).reshape(
    3, 4
)
GRADIENT_LOGITS = np.array([0.1, 0.2, 0.3, 0.4, 0.1, 0.4, 0.9, 1.6, 0.1, 0.8, 2.7, 6.4]).reshape(
    3, 4
)


def test_gradient(xp: Any) -> None:
    """`XentOpTestBase.testGradient`: the gradient with respect to the logits agrees with finite
    differences (TensorFlow: error < 5e-8)."""
    _, grad = _ce_and_grad(xp, GRADIENT_LOGITS, GRADIENT_LABELS)

    def loss(a: np.ndarray) -> Any:
        return to_numpy(_ce_and_grad(xp, a, GRADIENT_LABELS)[0])

    want = numerical_grad(loss, GRADIENT_LOGITS)
    xp_assert_close(grad, want, xp=xp, dtype="float64", rtol=0, atol=5e-8)


@pytest.mark.only_backends(*AUTODIFF)
def test_gradient_label_with_v2(xp: Any) -> None:
    """`XentOpTestBase.testGradientLabelWithV2`: `softmax_cross_entropy_with_logits_v2`
    differentiates the labels too: d loss / d labels = -log_softmax(logits), also where a label
    is 0."""

    def loss(a: Any, b: Any) -> Any:
        return xent.cross_entropy(a, b, reduction="none")

    got = autodiff_grad(xp, loss, [GRADIENT_LOGITS, GRADIENT_LABELS], wrt=1)
    z = GRADIENT_LOGITS - GRADIENT_LOGITS.max(axis=1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(got, -log_softmax, rtol=0, atol=5e-8)


@pytest.mark.only_backends(*AUTODIFF)
def test_second_gradient(xp: Any) -> None:
    """`XentOpTestBase.testSecondGradient`: 12 logits as one example, labels summing to 1: the
    Hessian is `diag(p) - p p^T`."""
    labels = np.array([0.0, 0.0, 1 / 3, 0.0, 1 / 3, 0.0, 0.0, 0.0, 0.0, 0.5 / 3, 0.0, 0.5 / 3])
    logits = GRADIENT_LOGITS.reshape(-1)
    t_b = to_xp(xp, labels)
    hessian = autodiff_hessian(xp, lambda a: xent.cross_entropy(a, t_b, reduction="none"), logits)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    np.testing.assert_allclose(hessian, np.diag(p) - np.outer(p, p), rtol=0, atol=5e-8)


THREE_D_LABELS = [
    [[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]],
    [[0.0, 0.5, 0.5, 0.0], [0.5, 0.5, 0.0, 0.0]],
    [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]],
]
THREE_D_LOGITS = [
    [[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]],
    [[2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0]],
    [[5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]],
]


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_3d(xp: Any, dim: int) -> None:
    """`XentOpTestBase.test3D`: float32 (3, 2, 4), class axis 0, 1 and -1."""
    want, _ = _np_xent(THREE_D_LABELS, THREE_D_LOGITS, dim=dim)
    loss, _ = _ce_and_grad(xp, THREE_D_LOGITS, THREE_D_LABELS, dtype="float32", axis=dim)
    xp_assert_close(loss, want, xp=xp, dtype="float32")


def test_zero_dimension(xp: Any) -> None:
    """`XentOpTestBase.testZeroDimension`: (0, 2, 4) gives an empty (0, 2) loss."""
    x = np.zeros((0, 2, 4), dtype=np.float32)
    loss, grad = _ce_and_grad(xp, x, x, dtype="float32")
    xp_assert_close(loss, np.zeros((0, 2)), xp=xp, dtype="float32")
    xp_assert_close(grad, np.zeros((0, 2, 4)), xp=xp, dtype="float32")


# --- SparseXentOpTestBase ---------------------------------------------------------------------


@pytest.mark.parametrize("label_dtype", ["int32", "int64"])
def test_sparse_single_class(xp: Any, label_dtype: str) -> None:
    """`SparseXentOpTestBase.testSingleClass`: one class, labels 0: loss and gradient 0."""
    labels = np.array([0, 0, 0], dtype=label_dtype)
    loss, grad = _ce_and_grad(xp, [[1.0], [-1.0], [0.0]], labels, dtype="float32")
    xp_assert_close(loss, [0.0] * 3, xp=xp, dtype="float32", rtol=0, atol=0)
    xp_assert_close(grad, np.zeros((3, 1)), xp=xp, dtype="float32", rtol=0, atol=0)


def test_sparse_np_xent(xp: Any) -> None:
    """`SparseXentOpTestBase.testNpXent`: labels [3, 0]: loss [1.3862, 3.4420], gradient
    [[0.25, 0.25, 0.25, -0.75], [-0.968, 0.087, 0.237, 0.6439]]."""
    loss, grad = _ce_and_grad(xp, LOGITS, np.array([3, 0]))
    xp_assert_close(loss, [1.3862, 3.4420], xp=xp, dtype="float64", **RTOL_1E3)
    want = [[0.25, 0.25, 0.25, -0.75], [-0.968, 0.087, 0.237, 0.6439]]
    xp_assert_close(grad, want, xp=xp, dtype="float64", **RTOL_1E3)


INVALID_LOGITS = [
    [1.0, 1.0, 1.0, 1.0],
    [1.0, 1.0, 1.0, 1.0],
    [1.0, 2.0, 3.0, 4.0],
    [1.0, 2.0, 3.0, 4.0],
]
INVALID_LABELS = np.array([4, 3, 0, -1])


def test_sparse_invalid_label_cpu(xp: Any) -> None:
    """`SparseXentOpTestBase.testInvalidLabelCPU`: labels 4 and -1 for 4 classes raise where they
    are concrete (TensorFlow: "Received a label value of"); lazily (Dask) they give NaN."""
    if is_concrete_host():
        with pytest.raises(ValueError, match="4"):
            _ce_and_grad(xp, INVALID_LOGITS, INVALID_LABELS)
    else:
        loss = xent.cross_entropy(to_xp(xp, np.array(INVALID_LOGITS)), to_xp(xp, INVALID_LABELS))
        xp_assert_close(loss, np.nan, xp=xp, dtype="float64")


def test_sparse_invalid_label_gpu(xp: Any) -> None:
    """`SparseXentOpTestBase.testInvalidLabelGPU` (what TensorFlow does without a check): loss
    [NaN, 1.3862, 3.4420, NaN] and NaN gradient rows for the invalid labels; xent gives the same
    with `validate=False`, on every backend."""
    loss, grad = _ce_and_grad(xp, INVALID_LOGITS, INVALID_LABELS, validate=False)
    xp_assert_close(loss, [np.nan, 1.3862, 3.4420, np.nan], xp=xp, dtype="float64", **RTOL_1E3)
    want = [[np.nan] * 4, [0.25, 0.25, 0.25, -0.75], [-0.968, 0.087, 0.237, 0.6439], [np.nan] * 4]
    xp_assert_close(grad, want, xp=xp, dtype="float64", **RTOL_1E3)


@pytest.mark.parametrize(
    ("labels", "logits"),
    [
        (np.array([[0, 2]]), [[0.0, 1.0], [2.0, 3.0], [2.0, 3.0]]),
        (np.array(0), 1.0),
    ],
    ids=["rank", "scalar"],
)
def test_sparse_shape_mismatch_and_scalar(xp: Any, labels: np.ndarray, logits: Any) -> None:
    """`SparseXentOpTestBase.testShapeMismatch` (labels rank must be logits rank - 1) and
    `testScalar` (logits cannot be a scalar)."""
    with pytest.raises(ValueError, match=r"shape|dimension"):
        _ce_and_grad(xp, logits, labels)


def test_sparse_vector(xp: Any) -> None:
    """`SparseXentOpTestBase.testVector`: one example of one class, a 0-d label: loss 0."""
    loss, _ = _ce_and_grad(xp, [1.0], np.array(0))
    xp_assert_close(loss, 0.0, xp=xp, dtype="float64")


@pytest.mark.parametrize("label_dtype", ["int32", "int64"])
@pytest.mark.parametrize(
    ("dtype", "labels"),
    [("float32", [3, 0]), ("float64", [0, 3]), ("float16", [3, 0]), ("bfloat16", [3, 0])],
    ids=["testFloat", "testDouble", "testHalf", "testBfloat16"],
)
def test_sparse_dtypes(xp: Any, dtype: str, labels: list[int], label_dtype: str) -> None:
    """`SparseXentOpTestBase.testFloat`, `testDouble`, `testHalf`, `testBfloat16`, for int32 and
    int64 labels: `_npXent`'s loss and gradient."""
    t = np.array(labels, dtype=label_dtype)
    want_loss, want_grad = _np_xent(np.eye(4)[t], LOGITS)
    loss, grad = _ce_and_grad(xp, LOGITS, t, dtype=dtype)
    xp_assert_close(loss, want_loss, xp=xp, dtype=dtype)
    xp_assert_close(grad, want_grad, xp=xp, dtype=dtype)


def test_sparse_empty(xp: Any) -> None:
    """`SparseXentOpTestBase.testEmpty`: labels (0,), logits (0, 3)."""
    loss, grad = _ce_and_grad(xp, np.zeros((0, 3)), np.zeros((0,), dtype=np.int32))
    xp_assert_close(loss, np.zeros(0), xp=xp, dtype="float64")
    xp_assert_close(grad, np.zeros((0, 3)), xp=xp, dtype="float64")


def test_sparse_gradient(xp: Any) -> None:
    """`SparseXentOpTestBase.testGradient`: labels [3, 0, 1], the gradient agrees with finite
    differences to 5e-8."""
    t = np.array([3, 0, 1])
    _, grad = _ce_and_grad(xp, GRADIENT_LOGITS, t)

    def loss(a: np.ndarray) -> Any:
        return to_numpy(_ce_and_grad(xp, a, t)[0])

    want = numerical_grad(loss, GRADIENT_LOGITS)
    xp_assert_close(grad, want, xp=xp, dtype="float64", rtol=5e-8, atol=5e-8)


@pytest.mark.only_backends(*AUTODIFF)
def test_sparse_second_gradient(xp: Any) -> None:
    """`SparseXentOpTestBase.testSecondGradient`: labels [3, 0, 1]; the Hessian of each row is
    `diag(p) - p p^T` (block diagonal over the rows)."""
    logits = np.array([0.3, 0.4, 0.1, 1.2, 0.1, 1.9, 0.1, 0.7, 0.8, 0.2, 1.3, 1.3])
    t_b = to_xp(xp, np.array([3, 0, 1]))

    def loss(a: Any) -> Any:
        return xent.cross_entropy(xp.reshape(a, (3, 4)), t_b, reduction="none")

    hessian = autodiff_hessian(xp, loss, logits)
    want = np.zeros((12, 12))
    for row in range(3):
        z = logits[4 * row : 4 * row + 4]
        p = np.exp(z - z.max())
        p /= p.sum()
        want[4 * row : 4 * row + 4, 4 * row : 4 * row + 4] = np.diag(p) - np.outer(p, p)
    np.testing.assert_allclose(hessian, want, rtol=0, atol=5e-8)


@pytest.mark.parametrize(
    ("labels", "logits"),
    [
        ([[3], [0]], [[[1.0, 1.0, 1.0, 1.0]], [[1.0, 2.0, 3.0, 4.0]]]),
        ([[3, 2], [0, 3]], [[[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]],
                            [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]]),
    ],
    ids=["testHighDim", "testHighDim2"],
)  # fmt: skip
def test_sparse_high_dim(xp: Any, labels: Any, logits: Any) -> None:
    """`SparseXentOpTestBase.testHighDim` and `testHighDim2`: labels of rank 2."""
    t = np.array(labels)
    want_loss, want_grad = _np_xent(np.eye(4)[t], logits)
    loss, grad = _ce_and_grad(xp, logits, t)
    xp_assert_close(loss, want_loss, xp=xp, dtype="float64")
    xp_assert_close(grad, want_grad, xp=xp, dtype="float64")


# --- losses_test.py: SoftmaxCrossEntropyLossTest / SparseSoftmaxCrossEntropyLossTest ----------

TEN = [[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]]
CORRECT = np.array([0, 1, 2])
WRONG = np.array([2, 0, 1])

# (labels, sample weights, TensorFlow's value): testAllCorrect*, testAllWrong*,
# testNonZeroLossWith*Weight*, testAllWrongAllWeightsMissing, testSomeWeightsMissing
TF_LOSS_CASES = {
    "testAllCorrect": (CORRECT, None, 0.0),
    "testAllWrong": (WRONG, None, 10.0),
    "testNonZeroLossWithPythonScalarWeight": (WRONG, [2.3, 2.3, 2.3], 23.0),
    "testNonZeroLossWithOneDimBatchSpecificWeights": (WRONG, [1.2, 3.4, 5.6], 34.0),
    "testAllWrongAllWeightsMissing": (WRONG, [0.0, 0.0, 0.0], 0.0),
    "testSomeWeightsMissing": (WRONG, [1.2, 0.0, 0.0], 12.0),
}


def _tf_ce(xp: Any, t: np.ndarray, kind: str, w: Any, **kw: Any) -> Any:
    target = to_xp(xp, np.eye(3)[t]) if kind == "dense" else to_xp(xp, t)
    sample_weight = None if w is None else to_xp(xp, np.asarray(w))
    return xent.cross_entropy(to_xp(xp, np.array(TEN)), target, sample_weight=sample_weight, **kw)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("case", list(TF_LOSS_CASES))
def test_losses_softmax_cross_entropy(xp: Any, case: str, kind: str) -> None:
    """losses_test.py, `SoftmaxCrossEntropyLossTest` and `SparseSoftmaxCrossEntropyLossTest`:
    the named cases. TensorFlow divides the weighted sum by the count of non-zero weights; xent's
    "sum" divided by that count gives TensorFlow's value, and its "mean" is the weighted mean
    (10 for every wrong case; NaN when every weight is 0, by design)."""
    t, w, tf_value = TF_LOSS_CASES[case]
    total = _tf_ce(xp, t, kind, w, reduction="sum")
    nonzero = 3 if w is None else np.count_nonzero(w)
    if nonzero:
        np.testing.assert_allclose(to_numpy(total) / nonzero, tf_value, **PLACES_3)
    else:
        xp_assert_close(total, 0.0, xp=xp, dtype="float64")
    mean = _tf_ce(xp, t, kind, w)
    want = np.nan if nonzero == 0 else (0.0 if case == "testAllCorrect" else 10.0)
    xp_assert_close(mean, want, xp=xp, dtype="float64", **PLACES_3)


@pytest.mark.parametrize("label_dtype", ["int32", "int64"])
@pytest.mark.parametrize("case", ["AllCorrect", "AllWrong"])
def test_losses_sparse_label_dtypes(xp: Any, case: str, label_dtype: str) -> None:
    """losses_test.py, `SparseSoftmaxCrossEntropyLossTest.testAllCorrectInt32Labels`,
    `...Int64Labels`, `testAllWrongInt32Labels`, `...Int64Labels`."""
    t = (CORRECT if case == "AllCorrect" else WRONG).astype(label_dtype)
    got = xent.cross_entropy(to_xp(xp, np.array(TEN)), to_xp(xp, t))
    xp_assert_close(got, 0.0 if case == "AllCorrect" else 10.0, xp=xp, dtype="float64", **PLACES_3)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_losses_softmax_label_smoothing(xp: Any, kind: str) -> None:
    """losses_test.py, `SoftmaxCrossEntropyLossTest.testSoftmaxLabelSmoothing`: 400 * 0.1 / 3."""
    t = np.array([[1.0, 0.0, 0.0]]) if kind == "dense" else np.array([0])
    got = xent.cross_entropy(
        to_xp(xp, np.array([[100.0, -100.0, -100.0]])), to_xp(xp, t), label_smoothing=0.1
    )
    xp_assert_close(got, 400.0 * 0.1 / 3.0, xp=xp, dtype="float64", **PLACES_3)


@pytest.mark.parametrize(
    ("kind", "labels", "weights"),
    [
        ("dense", CORRECT, np.array([[3, 4, 5], [2, 6, 0], [8, 0, 1]], dtype=np.float64)),
        ("sparse", CORRECT, np.array([[3, 4, 5], [2, 6, 0], [8, 0, 1]], dtype=np.float64)),
        ("sparse", CORRECT, np.array([1.2, 3.4, 5.6, 7.8])),
        ("sparse", np.array([0, 1, 2, 3]), np.array([1.2, 3.4, 5.6])),
    ],
    ids=[
        "testSoftmaxWithMeasurementSpecificWeightsRaisesException",
        "testMeasurementSpecificWeightsRaisesException",
        "testInconsistentWeightSizeRaisesException",
        "testInconsistentLabelSizeRaisesException",
    ],
)
def test_losses_inconsistent_shapes_raise(
    xp: Any, kind: str, labels: np.ndarray, weights: np.ndarray
) -> None:
    """losses_test.py, the `...RaisesException` cases: per-class weights, weights or labels of
    the wrong length."""
    x = np.array([[100.0, -100.0, -100.0], [-100.0, 100.0, -100.0], [-100.0, -100.0, 100.0]])
    target = np.eye(3)[labels] if kind == "dense" else labels
    with pytest.raises(ValueError, match=r"sample_weight|target"):
        xent.cross_entropy(to_xp(xp, x), to_xp(xp, target), sample_weight=to_xp(xp, weights))


@pytest.mark.parametrize(
    ("labels", "weights"),
    [
        (np.array([0, 1, 2, 3]), np.array([[1.2, 3.4], [5.6, 7.8]])),
        (np.array([[0, 1], [2, 3]]), None),
    ],
    ids=["testInconsistentWeightShapeRaisesException", "testInconsistentLabelShapeRaisesException"],
)
def test_losses_inconsistent_4x4_shapes_raise(
    xp: Any, labels: np.ndarray, weights: np.ndarray | None
) -> None:
    """losses_test.py, `SparseSoftmaxCrossEntropyLossTest.testInconsistentWeightShape...` and
    `testInconsistentLabelShapeRaisesException` (4 x 4 logits)."""
    x = np.where(np.eye(4) > 0, 100.0, -100.0)
    sample_weight = None if weights is None else to_xp(xp, weights)
    with pytest.raises(ValueError, match=r"sample_weight|target"):
        xent.cross_entropy(to_xp(xp, x), to_xp(xp, labels), sample_weight=sample_weight)


def test_losses_sigmoid_label_smoothing_equals_softmax_two_label(xp: Any) -> None:
    """losses_test.py, `SigmoidCrossEntropyLossTest.testSigmoidLabelSmoothingEqualsSoftmaxTwoLabel`:
    binary cross-entropy with smoothing 0.1 equals the two-class cross-entropy with smoothing
    0.1."""
    sigmoid = xent.binary_cross_entropy(
        to_xp(xp, np.array([[100.0, -100.0, -100.0]])),
        to_xp(xp, np.array([[1.0, 0.0, 1.0]])),
        label_smoothing=0.1,
    )
    softmax = xent.cross_entropy(
        to_xp(xp, np.array([[0.0, 100.0], [100.0, 0.0], [100.0, 0.0]])),
        to_xp(xp, np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])),
        label_smoothing=0.1,
    )
    xp_assert_close(sigmoid, to_numpy(softmax), xp=xp, dtype="float64", **PLACES_3)


# --- losses_test.py: LogLossTest --------------------------------------------------------------

LOG_PRED = np.array([0.9, 0.2, 0.2, 0.8, 0.4, 0.6]).reshape(2, 3)
LOG_TRUE = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]).reshape(2, 3)
# TensorFlow's per-element log loss: log(p + 1e-7), not a clip
LOG_EXPECTED = -(LOG_TRUE * np.log(LOG_PRED + 1e-7) + (1 - LOG_TRUE) * np.log(1 - LOG_PRED + 1e-7))

# (weights, TensorFlow's divisor: the count of non-zero weights over the 6 elements)
LOG_LOSS_CASES = {
    "testNonZeroLoss": (None, 6),
    "testNonZeroLossWithPythonScalarWeight": (2.3, 6),
    "testNonZeroLossWithOneDimBatchSpecificWeights": ([[1.2], [3.4]], 6),
    "testNonZeroLossWithOneDimBatchSpecificWeightsSomeZero": ([[1.2], [0.0]], 3),
    "testNonZeroLossWithMeasurementSpecificWeights": ([[3, 6, 5], [0, 4, 2]], 5),
    "testNonZeroLossWithSampleSpecificWeightsMostZero": ([[0, 0, 0], [0, 0, 2]], 1),
    "testLossWithSampleSpecificWeightsAllZero": (np.zeros((2, 3)), 6),
}


@pytest.mark.parametrize("case", list(LOG_LOSS_CASES))
def test_log_loss(xp: Any, case: str) -> None:
    """losses_test.py, `LogLossTest`: the weighted sum of the per-element log loss divided by the
    count of non-zero weights. xent's binary "mean" divides by the element count (by design), so
    TensorFlow's value is xent's "sum" / that count; where every weight is non-zero, the "mean"
    matches too."""
    w, divisor = LOG_LOSS_CASES[case]
    weight = None if w is None else np.broadcast_to(np.asarray(w, dtype=np.float64), (2, 3))
    tf_value = np.sum(LOG_EXPECTED * (1.0 if weight is None else weight)) / divisor
    kw = {"from_logits": False, "weight": None if weight is None else to_xp(xp, weight.copy())}
    total = xent.binary_cross_entropy(
        to_xp(xp, LOG_PRED), to_xp(xp, LOG_TRUE), reduction="sum", **kw
    )
    np.testing.assert_allclose(to_numpy(total) / divisor, tf_value, **PLACES_3)
    if divisor == 6:
        mean = xent.binary_cross_entropy(to_xp(xp, LOG_PRED), to_xp(xp, LOG_TRUE), **kw)
        xp_assert_close(mean, tf_value, xp=xp, dtype="float64", **PLACES_3)


def test_log_loss_all_correct(xp: Any) -> None:
    """losses_test.py, `LogLossTest.testAllCorrectNoLossWeight`: predictions equal to the 0/1
    labels (clipped to [1e-7, 1 - 1e-7]) give (almost) 0."""
    got = xent.binary_cross_entropy(to_xp(xp, LOG_TRUE), to_xp(xp, LOG_TRUE), from_logits=False)
    xp_assert_close(got, 0.0, xp=xp, dtype="float64", **PLACES_3)


def test_log_loss_wrong_weight_shape(xp: Any) -> None:
    """losses_test.py, `LogLossTest.testWeightsWithSameNumDimsButWrongShapeThrowsException`."""
    with pytest.raises(ValueError, match="weight"):
        xent.binary_cross_entropy(
            to_xp(xp, LOG_PRED), to_xp(xp, LOG_TRUE), from_logits=False,
            weight=to_xp(xp, np.ones((2, 4))),
        )  # fmt: skip
