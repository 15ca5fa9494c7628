"""Linear cross-entropy in chunks of the vocabulary as well as of the rows.

When even a block of a few rows of the ``(N, V)`` logits is over the memory budget (a vocabulary
of millions of classes), each block of rows is also cut along the vocabulary. The chunks are the
slices of classes that vocab-parallel workers hold (:mod:`._parallel`), visited one after the
other instead of side by side: the all-reduces of the row max and of the per-row sums become an
online log-sum-exp (a running max, the sums rescaled as it grows), and each chunk's gradient is
the vocab-parallel gradient of its slice. Probability targets add two per-row sums of their own.

Two sweeps. The first makes each block's statistics over all chunks (one product per block and
chunk) and its losses. The second visits the chunks again, each over every block: it makes the
logits once more, forms their gradient from the block's statistics, and folds it into
``d hidden`` (summed over chunks), ``d weight`` and ``d bias`` (that chunk's rows, summed over
blocks). Extra memory: a block x chunk of logits and its gradient, ``O(N)`` statistics, plus the
gradients (and for a moment one more ``d weight`` where the backend's loop stacks the chunks').
"""

from __future__ import annotations

import math
from typing import Any

from . import _cross_entropy, _linear, _parallel
from ._typing import Array, Namespace
from .backends import scaled_gap

_LEAST_ROWS = 16
"""The fewest rows a block has when ``chunk_size`` is None before the vocabulary is split."""

_NO_GROUP = _parallel.Collectives()
"""The chunks of one block are combined here, so the slice problems never communicate."""

_Grads = tuple[Array | None, Array | None, Array | None]


def _split(
    rows: int, classes: int, itemsize: int, chunk_size: int | None, budget: int
) -> tuple[int, int]:
    """``(rows per block, classes per chunk)`` for a block of logits of at most ``budget``
    bytes.

    The least block is ``chunk_size`` rows, or 16 (fewer rows: all of them) when it is None.
    While that block of all ``V`` classes fits, the vocabulary stays whole and ``chunk_size``
    None takes the largest power of two of rows that fits. Beyond, the vocabulary is cut: a
    block has ``chunk_size`` rows, or when None the largest power of two at most the square
    root of the budget's element count (2048 in float32 for 16 MiB; at least 16, at most N),
    and a chunk the largest power of two of classes that fits beside them (at least 1). Powers
    of two usually divide the batch and the vocabulary, so under ``jax.jit`` no short first
    block or chunk is traced beside the scanned ones.
    """
    least = chunk_size or min(_LEAST_ROWS, max(rows, 1))
    if rows == 0 or least * classes * itemsize <= budget:
        chunk = chunk_size or _power_of_two(budget // (classes * itemsize))
        return min(chunk, max(rows, 1)), classes
    # A square block reads each row of hidden and of weight the fewest times per element of
    # logits, so the products are bound by arithmetic rather than by memory.
    square = _power_of_two(math.isqrt(budget // itemsize))
    chunk = min(chunk_size or max(least, square), rows)
    return chunk, _power_of_two(budget // (chunk * itemsize))


def _power_of_two(n: int) -> int:
    """The largest power of two at most ``n`` (1 when ``n`` is below 1)."""
    return 1 << max(0, n.bit_length() - 1)


def _run(
    p: _linear._Plan,
    hidden: Array,
    weight: Array,
    bias: Array | None,
    cotangent: Array | None,
    need: tuple[bool, bool, bool],
) -> tuple[Array, _Grads]:
    """:func:`xent._linear._run` for a plan whose ``vocab_chunk`` splits the classes."""
    xp = p.xp
    h = xp.reshape(hidden, (p.rows, int(hidden.shape[-1])))
    rows = _row_facts(p)
    losses, stats = _statistics(p, h, weight, bias, rows)
    loss = _linear._reduce(p, [losses], xp.sum(losses))
    if not any(need):
        return loss, (None, None, None)
    r = xp.broadcast_to(_linear._row_cotangent(p, cotangent), (p.rows,))
    dh, dw, db = _gradients(p, h, weight, bias, rows, stats, r, need)
    dhs = [] if dh is None else [xp.astype(dh, hidden.dtype, copy=False)]
    return loss, _linear._finish(p, hidden, weight, bias, need, dhs, dw, db)


# --------------------------------------------------------------------------- the two sweeps
def _statistics(
    p: _linear._Plan, h: Array, weight: Array, bias: Array | None, rows: tuple[Array | None, ...]
) -> tuple[Array, list[Array]]:
    """Every row's loss ``(N,)`` and statistics (``(N, 1)`` each: the shift, then the sums of
    :func:`_chunk_sums` over all classes)."""
    xp, ops = p.xp, p.ops
    total = _weight_total(p)

    def block_step(carry: Any, block: tuple[Any, ...]) -> tuple[Any, ...]:
        h_b, facts = block[0], tuple(block[1:])
        n = int(h_b.shape[0])
        q_all = facts[-1]

        def chunk_step(run: Any, chunk: tuple[Any, ...]) -> tuple[Any, ...]:
            peak, sums, seen = run
            w_c, b_c, cw_c, cls_c = chunk[:4]
            q_c = None if q_all is None else xp.matrix_transpose(chunk[4])
            x = _chunk_logits(p, h_b, w_c, b_c)
            new_peak = xp.maximum(peak, xp.max(x, axis=1, keepdims=True))
            shift = _parallel._shift(xp, new_peak)
            part, mass = _chunk_sums(p, x, shift, (*facts[:-1], q_c), cw_c, cls_c)
            sums = _merge(xp, sums, part, seen, _parallel._shift(xp, peak), shift, _gaps(p))
            return (new_peak, sums, seen + mass), ()

        zero = xp.zeros((n, 1), dtype=p.dtype, device=ops.device(h_b))
        start = (xp.full_like(zero, -math.inf), [zero] * _sum_count(p), zero)
        classes = (
            *_class_facts(p, weight, bias),
            None if q_all is None else xp.matrix_transpose(q_all),
        )
        (peak, sums, _), _ = _linear._scan_blocks(
            ops, chunk_step, start, classes, p.classes, p.vocab_chunk
        )
        shift = _parallel._shift(xp, peak)
        losses = _row_losses(p, shift, sums, total, facts)
        return carry, (xp.reshape(losses, (n,)), shift, *sums)

    _, parts = _linear._scan_blocks(ops, block_step, (), (h, *rows), p.rows, p.chunk)
    joined = [xp.concat([part[k] for part in parts]) for k in range(len(parts[0]))]
    return joined[0], joined[1:]


def _gradients(
    p: _linear._Plan,
    h: Array,
    weight: Array,
    bias: Array | None,
    rows: tuple[Array | None, ...],
    stats: list[Array],
    r: Array,
    need: tuple[bool, bool, bool],
) -> tuple[Array | None, Array | None, Array | None]:
    """``d hidden`` (compute dtype), ``d weight`` and ``d bias`` of ``sum(r * loss)``."""
    xp, ops = p.xp, p.ops
    dev = ops.device(h)
    total = _weight_total(p)
    q_all = rows[-1]
    after = 1 + len(stats)  # a block: its rows of h, the statistics, the row facts, r

    def chunk_step(dh: Any, chunk: tuple[Any, ...]) -> tuple[Any, ...]:
        w_c, b_c, cw_c, cls_c = chunk[:4]
        size = int(w_c.shape[0])

        def block_step(carry: Any, block: tuple[Any, ...]) -> tuple[Any, ...]:
            dw_c, db_c = carry
            h_b, shift, sums = block[0], block[1], list(block[2:after])
            facts, r_b = block[after:-1], block[-1]
            x = _chunk_logits(p, h_b, w_c, b_c)
            g = _chunk_grad(p, x, shift, sums, total, facts, cw_c, cls_c, r_b)
            dh_b = None
            if need[0]:
                dh_b = _linear._d_hidden(xp, g, w_c, p.dtype)
            if need[1]:
                dw_c = ops.matmul_add(dw_c, g, xp.astype(h_b, p.dtype, copy=False))
            if need[2]:
                db_c = db_c + xp.sum(g, axis=0)
            return (dw_c, db_c), (dh_b,)

        start = (
            xp.zeros((size, int(h.shape[1])), dtype=p.dtype, device=dev) if need[1] else None,
            xp.zeros((size,), dtype=p.dtype, device=dev) if need[2] else None,
        )
        q_c = None if q_all is None else xp.matrix_transpose(chunk[4])
        blocks = (h, *stats, *rows[:-1], q_c, r)
        (dw_c, db_c), parts = _linear._scan_blocks(ops, block_step, start, blocks, p.rows, p.chunk)
        if need[0]:
            dh = dh + xp.concat([part[0] for part in parts])
        return dh, (dw_c, db_c)

    dh = xp.zeros(tuple(h.shape), dtype=p.dtype, device=dev) if need[0] else None
    classes = (
        *_class_facts(p, weight, bias),
        None if q_all is None else xp.matrix_transpose(q_all),
    )
    dh, parts = _linear._scan_blocks(ops, chunk_step, dh, classes, p.classes, p.vocab_chunk)
    dw = xp.concat([part[0] for part in parts]) if need[1] else None
    db = xp.concat([part[1] for part in parts]) if need[2] else None
    return dh, dw, db


# --------------------------------------------------------------------------- one chunk
def _chunk_logits(p: _linear._Plan, h: Array, w: Array, b: Array | None) -> Array:
    """One block x chunk of logits in the compute dtype, capped when ``softcap`` is set."""
    x = _linear._logits(p.xp, p.dtype, h, w, b)
    return x if p.softcap is None else _cross_entropy._cap(p.xp, x, p.softcap)


def _chunk_sums(
    p: _linear._Plan,
    x: Array,
    shift: Array,
    facts: tuple[Array | None, ...],
    cw: Array | None,
    cls: Array,
) -> tuple[list[Array], Array | float]:
    """The chunk's per-row sums relative to ``shift``, and the weight it adds to the gaps.

    Class indices: the vocab-parallel slice's sums (of ``exp(x - shift)``, the target logit,
    its class weight, the weighted gaps ``shift - x`` for smoothing) and the chunk's class
    weight. Probabilities ``q``: the sums of ``exp(x - shift)``, of the target mass
    ``m = w q`` and of ``m (shift - x)`` (0 where ``q`` is 0, even at ``x = -inf``), and the
    mass.
    """
    xp = p.xp
    q = facts[-1]
    if q is None:
        bp = _slice_problem(p, facts, cw, cls, int(x.shape[1]))
        weight: Array | float = float(x.shape[1]) if cw is None else xp.sum(cw)
        # The gaps' sum is the smoothing's share (scaled by e / C): so is the weight that
        # moves it when the shift does.
        return _parallel._sums(bp, x, shift), (p.smoothing / p.classes) * weight
    m = _mass(p, q, cw)
    gap = shift - x
    terms = m * xp.where((q == 0) & xp.isinf(gap), xp.zeros_like(gap), gap)
    mass = xp.sum(m, axis=1, keepdims=True)
    exp = p.ops.class_sum(lambda x, s: xp.exp(x - s), (x, shift), 1)
    return [exp, mass, xp.sum(terms, axis=1, keepdims=True)], mass


def _merge(
    xp: Namespace,
    sums: list[Array],
    part: list[Array],
    seen: Array,
    old: Array,
    shift: Array,
    gaps: bool,
) -> list[Array]:
    """The running sums (relative to ``old``) with a chunk's (relative to ``shift``) added.

    The sum of exponentials is rescaled by ``exp(old - shift)`` (``shift`` only grows while the
    max is finite; the clamp keeps a row that was all ``-inf`` at 0), the sum of gaps moves by
    the weight ``seen`` so far times ``shift - old``; the rest add up.
    """
    merged = [sums[0] * xp.exp(xp.minimum(old - shift, xp.zeros_like(shift))) + part[0]]
    merged += [a + b for a, b in zip(sums[1:], part[1:], strict=True)]
    if gaps:
        merged[-1] = merged[-1] + scaled_gap(shift, old, seen)
    return merged


def _row_losses(
    p: _linear._Plan,
    shift: Array,
    sums: list[Array],
    total: Array | float,
    facts: tuple[Array | None, ...],
) -> Array:
    """Each row's loss (class axis of size 1, times its sample weight) from its sums."""
    xp = p.xp
    if facts[-1] is None:
        bp = _slice_problem(p, facts, p.class_weight, None, p.classes)
        return _parallel._rows(bp, _parallel._from_sums(bp, shift, sums, total))
    exp, mass, spread = sums
    log_sum = xp.log(exp)
    rows = spread + mass * log_sum
    if p.z_loss:
        lse = shift + log_sum
        rows = rows + p.z_loss * lse * lse
    sample = facts[0]
    return rows if sample is None else rows * sample


def _chunk_grad(
    p: _linear._Plan,
    x: Array,
    shift: Array,
    sums: list[Array],
    total: Array | float,
    facts: tuple[Array | None, ...],
    cw: Array | None,
    cls: Array,
    r: Array,
) -> Array:
    """``d (r . loss) / d logits`` of one block x chunk, chained through ``softcap``."""
    xp = p.xp
    q = facts[-1]
    if q is None:
        bp = _slice_problem(p, facts, cw, cls, int(x.shape[1]))
        g = _parallel._backward(bp, x, (x, _parallel._from_sums(bp, shift, sums, total)), r)
    else:
        exp, mass, _ = sums
        log_sum = xp.log(exp)
        r = xp.reshape(r, (-1, 1))
        sample = facts[0]
        r = r if sample is None else r * sample
        scale = r * mass
        if p.z_loss:
            scale = scale + (2.0 * p.z_loss) * r * (shift + log_sum)
        m = _mass(p, q, cw)
        # Not the backend's softmax_from_lse, which may take the statistics of x's own rows.
        g = xp.exp((x - shift) - log_sum) * scale - r * m
    if p.softcap is not None:
        t = x * (1.0 / p.softcap)  # tanh(logits / softcap)
        g = g * (1.0 - t * t)
    return g


# --------------------------------------------------------------------------- preparation
def _row_facts(p: _linear._Plan) -> tuple[Array | None, ...]:
    """Per-row arrays the chunks need, each ``(N, 1)``: the sample weights; for class indices
    the labels (safe to gather), whether they are valid, ignored, invalid (checked once, for all
    rows); the probability target ``(N, V)``. None where they do not apply."""
    xp, ops = p.xp, p.ops
    sample = None if p.sample is None else xp.reshape(p.sample, (p.rows, 1))
    if p.target.ndim == 2:
        return (sample, None, None, None, None, p.target)
    labels, ignored, bad = _cross_entropy._labels(
        xp, ops, p.target, p.classes, p.ignore_index, False, 1
    )
    return (sample, labels, ~ignored & ~bad, ignored, bad, None)


def _class_facts(p: _linear._Plan, weight: Array, bias: Array | None) -> tuple[Array | None, ...]:
    """Per-class arrays the chunks are cut from: the projection, the bias, the class weights in
    the compute dtype and the class indices."""
    xp, ops = p.xp, p.ops
    cw = None if p.class_weight is None else xp.astype(p.class_weight, p.dtype)
    cls = xp.arange(p.classes, dtype=ops.index_dtype(), device=ops.device(weight))
    return weight, bias, cw, cls


def _weight_total(p: _linear._Plan) -> Array | float:
    xp = p.xp
    return (
        float(p.classes) if p.class_weight is None else xp.sum(xp.astype(p.class_weight, p.dtype))
    )


def _sum_count(p: _linear._Plan) -> int:
    if p.target.ndim == 2:
        return 3
    return 2 + (p.class_weight is not None) + bool(p.smoothing)


def _gaps(p: _linear._Plan) -> bool:
    """Whether the last running sum is of gaps ``shift - x`` (smoothing, probabilities)."""
    return p.target.ndim == 2 or bool(p.smoothing)


def _mass(p: _linear._Plan, q: Array, cw: Array | None) -> Array:
    """The smoothed, weighted target mass ``w q`` of a chunk, 0 where ``q`` is 0."""
    xp = p.xp
    q = xp.astype(q, p.dtype, copy=False)
    if p.smoothing:
        q = (1.0 - p.smoothing) * q + p.smoothing / p.classes
    m = q if cw is None else q * xp.reshape(cw, (1, -1))
    return xp.where(q == 0, xp.zeros_like(m), m)


def _slice_problem(
    p: _linear._Plan,
    facts: tuple[Array | None, ...],
    cw: Array | None,
    cls: Array | None,
    size: int,
) -> _parallel._Problem:
    """The vocab-parallel problem of a block's slice of ``size`` classes from ``cls[0]``
    (``cls`` None: all classes)."""
    xp = p.xp
    sample, labels, valid, ignored, bad, _ = facts
    assert labels is not None
    if cls is None:
        local_label, mine = labels, valid
    else:
        local_label, mine = _parallel._in_slice(xp, labels, valid, cls[0], size)
    weight = None if cw is None else xp.reshape(xp.astype(cw, p.dtype, copy=False), (1, -1))
    return _parallel._Problem(
        xp=xp, ops=p.ops, group=_NO_GROUP, axis=1, classes=p.classes, dtype=p.dtype,
        out_dtype=p.dtype, smoothing=p.smoothing, z_loss=p.z_loss, reduction="none",
        weight=weight, sample=sample, local_label=local_label, mine=mine, ignored=ignored,
        bad=bad,
    )  # fmt: skip
