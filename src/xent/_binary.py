"""Binary cross-entropy, element-wise, and its analytic gradient."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import _validation
from ._typing import Array, Namespace, Reduction
from .backends import Backend, BinaryOptions, GradRule, lookup, namespace_of

__all__ = ["binary_cross_entropy", "binary_cross_entropy_and_grad"]


@dataclass(frozen=True)
class _Problem:
    xp: Namespace
    ops: Backend
    dtype: Any
    out_dtype: Any
    from_logits: bool
    eps: float
    reduction: str
    target: Array  # smoothed, in the compute dtype
    weight: Array | None
    pos_weight: Array | None
    count: float | None  # element count; None where Dask does not know it yet


def binary_cross_entropy(
    input: Array,
    target: Array,
    /,
    *,
    from_logits: bool = True,
    weight: Array | None = None,
    pos_weight: Array | None = None,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    eps: float = 1e-7,
    xp: Namespace | None = None,
) -> Array:
    r"""Element-wise binary cross-entropy, from logits by default.

    With ``y`` smoothed to ``y (1 - e) + e / 2``:

    .. math:: l = -w\,\bigl(p_w\, y \log\sigma(x) + (1 - y) \log\sigma(-x)\bigr)

    computed as ``log_sigmoid(x) = -softplus(-x)``, so logits up to the dtype's max never
    overflow. ``from_logits=False`` takes probabilities, clipped to ``[eps, 1 - eps]``.

    Parameters
    ----------
    input : array
        Logits (or probabilities), real floating; float16/bfloat16 are computed in float32.
    target : array
        Same shape as ``input``: bool, integer 0/1, or floating in ``[0, 1]``.
    from_logits : bool, default True
        False: ``input`` holds probabilities (Keras' ``BinaryCrossentropy``).
    weight : array, optional
        Element weights, broadcastable to ``input``.
    pos_weight : array, optional
        Weight of the positive term, broadcastable to ``input`` (PyTorch's ``pos_weight``).
    label_smoothing : float, default 0.0
        ``e`` in ``[0, 1]``.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` is the plain mean over all elements.
    eps : float, default 1e-7
        Probability clip for ``from_logits=False``, in ``(0, 0.5)``.
    xp : namespace, optional
        The array namespace; inferred from the arrays when omitted.

    Returns
    -------
    array
        0-d for ``"mean"``/``"sum"``, else ``input``'s shape; ``input``'s namespace, device and
        dtype.

    Raises
    ------
    TypeError
        Non-floating ``input``, a complex target, non-arrays, mixed libraries or devices.
    ValueError
        Mismatched shapes, options out of range.

    Notes
    -----
    Equals ``torch.nn.functional.binary_cross_entropy_with_logits(input, target, weight,
    reduction=..., pos_weight=...)``.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import xent
    >>> loss = xent.binary_cross_entropy(xp.asarray([0.0, 2.0]), xp.asarray([1.0, 0.0]))
    >>> round(float(loss), 6)  # (log(2) + log(1 + e**2)) / 2
    1.410038
    """
    c = _check(
        input, target, from_logits=from_logits, weight=weight, pos_weight=pos_weight,
        label_smoothing=label_smoothing, reduction=reduction, eps=eps, xp=xp,
    )  # fmt: skip
    if from_logits:
        # A backend may hand logits to a fused kernel of the same semantics; it declines
        # (None) where its result is not finite, whose elements come from below.
        options = BinaryOptions(weight, pos_weight, c.smoothing, reduction)
        loss = c.ops.fused_binary_loss(input, target, options)
        if loss is not None:
            return loss
    p = _problem(input, target, c, weight=weight, pos_weight=pos_weight)
    loss = p.ops.custom_grad(_RULE, p, input, others=(target, weight, pos_weight))
    return p.ops.finish(loss, input, target, weight, pos_weight)


def binary_cross_entropy_and_grad(
    input: Array,
    target: Array,
    /,
    *,
    from_logits: bool = True,
    weight: Array | None = None,
    pos_weight: Array | None = None,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    eps: float = 1e-7,
    xp: Namespace | None = None,
) -> tuple[Array, Array]:
    r"""The binary cross-entropy and its gradient with respect to ``input``.

    Takes the options of :func:`binary_cross_entropy`. From logits the gradient of ``sum(loss)``
    is ``w (sigmoid(x) (p_w y + 1 - y) - p_w y)``, divided by the element count for ``"mean"``.

    Returns
    -------
    loss : array
        As :func:`binary_cross_entropy` returns it.
    grad : array
        ``d sum(loss) / d input``, of ``input``'s shape, dtype, namespace and device.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import xent
    >>> loss, grad = xent.binary_cross_entropy_and_grad(xp.asarray([0.0]), xp.asarray([1.0]))
    >>> grad
    Array([-0.5], dtype=array_api_strict.float64)
    """
    c = _check(
        input, target, from_logits=from_logits, weight=weight, pos_weight=pos_weight,
        label_smoothing=label_smoothing, reduction=reduction, eps=eps, xp=xp,
    )  # fmt: skip
    if from_logits:
        options = BinaryOptions(weight, pos_weight, c.smoothing, reduction)
        both = c.ops.fused_binary_loss_and_grad(input, target, options)
        if both is not None:
            return both
    p = _problem(input, target, c, weight=weight, pos_weight=pos_weight)
    loss, _ = _forward(p, input)
    grad = _backward(p, input, None, p.xp.ones_like(loss))
    inputs = (input, target, weight, pos_weight)
    return p.ops.finish(loss, *inputs), p.ops.finish(grad, *inputs)


class _Checked(NamedTuple):
    """Arguments that passed every check, scalar options as Python numbers."""

    xp: Namespace
    ops: Backend
    from_logits: bool
    smoothing: float
    eps: float
    reduction: str


_CHECKED: dict[tuple[Any, ...], _Checked] = {}
"""Answers of :func:`_check` that passed, by everything they depend on (see there)."""


def _check(
    input: Array,
    target: Array,
    *,
    from_logits: bool,
    weight: Array | None,
    pos_weight: Array | None,
    label_smoothing: float,
    reduction: str,
    eps: float,
    xp: Namespace | None,
) -> _Checked:
    """Every check; a passing answer is remembered as :func:`xent.cross_entropy` remembers its
    own: for arrays of a registered class, concrete, and options of plain Python scalars, under
    those options, the arrays' types, dtypes and shapes and the backend; a call that finds it
    still checks what the key does not hold (dense layout, one device)."""
    key = None
    found = None if xp is not None else namespace_of(input)
    if found is not None and not lookup(found).is_traced(input):
        ops = lookup(found)
        try:
            key = (
                from_logits, label_smoothing, reduction, eps, type(from_logits),
                type(label_smoothing), type(reduction), type(eps), type(input), type(target),
                input.dtype, target.dtype, input.shape, target.shape, ops,
                None if weight is None else (type(weight), weight.dtype, weight.shape),
                None if pos_weight is None else (type(pos_weight), pos_weight.dtype, pos_weight.shape),
            )  # fmt: skip
            checked = _CHECKED.get(key)
        except (AttributeError, TypeError):  # a target that is no array; an array option
            checked = key = None
        if checked is not None:
            extra = {"weight": weight, "pos_weight": pos_weight}
            if not ops.dense_together(input, target) or any(
                a is not None and not ops.dense_together(input, a) for a in extra.values()
            ):
                given = {"input": input, "target": target}
                given.update((k, a) for k, a in extra.items() if a is not None)
                _validation.dense(ops, given)
                _validation.same_device(ops, given)
            return checked
        if key is not None and (
            not _validation.plain_scalars(key[4:8])
            or any(
                a is not None and namespace_of(a) is not found for a in (target, weight, pos_weight)
            )
        ):
            key = None
    arrays = {"input": input, "target": target, "weight": weight, "pos_weight": pos_weight}
    xp, ops = _validation.backend(arrays, xp)
    _validation.floating_input(xp, "input", input)
    _validation.reduction(reduction)
    label_smoothing, eps, _, _ = _validation.options(
        label_smoothing=label_smoothing, eps=eps, from_logits=from_logits
    )
    shape = tuple(input.shape)
    _validation.binary_target(xp, target, shape)
    _validation.broadcastable("weight", weight, shape, "the input's shape")
    _validation.broadcastable("pos_weight", pos_weight, shape, "the input's shape")
    _validation.real_weights(xp, "weight", weight)
    _validation.real_weights(xp, "pos_weight", pos_weight)
    checked = _Checked(xp, ops, from_logits, label_smoothing, eps, reduction)
    if key is not None:
        _validation.remember(_CHECKED, key, checked)
    return checked


def _problem(
    input: Array,
    target: Array,
    c: _Checked,
    *,
    weight: Array | None,
    pos_weight: Array | None,
) -> _Problem:
    xp, ops = c.xp, c.ops
    shape = tuple(input.shape)
    dtype = ops.compute_dtype(input.dtype)
    y = xp.astype(target, dtype)
    if c.smoothing:
        y = y * (1.0 - c.smoothing) + c.smoothing / 2
    return _Problem(
        xp=xp, ops=ops, dtype=dtype, out_dtype=input.dtype, from_logits=c.from_logits,
        eps=float(c.eps), reduction=c.reduction, target=y,
        weight=None if weight is None else xp.astype(weight, dtype),
        pos_weight=None if pos_weight is None else xp.astype(pos_weight, dtype),
        count=float(math.prod(shape)) if _validation.known_shape(shape) else None,
    )  # fmt: skip


def _log_terms(p: _Problem, x: Array) -> tuple[Array, Array]:
    """``(log p, log(1 - p))`` from logits or from clipped probabilities."""
    xp = p.xp
    if p.from_logits:
        # softplus(z) = max(z, 0) + log1p(exp(-|z|)) never overflows. max and |.| take the
        # same branch (x >= 0) so that autodiff's subgradients add up to sigmoid(0) = 0.5 at 0.
        zero = xp.zeros_like(x)
        right = x >= 0
        tail = xp.log1p(xp.exp(-xp.where(right, x, -x)))
        return -(xp.where(right, zero, -x) + tail), -(xp.where(right, x, zero) + tail)
    prob = xp.clip(x, min=p.eps, max=1.0 - p.eps)
    return xp.log(prob), xp.log(1.0 - prob)


def _forward(p: _Problem, input: Array) -> tuple[Array, None]:
    xp = p.xp
    with p.ops.quiet():
        x = xp.astype(input, p.dtype, copy=False)
        log_pos, log_neg = _log_terms(p, x)
        pos = p.target * log_pos
        if p.pos_weight is not None:
            pos = p.pos_weight * pos
        loss = -(pos + (1.0 - p.target) * log_neg)
        if p.weight is not None:
            loss = p.weight * loss
        loss = _full_shape(xp, loss, x)
        if p.reduction != "none":
            loss = xp.sum(loss) / _count(p, loss) if p.reduction == "mean" else xp.sum(loss)
        loss = xp.astype(loss, p.out_dtype, copy=False)  # float16 overflow: inf, no warning
    return loss, None


def _full_shape(xp: Namespace, a: Array, x: Array) -> Array:
    """``a`` broadcast to ``x``'s shape (where Dask knows the sizes; ``a`` is computed from
    ``x`` element-wise, so it has them already)."""
    if tuple(a.shape) == tuple(x.shape) or not _validation.known_shape(x.shape):
        return a
    return xp.broadcast_to(a, x.shape)


def _count(p: _Problem, loss: Array) -> Array | float:
    """What ``"mean"`` divides by: the element count (NaN for none), lazily where unknown."""
    if p.count is None:
        return p.xp.sum(p.xp.ones_like(loss))
    return p.count if p.count else math.nan


def _backward(p: _Problem, input: Array, saved: None, cotangent: Array) -> Array:
    xp = p.xp
    with p.ops.quiet():
        x = xp.astype(input, p.dtype, copy=False)
        r = xp.astype(cotangent, p.dtype, copy=False)
        if p.reduction == "mean":
            r = r / _count(p, x)
        y = p.target
        pos = y if p.pos_weight is None else p.pos_weight * y
        if p.from_logits:
            g = (pos + (1.0 - y)) / (1.0 + xp.exp(-x)) - pos
        else:
            prob = xp.clip(x, min=p.eps, max=1.0 - p.eps)
            inside = (x >= p.eps) & (x <= 1.0 - p.eps)
            g = xp.where(inside, (1.0 - y) / (1.0 - prob) - pos / prob, xp.zeros_like(x))
        g = g * r
        if p.weight is not None:
            g = g * p.weight
        g = _full_shape(xp, g, x)
        return xp.astype(g, input.dtype, copy=False)


def _tangent(p: _Problem, input: Array, saved: None, dx: Array) -> Array:
    """``(d loss / d input) dx``: each element's loss depends on that element alone."""
    xp = p.xp
    shape = tuple(input.shape) if p.reduction == "none" else ()
    ones = xp.ones(shape, dtype=p.dtype, device=p.ops.device(input))
    g = xp.astype(_backward(p, input, saved, ones), p.dtype, copy=False)
    t = g * xp.astype(dx, p.dtype, copy=False)
    if p.reduction != "none":
        t = xp.sum(t)
    return xp.astype(t, p.out_dtype, copy=False)


_RULE = GradRule(forward=_forward, backward=_backward, tangent=_tangent)
