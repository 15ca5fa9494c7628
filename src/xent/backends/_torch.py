"""PyTorch: facts about compilation, vmap and devices; native ops and an analytic backward."""

from __future__ import annotations

from typing import Any

import torch

from .._typing import Array
from ._generic import Backend, BackwardFn, ForwardFn


def _functorch_wrapped(x: Array) -> bool:
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


class Facts(Backend):
    """Values are unreadable while Dynamo/FX traces or functorch (vmap, grad) wraps them."""

    name = "torch"

    def is_traced(self, x: Array) -> bool:
        return bool(
            torch.compiler.is_compiling()
            or _functorch_wrapped(x)
            or isinstance(x, torch._subclasses.FakeTensor)
        )

    def is_lazy(self, x: Array) -> bool:
        return False

    def on_host(self, x: Array) -> bool:
        return bool(x.device.type == "cpu")

    def device(self, x: Array) -> Any:
        return x.device


class _AnalyticGrad(torch.autograd.Function):
    """Wraps xent's forward and analytic backward; the backward stays differentiable."""

    @staticmethod
    def forward(ctx: Any, x: Array, forward: ForwardFn, backward: BackwardFn) -> Array:
        loss, saved = forward(x)
        ctx.save_for_backward(x)
        ctx.saved = saved
        ctx.backward_fn = backward
        return loss

    @staticmethod
    def backward(ctx: Any, cotangent: Array) -> tuple[Array, None, None]:
        (x,) = ctx.saved_tensors
        # Under create_graph the gradient must be rebuilt from x so autograd sees every op.
        saved = None if torch.is_grad_enabled() else ctx.saved
        return ctx.backward_fn(x, saved, cotangent), None, None


class Native(Backend):
    """torch.logsumexp, torch.softmax, in-place scatter, and the analytic autograd.Function."""

    native = True

    def logsumexp(self, x: Array, axis: int) -> tuple[Array, Array]:
        shift = torch.amax(x, dim=axis, keepdim=True).detach()
        shift = torch.where(torch.isfinite(shift), shift, 0.0)
        return shift, torch.logsumexp(x - shift, dim=axis, keepdim=True)

    def softmax_from_lse(self, x: Array, shift: Array, log_sum: Array, axis: int) -> Array:
        return torch.softmax(x, dim=axis)

    def take_along_axis(self, x: Array, index: Array, axis: int) -> Array:
        return torch.gather(x, axis, index)

    def subtract_at(self, g: Array, index: Array, values: Array, axis: int) -> Array:
        values = torch.broadcast_to(values, index.shape).to(g.dtype)
        if g.requires_grad and torch.is_grad_enabled():
            return g.scatter_add(axis, index, -values)
        return g.scatter_add_(axis, index, -values)

    def custom_grad(self, forward: ForwardFn, backward: BackwardFn, x: Array) -> Array:
        if not (x.requires_grad and torch.is_grad_enabled()) or self.is_traced(x):
            return forward(x)[0]
        return _AnalyticGrad.apply(x, forward, backward)


class NativeBackend(Native, Facts):
    """The facts with the native overrides on top."""
