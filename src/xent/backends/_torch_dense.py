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
from ._torch_workspace import work as _work

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
_log_softmax_backward: Any = torch._log_softmax_backward_data
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
    blocked = exact and axis == ndim - 1 and dtype != _F64

    def plan(input: Array, target: Array, weight: Array | None) -> Array | None:
        if (
            not input.is_cpu
            or _wrapped(target)
            or (weight is not None and _wrapped(weight))
            or _transforms_active()
        ):
            return None
        if blocked:
            loss = blocks("probs", input, target, weight, None, smoothing, reduction)
            if loss is not None:
                return loss
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
    if _wrapped(target):
        return None
    if weight is not None or pos_weight is not None:
        recording = torch.is_grad_enabled()
        for a in (weight, pos_weight):
            if a is not None and (_wrapped(a) or (recording and a.requires_grad)):
                return None
    if (
        input.numel() >= BLOCKS_FROM
        and type(input) is torch.Tensor
        and type(target) is torch.Tensor
    ):
        loss = blocks("binary", input, target, weight, pos_weight, smoothing, reduction)
        if loss is not None:
            return loss
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


# --------------------------------------------------------------------------- blocks
BLOCK_ELEMENTS = 2**19
"""Elements per block of :class:`DenseBlocks` (2 MiB per float32 scratch buffer, at most four
at once: the workspace's 16 MiB, in the last-level cache)."""

BLOCKS_FROM = 2**18
"""Inputs of at least this many elements take :class:`DenseBlocks` where it serves them (four
times as many for the binary loss of float32 logits): each block is cast to float32 in cache
(float16/bfloat16), and no temporary of the input's size is made, where ATen's whole-input
route makes two to four (its float32 copies, log-probabilities, products), freed and faulted
in anew at each call. Measured on two cores, medians of five interleaved rounds, blocks /
whole route, each against the native loss (noisy: the native loss's own time varies 2x with
the page faults that land on it): probabilities 0.93x / 1.19x forward and 0.58x / 0.99x
forward+backward at 4096 x 64 float32, 1.57x / 2.27x and 1.15x / 3.24x in bfloat16, and
0.42x-0.85x / 0.83x-2.18x from 2^20 elements; the binary loss of float32 logits 1.98x / 1.10x
forward at 4096 x 64 and 1.01x / 0.99x at 1024 x 1024, 0.88x / 1.18x from 2^21, in bfloat16
0.87x-1.40x / 0.92x-2.26x."""

_BINARY_F32_BLOCKS_FROM = 4 * BLOCKS_FROM
"""The binary loss of float32 logits: ATen's one element-wise kernel, faulted in or not, costs
less than the blocks' calls below about this size (see :data:`BLOCKS_FROM`)."""


def _block_rows(n: int, inner: int) -> list[tuple[int, int]]:
    step = max(1, BLOCK_ELEMENTS // max(1, inner))
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _slot(shape: tuple[int, ...], slot: int, span: int) -> Array:
    """Workspace buffer ``slot`` (of ``span`` bytes each: the largest block's float32 bytes)
    as a float32 block of ``shape``."""
    return _work(shape, _F32, slot * span)


def _staged(a: Array, slot: int, shape: tuple[int, ...], span: int) -> Array:
    """``a`` (a block) in float32: itself where it is already, else copied into workspace
    buffer ``slot``."""
    if a.dtype is _F32:
        return a
    return _slot(shape, slot, span).copy_(a)


def _binary_blocks(
    x: Array,
    y: Array,
    w: Array | None,
    pw: Array | None,
    smoothing: float,
    reduction: str,
    with_grad: bool,
) -> tuple[Array, Array | None]:
    """The binary loss of ``x`` (contiguous) by blocks along its first axis, and with
    ``with_grad`` the gradient of ``sum(loss)``: per block, ATen's fused kernel on the
    float32 stages and the gradient ``sigmoid(x) (p y + 1 - y) - p y`` (times the weight)
    written in cache."""
    shape = tuple(x.shape)
    n = shape[0]
    inner = x.numel() // n
    w = None if w is None else torch.broadcast_to(w, shape)
    pw = None if pw is None else torch.broadcast_to(pw, shape)
    reduced = reduction != "none"
    out = None if reduced else torch.empty(shape, dtype=x.dtype)
    grad = torch.empty(shape, dtype=x.dtype) if with_grad else None
    total = torch.zeros((), dtype=torch.float64)
    r = 1.0 / x.numel() if reduction == "mean" else 1.0
    ranges = _block_rows(n, inner)
    span = (ranges[0][1] - ranges[0][0]) * inner * 4
    for s, e in ranges:
        bshape = (e - s, *shape[1:])
        xb = _staged(x[s:e], 0, bshape, span)
        yb = _staged(y[s:e], 1, bshape, span)
        if smoothing:
            if yb.data_ptr() == y[s:e].data_ptr():
                yb = _slot(bshape, 4, span).copy_(yb)
            yb.mul_(1.0 - smoothing).add_(smoothing / 2)
        wb = None if w is None else w[s:e]
        pwb = None if pw is None else pw[s:e]
        loss = _bce_with_logits(xb, yb, wb, pwb, 2 if reduced else 0)
        if reduced:
            total += loss
        else:
            assert out is not None
            out[s:e].copy_(loss)
        if grad is None:
            continue
        g = _slot(bshape, 2, span)
        torch.sigmoid(xb, out=g)
        if pwb is None:
            g.sub_(yb)
        else:
            pos = _slot(bshape, 3, span)
            torch.mul(pwb, yb, out=pos)
            # sigmoid(x) (p y + 1 - y) - p y
            factor = torch.sub(pos, yb, out=_slot(bshape, 5, span))
            g.mul_(factor.add_(1.0)).sub_(pos)
        if wb is not None:
            g.mul_(wb)
        if r != 1.0:
            g.mul_(r)
        grad[s:e].copy_(g)
    if reduced:
        value = total / x.numel() if reduction == "mean" else total
        return value.to(_F32), grad
    assert out is not None
    return out, grad


def _prob_blocks(
    x: Array,
    q: Array,
    w: Array | None,
    smoothing: float,
    reduction: str,
    with_grad: bool,
) -> tuple[Array, Array | None]:
    """The probability loss of ``x`` (contiguous, classes last) by blocks of rows, and with
    ``with_grad`` the gradient of ``sum(loss)``: per block, ATen's ``log_softmax`` of the
    float32 stage, ``-sum(lp m)`` per row with ``m = w q`` (``q`` smoothed), and the gradient
    ``softmax sum(m) - m`` written in cache."""
    c = x.shape[-1]
    rows_x, rows_q = x.reshape(-1, c), q.reshape(-1, c)
    n = rows_x.shape[0]
    per = torch.empty(n, dtype=_F32) if reduction == "none" else None
    total = torch.zeros((), dtype=torch.float64)
    grad = torch.empty(rows_x.shape, dtype=x.dtype) if with_grad else None
    r = 1.0 / n if reduction == "mean" else 1.0
    ranges = _block_rows(n, c)
    span = (ranges[0][1] - ranges[0][0]) * c * 4
    for s, e in ranges:
        bshape = (e - s, c)
        xb = _staged(rows_x[s:e], 0, bshape, span)
        mb = rows_q[s:e]
        if smoothing or w is not None or mb.dtype is not _F32:
            mb = _slot(bshape, 1, span).copy_(mb)
            if smoothing:
                mb.mul_(1.0 - smoothing).add_(smoothing / c)
            if w is not None:
                mb.mul_(w)
        lp = torch.log_softmax(xb, 1, out=_slot(bshape, 2, span))
        if per is None and mb.is_contiguous():
            # one BLAS dot product: no product array, one pass
            total -= torch.dot(lp.view(-1), mb.view(-1))
        else:
            prod = torch.mul(lp, mb, out=_slot(bshape, 3, span))
            if per is None:
                total -= prod.sum()
            else:
                torch.sum(prod, 1, out=per[s:e]).neg_()
        if grad is None:
            continue
        # ATen's log-softmax backward of -r m: r (softmax sum(m) - m), one fused pass
        go = torch.mul(mb, -r, out=_slot(bshape, 3, span))
        block = grad[s:e]
        if block.dtype is _F32:
            _log_softmax_backward(go, lp, 1, _F32, out=block)
        else:
            block.copy_(_log_softmax_backward(go, lp, 1, _F32, out=go))
    if per is not None:
        return per.reshape(x.shape[:-1]), None if grad is None else grad.reshape(x.shape)
    loss = (total / n if reduction == "mean" else total).to(_F32)
    return loss, None if grad is None else grad.reshape(x.shape)


class Unbounded(RuntimeError):
    """A block's loss was not finite: the call declines to xent's own path."""


def _whole(kind: str, x: Array, t: Array, w: Array | None, pw: Array | None, options: Any) -> Array:
    """The loss through ATen's whole-input entries, differentiable (for double backward)."""
    smoothing, reduction = options[1], options[2]
    compute = _F64 if x.dtype == _F64 else _F32
    xf, tf = _as(x, compute), _as(t, compute)
    if kind == "binary":
        if smoothing:
            tf = tf * (1.0 - smoothing) + smoothing / 2
        return _bce_with_logits(xf, tf, w, pw, REDUCTIONS[reduction])
    return _cross_entropy_loss(
        xf.reshape(-1, xf.shape[-1]), tf.reshape(-1, tf.shape[-1]), w, REDUCTIONS[reduction],
        -100, smoothing,
    ).reshape(x.shape[:-1] if reduction == "none" else ())  # fmt: skip


class DenseBlocks(torch.autograd.Function):
    """:func:`_binary_blocks` or :func:`_prob_blocks` under autograd: the gradient comes with
    the loss and is scaled by the cotangent; under ``create_graph`` it is rebuilt through
    ATen's whole-input entries, whose backward is differentiable. ``options`` is ``(kind,
    smoothing, reduction)``; the weights (float32, not differentiated) and targets are not
    differentiated: callers send those that need a gradient elsewhere."""

    @staticmethod
    def forward(
        ctx: Any, x: Array, t: Array, w: Array | None, pw: Array | None, options: Any
    ) -> Array:
        loss, grad = _run_blocks(x, t, w, pw, options, with_grad=True)
        ctx.save_for_backward(x, t, w, pw)
        ctx.options = options
        ctx.grad = grad
        return loss if loss.dtype == x.dtype else loss.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, cotangent: Array) -> tuple[Array | None, None, None, None, None]:
        kind = ctx.options[0]
        if torch.is_grad_enabled():
            x, t, w, pw = ctx.saved_tensors
            with torch.enable_grad():
                loss = _whole(kind, x, t, w, pw, ctx.options)
                (g,) = torch.autograd.grad(loss, x, cotangent.to(loss.dtype), create_graph=True)
            return g, None, None, None, None
        grad = ctx.grad
        ctx.grad = None
        if cotangent.ndim == 0:
            if cotangent.item() != 1:
                grad = grad * cotangent
        elif kind == "binary":
            grad = grad * cotangent
        else:
            grad = grad * cotangent[..., None]
        return grad, None, None, None, None


def _run_blocks(
    x: Array, t: Array, w: Array | None, pw: Array | None, options: Any, *, with_grad: bool
) -> tuple[Array, Array | None]:
    kind, smoothing, reduction = options
    if kind == "binary":
        loss, grad = _binary_blocks(x, t, w, pw, smoothing, reduction, with_grad)
    else:
        loss, grad = _prob_blocks(x, t, w, smoothing, reduction, with_grad)
    if not _finite(loss, reduction != "none"):
        raise Unbounded
    return loss, grad


_apply_blocks: Any = DenseBlocks.apply


def blocks(
    kind: str,
    x: Array,
    t: Array,
    w: Array | None,
    pw: Array | None,
    smoothing: float,
    reduction: str,
) -> Array | None:
    """The loss by :class:`DenseBlocks` where they serve the call (a contiguous float32,
    float16 or bfloat16 input of at least :data:`BLOCKS_FROM` elements, the classes last for
    probabilities; a target and weights that autograd does not record), cast back to the
    input's dtype; None where they do not serve it or the result is not finite."""
    least = _BINARY_F32_BLOCKS_FROM if kind == "binary" and x.dtype is _F32 else BLOCKS_FROM
    if (
        x.numel() < least
        or x.dtype is _F64
        or not x.is_contiguous()
        or (kind == "probs" and not t.is_contiguous())
    ):
        return None
    recording = torch.is_grad_enabled()
    if recording and any(a is not None and a.requires_grad for a in (t, w, pw)):
        return None
    w = None if w is None else _as(w, _F32)
    pw = None if pw is None else _as(pw, _F32)
    options = (kind, smoothing, reduction)
    try:
        if recording and x.requires_grad:
            return _apply_blocks(x, t, w, pw, options)
        loss, _ = _run_blocks(x, t, w, pw, options, with_grad=False)
    except Unbounded:
        return None
    back = BACK.get(x.dtype)
    return loss if back is None else back(loss)
