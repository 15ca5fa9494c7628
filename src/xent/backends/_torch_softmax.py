"""PyTorch: the softmax family (``logsumexp``, ``log_softmax``, ``softmax``) through ATen's own
kernels on the CPU.

ATen's ``log_softmax`` and ``softmax`` give xent's answer on every row whose max is finite; a
row that holds ``+inf`` or NaN, or is all ``-inf``, comes out NaN throughout (its max enters
every entry), where xent's general path keeps ``-inf`` (or 0) at the finite entries of a row
with ``+inf``. So the first class of each row tells: one NaN there sends the call back to the
general path (a read of one entry per row, where a sum of the output cost a fifth of the
kernel's time). ``torch.logsumexp`` shifts by a row max that is 0 where not finite, as xent
does, so it needs no check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._typing import Array
from ._torch_dense import _as
from ._torch_workspace import work as _work

try:
    import numpy as np
except ImportError:  # PyTorch runs without NumPy
    np = None  # type: ignore[assignment]

_F32, _F64 = torch.float32, torch.float64
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_OPS: dict[str, Any] = {"log_softmax": torch.log_softmax, "softmax": torch.softmax}
_transforms_active: Callable[[], bool] = torch._C._are_functorch_transforms_active

LOGSUMEXP_ELEMENTS = 2**16
"""``logsumexp`` of at most this many elements, or where autograd records the call, calls
``torch.logsumexp`` (one call and ATen's backward, where xent's general path makes a dozen
differentiable operations: 1.2x-2.8x forward+backward at 512 x 1000 and 2048 x 8192); larger
inputs without a gradient take xent's blocks of ATen's ``log_softmax``, which read the input
once where ``torch.logsumexp`` makes four passes and a temporary (0.25x-0.6x of its time at
512 x 1000 and 2048 x 8192)."""

BLOCKS_FROM = 2**16
"""float16/bfloat16 ``log_softmax`` and ``softmax`` of at least this many elements (classes
last, contiguous, no gradient recorded) run ATen's float32 kernel a block of rows at a time,
each block cast to float32 in the kept buffer and the result cast back into the output (no
float32 array of the input's size); float32 and float64, and smaller inputs, call it once on
the whole input."""

BLOCK_ELEMENTS = 2**20
"""Elements per block (4 MiB in float32)."""


def fused(kind: str, x: Array, axis: int) -> Array | None:
    """:meth:`~xent.backends.Backend.fused_softmax` on the CPU, or None."""
    if (
        not x.is_cpu
        or x.dtype not in _DTYPES
        or x.numel() == 0
        or type(x) is not torch.Tensor
        or _transforms_active()
    ):
        return None
    compute = _F64 if x.dtype is _F64 else _F32
    if kind == "logsumexp":
        if x.numel() > LOGSUMEXP_ELEMENTS and not (x.requires_grad and torch.is_grad_enabled()):
            return None
        return _as(torch.logsumexp(_as(x, compute), axis, keepdim=True), x.dtype)
    op = _OPS[kind]
    recorded = x.requires_grad and torch.is_grad_enabled()
    if (
        recorded
        or x.dtype is compute
        or x.numel() < BLOCKS_FROM
        or axis != x.ndim - 1
        or not x.is_contiguous()
    ):
        out = op(_as(x, compute), axis)
        if bad_rows(out.detach(), axis):
            return None
        return _as(out, x.dtype)
    return _blocks(op, x)


def bad_rows(out: Array, axis: int) -> bool:
    """Whether a row of ATen's (log-)softmax ``out`` (a CPU tensor, not recorded by autograd;
    classes along ``axis``) is NaN (then all of it is): the sum of its first classes is NaN
    (log-probabilities are never ``+inf``, probabilities at most 1). Read through NumPy: two
    calls of a microsecond, where ATen's ``isnan`` and ``any`` after the kernel took 3-20 us,
    and its strided ``sum`` of the first class 5.6 us at 4096 x 64."""
    if np is None or out.dtype not in (_F32, _F64):  # PyTorch without NumPy; bfloat16
        return bool(torch.isnan(out.select(axis, 0)).any())
    first = out.numpy()[(slice(None),) * axis + (0,)]
    total = np.add.reduce(first, axis=None)
    return bool(total != total)


def _blocks(op: Any, x: Array) -> Array | None:
    c = x.shape[-1]
    rows = x.view(-1, c)
    out = torch.empty(x.shape, dtype=x.dtype)
    out_rows = out.view(-1, c)
    n = rows.shape[0]
    step = max(1, BLOCK_ELEMENTS // c)
    for s in range(0, n, step):
        e = min(s + step, n)
        shape = (e - s, c)
        stage = _work(shape, _F32).copy_(rows[s:e])
        block = op(stage, 1, out=_work(shape, _F32, step * c * 4))
        if bad_rows(block, 1):
            return None  # the general path answers for the whole input
        out_rows[s:e].copy_(block)
    return out
