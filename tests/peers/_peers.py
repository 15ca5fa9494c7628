"""What the ported peer suites share: autodiff through xent on the backends that have it.

The peer modules build inputs in NumPy, move them with `to_xp` and compare with
`xp_assert_close`, as the rest of the suite does. Derivatives with respect to `input` come from
`*_and_grad` on every backend; derivatives with respect to other arguments (probability targets,
weights) need autodiff, which only PyTorch and JAX have.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from _helpers import Backend, current, to_numpy, to_xp

__all__ = ["AUTODIFF", "autodiff_grad", "autodiff_hessian"]

# Backends where `autodiff_grad` works; tests that need it say `only_backends(*AUTODIFF)`.
AUTODIFF = (Backend.TORCH, Backend.TORCH_CUDA, Backend.JAX, Backend.JAX_GPU)


def autodiff_grad(
    xp: Any, fn: Callable[..., Any], args: list[np.ndarray], /, *, wrt: int
) -> np.ndarray:
    """`d sum(fn(*args)) / d args[wrt]` by the backend's autodiff, as float64 NumPy.

    `args` are NumPy arrays; each is moved onto the backend under test first.
    """
    moved = [to_xp(xp, a) for a in args]
    backend = current().backend
    if backend.like(Backend.TORCH):
        import torch

        moved[wrt] = moved[wrt].detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(torch.sum(fn(*moved)), moved[wrt])
        return to_numpy(grad).astype(np.float64)
    if backend.like(Backend.JAX):
        import jax
        import jax.numpy as jnp

        def total(a: Any) -> Any:
            return jnp.sum(fn(*moved[:wrt], a, *moved[wrt + 1 :]))

        return to_numpy(jax.grad(total)(moved[wrt])).astype(np.float64)
    msg = f"{backend.value} has no autodiff: mark the test only_backends(*AUTODIFF)"
    raise AssertionError(msg)


def autodiff_hessian(xp: Any, fn: Callable[[Any], Any], x: np.ndarray, /) -> np.ndarray:
    """The Hessian of `sum(fn(x))` for a 1-D `x`, by the backend's autodiff, as float64 NumPy."""
    x_b = to_xp(xp, x)
    backend = current().backend
    if backend.like(Backend.TORCH):
        import torch

        def total_t(a: Any) -> Any:
            return torch.sum(fn(a))

        return to_numpy(torch.autograd.functional.hessian(total_t, x_b)).astype(np.float64)
    if backend.like(Backend.JAX):
        import jax
        import jax.numpy as jnp

        def total_j(a: Any) -> Any:
            return jnp.sum(fn(a))

        return to_numpy(jax.hessian(total_j)(x_b)).astype(np.float64)
    msg = f"{backend.value} has no autodiff: mark the test only_backends(*AUTODIFF)"
    raise AssertionError(msg)
