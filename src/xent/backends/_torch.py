"""PyTorch: facts about compilation, vmap and devices; native ops and an analytic backward."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import torch

from .._compat import array_namespace
from .._typing import Array
from ._generic import Backend, GradRule, IndexOptions
from ._torch_compiled import index_loss as _compiled_index_loss
from ._torch_linear import linear_custom_grad as _linear_custom_grad

NAMESPACE = array_namespace(torch.empty(0))
"""array-api-compat's namespace for torch tensors."""


def _owned(g: Array) -> bool:
    """Whether xent's own temporary ``g`` may be written in place (autograd is not recording)."""
    return not (g.requires_grad and torch.is_grad_enabled())


_functorch_wrapped: Callable[[Array], bool] = torch._C._functorch.is_functorch_wrapped_tensor
_is_compiling = torch.compiler.is_compiling
_FakeTensor = torch._subclasses.FakeTensor
_STRIDED = torch.strided


class Facts(Backend):
    """Values are unreadable while Dynamo/FX traces or functorch (vmap, grad) wraps them."""

    name = "torch"

    def is_traced(self, x: Array) -> bool:
        return _is_compiling() or _functorch_wrapped(x) or isinstance(x, _FakeTensor)

    def is_lazy(self, x: Array) -> bool:
        return False

    def on_host(self, x: Array) -> bool:
        return bool(x.device.type == "cpu")

    def unsupported(self, x: Array) -> str | None:
        if x.layout != torch.strided:
            return f"a tensor of layout {x.layout} (convert with `.to_dense()`)"
        return None

    def device(self, x: Array) -> Any:
        return x.device

    def dense_together(self, a: Array, b: Array) -> bool:
        return (
            a.layout is _STRIDED
            and b.layout is _STRIDED
            and ((a.is_cpu and b.is_cpu) or bool(a.device == b.device))
        )


class _AnalyticGrad(torch.autograd.Function):
    """Wraps xent's forward and analytic backward; the backward stays differentiable."""

    @staticmethod
    def forward(ctx: Any, x: Array, rule: GradRule, state: Any) -> Array:
        loss, saved = rule.forward(state, x)
        ctx.save_for_backward(x)
        ctx.saved = saved
        ctx.rule = rule
        ctx.state = state
        return loss

    @staticmethod
    def backward(ctx: Any, cotangent: Array) -> tuple[Array, None, None]:
        (x,) = ctx.saved_tensors
        # Under create_graph the gradient must be rebuilt from x so autograd sees every op.
        saved = None if torch.is_grad_enabled() else ctx.saved
        return ctx.rule.backward(ctx.state, x, saved, cotangent), None, None


_BLOCK_BYTES = 4 * 2**20
"""Rows are taken in blocks of about this many bytes: each block's temporary stays in the
last-level cache, and the blocks are few, so the kernels' parallel regions (each waiting for
every thread, a stall when another process holds a core) stay few and long."""

_ONE_BLOCK_BYTES = 8 * 2**20
"""Inputs up to this size are taken in one block (fewer kernel launches)."""


_WORKSPACE_BYTES = 8 * 2**20
"""The most memory a thread keeps between calls for the temporaries of the blocks of rows (the
float32 copy of a float16/bfloat16 block, its log-probabilities, the log-sum-exp's scratch)."""


class _Workspace(threading.local):
    """This thread's kept buffer (bytes) for :func:`_work`, and the views of it handed out."""

    def __init__(self) -> None:
        self.buffer: Array | None = None
        self.views: dict[tuple[Any, ...], Array] = {}


_WORKSPACE = _Workspace()
_inference_mode = torch.inference_mode

_WORKSPACE_VIEWS = 64
"""Views of the kept buffer remembered per thread (by shape, dtype and offset) at most."""


def _work(shape: tuple[int, ...], dtype: Any, offset: int = 0) -> Array:
    """A CPU tensor of ``shape`` and ``dtype`` for temporaries that never leave the call: this
    thread's kept buffer from byte ``offset`` on where the whole request fits in
    ``_WORKSPACE_BYTES``, else a new tensor.

    A temporary of megabytes, allocated and freed at every call, is given back to the system by
    the C allocator (glibc trims the top of its heap or unmaps the block) and page-faults anew
    at the next call: on a virtual machine a fault costs about a microsecond per 4 KiB, which
    made a bfloat16 forward at 8 x 32000 take 0.64 ms instead of 0.07 ms in a fresh process.
    Kept, the buffer is written in cache at every call and faults once per thread, and only the
    pages a call writes become resident (small inputs hold a few KiB of it, not the cap). The
    view for a request is remembered (a training loop repeats its shapes), so a call costs a
    lookup.
    """
    workspace = _WORKSPACE
    key = (shape, dtype, offset)
    view = workspace.views.get(key)
    if view is not None:
        return view
    end = offset + math.prod(shape) * dtype.itemsize
    if end > _WORKSPACE_BYTES:
        return torch.empty(shape, dtype=dtype)
    # Made outside inference mode, whatever the caller's mode: an inference tensor (or a view
    # made in inference mode) could not be written in place by a later call in normal mode.
    with _inference_mode(False):
        if workspace.buffer is None:
            # The cap at once: one allocation per thread, whatever sizes come later.
            workspace.buffer = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8)
        view = workspace.buffer[offset:end].view(dtype).view(shape)
    if len(workspace.views) >= _WORKSPACE_VIEWS:
        workspace.views.clear()
    workspace.views[key] = view
    return view


def _chunked_logsumexp(x: Array) -> tuple[Array, Array]:
    """``(shift, log_sum)`` along the last axis of a tensor that needs no gradient.

    ATen's ``log_softmax`` kernel (one fused pass per row, with its fast vectorised exp) runs
    on blocks of rows; its largest entry per row is ``-log_sum``, exactly, since it sits at the
    row's max. The full-size temporary of ``x - shift`` is never made.
    """
    c = x.shape[-1]
    rows = x.reshape(-1, c)
    n = rows.shape[0]
    peak = torch.amax(rows, dim=1, keepdim=True) if c else rows.new_zeros((n, 1))
    log_sum = rows.new_empty((n, 1))
    size = rows.numel() * rows.element_size()
    block = size if size <= _ONE_BLOCK_BYTES else _BLOCK_BYTES
    step = max(1, block // max(1, c * rows.element_size()))
    # One scratch buffer for every block: allocating per block page-faults anew whenever the
    # allocator has just handed a large free back to the system.
    scratch = _work((min(step, n), c), rows.dtype)
    for start in range(0, n, step):
        block_rows = rows[start : start + step]
        lp = torch.log_softmax(block_rows, dim=1, out=scratch[: block_rows.shape[0]])
        torch.amax(lp, dim=1, keepdim=True, out=log_sum[start : start + step])
    log_sum.neg_()
    # Rows whose max is not finite: shift 0 and log_sum = max (-inf, inf or NaN), as the
    # generic logsumexp gives them.
    finite = torch.isfinite(peak)
    shift = torch.where(finite, peak, 0.0)
    log_sum = torch.where(finite, log_sum, peak)
    keep = (*x.shape[:-1], 1)
    return shift.reshape(keep), log_sum.reshape(keep)


def _softmax_in_place(x: Array, shift: Array, log_sum: Array, scale: Array | None) -> Array:
    """``exp((x - shift) - log_sum) * scale`` written over ``x`` (last axis), a cache-sized
    block of rows at a time so the subtracts, the exp and the scale find the block in cache.
    The generic formula, so rows holding infinities come out as on every backend."""
    c = x.shape[-1]
    rows = x.reshape(-1, c)
    keep = (*x.shape[:-1], 1)
    m, ls = (torch.broadcast_to(a, keep).reshape(-1, 1) for a in (shift, log_sum))
    factor = None if scale is None else torch.broadcast_to(scale, keep).reshape(-1, 1)
    step = max(1, _BLOCK_BYTES // max(1, c * rows.element_size()))
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step]
        block.sub_(m[start : start + step]).sub_(ls[start : start + step]).exp_()
        if factor is not None:
            block.mul_(factor[start : start + step])
    return x


_F32 = torch.float32
_HALF_DTYPES = (torch.bfloat16, torch.float16)
_FUSED_DTYPES = (torch.float32, torch.float64, *_HALF_DTYPES)

_FUSED_BYTES = 16 * 2**20
"""float32 and float64 inputs up to this size call ``F.cross_entropy`` once; larger float32 ones
take the loss by blocks of rows (:func:`_fused_rows`), which never writes a full-size
log-softmax (whose page faults make ``F.cross_entropy`` slow there)."""

_HALF_ROWS_ELEMENTS = 2**18
"""float16/bfloat16 inputs of this many elements or more take the loss by blocks of rows, each
block cast to float32 in cache, the gradient made with the loss; smaller ones are cast whole
and call ``F.cross_entropy`` once (fewer kernel launches, which dominate there). Measured on
two cores, by CPU time of one thread: the two ways cross between 2^17 and 2^18 elements, forward
and forward+backward alike. Where autograd records the call, a quarter of this many: the
whole-input route's backward runs four nodes (the casts', ``nll_loss``'s and ``log_softmax``'s)
and allocates three arrays of the input's size. Medians of nine interleaved rounds in one
process, forward+backward, blocks against whole input: 0.85x at 4 x 32000, 0.92x at 100 x 1000,
1.04x at 16 x 4096 (65,536 elements)."""

_GRAD_ROWS_ELEMENTS = 2**17
"""float32 inputs of this many elements or more take the blocks of rows where autograd records the
call, whatever :data:`_FUSED_BYTES` says. Autograd's route through ATen allocates three arrays
of the input's size at every call (the log-probabilities it saves, ``nll_loss``'s gradient and
``log_softmax``'s), the blocks one (the gradient); freed and allocated again call after call,
such arrays are given back to the system by the C allocator as often as not and page-fault anew
(:func:`_work`). In fresh processes, forward+backward at 16 x 50257, 1000 x 1000 and 64 x 50257,
the blocks took 0.46x, 0.35x and 0.62x of ``F.cross_entropy``'s time, where ATen's route took as
long as ``F.cross_entropy`` or twice as long, by the page faults that landed on it; such faults
showed from 2.56e5 elements (8 x 32000: 240 us against 129 us). The blocks' fixed cost (a Python
``autograd.Function``, about 8 us more than ATen's route with no fault) is 10% of a call at 2^17
elements and shows below."""

_FUSED_BLOCK_ELEMENTS = 2**20
"""Rows are taken in blocks of about this many elements (4 MiB in float32) per float32 scratch
buffer beyond the first: few enough blocks that the kernels' parallel regions stay long, small
enough that the scratch stays in the last-level cache."""


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
"""The range of ``ignore_index`` that ATen's kernel takes."""

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
"""ATen's reduction codes, which its entries below take (their stubs say strings)."""

_cross_entropy_loss: Any = torch._C._nn.cross_entropy_loss
_nll_loss: Any = torch._C._nn.nll_loss_nd

_Mass = tuple[Array, Array, Array]
"""The gradient's target mass: safe labels, minus the mass at the label, minus the smoothing
spread per row; all per row, with a class axis of size 1."""


def _scratch(x: Array, with_grad: bool) -> tuple[int, Array, Array | None, Array | None]:
    """``(step, lp, cast, grad)`` for the blocks of rows of a 2-D ``x``: rows per block, the
    float32 log-probabilities' scratch, the float32 copy of a float16/bfloat16 block (``lp``
    itself without a gradient: ATen's row kernel reads each row before it writes it; apart with
    one, which needs the copy) and the gradient (row-major whatever the layout of ``x``: the
    kernels write each block of rows in place). Without a gradient, one buffer: twice the rows.
    The rows are split evenly between the blocks.
    """
    n, c = x.shape
    f32 = torch.float32
    buffers = 1 if x.dtype == f32 else 1 + with_grad
    step = max(1, _FUSED_BLOCK_ELEMENTS * 2 // (buffers * c))
    if step < n:  # blocks of equal rows: no short last block (3-8% at two or three blocks)
        step = -(-n // -(-n // step))
    block = (min(step, n), c)
    lp = _work(block, f32)
    cast = None
    if x.dtype != f32:
        cast = lp if not with_grad else _work(block, f32, offset=block[0] * c * 4)
    grad = torch.empty_like(x, memory_format=torch.contiguous_format) if with_grad else None
    return step, lp, cast, grad


def _fused_rows(
    x: Array,
    target: Array,
    weight: Array | None,
    ignore_index: int,
    smoothing: float,
    reduction: str,
    *,
    with_grad: bool,
    cotangent: Array | None = None,
) -> tuple[Array, Array | None]:
    """The cross-entropy of a 2-D ``x`` (float32, 0-d or per row) and, with ``with_grad``, the
    gradient of ``sum(loss * cotangent)`` (``cotangent`` 1 when None) in ``x``'s dtype.

    Blocks of rows go through ATen's kernels in float32 while they sit in cache: the copy of
    a float16/bfloat16 block into a reused float32 scratch, ``log_softmax``, ``nll_loss`` (which
    raises on a label outside ``[0, C)`` that is not ``ignore_index``), and for the gradient
    ATen's log-softmax backward of the same log-probabilities, whose fast exp is that of the
    forward kernel. Nothing of ``x``'s size is written but the gradient, and a reduced-precision
    input is read once, in its own width. Without smoothing, :func:`_plain_rows` serves it;
    below, the smoothing spread.
    """
    if not smoothing:
        return _plain_rows(x, target, weight, ignore_index, reduction, with_grad, cotangent)
    n, c = x.shape
    f32 = torch.float32
    ignored = target == ignore_index
    w = label_w = None
    if weight is None:
        denominator = n - ignored.sum()
    else:
        w = weight.to(f32)
        label_w = torch.where(ignored, 0.0, w[target.clamp(0, c - 1)])
        denominator = label_w.sum()
    mass = None
    if with_grad:
        # The gradient's target mass per row: the cotangent, over the mean's denominator, 0 on
        # ignored rows; `on_label` of it at the label, `spread` (times the class weight) on
        # every class.
        if cotangent is None or cotangent.ndim == 0:
            r = (~ignored).to(f32)
            if cotangent is not None:
                r = r.mul_(cotangent.to(f32))
        else:
            r = torch.where(ignored, 0.0, cotangent.to(f32))
        if reduction == "mean":
            r = r.div_(denominator)
        on_label = r * (1.0 - smoothing) if label_w is None else r * label_w * (1.0 - smoothing)
        spread = r.mul_(-smoothing / c).unsqueeze(1)
        mass = (torch.where(ignored, 0, target).unsqueeze(1), on_label.neg_().unsqueeze(1), spread)
    step, lp, cast, grad = _scratch(x, with_grad)
    if step >= n:
        # One block: the arrays themselves, no slicing (a fixed cost on small inputs).
        rows = _fused_block(x, target, ignored, w, ignore_index, smoothing, cast, lp, grad, mass)
    else:
        rows = x.new_empty((n,), dtype=f32)
        for start in range(0, n, step):
            part = slice(start, start + step)
            b = min(step, n - start)
            rows[part] = _fused_block(
                x[part], target[part], ignored[part], w, ignore_index, smoothing,
                None if cast is None else cast[:b], lp[:b], None if grad is None else grad[part],
                None if mass is None else _block_mass(mass, part),
            )  # fmt: skip
    if reduction == "none":
        return rows, grad
    loss = rows.sum()
    return (loss / denominator if reduction == "mean" else loss), grad


_nll_forward: Any = torch.ops.aten.nll_loss_forward.default
_nll_backward: Any = torch.ops.aten.nll_loss_backward.grad_input
_ONE = torch.ones(())
"""The cotangent of ``loss.backward()``, as ATen's backward kernels take it."""


def _plain_rows(
    x: Array,
    target: Array,
    weight: Array | None,
    ignore_index: int,
    reduction: str,
    with_grad: bool,
    cotangent: Array | None,
) -> tuple[Array, Array | None]:
    """:func:`_fused_rows` without smoothing: per block, ATen's ``nll_loss`` forward and, for
    the gradient, its backward into the block's scratch, then the log-softmax backward over it
    (the very kernels autograd runs after ``F.cross_entropy`` in float32, so a one-block input
    gets their results, rounded once to a float16/bfloat16 ``x``'s dtype)."""
    n, c = x.shape
    f32 = torch.float32
    code = _REDUCTIONS[reduction]
    w = None if weight is None else weight.to(f32)
    step, lp, cast, grad = _scratch(x, with_grad)
    g = _ONE if cotangent is None else cotangent.to(f32)
    if g is _ONE and reduction == "none":
        g = _ONE.expand(n)
    if step >= n:
        # One block: the arrays themselves, no slicing (a fixed cost on small inputs).
        xb = x if cast is None else cast.copy_(x)
        lb = torch.log_softmax(xb, 1, out=lp)
        loss, total = _nll_forward(lb, target, w, code, ignore_index)
        if grad is not None:
            go = grad if cast is None else xb
            _plain_grad(g, lb, target, w, code, ignore_index, total, go, grad)
        return loss, grad
    # Several blocks: the mean's denominator first, for every block's gradient.
    if w is None:
        total = (n - (target == ignore_index).sum()).to(f32)
    else:
        total = torch.where(target == ignore_index, 0.0, w[target.clamp(0, c - 1)]).sum()
    part_code = 0 if reduction == "none" else 2
    losses = x.new_empty((n if reduction == "none" else -(-n // step),), dtype=f32)
    for i, start in enumerate(range(0, n, step)):
        part = slice(start, start + step)
        b = min(step, n - start)
        xb = x[part] if cast is None else cast[:b].copy_(x[part])
        lb = torch.log_softmax(xb, 1, out=lp[:b])
        block_loss, _ = _nll_forward(lb, target[part], w, part_code, ignore_index)
        losses[part if part_code == 0 else i] = block_loss
        if grad is not None:
            go = grad[part] if cast is None else xb
            gb = g if g.ndim == 0 else g[part]
            _plain_grad(gb, lb, target[part], w, code, ignore_index, total, go, grad[part])
    if reduction == "none":
        return losses, grad
    loss = losses.sum()
    return (loss / total if reduction == "mean" else loss), grad


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
    block), the log-softmax backward over it, and ``go`` copied into ``grad`` unless it is."""
    _nll_backward(g, lp, target, w, code, ignore_index, total, grad_input=go)
    torch._log_softmax_backward_data(go, lp, 1, torch.float32, out=go)
    if go is not grad:
        grad.copy_(go)


def _block_mass(mass: _Mass, part: slice) -> _Mass:
    labels, neg_on_label, neg_spread = mass
    return labels[part], neg_on_label[part], neg_spread[part]


def _fused_block(
    x: Array,
    target: Array,
    ignored: Array,
    w: Array | None,
    ignore_index: int,
    smoothing: float,
    cast: Array | None,
    lp: Array,
    grad: Array | None,
    mass: _Mass | None,
) -> Array:
    """One block of :func:`_fused_rows`: its losses, and its gradient written into ``grad``."""
    c = x.shape[1]
    xb = x if cast is None else cast.copy_(x)
    lb = torch.log_softmax(xb, 1, out=lp)
    loss = _nll_loss(lb, target, w, 0, ignore_index)
    spread = lb.sum(1) if w is None else lb @ w
    spread.masked_fill_(ignored, 0.0)
    loss = loss.mul_(1.0 - smoothing).sub_(spread, alpha=smoothing / c)
    if grad is not None and mass is not None:
        # ATen's log-softmax backward, ``go - exp(lp) * sum(go)`` per row, with ``go`` the
        # negated target mass (whose row sum is ``-total``), written over ``go`` itself.
        labels, neg_on_label, neg_spread = mass
        go = grad if cast is None else xb
        if w is None:
            go.copy_(neg_spread.expand(-1, c))
        else:
            torch.mul(neg_spread, w, out=go)
        go.scatter_add_(1, labels, neg_on_label)
        torch._log_softmax_backward_data(go, lb, 1, torch.float32, out=go)
        if cast is not None:
            grad.copy_(go)
    return loss


class _FusedRows(torch.autograd.Function):
    """:func:`_fused_rows` under autograd: the gradient comes with the loss, once for the
    cotangent 1 (what ``loss.backward()`` passes), else again from ``x`` for the cotangent given;
    under ``create_graph`` it is rebuilt with differentiable ops."""

    @staticmethod
    def forward(ctx: Any, x: Array, target: Array, weight: Array | None, options: Any) -> Array:
        ignore_index, smoothing, reduction = options
        loss, grad = _fused_rows(
            x, target, weight, ignore_index, smoothing, reduction, with_grad=True
        )
        ctx.save_for_backward(x, target, weight)
        ctx.options = options
        ctx.grad = grad
        # Cast back here: one node less for autograd to run.
        return loss if loss.dtype == x.dtype else loss.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, cotangent: Array) -> tuple[Array, None, None, None]:
        x, target, weight = ctx.saved_tensors
        ignore_index, smoothing, reduction = ctx.options
        if torch.is_grad_enabled():
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
            _, grad = _fused_rows(
                x, target, weight, ignore_index, smoothing, reduction, with_grad=True,
                cotangent=cotangent,
            )  # fmt: skip
        return grad, None, None, None


def _route(dtype: Any, ndim: int, size: int, *, grad: bool) -> str | None:
    """How :meth:`Native.fused_index_loss` computes an input: ``"kernel"`` (ATen's
    ``cross_entropy_loss`` once, float16/bfloat16 cast to float32 whole), ``"rows"``
    (:func:`_fused_rows`) or None (xent's own path); ``grad``: autograd records the call."""
    if dtype in _HALF_DTYPES:
        if ndim == 2 and size >= (_HALF_ROWS_ELEMENTS // 4 if grad else _HALF_ROWS_ELEMENTS):
            return "rows"
    elif (
        ndim == 2
        and dtype == torch.float32
        and (size * 4 > _FUSED_BYTES or (grad and size >= _GRAD_ROWS_ELEMENTS))
    ):
        return "rows"
    return "kernel" if size * 4 <= _FUSED_BYTES else None


_BACK = {torch.bfloat16: torch.Tensor.bfloat16, torch.float16: torch.Tensor.half}
"""The cast of a float32 loss back to each reduced-precision dtype (its bound method: the
cheapest call)."""


def _ignored_rows_bounded(x: Array, labels: Array, ignore_index: int) -> bool:
    """Whether no row whose label is ``ignore_index`` holds ``+inf`` or NaN.

    ATen's backward gives such a row NaN everywhere (its log-softmax is NaN throughout), where
    xent's gradient of an ignored row is ``0 * softmax``: 0 at finite logits, NaN at ``+inf``
    ones, as on every backend. The loss cannot tell (the row adds 0), so calls whose gradient
    autograd records read the ignored rows' max first: one reduction of the labels (their min
    where ``ignore_index`` is negative, their max where not) rules ignored rows out in the usual
    case, and the rows themselves are read only where some are ignored.
    """
    if labels.numel() == 0:
        return True
    if ignore_index < 0 and int(labels.min()) > ignore_index:
        return True
    if ignore_index >= 0 and int(labels.max()) < ignore_index:
        return True
    ignored = labels == ignore_index
    if not bool(ignored.any()):
        return True
    rows = x.detach()
    rows = rows.movedim(1, -1)[ignored] if rows.ndim > 1 else rows[None][ignored[None]]
    return bool((torch.amax(rows, dim=-1) < math.inf).all())


def _plan(
    dtype: Any,
    ndim: int,
    size: int,
    weight: Array | None,
    ignore_index: int,
    smoothing: float,
    reduction: str,
    *,
    exact: bool,
    widen: bool,
) -> Callable[[Array, Array], Array | None] | None:
    """:meth:`Native.fused_index_plan` for inputs of ``dtype``, ``ndim`` and ``size`` and these
    options (``weight`` already in the compute dtype), or None where no route serves them.
    ``exact``: both arrays are plain tensors (ATen's entry is called directly); ``widen``:
    labels of another dtype than int64."""
    forward_route = _route(dtype, ndim, size, grad=False)
    grad_route = _route(dtype, ndim, size, grad=True)
    if forward_route is None or grad_route is None:
        return None
    back = _BACK.get(dtype)
    code = _REDUCTIONS[reduction]
    reduced = reduction != "none"
    options = (ignore_index, smoothing, reduction)

    def plan(input: Array, target: Array) -> Array | None:
        if not input.is_cpu or _functorch_wrapped(target):
            return None
        labels = target.long() if widen else target
        recorded = input.requires_grad and torch.is_grad_enabled()
        if recorded and not _ignored_rows_bounded(input, labels, ignore_index):
            return None
        try:
            if (grad_route if recorded else forward_route) == "kernel":
                # float16/bfloat16 compute in float32 and cast back, as on xent's own path.
                if back is None:
                    logits = input
                elif recorded:
                    logits = input.float()
                else:
                    logits = _work(input.shape, _F32).copy_(input)
                if exact:
                    # ATen's entry itself: no tensor subclass can override it here.
                    loss = _cross_entropy_loss(
                        logits, labels, weight, code, ignore_index, smoothing
                    )
                else:
                    loss = torch.nn.functional.cross_entropy(
                        logits, labels, weight, ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=smoothing,
                    )  # fmt: skip
            elif recorded:
                loss = _FusedRows.apply(input, labels, weight, options)
            else:
                loss, _ = _fused_rows(
                    input, labels, weight, ignore_index, smoothing, reduction, with_grad=False
                )
        except (IndexError, RuntimeError):
            return None
        # Non-finite logits (a +inf, a row of -inf, NaN) or an empty mean: ATen's kernel and
        # xent's row-max shift may disagree between inf and NaN, so such rare calls take the
        # general path. The check reads a scalar (or one row per label) on the host.
        if not (math.isfinite(loss.item()) if reduced else bool(torch.isfinite(loss).all())):
            return None
        return loss if back is None or loss.dtype == dtype else back(loss)

    return plan


class Native(Backend):
    """torch.logsumexp, torch.softmax, in-place scatter, and the analytic autograd.Function."""

    native = True

    def logsumexp(self, x: Array, axis: int) -> tuple[Array, Array]:
        eager = not (x.requires_grad and torch.is_grad_enabled()) and not self.is_traced(x)
        if (
            not eager
            or axis % x.ndim != x.ndim - 1
            or not x.is_contiguous()
            or x.device.type != "cpu"
        ):
            # Autograd and compilers need out-of-place ops (Inductor fuses them anyway); the GPU
            # fuses the reduction in its own kernels.
            shift = torch.amax(x, dim=axis, keepdim=True).detach()
            shift = torch.where(torch.isfinite(shift), shift, 0.0)
            return shift, torch.logsumexp(x - shift, dim=axis, keepdim=True)
        return _chunked_logsumexp(x)

    def softmax_from_lse(
        self,
        x: Array,
        shift: Array,
        log_sum: Array,
        axis: int,
        scale: Array | None = None,
        *,
        overwrite: bool = False,
    ) -> Array:
        if (
            overwrite
            and _owned(x)
            and not self.is_traced(x)
            and x.device.type == "cpu"
            and axis % x.ndim == x.ndim - 1
            and x.is_contiguous()
            and x.shape == torch.broadcast_shapes(x.shape, shift.shape)
        ):
            return _softmax_in_place(x, shift, log_sum, scale)
        # torch.softmax fuses max, exp, sum and divide in one pass per row; the scale then
        # goes in place unless autograd (double backward) or a tracer needs the graph.
        p = torch.softmax(x, dim=axis)
        # A row holding +inf: torch.softmax makes the whole row NaN; xent's answer (every
        # backend's) is exp(x - logsumexp) entry by entry, 0 at finite logits, NaN at +inf.
        overflow = torch.isposinf(log_sum)
        if self.is_traced(x) or x.device.type != "cpu" or bool(overflow.any()):
            p = torch.where(overflow, torch.exp((x - shift) - log_sum), p)
        if scale is None:
            return p
        if _owned(p) and not self.is_traced(p):
            return p.mul_(scale)
        return p * scale

    def fill_rows(self, g: Array, mask: Array, value: float) -> Array:
        if _owned(g) and not self.is_traced(g):
            return g.masked_fill_(mask, value)
        return torch.where(mask, value, g)

    def take_along_axis(self, x: Array, index: Array, axis: int) -> Array:
        return torch.gather(x, axis, index)

    def subtract_at(self, g: Array, index: Array, values: Array, axis: int) -> Array:
        values = torch.broadcast_to(values, index.shape).to(g.dtype)
        if _owned(g):
            return g.scatter_add_(axis, index, -values)
        return g.scatter_add(axis, index, -values)

    def fused_index_loss(self, input: Array, target: Array, options: IndexOptions) -> Array | None:
        if _is_compiling():
            # Dynamo traces a graph of xent's semantics that Inductor fuses as F.cross_entropy's.
            return _compiled_index_loss(input, target, options)
        if self.is_traced(input):
            return None  # vmap, grad and fake tensors: xent's own path
        return super().fused_index_loss(input, target, options)

    def fused_index_plan(
        self, input: Array, target: Array, options: IndexOptions
    ) -> Callable[[Array, Array], Array | None] | None:
        # On the CPU, in (N, C, ...) layout, ATen's kernels have xent's semantics (weighted
        # mean over rows not ignored, smoothing spread over every class) and check every label
        # that is not ``ignore_index`` itself. Their error on a bad label sends the call back to
        # the core, which raises xent's error (or gives the NaN of validate=False). Other
        # devices (a bad label is a device-side assert there) and inputs large enough that the
        # blocked log-sum-exp wins stay on xent's own path. The dtypes, shapes and options are
        # judged here, once; the plan judges each call's device, functorch and autograd state.
        axis, weight, ignore_index, label_smoothing, reduction = options
        ndim, dtype, size = input.ndim, input.dtype, input.numel()
        if (
            dtype not in _FUSED_DTYPES
            or axis != (1 if ndim > 1 else 0)
            or size == 0
            or not _INT64_MIN <= ignore_index <= _INT64_MAX
            # `.long()` would wrap uint64's upper half onto negative labels (-100 included).
            or target.dtype == torch.uint64
        ):
            return None
        if weight is not None:
            if weight.requires_grad and torch.is_grad_enabled():
                return None  # ATen's kernel has no derivative for the class weights
            weight = weight.to(torch.float64 if dtype == torch.float64 else torch.float32)
        return _plan(
            dtype, ndim, size, weight, ignore_index, label_smoothing, reduction,
            exact=type(input) is torch.Tensor and type(target) is torch.Tensor,
            widen=target.dtype != torch.int64,
        )  # fmt: skip

    def custom_grad(
        self, rule: GradRule, state: Any, x: Array, *, others: tuple[Array | None, ...] = ()
    ) -> Array:
        needs_other = any(o is not None and o.requires_grad for o in others)
        if not (x.requires_grad and torch.is_grad_enabled()) or needs_other or self.is_traced(x):
            return rule.forward(state, x)[0]
        return _AnalyticGrad.apply(x, rule, state)

    def scratch(self, shape: tuple[int, ...], dtype: Any, like: Array) -> Array | None:
        if self.is_traced(like):
            return None  # compilers and vmap make their own buffers
        return torch.empty(shape, dtype=dtype, device=like.device)

    def linear_logits(
        self, h: Array, weight: Array, bias: Array | None, dtype: Any, out: Array | None
    ) -> Array:
        # One GEMM into the reused buffer, the bias as its beta=1 addend; where autograd
        # records the product, a new tensor (``out=`` has no derivative).
        recorded = torch.is_grad_enabled() and any(
            a is not None and a.requires_grad for a in (h, weight, bias)
        )
        if out is None or recorded or h.dtype != dtype or weight.dtype != dtype:
            return super().linear_logits(h, weight, bias, dtype, out)
        if bias is None:
            return torch.matmul(h, weight.mT, out=out)
        return torch.addmm(bias.to(dtype), h, weight.mT, out=out)

    def matmul_add(self, acc: Array, a: Array, b: Array) -> Array:
        if _owned(acc) and not self.is_traced(acc):
            return acc.addmm_(a.mT, b)
        return torch.addmm(acc, a.mT, b)

    def linear_custom_grad(
        self,
        rule: Any,
        state: Any,
        hidden: Array,
        weight: Array,
        bias: Array | None,
        *,
        others: tuple[Array | None, ...] = (),
    ) -> Array:
        traced = self.is_traced(hidden)
        return _linear_custom_grad(rule, state, hidden, weight, bias, others=others, traced=traced)


class NativeBackend(Native, Facts):
    """The facts with the native overrides on top."""
