"""PyTorch: facts about compilation, vmap and devices; native ops and an analytic backward."""

from __future__ import annotations

import math
from typing import Any

import torch

from .._compat import array_namespace
from .._typing import Array
from ._generic import Backend, GradRule
from ._torch_linear import linear_custom_grad as _linear_custom_grad

NAMESPACE = array_namespace(torch.empty(0))
"""array-api-compat's namespace for torch tensors."""


def _owned(g: Array) -> bool:
    """Whether xent's own temporary ``g`` may be written in place (autograd is not recording)."""
    return not (g.requires_grad and torch.is_grad_enabled())


def _functorch_wrapped(x: Array) -> bool:
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


class Facts(Backend):
    """Values are unreadable while Dynamo/FX traces or functorch (vmap, grad) wraps them."""

    name = "torch"

    def is_traced(self, x: Array) -> bool:
        return bool(
            torch.compiler.is_compiling()
            or _functorch_wrapped(x)
            or isinstance(x, torch._subclasses.FakeTensor)
        )

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


_BLOCK_BYTES = 2**20
"""Rows are taken in blocks of about this many bytes, so each block's temporary stays in cache."""

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
    scratch = rows.new_empty((min(step, n), c))
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


_OWN_DTYPES = (torch.float32, torch.float64)
_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_FUSED_BYTES = 16 * 2**20
"""Inputs up to this size take ``F.cross_entropy``; larger ones the blocked log-sum-exp, which
never writes a full-size temporary."""


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
"""The range of ``ignore_index`` that ATen's kernel takes."""


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

    def fused_index_loss(
        self,
        input: Array,
        target: Array,
        *,
        axis: int,
        weight: Array | None,
        ignore_index: int,
        label_smoothing: float,
        reduction: str,
    ) -> Array | None:
        # On the CPU, in (N, C, ...) layout, ``F.cross_entropy`` has xent's
        # semantics (weighted mean over rows not ignored, smoothing spread over every class)
        # and checks every label that is not ``ignore_index`` itself. Its error on a bad label
        # sends the call back to the core, which raises xent's error (or gives the NaN of
        # validate=False). Traced arrays, other devices (a bad label is a device-side assert
        # there), and inputs large enough that its full-size log_softmax output costs more
        # than the blocked log-sum-exp stay on xent's own path.
        if (
            input.device.type != "cpu"
            or input.dtype not in _FUSED_DTYPES
            or axis != min(1, input.ndim - 1)
            or not 0 < input.numel() * 4 <= _FUSED_BYTES
            or type(ignore_index) is not int
            or not _INT64_MIN <= ignore_index <= _INT64_MAX
            # `.long()` would wrap uint64's upper half onto negative labels (-100 included).
            or target.dtype == torch.uint64
            or self.is_traced(input)
            or self.is_traced(target)
        ):
            return None
        # float16/bfloat16 compute in float32 and cast back, as on xent's own path.
        logits = input if input.dtype in _OWN_DTYPES else input.float()
        if weight is not None:
            if weight.requires_grad and torch.is_grad_enabled():
                return None  # ATen's kernel has no derivative for the class weights
            weight = weight.to(logits.dtype)
        try:
            loss = torch.nn.functional.cross_entropy(
                logits, target.long(), weight, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=label_smoothing,
            )  # fmt: skip
        except (IndexError, RuntimeError):
            return None
        # Non-finite logits (a +inf, a row of -inf, NaN) or an empty mean: ATen's kernel and
        # xent's row-max shift may disagree between inf and NaN, so such rare calls take the
        # general path. The check reads a scalar (or one row per label) on the host.
        finite = math.isfinite(loss.item()) if loss.ndim == 0 else bool(torch.isfinite(loss).all())
        if not finite:
            return None
        return loss if loss.dtype == input.dtype else loss.to(input.dtype)

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
