"""NumPy: ``log_softmax`` and ``softmax`` in one blocked pass.

Each block of rows is read once: its max, the shifted logits written into the output, their
``exp`` and sum, then the log subtracted (``log_softmax``) or the sum divided out
(``softmax``), all while the block is in cache; one ``exp`` per element, where the general path
takes the log-sum-exp first and then the output (two). The shift is the row max, 0 where it is
not finite, as on the general path, so every row comes out as there.
"""

from __future__ import annotations

import numpy as np

from .._typing import Array
from . import _numpy

BLOCK_ELEMENTS = 2**16
"""Elements per block (256 KiB of float32: with the output block and one scratch buffer, in
the core's cache)."""


def fused(kind: str, x: Array, axis: int) -> Array | None:
    """:meth:`~xent.backends.Backend.fused_softmax` for C-contiguous arrays with the classes
    last (``log_softmax`` and ``softmax``; xent's blocked log-sum-exp already serves
    ``logsumexp``), or None."""
    x = np.asarray(x)
    if (
        kind == "logsumexp"
        or x.dtype not in _numpy._FUSED_DTYPES
        or x.size == 0
        or axis != x.ndim - 1
        or not x.flags.c_contiguous
    ):
        return None
    ct = _numpy._compute_dtype(x.dtype)
    c = x.shape[-1]
    rows = x.reshape(-1, c)
    n = rows.shape[0]
    out = _numpy._fresh(x.shape, x.dtype)
    out_rows = out.reshape(-1, c)
    step = max(1, BLOCK_ELEMENTS // c)
    cast = ct != x.dtype
    log = kind == "log_softmax"

    def work(lo: int, hi: int) -> None:
        k0 = min(step, hi - lo)
        stage = np.empty((k0, c), ct) if cast else None
        result = np.empty((k0, c), ct) if cast else None
        e = np.empty((k0, c), ct) if log else None
        peak, total = np.empty((k0, 1), ct), np.empty((k0, 1), ct)
        for start in range(lo, hi, step):
            block = slice(start, min(start + step, hi))
            k = block.stop - block.start
            xb = rows[block]
            if stage is not None:
                np.copyto(stage[:k], xb)
                xb = stage[:k]
            ob = out_rows[block] if result is None else result[:k]
            m, s = peak[:k], total[:k]
            _numpy.row_shift(xb, m)
            np.subtract(xb, m, out=ob)
            if e is not None:
                eb = e[:k]
                np.exp(ob, out=eb)
                np.add.reduce(eb, axis=1, keepdims=True, out=s)
                np.log(s, out=s)
                ob -= s
            else:
                np.exp(ob, out=ob)
                np.add.reduce(ob, axis=1, keepdims=True, out=s)
                ob /= s
            if result is not None:
                out_rows[block] = ob

    with np.errstate(all="ignore"):
        _numpy._in_parallel(work, n, x.nbytes * 3)
    return out
