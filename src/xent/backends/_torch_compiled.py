"""PyTorch under ``torch.compile``: the plain cross-entropy as a graph Inductor fuses as tightly as
it fuses ``F.cross_entropy``'s, with xent's semantics.

The forward reads the logits twice per row, in one kernel: the row max, then the sum of the
exponentials and, with label smoothing, the sum of the logits in one loop; the logit at the label
is one load per row (``nll_loss`` of the logits, class axis 1) or, in other layouts, a compare
against the class index, summed in that loop. The backward is what AOT autograd derives from
it, one pass that reads the logits and writes the gradient (``exp`` of the shifted logits times a
per-row factor, minus the label's term as a compare against the class index), where autograd of
xent's general path (a gather) scatters into a zeroed buffer and adds it in passes of their own.
Every per-row mask (ignored and invalid labels) is a select on a vector of rows, which Inductor
folds into those kernels. (No ``torch.autograd.Function``: Dynamo instantiates one while tracing,
which warns, and a warning is an error in many test suites.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._typing import Array
from ._generic import IndexOptions

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_LABEL_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
"""Label dtypes that widen to int64 exactly and that Inductor's kernels take (torch's wider
unsigned dtypes have few kernels; uint64's upper half would wrap onto negative labels)."""

_IGNORED, _INVALID = -1, -2
"""Label codes of ignored rows and of invalid labels (class indices are the others)."""

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def index_loss(input: Array, target: Array, options: IndexOptions) -> Array | None:
    """The cross-entropy of logits and class indices as one fused graph, or None where the
    general path must answer (empty input, trainable class weights, an unusual dtype)."""
    axis, weight, ignore_index, label_smoothing, reduction = options
    if (
        input.dtype not in _DTYPES
        or target.dtype not in _LABEL_DTYPES
        or input.numel() == 0
        or (weight is not None and weight.requires_grad and torch.is_grad_enabled())
    ):
        return None
    info = torch.iinfo(target.dtype)
    ignore = ignore_index if info.min <= ignore_index <= info.max else None
    classes = input.shape[axis]
    if classes >= _INT32_MAX or (ignore is not None and not _INT32_MIN < ignore < _INT32_MAX):
        return None  # labels are coded in int32 (see _label_code)
    dtype = torch.float32 if input.dtype in (torch.bfloat16, torch.float16) else input.dtype
    x = input.to(dtype)
    code = _label_code(target, axis, classes, ignore)
    w = None if weight is None else weight.to(dtype)
    # The shift is the row max of the logits capped at the dtype's max, the reduction's own
    # output (a pointwise pass over the max would be saved for the backward as a buffer of its
    # own, between the two reductions, and Inductor would split them into two passes over the
    # logits). A row holding +inf then has a log-sum-exp of +inf, gives +inf (NaN at a +inf
    # label) and a softmax of 0 at the finite logits and NaN at the +inf ones; a row of -inf or
    # NaN gives NaN: exactly what xent's log-sum-exp (shifted by 0 where the max is not finite)
    # gives everywhere, where ATen's makes a +inf row NaN.
    grad = input.requires_grad and torch.is_grad_enabled()
    if grad:
        shift = torch.amax(x.detach().clamp(max=torch.finfo(dtype).max), dim=axis, keepdim=True)
    else:
        # Nothing is saved: xent's own shift, computed per row inside the sum's loop.
        peak = torch.amax(x, dim=axis, keepdim=True)
        shift = torch.where(torch.isfinite(peak), peak, 0.0)
    z = x - shift
    log_sum = torch.log(torch.sum(torch.exp(z), dim=axis, keepdim=True))
    if grad and axis == 1:
        # ``nll_loss`` of the logits themselves is minus the logit at the label: one load per
        # row in the forward, and Inductor lowers its backward to a compare against the class
        # index, fused into the gradient's pass.
        safe = code.squeeze(axis).clamp(min=0).to(torch.int64)
        picked = -F.nll_loss(x, safe, reduction="none").unsqueeze(axis)
    elif grad:
        # The label's logit by a compare against the class index rather than a gather: its
        # derivative is then the same compare, fused into the gradient's pass (a gather's is a
        # scatter into a zeroed buffer, two more passes). The labels as given (an invalid one
        # matches no class; an ignored row is zeroed below), not their int32 code: AOT autograd
        # may save the code for the backward, and a saved buffer that the max's loop read would
        # be computed in a loop of its own first, splitting the max and the sum into two passes.
        index = _along(torch.arange(classes, device=x.device), axis, x.ndim)
        at_label = index == target.to(torch.int64).unsqueeze(axis)
        picked = torch.sum(torch.where(at_label, x, 0.0), dim=axis, keepdim=True)
    else:
        # Without a gradient, one load per row.
        picked = torch.gather(x, axis, code.clamp(min=0).to(torch.int64))
    rows = log_sum - (picked - shift)
    label_w = None
    if w is not None:
        label_w = w[code.clamp(min=0).to(torch.int64)]
        rows = rows * label_w
    if label_smoothing:
        # ``sum_c w_c * (log_sum - z_c)`` without a third pass over the row: both terms are
        # non-negative for non-negative weights, so nothing cancels. A +inf row's sum holds
        # ``inf - inf``: NaN, as every entry of xent's is at the +inf class.
        if w is None:
            spread = log_sum * classes - torch.sum(z, dim=axis, keepdim=True)
        else:
            spread = log_sum * torch.sum(w) - torch.sum(
                z * _along(w, axis, x.ndim), dim=axis, keepdim=True
            )
        if label_smoothing == 1.0:
            # The label's term has weight 0 and is left out, not multiplied by 0.
            rows = spread / classes
        else:
            rows = (1.0 - label_smoothing) * rows + (label_smoothing / classes) * spread
    # 0 where ignored, whatever the logits hold (the gradient is then 0 times the row's
    # softmax); NaN for an invalid label, by a product, so that the NaN reaches the gradient.
    nan_factor = torch.where(code == _INVALID, math.nan, 1.0).to(dtype)
    rows = torch.where(code == _IGNORED, 0.0, rows * nan_factor)
    if reduction == "none":
        loss = rows.squeeze(axis)
    else:
        loss = torch.sum(rows)
        if reduction == "mean":
            kept = (code != _IGNORED).to(dtype)
            loss = loss / torch.sum(kept if label_w is None else kept * label_w)
    return loss.to(input.dtype)


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


def _along(v: Array, axis: int, ndim: int) -> Array:
    """A vector over the classes, shaped to broadcast along ``axis`` of an ``ndim``-d array."""
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)
