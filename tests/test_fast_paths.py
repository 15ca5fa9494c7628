"""The backends' fused fast paths give exactly what xent's general path gives.

The plain options (logits, class indices, no softcap, z_loss or sample_weight) may be served by a
fused native kernel (``F.cross_entropy`` on the PyTorch CPU, one NumPy pass); these tests compare
each call with the same call through the generic primitives, on the inputs where a native kernel
is most likely to differ: non-finite logits, logits at the dtype's limits, labels of other
integer dtypes, an ``ignore_index`` inside ``[0, C)``, and invalid labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _helpers import to_numpy, to_xp

import xent


def _both(fn: Any) -> tuple[np.ndarray, np.ndarray]:
    """``fn()`` with the current native setting, then with the generic primitives only."""
    ours = to_numpy(fn())
    previous = xent.backends.set_native(False)
    try:
        generic = to_numpy(fn())
    finally:
        xent.backends.set_native(previous)
    return ours, generic


def _logits(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    x = rng.normal(size=(n, c)).astype(np.float32)
    x[1] = -np.inf  # every class masked: NaN
    x[2, 3] = np.inf  # one +inf logit
    x[3, 4] = np.nan
    x[4, :2] = -np.inf  # masked classes, the row still finite
    x[5, 0], x[5, 1] = np.finfo(np.float32).max, -np.finfo(np.float32).max
    return x


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_fast_path_matches_general_path_on_non_finite_rows(
    xp: Any, rng: np.random.Generator, reduction: str, weighted: bool
) -> None:
    x_np = _logits(rng, 8, 6)
    y_np = rng.integers(0, 6, size=8)
    y_np[4] = 0  # the label sits on a -inf logit: +inf for that row
    x, y = to_xp(xp, x_np), to_xp(xp, y_np)
    w = to_xp(xp, rng.random(6) + 0.5, dtype="float32") if weighted else None
    ours, generic = _both(lambda: xent.cross_entropy(x, y, weight=w, reduction=reduction))
    np.testing.assert_allclose(ours, generic, rtol=1e-5, equal_nan=True)
    # The finite rows alone: the plain case every fast path serves.
    keep = np.r_[0, 6, 7]
    xf, yf = to_xp(xp, x_np[keep]), to_xp(xp, y_np[keep])
    wf = w
    ours, generic = _both(lambda: xent.cross_entropy(xf, yf, weight=wf, reduction=reduction))
    np.testing.assert_allclose(ours, generic, rtol=1e-5)
    # The loss and gradient in one call (the gradient on finite rows: there the PyTorch
    # native softmax and the generic exp agree).
    for part, (a, b) in enumerate([(x, y), (xf, yf)]):

        def call(a: Any = a, b: Any = b, part: int = part) -> Any:
            return xent.cross_entropy_and_grad(a, b, weight=w, reduction=reduction)[part]

        ours, generic = _both(call)
        np.testing.assert_allclose(ours, generic, rtol=1e-5, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("label_dtype", ["int8", "int32", "int64"])
def test_fast_path_matches_general_path_for_label_dtypes_and_ignore_index(
    xp: Any, rng: np.random.Generator, label_dtype: str
) -> None:
    x = to_xp(xp, rng.normal(size=(7, 5)), dtype="float32")
    y_np = rng.integers(0, 5, size=7)
    y_np[2] = 2
    y = to_xp(xp, y_np, dtype=label_dtype)
    for ignore_index in (-100, 2, 4):
        ours, generic = _both(lambda i=ignore_index: xent.cross_entropy(x, y, ignore_index=i))
        np.testing.assert_allclose(ours, generic, rtol=1e-5)
    one = to_xp(xp, rng.normal(size=5), dtype="float32")
    label = to_xp(xp, np.asarray(3), dtype=label_dtype)
    ours, generic = _both(lambda: xent.cross_entropy(one, label, reduction="none"))
    np.testing.assert_allclose(ours, generic, rtol=1e-5)


def test_fast_path_declines_invalid_labels(xp: Any, rng: np.random.Generator) -> None:
    x = to_xp(xp, rng.normal(size=(4, 3)), dtype="float32")
    y = to_xp(xp, np.asarray([0, 3, 1, -7]))
    ours, generic = _both(lambda: xent.cross_entropy(x, y, validate=False, reduction="none"))
    np.testing.assert_array_equal(np.isnan(ours), [False, True, False, True])
    np.testing.assert_allclose(ours, generic, rtol=1e-5, equal_nan=True)
