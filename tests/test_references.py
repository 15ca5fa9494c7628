"""Agreement with the libraries xent claims to match: PyTorch's `cross_entropy` and
`binary_cross_entropy_with_logits`, Keras 3's cross-entropy losses (on JAX) and Optax's.

xent runs on the backend under test; the reference library runs once on NumPy copies.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from _helpers import to_numpy, to_xp, xp_assert_close

import xent

REDUCTIONS = ("mean", "sum", "none")


@pytest.fixture(scope="module")
def torch() -> Any:
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def keras() -> Iterator[Any]:
    pytest.importorskip("jax")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_BACKEND", "jax")
        keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"keras was imported earlier with the {keras.backend.backend()} backend")
    return keras


@pytest.fixture(scope="module")
def optax() -> Any:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    return pytest.importorskip("optax")


def _tol(dtype: str) -> dict[str, float]:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == "float64" else {"rtol": 1e-5, "atol": 1e-5}


# --- PyTorch ----------------------------------------------------------------------------------


def _grid(*, ignore_index: bool) -> list[Any]:
    """Every combination of the options PyTorch has, in float64, plus float32 on one corner of
    the grid (the dtype is covered at length against the reference in test_cross_entropy.py)."""
    params = []
    for dtype in ("float64", "float32"):
        for shape in ((6, 5), (3, 4, 2, 3)):
            for weighted in (False, True):
                for ignore in (-100, 2) if ignore_index else (None,):
                    for e in (0.0, 0.25):
                        corner = len(shape) > 2 and weighted and e > 0 and ignore != -100
                        if dtype == "float32" and not corner:
                            continue
                        name = "-".join(
                            [
                                dtype,
                                "NCd1d2" if len(shape) > 2 else "NC",
                                "weighted" if weighted else "unweighted",
                                *([f"ignore{ignore}"] if ignore_index else []),
                                f"e{e}",
                            ]
                        )
                        values = (dtype, shape, weighted, *([ignore] if ignore_index else []), e)
                        params.append(pytest.param(*values, id=name))
    return params


@pytest.mark.parametrize(
    ("dtype", "shape", "weighted", "ignore_index", "label_smoothing"), _grid(ignore_index=True)
)
def test_class_indices_match_torch(
    xp: Any,
    torch: Any,
    rng: np.random.Generator,
    dtype: str,
    shape: tuple[int, ...],
    weighted: bool,
    ignore_index: int,
    label_smoothing: float,
) -> None:
    F = torch.nn.functional
    n_classes = shape[1]
    x = (rng.normal(size=shape) * 3).astype(dtype)
    t = rng.integers(0, n_classes, size=(shape[0], *shape[2:]))
    t.reshape(-1)[::3] = ignore_index  # labels equal to ignore_index
    w = rng.uniform(0.2, 2.0, size=n_classes).astype(dtype) if weighted else None
    for reduction in REDUCTIONS:
        got = xent.cross_entropy(
            to_xp(xp, x),
            to_xp(xp, t),
            axis=1,
            weight=None if w is None else to_xp(xp, w),
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction=reduction,
        )
        want = F.cross_entropy(
            torch.from_numpy(x.astype(np.float64)),
            torch.from_numpy(t),
            weight=None if w is None else torch.from_numpy(w.astype(np.float64)),
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction=reduction,
        )
        xp_assert_close(got, want.numpy(), xp=xp, dtype=dtype, err_msg=reduction, **_tol(dtype))


@pytest.mark.parametrize(
    ("dtype", "shape", "weighted", "label_smoothing"), _grid(ignore_index=False)
)
def test_probability_targets_match_torch(
    xp: Any,
    torch: Any,
    rng: np.random.Generator,
    dtype: str,
    shape: tuple[int, ...],
    weighted: bool,
    label_smoothing: float,
) -> None:
    F = torch.nn.functional
    n_classes = shape[1]
    x = (rng.normal(size=shape) * 3).astype(dtype)
    t = np.moveaxis(rng.dirichlet(np.ones(n_classes), size=(shape[0], *shape[2:])), -1, 1)
    t = t.astype(dtype)
    w = rng.uniform(0.2, 2.0, size=n_classes).astype(dtype) if weighted else None
    for reduction in REDUCTIONS:
        got = xent.cross_entropy(
            to_xp(xp, x),
            to_xp(xp, t),
            axis=1,
            weight=None if w is None else to_xp(xp, w),
            label_smoothing=label_smoothing,
            reduction=reduction,
        )
        want = F.cross_entropy(
            torch.from_numpy(x.astype(np.float64)),
            torch.from_numpy(t.astype(np.float64)),
            weight=None if w is None else torch.from_numpy(w.astype(np.float64)),
            label_smoothing=label_smoothing,
            reduction=reduction,
        )
        xp_assert_close(got, want.numpy(), xp=xp, dtype=dtype, err_msg=reduction, **_tol(dtype))


@pytest.mark.parametrize(
    ("x_shape", "labels"),
    [((3, 4), [-100, -100, -100]), ((0, 4), [])],
    ids=["all-ignored", "empty"],
)
def test_mean_of_nothing_matches_torch(
    xp: Any, torch: Any, x_shape: tuple[int, ...], labels: list[int]
) -> None:
    x = np.ones(x_shape)
    t = np.asarray(labels, dtype=np.int64)
    for reduction in REDUCTIONS:
        want = torch.nn.functional.cross_entropy(
            torch.from_numpy(x), torch.from_numpy(t), reduction=reduction
        )
        got = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction=reduction)
        xp_assert_close(got, want.numpy(), xp=xp, dtype="float64")


def test_minus_inf_logits_match_torch(xp: Any, torch: Any, rng: np.random.Generator) -> None:
    x = rng.normal(size=(4, 5))
    x[:, 3] = -np.inf
    x[1, 0] = -np.inf
    x[2, :] = -np.inf
    t = np.array([0, 2, 1, 3])  # row 1 fine, row 2 all masked, row 3's target masked
    want = torch.nn.functional.cross_entropy(
        torch.from_numpy(x), torch.from_numpy(t), reduction="none"
    ).numpy()
    assert np.isfinite(want[0])
    assert np.isfinite(want[1])
    got = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="none")
    xp_assert_close(got, want, xp=xp, dtype="float64")


@pytest.mark.parametrize("weight_shape", [None, (4,), (3, 1), (3, 4)], ids=str)
@pytest.mark.parametrize("pos_weight_shape", [None, (4,), (1, 4)], ids=str)
@pytest.mark.parametrize("target_kind", ["float", "bool", "int"])
def test_binary_matches_torch(
    xp: Any,
    torch: Any,
    rng: np.random.Generator,
    weight_shape: tuple[int, ...] | None,
    pos_weight_shape: tuple[int, ...] | None,
    target_kind: str,
) -> None:
    F = torch.nn.functional
    x = rng.normal(size=(3, 4)) * 3
    if target_kind == "float":
        t = rng.uniform(size=(3, 4))
    else:
        t = rng.integers(0, 2, size=(3, 4)).astype(target_kind)
    w = None if weight_shape is None else rng.uniform(0.2, 2.0, size=weight_shape)
    pw = None if pos_weight_shape is None else rng.uniform(0.2, 3.0, size=pos_weight_shape)
    for e in (0.0, 0.2):
        for reduction in REDUCTIONS:
            got = xent.binary_cross_entropy(
                to_xp(xp, x),
                to_xp(xp, t),
                weight=None if w is None else to_xp(xp, w),
                pos_weight=None if pw is None else to_xp(xp, pw),
                label_smoothing=e,
                reduction=reduction,
            )
            smoothed = t.astype(np.float64) * (1 - e) + e / 2  # torch has no label smoothing
            want = F.binary_cross_entropy_with_logits(
                torch.from_numpy(x),
                torch.from_numpy(smoothed),
                weight=None if w is None else torch.from_numpy(w),
                pos_weight=None if pw is None else torch.from_numpy(pw),
                reduction=reduction,
            )
            xp_assert_close(
                got, want.numpy(), xp=xp, dtype="float64", err_msg=f"{reduction}, e={e}"
            )


def test_binary_from_probabilities_matches_torch_away_from_the_clip(
    xp: Any, torch: Any, rng: np.random.Generator
) -> None:
    p = rng.uniform(0.01, 0.99, size=(3, 4))
    t = rng.uniform(size=(3, 4))
    w = rng.uniform(0.2, 2.0, size=(4,))
    for reduction in REDUCTIONS:
        got = xent.binary_cross_entropy(
            to_xp(xp, p), to_xp(xp, t), from_logits=False, weight=to_xp(xp, w), reduction=reduction
        )
        want = torch.nn.functional.binary_cross_entropy(
            torch.from_numpy(p),
            torch.from_numpy(t),
            weight=torch.from_numpy(w),
            reduction=reduction,
        )
        xp_assert_close(got, want.numpy(), xp=xp, dtype="float64")


# --- Keras 3 ----------------------------------------------------------------------------------

KERAS_REDUCTIONS = {"mean": "sum_over_batch_size", "sum": "sum", "none": None}


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


# Real Keras 3 values, recorded once, for the fixed example inputs below.
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


# --- Optax ------------------------------------------------------------------------------------


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
