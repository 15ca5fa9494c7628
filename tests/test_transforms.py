"""xent under program transformations: `jax.jit`, `jax.vmap`, `jax.grad`/`jax.hessian`,
`torch.compile(fullgraph=True)`, `torch.func.vmap`/`grad`, autograd to second order, and Dask's
laziness (nothing computes before `.compute()`, chunked along rows and classes)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import _reference as ref
import numpy as np
import pytest
from _helpers import Backend, to_numpy, to_xp, xp_assert_close

import xent

JAX = pytest.mark.only_backends(Backend.JAX, Backend.JAX_GPU)
TORCH = pytest.mark.only_backends(Backend.TORCH, Backend.TORCH_CUDA)
DASK = pytest.mark.only_backends(Backend.DASK)

CE_OPTIONS = {
    "plain": {},
    "weighted-smoothed-ignored": {"weight": True, "label_smoothing": 0.2, "ignore": True},
    "z-loss-softcap-sum": {"z_loss": 0.05, "softcap": 3.0, "reduction": "sum"},
    "sample-weight-none-axis0": {"sample_weight": True, "reduction": "none", "axis": 0},
}


def _ce_problem(
    rng: np.random.Generator, spec: dict[str, Any], probabilities: bool = False
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Logits (4, 5) (classes on `axis`), targets and NumPy options for a CE_OPTIONS entry."""
    axis = spec.get("axis", -1)
    x = rng.normal(size=(4, 5)) * 2
    if axis == 0:
        x = x.T.copy()
    n_classes = x.shape[axis]
    if probabilities:
        t = rng.dirichlet(np.ones(n_classes), size=4)
        t = t.T.copy() if axis == 0 else t
    else:
        t = rng.integers(0, n_classes, size=4)
        if spec.get("ignore"):
            t[2] = -100
    opts: dict[str, Any] = {"axis": axis, "reduction": spec.get("reduction", "mean")}
    for name in ("label_smoothing", "z_loss", "softcap"):
        if name in spec:
            opts[name] = spec[name]
    if spec.get("weight"):
        opts["weight"] = rng.uniform(0.5, 2.0, size=n_classes)
    if spec.get("sample_weight"):
        opts["sample_weight"] = rng.uniform(0.5, 2.0, size=4)
    return x, t, opts


def _on(xp: Any, opts: dict[str, Any]) -> dict[str, Any]:
    return {k: to_xp(xp, v) if isinstance(v, np.ndarray) else v for k, v in opts.items()}


class TestJaxJit:
    """Every function under `jax.jit` equals the reference; invalid labels give NaN."""

    @JAX
    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    @pytest.mark.parametrize("option_set", list(CE_OPTIONS))
    def test_jax_jit_matches_reference(
        self, xp: Any, rng: np.random.Generator, option_set: str, probabilities: bool
    ) -> None:
        import jax

        x, t, opts = _ce_problem(rng, CE_OPTIONS[option_set], probabilities)
        arrays = {k: v for k, v in _on(xp, opts).items() if not isinstance(v, int | float | str)}
        static = {k: v for k, v in opts.items() if k not in arrays}

        @jax.jit
        def loss(x: Any, t: Any, arrays: dict[str, Any]) -> Any:
            return xent.cross_entropy(x, t, **static, **arrays)

        got = loss(to_xp(xp, x), to_xp(xp, t), arrays)
        xp_assert_close(got, ref.cross_entropy(x, t, **opts), xp=xp, dtype="float64")

    @JAX
    @pytest.mark.parametrize("validate", [None, False])
    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    def test_jax_jit_invalid_label_gives_nan(
        self, xp: Any, rng: np.random.Generator, validate: bool | None, reduction: str
    ) -> None:
        import jax

        x = rng.normal(size=(4, 5))
        t = np.array([0, 5, 2, -7])
        f = jax.jit(functools.partial(xent.cross_entropy, reduction=reduction, validate=validate))
        got = f(to_xp(xp, x), to_xp(xp, t))
        want = ref.cross_entropy(x, t, reduction=reduction)
        assert np.all(np.isnan(want[[1, 3]])) if reduction == "none" else np.isnan(want)
        xp_assert_close(got, want, xp=xp, dtype="float64")

    @JAX
    def test_jax_jit_of_binary_and_softmax_functions(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        import jax

        x = rng.normal(size=(3, 4))
        y = rng.uniform(size=(3, 4))
        pw = rng.uniform(0.5, 2.0, size=4)
        bce = jax.jit(functools.partial(xent.binary_cross_entropy, label_smoothing=0.1))
        xp_assert_close(
            bce(to_xp(xp, x), to_xp(xp, y), pos_weight=to_xp(xp, pw)),
            ref.binary_cross_entropy(x, y, pos_weight=pw, label_smoothing=0.1),
            xp=xp,
            dtype="float64",
        )
        for name in ("logsumexp", "log_softmax", "softmax"):
            f = jax.jit(functools.partial(getattr(xent, name), axis=0))
            xp_assert_close(f(to_xp(xp, x)), getattr(ref, name)(x, axis=0), xp=xp, dtype="float64")

    @JAX
    def test_jax_jit_of_and_grad_functions(self, xp: Any, rng: np.random.Generator) -> None:
        import jax

        x, t, opts = _ce_problem(rng, CE_OPTIONS["weighted-smoothed-ignored"])
        w = opts.pop("weight")
        f = jax.jit(functools.partial(xent.cross_entropy_and_grad, **opts))
        loss, grad = f(to_xp(xp, x), to_xp(xp, t), weight=to_xp(xp, w))
        xp_assert_close(loss, ref.cross_entropy(x, t, weight=w, **opts), xp=xp, dtype="float64")
        want = ref.numerical_grad(lambda v: ref.cross_entropy(v, t, weight=w, **opts), x)
        xp_assert_close(grad, want, xp=xp, dtype="float64", rtol=1e-6, atol=1e-8)
        y = rng.uniform(size=(3, 4))
        xb = rng.normal(size=(3, 4))
        g = jax.jit(xent.binary_cross_entropy_and_grad)
        loss, grad = g(to_xp(xp, xb), to_xp(xp, y))
        xp_assert_close(loss, ref.binary_cross_entropy(xb, y), xp=xp, dtype="float64")
        want = ref.numerical_grad(lambda v: ref.binary_cross_entropy(v, y), xb)
        xp_assert_close(grad, want, xp=xp, dtype="float64", rtol=1e-6, atol=1e-8)


class TestJaxVmapAndGrad:
    """`jax.vmap`, `jax.grad` and `jax.hessian` of xent's functions."""

    @JAX
    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    def test_jax_vmap_equals_a_loop(
        self, xp: Any, rng: np.random.Generator, probabilities: bool
    ) -> None:
        import jax

        x = rng.normal(size=(3, 4, 5))
        t = rng.dirichlet(np.ones(5), size=(3, 4)) if probabilities else rng.integers(0, 5, (3, 4))
        t_np = t
        w = rng.uniform(0.5, 2.0, size=5)
        f = functools.partial(xent.cross_entropy, label_smoothing=0.1, weight=to_xp(xp, w))
        got = jax.vmap(f)(to_xp(xp, x), to_xp(xp, t_np))
        want = [ref.cross_entropy(x[i], t_np[i], label_smoothing=0.1, weight=w) for i in range(3)]
        xp_assert_close(got, np.array(want), xp=xp, dtype="float64")
        # vmap over a non-leading axis, jitted, the reduction 'none'
        g = jax.jit(
            jax.vmap(
                functools.partial(xent.cross_entropy, reduction="none"),
                in_axes=(1, 1),
            )
        )
        got = g(to_xp(xp, x), to_xp(xp, t_np))
        want = np.stack(
            [ref.cross_entropy(x[:, j], t_np[:, j], reduction="none") for j in range(4)]
        )
        xp_assert_close(got, want, xp=xp, dtype="float64")

    @JAX
    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    @pytest.mark.parametrize("option_set", list(CE_OPTIONS))
    def test_jax_grad_matches_finite_differences(
        self, xp: Any, rng: np.random.Generator, option_set: str, probabilities: bool
    ) -> None:
        import jax
        import jax.numpy as jnp

        x, t, opts = _ce_problem(rng, CE_OPTIONS[option_set], probabilities)
        xopts = _on(xp, opts)
        grad = jax.grad(lambda v: jnp.sum(xent.cross_entropy(v, to_xp(xp, t), **xopts)))
        want = ref.numerical_grad(lambda v: ref.cross_entropy(v, t, **opts), x)
        xp_assert_close(grad(to_xp(xp, x)), want, xp=xp, dtype="float64", rtol=1e-6, atol=1e-8)
        jitted = jax.jit(grad)(to_xp(xp, x))
        xp_assert_close(jitted, want, xp=xp, dtype="float64", rtol=1e-6, atol=1e-8)

    @JAX
    def test_jax_hessian_is_the_softmax_covariance(self, xp: Any, rng: np.random.Generator) -> None:
        import jax

        # d2/dx2 of mean_n CE(x_n, y_n) is blockdiag(diag(p_n) - p_n p_n^T) / N
        x = rng.normal(size=(3, 4))
        t = np.array([0, 3, 1])
        h = jax.hessian(lambda v: xent.cross_entropy(v, to_xp(xp, t)))(to_xp(xp, x))
        p = ref.softmax(x)
        want = np.zeros((3, 4, 3, 4))
        for n in range(3):
            want[n, :, n, :] = (np.diag(p[n]) - np.outer(p[n], p[n])) / 3
        xp_assert_close(h, want, xp=xp, dtype="float64", rtol=1e-10, atol=1e-12)
        # and through the probability-target, label-smoothed, z-loss path against finite differences
        tp = rng.dirichlet(np.ones(4), size=3)
        opts = {"label_smoothing": 0.1, "z_loss": 0.01}
        h = jax.hessian(lambda v: xent.cross_entropy(v, to_xp(xp, tp), **opts))(to_xp(xp, x))
        g = jax.jit(jax.grad(lambda v: xent.cross_entropy(v, to_xp(xp, tp), **opts)))
        want = np.zeros((3, 4, 3, 4))  # central differences of the gradient, one input at a time
        for j in np.ndindex(3, 4):
            step = np.zeros((3, 4))
            step[j] = 1e-6
            up, down = to_numpy(g(to_xp(xp, x + step))), to_numpy(g(to_xp(xp, x - step)))
            want[(..., *j)] = (up - down) / 2e-6
        xp_assert_close(h, want, xp=xp, dtype="float64", rtol=1e-5, atol=1e-7)

    @JAX
    @pytest.mark.parametrize(
        "name", ["logsumexp", "log_softmax", "softmax", "binary_cross_entropy"]
    )
    def test_jax_grad_of_other_functions_matches_finite_differences(
        self, xp: Any, rng: np.random.Generator, name: str
    ) -> None:
        import jax
        import jax.numpy as jnp

        x = rng.normal(size=(3, 4))
        c = rng.normal(size=(3, 4))  # a random cotangent, so the gradient is not trivially zero
        y = rng.uniform(size=(3, 4))
        if name == "binary_cross_entropy":

            def f(v: Any) -> Any:
                return xent.binary_cross_entropy(v, to_xp(xp, y), reduction="none") * to_xp(xp, c)

            want = ref.numerical_grad(
                lambda v: ref.binary_cross_entropy(v, y, reduction="none") * c, x
            )
        else:
            func = getattr(xent, name)
            cot = c[:, 0] if name == "logsumexp" else c

            def f(v: Any) -> Any:
                return func(v, axis=-1) * to_xp(xp, cot)

            want = ref.numerical_grad(lambda v: getattr(ref, name)(v, axis=-1) * cot, x)
        got = jax.grad(lambda v: jnp.sum(f(v)))(to_xp(xp, x))
        xp_assert_close(got, want, xp=xp, dtype="float64", rtol=1e-6, atol=1e-8)


# --- PyTorch --------------------------------------------------------------------------------------


@pytest.fixture
def torch_compile_ready() -> Iterator[None]:
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class TestTorchCompile:
    """`torch.compile` of every function equals the reference and eager PyTorch."""

    @TORCH
    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    @pytest.mark.parametrize("option_set", list(CE_OPTIONS))
    def test_torch_compile_fullgraph_matches_reference(
        self,
        xp: Any,
        rng: np.random.Generator,
        option_set: str,
        probabilities: bool,
        torch_compile_ready: None,
    ) -> None:
        import torch

        x, t, opts = _ce_problem(rng, CE_OPTIONS[option_set], probabilities)
        xopts = _on(xp, opts)
        # aot_eager traces exactly what inductor would (Dynamo with fullgraph, then AOT autograd)
        # without a C++ compile per graph; one test below runs the default backend.
        f = torch.compile(
            functools.partial(xent.cross_entropy, **xopts), fullgraph=True, backend="aot_eager"
        )
        x_t = to_xp(xp, x).requires_grad_(True)
        got = f(x_t, to_xp(xp, t))
        xp_assert_close(got, ref.cross_entropy(x, t, **opts), xp=xp, dtype="float64")
        got.sum().backward()
        want = ref.numerical_grad(lambda v: ref.cross_entropy(v, t, **opts), x)
        xp_assert_close(x_t.grad, want, xp=xp, dtype="float64", rtol=1e-6, atol=1e-8)

    @TORCH
    @pytest.mark.parametrize("validate", [None, False])
    @pytest.mark.parametrize("reduction", ["mean", "none"])
    def test_torch_compile_invalid_label_gives_nan(
        self,
        xp: Any,
        rng: np.random.Generator,
        validate: bool | None,
        reduction: str,
        torch_compile_ready: None,
    ) -> None:
        import torch

        x = rng.normal(size=(4, 5))
        t = np.array([0, 5, 2, -7])
        f = torch.compile(
            functools.partial(xent.cross_entropy, reduction=reduction, validate=validate),
            fullgraph=True,
            backend="aot_eager",
        )
        got = f(to_xp(xp, x), to_xp(xp, t))
        xp_assert_close(got, ref.cross_entropy(x, t, reduction=reduction), xp=xp, dtype="float64")

    @TORCH
    def test_torch_compile_of_binary_softmax_and_grad_functions(
        self, xp: Any, rng: np.random.Generator, torch_compile_ready: None
    ) -> None:
        import torch

        x = rng.normal(size=(3, 4))
        y = rng.uniform(size=(3, 4))
        pw = rng.uniform(0.5, 2.0, size=4)

        def compiled(f: Any) -> Any:
            return torch.compile(f, fullgraph=True, backend="aot_eager")

        bce = compiled(functools.partial(xent.binary_cross_entropy, label_smoothing=0.1))
        xp_assert_close(
            bce(to_xp(xp, x), to_xp(xp, y), pos_weight=to_xp(xp, pw)),
            ref.binary_cross_entropy(x, y, pos_weight=pw, label_smoothing=0.1),
            xp=xp,
            dtype="float64",
        )
        for name in ("logsumexp", "log_softmax", "softmax"):
            f = compiled(functools.partial(getattr(xent, name), axis=0))
            xp_assert_close(f(to_xp(xp, x)), getattr(ref, name)(x, axis=0), xp=xp, dtype="float64")
        t = np.array([1, 0, 3])
        loss, grad = compiled(xent.cross_entropy_and_grad)(to_xp(xp, x), to_xp(xp, t))
        xp_assert_close(loss, ref.cross_entropy(x, t), xp=xp, dtype="float64")
        want = ref.numerical_grad(lambda v: ref.cross_entropy(v, t), x)
        xp_assert_close(grad, want, xp=xp, dtype="float64", rtol=1e-6, atol=1e-8)
        loss, grad = compiled(xent.binary_cross_entropy_and_grad)(to_xp(xp, x), to_xp(xp, y))
        xp_assert_close(loss, ref.binary_cross_entropy(x, y), xp=xp, dtype="float64")
        want = ref.numerical_grad(lambda v: ref.binary_cross_entropy(v, y), x)
        xp_assert_close(grad, want, xp=xp, dtype="float64", rtol=1e-6, atol=1e-8)

    @TORCH
    @pytest.mark.filterwarnings(
        # inductor's import of torch.utils.mkldnn decorates with the deprecated torch.jit.script_method
        r"ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
    )
    def test_torch_compile_default_backend_matches_eager(
        self, xp: Any, rng: np.random.Generator, torch_compile_ready: None
    ) -> None:
        import torch

        x = rng.normal(size=(8, 6)).astype(np.float32)
        t = rng.integers(0, 6, size=8)
        t[3] = -100
        f = torch.compile(
            functools.partial(xent.cross_entropy, label_smoothing=0.1, z_loss=1e-3), fullgraph=True
        )
        got = f(to_xp(xp, x), to_xp(xp, t))
        want = ref.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-3)
        xp_assert_close(got, want, xp=xp, dtype="float32")


class TestTorchFunc:
    """`torch.func.vmap` and `torch.func.grad` compose with xent's functions."""

    @TORCH
    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    def test_torch_func_vmap_equals_a_loop(
        self, xp: Any, rng: np.random.Generator, probabilities: bool
    ) -> None:
        import torch

        x = rng.normal(size=(3, 4, 5))
        t = rng.dirichlet(np.ones(5), size=(3, 4)) if probabilities else rng.integers(0, 5, (3, 4))
        w = rng.uniform(0.5, 2.0, size=5)
        f = functools.partial(
            xent.cross_entropy, label_smoothing=0.1, weight=to_xp(xp, w), validate=False
        )
        got = torch.func.vmap(f)(to_xp(xp, x), to_xp(xp, t))
        want = [ref.cross_entropy(x[i], t[i], label_smoothing=0.1, weight=w) for i in range(3)]
        xp_assert_close(got, np.array(want), xp=xp, dtype="float64")
        g = torch.func.vmap(
            functools.partial(xent.cross_entropy, reduction="none", validate=False), in_dims=(1, 1)
        )
        got = g(to_xp(xp, x), to_xp(xp, t))
        want = np.stack([ref.cross_entropy(x[:, j], t[:, j], reduction="none") for j in range(4)])
        xp_assert_close(got, want, xp=xp, dtype="float64")

    @TORCH
    def test_torch_func_vmap_with_default_validation(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        import torch

        x = rng.normal(size=(3, 4, 5))
        t = rng.integers(0, 5, (3, 4))
        got = torch.func.vmap(xent.cross_entropy)(to_xp(xp, x), to_xp(xp, t))
        want = [ref.cross_entropy(x[i], t[i]) for i in range(3)]
        xp_assert_close(got, np.array(want), xp=xp, dtype="float64")

    @TORCH
    def test_torch_func_grad_and_vmap_compose(self, xp: Any, rng: np.random.Generator) -> None:
        import torch

        x = rng.normal(size=(3, 4, 5))
        t = rng.integers(0, 5, (3, 4))
        per_batch_grad = torch.func.vmap(torch.func.grad(xent.cross_entropy))
        got = per_batch_grad(to_xp(xp, x), to_xp(xp, t))
        want = np.stack(
            [ref.numerical_grad(lambda v, i=i: ref.cross_entropy(v, t[i]), x[i]) for i in range(3)]
        )
        xp_assert_close(got, want, xp=xp, dtype="float64", rtol=1e-6, atol=1e-8)

    @TORCH
    @pytest.mark.parametrize(
        "case", ["blocks", "kernel", "smoothing", "softcap", "binary", "linear"]
    )
    def test_torch_func_over_another_argument_with_captured_tensors_that_require_grad(
        self, xp: Any, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, case: str
    ) -> None:
        # A transform over a scale while the logits (or hidden states) come from outside it
        # and require grad: every route under it (the blocks, ATen's kernel, the general path
        # with its analytic gradient, linear cross-entropy) gives the loss, and ordinary
        # autograd then differentiates that result with respect to the captured tensor.
        import torch

        from xent.backends import _torch

        monkeypatch.setattr(_torch, "_GRAD_ROWS_ELEMENTS", 1 if case == "blocks" else 2**40)
        x_np = rng.normal(size=(6, 7))
        t_np = rng.integers(0, 7, size=6)
        w_np = rng.normal(size=(7, 7))
        x = to_xp(xp, x_np).requires_grad_(True)
        t = to_xp(xp, t_np)
        options: dict[str, Any] = {}
        if case == "smoothing":
            options = {"label_smoothing": 0.2}
        elif case == "softcap":
            options = {"softcap": 2.0}

        def loss(v: Any) -> Any:
            if case == "binary":
                return xent.binary_cross_entropy(v, (t[:, None] > 3).to(v.dtype).expand_as(v))
            if case == "linear":
                return xent.linear_cross_entropy(v, to_xp(xp, w_np), t)
            return xent.cross_entropy(v, t, **options)

        def ref_loss(v: np.ndarray) -> Any:
            if case == "binary":
                return ref.binary_cross_entropy(
                    v, np.broadcast_to((t_np[:, None] > 3) * 1.0, v.shape)
                )
            if case == "linear":
                return ref.cross_entropy(v @ w_np.T, t_np)
            return ref.cross_entropy(v, t_np, **options)

        scale = to_xp(xp, np.asarray(2.0))
        value = torch.func.grad(lambda s: s * loss(x))(scale)
        batched = torch.func.vmap(lambda s: s * loss(x))(to_xp(xp, np.arange(3.0)))
        xp_assert_close(value, np.asarray(ref_loss(x_np)), xp=xp, dtype="float64")
        xp_assert_close(batched, np.arange(3.0) * ref_loss(x_np), xp=xp, dtype="float64")
        (grad,) = torch.autograd.grad(value, x)
        want = ref.numerical_grad(ref_loss, x_np)
        xp_assert_close(grad, want, xp=xp, dtype="float64", rtol=1e-6, atol=1e-8)


class TestTorchAutograd:
    """PyTorch autograd to second order, through the weights, in the input dtype."""

    @TORCH
    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    @pytest.mark.parametrize("option_set", list(CE_OPTIONS))
    def test_torch_autograd_to_second_order(
        self, xp: Any, rng: np.random.Generator, option_set: str, probabilities: bool
    ) -> None:
        import torch

        x, t, opts = _ce_problem(rng, CE_OPTIONS[option_set], probabilities)
        xopts = _on(xp, opts)
        x_t = to_xp(xp, x).requires_grad_(True)
        t_t = to_xp(xp, t)
        loss = xent.cross_entropy(x_t, t_t, **xopts)
        (grad,) = torch.autograd.grad(loss.sum(), x_t, create_graph=True)
        want = ref.numerical_grad(lambda v: ref.cross_entropy(v, t, **opts), x)
        xp_assert_close(grad, want, xp=xp, dtype="float64", rtol=1e-6, atol=1e-8)

        def f(v: Any) -> Any:
            return xent.cross_entropy(v, t_t, **xopts)

        assert torch.autograd.gradcheck(f, (x_t,))
        assert torch.autograd.gradgradcheck(f, (x_t,))

    @TORCH
    def test_torch_autograd_through_weights_matches_finite_differences(
        self, xp: Any, rng: np.random.Generator
    ) -> None:

        x = rng.normal(size=(4, 5))
        t = np.array([0, 4, -100, 2])
        w = rng.uniform(0.5, 2.0, size=5)
        s = rng.uniform(0.5, 2.0, size=4)
        w_t = to_xp(xp, w).requires_grad_(True)
        s_t = to_xp(xp, s).requires_grad_(True)
        loss = xent.cross_entropy(
            to_xp(xp, x), to_xp(xp, t), weight=w_t, sample_weight=s_t, label_smoothing=0.1
        )
        loss.backward()
        kw = {"label_smoothing": 0.1}
        want_w = ref.numerical_grad(
            lambda v: ref.cross_entropy(x, t, weight=v, sample_weight=s, **kw), w
        )
        want_s = ref.numerical_grad(
            lambda v: ref.cross_entropy(x, t, weight=w, sample_weight=v, **kw), s
        )
        xp_assert_close(w_t.grad, want_w, xp=xp, dtype="float64", rtol=1e-6, atol=1e-8)
        xp_assert_close(s_t.grad, want_s, xp=xp, dtype="float64", rtol=1e-6, atol=1e-8)

    @TORCH
    @pytest.mark.parametrize(
        "name", ["logsumexp", "log_softmax", "softmax", "binary_cross_entropy"]
    )
    def test_torch_autograd_of_other_functions_to_second_order(
        self, xp: Any, rng: np.random.Generator, name: str
    ) -> None:
        import torch

        x_t = to_xp(xp, rng.normal(size=(3, 4))).requires_grad_(True)
        y = to_xp(xp, rng.uniform(size=(3, 4)))
        pw = to_xp(xp, rng.uniform(0.5, 2.0, size=4)).requires_grad_(True)

        def f(v: Any, p: Any) -> Any:
            if name == "binary_cross_entropy":
                return xent.binary_cross_entropy(v, y, pos_weight=p, reduction="none")
            return getattr(xent, name)(v, axis=-1) * p.sum()

        assert torch.autograd.gradcheck(f, (x_t, pw))
        assert torch.autograd.gradgradcheck(f, (x_t, pw))

    @TORCH
    @pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
    def test_torch_autograd_low_precision_gradient_has_input_dtype(
        self, xp: Any, rng: np.random.Generator, dtype: str
    ) -> None:
        x_t = to_xp(xp, rng.normal(size=(6, 10)), dtype=dtype).requires_grad_(True)
        t = rng.integers(0, 10, size=6)
        xent.cross_entropy(x_t, to_xp(xp, t)).backward()
        want = ref.numerical_grad(lambda v: ref.cross_entropy(v, t), to_numpy(x_t))
        eps = 2.0**-7 if dtype == "bfloat16" else float(np.finfo(np.float16).eps)
        xp_assert_close(x_t.grad, want, xp=xp, dtype=dtype, rtol=eps, atol=1e-7)


# --- Dask -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def no_compute() -> Iterator[None]:
    """Fail on any Dask computation inside the block: a scheduler that raises, plus a callback
    that catches computations naming a scheduler explicitly (``compute(scheduler="sync")``)."""
    import dask
    from dask.callbacks import Callback

    started: list[object] = []

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a Dask graph was computed before .compute()")

    with dask.config.set(scheduler=forbidden), Callback(start=started.append):
        yield
    assert not started, f"{len(started)} Dask computation(s) ran before .compute()"


def _compute(x: Any) -> np.ndarray:
    import dask

    with dask.config.set(scheduler="sync"):
        return to_numpy(x)


class TestDaskLaziness:
    """Dask graphs stay lazy until computed and give the same result for any chunking."""

    @DASK
    @pytest.mark.eager("checks laziness itself; the lazy patch would persist the results it holds")
    @pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
    @pytest.mark.parametrize("validate", [None, False])
    def test_dask_cross_entropy_stays_lazy(
        self, xp: Any, rng: np.random.Generator, probabilities: bool, validate: bool | None
    ) -> None:

        x = rng.normal(size=(6, 7))
        t = rng.dirichlet(np.ones(7), size=6) if probabilities else rng.integers(0, 7, size=6)
        if not probabilities:
            t[1] = -100
        w = rng.uniform(0.5, 2.0, size=7)
        s = rng.uniform(0.5, 2.0, size=6)
        x_d, t_d, w_d, s_d = (to_xp(xp, a) for a in (x, t, w, s))
        assert len(x_d.chunks[0]) > 1
        assert len(x_d.chunks[1]) > 1
        kw = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0}
        outs = {}
        with no_compute():
            for reduction in ("mean", "sum", "none"):
                outs[reduction] = xent.cross_entropy(
                    x_d,
                    t_d,
                    weight=w_d,
                    sample_weight=s_d,
                    reduction=reduction,
                    validate=validate,
                    **kw,
                )
            outs["and_grad"] = xent.cross_entropy_and_grad(
                x_d, t_d, weight=w_d, validate=validate, **kw
            )
            outs["axis0"] = xent.cross_entropy(
                to_xp(xp, x.T.copy()),
                t_d if not probabilities else to_xp(xp, t.T.copy()),
                axis=0,
                validate=validate,
            )
        for reduction in ("mean", "sum", "none"):
            assert isinstance(outs[reduction], type(x_d))
            want = ref.cross_entropy(x, t, weight=w, sample_weight=s, reduction=reduction, **kw)
            assert np.allclose(_compute(outs[reduction]), want, rtol=1e-10, atol=1e-12)
        loss, grad = outs["and_grad"]
        assert isinstance(loss, type(x_d))
        assert isinstance(grad, type(x_d))
        np.testing.assert_allclose(
            _compute(loss), ref.cross_entropy(x, t, weight=w, **kw), rtol=1e-10
        )
        want_grad = ref.numerical_grad(lambda v: ref.cross_entropy(v, t, weight=w, **kw), x)
        np.testing.assert_allclose(_compute(grad), want_grad, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(_compute(outs["axis0"]), ref.cross_entropy(x, t), rtol=1e-10)

    @DASK
    @pytest.mark.eager("checks laziness itself; the lazy patch would persist the results it holds")
    def test_dask_other_functions_stay_lazy(self, xp: Any, rng: np.random.Generator) -> None:
        x = rng.normal(size=(5, 6))
        y = rng.uniform(size=(5, 6))
        pw = rng.uniform(0.5, 2.0, size=6)
        x_d, y_d, pw_d = (to_xp(xp, a) for a in (x, y, pw))
        with no_compute():
            lazy = {
                "bce": xent.binary_cross_entropy(x_d, y_d, pos_weight=pw_d, reduction="none"),
                "bce_and_grad": xent.binary_cross_entropy_and_grad(x_d, y_d, pos_weight=pw_d),
                "logsumexp": xent.logsumexp(x_d, axis=-1),
                "log_softmax": xent.log_softmax(x_d, axis=0),
                "softmax": xent.softmax(x_d, axis=-1),
                "probs": xent.cross_entropy(
                    to_xp(xp, y / y.sum(1, keepdims=True)),
                    to_xp(xp, np.eye(6)[[0, 1, 2, 3, 4]]),
                    from_logits=False,
                ),
            }
        got = {
            k: (tuple(_compute(a) for a in v) if isinstance(v, tuple) else _compute(v))
            for k, v in lazy.items()
        }
        np.testing.assert_allclose(
            got["bce"], ref.binary_cross_entropy(x, y, pos_weight=pw, reduction="none"), rtol=1e-12
        )
        np.testing.assert_allclose(
            got["bce_and_grad"][0], ref.binary_cross_entropy(x, y, pos_weight=pw), rtol=1e-12
        )
        np.testing.assert_allclose(got["logsumexp"], ref.logsumexp(x, axis=-1), rtol=1e-12)
        np.testing.assert_allclose(got["log_softmax"], ref.log_softmax(x, axis=0), rtol=1e-12)
        np.testing.assert_allclose(got["softmax"], ref.softmax(x, axis=-1), rtol=1e-12)
        np.testing.assert_allclose(
            got["probs"],
            ref.cross_entropy(
                y / y.sum(1, keepdims=True), np.eye(6)[[0, 1, 2, 3, 4]], from_logits=False
            ),
            rtol=1e-12,
        )

    @DASK
    @pytest.mark.eager("checks laziness itself; the lazy patch would persist the results it holds")
    def test_dask_invalid_label_stays_lazy_and_gives_nan(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        x = rng.normal(size=(6, 5))
        t = np.array([0, 1, 5, 2, 3, 4])
        with no_compute():
            out = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t))
            none = xent.cross_entropy(to_xp(xp, x), to_xp(xp, t), reduction="none")
        assert np.isnan(_compute(out))
        got = _compute(none)
        assert np.isnan(got[2])
        assert np.all(np.isfinite(np.delete(got, 2)))

    @DASK
    def test_dask_chunk_layout_does_not_change_the_result(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        import dask.array as da

        x = rng.normal(size=(9, 11)) * 3
        t = rng.integers(0, 11, size=9)
        t[4] = -100
        want = ref.cross_entropy(x, t, label_smoothing=0.1, reduction="none")
        for chunks in [(9, 11), (1, 11), (9, 1), (4, 3), ((2, 7), (10, 1))]:
            x_d = da.from_array(x, chunks=chunks)
            t_d = da.from_array(t, chunks=(chunks[0],))
            got = xent.cross_entropy(x_d, t_d, label_smoothing=0.1, reduction="none")
            np.testing.assert_allclose(_compute(got), want, rtol=1e-12, err_msg=str(chunks))


# --------------------------------------------------------------------------- issue 7 classes
_NO_JIT_DEPRECATION = pytest.mark.filterwarnings(
    # inductor's import of torch.utils.mkldnn decorates with the deprecated torch.jit.script_method
    r"ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)


@TORCH
@_NO_JIT_DEPRECATION
class TestTorchCompileWithoutWarnings:
    """``torch.compile(fullgraph=True)`` traces xent, on a cold cache, without a warning (the
    README's snippet): array-api-compat's ``lru_cache`` type tests are not reached."""

    def test_readme_snippet(self, xp: Any, torch_compile_ready: None) -> None:
        import warnings

        import torch

        x = to_xp(xp, np.zeros((4, 3, 5), dtype=np.float32)).requires_grad_()
        y = to_xp(xp, np.zeros((4, 5), dtype=np.int64))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            # Dynamo (which warns) traces the same for every compiler backend; aot_eager is fast.
            f = torch.compile(
                lambda a: xent.cross_entropy(a, y, axis=1), fullgraph=True, backend="aot_eager"
            )
            out = f(x)
            out.backward()
        assert [str(w.message)[:80] for w in caught] == []
        xp_assert_close(out, np.log(3.0), xp=xp, dtype="float32")


@TORCH
@_NO_JIT_DEPRECATION
class TestTorchCompileDynamic:
    """``torch.compile(fullgraph=True, dynamic=True)``: symbolic sizes and float options pass
    validation (no ``math.isfinite``/``float`` on SymFloats), and an invalid label gives NaN
    gradient rows inside the compiled graph too."""

    def test_dynamic_shapes_and_options(self, xp: Any, torch_compile_ready: None) -> None:
        import torch

        def loss(a: Any, t: Any, e: float, z: float) -> Any:
            return xent.cross_entropy(a, t, label_smoothing=e, z_loss=z, softcap=30.0)

        f = torch.compile(loss, fullgraph=True, dynamic=True, backend="aot_eager")
        for n, e in ((4, 0.1), (6, 0.2), (7, 0.3)):
            x = np.linspace(-2.0, 2.0, n * 5).reshape(n, 5)
            t = np.arange(n) % 5
            got = f(to_xp(xp, x), to_xp(xp, t), e, 1e-3)
            want = ref.cross_entropy(x, t, label_smoothing=e, z_loss=1e-3, softcap=30.0)
            xp_assert_close(got, want, xp=xp, dtype="float64")

    def test_invalid_label_gradient_is_nan(self, xp: Any, torch_compile_ready: None) -> None:
        import torch

        t = to_xp(xp, np.asarray([1, 7]))
        a = to_xp(xp, np.zeros((2, 3))).requires_grad_()
        f = torch.compile(
            lambda v: xent.cross_entropy(v, t, reduction="sum"), fullgraph=True, backend="aot_eager"
        )
        f(a).backward()
        g = to_numpy(a.grad)
        assert np.isnan(g[1]).all()
        assert np.isfinite(g[0]).all()
