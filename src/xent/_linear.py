"""Cross-entropy of a linear head, without the ``(N, V)`` logits.

``linear_cross_entropy(hidden, weight, target)`` is ``cross_entropy(hidden @ weight.T + bias,
target)``, computed over blocks of ``chunk`` rows: each block's logits are made, reduced to its
rows' losses by the cross-entropy core, and dropped. The gradients recompute a block's logits,
take the core's analytic ``d loss / d logits`` for it, and fold it into ``d hidden`` (that
block's rows), ``d weight`` and ``d bias`` (accumulated over blocks in float32 or float64), so
extra memory is one block of logits and its gradient, plus the gradients themselves. Where even
a block of the least rows is over the budget, :mod:`._linear_vocab` cuts the vocabulary too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from . import _cross_entropy, _linear_vocab, _validation
from ._typing import Array, Namespace, Reduction
from .backends import Backend, lookup, namespace_of

__all__ = ["linear_cross_entropy", "linear_cross_entropy_and_grad"]

_BUDGET_BYTES = 16 * 2**20
"""Bytes of one block of logits in the compute dtype when ``chunk_size`` is None: the forward
holds about one such block, the backward about two (logits and their gradient)."""

_SHARE = 32
"""Where all the logits take more than ``_SHARE`` blocks of ``_BUDGET_BYTES``, a block may
take ``1 / _SHARE`` of them instead: each block costs a read and a write of the whole weight
gradient, and the composition this replaces holds all the logits and their gradient."""

_MAX_BUDGET_BYTES = 256 * 2**20
"""The most one block of logits may take when ``chunk_size`` is None, whatever ``_SHARE`` and
``_MIN_ROWS`` would allow: beyond it the vocabulary is cut into chunks (``_linear_vocab``)."""

_MIN_ROWS = 128
"""Blocks of fewer rows make the weight gradient's product (whose inner dimension is the
block's rows) inefficient: a batch of at least ``_SHARE / 2`` such blocks takes them, whatever
the byte budget says (64 rows took 1.17x the time of 128 at N 2048, H 1024, V 50257 on JAX)."""

_Grads = tuple[Array | None, Array | None, Array | None]


@dataclass(frozen=True)
class _Plan:
    """Validated options and the flattened target, shared by the loss and its gradients."""

    xp: Namespace
    ops: Backend
    rows: int  # N, the rows of hidden once its batch axes are flattened
    classes: int  # V
    batch: tuple[int, ...]  # hidden.shape[:-1]
    dtype: Any  # compute dtype
    out_dtype: Any
    chunk: int  # rows per block
    vocab_chunk: int  # classes per chunk; V when the vocabulary is not split
    reduction: str
    ignore_index: int
    smoothing: float
    z_loss: float
    softcap: float | None
    target: Array  # (N,) class indices or (N, V) probabilities
    class_weight: Array | None
    sample: Array | None  # (N,) in the compute dtype
    denominator: Array | None  # what "mean" divides by


@dataclass(frozen=True)
class _Head:
    """The options and sizes of a call, checked without reading a label."""

    xp: Namespace
    ops: Backend
    rows: int
    classes: int
    batch: tuple[int, ...]
    dtype: Any  # compute dtype
    out_dtype: Any  # hidden's dtype
    kind: str  # "index" or "prob"
    chunk: int
    vocab_chunk: int
    reduction: str
    ignore_index: int
    smoothing: float
    z_loss: float
    softcap: float | None
    validate: bool | None

    @property
    def whole(self) -> bool:
        """All the logits fit in one block: the plain composition holds no more than the
        blocks would (see :func:`_whole`)."""
        return self.chunk >= self.rows and self.vocab_chunk == self.classes


@dataclass(frozen=True)
class _Rule:
    """The loss and its analytic gradients, for the backends' autodiff hooks."""

    loss: Any
    loss_and_grad: Any


def linear_cross_entropy(
    hidden: Array,
    weight: Array,
    target: Array,
    /,
    *,
    bias: Array | None = None,
    chunk_size: int | None = None,
    class_weight: Array | None = None,
    sample_weight: Array | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    z_loss: float = 0.0,
    softcap: float | None = None,
    validate: bool | None = None,
    xp: Namespace | None = None,
) -> Array:
    r"""Cross-entropy of the logits ``hidden @ weight.T + bias``, never holding all of them.

    Equals ``cross_entropy(hidden @ weight.T + bias, target, weight=class_weight, ...)`` with
    the same options, but works on blocks of ``chunk_size`` rows, so the ``(N, V)`` logits never
    exist: extra memory is about one block of logits in the forward and two in the backward,
    plus the gradients. On PyTorch and JAX the gradients of ``hidden``, ``weight`` and ``bias``
    are analytic (a ``torch.autograd.Function``, a ``jax.custom_vjp``); elsewhere use
    :func:`linear_cross_entropy_and_grad`. Where all the logits fit in one block, the call is
    the composition itself: the logits, then :func:`cross_entropy` of them (its fused
    kernels; autodiff differentiates the product and the loss's own analytic gradient).

    Parameters
    ----------
    hidden : array
        Features of shape ``(..., H)``, real floating. float16/bfloat16 logits are computed in
        float32.
    weight : array
        The projection, shape ``(V, H)``, of ``hidden``'s dtype.
    target : array
        Integer class indices of shape ``hidden.shape[:-1]``, or floating class probabilities
        of shape ``(*hidden.shape[:-1], V)``.
    bias : array, optional
        Shape ``(V,)``, of ``hidden``'s dtype.
    chunk_size : int, optional
        Rows per block; None picks the largest power of two whose block of logits takes at
        most 16 MiB, or 1/32 of all the logits where that is more (at most 256 MiB; at least
        128 rows for batches of 2048 rows or more, within those 256 MiB). Where the least block
        (``chunk_size`` rows, or 16 when None) of all ``V`` classes would be over that budget,
        the classes are taken in chunks too: of the largest power of two that fits beside
        ``chunk_size`` rows, or when None beside a square block (2048 rows in float32 at
        16 MiB; see ``docs/linear.md``).
    class_weight : array, optional
        Class weights of shape ``(V,)`` (``weight`` of :func:`cross_entropy`).
    sample_weight : array, optional
        Per-example weights broadcastable to ``hidden.shape[:-1]``.
    ignore_index : int, default -100
        Class-index targets equal to it contribute 0 and are left out of the mean.
    label_smoothing : float, default 0.0
        In ``[0, 1]``.
    reduction : {"mean", "sum", "none"}, default "mean"
        As in :func:`cross_entropy`.
    z_loss : float, default 0.0
        Coefficient of ``logsumexp(logits)**2`` per row.
    softcap : float, optional
        Caps the logits to ``softcap * tanh(logits / softcap)``.
    validate : bool or None, default None
        Label checking, as in :func:`cross_entropy`.
    xp : namespace, optional
        The array namespace; inferred from the arrays when omitted.

    Returns
    -------
    array
        0-d for ``"mean"``/``"sum"``, else ``hidden.shape[:-1]``; of ``hidden``'s dtype.

    Raises
    ------
    TypeError
        Non-floating ``hidden``; ``weight`` or ``bias`` of another dtype; arrays of different
        libraries or devices.
    ValueError
        Shapes that do not fit ``(..., H)``, ``(V, H)``, ``(V,)``; labels outside ``[0, V)``;
        options out of range.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import xent
    >>> hidden = xp.asarray([[1.0, 0.0], [0.0, 1.0]])
    >>> weight = xp.asarray([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    >>> loss = xent.linear_cross_entropy(hidden, weight, xp.asarray([0, 1]), chunk_size=1)
    >>> round(float(loss), 6)
    0.239545
    """
    head = _head(
        hidden, weight, target, bias=bias, chunk_size=chunk_size, class_weight=class_weight,
        sample_weight=sample_weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
        reduction=reduction, z_loss=z_loss, softcap=softcap, validate=validate, xp=xp,
    )  # fmt: skip
    others = (target, class_weight, sample_weight)
    if head.whole:
        loss = _whole(head, hidden, weight, bias, *others, grad=False)[0]
    else:
        plan = _plan(head, target, class_weight, sample_weight)
        loss = plan.ops.linear_custom_grad(_RULE, plan, hidden, weight, bias, others=others)
    return head.ops.finish(loss, hidden, weight, bias, *others)


def linear_cross_entropy_and_grad(
    hidden: Array,
    weight: Array,
    target: Array,
    /,
    *,
    bias: Array | None = None,
    chunk_size: int | None = None,
    class_weight: Array | None = None,
    sample_weight: Array | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    z_loss: float = 0.0,
    softcap: float | None = None,
    validate: bool | None = None,
    xp: Namespace | None = None,
) -> tuple[Array, tuple[Array, Array, Array | None]]:
    r"""The loss of :func:`linear_cross_entropy` and its gradients, in one chunked pass.

    Takes the options of :func:`linear_cross_entropy`. With ``G`` the gradient of ``sum(loss)``
    with respect to the logits (:func:`cross_entropy_and_grad`), made one block of rows at a
    time, the gradients are ``G @ weight`` (for ``hidden``), ``G.T @ hidden`` (for ``weight``)
    and ``sum(G, axis=0)`` (for ``bias``), the last two accumulated over blocks in float32 (or
    float64). No autodiff is needed, so NumPy, CuPy, Dask and array-api-strict users can train
    with it.

    Returns
    -------
    loss : array
        As :func:`linear_cross_entropy` returns it.
    grads : tuple
        ``(d_hidden, d_weight, d_bias)`` of the shapes and dtypes of ``hidden``, ``weight`` and
        ``bias``; ``d_bias`` is None without a bias.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import xent
    >>> hidden = xp.asarray([[0.0, 0.0]])
    >>> weight = xp.asarray([[1.0, 0.0], [0.0, 1.0]])
    >>> loss, (d_hidden, d_weight, d_bias) = xent.linear_cross_entropy_and_grad(
    ...     hidden, weight, xp.asarray([0]), bias=xp.asarray([0.0, 0.0])
    ... )
    >>> d_bias
    Array([-0.5,  0.5], dtype=array_api_strict.float64)
    >>> d_hidden
    Array([[-0.5,  0.5]], dtype=array_api_strict.float64)
    """
    head = _head(
        hidden, weight, target, bias=bias, chunk_size=chunk_size, class_weight=class_weight,
        sample_weight=sample_weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
        reduction=reduction, z_loss=z_loss, softcap=softcap, validate=validate, xp=xp,
    )  # fmt: skip
    if head.whole:
        loss, grads = _whole(
            head, hidden, weight, bias, target, class_weight, sample_weight, grad=True
        )
    else:
        plan = _plan(head, target, class_weight, sample_weight)
        loss, grads = _loss_and_grad(plan, hidden, weight, bias, None)
    inputs = (hidden, weight, bias, target, class_weight, sample_weight)
    return _finished(head.ops, loss, grads, inputs)


def _finished(
    ops: Backend, loss: Array, grads: _Grads, inputs: tuple[Array | None, ...]
) -> tuple[Array, tuple[Array, Array, Array | None]]:
    """What a ``*_and_grad`` of a linear head returns: the loss and ``(d_hidden, d_weight,
    d_bias)``, each through :meth:`Backend.finish` with the call's ``inputs``."""
    dh, dw, db = grads
    assert dh is not None
    assert dw is not None
    return ops.finish(loss, *inputs), (
        ops.finish(dh, *inputs),
        ops.finish(dw, *inputs),
        None if db is None else ops.finish(db, *inputs),
    )


# --------------------------------------------------------------------------- the passes
def _whole(
    head: _Head,
    hidden: Array,
    weight: Array,
    bias: Array | None,
    target: Array,
    class_weight: Array | None,
    sample_weight: Array | None,
    *,
    grad: bool,
) -> tuple[Array, _Grads]:
    """The loss (and with ``grad`` its gradients) where all the logits fit in one block: the
    composition itself, ``cross_entropy(hidden @ weight.T + bias, target, ...)`` through
    :mod:`._cross_entropy`'s checks and its backend's fused kernels, whose cost per call is
    the native loss's; blocks would hold as much (one block of logits, and its gradient) and
    pay a pass of their own per call.

    The labels are checked there, once (:func:`_plan` is not run). Autodiff frameworks
    differentiate the product and the loss as they are; the gradients of ``grad`` are those of
    :func:`_blocks`: ``G @ weight``, ``G.T @ hidden`` and ``sum(G, axis=0)``.
    """
    xp, ops = head.xp, head.ops
    flat = len(head.batch) == 1
    h = hidden if flat else xp.reshape(hidden, (head.rows, int(hidden.shape[-1])))
    logits = ops.linear_logits(h, weight, bias, head.dtype, None)
    if not flat:
        logits = xp.reshape(logits, (*head.batch, head.classes))
    options: dict[str, Any] = {
        "weight": class_weight, "sample_weight": sample_weight, "ignore_index": head.ignore_index,
        "label_smoothing": head.smoothing, "reduction": head.reduction, "z_loss": head.z_loss,
        "softcap": head.softcap, "validate": head.validate,
    }  # fmt: skip
    if not grad:
        loss = _cross_entropy.cross_entropy(logits, target, **options)
        return _as(xp, loss, hidden.dtype), (None, None, None)
    loss, g = _cross_entropy.cross_entropy_and_grad(logits, target, **options)
    if not flat:
        g = xp.reshape(g, (head.rows, head.classes))
    d_hidden = _d_hidden(xp, g, weight, hidden.dtype)
    d_weight = _as(xp, xp.matrix_transpose(g) @ _as(xp, h, head.dtype), weight.dtype)
    d_bias = None if bias is None else _as(xp, xp.sum(g, axis=0), bias.dtype)
    return _as(xp, loss, hidden.dtype), (
        d_hidden if flat else xp.reshape(d_hidden, hidden.shape),
        d_weight,
        d_bias,
    )


def _as(xp: Namespace, a: Array, dtype: Any) -> Array:
    """``a`` in ``dtype``: itself where it has it (no call into the namespace)."""
    return a if a.dtype == dtype else xp.astype(a, dtype)


def _d_hidden(xp: Namespace, g: Array, weight: Array, dtype: Any) -> Array:
    """``g @ weight`` (a block's logit gradient times the projection, or a chunk of it) in
    ``dtype``, the product in ``weight``'s dtype, whose matrix kernels accumulate in float32
    for float16/bfloat16."""
    return _as(xp, _as(xp, g, weight.dtype) @ weight, dtype)


def _loss(p: _Plan, hidden: Array, weight: Array, bias: Array | None) -> Array:
    return _run(p, hidden, weight, bias, None, (False, False, False))[0]


def _loss_and_grad(
    p: _Plan,
    hidden: Array,
    weight: Array,
    bias: Array | None,
    cotangent: Array | None,
    need: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Array, _Grads]:
    """The loss and the gradients of ``loss . cotangent`` (``cotangent`` None: all ones) with
    respect to those of ``hidden``, ``weight``, ``bias`` that ``need`` asks for (None for the
    others)."""
    need = (need[0], need[1], need[2] and bias is not None)
    return _run(p, hidden, weight, bias, cotangent, need)


def _run(
    p: _Plan,
    hidden: Array,
    weight: Array,
    bias: Array | None,
    cotangent: Array | None,
    need: tuple[bool, bool, bool],
) -> tuple[Array, _Grads]:
    with p.ops.quiet():
        if p.vocab_chunk < p.classes:
            return _linear_vocab._run(p, hidden, weight, bias, cotangent, need)
        return _blocks(p, hidden, weight, bias, cotangent, need)


def _blocks(
    p: _Plan,
    hidden: Array,
    weight: Array,
    bias: Array | None,
    cotangent: Array | None,
    need: tuple[bool, bool, bool],
) -> tuple[Array, _Grads]:
    """Scan the blocks of rows, carrying the loss sum and the weight and bias gradients."""
    xp, ops = p.xp, p.ops
    width = int(hidden.shape[-1])
    dev = ops.device(p.target)
    r_all = _row_cotangent(p, cotangent) if any(need) else None
    per_row = r_all is not None and r_all.ndim == 1
    # One buffer for every block's logits, which the gradient then overwrites (where the
    # backend writes in place): no block-sized allocation per block.
    scratch = ops.scratch((min(p.chunk, p.rows), p.classes), p.dtype, hidden)

    def step(carry: tuple[Any, ...], block: tuple[Any, ...]) -> tuple[Any, ...]:
        """One block of rows: its losses, its rows of ``d hidden``, the sums carried over."""
        total, dw, db = carry
        h, target, sample, r = block
        out = None if scratch is None else scratch[: int(h.shape[0]), ...]
        logits = ops.linear_logits(h, weight, bias, p.dtype, out)
        cp = _block_problem(p, target, sample, logits)
        loss, saved = _cross_entropy._forward(cp, logits)
        total = total + xp.sum(loss)
        dh = None
        if r_all is not None:
            r = r if per_row else xp.broadcast_to(r_all, (int(h.shape[0]),))
            g = _cross_entropy._backward(cp, logits, saved, r)
            if need[0]:
                dh = _d_hidden(xp, g, weight, hidden.dtype)
            if need[1]:
                dw = ops.matmul_add(dw, g, xp.astype(h, p.dtype, copy=False))
            if need[2]:
                db = db + xp.sum(g, axis=0)
        return (total, dw, db), (loss if p.reduction == "none" else None, dh)

    carry = (
        xp.zeros((), dtype=p.dtype, device=dev),
        xp.zeros(tuple(weight.shape), dtype=p.dtype, device=dev) if need[1] else None,
        xp.zeros(tuple(bias.shape), dtype=p.dtype, device=dev)
        if need[2] and bias is not None
        else None,
    )
    rows = (xp.reshape(hidden, (p.rows, width)), p.target, p.sample, r_all if per_row else None)
    carry, parts = _scan_blocks(ops, step, carry, rows, p.rows, p.chunk)
    total, dw, db = carry
    losses = [loss for loss, _ in parts if loss is not None]
    dhs = [dh for _, dh in parts if dh is not None]
    return _reduce(p, losses, total), _finish(p, hidden, weight, bias, need, dhs, dw, db)


def _scan_blocks(
    ops: Backend,
    step: Any,
    carry: Any,
    rows: tuple[Array | None, ...],
    count: int,
    chunk: int,
) -> tuple[Any, list[tuple[Array | None, ...]]]:
    """``step(carry, block) -> (carry, outs)`` over blocks of ``chunk`` of the ``count`` rows
    of ``rows`` (None entries stay None). Returns the last carry and, per part, the outs with
    their rows flattened back.

    The first block (the short one, when ``chunk`` does not divide ``count``) runs before the
    others are scanned, so the scan starts from a carry made by ``step`` itself: inside
    ``shard_map`` it then varies over the mesh axes the blocks' results vary over, as
    ``lax.scan`` requires of a carry."""
    xp = ops.xp
    first = count % chunk or min(chunk, count)
    parts: list[tuple[Array | None, ...]] = []
    # No rows: one empty block, so the results still come from the inputs (autograd of the
    # blocks then gives zero gradients rather than none).
    if first or not count:
        carry, out = step(carry, tuple(None if a is None else a[:first, ...] for a in rows))
        parts.append(out)
    rest = count - first
    if rest:
        blocks = tuple(
            None if a is None else xp.reshape(a[first:, ...], (rest // chunk, chunk, *a.shape[1:]))
            for a in rows
        )
        carry, outs = ops.scan(step, carry, blocks)
        parts.append(
            tuple(None if o is None else xp.reshape(o, (rest, *o.shape[2:])) for o in outs)
        )
    return carry, parts


def _logits(xp: Namespace, dtype: Any, h: Array, weight: Array, bias: Array | None) -> Array:
    """One block's logits in the compute dtype, in a new array."""
    return lookup(xp).linear_logits(h, weight, bias, dtype, None)


def _block_problem(p: _Plan, target: Array, sample: Array | None, logits: Array) -> Any:
    """The cross-entropy problem of one block (labels were checked once, for all rows). The
    logits are the block's own, so the gradient may overwrite them, except under a softcap
    (whose derivative reads the capped logits after the softmax)."""
    kind = "prob" if target.ndim == logits.ndim else "index"
    checked = _cross_entropy._Checked(
        xp=p.xp, ops=p.ops, axis=logits.ndim - 1, kind=kind, from_logits=True,
        smoothing=p.smoothing, eps=1e-7, z_loss=p.z_loss, softcap=p.softcap,
        ignore_index=p.ignore_index, reduction="none", validate=False,
    )  # fmt: skip
    problem = _cross_entropy._problem(
        logits, target, checked, weight=p.class_weight, sample_weight=sample
    )
    return dataclasses.replace(problem, overwrite=p.softcap is None)


def _row_cotangent(p: _Plan, cotangent: Array | None) -> Array:
    """Each row's factor on its logit gradient: 0-d for "mean"/"sum", ``(N,)`` for "none"."""
    xp = p.xp
    dev = p.ops.device(p.target)
    if cotangent is None:
        shape = (p.rows,) if p.reduction == "none" else ()
        r = xp.ones(shape, dtype=p.dtype, device=dev)
    else:
        r = xp.astype(cotangent, p.dtype, copy=False)
        if p.reduction == "none":
            r = xp.reshape(r, (p.rows,))
    return r / p.denominator if p.denominator is not None else r


def _reduce(p: _Plan, rows: list[Array], total: Array) -> Array:
    xp = p.xp
    if p.reduction == "none":
        if not rows:
            return xp.zeros(p.batch, dtype=p.out_dtype, device=p.ops.device(p.target))
        loss = xp.reshape(rows[0] if len(rows) == 1 else xp.concat(rows), p.batch)
    else:
        loss = total if p.denominator is None else total / p.denominator
    return xp.astype(loss, p.out_dtype, copy=False)


def _finish(
    p: _Plan,
    hidden: Array,
    weight: Array,
    bias: Array | None,
    need: tuple[bool, bool, bool],
    dh: list[Array],
    dw: Array,
    db: Array,
) -> _Grads:
    """The gradients in the inputs' shapes and dtypes (zeros where there were no rows)."""
    xp = p.xp
    d_hidden = d_weight = d_bias = None
    if need[0]:
        if not dh:
            d_hidden = xp.zeros_like(hidden)
        else:
            d_hidden = xp.reshape(dh[0] if len(dh) == 1 else xp.concat(dh), hidden.shape)
    if need[1]:
        d_weight = xp.astype(dw, weight.dtype, copy=False)
    if need[2] and bias is not None:
        d_bias = xp.astype(db, bias.dtype, copy=False)
    return d_hidden, d_weight, d_bias


# --------------------------------------------------------------------------- preparation
class _Logits:
    """The shape the logits would have, for the cross-entropy's target checks."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


def _head(
    hidden: Array,
    weight: Array,
    target: Array,
    *,
    bias: Array | None,
    chunk_size: int | None,
    class_weight: Array | None,
    sample_weight: Array | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    z_loss: float,
    softcap: float | None,
    validate: bool | None,
    xp: Namespace | None,
) -> _Head:
    """Every check that reads no label, and the blocks' sizes.

    Remembered as :func:`._cross_entropy._check` remembers its answer: a passing answer under
    the arrays' types, dtypes and shapes, the options' values and types (plain Python
    scalars) and the budgets that size the blocks, for arrays of one registered namespace,
    concrete; a call that finds it checks again only what the key does not hold (dense
    layouts, one device).
    """
    arrays = {
        "hidden": hidden, "weight": weight, "target": target, "bias": bias,
        "class_weight": class_weight, "sample_weight": sample_weight,
    }  # fmt: skip
    options = (reduction, label_smoothing, z_loss, softcap, ignore_index, validate, chunk_size)
    key = None
    found = namespace_of(hidden) if xp is None else None
    if found is not None and not lookup(found).is_traced(hidden):
        kinds = tuple(map(type, options))
        try:
            key = (
                *options, *kinds, lookup(found), _BUDGET_BYTES, _MAX_BUDGET_BYTES,
                *((None if a is None else (type(a), a.dtype, a.shape)) for a in arrays.values()),
            )  # fmt: skip
            head = _HEADS.get(key)
        except (AttributeError, TypeError):  # not arrays; an unhashable option: checked below
            head = key = None
        if head is not None:
            ops = head.ops
            if not all(a is None or ops.dense_together(hidden, a) for a in arrays.values()):
                _validation.dense(ops, {k: a for k, a in arrays.items() if a is not None})
                _validation.same_device(ops, arrays)
            return head
        if key is not None and (
            not _validation.plain_scalars(kinds)
            or any(a is not None and namespace_of(a) is not found for a in arrays.values())
        ):
            key = None
    head = _checked_head(arrays, xp, options)
    if key is not None:
        _validation.remember(_HEADS, key, head)
    return head


_HEADS: dict[Any, _Head] = {}
"""Answers of :func:`_head` that passed, by the key it describes."""


def _checked_head(arrays: dict[str, Any], xp: Namespace | None, options: tuple[Any, ...]) -> _Head:
    """:func:`_head`'s checks, each of them, of its ``arrays`` (by name) and ``options``
    (``reduction``, ``label_smoothing``, ``z_loss``, ``softcap``, ``ignore_index``,
    ``validate``, ``chunk_size``)."""
    reduction, label_smoothing, z_loss, softcap, ignore_index, validate, chunk_size = options
    hidden, weight, target = arrays["hidden"], arrays["weight"], arrays["target"]
    bias, class_weight = arrays["bias"], arrays["class_weight"]
    sample_weight = arrays["sample_weight"]
    xp, ops = _validation.backend(arrays, xp)
    _validation.linear_inputs(xp, hidden, weight, bias)
    _validation.reduction(reduction)
    smoothing, _, z, cap = _validation.options(
        label_smoothing=label_smoothing, eps=1e-7, from_logits=True, z_loss=z_loss,
        softcap=softcap, validate=validate,
    )  # fmt: skip
    ignore_index = _validation.ignore_index(ignore_index)
    chunk_size = _validation.chunk_size(chunk_size)
    classes = int(weight.shape[0])
    batch = tuple(int(n) for n in hidden.shape[:-1])
    kind = _validation.target_kind(xp, _Logits((*batch, classes)), target, len(batch))
    if kind == "prob":
        _validation.probability_target_options(ignore_index, _cross_entropy._IGNORE_INDEX)
    _validation.linear_class_weight(xp, class_weight, classes)
    _validation.broadcastable("sample_weight", sample_weight, batch, "the per-example shape")
    _validation.real_weights(xp, "sample_weight", sample_weight)
    rows = math.prod(batch)
    dtype = ops.compute_dtype(hidden.dtype)
    itemsize = xp.finfo(dtype).bits // 8
    total = rows * classes * itemsize
    budget = max(_BUDGET_BYTES, min(total // _SHARE, _MAX_BUDGET_BYTES))
    chunk, vocab_chunk = _linear_vocab._split(rows, classes, itemsize, chunk_size, budget)
    if (
        chunk_size is None
        and vocab_chunk == classes
        and rows >= _MIN_ROWS * _SHARE // 2
        and _MIN_ROWS * classes * itemsize <= _MAX_BUDGET_BYTES
    ):
        chunk = min(max(chunk, _MIN_ROWS), rows)
    return _Head(
        xp=xp, ops=ops, rows=rows, classes=classes, batch=batch, dtype=dtype,
        out_dtype=hidden.dtype, kind=kind, chunk=chunk, vocab_chunk=vocab_chunk, reduction=reduction, ignore_index=ignore_index,
        smoothing=float(smoothing), z_loss=float(z), softcap=None if cap is None else float(cap),
        validate=validate,
    )  # fmt: skip


def _plan(
    head: _Head, target: Array, class_weight: Array | None, sample_weight: Array | None
) -> _Plan:
    """The blocks' plan: the labels checked once for every block, the flattened target, the
    per-row weights and the mean's denominator."""
    xp, ops, rows, classes, dtype = head.xp, head.ops, head.rows, head.classes, head.dtype
    batch = head.batch
    dev = ops.device(target)
    sample = None
    if sample_weight is not None:
        sample = xp.reshape(xp.broadcast_to(xp.astype(sample_weight, dtype), batch), (rows,))
    if head.kind == "index":
        labels, ignored, _ = _cross_entropy._labels(
            xp, ops, target, classes, head.ignore_index, head.validate, len(batch)
        )
        counted = xp.reshape(xp.astype(~ignored, dtype), (rows,))
        if class_weight is not None and rows:
            flat = xp.reshape(labels, (rows,))
            counted = counted * ops.take(xp.astype(class_weight, dtype), flat)
        flat_target = xp.reshape(target, (rows,))
    else:
        counted = xp.ones((rows,), dtype=dtype, device=dev)
        flat_target = xp.reshape(target, (rows, classes))
    denominator = None
    if head.reduction == "mean":
        denominator = xp.sum(counted if sample is None else counted * sample)
    return _Plan(
        xp=xp, ops=ops, rows=rows, classes=classes, batch=batch, dtype=dtype,
        out_dtype=head.out_dtype, chunk=head.chunk, vocab_chunk=head.vocab_chunk,
        reduction=head.reduction, ignore_index=head.ignore_index, smoothing=head.smoothing,
        z_loss=head.z_loss, softcap=head.softcap, target=flat_target,
        class_weight=class_weight, sample=sample, denominator=denominator,
    )  # fmt: skip


_RULE = _Rule(loss=_loss, loss_and_grad=_loss_and_grad)
