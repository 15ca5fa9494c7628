"""Vocab-parallel cross-entropy of a linear head whose rows (classes) are split across workers.

Each worker holds ``hidden`` (replicated) and its rows of the projection. Over blocks of rows
of ``hidden`` it makes the block's local logits, feeds them to the vocab-parallel core (the
per-row stats of the block go through the group's all-reduces), takes the core's analytic
gradient of the local logits and folds it into the local ``d weight`` and ``d bias`` and into
this worker's share of ``d hidden``. The shares are summed over the group once, at the end, so
every worker gets the full ``d hidden``. The local ``(N, V_local)`` logits never exist at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import _linear, _parallel, _validation
from ._parallel import Collectives
from ._typing import Array, Namespace, Reduction
from .backends import Backend

__all__ = ["linear_cross_entropy", "linear_cross_entropy_and_grad"]

_Grads = tuple[Array | None, Array | None, Array | None]


@dataclass(frozen=True)
class _Plan:
    """Validated options and the per-row label facts of all rows (class axis of size 1).

    The array fields are at the top level, as JAX's rule takes them as explicit inputs."""

    xp: Namespace
    ops: Backend
    group: Collectives
    rows: int  # N
    batch: tuple[int, ...]
    local: int  # V_local
    classes: int  # V, over the group
    dtype: Any
    out_dtype: Any
    chunk: int
    reduction: str
    smoothing: float
    z_loss: float
    weight: Array | None  # (1, V_local) class weights of the slice
    sample: Array | None  # (N, 1)
    local_label: Array  # (N, 1)
    mine: Array
    ignored: Array
    bad: Array


def linear_cross_entropy(
    hidden: Array,
    local_weight: Array,
    target: Array,
    /,
    *,
    class_start: int | Array,
    group: Collectives,
    bias: Array | None = None,
    chunk_size: int | None = None,
    class_weight: Array | None = None,
    sample_weight: Array | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    z_loss: float = 0.0,
    xp: Namespace | None = None,
) -> Array:
    r"""Cross-entropy of ``hidden @ weight.T + bias`` with the rows of ``weight`` split across
    the workers of ``group``, never holding even the local logits of all rows.

    Each worker holds the same ``hidden`` and the rows ``[class_start, class_start + V_local)``
    of the projection (and of ``bias`` and ``class_weight``); together the slices cover
    ``[0, V)`` once. Every worker gets the value of :func:`xent.linear_cross_entropy` on the
    unsplit head. Over blocks of ``chunk_size`` rows the local logits are made and reduced by
    :func:`xent.parallel.cross_entropy`'s algorithm (per-row stats through the group's
    all-reduces). On PyTorch and JAX the gradients are analytic: ``hidden`` gets the full
    gradient on every worker (one all-reduce of the ``(N, H)`` gradient in the backward),
    ``local_weight`` and ``bias`` their slices of the full ones.

    Parameters
    ----------
    hidden : array
        Features of shape ``(..., H)``, real floating, the same on every worker.
    local_weight : array
        This worker's rows of the projection, shape ``(V_local, H)``, of ``hidden``'s dtype.
    target : array
        Integer class indices in ``[0, V)`` (global) of shape ``hidden.shape[:-1]``, the same
        on every worker.
    class_start : int or 0-d integer array
        The global index of this worker's first row (``jax.lax.axis_index(name) * V_local``
        inside ``shard_map``).
    group : Collectives
        :class:`xent.parallel.TorchGroup`, :class:`xent.parallel.JaxAxis` or a subclass of
        :class:`xent.parallel.Collectives`.
    bias : array, optional
        This worker's slice of the bias, shape ``(V_local,)``.
    chunk_size : int, optional
        Rows per block; None picks the largest power of two whose block of local logits takes
        at most 16 MiB.
    class_weight : array, optional
        This worker's slice of the class weights, shape ``(V_local,)``.
    sample_weight : array, optional
        Per-example weights broadcastable to ``hidden.shape[:-1]``, the same on every worker.
    ignore_index, label_smoothing, reduction, z_loss
        As in :func:`xent.linear_cross_entropy`.
    xp : namespace, optional
        The array namespace; inferred from the arrays when omitted.

    Returns
    -------
    array
        The loss, the same on every worker: 0-d for ``"mean"``/``"sum"``, else
        ``hidden.shape[:-1]``; of ``hidden``'s dtype.

    Raises
    ------
    TypeError
        As :func:`xent.linear_cross_entropy`, and non-integer ``target`` or ``class_start``;
        on PyTorch, class or sample weights that require a gradient.
    ValueError
        As :func:`xent.linear_cross_entropy` (labels outside ``[0, V)`` where they are
        concrete), and a ``class_start`` that puts the slice outside ``[0, V)``.

    Notes
    -----
    Per block the workers exchange what :func:`xent.parallel.cross_entropy` exchanges for
    those rows: one number per row to a max all-reduce and 2 to 4 to a sum all-reduce. The
    gradients add one all-reduce of ``N x H`` numbers (``d hidden``). See
    ``docs/parallel.md``.

    Examples
    --------
    A group of one worker holding every row is the ordinary linear cross-entropy:

    >>> import array_api_strict as xp
    >>> import xent.parallel
    >>> class Alone(xent.parallel.Collectives):
    ...     def all_reduce_max(self, x): return x
    ...     def all_reduce_sum(self, x): return x
    ...     def class_count(self, local, like): return local
    >>> hidden = xp.asarray([[1.0, 0.0], [0.0, 1.0]])
    >>> weight = xp.asarray([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    >>> loss = xent.parallel.linear_cross_entropy(
    ...     hidden, weight, xp.asarray([0, 1]), class_start=0, group=Alone(), chunk_size=1)
    >>> round(float(loss), 6)
    0.239545
    """
    plan = _plan(
        hidden, local_weight, target, class_start=class_start, group=group, bias=bias,
        chunk_size=chunk_size, class_weight=class_weight, sample_weight=sample_weight,
        ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
        z_loss=z_loss, xp=xp,
    )  # fmt: skip
    group.check_constants({"class_weight": class_weight, "sample_weight": sample_weight})
    loss = group.attach_linear_grad(_RULE, plan, hidden, local_weight, bias)
    others = (target, class_weight, sample_weight)
    return plan.ops.finish(loss, hidden, local_weight, bias, *others)


def linear_cross_entropy_and_grad(
    hidden: Array,
    local_weight: Array,
    target: Array,
    /,
    *,
    class_start: int | Array,
    group: Collectives,
    bias: Array | None = None,
    chunk_size: int | None = None,
    class_weight: Array | None = None,
    sample_weight: Array | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    z_loss: float = 0.0,
    xp: Namespace | None = None,
) -> tuple[Array, tuple[Array, Array, Array | None]]:
    """The loss of :func:`linear_cross_entropy` and its gradients, in one chunked pass.

    Takes the arguments of :func:`linear_cross_entropy`. Returns ``(loss, (d_hidden,
    d_local_weight, d_bias))``: the full gradient of ``sum(loss)`` with respect to ``hidden``
    (the same on every worker) and this worker's slices of the gradients of the projection and
    the bias (``d_bias`` None without a bias), computed without autodiff.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import xent.parallel
    >>> class Alone(xent.parallel.Collectives):
    ...     def all_reduce_max(self, x): return x
    ...     def all_reduce_sum(self, x): return x
    ...     def class_count(self, local, like): return local
    >>> loss, (d_hidden, d_weight, d_bias) = xent.parallel.linear_cross_entropy_and_grad(
    ...     xp.asarray([[0.0, 0.0]]), xp.asarray([[1.0, 0.0], [0.0, 1.0]]), xp.asarray([0]),
    ...     class_start=0, group=Alone(), bias=xp.asarray([0.0, 0.0]))
    >>> d_hidden
    Array([[-0.5,  0.5]], dtype=array_api_strict.float64)
    >>> d_bias
    Array([-0.5,  0.5], dtype=array_api_strict.float64)
    """
    plan = _plan(
        hidden, local_weight, target, class_start=class_start, group=group, bias=bias,
        chunk_size=chunk_size, class_weight=class_weight, sample_weight=sample_weight,
        ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
        z_loss=z_loss, xp=xp,
    )  # fmt: skip
    loss, grads = _loss_and_grad(plan, hidden, local_weight, bias, None)
    inputs = (hidden, local_weight, bias, target, class_weight, sample_weight)
    return _linear._finished(plan.ops, loss, grads, inputs)


# --------------------------------------------------------------------------- the passes
def _loss(p: _Plan, hidden: Array, weight: Array, bias: Array | None) -> Array:
    with p.ops.quiet():
        return _blocks(p, hidden, weight, bias, None, (False, False, False))[0]


def _loss_and_grad(
    p: _Plan,
    hidden: Array,
    weight: Array,
    bias: Array | None,
    cotangent: Array | None,
    need: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Array, _Grads]:
    """The loss and the gradients of ``loss . cotangent`` (None: all ones) that ``need`` asks
    for; ``d hidden`` is all-reduced over the group."""
    need = (need[0], need[1], need[2] and bias is not None)
    with p.ops.quiet():
        return _blocks(p, hidden, weight, bias, cotangent, need)


def _blocks(
    p: _Plan,
    hidden: Array,
    weight: Array,
    bias: Array | None,
    cotangent: Array | None,
    need: tuple[bool, bool, bool],
) -> tuple[Array, _Grads]:
    """Scan the blocks of rows, carrying the loss sum, the weight total of "mean", and the
    local weight and bias gradients; the gradients are for a unit cotangent on every row of
    "mean"/"sum" (scaled at the end) or the given per-row one of "none"."""
    xp, ops = p.xp, p.ops
    width = int(hidden.shape[-1])
    dev = ops.device(hidden)
    grads = any(need)
    if cotangent is not None and p.reduction == "none":
        r_all = xp.reshape(xp.astype(cotangent, p.dtype, copy=False), (p.rows,))
    else:
        r_all = xp.ones((p.rows,), dtype=p.dtype, device=dev)

    def step(carry: tuple[Any, ...], block: tuple[Any, ...]) -> tuple[Any, ...]:
        total, count, dw, db = carry
        h, label, mine, ignored, bad, sample, r = block
        logits = _linear._logits(xp, p.dtype, h, weight, bias)
        bp = _parallel._Problem(
            xp=xp, ops=ops, group=p.group, axis=1, classes=p.classes, dtype=p.dtype,
            out_dtype=p.dtype, smoothing=p.smoothing, z_loss=p.z_loss, reduction="none",
            weight=p.weight, sample=sample, local_label=label, mine=mine, ignored=ignored,
            bad=bad,
        )  # fmt: skip
        loss, saved = _parallel._forward(bp, logits)
        total = total + xp.sum(loss)
        if p.reduction == "mean":
            counted = xp.astype(~ignored, p.dtype)
            label_weight = saved[1].label_weight
            if label_weight is not None:
                counted = counted * label_weight
            count = count + xp.sum(counted if sample is None else counted * sample)
        dh = None
        if grads:
            g = _parallel._backward(bp, logits, saved, r)
            if need[0]:
                dh = _linear._d_hidden(xp, g, weight, p.dtype)
            if need[1]:
                dw = ops.matmul_add(dw, g, xp.astype(h, p.dtype, copy=False))
            if need[2]:
                db = db + xp.sum(g, axis=0)
        return (total, count, dw, db), (loss if p.reduction == "none" else None, dh)

    zero = xp.zeros((), dtype=p.dtype, device=dev)
    carry = (
        zero,
        zero,
        xp.zeros(tuple(weight.shape), dtype=p.dtype, device=dev) if need[1] else None,
        xp.zeros(tuple(bias.shape), dtype=p.dtype, device=dev)
        if need[2] and bias is not None
        else None,
    )
    rows = (
        xp.reshape(hidden, (p.rows, width)), p.local_label, p.mine, p.ignored, p.bad, p.sample,
        r_all,
    )  # fmt: skip
    carry, parts = _linear._scan_blocks(ops, step, carry, rows, p.rows, p.chunk)
    total, count, dw, db = carry
    losses = [loss for loss, _ in parts if loss is not None]
    dhs = [dh for _, dh in parts if dh is not None]

    if p.reduction == "none":
        if losses:
            loss = xp.reshape(losses[0] if len(losses) == 1 else xp.concat(losses), p.batch)
        else:
            loss = xp.zeros(p.batch, dtype=p.dtype, device=dev)
    else:
        loss = total if p.reduction == "sum" else total / count
    loss = xp.astype(loss, p.out_dtype, copy=False)
    if not grads:
        return loss, (None, None, None)

    # The gradients above are of the summed rows; "mean" divides, a 0-d cotangent scales.
    scale: Array | None = None
    if p.reduction == "mean":
        scale = 1.0 / count
    if cotangent is not None and p.reduction != "none":
        c = xp.astype(cotangent, p.dtype, copy=False)
        scale = c if scale is None else scale * c
    d_hidden = d_weight = d_bias = None
    if need[0]:
        if dhs:
            share = xp.reshape(dhs[0] if len(dhs) == 1 else xp.concat(dhs), (p.rows, width))
            # One all-reduce: every worker's share of d hidden, summed.
            dh_all = xp.reshape(p.group.all_reduce_sum(share), tuple(hidden.shape))
        else:
            dh_all = xp.zeros(tuple(hidden.shape), dtype=p.dtype, device=dev)
        d_hidden = xp.astype(dh_all if scale is None else dh_all * scale, hidden.dtype)
    if need[1]:
        d_weight = xp.astype(dw if scale is None else dw * scale, weight.dtype, copy=False)
    if need[2] and bias is not None:
        d_bias = xp.astype(db if scale is None else db * scale, bias.dtype, copy=False)
    return loss, (d_hidden, d_weight, d_bias)


# --------------------------------------------------------------------------- preparation
def _plan(
    hidden: Array,
    weight: Array,
    target: Array,
    *,
    class_start: int | Array,
    group: Collectives,
    bias: Array | None,
    chunk_size: int | None,
    class_weight: Array | None,
    sample_weight: Array | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    z_loss: float,
    xp: Namespace | None,
) -> _Plan:
    arrays = {
        "hidden": hidden, "local_weight": weight, "target": target, "bias": bias,
        "class_weight": class_weight, "sample_weight": sample_weight,
    }  # fmt: skip
    xp, ops = _validation.backend(arrays, xp)
    ignore_index = _validation.parallel_options(
        group, Collectives, reduction, label_smoothing, z_loss, ignore_index
    )
    _validation.linear_inputs(xp, hidden, weight, bias)
    chunk_size = _validation.chunk_size(chunk_size)
    local = int(weight.shape[0])
    batch = tuple(int(n) for n in hidden.shape[:-1])
    _validation.parallel_index_target(xp, _linear._Logits((*batch, local)), target, len(batch))
    classes = group.class_count(local, hidden)
    _validation.parallel_slice(
        xp, class_start, local, classes, class_weight, sample_weight, batch, "class_weight"
    )

    rows = 1
    for n in batch:
        rows *= n
    dtype = ops.compute_dtype(hidden.dtype)
    w = None if class_weight is None else xp.reshape(xp.astype(class_weight, dtype), (1, local))
    sample = None
    if sample_weight is not None:
        sample = xp.reshape(xp.broadcast_to(xp.astype(sample_weight, dtype), batch), (rows, 1))
    local_label, mine, ignored, bad = (
        xp.reshape(a, (rows, 1))
        for a in _parallel._local_labels(xp, ops, target, class_start, local, classes, ignore_index)
    )
    itemsize = xp.finfo(dtype).bits // 8
    budget = _linear._BUDGET_BYTES // (local * itemsize)
    chunk = chunk_size or 2 ** max(0, budget.bit_length() - 1)
    return _Plan(
        xp=xp, ops=ops, group=group, rows=rows, batch=batch, local=local, classes=classes,
        dtype=dtype, out_dtype=hidden.dtype, chunk=min(chunk, max(rows, 1)), reduction=reduction,
        smoothing=float(label_smoothing), z_loss=float(z_loss), weight=w, sample=sample,
        local_label=local_label, mine=mine, ignored=ignored, bad=bad,
    )  # fmt: skip


_RULE = _linear._Rule(loss=_loss, loss_and_grad=_loss_and_grad)
