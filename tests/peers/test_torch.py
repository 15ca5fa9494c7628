"""PyTorch's own cross-entropy tests, ported: xent on every backend against live PyTorch.

Sources (PyTorch repository):
- `torch/testing/_internal/common_modules.py`: the module inputs of `CrossEntropyLoss`, `NLLLoss`
  and `BCEWithLogitsLoss` (`module_inputs_torch_nn_*`);
- `torch/testing/_internal/common_nn.py`: the `NLLLoss*_no_reduce*` and `BCEWithLogitsLoss_*`
  entries;
- `test/test_nn.py`: `TestNN` / `TestNNDeviceType` tests named in each test's docstring.

xent runs on the backend under test; PyTorch runs once per case on float64 NumPy copies. The
literal values those tests assert are asserted too. `NLLLoss` takes log-probabilities: xent's
`cross_entropy` of log-probabilities is the same loss (`log_softmax` of a `log_softmax` is
itself), so the `NLLLoss` cases feed normalised log-probabilities to both.

Differences by design, asserted as xent documents them:
- xent raises `ValueError` for every bad argument where PyTorch raises `RuntimeError` or
  `IndexError` (label out of range, label smoothing outside `[0, 1]`, shapes, weights).
- With no class (`C = 0`) xent raises `ValueError`; PyTorch returns an empty-class loss.
- Where label values are not concrete on the host (Dask), an out-of-range label gives NaN
  instead of an error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _helpers import is_concrete_host, to_numpy, to_xp, xp_assert_close
from _peers import AUTODIFF, autodiff_grad

import xent

torch = pytest.importorskip("torch", reason="the reference values are live PyTorch calls")
F = torch.nn.functional

REDUCTIONS = ("mean", "sum", "none")


def _t(a: np.ndarray) -> Any:
    return torch.from_numpy(np.array(a, copy=True))


def _torch_ce(x: np.ndarray, t: np.ndarray, **kw: Any) -> np.ndarray:
    """`F.cross_entropy` in float64 (class axis 1), on NumPy copies."""
    if kw.get("weight") is not None:
        kw["weight"] = _t(np.asarray(kw["weight"], np.float64))
    t_t = _t(t.astype(np.float64)) if t.dtype.kind == "f" else _t(t.astype(np.int64))
    return F.cross_entropy(_t(x.astype(np.float64)), t_t, **kw).numpy()


def _xent_ce(xp: Any, x: np.ndarray, t: np.ndarray, **kw: Any) -> Any:
    if kw.get("weight") is not None:
        kw["weight"] = to_xp(xp, np.asarray(kw["weight"]))
    return xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), **kw)


def _torch_bce(x: np.ndarray, t: np.ndarray, **kw: Any) -> np.ndarray:
    for name in ("weight", "pos_weight"):
        if kw.get(name) is not None:
            kw[name] = _t(np.asarray(kw[name], np.float64))
    return F.binary_cross_entropy_with_logits(
        _t(x.astype(np.float64)), _t(t.astype(np.float64)), **kw
    ).numpy()


def _xent_bce(xp: Any, x: np.ndarray, t: np.ndarray, **kw: Any) -> Any:
    for name in ("weight", "pos_weight"):
        if kw.get(name) is not None:
            kw[name] = to_xp(xp, np.asarray(kw[name]))
    return xent.binary_cross_entropy(to_xp(xp, x), to_xp(xp, t), **kw)


def _log_softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


# --- common_modules.py: module_inputs_torch_nn_CrossEntropyLoss --------------------------------

_CE_OPTIONS = {
    "": {},
    "weights": {"weight": "random"},
    "ignore_index": {"ignore_index": 1},
    "label_smoothing": {"label_smoothing": 0.15},
    "ignore_index_label_smoothing": {"ignore_index": 1, "label_smoothing": 0.15},
}
_CE_INDEX_SHAPES = {
    "4d": (2, 3, 5, 5),
    "3d": (2, 3, 5),
    "2d": (2, 3),
    "higher_dim": (2, 3, 5, 5, 2, 2),
}
_CE_PROB_SHAPES = {
    "4d_prob_target": (5, 3, 4, 2),
    "3d_prob_target": (5, 3, 4),
    "2d_prob_target": (5, 3),
    "higher_dim_prob_target": (2, 3, 5, 5, 2, 2),
}


def _ce_module_inputs() -> list[Any]:
    params = []
    for desc, opts in _CE_OPTIONS.items():
        shapes = dict(_CE_INDEX_SHAPES)
        if "ignore_index" not in opts:
            shapes |= _CE_PROB_SHAPES
            shapes["no_batch_dim"] = (3,)
        for kind, shape in shapes.items():
            params.append(pytest.param(kind, shape, opts, id=f"{kind}_{desc}".rstrip("_")))
    return params


@pytest.mark.parametrize(("kind", "shape", "opts"), _ce_module_inputs())
def test_cross_entropy_loss_module_inputs(
    xp: Any, rng: np.random.Generator, kind: str, shape: tuple[int, ...], opts: dict[str, Any]
) -> None:
    """common_modules.py, `module_inputs_torch_nn_CrossEntropyLoss`: every ModuleInput (4d, 3d,
    2d, higher_dim, prob targets, no_batch_dim) x (plain, weights, ignore_index, label_smoothing,
    both) x (mean, sum, none)."""
    x = rng.normal(size=shape) * 3
    axis = 0 if kind == "no_batch_dim" else 1
    if "prob_target" in kind:
        t = np.exp(_log_softmax(rng.normal(size=shape) * 3, axis=1))
    else:
        t = rng.integers(0, 3, size=shape[:axis] + shape[axis + 1 :])
    kw = dict(opts)
    if kw.get("weight") == "random":
        kw["weight"] = rng.uniform(0.1, 2.0, size=3)
    for reduction in REDUCTIONS:
        if kind == "no_batch_dim":
            # `no_batch_dim_reference_fn`: the loss of the same input with a batch of one
            want = _torch_ce(x[None], t[None], reduction=reduction, **kw)
            want = want[0] if reduction == "none" else want
        else:
            want = _torch_ce(x, t, reduction=reduction, **kw)
        got = _xent_ce(xp, x, t, axis=axis, reduction=reduction, **kw)
        xp_assert_close(got, want, xp=xp, dtype="float64", err_msg=reduction)


# --- common_modules.py: module_inputs_torch_nn_NLLLoss ----------------------------------------

_NLL_OPTIONS = {
    "": {},
    "reduction_sum": {"reduction": "sum"},
    "reduction_none": {"reduction": "none"},
    "ignore_index": {"ignore_index": 2},
    "weights": {"weight": "random"},
    "weights_ignore_index": {"weight": "random", "ignore_index": 2},
    "weights_ignore_index_neg": {"weight": "random", "ignore_index": -1},
}
_NLL_SHAPES = {"": (15, 4), "nd": (2, 4, 5, 5), "higher_dim": (2, 4, 5, 5, 2, 2), "3d": (2, 4, 5)}


@pytest.mark.parametrize("desc", list(_NLL_OPTIONS))
@pytest.mark.parametrize("kind", list(_NLL_SHAPES))
def test_nll_loss_module_inputs(xp: Any, rng: np.random.Generator, kind: str, desc: str) -> None:
    """common_modules.py, `module_inputs_torch_nn_NLLLoss`: (15, 4), nd, higher_dim and 3d inputs
    x the seven constructor cases, on log-probabilities (`make_input(...).log_softmax(dim=1)`)."""
    shape = _NLL_SHAPES[kind]
    logp = _log_softmax(rng.normal(size=shape) * 2)
    t = rng.integers(0, 4, size=(shape[0], *shape[2:]))
    kw = dict(_NLL_OPTIONS[desc])
    if kw.get("weight") == "random":
        kw["weight"] = rng.uniform(0.1, 2.0, size=4)
    torch_kw = dict(kw)
    if torch_kw.get("weight") is not None:
        torch_kw["weight"] = _t(torch_kw["weight"])
    want = F.nll_loss(_t(logp), _t(t), **torch_kw).numpy()
    got = _xent_ce(xp, logp, t, axis=1, **kw)
    xp_assert_close(got, want, xp=xp, dtype="float64")


# --- common_nn.py: NLLLoss*_no_reduce* entries ------------------------------------------------

_NLL_NO_REDUCE = {
    "NLLLoss_no_reduce": ((15, 10), {}),
    "NLLLoss_no_reduce_ignore_index": ((15, 10), {"ignore_index": 2}),
    "NLLLoss_no_reduce_weights": ((15, 10), {"weight": True}),
    "NLLLoss_no_reduce_weights_ignore_index": ((15, 10), {"weight": True, "ignore_index": 2}),
    "NLLLoss_no_reduce_weights_ignore_index_neg": (
        (15, 10),
        {"weight": True, "ignore_index": -1},
    ),
    "NLLLoss2d_no_reduce": ((2, 3, 5, 5), {}),
    "NLLLoss2d_no_reduce_ignore_index": ((2, 3, 5, 5), {"ignore_index": 1}),
    "NLLLoss2d_no_reduce_weights": ((2, 3, 5, 5), {"weight": True}),
    "NLLLossNd_no_reduce": ((2, 3, 5, 5, 2, 2), {}),
    "NLLLossNd_no_reduce_ignore_index": ((2, 3, 5, 5, 2, 2), {"ignore_index": 1}),
    "NLLLossNd_no_reduce_weights": ((2, 3, 5, 5, 2, 2), {"weight": True}),
}


@pytest.mark.parametrize("name", list(_NLL_NO_REDUCE))
def test_nll_loss_no_reduce_entries(xp: Any, rng: np.random.Generator, name: str) -> None:
    """common_nn.py, the `NLLLoss*_no_reduce*` entries (reduction "none"; the entries feed
    `torch.rand(...).log()`, here normalised so that xent's log-softmax leaves it unchanged)."""
    shape, opts = _NLL_NO_REDUCE[name]
    c = shape[1]
    logp = _log_softmax(np.log(rng.uniform(1e-2, 1.0, size=shape)))
    t = rng.integers(0, c, size=(shape[0], *shape[2:]))
    weight = rng.uniform(0.0, 1.0, size=c) if opts.get("weight") else None
    ignore = opts.get("ignore_index", -100)
    want = F.nll_loss(
        _t(logp),
        _t(t),
        weight=None if weight is None else _t(weight),
        ignore_index=ignore,
        reduction="none",
    ).numpy()
    got = _xent_ce(xp, logp, t, axis=1, weight=weight, ignore_index=ignore, reduction="none")
    xp_assert_close(got, want, xp=xp, dtype="float64")


# --- common_modules.py / common_nn.py: BCEWithLogitsLoss ---------------------------------------

_BCE_MODULE_CASES = {
    "": {},
    "reduction_sum": {"reduction": "sum"},
    "reduction_mean": {"reduction": "mean"},
    "reduction_none": {"reduction": "none"},
    "weights": {"weight": (10,)},
    "scalar_weights": {"weight": ()},
}


@pytest.mark.parametrize("desc", list(_BCE_MODULE_CASES))
def test_bce_with_logits_loss_module_inputs(xp: Any, rng: np.random.Generator, desc: str) -> None:
    """common_modules.py, `module_inputs_torch_nn_BCEWithLogitsLoss`: input (15, 10) in
    [0.01, 0.99], target `make_target(...).gt(0)`, weight of shape (10,) or a 0-d weight."""
    x = rng.uniform(1e-2, 1 - 1e-2, size=(15, 10))
    t = (rng.normal(size=(15, 10)) > 0).astype(np.float64)
    kw: dict[str, Any] = dict(_BCE_MODULE_CASES[desc])
    if "weight" in kw:
        kw["weight"] = rng.normal(size=kw["weight"])
    want = _torch_bce(x, t, **kw)
    got = _xent_bce(xp, x, t, **kw)
    xp_assert_close(got, want, xp=xp, dtype="float64")


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("BCEWithLogitsLoss_legacy_enum", (15, 10)),
        ("BCEWithLogitsLoss_no_reduce", (15, 10)),
        ("BCEWithLogitsLoss_no_reduce_scalar", ()),
    ],
)
def test_bce_with_logits_no_reduce_entries(
    xp: Any, rng: np.random.Generator, name: str, shape: tuple[int, ...]
) -> None:
    """common_nn.py, `bce_with_logistic_legacy_enum_test`, `_no_reduce_test` and
    `_no_reduce_scalar_test`: reference `-(t * log(sigmoid(i)) + (1 - t) * log(1 - sigmoid(i)))`,
    a 0-d input included."""
    x = np.asarray(rng.uniform(2.8e-2, 1 - 2.8e-2, size=shape))
    t = np.asarray(rng.normal(size=shape) > 0, dtype=np.float64)
    s = 1 / (1 + np.exp(-x))
    reference = -(t * np.log(s) + (1 - t) * np.log(1 - s))
    got = _xent_bce(xp, x, t, reduction="none")
    xp_assert_close(got, reference, xp=xp, dtype="float64", rtol=1e-12)
    xp_assert_close(got, _torch_bce(x, t, reduction="none"), xp=xp, dtype="float64")


# --- test/test_nn.py: cross-entropy -----------------------------------------------------------


def test_cross_entropy_loss_precision(xp: Any, rng: np.random.Generator) -> None:
    """test_nn.py, `TestNN.test_cross_entropy_loss_precision`: float32 agrees with float64 (there
    on (128, 2, 768, 768); here (8, 2, 32, 32), the same layout)."""
    x = rng.normal(size=(8, 2, 32, 32))
    t = rng.integers(0, 2, size=(8, 32, 32))
    want = _torch_ce(x, t)
    for dtype in ("float32", "float64"):
        got = xent.cross_entropy(to_xp(xp, x.astype(dtype)), to_xp(xp, t), axis=1)
        xp_assert_close(got, want, xp=xp, dtype=dtype)


def test_cross_entropy_loss_zero_div(xp: Any) -> None:
    """test_nn.py, `TestNNDeviceType.test_cross_entropy_loss_zero_div`: a (5, 0) input with (5, 0)
    probability targets. Difference by design: PyTorch returns a value for zero classes, xent
    raises `ValueError` for `C = 0`."""
    x = np.zeros((5, 0))
    with pytest.raises(ValueError, match="class"):
        xent.cross_entropy(to_xp(xp, x), to_xp(xp, x))


@pytest.mark.parametrize("label_smoothing", [-0.1, 1.1])
def test_cross_entropy_label_smoothing_errors(xp: Any, label_smoothing: float) -> None:
    """test_nn.py, `TestNNDeviceType.test_cross_entropy_label_smoothing_errors`: smoothing
    outside [0, 1] is an error (PyTorch: `RuntimeError`; xent: `ValueError`, by design)."""
    x = np.zeros((3, 4))
    t = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="label_smoothing"):
        xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), label_smoothing=label_smoothing)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.05, 0.15])
@pytest.mark.parametrize("other_dims", [(), (2,), (3, 2)], ids=["k0", "k1", "k2"])
def test_cross_entropy_label_smoothing_consistent_index_target_and_probs(
    xp: Any,
    rng: np.random.Generator,
    other_dims: tuple[int, ...],
    label_smoothing: float,
    reduction: str,
) -> None:
    """test_nn.py, `TestNNDeviceType.test_cross_entropy_label_smoothing_consistent_index_target_
    and_probs`: smoothing class indices equals passing the smoothed one-hot as probabilities."""
    n, c = 10, 4
    x = rng.normal(size=(n, c, *other_dims))
    t = rng.integers(0, c, size=(n, *other_dims))
    probs = np.moveaxis(np.eye(c)[t], -1, 1) * (1 - label_smoothing) + label_smoothing / c
    got_index = _xent_ce(xp, x, t, axis=1, label_smoothing=label_smoothing, reduction=reduction)
    got_probs = _xent_ce(xp, x, probs, axis=1, reduction=reduction)
    want = _torch_ce(x, t, label_smoothing=label_smoothing, reduction=reduction)
    xp_assert_close(got_index, want, xp=xp, dtype="float64")
    xp_assert_close(got_probs, to_numpy(got_index), xp=xp, dtype="float64")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.05, 0.15])
@pytest.mark.parametrize("other_dims", [(), (2,), (3, 2)], ids=["k0", "k1", "k2"])
def test_cross_entropy_label_smoothing_with_probs(
    xp: Any,
    rng: np.random.Generator,
    other_dims: tuple[int, ...],
    label_smoothing: float,
    reduction: str,
) -> None:
    """test_nn.py, `TestNNDeviceType.test_cross_entropy_label_smoothing_with_probs`: smoothing
    probability targets equals smoothing them by hand first."""
    n, c = 10, 4
    x = rng.normal(size=(n, c, *other_dims))
    probs = np.exp(_log_softmax(rng.normal(size=(n, c, *other_dims))))
    smoothed = (1 - label_smoothing) * probs + label_smoothing / c
    got = _xent_ce(xp, x, probs, axis=1, label_smoothing=label_smoothing, reduction=reduction)
    by_hand = _xent_ce(xp, x, smoothed, axis=1, reduction=reduction)
    xp_assert_close(got, to_numpy(by_hand), xp=xp, dtype="float64")
    want = _torch_ce(x, probs, label_smoothing=label_smoothing, reduction=reduction)
    xp_assert_close(got, want, xp=xp, dtype="float64")


@pytest.mark.parametrize("weighted", [False, True], ids=["no-weight", "weight"])
@pytest.mark.parametrize("label_smoothing", [0.05, 0.15])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_label_smoothing_weight_ignore_indices(
    xp: Any, reduction: str, label_smoothing: float, weighted: bool
) -> None:
    """test_nn.py, `TestNNDeviceType.test_cross_entropy_label_smoothing_weight_ignore_indices`:
    an ignored row changes nothing, whatever its logits, and is not counted by "mean"; with the
    default, a negative and a positive `ignore_index`."""
    weight = np.array([0.3, 0.6]) if weighted else None
    inp1 = np.array([[0.3, 0.4], [1.0, 2.0]])
    inp2 = np.array([[0.3, 0.6], [1.0, 2.0]])
    kw = {"reduction": reduction, "label_smoothing": label_smoothing, "weight": weight}
    for ignore_index, targ in ((-100, [-100, 1]), (-2, [-2, 1]), (2, [2, 1])):
        t = np.array(targ)
        kw_i = dict(kw, ignore_index=ignore_index)
        got1 = _xent_ce(xp, inp1, t, **kw_i)
        got2 = _xent_ce(xp, inp2, t, **kw_i)
        xp_assert_close(got1, to_numpy(got2), xp=xp, dtype="float64", err_msg=str(ignore_index))
        xp_assert_close(got1, _torch_ce(inp1, t, **kw_i), xp=xp, dtype="float64")
        if reduction != "none":
            # the denominator of "mean" does not count the ignored row
            got3 = _xent_ce(xp, inp2[1:], t[1:], **kw_i)
            xp_assert_close(got1, to_numpy(got3), xp=xp, dtype="float64")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_cross_entropy_loss_prob_target_all_reductions(
    xp: Any, rng: np.random.Generator, k: int, reduction: str
) -> None:
    """test_nn.py, `TestNNDeviceType.test_cross_entropy_loss_prob_target_all_reductions`:
    probability targets of rank 2 to 2 + k with class weights."""
    n, c = 5, 4
    other = (3, 2, 2)[: k - 1]
    x = rng.normal(size=(n, c, *other))
    t = np.exp(_log_softmax(rng.normal(size=(n, c, *other))))
    w = np.abs(rng.normal(size=c))
    want = _torch_ce(x, t, weight=w, reduction=reduction)
    xp_assert_close(
        _xent_ce(xp, x, t, axis=1, weight=w, reduction=reduction), want, xp=xp, dtype="float64"
    )


@pytest.mark.parametrize("target", ["prob", "index"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_loss_unit_weights(
    xp: Any, rng: np.random.Generator, reduction: str, target: str
) -> None:
    """test_nn.py, `TestNNDeviceType.test_cross_entropy_loss_prob_target_unit_weights` and
    `test_cross_entropy_loss_index_target_unit_weights`: weight = ones equals no weight."""
    n, c = 5, 4
    x = rng.normal(size=(n, c, 3))
    if target == "prob":
        t = np.exp(_log_softmax(rng.normal(size=(n, c, 3))))
    else:
        t = rng.integers(0, c, size=(n, 3))
    plain = _xent_ce(xp, x, t, axis=1, reduction=reduction)
    unit = _xent_ce(xp, x, t, axis=1, weight=np.ones(c), reduction=reduction)
    xp_assert_close(unit, to_numpy(plain), xp=xp, dtype="float64")
    xp_assert_close(plain, _torch_ce(x, t, reduction=reduction), xp=xp, dtype="float64")


@pytest.mark.parametrize("weighted", [False, True], ids=["no-weight", "weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_loss_one_hot_target(
    xp: Any, rng: np.random.Generator, reduction: str, weighted: bool
) -> None:
    """test_nn.py, `TestNNDeviceType.test_cross_entropy_loss_one_hot_target`: class indices equal
    their one-hot probabilities, except weighted "mean", whose denominators differ (the sum of
    the target weights for indices, N for probabilities)."""
    n, c = 5, 4
    x = rng.normal(size=(n, c, 2))
    t = rng.integers(0, c, size=(n, 2))
    one_hot = np.moveaxis(np.eye(c)[t], -1, 1)
    w = np.abs(rng.normal(size=c)) if weighted else None
    got_index = _xent_ce(xp, x, t, axis=1, weight=w, reduction=reduction)
    got_one_hot = _xent_ce(xp, x, one_hot, axis=1, weight=w, reduction=reduction)
    want = to_numpy(got_index)
    if reduction == "mean" and w is not None:
        want = want * w[t].sum() / t.size
    xp_assert_close(got_one_hot, want, xp=xp, dtype="float64")
    xp_assert_close(got_one_hot, _torch_ce(x, one_hot, weight=w, reduction=reduction), xp=xp,
                    dtype="float64")  # fmt: skip


def test_cross_entropy_loss_2d_out_of_bounds_class_index(xp: Any, rng: np.random.Generator) -> None:
    """test_nn.py, `TestNNDeviceType.test_cross_entropy_loss_2d_out_of_bounds_class_index`: a label
    equal to C is an error where labels are concrete (PyTorch: `IndexError`/device assert; xent:
    `ValueError` naming the value), and NaN where they are not (Dask, lazily)."""
    x = rng.normal(size=(2, 4, 3, 3))
    t = rng.integers(0, 4, size=(2, 3, 3))
    t[1, 2, 0] = 4
    if is_concrete_host():
        with pytest.raises(ValueError, match="4"):
            _xent_ce(xp, x, t, axis=1)
    else:
        got = _xent_ce(xp, x, t, axis=1, reduction="none")
        assert np.isnan(to_numpy(got)[1, 2, 0])
    got = _xent_ce(xp, x, t, axis=1, validate=False)
    xp_assert_close(got, np.nan, xp=xp, dtype="float64")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nll_loss_out_of_bounds_ignore_index(
    xp: Any, rng: np.random.Generator, reduction: str
) -> None:
    """test_nn.py, `TestNNDeviceType.test_nll_loss_out_of_bounds_ignore_index`: `ignore_index=255`
    with three classes is fine, forward and backward."""
    x = _log_softmax(rng.normal(size=(6, 3)))
    t = np.array([0, 1, 255, 0, 1, 2])
    x_t = _t(x).requires_grad_(True)
    want = F.nll_loss(x_t, _t(t), ignore_index=255, reduction=reduction)
    (want_grad,) = torch.autograd.grad(want.sum(), x_t)
    loss, grad = xent.cross_entropy_and_grad(
        to_xp(xp, x), to_xp(xp, t), ignore_index=255, reduction=reduction
    )
    xp_assert_close(loss, want.detach().numpy(), xp=xp, dtype="float64")
    # nll_loss differentiates -x[t]; xent's input is logits, so its gradient adds softmax * mass
    p = np.exp(x)
    mass = -want_grad.numpy().sum(axis=1, keepdims=True)
    xp_assert_close(grad, want_grad.numpy() + p * mass, xp=xp, dtype="float64")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0, 3), (2, 3, 0, 7), (2, 3, 5, 0), (2, 3, 5, 7, 0)], ids=str)
def test_nll_loss_empty_tensor(xp: Any, shape: tuple[int, ...], reduction: str) -> None:
    """test_nn.py, `TestNNDeviceType.test_nll_loss_empty_tensor_reduction_none` / `_mean` /
    `_sum`: empty batches give an empty loss, NaN for "mean" and 0 for "sum"."""
    x = np.zeros(shape)
    t = np.zeros((shape[0], *shape[2:]), dtype=np.int64)
    want = F.nll_loss(_t(x), _t(t), reduction=reduction).numpy()
    assert want.shape == () if reduction != "none" else t.shape
    got = _xent_ce(xp, x, t, axis=1, reduction=reduction)
    xp_assert_close(got, want, xp=xp, dtype="float64")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss_byte_target_matches_long(
    xp: Any, rng: np.random.Generator, reduction: str
) -> None:
    """test_nn.py, `TestNNDeviceType.test_nll_loss_byte_target_matches_long`: uint8 labels give
    what int64 labels give."""
    x = rng.normal(size=(10, 4))
    t = rng.integers(0, 4, size=10)
    long = _xent_ce(xp, x, t.astype(np.int64), reduction=reduction)
    byte = _xent_ce(xp, x, t.astype(np.uint8), reduction=reduction)
    xp_assert_close(byte, to_numpy(long), xp=xp, dtype="float64", rtol=0, atol=0)
    xp_assert_close(long, _torch_ce(x, t, reduction=reduction), xp=xp, dtype="float64")


@pytest.mark.parametrize(
    ("name", "x_shape", "t_shape"),
    [
        ("test_nll_loss_mismatched_batch", (10, 3), (3,)),
        ("test_nll_loss_invalid_target_dim", (10, 3), (10, 2)),
    ],
)
def test_nll_loss_bad_target_shape(
    xp: Any, name: str, x_shape: tuple[int, ...], t_shape: tuple[int, ...]
) -> None:
    """test_nn.py, `TestNNDeviceType.test_nll_loss_mismatched_batch` and
    `test_nll_loss_invalid_target_dim`: the error names both shapes (PyTorch: `ValueError` /
    `RuntimeError`; xent: `ValueError`)."""
    x = np.zeros(x_shape)
    t = np.zeros(t_shape, dtype=np.int64)
    with pytest.raises(ValueError, match=r"\(10, 3\)"):
        _xent_ce(xp, x, t)


@pytest.mark.parametrize("weight_shape", [(4,), (1, 3)], ids=str)
def test_nll_loss_invalid_weights(
    xp: Any, rng: np.random.Generator, weight_shape: tuple[int, ...]
) -> None:
    """test_nn.py, `TestNNDeviceType.test_nll_loss_invalid_weights`: a weight not of shape (C,)
    is refused (PyTorch: `RuntimeError`; xent: `ValueError`)."""
    x = rng.normal(size=(10, 3))
    t = rng.integers(0, 3, size=10)
    with pytest.raises(ValueError, match="weight"):
        _xent_ce(xp, x, t, weight=rng.normal(size=weight_shape))


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 5, 7), (2, 3, 5, 7, 9)], ids=str)
def test_nll_loss_total_weight_is_zero(xp: Any, shape: tuple[int, ...]) -> None:
    """test_nn.py, `TestNNDeviceType.test_nll_loss_total_weight_is_zero`: all-zero class weights
    give "sum" 0, "mean" NaN (0 / 0) and "none" zeros."""
    x = np.ones(shape)
    t = np.zeros((shape[0], *shape[2:]), dtype=np.int64)
    w = np.zeros(shape[1])
    xp_assert_close(_xent_ce(xp, x, t, axis=1, weight=w, reduction="sum"), 0.0, xp=xp,
                    dtype="float64")  # fmt: skip
    xp_assert_close(_xent_ce(xp, x, t, axis=1, weight=w, reduction="mean"), np.nan, xp=xp,
                    dtype="float64")  # fmt: skip
    xp_assert_close(_xent_ce(xp, x, t, axis=1, weight=w, reduction="none"), np.zeros(t.shape),
                    xp=xp, dtype="float64")  # fmt: skip


@pytest.mark.parametrize(
    ("x_shape", "labels"),
    [((3, 4), [-100, -100, -100]), ((0, 4), [])],
    ids=["all-ignored", "empty"],
)
def test_nll_loss_all_ignored(xp: Any, x_shape: tuple[int, ...], labels: list[int]) -> None:
    """test_nn.py, `TestNNDeviceType.test_nll_loss_all_ignored` (and an empty batch): "mean" of
    nothing is NaN, "sum" 0, as in PyTorch."""
    x = np.ones(x_shape)
    t = np.asarray(labels, dtype=np.int64)
    for reduction in REDUCTIONS:
        got = _xent_ce(xp, x, t, reduction=reduction)
        xp_assert_close(got, _torch_ce(x, t, reduction=reduction), xp=xp, dtype="float64")


def test_cross_entropy_minus_inf_logits(xp: Any, rng: np.random.Generator) -> None:
    """`-inf` logits as masked classes, as `F.cross_entropy` treats them: finite off-target,
    `+inf` on the target, NaN for a row of nothing but `-inf`."""
    x = rng.normal(size=(4, 5))
    x[:, 3] = -np.inf
    x[1, 0] = -np.inf
    x[2, :] = -np.inf
    t = np.array([0, 2, 1, 3])  # row 1 fine, row 2 all masked, row 3's target masked
    want = _torch_ce(x, t, reduction="none")
    assert np.isfinite(want[:2]).all()
    xp_assert_close(_xent_ce(xp, x, t, reduction="none"), want, xp=xp, dtype="float64")


# --- the option grid (formerly tests/test_references.py) --------------------------------------


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


def _tol(dtype: str) -> dict[str, float]:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == "float64" else {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize(
    ("dtype", "shape", "weighted", "ignore_index", "label_smoothing"), _grid(ignore_index=True)
)
def test_class_indices_match_torch(
    xp: Any,
    rng: np.random.Generator,
    dtype: str,
    shape: tuple[int, ...],
    weighted: bool,
    ignore_index: int,
    label_smoothing: float,
) -> None:
    n_classes = shape[1]
    x = (rng.normal(size=shape) * 3).astype(dtype)
    t = rng.integers(0, n_classes, size=(shape[0], *shape[2:]))
    t.reshape(-1)[::3] = ignore_index  # labels equal to ignore_index
    w = rng.uniform(0.2, 2.0, size=n_classes).astype(dtype) if weighted else None
    for reduction in REDUCTIONS:
        kw = {"weight": w, "ignore_index": ignore_index, "label_smoothing": label_smoothing}
        got = _xent_ce(xp, x, t, axis=1, reduction=reduction, **kw)
        want = _torch_ce(x, t, reduction=reduction, **kw)
        xp_assert_close(got, want, xp=xp, dtype=dtype, err_msg=reduction, **_tol(dtype))


@pytest.mark.parametrize(
    ("dtype", "shape", "weighted", "label_smoothing"), _grid(ignore_index=False)
)
def test_probability_targets_match_torch(
    xp: Any,
    rng: np.random.Generator,
    dtype: str,
    shape: tuple[int, ...],
    weighted: bool,
    label_smoothing: float,
) -> None:
    n_classes = shape[1]
    x = (rng.normal(size=shape) * 3).astype(dtype)
    t = np.moveaxis(rng.dirichlet(np.ones(n_classes), size=(shape[0], *shape[2:])), -1, 1)
    t = t.astype(dtype)
    w = rng.uniform(0.2, 2.0, size=n_classes).astype(dtype) if weighted else None
    for reduction in REDUCTIONS:
        kw = {"weight": w, "label_smoothing": label_smoothing}
        got = _xent_ce(xp, x, t, axis=1, reduction=reduction, **kw)
        want = _torch_ce(x, t, reduction=reduction, **kw)
        xp_assert_close(got, want, xp=xp, dtype=dtype, err_msg=reduction, **_tol(dtype))


# --- test/test_nn.py: binary cross-entropy ----------------------------------------------------


def test_bce_with_logits_has_correct_grad_at_zero(xp: Any) -> None:
    """test_nn.py, `TestNN.test_bce_with_logits_has_correct_grad_at_zero`: logits 0, target 0,
    "sum": the gradient is exactly 0.5 (the subgradients of `max(x, 0)` and `|x|` cancel)."""
    x = np.zeros((3, 1))
    t = np.zeros((3, 1))
    _, grad = xent.binary_cross_entropy_and_grad(to_xp(xp, x), to_xp(xp, t), reduction="sum")
    xp_assert_close(grad, np.full((3, 1), 0.5), xp=xp, dtype="float64", rtol=0, atol=0)


@pytest.mark.only_backends(*AUTODIFF)
def test_bce_with_logits_has_correct_autodiff_grad_at_zero(xp: Any) -> None:
    """test_nn.py, `TestNN.test_bce_with_logits_has_correct_grad_at_zero`, through autodiff."""
    x = np.zeros((3, 1))
    t = np.zeros((3, 1))

    def loss(a: Any, b: Any) -> Any:
        return xent.binary_cross_entropy(a, b, reduction="sum")

    grad = autodiff_grad(xp, loss, [x, t], wrt=0)
    np.testing.assert_array_equal(grad, np.full((3, 1), 0.5))


def test_bce_with_logits_with_pos_weight_has_correct_grad_at_zero(xp: Any) -> None:
    """test_nn.py, `TestNN.test_bce_with_logits_with_pos_weight_has_correct_grad_at_zero`."""
    x = np.zeros((3, 1))
    t = np.zeros((3, 1))
    _, grad = xent.binary_cross_entropy_and_grad(
        to_xp(xp, x), to_xp(xp, t), pos_weight=to_xp(xp, np.ones(1)), reduction="sum"
    )
    xp_assert_close(grad, np.full((3, 1), 0.5), xp=xp, dtype="float64", rtol=0, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_with_logits_gives_same_result_as_sigmoid_and_bce_loss(
    xp: Any, rng: np.random.Generator, reduction: str
) -> None:
    """test_nn.py, `TestNN.test_bce_with_logits_gives_same_result_as_sigmoid_and_bce_loss`: from
    logits equals sigmoid then `from_logits=False`, loss and gradient, with a weight."""
    x = rng.uniform(size=(16, 8)) - 0.5
    t = rng.uniform(size=(16, 8))
    w = rng.uniform(size=8)
    s = 1 / (1 + np.exp(-x))
    loss_logits, grad_logits = xent.binary_cross_entropy_and_grad(
        to_xp(xp, x), to_xp(xp, t), weight=to_xp(xp, w), reduction=reduction
    )
    loss_sig, grad_sig = xent.binary_cross_entropy_and_grad(
        to_xp(xp, s), to_xp(xp, t), weight=to_xp(xp, w), reduction=reduction, from_logits=False
    )
    xp_assert_close(loss_logits, to_numpy(loss_sig), xp=xp, dtype="float64")
    # chain rule through the sigmoid
    xp_assert_close(grad_logits, to_numpy(grad_sig) * s * (1 - s), xp=xp, dtype="float64")
    want = _torch_bce(x, t, weight=w, reduction=reduction)
    xp_assert_close(loss_logits, want, xp=xp, dtype="float64")


@pytest.mark.parametrize("pos", [False, True], ids=["weight", "pos_weight"])
def test_bce_with_logits_broadcasts_weights(xp: Any, rng: np.random.Generator, pos: bool) -> None:
    """test_nn.py, `TestNN.test_bce_with_logits_broadcasts_weights` and
    `test_bce_with_logits_broadcasts_pos_weights`: a (4,) or (16, 1) weight equals its
    expansion to (16, 4)."""
    t = rng.uniform(size=(16, 4))
    x = rng.uniform(size=(16, 4)) - 0.5
    name = "pos_weight" if pos else "weight"
    shapes = [(4,), (1, 4)] if pos else [(4,), (16, 1)]
    for shape in shapes:
        w = rng.uniform(size=shape)
        small = _xent_bce(xp, x, t, **{name: w})
        full = _xent_bce(xp, x, t, **{name: np.broadcast_to(w, (16, 4)).copy()})
        xp_assert_close(small, to_numpy(full), xp=xp, dtype="float64")
        xp_assert_close(small, _torch_bce(x, t, **{name: w}), xp=xp, dtype="float64")


def test_bce_with_logits_ones_in_pos_weights_are_the_same_as_none(
    xp: Any, rng: np.random.Generator
) -> None:
    """test_nn.py, `TestNN.test_bce_with_logits_ones_in_pos_weights_are_the_same_as_none`."""
    t = rng.uniform(size=(64, 4))
    x = rng.uniform(size=(64, 4)) - 0.5
    ones = _xent_bce(xp, x, t, pos_weight=np.ones((64, 4)))
    xp_assert_close(ones, to_numpy(_xent_bce(xp, x, t)), xp=xp, dtype="float64")


def test_bce_with_logits_stability(xp: Any) -> None:
    """test_nn.py, `TestNN.test_bce_with_logits_stability`: logits [0, -120] with targets [0, 1]
    give finite losses (and pos_weight ones changes nothing)."""
    x = np.array([0.0, -120.0])
    t = np.array([0.0, 1.0])
    for dtype in ("float32", "float64"):
        got = xent.binary_cross_entropy(to_xp(xp, x, dtype=dtype), to_xp(xp, t, dtype=dtype))
        xp_assert_close(got, (np.log(2) + 120) / 2, xp=xp, dtype=dtype)
        got = xent.binary_cross_entropy(
            to_xp(xp, x, dtype=dtype),
            to_xp(xp, t, dtype=dtype),
            pos_weight=to_xp(xp, np.ones(2), dtype=dtype),
        )
        xp_assert_close(got, (np.log(2) + 120) / 2, xp=xp, dtype=dtype)


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_bce_loss_always_nonnegative(xp: Any, value: float) -> None:
    """test_nn.py, `TestNN.test_bce_loss_always_nonnegative`: probabilities equal to the targets,
    at exactly 0 and exactly 1, give no negative loss."""
    p = np.full(5, value)
    got = xent.binary_cross_entropy(to_xp(xp, p), to_xp(xp, p), from_logits=False, reduction="none")
    assert (to_numpy(got) >= 0).all()
    xp_assert_close(got, np.zeros(5), xp=xp, dtype="float64", atol=2e-7)


@pytest.mark.parametrize(("x_shape", "t_shape"), [((5, 1), (5,)), ((5,), (5, 1))], ids=str)
def test_bce_with_logits_raises_if_target_and_input_are_different_size(
    xp: Any, x_shape: tuple[int, ...], t_shape: tuple[int, ...]
) -> None:
    """test_nn.py, `TestNN.test_bce_with_logits_raises_if_target_and_input_are_different_size`."""
    with pytest.raises(ValueError, match="target"):
        _xent_bce(xp, np.zeros(x_shape), np.zeros(t_shape))


def test_bce_loss_broadcasts_weights(xp: Any, rng: np.random.Generator) -> None:
    """test_nn.py, `TestNN.test_bce_loss_broadcasts_weights`: `BCELoss` (probabilities) with a
    (4,) and a (16, 1) weight equals the expanded weight."""
    p = rng.uniform(0.05, 0.95, size=(16, 4))
    t = rng.uniform(size=(16, 4))
    for shape in ((4,), (16, 1)):
        w = rng.uniform(size=shape)
        small = _xent_bce(xp, p, t, weight=w, from_logits=False)
        full = _xent_bce(xp, p, t, weight=np.broadcast_to(w, (16, 4)).copy(), from_logits=False)
        xp_assert_close(small, to_numpy(full), xp=xp, dtype="float64")
        want = F.binary_cross_entropy(_t(p), _t(t), weight=_t(w)).numpy()
        xp_assert_close(small, want, xp=xp, dtype="float64")


# --- the binary grid (formerly tests/test_references.py) ---------------------------------------


@pytest.mark.parametrize("weight_shape", [None, (4,), (3, 1), (3, 4)], ids=str)
@pytest.mark.parametrize("pos_weight_shape", [None, (4,), (1, 4)], ids=str)
@pytest.mark.parametrize("target_kind", ["float", "bool", "int"])
def test_binary_matches_torch(
    xp: Any,
    rng: np.random.Generator,
    weight_shape: tuple[int, ...] | None,
    pos_weight_shape: tuple[int, ...] | None,
    target_kind: str,
) -> None:
    x = rng.normal(size=(3, 4)) * 3
    if target_kind == "float":
        t = rng.uniform(size=(3, 4))
    else:
        t = rng.integers(0, 2, size=(3, 4)).astype(target_kind)
    w = None if weight_shape is None else rng.uniform(0.2, 2.0, size=weight_shape)
    pw = None if pos_weight_shape is None else rng.uniform(0.2, 3.0, size=pos_weight_shape)
    for e in (0.0, 0.2):
        for reduction in REDUCTIONS:
            got = _xent_bce(
                xp, x, t, weight=w, pos_weight=pw, label_smoothing=e, reduction=reduction
            )
            smoothed = t.astype(np.float64) * (1 - e) + e / 2  # torch has no label smoothing
            want = _torch_bce(x, smoothed, weight=w, pos_weight=pw, reduction=reduction)
            xp_assert_close(got, want, xp=xp, dtype="float64", err_msg=f"{reduction}, e={e}")


def test_binary_from_probabilities_matches_torch_away_from_the_clip(
    xp: Any, rng: np.random.Generator
) -> None:
    p = rng.uniform(0.01, 0.99, size=(3, 4))
    t = rng.uniform(size=(3, 4))
    w = rng.uniform(0.2, 2.0, size=(4,))
    for reduction in REDUCTIONS:
        got = _xent_bce(xp, p, t, from_logits=False, weight=w, reduction=reduction)
        want = F.binary_cross_entropy(_t(p), _t(t), weight=_t(w), reduction=reduction)
        xp_assert_close(got, want.numpy(), xp=xp, dtype="float64")


# --- gradients with respect to probability targets --------------------------------------------


@pytest.mark.only_backends(*AUTODIFF)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_cross_entropy_prob_target_gradient_matches_torch(
    xp: Any, rng: np.random.Generator, label_smoothing: float
) -> None:
    """common_modules.py runs `gradcheck` on every input that requires grad, the probability
    target of the `*_prob_target` ModuleInputs included: d loss / d target = -(1 - e) *
    log_softmax(x) (times the class weight), also where the target is 0."""
    x = rng.normal(size=(4, 3))
    t = np.eye(3)[[0, 1, 2, 1]]
    t[3] = [0.2, 0.0, 0.8]
    w = rng.uniform(0.5, 2.0, size=3)
    t_t = _t(t).requires_grad_(True)
    want = F.cross_entropy(_t(x), t_t, weight=_t(w), label_smoothing=label_smoothing)
    (want_grad,) = torch.autograd.grad(want, t_t)

    def loss(a: Any, b: Any, c: Any) -> Any:
        return xent.cross_entropy(a, b, weight=c, label_smoothing=label_smoothing)

    got = autodiff_grad(xp, loss, [x, t, w], wrt=1)
    np.testing.assert_allclose(got, want_grad.numpy(), rtol=1e-10, atol=1e-12)
