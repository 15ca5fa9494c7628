"""PyTorch under ``torch.compile``: the plain cross-entropy as a graph Inductor fuses as tightly as
it fuses ``F.cross_entropy``'s, with xent's semantics.

Dynamo traces this module's ``torch.autograd.Function`` (forward and backward) into the graph it
hands Inductor. The forward reads the logits twice per row, in one kernel: the row max, then the
sum of the exponentials (and, with label smoothing, the sum of the logits) in the same loop; the
label's logit is one indexed load per row. The backward is the analytic rule, one pass that reads
the logits and writes the gradient (``exp`` of the shifted logits times a per-row factor, minus the
label's term as a compare against the class index), where autograd of xent's general path
scatters into a zeroed buffer and adds it in passes of their own. Every per-row mask (ignored,
invalid, ``+inf`` rows) is a select on a vector of rows, which Inductor folds into those kernels.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._typing import Array

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_LABEL_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
"""Label dtypes that widen to int64 exactly and that Inductor's kernels take (torch's wider
unsigned dtypes have few kernels; uint64's upper half would wrap onto negative labels)."""


def index_loss(
    input: Array,
    target: Array,
    *,
    axis: int,
    weight: Array | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
) -> Array | None:
    """The cross-entropy of logits and class indices as one fused graph, or None where the
    general path must answer (empty input, trainable class weights, an unusual dtype)."""
    if (
        input.dtype not in _DTYPES
        or target.dtype not in _LABEL_DTYPES
        or input.numel() == 0
        or (weight is not None and weight.requires_grad and torch.is_grad_enabled())
    ):
        return None
    info = torch.iinfo(target.dtype)
    ignore = ignore_index if info.min <= ignore_index <= info.max else None
    options = (axis, ignore, float(label_smoothing), reduction)
    loss: Array = _IndexLoss.apply(input, target, weight, options)
    return loss


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class _IndexLoss(torch.autograd.Function):
    """Forward as xent's general path computes it; backward by the analytic rule."""

    @staticmethod
    def forward(ctx: Any, input: Array, target: Array, weight: Array | None, options: Any) -> Array:
        axis, ignore, smoothing, reduction = options
        dtype = _compute_dtype(input.dtype)
        x = input.to(dtype)
        classes = x.shape[axis]
        y = target.to(torch.int64).unsqueeze(axis)
        valid = (y >= 0) & (y < classes)
        labels = torch.where(valid, y, 0)
        w = None if weight is None else weight.to(dtype)
        label_w = None if w is None else w[labels]
        # The shift is the row max of the logits capped at the dtype's max: a row holding +inf
        # then has log_sum = +inf and gives +inf (NaN at a +inf label, 0 and NaN in the
        # softmax), and a row of -inf or NaN gives NaN, exactly as xent's log-sum-exp (shifted by
        # 0 where the max is not finite) gives them everywhere, where ATen's makes a +inf row
        # NaN. Being the reduction's own output, it is saved for the backward without a
        # pointwise pass of its own between the two reductions, which Inductor would not fuse.
        shift = torch.amax(x.clamp(max=torch.finfo(dtype).max), dim=axis, keepdim=True)
        z = x - shift
        log_sum = torch.log(torch.sum(torch.exp(z), dim=axis, keepdim=True))
        rows = log_sum - torch.gather(z, axis, labels)
        if label_w is not None:
            rows = rows * label_w
        if smoothing:
            # ``sum_c w_c * (log_sum - z_c)`` without a third pass over the row: both terms are
            # non-negative for non-negative weights, so nothing cancels. Every entry of a +inf
            # row's sum is NaN-free but one (``inf - inf``), so the row is NaN.
            if w is None:
                spread = log_sum * classes - torch.sum(z, dim=axis, keepdim=True)
            else:
                class_shape = [1] * x.ndim
                class_shape[axis] = classes
                wc = w.reshape(class_shape)
                spread = log_sum * torch.sum(w) - torch.sum(z * wc, dim=axis, keepdim=True)
            spread = torch.where(torch.isposinf(log_sum), math.nan, spread)
            if smoothing == 1.0:
                # The label's term has weight 0 and is left out, not multiplied by 0.
                rows = spread / classes
            else:
                rows = (1.0 - smoothing) * rows + (smoothing / classes) * spread
        # Per row: 0 where ignored (whatever the logits hold), NaN for an invalid label.
        counted = valid if ignore is None else valid | (y == ignore)
        factor = torch.where(counted, 1.0, math.nan).to(dtype)
        if ignore is not None:
            factor = torch.where(y == ignore, 0.0, factor)
        rows = torch.where(factor == 0.0, 0.0, rows * factor)
        denominator = None
        if reduction == "none":
            loss = rows.squeeze(axis)
        else:
            loss = torch.sum(rows)
            if reduction == "mean":
                kept = torch.ones_like(rows) if ignore is None else (y != ignore).to(dtype)
                denominator = torch.sum(kept if label_w is None else kept * label_w)
                loss = loss / denominator
        ctx.save_for_backward(input, labels, w, label_w, shift, log_sum, factor, denominator)
        ctx.options = options
        return loss.to(input.dtype)

    @staticmethod
    def backward(ctx: Any, cotangent: Array) -> tuple[Array, None, None, None]:
        input, labels, w, label_w, shift, log_sum, factor, denominator = ctx.saved_tensors
        axis, _, smoothing, reduction = ctx.options
        dtype = _compute_dtype(input.dtype)
        x = input.to(dtype)
        classes = x.shape[axis]
        r = cotangent.to(dtype)
        if reduction == "none":
            r = r.unsqueeze(axis)
        elif reduction == "mean":
            r = r / denominator
        # 0 on ignored rows (even where the mean divides by 0), NaN on an invalid label's row
        # (a product, so the NaN spreads over the row's gradient); an ignored row's gradient is
        # then 0 times its softmax.
        r = torch.where(factor == 0.0, 0.0, r * factor)
        at_label = r * (1.0 - smoothing) if label_w is None else r * label_w * (1.0 - smoothing)
        total = at_label
        dense = None
        if smoothing:
            spread = smoothing / classes
            if w is None:
                total = total + r * smoothing
                dense = r * spread
            else:
                class_shape = [1] * x.ndim
                class_shape[axis] = classes
                total = total + r * (spread * torch.sum(w))
                dense = r * (spread * w.reshape(class_shape))
        # exp(x - lse) entry by entry: 0 at the finite logits and NaN at the +inf ones of a
        # +inf row, NaN over a row of -inf, as xent's softmax gives them.
        g = torch.exp(x - shift - log_sum) * total
        index_shape = [1] * x.ndim
        index_shape[axis] = classes
        index = torch.arange(classes, device=x.device).reshape(index_shape)
        g = g - torch.where(index == labels, at_label, 0.0)
        if dense is not None:
            g = g - dense
        return g.to(input.dtype), None, None, None
