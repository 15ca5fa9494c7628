"""PyTorch: the cross-entropy by blocks that stay in cache, through ATen's own kernels.

An input comes here as *rows*, ``(n, C)`` with unit stride along the classes, or as *slabs*,
``(A, C, B)`` contiguous with the classes along the middle axis (PyTorch's ``(N, C, d1, ...)``
layout, or a column-major matrix): :func:`layout` finds which view of the caller's tensor is
either, whatever its class axis. ATen's ``log_softmax`` runs its row kernel on rows and its
strided kernel on slabs; ``nll_loss`` takes rows, ``nll_loss2d`` slabs.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._typing import Array
from ._torch_dense import REDUCTIONS as _REDUCTIONS
from ._torch_softmax import bad_rows as _bad_rows
from ._torch_workspace import work as _work

BLOCK_ELEMENTS = 2**21
"""Blocks hold about this many elements (8 MiB in float32 per scratch buffer: one for a forward,
two with a gradient, see :class:`_Scratch`): few enough blocks that the kernels' parallel
regions stay long, small enough that the scratch stays in the last-level cache. Forward+backward
in float32, medians of nine interleaved rounds in one process, blocks of 2^21 elements against
2^20: 1.01x-1.04x of ``F.cross_entropy``'s time against 1.11x-1.14x at 16384 x 100,
8192 x 200, 2048 x 1000 and 4096 x 400 (two blocks of 2^20 each cost more than one of 2^21)."""

_F32 = torch.float32

_nll_loss: Any = torch._C._nn.nll_loss_nd
_nll_forward: Any = torch.ops.aten.nll_loss_forward.default
_nll_backward: Any = torch.ops.aten.nll_loss_backward.grad_input
_nll2d_forward: Any = torch.ops.aten.nll_loss2d_forward.default
_nll2d_backward: Any = torch.ops.aten.nll_loss2d_backward.grad_input
_log_softmax_backward: Any = torch._log_softmax_backward_data
_ONE = torch.ones(())
"""The cotangent of ``loss.backward()``, as ATen's backward kernels take it."""

_Mass = tuple[Array, Array, Array]
"""The gradient's target mass: safe labels, minus the mass at the label, minus the smoothing
spread per row; all per row, with a class axis of size 1."""

_Order = tuple[int, ...] | None
"""The target's axes in the order the view's positions run through them (None: their own)."""


def layout(x: Array, target: Array, axis: int) -> tuple[Array, Array, _Order] | None:
    """``(view, labels, order)``: ``x`` as rows or slabs (see the module) and ``target`` to
    match, each position's label at its position; None where ``x``'s memory holds neither
    (a tensor with gaps other than a row stride, or overlapping).

    Views, never copies of ``x`` (``target`` is copied where its layout differs): a
    contiguous ``(B, T, V)`` with the classes last is ``B*T`` rows, ``(N, C, H, W)`` with
    the classes at 1 is ``N`` slabs of ``C x H*W``, its channels-last form ``N*H*W`` rows,
    a column-major matrix one slab.
    """
    if x.ndim == 2 and axis == 1 and x.stride(1) == 1:
        return x, target, None  # rows, maybe a stride apart: ATen's row kernel reads them so
    shape = x.shape
    c = shape[axis]
    if x.is_contiguous():
        a, b = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
        if b == 1:
            return x.view(a, c), target.reshape(a), None
        return x.view(a, c, b), target.reshape(a, b), None
    # The axes in memory order, outermost first (size-1 axes, whose stride means nothing,
    # ahead of all).
    order = sorted(range(x.ndim), key=lambda i: (shape[i] != 1, -x.stride(i)))
    permuted = x.permute(order)
    if not permuted.is_contiguous():
        return None
    at = order.index(axis)
    a, b = math.prod(permuted.shape[:at]), math.prod(permuted.shape[at + 1 :])
    # Target axes of the positions, in memory order.
    axes = tuple(i if i < axis else i - 1 for i in order if i != axis)
    if axes == tuple(range(len(axes))):
        labels, kept = target, None
    else:
        labels, kept = target.permute(axes), axes
    if b == 1:
        return permuted.reshape(a, c), labels.reshape(a), kept
    return permuted.reshape(a, c, b), labels.reshape(a, b), kept


def restore(rows: Array, shape: tuple[int, ...], order: _Order) -> Array:
    """Per-position losses of a :func:`layout` view in the target's ``shape``."""
    if order is None:
        return rows.reshape(shape)
    shaped = rows.reshape(tuple(shape[i] for i in order))
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return shaped.permute(inverse).contiguous()


def _split(count: int, step: int) -> list[tuple[int, int]]:
    """``[0, count)`` in ranges of at most ``step``, of equal length but the last (a short last
    block cost 3-8% at two or three blocks)."""
    if step >= count:
        return [(0, count)]
    step = -(-count // -(-count // step))
    return [(start, min(start + step, count)) for start in range(0, count, step)]


_Index = Any
"""An index of a view's blocks: a slice of rows or slabs, or a tuple for part of one slab."""


def _blocks(x: Array, budget: int) -> list[tuple[_Index, _Index]]:
    """The blocks of a rows or slabs view of about ``budget`` elements each: ``(at, rows)``,
    the block of ``x`` (and of per-position arrays with a class axis of size 1) and of the
    per-position arrays without one. Whole rows or slabs where one fits; else columns of one
    slab (strided: staged in a buffer, see :class:`_Scratch`)."""
    if x.ndim == 2:
        steps = _split(x.shape[0], max(1, budget // max(1, x.shape[1])))
        return [(slice(s, e), slice(s, e)) for s, e in steps]
    a, c, b = x.shape
    if c * b <= budget:
        return [(slice(s, e), slice(s, e)) for s, e in _split(a, max(1, budget // (c * b)))]
    columns = _split(b, max(1, budget // max(1, c)))
    return [
        ((slice(i, i + 1), slice(None), slice(s, e)), (slice(i, i + 1), slice(s, e)))
        for i in range(a)
        for s, e in columns
    ]


class _Scratch:
    """The blocks of a view and their float32 scratch: the log-probabilities (``lp``), the
    stage (a float16/bfloat16 block's float32 copy, or a strided block's compact one: ``lp``
    itself without a gradient, as ATen's kernels read each row or column before they write it;
    apart with one) and, with a gradient, the gradient's first step (``go``: the stage itself,
    no longer needed by then, or a buffer of its own where there is none); and the gradient (in
    the view's own layout, compact).

    A float32 block's gradient is written by ATen's log-softmax backward from ``go`` into the
    gradient itself, not over ``go`` in place: in place ATen's kernel took 1.1x-1.4x as long at
    some class counts (8, 33, 100), and was never faster by more than 5% at the others measured
    (16 to 32000).
    """

    def __init__(self, x: Array, with_grad: bool) -> None:
        blocks = _blocks(x, BLOCK_ELEMENTS)
        self.blocks = blocks
        self.staged = x.dtype != _F32 or not isinstance(blocks[0][0], slice)
        self.with_grad = with_grad
        first = blocks[0][0]
        self.one = len(blocks) == 1 and first == slice(0, x.shape[0])
        # The largest block's bytes in float32 (the first: the blocks are split evenly).
        if isinstance(first, slice):
            self.offset = (first.stop - first.start) * math.prod(x.shape[1:]) * 4
        else:
            self.offset = (first[2].stop - first[2].start) * x.shape[1] * 4
        self.grad = torch.empty(x.shape, dtype=x.dtype) if with_grad else None

    def buffers(self, shape: tuple[int, ...]) -> tuple[Array, Array | None, Array | None]:
        """``(lp, stage, go)`` for a block of ``shape`` (``stage`` None: the block itself;
        ``go`` None without a gradient)."""
        lp = _work(shape, _F32)
        second = _work(shape, _F32, self.offset) if self.with_grad else None
        if not self.staged:
            return lp, None, second
        return lp, (lp if second is None else second), second


def _nll(lp: Array, target: Array, w: Array | None, code: int, ignore: int) -> tuple[Array, Array]:
    """ATen's ``nll_loss`` forward of rows or slabs: ``(loss, total_weight)``."""
    if lp.ndim == 2:
        return _nll_forward(lp, target, w, code, ignore)
    loss, total = _nll2d_forward(lp.unsqueeze(2), target.unsqueeze(1), w, code, ignore)
    return (loss.squeeze(1) if code == 0 else loss), total


def _nll_grad(
    g: Array, lp: Array, target: Array, w: Array | None, code: int, ignore: int, total: Array,
    out: Array,
) -> None:  # fmt: skip
    """ATen's ``nll_loss`` backward of rows or slabs, written into ``out``."""
    if lp.ndim == 2:
        _nll_backward(g, lp, target, w, code, ignore, total, grad_input=out)
        return
    g = g.unsqueeze(1) if g.ndim else g
    _nll2d_backward(
        g, lp.unsqueeze(2), target.unsqueeze(1), w, code, ignore, total, grad_input=out.unsqueeze(2)
    )


class Unbounded(RuntimeError):
    """A position's logits hold +inf or NaN (see :func:`raise_if_nan`): the caller gives the call
    back to xent's own path."""


def raise_if_nan(lp: Array) -> None:
    """Raise :class:`Unbounded` where some position's log-probabilities (ATen's: a block's, in
    cache, or a whole input's; classes at axis 1, or 0 of a single row) are NaN: its logits hold
    +inf or NaN (or are all -inf), which makes ATen's log-softmax NaN at every class, so the
    first class tells, in one sum (log-probabilities are never +inf).
    At an ignored position the gradient here would be NaN everywhere, where xent's gradient of
    an ignored position is ``0 * softmax``, 0 at its finite logits; elsewhere the loss is not
    finite, which the caller declines anyway. Read while the block is in cache: a gather of
    the ignored positions' first class from the finished gradient, out of cache by then, took
    about twice as long at 16384 x 100 (99 us a call against 54 us)."""
    if _bad_rows(lp.detach(), 1 if lp.ndim > 1 else 0):
        raise Unbounded


def fused_rows(
    x: Array,
    target: Array,
    weight: Array | None,
    ignore_index: int,
    smoothing: float,
    reduction: str,
    *,
    with_grad: bool,
    cotangent: Array | None = None,
    guard: bool = False,
) -> tuple[Array, Array | None]:
    """The cross-entropy of a rows or slabs view ``x`` (float32: 0-d, or per position of
    ``target``) and, with ``with_grad``, the gradient of ``sum(loss * cotangent)``
    (``cotangent`` 1 when None) in ``x``'s dtype; with ``guard``, :class:`Unbounded` is raised
    where a position's logits hold +inf or NaN (see :func:`raise_if_nan`).

    Blocks go through ATen's kernels in float32 while they sit in cache: the copy of a
    float16/bfloat16 (or strided) block into a reused float32 scratch, ``log_softmax``,
    ``nll_loss`` (which raises on a label outside ``[0, C)`` that is not ``ignore_index``),
    and for the gradient ATen's log-softmax backward of the same log-probabilities, whose fast
    exp is that of the forward kernel. Nothing of ``x``'s size is written but the gradient,
    and a reduced-precision input is read once, in its own width. Without smoothing,
    :func:`_plain_rows` serves it; below, the smoothing spread.
    """
    if not smoothing:
        return _plain_rows(x, target, weight, ignore_index, reduction, with_grad, cotangent, guard)
    c = x.shape[1]
    ignored = target == ignore_index
    w = None if weight is None else weight.to(_F32)
    label_w, denominator = _counted(target, ignored, w)
    mass = None
    if with_grad:
        # The gradient's target mass per position: the cotangent, over the mean's
        # denominator, 0 where ignored; `on_label` of it at the label, `spread` (times the
        # class weight) on every class.
        if cotangent is None or cotangent.ndim == 0:
            r = (~ignored).to(_F32)
            if cotangent is not None:
                r = r.mul_(cotangent.to(_F32))
        else:
            r = torch.where(ignored, 0.0, cotangent.to(_F32))
        if reduction == "mean":
            r = r.div_(denominator)
        on_label = r * (1.0 - smoothing) if label_w is None else r * label_w * (1.0 - smoothing)
        spread = r.mul_(-smoothing / c).unsqueeze(1)
        mass = (torch.where(ignored, 0, target).unsqueeze(1), on_label.neg_().unsqueeze(1), spread)
    scratch = _Scratch(x, with_grad)
    grad = scratch.grad
    if scratch.one:
        # One block: the arrays themselves, no slicing (a fixed cost on small inputs).
        lp, stage, go = scratch.buffers(tuple(x.shape))
        rows = _fused_block(
            x, target, ignored, w, ignore_index, smoothing, stage, lp, go, grad, mass, guard
        )  # fmt: skip
    else:
        rows = x.new_empty(target.shape, dtype=_F32)
        for at, part in scratch.blocks:
            xb = x[at]
            lp, stage, go = scratch.buffers(tuple(xb.shape))
            rows[part] = _fused_block(
                xb, target[part], ignored[part], w, ignore_index, smoothing, stage, lp, go,
                None if grad is None else grad[at],
                None if mass is None else (mass[0][at], mass[1][at], mass[2][at]), guard,
            )  # fmt: skip
    return _reduced(rows, denominator, reduction), grad


def _counted(target: Array, ignored: Array, w: Array | None) -> tuple[Array | None, Array]:
    """``(label_w, denominator)``: each position's class weight (0 where ignored; None without
    weights) and the mean's denominator, the positions counted or their weights summed."""
    if w is None:
        return None, (target.numel() - ignored.sum()).to(_F32)
    label_w = torch.where(ignored, 0.0, w[target.clamp(0, w.shape[0] - 1)])
    return label_w, label_w.sum()


def _plain_rows(
    x: Array,
    target: Array,
    weight: Array | None,
    ignore_index: int,
    reduction: str,
    with_grad: bool,
    cotangent: Array | None,
    guard: bool,
) -> tuple[Array, Array | None]:
    """:func:`fused_rows` without smoothing: per block, ATen's ``nll_loss`` forward and, for
    the gradient, its backward into the block's scratch, then the log-softmax backward over it
    (the very kernels autograd runs after ``F.cross_entropy`` in float32, so a one-block input
    gets their results, rounded once to a float16/bfloat16 ``x``'s dtype)."""
    code = _REDUCTIONS[reduction]
    w = None if weight is None else weight.to(_F32)
    scratch = _Scratch(x, with_grad)
    grad = scratch.grad
    g = _ONE if cotangent is None else cotangent.to(_F32)
    if g is _ONE and reduction == "none":
        g = _ONE.expand(target.shape)
    if scratch.one:
        # One block: the arrays themselves, no slicing (a fixed cost on small inputs).
        lp, stage, go = scratch.buffers(tuple(x.shape))
        xb = x if stage is None else stage.copy_(x)
        lb = _log_probs(xb, lp, guard)
        loss, total = _nll(lb, target, w, code, ignore_index)
        if grad is not None and go is not None:
            _plain_grad(g, lb, target, w, code, ignore_index, total, go, grad)
        return loss, grad
    # Several blocks: the mean's denominator first, for every block's gradient.
    _, total = _counted(target, target == ignore_index, w)
    part_code = 0 if reduction == "none" else 2
    losses = x.new_empty(target.shape if part_code == 0 else (len(scratch.blocks),), dtype=_F32)
    for i, (at, part) in enumerate(scratch.blocks):
        xb = x[at]
        lp, stage, go = scratch.buffers(tuple(xb.shape))
        if stage is not None:
            xb = stage.copy_(xb)
        lb = _log_probs(xb, lp, guard)
        block_loss, _ = _nll(lb, target[part], w, part_code, ignore_index)
        losses[part if part_code == 0 else i] = block_loss
        if grad is not None and go is not None:
            gb = g if g.ndim == 0 else g[part]
            _plain_grad(gb, lb, target[part], w, code, ignore_index, total, go, grad[at])
    return _reduced(losses, total, reduction), grad


def _reduced(losses: Array, denominator: Array, reduction: str) -> Array:
    """Per-position (or per-block) losses under ``reduction``: themselves, or their sum (over
    ``denominator`` for the mean)."""
    if reduction == "none":
        return losses
    loss = losses.sum()
    return loss / denominator if reduction == "mean" else loss


def _log_probs(xb: Array, lp: Array, guard: bool) -> Array:
    """ATen's log-softmax of a float32 block into ``lp`` (see :func:`raise_if_nan` for
    ``guard``)."""
    lb = torch.log_softmax(xb, 1, out=lp)
    if guard:
        raise_if_nan(lb)
    return lb


def _plain_grad(
    g: Array,
    lp: Array,
    target: Array,
    w: Array | None,
    code: int,
    ignore_index: int,
    total: Array,
    go: Array,
    grad: Array,
) -> None:
    """One block's gradient: ATen's ``nll_loss`` backward written into ``go`` (a float32
    block), then the log-softmax backward of it into ``grad`` (see :func:`_backward_into`)."""
    _nll_grad(g, lp, target, w, code, ignore_index, total, go)
    _backward_into(go, lp, grad)


def _backward_into(go: Array, lp: Array, grad: Array) -> None:
    """ATen's log-softmax backward, ``go - exp(lp) * sum(go)`` per position: into ``grad``
    where it is a compact float32 block (see :class:`_Scratch`), else over ``go``, copied into
    ``grad`` (cast, or strided) afterwards."""
    if grad.dtype == _F32 and grad.is_contiguous():
        _log_softmax_backward(go, lp, 1, _F32, out=grad)
    else:
        _log_softmax_backward(go, lp, 1, _F32, out=go)
        grad.copy_(go)


def _fused_block(
    x: Array,
    target: Array,
    ignored: Array,
    w: Array | None,
    ignore_index: int,
    smoothing: float,
    stage: Array | None,
    lp: Array,
    go: Array | None,
    grad: Array | None,
    mass: _Mass | None,
    guard: bool,
) -> Array:
    """One block of :func:`fused_rows`: its losses, and its gradient written into ``grad``."""
    c = x.shape[1]
    xb = x if stage is None else stage.copy_(x)
    lb = _log_probs(xb, lp, guard)
    loss = _nll_loss(lb, target, w, 0, ignore_index)
    if w is None:
        spread = lb.sum(1)
    else:
        spread = torch.matmul(lb, w) if lb.ndim == 2 else torch.matmul(w, lb)
    spread.masked_fill_(ignored, 0.0)
    loss = loss.mul_(1.0 - smoothing).sub_(spread, alpha=smoothing / c)
    if grad is not None and go is not None and mass is not None:
        # ATen's log-softmax backward with ``go`` the negated target mass (whose sum is
        # ``-total``).
        labels, neg_on_label, neg_spread = mass
        if w is None:
            go.copy_(neg_spread.expand_as(go))
        else:
            torch.mul(neg_spread, w if go.ndim == 2 else w[:, None], out=go)
        go.scatter_add_(1, labels, neg_on_label)
        _backward_into(go, lb, grad)
    return loss


class FusedRows(torch.autograd.Function):
    """:func:`fused_rows` under autograd: the gradient comes with the loss, once for the
    cotangent 1 (what ``loss.backward()`` passes), else again from ``x`` for the cotangent given;
    under ``create_graph`` it is rebuilt with differentiable ops. Call it through :func:`apply`
    with ``options`` ``(ignore_index, smoothing, reduction, guard)``; with ``guard`` (some
    label may be ``ignore_index``), :class:`Unbounded` is raised where an ignored position's
    log-probabilities are NaN (see :func:`raise_if_nan`)."""

    @staticmethod
    def forward(ctx: Any, x: Array, target: Array, weight: Array | None, options: Any) -> Array:
        ignore_index, smoothing, reduction, guard = options
        loss, grad = fused_rows(
            x, target, weight, ignore_index, smoothing, reduction, with_grad=True, guard=guard
        )
        ctx.save_for_backward(x, target, weight)
        ctx.options = (ignore_index, smoothing, reduction)
        ctx.grad = grad
        # Cast back here: one node less for autograd to run.
        return loss if loss.dtype == x.dtype else loss.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, cotangent: Array) -> tuple[Array, None, None, None]:
        ignore_index, smoothing, reduction = ctx.options
        if torch.is_grad_enabled():
            x, target, weight = ctx.saved_tensors
            with torch.enable_grad():
                loss = torch.nn.functional.cross_entropy(
                    x.float(), target, weight, ignore_index=ignore_index, reduction=reduction,
                    label_smoothing=smoothing,
                )  # fmt: skip
                (g,) = torch.autograd.grad(loss, x, cotangent.to(loss.dtype), create_graph=True)
            return g, None, None, None
        grad = ctx.grad
        ctx.grad = None
        one = cotangent.item() == 1 if cotangent.ndim == 0 else bool((cotangent == 1).all())
        if grad is None or not one:
            # The saved tensors are unpacked only here (each unpacking checks its version).
            x, target, weight = ctx.saved_tensors
            _, grad = fused_rows(
                x, target, weight, ignore_index, smoothing, reduction, with_grad=True,
                cotangent=cotangent,
            )  # fmt: skip
        return grad, None, None, None


apply: Any = super(torch.autograd.Function, FusedRows).apply
"""``FusedRows.apply(x, target, weight, options)`` through the C entry that ``Function.apply``
ends in, without its Python steps (a few microseconds a call: a tree map over the arguments for
dead functorch wrappers, and functorch's dispatch). The caller passes no functorch-wrapped
tensor and calls it with no functorch transform active."""
