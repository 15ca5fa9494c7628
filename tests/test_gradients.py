"""Gradients (issue #3): the analytic ``*_and_grad`` on every backend, autodiff on PyTorch and JAX.

- ``cross_entropy_and_grad`` / ``binary_cross_entropy_and_grad`` against central finite
  differences of the float64 reference (``_reference``), against PyTorch autograd of
  ``F.cross_entropy`` / ``F.binary_cross_entropy_with_logits`` for every combination of options
  PyTorch has, and against PyTorch autograd of a float64 reference *expression* (below) for the
  options it lacks (z-loss, softcap, ``from_logits=False``, ``sample_weight``).
- PyTorch: ``gradcheck``/``gradgradcheck`` through every public function, Hessians and third
  derivatives against ``F.cross_entropy``'s.
- JAX: ``jax.grad`` against Optax, ``jax.hessian``/``jax.jacfwd``/``jax.jacrev`` against each
  other and against PyTorch's Hessian, eagerly and under ``jax.jit``.
- No NaN gradient for ``-inf`` masked logits off-target or for zero-mass soft targets.

Every test runs through the ``xp`` fixture (each backend, native overrides on and off).
"""

from __future__ import annotations

import itertools
from typing import Any

import _reference as ref
import numpy as np
import pytest
from _helpers import Backend, current, dtype_eps, to_numpy, to_xp, xp_assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xent

TORCH_BACKENDS = (Backend.TORCH, Backend.TORCH_CUDA)
JAX_BACKENDS = (Backend.JAX, Backend.JAX_GPU)
# Few examples, drawn from few shapes: JAX compiles every primitive once per shape. pytest makes
# one instance of the test class per parametrisation; the tests keep no state on `self`, so
# hypothesis seeing several executors is harmless (the profile's own suppressions are kept).
FEW = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[*settings().suppress_health_check, HealthCheck.differing_executors],
)


# --------------------------------------------------------------------------- local helpers
def _torch() -> Any:
    return pytest.importorskip("torch", reason="the reference gradients are PyTorch autograd")


def _softmax_rows(rng: np.random.Generator, shape: tuple[int, ...], axis: int) -> np.ndarray:
    z = rng.normal(size=shape) * 1.5
    z = np.exp(z - z.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def _per_row(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return tuple(n for i, n in enumerate(shape) if i != axis % len(shape))


def _torch_reference_ce(x: Any, t: Any, **o: Any) -> Any:
    """The cross-entropy of docs/semantics.md in float64 PyTorch ops, differentiable to any order (x and t alike).

    Class-index labels must be in range or equal to ``ignore_index``.
    """
    torch = _torch()
    axis = o.get("axis", -1)
    e = float(o.get("label_smoothing", 0.0))
    z_loss = float(o.get("z_loss", 0.0))
    softcap = o.get("softcap")
    eps = o.get("eps", 1e-7)
    ignore_index = o.get("ignore_index", -100)
    reduction = o.get("reduction", "mean")
    x = torch.movedim(x, axis, -1)
    n_classes = x.shape[-1]
    w = o.get("weight")
    w = torch.ones(n_classes, dtype=x.dtype, device=x.device) if w is None else w
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    if o.get("from_logits", True):
        lse = torch.logsumexp(x, dim=-1)
        lp = x - lse[..., None]
    else:
        lse = None
        lp = torch.log(torch.clamp(x / x.sum(-1, keepdim=True), eps, 1.0 - eps))
    if not t.is_floating_point():
        ignored = t == ignore_index
        y = torch.where(ignored, 0, t).long()
        lp_y = torch.gather(lp, -1, y[..., None])[..., 0]
        loss = (1.0 - e) * (-w[y] * lp_y) + (e / n_classes) * torch.sum(-w * lp, dim=-1)
        if lse is not None and z_loss:
            loss = loss + z_loss * lse**2
        loss = torch.where(ignored, torch.zeros_like(loss), loss)
        s = o.get("sample_weight")
        s = torch.ones_like(loss) if s is None else torch.broadcast_to(s, loss.shape)
        loss = loss * s
        denominator = torch.sum(s * w[y] * (~ignored))
    else:
        q = (1.0 - e) * torch.movedim(t, axis, -1) + e / n_classes
        terms = torch.where(q == 0, torch.zeros_like(lp), w * q * lp)
        loss = -terms.sum(-1)
        if lse is not None and z_loss:
            loss = loss + z_loss * lse**2
        s = o.get("sample_weight")
        s = torch.ones_like(loss) if s is None else torch.broadcast_to(s, loss.shape)
        loss = loss * s
        denominator = s.sum()
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / denominator


def _torch_autograd(fn: Any, x_np: np.ndarray, *extra: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(sum(fn(x)), d sum(fn(x)) / dx)`` by PyTorch autograd in float64 on the CPU."""
    torch = _torch()
    x = torch.tensor(x_np, dtype=torch.float64, requires_grad=True)
    loss = fn(x, *extra)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach().numpy(), grad.numpy()


def _assert_loss_and_grad(
    xp: Any, got: tuple[Any, Any], want: tuple[Any, Any], label: str = ""
) -> None:
    """Loss and float64 gradient against a reference (the gradient to 1e-10)."""
    xp_assert_close(got[0], want[0], xp=xp, dtype="float64", err_msg=label)
    xp_assert_close(got[1], want[1], xp=xp, dtype="float64", rtol=1e-10, atol=1e-13, err_msg=label)


def _t(a: Any) -> Any:
    """A NumPy array as a CPU torch tensor (float arrays in float64)."""
    torch = _torch()
    a = np.asarray(a)
    return torch.tensor(a, dtype=torch.float64 if a.dtype.kind == "f" else torch.int64)


def _opts_for(xp: Any, o: dict[str, Any]) -> dict[str, Any]:
    """Options with the array-valued ones moved onto the backend under test."""
    return {k: to_xp(xp, v) if isinstance(v, np.ndarray) else v for k, v in o.items()}


def _fd_tol(g: np.ndarray) -> dict[str, float]:
    return {"rtol": 1e-6, "atol": 1e-7 * max(1.0, float(np.max(np.abs(g), initial=0.0)))}


def _assert_finite(g: Any, what: str) -> np.ndarray:
    arr = to_numpy(g)
    assert np.all(np.isfinite(arr)), f"{what} has non-finite entries:\n{arr}"
    return arr


# --------------------------------------------------------------------------- random cases
@st.composite
def ce_cases(draw: Any) -> dict[str, Any]:
    """Shapes, axis, target form and every option of ``cross_entropy``, NumPy float64 data."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.sampled_from([1, 3]), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    n_classes = draw(st.sampled_from([2, 5]))
    shape = tuple(n_classes if i == axis % ndim else n for i, n in enumerate(shape))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    from_logits = draw(st.booleans())
    probabilities = draw(st.booleans())
    batch = _per_row(shape, axis)
    if from_logits:
        x = rng.normal(size=shape) * draw(st.sampled_from([0.5, 2.0, 6.0]))
    else:
        x = rng.uniform(0.1, 1.0, size=shape)  # renormalised p stays inside [eps, 1 - eps]
    o: dict[str, Any] = {
        "axis": axis,
        "from_logits": from_logits,
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "label_smoothing": draw(st.sampled_from([0.0, 0.1, 0.45])),
    }
    if from_logits:
        o["z_loss"] = draw(st.sampled_from([0.0, 0.0, 0.03]))
        o["softcap"] = draw(st.sampled_from([None, None, 2.5]))
    if draw(st.booleans()):
        o["weight"] = rng.uniform(0.3, 2.0, size=n_classes)
    if draw(st.booleans()):
        o["sample_weight"] = rng.uniform(0.2, 2.0, size=batch)
    if probabilities:
        t = _softmax_rows(rng, shape, axis)
        if draw(st.booleans()):  # some zero-mass classes
            t = np.where(rng.uniform(size=shape) < 0.3, 0.0, t)
    else:
        t = rng.integers(0, n_classes, size=batch)
        if draw(st.booleans()) and t.size > 1:
            ignore_index = draw(st.sampled_from([-100, 1]))
            o["ignore_index"] = ignore_index
            flat = t.reshape(-1)
            flat[rng.integers(0, flat.size)] = ignore_index
            if np.all(flat == ignore_index):  # keep the mean's denominator positive
                flat[0] = 0
            t = flat.reshape(batch)
    return {"x": x, "t": t, "o": o}


# --------------------------------------------------------------------------- vs F.cross_entropy
_IGNORE = {"no-ignore": None, "ignore=-100": -100, "ignore=class-1": 1}


class TestAgainstTorchFunctional:
    """Gradients equal PyTorch autograd of `F.cross_entropy` and the binary losses."""

    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    @pytest.mark.parametrize("target_kind", ["indices", "probabilities"])
    def test_ce_grad_matches_torch_F_cross_entropy_for_every_option_combination(
        self, xp: Any, rng: np.random.Generator, reduction: str, target_kind: str
    ) -> None:
        """weight x ignore_index x label_smoothing x (N, C) / (N, C, d1, d2) with axis=1."""
        torch = _torch()
        F = torch.nn.functional
        ignores = list(_IGNORE) if target_kind == "indices" else ["no-ignore"]
        for weighted, ignore, smoothing, kdim in itertools.product(
            [False, True], ignores, [0.0, 0.25], [False, True]
        ):
            shape = (3, 5, 2, 3) if kdim else (7, 5)
            x = rng.normal(size=shape) * 2.0
            w = rng.uniform(0.3, 2.0, size=5) if weighted else None
            o: dict[str, Any] = {"axis": 1, "reduction": reduction, "label_smoothing": smoothing}
            tk: dict[str, Any] = {"reduction": reduction, "label_smoothing": smoothing}
            if w is not None:
                o["weight"] = w
                tk["weight"] = _t(w)
            if target_kind == "probabilities":
                t = _softmax_rows(rng, shape, 1)
            else:
                t = rng.integers(0, 5, size=(shape[0], *shape[2:]))
                index = _IGNORE[ignore]
                if index is not None:
                    o["ignore_index"] = tk["ignore_index"] = index
                    t.reshape(-1)[[0, 3]] = index  # at least two ignored rows, never all
            label = f"weight={weighted} {ignore} smoothing={smoothing} kdim={kdim}"
            loss, grad = xent.cross_entropy_and_grad(to_xp(xp, x), to_xp(xp, t), **_opts_for(xp, o))
            want_loss, want_grad = _torch_autograd(
                lambda v, t=t, tk=tk: F.cross_entropy(v, _t(t), **tk), x
            )
            _assert_loss_and_grad(xp, (loss, grad), (want_loss, want_grad), label)

    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    def test_bce_grad_matches_torch_bce_with_logits(
        self, xp: Any, rng: np.random.Generator, reduction: str
    ) -> None:
        torch = _torch()
        F = torch.nn.functional
        for weight, pos_weight, smoothing in itertools.product(
            [None, "full", "row"], [None, "full", "column"], [0.0, 0.2]
        ):
            x = rng.normal(size=(4, 3)) * 3.0
            y = (rng.uniform(size=(4, 3)) < 0.5).astype(np.float64)
            shapes = {"full": (4, 3), "row": (4, 1), "column": (3,)}
            o: dict[str, Any] = {"reduction": reduction, "label_smoothing": smoothing}
            tk: dict[str, Any] = {"reduction": reduction}
            if weight is not None:
                o["weight"] = rng.uniform(0.2, 2.0, size=shapes[weight])
                tk["weight"] = _t(o["weight"])
            if pos_weight is not None:
                o["pos_weight"] = rng.uniform(0.2, 3.0, size=shapes[pos_weight])
                tk["pos_weight"] = _t(o["pos_weight"])
            smoothed = _t(y * (1 - smoothing) + smoothing / 2)
            label = f"weight={weight} pos_weight={pos_weight} smoothing={smoothing}"
            loss, grad = xent.binary_cross_entropy_and_grad(
                to_xp(xp, x), to_xp(xp, y), **_opts_for(xp, o)
            )
            want_loss, want_grad = _torch_autograd(
                lambda v, y=smoothed, tk=tk: F.binary_cross_entropy_with_logits(v, y, **tk), x
            )
            _assert_loss_and_grad(xp, (loss, grad), (want_loss, want_grad), label)

    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    def test_bce_from_probabilities_grad_matches_torch_binary_cross_entropy(
        self, xp: Any, rng: np.random.Generator, reduction: str
    ) -> None:
        torch = _torch()
        F = torch.nn.functional
        p = rng.uniform(
            0.05, 0.95, size=(5, 2)
        )  # inside the clip, where PyTorch's log clamp is idle
        y = rng.uniform(size=(5, 2))
        w = rng.uniform(0.2, 2.0, size=(5, 2))
        loss, grad = xent.binary_cross_entropy_and_grad(
            to_xp(xp, p), to_xp(xp, y), weight=to_xp(xp, w), from_logits=False, reduction=reduction
        )
        want_loss, want_grad = _torch_autograd(
            lambda v: F.binary_cross_entropy(v, _t(y), weight=_t(w), reduction=reduction), p
        )
        _assert_loss_and_grad(xp, (loss, grad), (want_loss, want_grad))


@st.composite
def bce_cases(draw: Any) -> dict[str, Any]:
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 4]), min_size=ndim, max_size=ndim)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    from_logits = draw(st.booleans())
    x = rng.normal(size=shape) * 3.0 if from_logits else rng.uniform(0.05, 0.95, size=shape)
    soft = draw(st.booleans())
    y = rng.uniform(size=shape) if soft else (rng.uniform(size=shape) < 0.5).astype(np.float64)
    o: dict[str, Any] = {
        "from_logits": from_logits,
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "label_smoothing": draw(st.sampled_from([0.0, 0.3])),
    }

    def broadcast_shape() -> tuple[int, ...]:
        # a trailing sub-shape of `shape` with some axes collapsed to 1
        k = draw(st.integers(0, ndim))
        return tuple(1 if draw(st.booleans()) else n for n in shape[ndim - k :])

    if draw(st.booleans()):
        o["weight"] = rng.uniform(0.2, 2.0, size=broadcast_shape())
    if draw(st.booleans()):
        o["pos_weight"] = rng.uniform(0.2, 3.0, size=broadcast_shape())
    return {"x": x, "t": y, "o": o}


class TestPrecision:
    """Low-precision gradients are returned in the input dtype."""

    @pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
    def test_low_precision_gradients_are_returned_in_the_input_dtype(
        self, xp: Any, rng: np.random.Generator, dtype: str
    ) -> None:
        x_xp = to_xp(xp, rng.normal(size=(6, 7)) * 2.0, dtype=dtype)
        x64 = to_numpy(x_xp).astype(np.float64)  # the values the backend actually holds
        t = rng.integers(0, 7, size=6)
        w = rng.uniform(0.5, 2.0, size=7)
        o = {"weight": w, "label_smoothing": 0.1, "z_loss": 0.01, "softcap": 5.0}
        y = rng.uniform(size=(6, 7))
        # one rounding of a float32 result: half an ulp, plus float32's own error
        rtol = 2e-5 if dtype == "float32" else dtype_eps(dtype)
        atol = 1e-7 if dtype == "float16" else 1e-9  # float16's subnormals are 6e-8 apart

        loss, grad = xent.cross_entropy_and_grad(x_xp, to_xp(xp, t), **_opts_for(xp, o))
        to = {k: _t(v) if isinstance(v, np.ndarray) else v for k, v in o.items()}
        want_loss, want_grad = _torch_autograd(lambda v: _torch_reference_ce(v, _t(t), **to), x64)
        xp_assert_close(loss, want_loss, xp=xp, dtype=dtype, rtol=rtol, atol=atol)
        xp_assert_close(grad, want_grad, xp=xp, dtype=dtype, rtol=rtol, atol=atol)

        loss, grad = xent.binary_cross_entropy_and_grad(x_xp, to_xp(xp, y), pos_weight=to_xp(xp, w))
        want = ref.numerical_grad(lambda v: ref.binary_cross_entropy(v, y, pos_weight=w), x64)
        xp_assert_close(
            loss,
            ref.binary_cross_entropy(x64, y, pos_weight=w),
            xp=xp,
            dtype=dtype,
            rtol=rtol,
            atol=atol,
        )
        xp_assert_close(grad, want, xp=xp, dtype=dtype, rtol=rtol, atol=atol)


class TestAgainstReference:
    """The analytic gradients agree with finite differences and with autodiff of the loss."""

    @FEW
    @given(case=ce_cases())
    def test_ce_grad_matches_finite_differences_and_reference_autograd(
        self, xp: Any, case: dict[str, Any]
    ) -> None:
        x, t, o = case["x"], case["t"], case["o"]
        loss, grad = xent.cross_entropy_and_grad(to_xp(xp, x), to_xp(xp, t), **_opts_for(xp, o))
        want_fd = ref.numerical_grad(lambda v: ref.cross_entropy(v, t, **o), x)
        xp_assert_close(loss, ref.cross_entropy(x, t, **o), xp=xp, dtype="float64", err_msg=str(o))
        xp_assert_close(grad, want_fd, xp=xp, dtype="float64", err_msg=str(o), **_fd_tol(want_fd))
        # and tightly against autograd of the float64 reference expression
        to = {k: _t(v) if isinstance(v, np.ndarray) else v for k, v in o.items()}
        _, want = _torch_autograd(lambda v: _torch_reference_ce(v, _t(t), **to), x)
        xp_assert_close(grad, want, xp=xp, dtype="float64", rtol=1e-9, atol=1e-12, err_msg=str(o))

    @FEW
    @given(case=bce_cases())
    def test_bce_grad_matches_finite_differences(self, xp: Any, case: dict[str, Any]) -> None:
        x, t, o = case["x"], case["t"], case["o"]
        loss, grad = xent.binary_cross_entropy_and_grad(
            to_xp(xp, x), to_xp(xp, t), **_opts_for(xp, o)
        )
        want = ref.numerical_grad(lambda v: ref.binary_cross_entropy(v, t, **o), x)
        xp_assert_close(
            loss, ref.binary_cross_entropy(x, t, **o), xp=xp, dtype="float64", err_msg=str(o)
        )
        xp_assert_close(grad, want, xp=xp, dtype="float64", err_msg=str(o), **_fd_tol(want))

    @pytest.mark.only_backends(*TORCH_BACKENDS, *JAX_BACKENDS)
    def test_and_grad_agrees_with_autodiff_of_the_loss(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        """On PyTorch and JAX, ``cross_entropy_and_grad`` equals the framework's own gradient."""
        backend = current().backend
        x = rng.normal(size=(5, 4)) * 2
        t = rng.integers(0, 4, size=5)
        o = {"label_smoothing": 0.1, "z_loss": 0.02, "softcap": 4.0}
        _, grad = xent.cross_entropy_and_grad(to_xp(xp, x), to_xp(xp, t), **o)
        if backend.like(Backend.TORCH):
            xt = to_xp(xp, x).requires_grad_()
            xent.cross_entropy(xt, to_xp(xp, t), **o).backward()
            other = xt.grad
        else:
            import jax

            other = jax.grad(lambda v: xent.cross_entropy(v, to_xp(xp, t), **o))(to_xp(xp, x))
        xp_assert_close(grad, to_numpy(other), xp=xp, dtype="float64", rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- PyTorch autograd
def _torch_functions(xp: Any, rng: np.random.Generator) -> dict[str, tuple[Any, np.ndarray]]:
    """name -> (function of one float64 tensor, NumPy input) for gradcheck and friends."""
    x = rng.normal(size=(3, 4)) * 1.5
    p = rng.uniform(0.2, 1.0, size=(3, 4))
    labels = to_xp(xp, np.array([0, 3, -100]))
    soft = to_xp(xp, _softmax_rows(rng, (3, 4), -1))
    w = to_xp(xp, rng.uniform(0.5, 2.0, size=4))
    sw = to_xp(xp, rng.uniform(0.5, 2.0, size=3))
    kdim = rng.normal(size=(2, 4, 3))
    kdim_labels = to_xp(xp, rng.integers(0, 4, size=(2, 3)))
    y = to_xp(xp, rng.uniform(size=(3, 4)))
    ce = xent.cross_entropy
    return {
        "ce-plain": (lambda v: ce(v, labels), x),
        "ce-weight-smoothing-ignore": (lambda v: ce(v, labels, weight=w, label_smoothing=0.2), x),
        "ce-z-loss-softcap-sample-weight-none": (
            lambda v: ce(v, labels, z_loss=0.1, softcap=2.0, sample_weight=sw, reduction="none"), x),
        "ce-kdim-axis1-sum": (lambda v: ce(v, kdim_labels, axis=1, reduction="sum"), kdim),
        "ce-probabilities-weight": (lambda v: ce(v, soft, weight=w, label_smoothing=0.1), x),
        "ce-from-probabilities": (lambda v: ce(v, labels, from_logits=False, weight=w), p),
        "bce-logits": (lambda v: xent.binary_cross_entropy(v, y, weight=w, pos_weight=w), x),
        "bce-probabilities-none": (
            lambda v: xent.binary_cross_entropy(v, y, from_logits=False, reduction="none"), p),
        "logsumexp": (lambda v: xent.logsumexp(v, axis=0), x),
        "log_softmax": (lambda v: xent.log_softmax(v), x),
        "softmax": (lambda v: xent.softmax(v, axis=0), x),
    }  # fmt: skip


_TORCH_FUNCTION_NAMES = [
    "ce-plain", "ce-weight-smoothing-ignore", "ce-z-loss-softcap-sample-weight-none",
    "ce-kdim-axis1-sum", "ce-probabilities-weight", "ce-from-probabilities", "bce-logits",
    "bce-probabilities-none", "logsumexp", "log_softmax", "softmax",
]  # fmt: skip


_HESSIAN_OPTIONS = {
    "plain-mean": {},
    "weight-smoothing-ignore-mean": {"weight": True, "label_smoothing": 0.3, "ignore": True},
    "weight-sum": {"weight": True, "reduction": "sum"},
    "probabilities-smoothing-weight": {"probabilities": True, "label_smoothing": 0.2,
                                       "weight": True},
    "kdim-axis1-none": {"kdim": True, "reduction": "none", "label_smoothing": 0.1},
}  # fmt: skip


def _hessian_case(
    rng: np.random.Generator, spec: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(x, target, F.cross_entropy keyword options with NumPy arrays) for one option set."""
    shape = (2, 4, 2) if spec.get("kdim") else (3, 4)
    x = rng.normal(size=shape) * 1.5
    if spec.get("probabilities"):
        t = _softmax_rows(rng, shape, 1)
    else:
        t = rng.integers(0, 4, size=(shape[0], *shape[2:]))
        if spec.get("ignore"):
            t.reshape(-1)[1] = -100
    o: dict[str, Any] = {"reduction": spec.get("reduction", "mean"),
                         "label_smoothing": spec.get("label_smoothing", 0.0)}  # fmt: skip
    if spec.get("weight"):
        o["weight"] = rng.uniform(0.5, 2.0, size=4)
    return x, t, o


def _torch_F_hessian(x: np.ndarray, t: np.ndarray, o: dict[str, Any]) -> np.ndarray:
    torch = _torch()
    F = torch.nn.functional
    to = {k: _t(v) if isinstance(v, np.ndarray) else v for k, v in o.items()}
    hess = torch.autograd.functional.hessian(lambda v: F.cross_entropy(v, _t(t), **to).sum(), _t(x))
    return hess.numpy()


def _xent_options(xp: Any, o: dict[str, Any]) -> dict[str, Any]:
    return {"axis": 1, **_opts_for(xp, o)}


class TestTorchAutograd:
    """PyTorch autograd through every function, to the third derivative."""

    @pytest.mark.only_backends(*TORCH_BACKENDS)
    @pytest.mark.parametrize("name", _TORCH_FUNCTION_NAMES)
    def test_torch_gradcheck_and_gradgradcheck(
        self, xp: Any, rng: np.random.Generator, name: str
    ) -> None:
        torch = _torch()
        fn, x_np = _torch_functions(xp, rng)[name]
        x = to_xp(xp, x_np).requires_grad_()
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)
        assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)

    @pytest.mark.only_backends(*TORCH_BACKENDS)
    @pytest.mark.parametrize("option_set", list(_HESSIAN_OPTIONS))
    def test_torch_hessian_matches_F_cross_entropy(
        self, xp: Any, rng: np.random.Generator, option_set: str
    ) -> None:
        torch = _torch()
        x, t, o = _hessian_case(rng, _HESSIAN_OPTIONS[option_set])
        target, opts = to_xp(xp, t), _xent_options(xp, o)
        got = torch.autograd.functional.hessian(
            lambda v: xent.cross_entropy(v, target, **opts).sum(), to_xp(xp, x)
        )
        xp_assert_close(
            got, _torch_F_hessian(x, t, o), xp=xp, dtype="float64", rtol=1e-10, atol=1e-13
        )

    @pytest.mark.only_backends(*TORCH_BACKENDS)
    @pytest.mark.parametrize("option_set", list(_HESSIAN_OPTIONS))
    def test_torch_third_derivative_matches_F_cross_entropy(
        self, xp: Any, rng: np.random.Generator, option_set: str
    ) -> None:
        """Autodiff to any order: d/dx (v . d/dx (v . d/dx loss)) against PyTorch's own."""
        torch = _torch()
        F = torch.nn.functional
        x, t, o = _hessian_case(rng, _HESSIAN_OPTIONS[option_set])
        v = rng.normal(size=x.shape)

        def third(loss_fn: Any, x_t: Any, v_t: Any) -> Any:
            x_t = x_t.detach().requires_grad_()
            (g,) = torch.autograd.grad(loss_fn(x_t).sum(), x_t, create_graph=True)
            (h,) = torch.autograd.grad((g * v_t).sum(), x_t, create_graph=True)
            (k,) = torch.autograd.grad((h * v_t).sum(), x_t)
            return k

        target, opts = to_xp(xp, t), _xent_options(xp, o)
        got = third(lambda a: xent.cross_entropy(a, target, **opts), to_xp(xp, x), to_xp(xp, v))
        to = {k: _t(val) if isinstance(val, np.ndarray) else val for k, val in o.items()}
        want = third(lambda a: F.cross_entropy(a, _t(t), **to), _t(x), _t(v))
        xp_assert_close(got, want.numpy(), xp=xp, dtype="float64", rtol=1e-9, atol=1e-12)

    @pytest.mark.only_backends(*TORCH_BACKENDS)
    def test_torch_hessian_of_z_loss_softcap_sample_weight_matches_reference_expression(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        torch = _torch()
        x = rng.normal(size=(3, 4)) * 2
        t = np.array([1, -100, 3])
        o = {"z_loss": 0.05, "softcap": 3.0, "sample_weight": rng.uniform(0.5, 2.0, size=3),
             "label_smoothing": 0.1, "weight": rng.uniform(0.5, 2.0, size=4)}  # fmt: skip
        target, opts = to_xp(xp, t), _opts_for(xp, o)
        got = torch.autograd.functional.hessian(
            lambda v: xent.cross_entropy(v, target, **opts), to_xp(xp, x)
        )
        to = {k: _t(v) if isinstance(v, np.ndarray) else v for k, v in o.items()}
        want = torch.autograd.functional.hessian(
            lambda v: _torch_reference_ce(v, _t(t), **to), _t(x)
        )
        xp_assert_close(got, want.numpy(), xp=xp, dtype="float64", rtol=1e-10, atol=1e-13)

    @pytest.mark.only_backends(*TORCH_BACKENDS)
    def test_torch_gradient_flows_to_soft_targets_and_sample_weight(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        """Plain autograd reaches every differentiable argument, as with ``F.cross_entropy``
        (distillation with a trainable teacher, learned sample weights)."""
        torch = _torch()
        F = torch.nn.functional
        x_np = rng.normal(size=(3, 4))
        t_np = _softmax_rows(rng, (3, 4), -1)
        s_np = rng.uniform(0.5, 2.0, size=3)
        x = to_xp(xp, x_np).requires_grad_()
        t = to_xp(xp, t_np).requires_grad_()
        s = to_xp(xp, s_np).requires_grad_()
        xent.cross_entropy(x, t, sample_weight=s, label_smoothing=0.1).backward()

        xr, tr, sr = (_t(a).requires_grad_() for a in (x_np, t_np, s_np))
        (F.cross_entropy(xr, tr, reduction="none", label_smoothing=0.1) * sr).sum().div(
            sr.sum()
        ).backward()
        for name, got, want in (("input", x, xr), ("target", t, tr), ("sample_weight", s, sr)):
            assert got.grad is not None, f"no gradient reached `{name}`"
            xp_assert_close(
                got.grad,
                want.grad.numpy(),
                xp=xp,
                dtype="float64",
                rtol=1e-10,
                atol=1e-13,
                err_msg=name,
            )

    @pytest.mark.only_backends(*TORCH_BACKENDS)
    def test_torch_bce_gradient_flows_to_target_and_weights(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        torch = _torch()
        F = torch.nn.functional
        arrays = {
            "input": rng.normal(size=(3, 4)),
            "target": rng.uniform(size=(3, 4)),
            "weight": rng.uniform(0.5, 2.0, size=(3, 1)),
            "pos_weight": rng.uniform(0.5, 2.0, size=4),
        }
        ours = {k: to_xp(xp, v).requires_grad_() for k, v in arrays.items()}
        xent.binary_cross_entropy(
            ours["input"], ours["target"], weight=ours["weight"], pos_weight=ours["pos_weight"]
        ).backward()
        theirs = {k: _t(v).requires_grad_() for k, v in arrays.items()}
        x, y, w, pw = theirs["input"], theirs["target"], theirs["weight"], theirs["pos_weight"]
        # The binary cross-entropy of docs/semantics.md as a PyTorch expression (F.binary_cross_entropy_with_logits has no
        # gradient for `weight`)
        (-w * (pw * y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x))).mean().backward()
        for name in arrays:
            assert ours[name].grad is not None, f"no gradient reached `{name}`"
            xp_assert_close(
                ours[name].grad,
                theirs[name].grad.numpy(),
                xp=xp,
                dtype="float64",
                rtol=1e-10,
                atol=1e-13,
                err_msg=name,
            )


# --------------------------------------------------------------------------- no NaN gradients
def _masked_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits with -inf off-target, class labels, and soft targets with zero mass on them."""
    x = rng.normal(size=(4, 5))
    x[0, 1] = x[2, 4] = x[3, 0] = x[3, 2] = -np.inf
    labels = np.array([0, 3, 1, 4])
    soft = _softmax_rows(rng, x.shape, -1)
    soft = np.where(np.isneginf(x), 0.0, soft)
    soft[1] = 0.0  # a row with no target mass at all: loss 0, gradient 0
    soft /= np.maximum(soft.sum(-1, keepdims=True), 1e-300)
    return x, labels, soft


def _masked_want(x: np.ndarray, t: np.ndarray, **o: Any) -> tuple[np.ndarray, np.ndarray]:
    """Loss and gradient with the -inf classes replaced by a very negative finite logit."""
    finite = np.where(np.isneginf(x), -1e4, x)
    _, grad = _torch_autograd(
        lambda v: _torch_reference_ce(
            v, _t(t), **{k: _t(val) if isinstance(val, np.ndarray) else val for k, val in o.items()}
        ),
        finite,
    )
    return ref.cross_entropy(x, t, **o), grad


_MASK_OPTIONS = {
    "plain": {},
    "weight-sum": {"reduction": "sum", "weight": np.array([0.5, 1.0, 2.0, 1.5, 0.7])},
    "z-loss-none": {"reduction": "none", "z_loss": 0.1},
}


class TestNoNaNGradients:
    """Masked logits and zero-mass targets never give a NaN gradient."""

    @pytest.mark.only_backends(*TORCH_BACKENDS, *JAX_BACKENDS)
    @pytest.mark.parametrize("target_kind", ["indices", "probabilities"])
    @pytest.mark.parametrize("option_set", list(_MASK_OPTIONS))
    def test_no_nan_gradient_for_masked_logits_or_zero_mass_targets(
        self, xp: Any, rng: np.random.Generator, target_kind: str, option_set: str
    ) -> None:
        x, labels, soft = _masked_case(rng)
        t = labels if target_kind == "indices" else soft
        o = _MASK_OPTIONS[option_set]
        opts = _opts_for(xp, o)
        want_loss, want_grad = _masked_want(x, t, **o)
        target = to_xp(xp, t)

        if current().backend.like(Backend.TORCH):
            torch = _torch()
            xt = to_xp(xp, x).requires_grad_()
            loss = xent.cross_entropy(xt, target, **opts)
            (grad,) = torch.autograd.grad(loss.sum(), xt, create_graph=True)
            hess = torch.autograd.functional.hessian(
                lambda v: xent.cross_entropy(v, target, **opts).sum(), to_xp(xp, x)
            )
        else:
            import jax

            def f(v: Any) -> Any:
                return xent.cross_entropy(v, target, **opts).sum()

            loss = xent.cross_entropy(to_xp(xp, x), target, **opts)
            grad = jax.grad(f)(to_xp(xp, x))
            xp_assert_close(
                jax.jit(jax.grad(f))(to_xp(xp, x)),
                want_grad,
                xp=xp,
                dtype="float64",
                rtol=1e-10,
                atol=1e-13,
                err_msg="under jit",
            )
            hess = jax.hessian(f)(to_xp(xp, x))

        xp_assert_close(loss, want_loss, xp=xp, dtype="float64")
        g = _assert_finite(grad, "the gradient")
        assert np.all(g[np.isneginf(x)] == 0.0)
        xp_assert_close(grad, want_grad, xp=xp, dtype="float64", rtol=1e-10, atol=1e-13)
        _assert_finite(hess, "the Hessian")
        # and the analytic gradient agrees
        _, analytic = xent.cross_entropy_and_grad(to_xp(xp, x), target, **opts)
        xp_assert_close(analytic, want_grad, xp=xp, dtype="float64", rtol=1e-10, atol=1e-13)

    def test_analytic_grad_has_no_nan_for_masked_logits_on_every_backend(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        x, labels, soft = _masked_case(rng)
        for t in (labels, soft):
            want_loss, want_grad = _masked_want(x, t, label_smoothing=0.0, z_loss=0.05)
            loss, grad = xent.cross_entropy_and_grad(to_xp(xp, x), to_xp(xp, t), z_loss=0.05)
            xp_assert_close(loss, want_loss, xp=xp, dtype="float64")
            _assert_finite(grad, "the analytic gradient")
            xp_assert_close(grad, want_grad, xp=xp, dtype="float64", rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------- JAX autodiff
def _jax() -> tuple[Any, Any]:
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax", reason="the reference JAX losses are Optax's")
    return jax, optax


def _assert_jax_grads_match_torch(
    xp: Any, f: Any, arrays: dict[str, Any], theirs: dict[str, Any], *, modes: tuple[str, ...]
) -> None:
    """JAX's derivatives of ``f`` w.r.t. every argument (in ``arrays`` order) against the
    ``.grad`` of the torch tensors in ``theirs``, in each of ``modes``."""
    jax, _ = _jax()
    argnums = tuple(range(len(arrays)))
    transforms = {
        "grad": jax.grad(f, argnums=argnums),
        "jit(grad)": jax.jit(jax.grad(f, argnums=argnums)),
        "jacfwd": jax.jacfwd(f, argnums=argnums),
    }
    values = [to_xp(xp, a) for a in arrays.values()]
    for mode in modes:
        for name, got in zip(arrays, transforms[mode](*values), strict=True):
            xp_assert_close(
                got,
                theirs[name].grad.numpy(),
                xp=xp,
                dtype="float64",
                rtol=1e-10,
                atol=1e-13,
                err_msg=f"{mode}: {name}",
            )


class TestJaxAutodiff:
    """JAX autodiff against Optax, PyTorch and itself, eagerly, jitted and vmapped."""

    @pytest.mark.only_backends(*JAX_BACKENDS)
    @pytest.mark.parametrize("reduction", ["mean", "sum"])
    @pytest.mark.parametrize("smoothing", [0.0, 0.2])
    @pytest.mark.parametrize("target_kind", ["indices", "probabilities"])
    def test_jax_grad_matches_optax(
        self, xp: Any, rng: np.random.Generator, reduction: str, smoothing: float, target_kind: str
    ) -> None:
        jax, optax = _jax()
        x = to_xp(xp, rng.normal(size=(6, 5)) * 2)
        labels = to_xp(xp, rng.integers(0, 5, size=6))
        soft = to_xp(xp, _softmax_rows(rng, (6, 5), -1))
        reduce = xp.mean if reduction == "mean" else xp.sum

        if target_kind == "indices":
            target = labels
            if smoothing:
                onehot = jax.nn.one_hot(labels, 5, dtype=x.dtype)

                def theirs(v: Any) -> Any:
                    return reduce(
                        optax.softmax_cross_entropy(v, optax.smooth_labels(onehot, smoothing))
                    )
            else:

                def theirs(v: Any) -> Any:
                    return reduce(optax.softmax_cross_entropy_with_integer_labels(v, labels))
        else:
            target = soft

            def theirs(v: Any) -> Any:
                return reduce(optax.softmax_cross_entropy(v, optax.smooth_labels(soft, smoothing)))

        def ours(v: Any) -> Any:
            return xent.cross_entropy(v, target, label_smoothing=smoothing, reduction=reduction)

        want = to_numpy(jax.grad(theirs)(x))
        xp_assert_close(ours(x), to_numpy(theirs(x)), xp=xp, dtype="float64")
        xp_assert_close(jax.grad(ours)(x), want, xp=xp, dtype="float64", rtol=1e-10, atol=1e-13)
        xp_assert_close(
            jax.jit(jax.grad(ours))(x), want, xp=xp, dtype="float64", rtol=1e-10, atol=1e-13
        )
        xp_assert_close(
            jax.jit(jax.value_and_grad(ours))(x)[1],
            want,
            xp=xp,
            dtype="float64",
            rtol=1e-10,
            atol=1e-13,
        )

    @pytest.mark.only_backends(*JAX_BACKENDS)
    @pytest.mark.parametrize("target_kind", ["indices", "probabilities"])
    def test_jax_gradient_flows_to_targets_and_weights(
        self, xp: Any, rng: np.random.Generator, target_kind: str
    ) -> None:
        """JAX's custom rule covers ``input`` only; the other arguments are differentiated through
        (reverse and forward mode, under jit too), as PyTorch autograd does for the same expression."""
        _jax()
        arrays = {
            "input": rng.normal(size=(4, 5)),
            "weight": rng.uniform(0.5, 2.0, size=5),
            "sample_weight": rng.uniform(0.5, 2.0, size=4),
        }
        if target_kind == "probabilities":
            arrays["target"] = _softmax_rows(rng, (4, 5), -1)
            labels = None
        else:
            labels = rng.integers(0, 5, size=4)
        names = list(arrays)

        def ours(*values: Any) -> Any:
            a = dict(zip(names, values, strict=True))
            target = a["target"] if labels is None else to_xp(xp, labels)
            return xent.cross_entropy(
                a["input"], target, weight=a["weight"], sample_weight=a["sample_weight"],
                label_smoothing=0.1,
            )  # fmt: skip

        theirs = {k: _t(v).requires_grad_() for k, v in arrays.items()}
        _torch_reference_ce(
            theirs["input"],
            theirs["target"] if labels is None else _t(labels),
            weight=theirs["weight"],
            sample_weight=theirs["sample_weight"],
            label_smoothing=0.1,
        ).backward()

        _assert_jax_grads_match_torch(
            xp, ours, arrays, theirs, modes=("grad", "jit(grad)", "jacfwd")
        )

    @pytest.mark.only_backends(*JAX_BACKENDS)
    def test_jax_bce_gradient_flows_to_target_and_weights(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        _jax()
        torch = _torch()
        F = torch.nn.functional
        arrays = {
            "input": rng.normal(size=(3, 4)),
            "target": rng.uniform(size=(3, 4)),
            "weight": rng.uniform(0.5, 2.0, size=(3, 1)),
            "pos_weight": rng.uniform(0.5, 2.0, size=4),
        }
        names = list(arrays)

        def ours(x: Any, y: Any, w: Any, pw: Any) -> Any:
            return xent.binary_cross_entropy(x, y, weight=w, pos_weight=pw)

        theirs = {k: _t(v).requires_grad_() for k, v in arrays.items()}
        x, y, w, pw = (theirs[k] for k in names)
        (-w * (pw * y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x))).mean().backward()
        _assert_jax_grads_match_torch(xp, ours, arrays, theirs, modes=("jit(grad)", "jacfwd"))

    @pytest.mark.only_backends(*JAX_BACKENDS)
    @pytest.mark.parametrize("option_set", list(_HESSIAN_OPTIONS))
    def test_jax_hessians_agree_with_each_other_and_with_torch(
        self, xp: Any, rng: np.random.Generator, option_set: str
    ) -> None:
        jax, _ = _jax()
        x, t, o = _hessian_case(rng, _HESSIAN_OPTIONS[option_set])
        target, opts = to_xp(xp, t), _xent_options(xp, o)

        def f(v: Any) -> Any:
            return xp.sum(xent.cross_entropy(v, target, **opts))

        xj = to_xp(xp, x)
        want = _torch_F_hessian(x, t, o)
        for label, hess in (
            ("hessian", jax.hessian(f)),
            ("jit(jacfwd(grad))", jax.jit(jax.jacfwd(jax.grad(f)))),
            ("jit(hessian)", jax.jit(jax.hessian(f))),
            ("jit(jacfwd(jacrev))", jax.jit(jax.jacfwd(jax.jacrev(f)))),
        ):
            xp_assert_close(
                hess(xj), want, xp=xp, dtype="float64", rtol=1e-10, atol=1e-13, err_msg=label
            )

    @pytest.mark.only_backends(*JAX_BACKENDS)
    def test_jax_hessians_of_every_function_match_torch(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        jax, _ = _jax()
        torch = _torch()
        F = torch.nn.functional
        x = rng.normal(size=(3, 4)) * 1.5
        y = rng.uniform(size=(3, 4))
        pw = rng.uniform(0.5, 2.0, size=4)
        t = np.array([2, 0, 1])
        sw = rng.uniform(0.5, 2.0, size=3)
        zo = {"z_loss": 0.05, "softcap": 3.0, "sample_weight": sw}
        cases = {
            "bce": (lambda v: xent.binary_cross_entropy(v, to_xp(xp, y), pos_weight=to_xp(xp, pw)),
                    lambda v: F.binary_cross_entropy_with_logits(v, _t(y), pos_weight=_t(pw))),
            "logsumexp": (lambda v: xp.sum(xent.logsumexp(v) ** 2),
                          lambda v: (torch.logsumexp(v, -1) ** 2).sum()),
            "log_softmax": (lambda v: xp.sum(xent.log_softmax(v, axis=0) ** 2),
                            lambda v: (torch.log_softmax(v, 0) ** 2).sum()),
            "softmax": (lambda v: xp.sum(xent.softmax(v) ** 3), lambda v: (torch.softmax(v, -1) ** 3).sum()),
            "ce-z-loss-softcap-sample-weight": (
                lambda v: xent.cross_entropy(v, to_xp(xp, t), **_opts_for(xp, zo)),
                lambda v: _torch_reference_ce(v, _t(t), z_loss=0.05, softcap=3.0, sample_weight=_t(sw))),
        }  # fmt: skip
        for label, (ours, theirs) in cases.items():
            want = torch.autograd.functional.hessian(theirs, _t(x)).numpy()
            xj = to_xp(xp, x)
            xp_assert_close(
                jax.hessian(ours)(xj),
                want,
                xp=xp,
                dtype="float64",
                rtol=1e-10,
                atol=1e-13,
                err_msg=label,
            )
            xp_assert_close(
                jax.jit(jax.jacfwd(jax.grad(ours)))(xj),
                want,
                xp=xp,
                dtype="float64",
                rtol=1e-10,
                atol=1e-13,
                err_msg=f"jit jacfwd(grad) {label}",
            )

    @pytest.mark.only_backends(*JAX_BACKENDS)
    def test_jax_third_derivative_matches_torch(self, xp: Any, rng: np.random.Generator) -> None:
        jax, _ = _jax()
        torch = _torch()
        F = torch.nn.functional
        x = rng.normal(size=(3, 4))
        t = np.array([1, 3, -100])
        w = rng.uniform(0.5, 2.0, size=4)
        opts = {"weight": to_xp(xp, w), "label_smoothing": 0.1}
        third = jax.jacfwd(
            jax.jacrev(jax.grad(lambda v: xent.cross_entropy(v, to_xp(xp, t), **opts)))
        )
        got = jax.jit(third)(to_xp(xp, x))

        xt = _t(x).requires_grad_()
        loss = F.cross_entropy(xt, _t(t), weight=_t(w), label_smoothing=0.1)
        (g,) = torch.autograd.grad(loss, xt, create_graph=True)
        want = np.zeros(x.shape * 3)
        flat_g = g.reshape(-1)
        for i in range(flat_g.numel()):
            (h,) = torch.autograd.grad(flat_g[i], xt, create_graph=True)
            flat_h = h.reshape(-1)
            for j in range(flat_h.numel()):
                (k,) = torch.autograd.grad(flat_h[j], xt, retain_graph=True)
                want[np.unravel_index(i, x.shape) + np.unravel_index(j, x.shape)] = k.numpy()
        xp_assert_close(got, want, xp=xp, dtype="float64", rtol=1e-9, atol=1e-12)

    @pytest.mark.only_backends(*JAX_BACKENDS)
    def test_jax_grad_under_vmap_matches_per_example_grads(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        jax, _ = _jax()
        x = to_xp(xp, rng.normal(size=(5, 3, 4)))
        t = to_xp(xp, rng.integers(0, 4, size=(5, 3)))

        def f(v: Any, y: Any) -> Any:
            return xent.cross_entropy(v, y, label_smoothing=0.1, z_loss=0.01)

        got = jax.jit(jax.vmap(jax.grad(f)))(x, t)
        for i in range(5):
            _, want = xent.cross_entropy_and_grad(x[i], t[i], label_smoothing=0.1, z_loss=0.01)
            xp_assert_close(got[i], to_numpy(want), xp=xp, dtype="float64", rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- issue 7 classes
class TestProbabilityTargetGradient:
    """The derivative with respect to probability targets is ``-w * log_softmax(x)`` for
    every class, those with target 0 included (torch autograd, torch.func, JAX grad and jit)."""

    @pytest.mark.only_backends(*TORCH_BACKENDS)
    def test_torch(self, xp: Any) -> None:
        torch = _torch()
        x = to_xp(xp, np.asarray([[1.0, 2.0, 3.0], [0.5, -np.inf, 0.0]]))
        t = to_xp(xp, np.asarray([[0.0, 1.0, 0.0], [0.25, 0.0, 0.75]])).requires_grad_()
        w = to_xp(xp, np.asarray([1.0, 2.0, 0.5]))
        xent.cross_entropy(x, t, weight=w, reduction="sum").backward()
        want = -(torch.log_softmax(x, dim=-1) * w)
        want = torch.where(torch.isinf(want), 0.0, want)  # a -inf (masked) class: derivative 0
        np.testing.assert_allclose(to_numpy(t.grad), to_numpy(want))
        grad = torch.func.grad(lambda q: xent.cross_entropy(x, q, reduction="sum"))(t.detach())
        want = -torch.log_softmax(x, dim=-1)
        np.testing.assert_allclose(
            to_numpy(grad), to_numpy(torch.where(torch.isinf(want), 0.0, want))
        )
        t_ref = t.detach().clone().requires_grad_()
        torch.nn.functional.cross_entropy(x[:1], t_ref[:1], reduction="sum").backward()
        np.testing.assert_allclose(to_numpy(t.grad)[0] / [1.0, 2.0, 0.5], to_numpy(t_ref.grad)[0])

    @pytest.mark.only_backends(*JAX_BACKENDS)
    def test_jax(self, xp: Any) -> None:
        import jax

        x = to_xp(xp, np.asarray([[1.0, 2.0, 3.0], [0.5, -np.inf, 0.0]]))
        t = to_xp(xp, np.asarray([[0.0, 1.0, 0.0], [0.25, 0.0, 0.75]]))
        for wrap in (lambda f: f, jax.jit):
            grad = wrap(jax.grad(lambda q: xent.cross_entropy(x, q, reduction="sum")))(t)
            want = -to_numpy(jax.nn.log_softmax(x))
            np.testing.assert_allclose(to_numpy(grad), np.where(np.isinf(want), 0.0, want))


class TestInvalidLabelGradientIsNaN:
    """An invalid label left unchecked (validate=False, or traced) gives its row a NaN loss and
    a NaN gradient on every path; the other rows keep their finite gradient."""

    def test_analytic_gradient(self, xp: Any) -> None:
        x = to_xp(xp, np.zeros((2, 3)))
        _, grad = xent.cross_entropy_and_grad(x, to_xp(xp, np.asarray([1, 7])), validate=False)
        g = to_numpy(grad)
        assert np.isnan(g[1]).all()
        assert np.isfinite(g[0]).all()

    @pytest.mark.only_backends(*TORCH_BACKENDS)
    @pytest.mark.parametrize("path", ["autograd", "weight_grad", "func_grad"])
    def test_torch_paths(self, xp: Any, path: str) -> None:
        torch = _torch()
        x = to_xp(xp, np.zeros((2, 3)))
        t = to_xp(xp, np.asarray([1, 7]))
        w = to_xp(xp, np.ones(3)).requires_grad_(path == "weight_grad")

        def loss(a: Any) -> Any:
            return xent.cross_entropy(a, t, weight=w, reduction="sum", validate=False)

        if path == "func_grad":
            g = torch.func.grad(loss)(x)
        else:
            a = x.clone().requires_grad_()
            loss(a).backward()
            g = a.grad
            if path == "weight_grad":  # the invalid row's NaN reaches the weights it uses
                assert torch.isnan(w.grad).any()
        g = to_numpy(g)
        assert np.isnan(g[1]).all()
        assert np.isfinite(g[0]).all()

    @pytest.mark.only_backends(*JAX_BACKENDS)
    def test_jax_paths(self, xp: Any) -> None:
        import jax

        x = to_xp(xp, np.zeros((2, 3)))
        t = to_xp(xp, np.asarray([1, 7]))
        w = to_xp(xp, np.ones(3))
        for wrap in (lambda f: f, jax.jit):
            g = wrap(
                jax.grad(
                    lambda a, v: xent.cross_entropy(
                        a, t, weight=v, reduction="sum", validate=False
                    ),
                    argnums=(0, 1),
                )
            )
            gx, gw = (to_numpy(a) for a in g(x, w))
            assert np.isnan(gx[1]).all()
            assert np.isfinite(gx[0]).all()
            assert np.isnan(gw).any()


class TestBinaryGradientAtZero:
    """The binary cross-entropy's derivative at a logit of exactly 0 is ``sigmoid(0) - y``
    (0.5 or -0.5) on every path: analytic, autodiff of the generic forward, native rules."""

    def test_analytic(self, xp: Any) -> None:
        _, g = xent.binary_cross_entropy_and_grad(
            to_xp(xp, np.zeros(3)), to_xp(xp, np.asarray([1.0, 0.0, 0.25])), reduction="sum"
        )
        np.testing.assert_allclose(to_numpy(g), [-0.5, 0.5, 0.25])

    @pytest.mark.only_backends(*TORCH_BACKENDS, *JAX_BACKENDS)
    def test_autodiff(self, xp: Any, backend: Backend) -> None:
        x = to_xp(xp, np.zeros(3))
        y = to_xp(xp, np.asarray([1.0, 0.0, 0.25]))
        if backend.like(Backend.JAX):
            import jax

            g = jax.grad(lambda a: xent.binary_cross_entropy(a, y, reduction="sum"))(x)
            gg = jax.grad(
                lambda a: xent.binary_cross_entropy(a, y, weight=a + 1.0, reduction="sum")
            )(x)
        else:
            a = x.clone().requires_grad_()
            xent.binary_cross_entropy(a, y, reduction="sum").backward()
            g = a.grad
            b = x.clone().requires_grad_()
            xent.binary_cross_entropy(b, y, pos_weight=b + 1.0, reduction="sum").backward()
            gg = b.grad
        np.testing.assert_allclose(to_numpy(g), [-0.5, 0.5, 0.25])
        # With the weight depending on x the plain-autodiff fallback runs as well.
        assert np.isfinite(to_numpy(gg)).all()


_EMPTY_LOSS = {"mean": np.nan, "sum": 0.0}


def _empty_problem(xp: Any, probabilities: bool) -> dict[str, Any]:
    target = np.zeros((0, 3)) if probabilities else np.zeros((0,), dtype=np.int64)
    return {
        "input": to_xp(xp, np.zeros((0, 3))),
        "target": to_xp(xp, target),
        "weight": to_xp(xp, np.array([1.0, 2.0, 0.5])),
        "sample_weight": to_xp(xp, np.ones((0,))),
    }


class TestEmptyBatch:
    """An empty batch: NaN or 0 loss and a zero gradient of its own shape for every input, as PyTorch gives."""

    @pytest.mark.only_backends(*TORCH_BACKENDS)
    @pytest.mark.parametrize("reduction", ["mean", "sum"])
    @pytest.mark.parametrize(
        ("needs_grad", "probabilities"),
        [
            (("input",), False),
            (("weight",), False),
            (("input", "weight", "sample_weight"), False),
            (("target",), True),
            (("input", "target", "weight"), True),
        ],
    )
    def test_torch_cross_entropy_backward(
        self, xp: Any, needs_grad: tuple[str, ...], probabilities: bool, reduction: str
    ) -> None:
        arrays = _empty_problem(xp, probabilities)
        for name in needs_grad:
            arrays[name].requires_grad_(True)
        loss = xent.cross_entropy(
            arrays["input"],
            arrays["target"],
            weight=arrays["weight"],
            sample_weight=arrays["sample_weight"],
            reduction=reduction,
        )
        loss.backward()
        np.testing.assert_equal(to_numpy(loss), _EMPTY_LOSS[reduction])
        for name in needs_grad:
            grad = arrays[name].grad
            assert grad is not None, f"no gradient for `{name}`"
            assert grad.shape == arrays[name].shape
            np.testing.assert_array_equal(to_numpy(grad), np.zeros(tuple(grad.shape)))

    @pytest.mark.only_backends(*TORCH_BACKENDS)
    @pytest.mark.parametrize("needs_grad", [("input",), ("weight",), ("target", "pos_weight")])
    def test_torch_binary_cross_entropy_backward(
        self, xp: Any, needs_grad: tuple[str, ...]
    ) -> None:
        arrays = {
            "input": to_xp(xp, np.zeros((0, 3))),
            "target": to_xp(xp, np.zeros((0, 3))),
            "weight": to_xp(xp, np.ones((3,))),
            "pos_weight": to_xp(xp, np.ones((3,))),
        }
        for name in needs_grad:
            arrays[name].requires_grad_(True)
        loss = xent.binary_cross_entropy(
            arrays["input"],
            arrays["target"],
            weight=arrays["weight"],
            pos_weight=arrays["pos_weight"],
        )
        loss.backward()
        assert np.isnan(to_numpy(loss))
        for name in needs_grad:
            grad = arrays[name].grad
            assert grad is not None, f"no gradient for `{name}`"
            np.testing.assert_array_equal(to_numpy(grad), np.zeros(tuple(arrays[name].shape)))

    @pytest.mark.only_backends(*JAX_BACKENDS)
    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    def test_jax_grad_of_every_float_argument(self, xp: Any, probabilities: bool) -> None:
        import jax

        arrays = _empty_problem(xp, probabilities)
        names = ["input", "weight", "sample_weight"] + (["target"] if probabilities else [])

        def loss(*values: Any) -> Any:
            kw = dict(arrays, **dict(zip(names, values, strict=True)))
            return xent.cross_entropy(
                kw["input"], kw["target"], weight=kw["weight"], sample_weight=kw["sample_weight"]
            )

        values = [arrays[n] for n in names]
        assert np.isnan(to_numpy(loss(*values)))
        grads = jax.grad(loss, argnums=tuple(range(len(names))))(*values)
        for name, grad in zip(names, grads, strict=True):
            assert grad.shape == arrays[name].shape, name
            np.testing.assert_array_equal(to_numpy(grad), np.zeros(arrays[name].shape))
