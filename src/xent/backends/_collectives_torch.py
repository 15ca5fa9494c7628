"""``torch.distributed`` collectives for :mod:`xent.parallel`, and its autograd hook."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from .. import _validation
from .._parallel import Backward, Collectives, Forward
from .._typing import Array
from . import _torch_linear


class TorchGroup(Collectives):
    """The workers of a ``torch.distributed`` process group (gloo on CPU, NCCL on GPU).

    Parameters
    ----------
    group : ProcessGroup, optional
        The tensor-parallel group; the default group (every rank) when None. The process group
        must be initialised (``torch.distributed.init_process_group``) before the first call.

    Notes
    -----
    The forward runs two ``all_reduce`` calls on per-row buffers (and, on the first call with a
    given local class count, one on a single integer to learn the global count). The loss is an
    ``autograd.Function`` whose backward is computed from the forward's all-reduced stats: it
    sends nothing. It is differentiable once (``backward()``, ``torch.autograd.grad``), with
    respect to ``local_input`` only.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self._classes: dict[int, int] = {}

    def _all_reduce(self, x: Array, op: Any) -> Array:
        out = x.detach().contiguous().clone()
        dist.all_reduce(out, op=op, group=self.group)
        return out

    def all_reduce_max(self, x: Array) -> Array:
        return self._all_reduce(x, dist.ReduceOp.MAX)

    def all_reduce_sum(self, x: Array) -> Array:
        return self._all_reduce(x, dist.ReduceOp.SUM)

    def class_count(self, local: int, like: Array) -> int:
        if local not in self._classes:
            count = torch.tensor([local], dtype=torch.int64, device=like.device)
            self._classes[local] = int(self._all_reduce(count, dist.ReduceOp.SUM).item())
        return self._classes[local]

    def check_constants(self, arrays: dict[str, Array | None]) -> None:
        if torch.is_grad_enabled():
            tracked = [k for k, a in arrays.items() if a is not None and a.requires_grad]
            _validation.parallel_linear_constants(tracked)

    def attach_linear_grad(
        self, rule: Any, state: Any, hidden: Array, weight: Array, bias: Array | None
    ) -> Array:
        # Always the analytic autograd.Function: autograd through the forward would miss the
        # all-reduces, whose results are detached.
        return _torch_linear.linear_custom_grad(
            rule, state, hidden, weight, bias, others=(), traced=False
        )

    def attach_grad(self, forward: Forward, backward: Backward, state: Any, x: Array) -> Array:
        if not torch.is_grad_enabled():
            return forward(state, x)[0]
        # The state's tensors derive from `weight` and `sample_weight`, which the analytic
        # backward treats as constants: refuse rather than leave their gradients silently None.
        tracked = [
            {"sample": "sample_weight"}.get(f.name, f.name)
            for f in dataclasses.fields(state)
            if isinstance(getattr(state, f.name), torch.Tensor)
            and getattr(state, f.name).requires_grad
        ]
        _validation.parallel_constants(tracked)
        if not x.requires_grad:
            return forward(state, x)[0]
        return _ParallelLoss.apply(x, forward, backward, state)


class _ParallelLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Array, forward: Forward, backward: Backward, state: Any) -> Array:
        loss, saved = forward(state, x)
        ctx.saved = saved
        ctx.backward_fn = backward
        ctx.state = state
        ctx.x_meta = x.detach()
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, cotangent: Array) -> tuple[Array, None, None, None]:
        grad = ctx.backward_fn(ctx.state, ctx.x_meta, ctx.saved, cotangent)
        return grad, None, None, None
