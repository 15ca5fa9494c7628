"""PyTorch: facts about compilation, vmap and devices; native ops and an analytic backward."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._compat import array_namespace
from .._typing import Array
from . import _torch_rows
from ._generic import Backend, BinaryOptions, GradRule, IndexOptions
from ._torch_compiled import index_loss as _compiled_index_loss
from ._torch_dense import BACK as _BACK
from ._torch_dense import REDUCTIONS as _REDUCTIONS
from ._torch_dense import binary_loss as _binary_loss
from ._torch_dense import prob_plan as _prob_plan
from ._torch_linear import linear_custom_grad as _linear_custom_grad
from ._torch_rows import layout as _layout
from ._torch_rows import raise_if_nan as _raise_if_nan
from ._torch_rows import restore as _restore
from ._torch_softmax import fused as _fused_softmax
from ._torch_workspace import work as _work

NAMESPACE = array_namespace(torch.empty(0))
"""array-api-compat's namespace for torch tensors."""


def _owned(g: Array) -> bool:
    """Whether xent's own temporary ``g`` may be written in place (autograd is not recording
    it, nor a functorch transform, whose levels may record what ``requires_grad`` here does not
    show)."""
    return not (g.requires_grad and torch.is_grad_enabled()) and not _transforms_active()


_functorch_wrapped: Callable[[Array], bool] = torch._C._functorch.is_functorch_wrapped_tensor
_transforms_active: Callable[[], bool] = torch._C._are_functorch_transforms_active
"""Whether a functorch transform (``torch.func.grad``, ``vmap``, ...) is running: xent's
``autograd.Function`` classes define no ``setup_context`` (nor a vmap rule), which such
transforms require of every Function called under them, even one given plain tensors only (a
tensor captured from outside the transformed function); xent's differentiable operations serve
there instead."""
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
take the loss by blocks (:func:`._torch_rows.fused_rows`), which never writes a full-size
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

_GRAD_ROWS_ELEMENTS = 2**19
"""float32 inputs of this many elements or more take the blocks of rows where autograd records the
call, whatever :data:`_FUSED_BYTES` says. Autograd's route through ATen allocates three arrays
of the input's size at every call (the log-probabilities it saves, ``nll_loss``'s gradient and
``log_softmax``'s), the blocks one (the gradient); freed and allocated again call after call,
such arrays may be given back to the system by the C allocator and page-fault anew
(:func:`._torch_workspace.work`), which depends on the process's history (glibc raises its
thresholds after a large free). In fresh processes, forward+backward at 16 x 50257,
1000 x 1000 and 64 x 50257, the blocks took 0.46x, 0.35x and 0.62x of ``F.cross_entropy``'s
time, where ATen's route took as long as ``F.cross_entropy`` or twice as long, by the page
faults that landed on it. Where no fault lands (a process that has freed a large array
before), the blocks' fixed cost (a Python ``autograd.Function``) shows below this size:
interleaved in one such process, medians of eleven rounds, forward+backward at 2^17 to 2^18
elements (4096 x 32, 1024 x 128, 4096 x 64, 8 x 32000), the blocks took 1.08x-1.15x of
``F.cross_entropy``'s time and ATen's route 1.01x-1.05x; from 2^19 (2048 x 256, 30000 x 33,
1000 x 1000, 8192 x 100) the blocks 0.97x-1.04x."""

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
"""The range of ``ignore_index`` that ATen's kernel takes."""

_cross_entropy_loss: Any = torch._C._nn.cross_entropy_loss
_nll_loss_nd: Any = torch._C._nn.nll_loss_nd


def _route(dtype: Any, ndim: int, size: int, *, grad: bool) -> str | None:
    """How :meth:`Native.fused_index_loss` computes an input: ``"kernel"`` (ATen's
    ``cross_entropy_loss`` once, float16/bfloat16 cast to float32 whole), ``"rows"``
    (:func:`._torch_rows.fused_rows`, where the layout allows) or None (xent's own path);
    ``grad``: autograd records the call."""
    if dtype in _HALF_DTYPES:
        if ndim >= 2 and size >= (_HALF_ROWS_ELEMENTS // 4 if grad else _HALF_ROWS_ELEMENTS):
            return "rows"
    elif (
        ndim >= 2
        and dtype == torch.float32
        and (size * 4 > _FUSED_BYTES or (grad and size >= _GRAD_ROWS_ELEMENTS))
    ):
        return "rows"
    return "kernel" if size * 4 <= _FUSED_BYTES else None


_BOUND_ELEMENTS = 2**16
"""Inputs of at most this many elements are read whole for an ignored row's +inf or NaN (one
reduction, a few microseconds); larger ones read only the ignored rows (a mask, a copy of
those rows and their max: eight small operations, cheaper than a pass over the whole input)."""


def _ignored_rows_bounded(x: Array, labels: Array, ignore_index: int) -> bool:
    """Whether no row whose label is ``ignore_index`` holds ``+inf`` or NaN.

    ATen's backward gives such a row NaN everywhere (its log-softmax is NaN throughout), where
    xent's gradient of an ignored row is ``0 * softmax``: 0 at finite logits, NaN at ``+inf``
    ones, as on every backend. The loss cannot tell (the row adds 0), and ATen's entry with
    label smoothing keeps its log-probabilities to itself (elsewhere they are read after the
    forward, see :func:`._torch_rows.raise_if_nan`), so such calls, where :func:`_some_ignored` found
    that some row may be ignored, read the ignored rows' max first: an input of at most
    ``_BOUND_ELEMENTS`` whole, in one reduction (no +inf or NaN anywhere, the usual case, rules
    them out), and only the rows that are ignored otherwise.
    """
    if x.numel() <= _BOUND_ELEMENTS and torch.amax(x.detach()).item() < math.inf:
        return True
    ignored = labels == ignore_index
    if not bool(ignored.any()):
        return True
    rows = x.detach()
    rows = rows.movedim(1, -1)[ignored] if rows.ndim > 1 else rows[None][ignored[None]]
    return bool((torch.amax(rows, dim=-1) < math.inf).all())


def _some_ignored(labels: Array, ignore_index: int) -> bool:
    """Whether some label may be ``ignore_index``: one reduction of the labels (their min where
    ``ignore_index`` is negative, their max where not), which rules ignored rows out in the
    usual case."""
    if labels.numel() == 0:
        return False
    if ignore_index < 0:
        return int(labels.min()) <= ignore_index
    return int(labels.max()) >= ignore_index


def _plan(
    dtype: Any,
    ndim: int,
    size: int,
    axis: int,
    ignore_index: int,
    smoothing: float,
    reduction: str,
    *,
    exact: bool,
    widen: bool,
) -> Callable[[Array, Array, Array | None], Array | None] | None:
    """:meth:`Native.fused_index_plan` for inputs of ``dtype``, ``ndim`` and ``size``, the class
    axis ``axis`` and these options, or None where no route serves them. ``exact``: both arrays
    are plain tensors (ATen's entry is called directly); ``widen``: labels of another dtype than
    int64."""
    forward_route = _route(dtype, ndim, size, grad=False)
    grad_route = _route(dtype, ndim, size, grad=True)
    if forward_route is None or grad_route is None:
        return None
    back = _BACK.get(dtype)
    code = _REDUCTIONS[reduction]
    reduced = reduction != "none"
    options = (ignore_index, smoothing, reduction)
    fits = size * 4 <= _FUSED_BYTES
    compute = torch.float64 if dtype == torch.float64 else _F32

    def plan(input: Array, target: Array, weight: Array | None) -> Array | None:
        if not input.is_cpu or _functorch_wrapped(target):
            return None
        if weight is not None:
            if (weight.requires_grad and torch.is_grad_enabled()) or _functorch_wrapped(weight):
                return None  # ATen's kernel has no derivative for the class weights
            weight = weight.to(compute)
        labels = target.long() if widen else target
        recorded = input.requires_grad and torch.is_grad_enabled()
        route = grad_route if recorded else forward_route
        if recorded and route == "rows" and _transforms_active():
            return None  # the blocks' autograd.Function: not under functorch transforms
        # ATen's entry takes the classes at axis 1 (or 0 of a single row) in any layout; the
        # blocks, and a class axis elsewhere, take a view of rows or slabs with the classes at
        # 1 (see _torch_rows.layout), or where there is none, the class axis moved to 1.
        if axis == (ndim > 1) and route == "kernel":
            view: tuple[Array, Array, Any] | None = (input, labels, None)
        else:
            view = _layout(input, labels, axis)
        if view is None:
            if not fits:
                return None
            route = "kernel"
            view = (input.movedim(axis, 1), labels, None)
        x, y, order = view
        # Where autograd records the call and some row may be ignored, an ignored row whose
        # logits hold +inf or NaN must go back to xent's path (see _torch_rows.raise_if_nan): the
        # log-probabilities tell, read after the forward; with smoothing on ATen's entry, which
        # keeps them to itself, the ignored rows' logits are read first.
        guard = recorded and _some_ignored(y, ignore_index)
        if guard and route == "kernel" and smoothing:
            guard = False
            if not _ignored_rows_bounded(x, y, ignore_index):
                return None
        try:
            if route == "kernel":
                # float16/bfloat16 compute in float32 and cast back, as on xent's own path.
                if back is None:
                    logits = x
                elif recorded:
                    logits = x.float()
                else:
                    logits = _work(tuple(x.shape), _F32).copy_(x)
                if guard:
                    # ATen's entry is these two calls (without smoothing).
                    lp = torch.log_softmax(logits, 1 if logits.ndim > 1 else 0)
                    if exact:
                        loss = _nll_loss_nd(lp, y, weight, code, ignore_index)
                    else:
                        loss = torch.nn.functional.nll_loss(
                            lp, y, weight, ignore_index=ignore_index, reduction=reduction
                        )
                    _raise_if_nan(lp)  # raises Unbounded, a RuntimeError: declined below
                elif exact:
                    # ATen's entry itself: no tensor subclass can override it here.
                    loss = _cross_entropy_loss(logits, y, weight, code, ignore_index, smoothing)
                else:
                    loss = torch.nn.functional.cross_entropy(
                        logits, y, weight, ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=smoothing,
                    )  # fmt: skip
            elif recorded:
                loss = _torch_rows.apply(x, y, weight, (*options, guard))
            else:
                loss, _ = _torch_rows.fused_rows(
                    x, y, weight, ignore_index, smoothing, reduction, with_grad=False
                )
        except (IndexError, RuntimeError):
            return None
        # Non-finite logits (a +inf, a row of -inf, NaN) or an empty mean: ATen's kernel and
        # xent's row-max shift may disagree between inf and NaN, so such rare calls take the
        # general path. The check reads one scalar on the host (per-position losses: their
        # sum, which is finite only where each of them is, or overflows, which declines too).
        if not math.isfinite((loss if reduced else loss.sum()).item()):
            return None
        if not reduced and (order is not None or x is not input):
            loss = _restore(loss, tuple(target.shape), order)
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
    ) -> Callable[[Array, Array, Array | None], Array | None] | None:
        # On the CPU, with the class axis anywhere (each call views the input with it at 1:
        # rows or slabs, see _torch_rows.layout), ATen's kernels have xent's semantics
        # (weighted mean over rows not ignored, smoothing spread over every class) and check
        # every label that is not ``ignore_index`` itself. Their error on a bad label sends
        # the call back to the core, which raises xent's error (or gives the NaN of
        # validate=False). Other devices (a bad label is a device-side assert there) and
        # float64 inputs too large for one call of ATen's entry stay on xent's own path. The
        # dtypes, shapes and options are judged here, once; the plan judges each call's
        # device, layout, functorch and autograd state.
        axis, _, ignore_index, label_smoothing, reduction = options
        ndim, dtype, size = input.ndim, input.dtype, input.numel()
        if (
            dtype not in _FUSED_DTYPES
            or size == 0
            or not _INT64_MIN <= ignore_index <= _INT64_MAX
            # `.long()` would wrap uint64's upper half onto negative labels (-100 included).
            or target.dtype == torch.uint64
        ):
            return None
        return _plan(
            dtype, ndim, size, axis, ignore_index, label_smoothing, reduction,
            exact=type(input) is torch.Tensor and type(target) is torch.Tensor,
            widen=target.dtype != torch.int64,
        )  # fmt: skip

    def fused_prob_loss(self, input: Array, target: Array, options: IndexOptions) -> Array | None:
        if self.is_traced(input):
            return None  # compilers, vmap, grad and fake tensors: xent's own path
        return super().fused_prob_loss(input, target, options)

    def fused_prob_plan(
        self, input: Array, target: Array, options: IndexOptions
    ) -> Callable[[Array, Array, Array | None], Array | None] | None:
        if input.numel() == 0:
            return None
        return _prob_plan(
            input.dtype, input.ndim, options.axis, options.label_smoothing, options.reduction,
            exact=type(input) is torch.Tensor and type(target) is torch.Tensor,
        )  # fmt: skip

    def fused_binary_loss(
        self, input: Array, target: Array, options: BinaryOptions
    ) -> Array | None:
        if self.is_traced(input):
            return None
        return _binary_loss(input, target, options)

    def fused_softmax(self, kind: str, x: Array, axis: int) -> Array | None:
        if self.is_traced(x):
            return None
        return _fused_softmax(kind, x, axis)

    def custom_grad(
        self, rule: GradRule, state: Any, x: Array, *, others: tuple[Array | None, ...] = ()
    ) -> Array:
        needs_other = any(o is not None and o.requires_grad for o in others)
        if (
            not (x.requires_grad and torch.is_grad_enabled())
            or needs_other
            or self.is_traced(x)
            or _transforms_active()
        ):
            return rule.forward(state, x)[0]
        return _AnalyticGrad.apply(x, rule, state)

    def scratch(self, shape: tuple[int, ...], dtype: Any, like: Array) -> Array | None:
        if self.is_traced(like) or _transforms_active():
            return None  # compilers and functorch transforms make their own buffers
        return torch.empty(shape, dtype=dtype, device=like.device)

    def linear_logits(
        self, h: Array, weight: Array, bias: Array | None, dtype: Any, out: Array | None
    ) -> Array:
        # One GEMM, the bias as its beta=1 addend: into the reused buffer, or where autograd
        # records the product or a transform runs, a new tensor (``out=`` has no derivative).
        if h.dtype != dtype or weight.dtype != dtype:
            return super().linear_logits(h, weight, bias, dtype, out)
        if out is not None and (
            _transforms_active()
            or (
                torch.is_grad_enabled()
                and any(a is not None and a.requires_grad for a in (h, weight, bias))
            )
        ):
            out = None
        if bias is None:
            return torch.matmul(h, weight.mT, out=out)
        return torch.addmm(bias if bias.dtype == dtype else bias.to(dtype), h, weight.mT, out=out)

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
        traced = self.is_traced(hidden) or _transforms_active()
        return _linear_custom_grad(rule, state, hidden, weight, bias, others=others, traced=traced)


class NativeBackend(Native, Facts):
    """The facts with the native overrides on top."""
