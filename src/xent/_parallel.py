"""Vocab-parallel cross-entropy: each worker holds a slice of the classes of every row.

The loss needs only per-row numbers from the other workers, exchanged through a
:class:`Collectives` object in two all-reduces: the row max, then (in one buffer) the sum of
exponentials, the target logit (0 on workers that do not hold the label), the target's class
weight and, for label smoothing, the weighted sum of ``shift - x`` over the slice. The gradient
of the local slice is the softmax minus the smoothed target, both known locally once the
forward's per-row stats are, so the backward sends nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from . import _validation
from ._cross_entropy import _readable, _smoothed
from ._typing import Array, Namespace, Reduction
from .backends import Backend, scaled_gap

__all__ = ["Collectives", "cross_entropy", "cross_entropy_and_grad"]

Forward = Callable[[Any, Array], tuple[Array, Any]]
Backward = Callable[[Any, Array, Any, Array], Array]


class Collectives:
    """The communication a vocab-parallel loss needs, over one group of workers.

    Every worker of the group calls each method in the same order with arrays of the same shape
    (the per-row statistics), and gets the reduction over the group back. Bindings subclass it:
    :class:`xent.parallel.TorchGroup` (``torch.distributed``) and
    :class:`xent.parallel.JaxAxis` (a named axis of ``shard_map`` / ``pmap``).
    """

    def all_reduce_max(self, x: Array) -> Array:
        """The elementwise maximum of ``x`` over the group, on every worker."""
        raise NotImplementedError

    def all_reduce_sum(self, x: Array) -> Array:
        """The elementwise sum of ``x`` over the group, on every worker."""
        raise NotImplementedError

    def class_count(self, local: int, like: Array) -> int:
        """The global class count: the sum of every worker's ``local`` count (``like`` is a
        local array, for bindings that must put a buffer on its device)."""
        raise NotImplementedError

    def check_constants(self, arrays: dict[str, Array | None]) -> None:
        """Refuse arrays (class and sample weights) that the framework would differentiate:
        the analytic backward treats them as constants. The default accepts all."""

    def attach_linear_grad(
        self, rule: Any, state: Any, hidden: Array, weight: Array, bias: Array | None
    ) -> Array:
        """``rule.loss(state, hidden, weight, bias)`` of :func:`linear_cross_entropy`, with
        ``rule.loss_and_grad`` as its gradient for the framework's autodiff. The default uses
        the backend's hook (``state.ops``), analytic while the native overrides are on."""
        out: Array = state.ops.linear_custom_grad(rule, state, hidden, weight, bias)
        return out

    def attach_grad(self, forward: Forward, backward: Backward, state: Any, x: Array) -> Array:
        """``forward(state, x)[0]``, with ``backward`` as its derivative for the framework's
        autodiff where it has one. ``backward`` sends nothing; the default computes the value."""
        return forward(state, x)[0]


@dataclass(frozen=True)
class _Problem:
    """Validated options and the local target, shared by the forward and the backward."""

    xp: Namespace
    ops: Backend
    group: Collectives
    axis: int
    classes: int  # global
    dtype: Any
    out_dtype: Any
    smoothing: float
    z_loss: float
    reduction: str
    weight: Array | None  # local (C_local,) slice, reshaped along the class axis
    sample: Array | None  # per-row, class axis kept with size 1
    local_label: Array  # label - class_start, clipped into the slice, class axis of size 1
    mine: Array  # the label lies in this worker's slice
    ignored: Array
    bad: Array


def cross_entropy(
    local_input: Array,
    target: Array,
    /,
    *,
    class_start: int | Array,
    group: Collectives,
    axis: int = -1,
    weight: Array | None = None,
    sample_weight: Array | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    z_loss: float = 0.0,
    xp: Namespace | None = None,
) -> Array:
    r"""Cross-entropy over classes split across the workers of ``group``.

    Each worker holds the logits of classes ``[class_start, class_start + C_local)`` of every
    row; together the slices cover ``[0, C)`` once. Every worker gets the value of
    :func:`xent.cross_entropy` on the concatenated logits, and the gradient of its own slice:

    .. math::

        l_n = (1 - e)\, w_{y_n} (\mathrm{lse}_n - x_{n, y_n})
              + \frac{e}{C} \sum_c w_c (\mathrm{lse}_n - x_{n,c}) + z\, \mathrm{lse}_n^2

    with ``lse`` the log-sum-exp over all ``C`` classes, from all-reduces of the row max and of
    the sum of exponentials; ``x_{n, y_n}`` and ``w_{y_n}`` come from the worker that holds
    the label (an all-reduced sum with 0 elsewhere); the smoothing uses the global ``C``.

    Parameters
    ----------
    local_input : array
        This worker's logits, ``(..., C_local, ...)``, real floating.
    target : array
        Integer class indices in ``[0, C)`` (global), of ``local_input.shape`` without ``axis``,
        the same on every worker.
    class_start : int or 0-d integer array
        The global index of this worker's first class (``jax.lax.axis_index(name) * C_local``
        inside ``shard_map``).
    group : Collectives
        The workers' communication: :class:`xent.parallel.TorchGroup`,
        :class:`xent.parallel.JaxAxis`, or a subclass of :class:`xent.parallel.Collectives`.
    axis : int, default -1
        The class axis.
    weight : array, optional
        This worker's slice of the class weights, shape ``(C_local,)``: the weights of the
        classes it holds, as the slice of logits is.
    sample_weight : array, optional
        Per-example weights broadcastable to the per-example shape, the same on every worker.
    ignore_index, label_smoothing, reduction, z_loss
        As in :func:`xent.cross_entropy`.
    xp : namespace, optional
        The array namespace; inferred from the arrays when omitted.

    Returns
    -------
    array
        The loss, the same on every worker: 0-d for ``"mean"``/``"sum"``, else the per-example
        shape.

    Raises
    ------
    TypeError
        Non-floating ``local_input``, non-integer ``target``, ``class_start`` not an integer.
    ValueError
        As :func:`xent.cross_entropy` (labels outside ``[0, C)`` where they are concrete), and a
        ``class_start`` that puts the slice outside ``[0, C)``.

    Notes
    -----
    Per row, a worker sends one number to the max all-reduce and two (sum of exponentials,
    target logit) to the sum all-reduce, plus one with ``weight`` (the target's weight) and
    one with label smoothing (the slice's weighted sum of ``max - x``); the backward sends
    nothing (see ``docs/parallel.md``). ``weight`` and ``sample_weight`` are constants for
    autodiff: only ``local_input`` gets a gradient.

    Examples
    --------
    A group of one worker holding every class is the ordinary cross-entropy:

    >>> import array_api_strict as xp
    >>> import xent.parallel
    >>> class Alone(xent.parallel.Collectives):
    ...     def all_reduce_max(self, x): return x
    ...     def all_reduce_sum(self, x): return x
    ...     def class_count(self, local, like): return local
    >>> logits = xp.asarray([[2.0, 5.0, 1.0], [7.0, 1.0, 0.5]])
    >>> loss = xent.parallel.cross_entropy(
    ...     logits, xp.asarray([1, 0]), class_start=0, group=Alone())
    >>> round(float(loss), 6), round(float(xent.cross_entropy(logits, xp.asarray([1, 0]))), 6)
    (0.034929, 0.034929)
    """
    p = _problem(
        local_input, target, class_start=class_start, group=group, axis=axis, weight=weight,
        sample_weight=sample_weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
        reduction=reduction, z_loss=z_loss, xp=xp,
    )  # fmt: skip
    loss = group.attach_grad(_forward, _backward, p, local_input)
    return p.ops.finish(loss, local_input, target, weight, sample_weight)


def cross_entropy_and_grad(
    local_input: Array,
    target: Array,
    /,
    *,
    class_start: int | Array,
    group: Collectives,
    axis: int = -1,
    weight: Array | None = None,
    sample_weight: Array | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    z_loss: float = 0.0,
    xp: Namespace | None = None,
) -> tuple[Array, Array]:
    """The vocab-parallel cross-entropy and the gradient of ``sum(loss)`` for the local slice.

    Takes the arguments of :func:`cross_entropy`; the gradient is the slice
    ``[class_start, class_start + C_local)`` of :func:`xent.cross_entropy_and_grad`'s, computed
    without autodiff and without communication beyond the forward's two all-reduces.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import xent.parallel
    >>> class Alone(xent.parallel.Collectives):
    ...     def all_reduce_max(self, x): return x
    ...     def all_reduce_sum(self, x): return x
    ...     def class_count(self, local, like): return local
    >>> loss, grad = xent.parallel.cross_entropy_and_grad(
    ...     xp.asarray([[0.0, 0.0]]), xp.asarray([0]), class_start=0, group=Alone())
    >>> grad
    Array([[-0.5,  0.5]], dtype=array_api_strict.float64)
    """
    p = _problem(
        local_input, target, class_start=class_start, group=group, axis=axis, weight=weight,
        sample_weight=sample_weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
        reduction=reduction, z_loss=z_loss, xp=xp,
    )  # fmt: skip
    loss, saved = _forward(p, local_input)
    grad = _backward(p, local_input, saved, p.xp.ones_like(loss))
    inputs = (local_input, target, weight, sample_weight)
    return p.ops.finish(loss, *inputs), p.ops.finish(grad, *inputs)


# --------------------------------------------------------------------------- preparation
def _problem(
    input: Array,
    target: Array,
    *,
    class_start: int | Array,
    group: Collectives,
    axis: int,
    weight: Array | None,
    sample_weight: Array | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    z_loss: float,
    xp: Namespace | None,
) -> _Problem:
    arrays = {
        "local_input": input, "target": target, "weight": weight, "sample_weight": sample_weight,
    }  # fmt: skip
    xp, ops = _validation.backend(arrays, xp)
    _validation.floating_input(xp, "local_input", input)
    ignore_index = _validation.parallel_options(
        group, Collectives, reduction, label_smoothing, z_loss, ignore_index
    )
    ax = _validation.axis(axis, input.ndim, "local_input")
    _validation.parallel_index_target(xp, input, target, ax)
    local = int(input.shape[ax])
    _validation.parallel_local_classes(local, ax, tuple(input.shape))
    classes = group.class_count(local, input)
    per_row = tuple(input.shape[:ax] + input.shape[ax + 1 :])
    _validation.parallel_slice(xp, class_start, local, classes, weight, sample_weight, per_row)

    dtype = ops.compute_dtype(input.dtype)
    class_shape = tuple(local if i == ax else 1 for i in range(input.ndim))
    w = None if weight is None else xp.reshape(xp.astype(weight, dtype), class_shape)
    sample = None
    if sample_weight is not None:
        sample = xp.broadcast_to(xp.astype(sample_weight, dtype), per_row)
        sample = xp.expand_dims(sample, axis=ax)

    local_label, mine, ignored, bad = (
        xp.expand_dims(a, axis=ax)
        for a in _local_labels(xp, ops, target, class_start, local, classes, ignore_index)
    )
    return _Problem(
        xp=xp, ops=ops, group=group, axis=ax, classes=classes, dtype=dtype, out_dtype=input.dtype,
        smoothing=float(label_smoothing), z_loss=float(z_loss), reduction=reduction, weight=w,
        sample=sample, local_label=local_label, mine=mine, ignored=ignored, bad=bad,
    )  # fmt: skip


def _local_labels(
    xp: Namespace,
    ops: Backend,
    target: Array,
    class_start: int | Array,
    local: int,
    classes: int,
    ignore_index: int,
) -> tuple[Array, Array, Array, Array]:
    """The label within this worker's slice (0 where it is not there), whether the slice holds
    it, whether it is ignored, whether it is out of range (raised here where readable)."""
    index_dtype = ops.index_dtype()
    y = xp.astype(target, index_dtype, copy=False)
    info = xp.iinfo(index_dtype)
    ignored = y == ignore_index if info.min <= ignore_index <= info.max else y != y
    valid = (y >= 0) & (y < classes)
    bad = ~valid & ~ignored
    if _readable(ops, target, bad, force=False):
        _validation.raise_on_bad_labels(xp, target, bad, classes, ignore_index)
    start = class_start if isinstance(class_start, int) else xp.astype(class_start, index_dtype)
    local_label, mine = _in_slice(xp, y, valid, start, local)
    return local_label, mine, ignored, bad


def _in_slice(
    xp: Namespace, labels: Array, valid: Array, start: int | Array, local: int
) -> tuple[Array, Array]:
    """The labels within the slice of ``local`` classes from ``start`` (0 where they are not
    there), and whether the slice holds them (only ``valid`` ones count)."""
    shifted = labels - start
    mine = valid & (shifted >= 0) & (shifted < local)
    return xp.where(mine, shifted, xp.zeros_like(shifted)), mine


# --------------------------------------------------------------------------- forward
@dataclass(frozen=True)
class _Stats:
    """The all-reduced per-row numbers (class axis kept with size 1) and the weight total."""

    shift: Array  # the row max over all classes (0 where it is not finite)
    log_sum: Array  # log of the sum of exp(x - shift) over all classes
    target: Array  # x at the label
    label_weight: Array | None  # weight at the label
    spread: Array | None  # sum_c (e / C) w_c (shift - x_c) over all classes
    weight_total: Array | float  # sum_c w_c (C without weights)
    denominator: Array | None  # what "mean" divides by


def _stats(p: _Problem, x: Array) -> _Stats:
    xp, group = p.xp, p.group
    shift = _shift(xp, group.all_reduce_max(xp.max(x, axis=p.axis, keepdims=True)))
    parts = _sums(p, x, shift)
    scalars = 0
    if p.smoothing and p.weight is not None:
        parts.append(xp.reshape(xp.sum(p.weight), (1,)))
        scalars = 1
    # One buffer, one all-reduce: the per-row parts side by side, then the scalars.
    rows = math.prod(shift.shape)
    flat = xp.concat([xp.reshape(part, (-1,)) for part in parts])
    total = group.all_reduce_sum(flat)
    split = [
        xp.reshape(total[i * rows : (i + 1) * rows], shift.shape)
        for i in range(len(parts) - scalars)
    ]
    weight_total: Array | float = total[-1] if scalars else float(p.classes)
    s = _from_sums(p, shift, split, weight_total)
    if p.reduction == "mean":
        counted = xp.astype(~p.ignored, p.dtype)
        base = counted if s.label_weight is None else counted * s.label_weight
        s = replace(s, denominator=xp.sum(base if p.sample is None else base * p.sample))
    return s


def _shift(xp: Namespace, peak: Array) -> Array:
    """The row max where it is finite, else 0: the shift of the exponentials."""
    return xp.where(xp.isfinite(peak), peak, xp.zeros_like(peak))


def _sums(p: _Problem, x: Array, shift: Array) -> list[Array]:
    """This slice's per-row sums, to be added over all slices: of ``exp(x - shift)``, the logit
    at the label and (with ``weight``) its class weight (both 0 where the slice lacks the
    label), and (with label smoothing) the weighted gaps ``shift - x``, in that order."""
    xp, ops = p.xp, p.ops
    zero = xp.zeros_like(shift)
    sums = [
        ops.class_sum(lambda x, s: xp.exp(x - s), (x, shift), p.axis),
        xp.where(p.mine, ops.take_along_axis(x, p.local_label, p.axis), zero),
    ]
    if p.weight is not None:
        at_label = ops.take(xp.reshape(p.weight, (-1,)), p.local_label)
        sums.append(xp.where(p.mine, at_label, zero))
    if p.smoothing:
        # The smoothing's share, each class's term scaled before the sum: finite wherever
        # the share is, as on xent's general path (`_cross_entropy._spread`).
        share = p.smoothing / p.classes
        a = share if p.weight is None else p.weight * share
        sums.append(ops.class_sum(scaled_gap, (shift, x, a), p.axis))
    return sums


def _from_sums(p: _Problem, shift: Array, sums: list[Array], weight_total: Array | float) -> _Stats:
    """The statistics from the sums of :func:`_sums` over all classes (no denominator)."""
    return _Stats(
        shift=shift, log_sum=p.xp.log(sums[0]), target=sums[1],
        label_weight=sums[2] if p.weight is not None else None,
        spread=sums[-1] if p.smoothing else None, weight_total=weight_total, denominator=None,
    )  # fmt: skip


def _forward(p: _Problem, input: Array) -> tuple[Array, tuple[Array, _Stats]]:
    xp = p.xp
    with p.ops.quiet():
        x = xp.astype(input, p.dtype, copy=False)
        s = _stats(p, x)
        rows = _rows(p, s)
        if p.reduction == "none":
            loss = xp.squeeze(rows, axis=p.axis)
        else:
            loss = xp.sum(rows)
            if s.denominator is not None:
                loss = loss / s.denominator
    return xp.astype(loss, p.out_dtype, copy=False), (x, s)


def _rows(p: _Problem, s: _Stats) -> Array:
    """Each row's loss (class axis of size 1, times its sample weight) from the statistics."""
    xp = p.xp
    rows = s.log_sum - (s.target - s.shift)
    if s.label_weight is not None:
        rows = rows * s.label_weight
    if s.spread is not None:
        spread = s.spread + ((p.smoothing / p.classes) * s.weight_total) * s.log_sum
        rows = _smoothed(rows, spread, p.smoothing)
    if p.z_loss:
        lse = s.shift + s.log_sum
        rows = rows + p.z_loss * lse * lse
    rows = xp.where(p.ignored, xp.zeros_like(rows), rows)
    rows = xp.where(p.bad, xp.full_like(rows, math.nan), rows)
    return rows if p.sample is None else rows * p.sample


# --------------------------------------------------------------------------- backward
def _backward(p: _Problem, input: Array, saved: tuple[Array, _Stats], cotangent: Array) -> Array:
    """``d (loss . cotangent) / d local_input``: the local slice of softmax minus the smoothed,
    weighted target, from the forward's all-reduced stats alone."""
    xp, ops = p.xp, p.ops
    x, s = saved
    with ops.quiet():
        r = xp.astype(cotangent, p.dtype, copy=False)
        if p.reduction == "none":
            r = xp.expand_dims(r, axis=p.axis)
        elif s.denominator is not None:
            r = r / s.denominator
        if p.sample is not None:
            r = r * p.sample
        # An ignored row's gradient is 0 times its softmax (NaN where the softmax is), as in
        # the unsplit cross-entropy.
        r = xp.where(p.ignored, xp.zeros_like(r), r)
        on_label = r * (1.0 - p.smoothing)
        if s.label_weight is not None:
            on_label = on_label * s.label_weight
        total = on_label
        if p.smoothing:
            total = total + r * ((p.smoothing / p.classes) * s.weight_total)
        if p.z_loss:
            total = total + (2.0 * p.z_loss) * r * (s.shift + s.log_sum)
        g = xp.exp((x - s.shift) - s.log_sum) * total
        at_label = xp.where(p.mine, on_label, xp.zeros_like(on_label))
        g = ops.subtract_at(g, p.local_label, at_label, p.axis)
        if p.smoothing:
            spread = r * (p.smoothing / p.classes)
            g = g - (spread if p.weight is None else spread * p.weight)
        g = ops.fill_rows(g, p.bad, math.nan)
    return xp.astype(g, input.dtype, copy=False)
