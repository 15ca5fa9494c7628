"""An empty batch: the loss is NaN ("mean") or 0 ("sum") and every differentiable input gets a zero
gradient of its own shape, as PyTorch gives, whichever input requires the gradient."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _helpers import Backend, to_numpy, to_xp

import xent

TORCH = pytest.mark.only_backends(Backend.TORCH, Backend.TORCH_CUDA)
JAX = pytest.mark.only_backends(Backend.JAX, Backend.JAX_GPU)

_LOSS = {"mean": np.nan, "sum": 0.0}


def _problem(xp: Any, probabilities: bool) -> dict[str, Any]:
    target = np.zeros((0, 3)) if probabilities else np.zeros((0,), dtype=np.int64)
    return {
        "input": to_xp(xp, np.zeros((0, 3))),
        "target": to_xp(xp, target),
        "weight": to_xp(xp, np.array([1.0, 2.0, 0.5])),
        "sample_weight": to_xp(xp, np.ones((0,))),
    }


@TORCH
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
    xp: Any, needs_grad: tuple[str, ...], probabilities: bool, reduction: str
) -> None:
    arrays = _problem(xp, probabilities)
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
    np.testing.assert_equal(to_numpy(loss), _LOSS[reduction])
    for name in needs_grad:
        grad = arrays[name].grad
        assert grad is not None, f"no gradient for `{name}`"
        assert grad.shape == arrays[name].shape
        np.testing.assert_array_equal(to_numpy(grad), np.zeros(tuple(grad.shape)))


@TORCH
@pytest.mark.parametrize("needs_grad", [("input",), ("weight",), ("target", "pos_weight")])
def test_torch_binary_cross_entropy_backward(xp: Any, needs_grad: tuple[str, ...]) -> None:
    arrays = {
        "input": to_xp(xp, np.zeros((0, 3))),
        "target": to_xp(xp, np.zeros((0, 3))),
        "weight": to_xp(xp, np.ones((3,))),
        "pos_weight": to_xp(xp, np.ones((3,))),
    }
    for name in needs_grad:
        arrays[name].requires_grad_(True)
    loss = xent.binary_cross_entropy(
        arrays["input"], arrays["target"], weight=arrays["weight"], pos_weight=arrays["pos_weight"]
    )
    loss.backward()
    assert np.isnan(to_numpy(loss))
    for name in needs_grad:
        grad = arrays[name].grad
        assert grad is not None, f"no gradient for `{name}`"
        np.testing.assert_array_equal(to_numpy(grad), np.zeros(tuple(arrays[name].shape)))


@JAX
@pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
def test_jax_grad_of_every_float_argument(xp: Any, probabilities: bool) -> None:
    import jax

    arrays = _problem(xp, probabilities)
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
