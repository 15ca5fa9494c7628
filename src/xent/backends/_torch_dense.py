"""PyTorch: ATen's losses over dense targets (class probabilities, binary labels) on the CPU.

Both are element-wise in the target, so no label can be out of range: ATen's kernels have
xent's semantics wherever their result is finite. Where it is not (an infinite logit, a class
at ``-inf`` that the target gives no mass, NaN), the kernels and xent's own path may disagree
between ``inf`` and NaN, so such calls decline (None) and xent's path answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._typing import Array
from ._generic import BinaryOptions

_F32, _F64 = torch.float32, torch.float64
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
"""Input dtypes served: float16/bfloat16 are computed in float32 and the result cast back."""

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
"""ATen's reduction codes, which its entries below take (their stubs say strings)."""

BACK = {torch.bfloat16: torch.Tensor.bfloat16, torch.float16: torch.Tensor.half}
"""The cast of a float32 loss back to each reduced-precision dtype (its bound method: the
cheapest call)."""

_cross_entropy_loss: Any = torch._C._nn.cross_entropy_loss
_bce_with_logits: Any = torch.binary_cross_entropy_with_logits
_wrapped: Callable[[Array], bool] = torch._C._functorch.is_functorch_wrapped_tensor
_transforms_active: Callable[[], bool] = torch._C._are_functorch_transforms_active


def _as(a: Array, dtype: Any) -> Array:
    """``a`` in ``dtype``: itself where it is already (no call into ATen)."""
    return a if a.dtype is dtype else a.to(dtype)


def _finite(loss: Array, reduced: bool) -> bool:
    """Whether the loss (per-element losses: their sum) is finite: one scalar read."""
    return math.isfinite((loss if reduced else loss.sum()).item())


def prob_plan(
    dtype: Any, ndim: int, axis: int, smoothing: float, reduction: str, *, exact: bool
) -> Callable[[Array, Array, Array | None], Array | None] | None:
    """A plan for :meth:`~xent.backends.Backend.fused_prob_plan`: ATen's ``cross_entropy_loss``
    with probability targets (PyTorch's ``F.cross_entropy``: ``log_softmax``, then ``-(lp * q *
    w)`` summed, the mean over rows, label smoothing ``q (1 - e) + e / C``; differentiable in
    the logits, the targets and the class weights, to any order). ``exact``: both arrays are
    plain tensors, so ATen's entry is called directly."""
    if dtype not in _DTYPES:
        return None
    compute = _F64 if dtype == _F64 else _F32
    back = BACK.get(dtype)
    code = REDUCTIONS[reduction]
    reduced = reduction != "none"
    moved = axis != (1 if ndim > 1 else 0)

    def plan(input: Array, target: Array, weight: Array | None) -> Array | None:
        if (
            not input.is_cpu
            or _wrapped(target)
            or (weight is not None and _wrapped(weight))
            or _transforms_active()
        ):
            return None
        x, q = _as(input, compute), _as(target, compute)
        if moved:
            # ATen's classes lie at axis 1 (0 of a single row); the loss per position keeps
            # the other axes in their order.
            x, q = x.movedim(axis, 1), q.movedim(axis, 1)
        w = None if weight is None else _as(weight, compute)
        if exact:
            loss = _cross_entropy_loss(x, q, w, code, -100, smoothing)
        else:
            loss = torch.nn.functional.cross_entropy(
                x, q, w, reduction=reduction, label_smoothing=smoothing
            )
        if not _finite(loss, reduced):
            return None
        return loss if back is None else back(loss)

    return plan


def binary_loss(input: Array, target: Array, options: BinaryOptions) -> Array | None:
    """:meth:`~xent.backends.Backend.fused_binary_loss`: ATen's
    ``binary_cross_entropy_with_logits`` (PyTorch's ``F.binary_cross_entropy_with_logits``,
    one fused element-wise pass and its analytic backward) on the smoothed target. ATen does not
    differentiate the weights, so a call where autograd records one of them declines."""
    weight, pos_weight, smoothing, reduction = options
    dtype = input.dtype
    if dtype not in _DTYPES or not input.is_cpu or _transforms_active():
        return None
    recording = torch.is_grad_enabled()
    for a in (target, weight, pos_weight):
        if a is not None and (_wrapped(a) or (recording and a is not target and a.requires_grad)):
            return None
    compute = _F64 if dtype == _F64 else _F32
    y = _as(target, compute)
    if smoothing:
        y = y * (1.0 - smoothing) + smoothing / 2
    loss = _bce_with_logits(
        _as(input, compute),
        y,
        None if weight is None else _as(weight, compute),
        None if pos_weight is None else _as(pos_weight, compute),
        REDUCTIONS[reduction],
    )
    if not _finite(loss, reduction != "none"):
        return None
    back = BACK.get(dtype)
    return loss if back is None else back(loss)
