"""PyTorch: the linear cross-entropy as a ``torch.autograd.Function`` with chunked gradients."""

from __future__ import annotations

from typing import Any

import torch

from .._typing import Array


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss of a linear head whose gradients come from the chunked pass over the logits.

    The forward computes the gradients in the same pass over each block, as Liger-Kernel
    does, so the logits are made once: for a 0-d loss (``"mean"``, ``"sum"``) the cotangent
    only scales them. For ``"none"`` they are those of ``sum(loss)``: a uniform per-row
    cotangent (a ``.sum()`` or ``.mean()`` of the rows, the usual case) scales them too;
    any other scales ``d hidden`` row by row (each row's gradient is linear in its own
    cotangent), and the backward makes the logits again for ``d weight`` and ``d bias``.
    Under ``create_graph`` the backward is rebuilt from differentiable ops, so double
    backward works.
    """

    @staticmethod
    def forward(
        ctx: Any, hidden: Array, weight: Array, bias: Array | None, rule: Any, state: Any
    ) -> Array:
        need = tuple(ctx.needs_input_grad[:3])
        ctx.rule, ctx.state, ctx.grads = rule, state, None
        ctx.save_for_backward(hidden, weight, bias)
        loss: Array
        loss, ctx.grads = rule.loss_and_grad(state, hidden, weight, bias, None, need)
        return loss

    @staticmethod
    def backward(ctx: Any, cotangent: Array) -> tuple[Array | None, ...]:
        hidden, weight, bias = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        grads, ctx.grads = ctx.grads, None
        if grads is None or torch.is_grad_enabled():
            _, grads = ctx.rule.loss_and_grad(ctx.state, hidden, weight, bias, cotangent, need)
            return (*grads, None, None)
        if cotangent.numel() == 0:
            return (*grads, None, None)  # no rows: zero gradients whatever the cotangent
        # The forward's gradients are for a unit cotangent and owned by no one else.
        scale = cotangent.reshape(-1)[0]
        if cotangent.ndim and not bool((cotangent == scale).all()):
            dh, _, _ = grads
            if dh is not None:
                dh = dh.mul_(cotangent.unsqueeze(-1).to(dh.dtype))
            _, (_, dw, db) = ctx.rule.loss_and_grad(
                ctx.state, hidden, weight, bias, cotangent, (False, *need[1:])
            )
            return (dh, dw, db, None, None)
        grads = tuple(None if g is None else g.mul_(scale.to(g.dtype)) for g in grads)
        return (*grads, None, None)


def linear_custom_grad(
    rule: Any,
    state: Any,
    hidden: Array,
    weight: Array,
    bias: Array | None,
    *,
    others: tuple[Array | None, ...],
    traced: bool,
) -> Array:
    """The loss, through :class:`_LinearCrossEntropy` when a gradient of ``hidden``, ``weight``
    or ``bias`` will be asked for; without any gradient work otherwise. Gradients through
    ``others`` (the target and weights), vmap and compilers fall back to autograd of the
    chunked forward."""
    wanted = torch.is_grad_enabled() and any(
        a is not None and a.requires_grad for a in (hidden, weight, bias)
    )
    needs_other = any(o is not None and o.requires_grad for o in others)
    if not wanted or needs_other or traced:
        if not wanted:
            with torch.no_grad():
                loss: Array = rule.loss(state, hidden, weight, bias)
            return loss
        loss = rule.loss(state, hidden, weight, bias)
        return loss
    out: Array = _LinearCrossEntropy.apply(hidden, weight, bias, rule, state)
    return out
