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
    if input.shape[axis] >= _INT32_MAX or (
        ignore is not None and not _INT32_MIN < ignore < _INT32_MAX
    ):
        return None  # labels are coded in int32 (see _label_code)
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
        code = _label_code(target, axis, classes, ignore)
        labels = code.clamp(min=0).to(torch.int64)
        w = None if weight is None else weight.to(dtype)
        label_w = None if w is None else w[labels]
        # Shifted by the raw row max, as ATen's kernel is: the max and the sum of exponentials
        # share one loop per row, and the max is saved as the reduction wrote it. Rows whose max
        # is not finite are fixed per row below.
        peak = torch.amax(x, dim=axis, keepdim=True)
        z = x - peak
        log_sum = torch.log(torch.sum(torch.exp(z), dim=axis, keepdim=True))
        picked = torch.gather(x, axis, labels)
        rows = log_sum - (picked - peak)
        # A row holding +inf: xent's log-sum-exp is +inf there, so the label's term is +inf, or
        # NaN at a +inf label (ATen's shift makes the whole row NaN). A row of -inf or NaN is
        # NaN either way, and so is the smoothing sum of any of these rows.
        overflow = torch.isposinf(peak)
        rows = torch.where(overflow, torch.where(torch.isposinf(picked), math.nan, math.inf), rows)
        if label_w is not None:
            rows = rows * label_w
        if smoothing:
            # ``sum_c w_c * (log_sum - z_c)`` without a third pass over the row: both terms are
            # non-negative for non-negative weights, so nothing cancels.
            if w is None:
                spread = log_sum * classes - torch.sum(z, dim=axis, keepdim=True)
            else:
                spread = log_sum * torch.sum(w) - torch.sum(
                    z * _along(w, axis, x.ndim), dim=axis, keepdim=True
                )
            if smoothing == 1.0:
                # The label's term has weight 0 and is left out, not multiplied by 0.
                rows = spread / classes
            else:
                rows = (1.0 - smoothing) * rows + (smoothing / classes) * spread
        # 0 where ignored (whatever the logits hold), NaN for an invalid label.
        rows = torch.where(code == _IGNORED, 0.0, rows * _nan_factor(code, dtype))
        denominator = None
        if reduction == "none":
            loss = rows.squeeze(axis)
        else:
            loss = torch.sum(rows)
            if reduction == "mean":
                kept = (code != _IGNORED).to(dtype)
                denominator = torch.sum(kept if label_w is None else kept * label_w)
                loss = loss / denominator
        # Per row only what the backward cannot recompute from the input: the max and the log
        # of the sum, as the reductions wrote them, and the label code.
        ctx.save_for_backward(input, code, w, label_w, peak, log_sum, denominator)
        ctx.options = options
        return loss.to(input.dtype)

    @staticmethod
    def backward(ctx: Any, cotangent: Array) -> tuple[Array, None, None, None]:
        input, code, w, label_w, peak, log_sum, denominator = ctx.saved_tensors
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
        r = torch.where(code == _IGNORED, 0.0, r * _nan_factor(code, dtype))
        at_label = r * (1.0 - smoothing) if label_w is None else r * label_w * (1.0 - smoothing)
        total = at_label
        dense = None
        if smoothing:
            spread = smoothing / classes
            if w is None:
                total = total + r * smoothing
                dense = r * spread
            else:
                total = total + r * (spread * torch.sum(w))
                dense = r * (spread * _along(w, axis, x.ndim))
        # xent's softmax, exp(x - logsumexp) entry by entry: a +inf row is shifted by 0 and
        # its log-sum-exp is +inf, so it is 0 at the finite logits and NaN at the +inf ones; a
        # row of -inf or NaN is NaN.
        overflow = torch.isposinf(peak)
        shift = torch.where(overflow, 0.0, peak)
        log_sum = torch.where(overflow, math.inf, log_sum)
        g = torch.exp((x - shift) - log_sum) * total
        # The label's term as a compare against the class index (never equal to the negative
        # codes of ignored and invalid labels): fused into the same pass, no scatter.
        index = _along(torch.arange(classes, device=x.device), axis, x.ndim)
        g = g - torch.where(index == code, at_label, 0.0)
        if dense is not None:
            g = g - dense
        return g.to(input.dtype), None, None, None


_IGNORED, _INVALID = -1, -2
"""Label codes of ignored rows and of invalid labels (class indices are the others)."""

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _label_code(target: Array, axis: int, classes: int, ignore: int | None) -> Array:
    """The int32 label per row, class axis kept with size 1, or ``_IGNORED`` / ``_INVALID``.

    One int32 per row carries both masks, recomputed from it where they are used: masks of
    int64 labels would be saved for the backward as booleans (AOT autograd's partitioner
    never recomputes an op whose output is 4x smaller than its input), and storing those costs
    more than the loss's own row loop at narrow rows. Labels saturate to int32 first, which
    keeps every invalid label invalid (the caller takes ``classes`` and ``ignore`` strictly
    inside int32's range).
    """
    y = target
    if target.dtype == torch.int64:
        y = target.clamp(_INT32_MIN, _INT32_MAX)
    y = y.to(torch.int32).unsqueeze(axis)
    code = torch.where((y >= 0) & (y < classes), y, _INVALID)
    return code if ignore is None else torch.where(y == ignore, _IGNORED, code)


def _nan_factor(code: Array, dtype: torch.dtype) -> Array:
    """NaN for an invalid label, 1 elsewhere."""
    return torch.where(code == _INVALID, math.nan, 1.0).to(dtype)


def _along(v: Array, axis: int, ndim: int) -> Array:
    """A vector over the classes, shaped to broadcast along ``axis`` of an ``ndim``-d array."""
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)
