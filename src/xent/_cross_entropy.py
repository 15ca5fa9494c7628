"""Cross-entropy over a class axis, and its analytic gradient.

One algorithm for every namespace: validate, form log-probabilities (``x - logsumexp(x)``, or
``log(clip(p))`` for probability inputs), take the target term, weight, reduce. The backend
supplies the primitives (``logsumexp``, the gather, the in-place scatter of the gradient) and,
where the framework has autodiff, attaches :func:`_backward` as the analytic gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

from . import _validation
from ._typing import Array, Namespace, Reduction
from .backends import Backend, GradRule, lookup

__all__ = ["cross_entropy", "cross_entropy_and_grad"]


@dataclass(frozen=True)
class _Problem:
    """Validated options and the target prepared once, shared by forward and backward."""

    xp: Namespace
    ops: Backend
    axis: int
    classes: int
    dtype: Any
    out_dtype: Any
    from_logits: bool
    softcap: float | None
    eps: float
    smoothing: float
    z_loss: float
    reduction: str
    empty: bool  # no rows at all: every per-row quantity is empty
    weight: Array | None  # (C,) reshaped to broadcast along the class axis
    weight_total: Array | float  # sum of the class weights (C without weights)
    sample: Array | None  # per-row sample weights, class axis kept with size 1
    denominator: Array | None  # what "mean" divides by
    labels: Array | None  # class indices, safe to gather, class axis kept with size 1
    label_weight: Array | None  # weight[label]
    ignored: Array | None
    bad: Array | None
    probs: Array | None  # probability targets in the compute dtype


def cross_entropy(
    input: Array,
    target: Array,
    /,
    *,
    axis: int = -1,
    from_logits: bool = True,
    weight: Array | None = None,
    sample_weight: Array | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    z_loss: float = 0.0,
    softcap: float | None = None,
    eps: float = 1e-7,
    validate: bool | None = None,
    xp: Namespace | None = None,
) -> Array:
    r"""Cross-entropy between logits (or probabilities) and class indices or probabilities.

    With ``lp = log_softmax(x)`` along ``axis`` (``x = softcap * tanh(input / softcap)`` when
    ``softcap`` is set), smoothing ``e``, class weights ``w`` and ``C`` classes:

    .. math::

        l_n = (1 - e)\,(-w_{y_n}\, lp_{n, y_n}) + \frac{e}{C} \sum_c (-w_c\, lp_{n,c})
              \qquad\text{(class indices)}

        l_n = -\sum_c w_c\, q_{n,c}\, lp_{n,c},\quad q = (1 - e)\,t + e / C
              \qquad\text{(probabilities; a term with } q = 0 \text{ is } 0\text{)}

    plus ``z_loss * logsumexp(x)**2`` per row, times ``sample_weight``. The target's dtype says
    which form it is: integers are class indices, floats are probabilities.

    Parameters
    ----------
    input : array
        Logits (or probabilities with ``from_logits=False``) of shape ``(..., C, ...)``, real
        floating. float16/bfloat16 are computed in float32 and the result cast back.
    target : array
        Integer class indices of ``input.shape`` without ``axis``, or floating class
        probabilities of ``input.shape``.
    axis : int, default -1
        The class axis (``1`` matches PyTorch's ``(N, C, d1, ...)`` layout).
    from_logits : bool, default True
        False: ``input`` holds probabilities, renormalised along ``axis`` and clipped to
        ``[eps, 1 - eps]`` before the log (Keras' rule).
    weight : array, optional
        Class weights of shape ``(C,)`` (PyTorch's ``weight``).
    sample_weight : array, optional
        Per-example weights broadcastable to ``input.shape`` without ``axis``.
    ignore_index : int, default -100
        Class-index targets equal to it contribute 0 and are left out of the mean.
    label_smoothing : float, default 0.0
        ``e`` in ``[0, 1]``.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides ``sum(l)`` by ``sum_n s_n * w[y_n]`` over rows not ignored (class
        indices) or by ``sum_n s_n`` (probabilities), as PyTorch does; empty or all-ignored
        input gives NaN.
    z_loss : float, default 0.0
        Coefficient of the ``logsumexp(x)**2`` auxiliary term (PaLM); 0 on ignored rows.
    softcap : float, optional
        Cap logits smoothly to ``(-softcap, softcap)`` with ``softcap * tanh(x / softcap)``.
    eps : float, default 1e-7
        Probability clip for ``from_logits=False``, in ``(0, 0.5)``.
    validate : bool or None, default None
        None checks labels wherever their values are concrete and on the host; True also
        where it costs a device sync or a Dask compute; False never. Unchecked invalid labels
        give a NaN loss, never a plausible number.
    xp : namespace, optional
        The array namespace; inferred from the arrays when omitted.

    Returns
    -------
    array
        The loss in ``input``'s namespace, device and dtype: 0-d for ``"mean"``/``"sum"``, else
        ``input.shape`` without ``axis``.

    Raises
    ------
    TypeError
        Non-floating ``input``; a target that is neither integer nor floating; non-arrays;
        arrays of different libraries or devices.
    ValueError
        Shapes that fit neither target form, labels outside ``[0, C)``, options out of range.

    Notes
    -----
    Equals ``torch.nn.functional.cross_entropy(input, target, weight, ignore_index=...,
    reduction=..., label_smoothing=...)`` with ``axis=1``; with ``from_logits=False`` it equals
    Keras' ``(Sparse)CategoricalCrossentropy``. ``-inf`` logits mask classes: fine off-target,
    ``+inf`` loss on the target, NaN when a whole row is ``-inf``.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import xent
    >>> logits = xp.asarray([[2.0, 5.0, 1.0], [7.0, 1.0, 0.5]])
    >>> xent.cross_entropy(logits, xp.asarray([1, 0]))
    Array(0.03492907, dtype=array_api_strict.float64)
    """
    checked = _check(
        input, target, axis=axis, from_logits=from_logits, weight=weight,
        sample_weight=sample_weight, label_smoothing=label_smoothing, reduction=reduction,
        z_loss=z_loss, softcap=softcap, eps=eps, validate=validate, xp=xp,
    )  # fmt: skip
    xp, ops, ax, kind = checked
    if kind == "index" and from_logits and softcap is None and not z_loss and sample_weight is None:
        # A backend may hand the plain case to a fused kernel of the same semantics; it
        # declines (None) wherever a label is invalid, so errors and NaNs come from below.
        loss = ops.fused_index_loss(
            input, target, axis=ax, weight=weight, ignore_index=ignore_index,
            label_smoothing=float(label_smoothing), reduction=reduction,
        )  # fmt: skip
        if loss is not None:
            return loss
    p = _problem(
        input, target, checked, from_logits=from_logits, weight=weight,
        sample_weight=sample_weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
        reduction=reduction, z_loss=z_loss, softcap=softcap, eps=eps, validate=validate,
    )  # fmt: skip
    return p.ops.custom_grad(_RULE, p, input, others=(target, weight, sample_weight))


def cross_entropy_and_grad(
    input: Array,
    target: Array,
    /,
    *,
    axis: int = -1,
    from_logits: bool = True,
    weight: Array | None = None,
    sample_weight: Array | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    z_loss: float = 0.0,
    softcap: float | None = None,
    eps: float = 1e-7,
    validate: bool | None = None,
    xp: Namespace | None = None,
) -> tuple[Array, Array]:
    r"""The cross-entropy and its gradient with respect to ``input``, in one pass.

    Takes the options of :func:`cross_entropy`. The gradient is that of ``sum(loss)``; with
    logits and class indices it is, per row,

    .. math::

        \frac{\partial l_n}{\partial x_{n,j}} = s_n \Bigl(\mathrm{softmax}(x)_{n,j}\,
        \bigl(\textstyle\sum_c a_{n,c} + 2 z\, \mathrm{lse}_n\bigr) - a_{n,j}\Bigr),\quad
        a_{n,c} = (1 - e)\, w_{y_n} [c = y_n] + \tfrac{e}{C}\, w_c

    divided by the mean's denominator for ``"mean"``, 0 on ignored rows, chained through
    ``softcap`` and through the renormalise-and-clip of ``from_logits=False``. No autodiff is
    needed, so NumPy, CuPy and Dask users can train with it.

    Returns
    -------
    loss : array
        As :func:`cross_entropy` returns it.
    grad : array
        ``d sum(loss) / d input``, of ``input``'s shape, dtype, namespace and device.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import xent
    >>> loss, grad = xent.cross_entropy_and_grad(xp.asarray([[0.0, 0.0]]), xp.asarray([0]))
    >>> grad
    Array([[-0.5,  0.5]], dtype=array_api_strict.float64)
    """
    checked = _check(
        input, target, axis=axis, from_logits=from_logits, weight=weight,
        sample_weight=sample_weight, label_smoothing=label_smoothing, reduction=reduction,
        z_loss=z_loss, softcap=softcap, eps=eps, validate=validate, xp=xp,
    )  # fmt: skip
    xp, ops, ax, kind = checked
    if kind == "index" and from_logits and softcap is None and not z_loss and sample_weight is None:
        both = ops.fused_index_loss_and_grad(
            input, target, axis=ax, weight=weight, ignore_index=ignore_index,
            label_smoothing=float(label_smoothing), reduction=reduction,
        )  # fmt: skip
        if both is not None:
            return both
    p = _problem(
        input, target, checked, from_logits=from_logits, weight=weight,
        sample_weight=sample_weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
        reduction=reduction, z_loss=z_loss, softcap=softcap, eps=eps, validate=validate,
    )  # fmt: skip
    loss, saved = _forward(p, input)
    return loss, _backward(p, input, saved, p.xp.ones_like(loss))


# --------------------------------------------------------------------------- preparation
_Checked = tuple[Namespace, Backend, int, str]
"""``(xp, ops, axis, kind)`` of arguments that passed every check."""


def _check(
    input: Array,
    target: Array,
    *,
    axis: int,
    from_logits: bool,
    weight: Array | None,
    sample_weight: Array | None,
    label_smoothing: float,
    reduction: str,
    z_loss: float,
    softcap: float | None,
    eps: float,
    validate: bool | None,
    xp: Namespace | None,
) -> _Checked:
    """Every check that reads no label values; ``kind`` is ``"index"`` or ``"prob"``."""
    arrays = {"input": input, "target": target, "weight": weight, "sample_weight": sample_weight}
    xp = _validation.namespace(arrays, xp)
    ops = lookup(xp)
    _validation.same_device(ops, arrays)
    _validation.floating_input(xp, "input", input)
    ax = _validation.axis(axis, input.ndim)
    _validation.reduction(reduction)
    _validation.options(
        label_smoothing=label_smoothing, eps=eps, from_logits=from_logits, z_loss=z_loss,
        softcap=softcap, validate=validate,
    )  # fmt: skip
    kind = _validation.target_kind(xp, input, target, ax)
    classes = int(input.shape[ax])
    if classes == 0:
        raise ValueError(
            f"`input` must have at least one class along axis {ax}, got shape {tuple(input.shape)}"
        )
    _validation.class_weight(weight, classes)
    per_row = tuple(input.shape[:ax] + input.shape[ax + 1 :])
    _validation.broadcastable("sample_weight", sample_weight, per_row, "the per-example shape")
    if weight is not None and not xp.isdtype(weight.dtype, ("real floating", "integral")):
        raise TypeError(f"`weight` must hold real numbers, got dtype {weight.dtype}")
    return xp, ops, ax, kind


def _problem(
    input: Array,
    target: Array,
    checked: _Checked,
    *,
    from_logits: bool,
    weight: Array | None,
    sample_weight: Array | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    z_loss: float,
    softcap: float | None,
    eps: float,
    validate: bool | None,
) -> _Problem:
    xp, ops, ax, kind = checked
    classes = int(input.shape[ax])
    per_row = tuple(input.shape[:ax] + input.shape[ax + 1 :])
    dtype = ops.compute_dtype(input.dtype)
    dev = ops.device(input)
    empty = math.prod(per_row) == 0
    class_shape = tuple(classes if i == ax else 1 for i in range(input.ndim))
    w = None if weight is None else xp.reshape(xp.astype(weight, dtype), class_shape)
    sample = None
    if sample_weight is not None:
        sample = xp.broadcast_to(xp.astype(sample_weight, dtype), per_row)
        sample = xp.expand_dims(sample, axis=ax)

    labels = label_weight = ignored = bad = probs = None
    if kind == "index":
        labels, ignored, bad = _labels(xp, ops, target, classes, ignore_index, validate, ax)
        if weight is not None:
            label_weight = (
                xp.zeros(labels.shape, dtype=dtype, device=dev)
                if empty
                else ops.take(xp.astype(weight, dtype), labels)
            )
        counted = xp.astype(~ignored, dtype)
        base = counted if label_weight is None else counted * label_weight
        denominator = xp.sum(base if sample is None else base * sample)
    else:
        probs = xp.astype(target, dtype)
        if sample is None:
            denominator = xp.asarray(float(math.prod(per_row)), dtype=dtype, device=dev)
        else:
            denominator = xp.sum(sample)
    return _Problem(
        xp=xp, ops=ops, axis=ax, classes=classes, dtype=dtype, out_dtype=input.dtype,
        from_logits=from_logits, softcap=None if softcap is None else float(softcap),
        eps=float(eps), smoothing=float(label_smoothing), z_loss=float(z_loss),
        reduction=reduction, empty=empty, weight=w,
        weight_total=float(classes) if w is None else xp.sum(w),
        sample=sample, denominator=denominator if reduction == "mean" else None,
        labels=labels, label_weight=label_weight, ignored=ignored, bad=bad, probs=probs,
    )  # fmt: skip


def _labels(
    xp: Namespace,
    ops: Backend,
    target: Array,
    classes: int,
    ignore_index: int,
    validate: bool | None,
    ax: int,
) -> tuple[Array, Array, Array]:
    """Safe gather indices and the ignored/invalid masks, class axis kept with size 1."""
    index_dtype = ops.index_dtype()
    y = xp.astype(target, index_dtype, copy=False)
    info = xp.iinfo(index_dtype)
    if info.min <= ignore_index <= info.max:
        ignored = y == ignore_index
    else:
        ignored = xp.zeros(y.shape, dtype=xp.bool, device=ops.device(target))
    valid = (y >= 0) & (y < classes)
    bad = ~valid & ~ignored
    # Under jit a label array captured from outside is concrete while `bad`, built inside the
    # trace, is not; both must be readable.
    if validate is not False and _readable(ops, target, bad, force=validate is True):
        _validation.raise_on_bad_labels(xp, target, bad, classes, ignore_index)
    safe = xp.where(valid, y, xp.zeros_like(y))
    expand = partial(xp.expand_dims, axis=ax)
    return expand(safe), expand(ignored), expand(bad)


def _readable(ops: Backend, x: Array, derived: Array, *, force: bool) -> bool:
    if ops.is_traced(x) or ops.is_traced(derived):
        return False
    return force or (not ops.is_lazy(x) and ops.on_host(x))


# --------------------------------------------------------------------------- forward
_Stats = tuple[Array, Array]
"""``(shift, log_sum)``: the row's log-sum-exp is ``shift + log_sum``."""


def _log_input(p: _Problem, input: Array) -> tuple[Array, _Stats | None]:
    """``(x, stats)`` with ``lp = (x - shift) - log_sum``; stats None when ``x`` is ``lp``."""
    xp = p.xp
    x = xp.astype(input, p.dtype, copy=False)
    if not p.from_logits:
        prob = x / xp.sum(x, axis=p.axis, keepdims=True)
        return xp.log(xp.clip(prob, min=p.eps, max=1.0 - p.eps)), None
    if p.softcap is not None:
        x = p.softcap * xp.tanh(x / p.softcap)
    if p.empty:
        return x, None
    return x, p.ops.logsumexp(x, p.axis)


def _forward(p: _Problem, input: Array) -> tuple[Array, tuple[Array, _Stats | None]]:
    xp = p.xp
    with p.ops.quiet():
        x, stats = _log_input(p, input)
        if p.empty:
            # Skip reductions over no rows (Dask gets the shapes of empty reductions wrong).
            shape = tuple(1 if i == p.axis else n for i, n in enumerate(x.shape))
            rows = xp.zeros(shape, dtype=p.dtype, device=p.ops.device(x))
        elif p.probs is None:
            rows = _index_rows(p, x, stats)
        else:
            rows = _prob_rows(p, x, stats)
        if p.sample is not None:
            rows = rows * p.sample
        if p.reduction == "none":
            loss = xp.squeeze(rows, axis=p.axis)
        else:
            loss = xp.sum(rows)
            if p.reduction == "mean":
                loss = loss / p.denominator
    return xp.astype(loss, p.out_dtype, copy=False), (x, stats)


def _neg_logprob(x: Array, stats: _Stats | None) -> Array:
    if stats is None:
        return -x
    shift, log_sum = stats
    return log_sum - (x - shift)


def _lse(stats: _Stats) -> Array:
    shift, log_sum = stats
    return shift + log_sum


def _index_rows(p: _Problem, x: Array, stats: _Stats | None) -> Array:
    xp = p.xp
    rows = _neg_logprob(p.ops.take_along_axis(x, p.labels, p.axis), stats)
    if p.label_weight is not None:
        rows = rows * p.label_weight
    if p.smoothing:
        neg = _neg_logprob(x, stats)
        if p.weight is not None:
            neg = neg * p.weight
        spread = xp.sum(neg, axis=p.axis, keepdims=True)
        rows = (1.0 - p.smoothing) * rows + (p.smoothing / p.classes) * spread
    rows = _with_z_loss(p, rows, stats)
    rows = xp.where(p.ignored, xp.zeros_like(rows), rows)
    return xp.where(p.bad, xp.full_like(rows, math.nan), rows)


def _smoothed_probs(p: _Problem) -> Array:
    q = p.probs
    assert q is not None
    if p.smoothing:
        q = (1.0 - p.smoothing) * q + p.smoothing / p.classes
    return q


def _prob_rows(p: _Problem, x: Array, stats: _Stats | None) -> Array:
    xp = p.xp
    q = _smoothed_probs(p)
    mass = q if p.weight is None else q * p.weight
    # A class with no target mass adds 0, even where its log-probability is -inf (masking
    # before the product also keeps 0 * inf out of lazily computed graphs).
    neg = _neg_logprob(x, stats)
    terms = mass * xp.where(q == 0, xp.zeros_like(neg), neg)
    return _with_z_loss(p, xp.sum(terms, axis=p.axis, keepdims=True), stats)


def _with_z_loss(p: _Problem, rows: Array, stats: _Stats | None) -> Array:
    if not p.z_loss or stats is None:
        return rows
    lse = _lse(stats)
    return rows + p.z_loss * lse * lse


# --------------------------------------------------------------------------- backward
def _backward(
    p: _Problem, input: Array, saved: tuple[Array, _Stats | None] | None, cotangent: Array
) -> Array:
    """``d (loss . cotangent) / d input``: softmax minus the smoothed, weighted target."""
    xp, ops = p.xp, p.ops
    if p.empty:
        return xp.zeros_like(input)
    with ops.quiet():
        x, stats = _log_input(p, input) if saved is None else saved
        r = _row_cotangent(p, cotangent)
        if stats is not None:
            g = _logit_grad(p, x, stats, r)
            if p.softcap is not None:
                g = g * (1.0 - (x / p.softcap) ** 2)
        else:
            g = _prob_input_grad(p, input, x, r)
        if p.ignored is not None:
            g = _fill_rows(p, g, p.ignored, 0.0)
            g = _fill_rows(p, g, p.bad, math.nan)
    return xp.astype(g, input.dtype, copy=False)


def _fill_rows(p: _Problem, g: Array, mask: Array, value: float) -> Array:
    """``value`` on the masked rows of ``g``. Where the mask can be read for free (concrete, on
    the host) and masks nothing, as it usually does, the full pass over ``g`` is skipped."""
    if _readable(p.ops, mask, mask, force=False) and not bool(p.xp.any(mask)):
        return g
    return p.ops.fill_rows(g, mask, value)


def _row_cotangent(p: _Problem, cotangent: Array) -> Array:
    xp = p.xp
    r = xp.astype(cotangent, p.dtype, copy=False)
    if p.reduction == "none":
        r = xp.expand_dims(r, axis=p.axis)
    elif p.reduction == "mean":
        r = r / p.denominator
    if p.sample is not None:
        r = r * p.sample
    return r


def _target_mass(p: _Problem, r: Array) -> tuple[Array, Array | None, Array]:
    """``(a, at_label, total)``: ``r`` times the target weights ``a`` of the gradient formula.

    For class indices ``a`` is split into its dense smoothing part (or None) and the part
    ``at_label`` that sits at each row's label; ``total`` is ``r * sum_c a_c``.
    """
    xp = p.xp
    if p.probs is None:
        on_label = 1.0 - p.smoothing
        lw = p.label_weight
        at_label = r * (on_label if lw is None else on_label * lw)
        dense = None
        total = at_label
        if p.smoothing:
            spread = p.smoothing / p.classes
            dense = r * (spread if p.weight is None else spread * p.weight)
            total = total + r * (spread * p.weight_total)
        return dense, at_label, total
    q = _smoothed_probs(p)
    mass = q if p.weight is None else q * p.weight
    mass = r * xp.where(q == 0, xp.zeros_like(mass), mass)
    return mass, None, xp.sum(mass, axis=p.axis, keepdims=True)


def _logit_grad(p: _Problem, x: Array, stats: _Stats, r: Array) -> Array:
    dense, at_label, total = _target_mass(p, r)
    if p.z_loss:
        total = total + (2.0 * p.z_loss) * r * _lse(stats)
    g = p.ops.softmax_from_lse(x, *stats, p.axis, scale=total)
    if at_label is not None:
        g = p.ops.subtract_at(g, p.labels, at_label, p.axis)
    if dense is not None:
        g = g - dense
    return g


def _prob_input_grad(p: _Problem, input: Array, x: Array, r: Array) -> Array:
    """Chain ``-a`` (the gradient w.r.t. log-probabilities) through log, clip and renormalise."""
    xp = p.xp
    dense, at_label, _ = _target_mass(p, r)
    g = xp.zeros_like(x) if dense is None else xp.zeros_like(x) - dense
    if at_label is not None:
        g = p.ops.subtract_at(g, p.labels, at_label, p.axis)
    u = xp.astype(input, p.dtype, copy=False)
    total = xp.sum(u, axis=p.axis, keepdims=True)
    prob = u / total
    inside = (prob >= p.eps) & (prob <= 1.0 - p.eps)
    g = xp.where(inside, g / xp.exp(x), xp.zeros_like(g))
    return (g - xp.sum(g * prob, axis=p.axis, keepdims=True)) / total


def _tangent(p: _Problem, input: Array, saved: tuple[Array, _Stats | None], dx: Array) -> Array:
    """``(d loss / d input) dx``: each row's loss depends on that row alone, so the forward-mode
    derivative contracts the gradient of ``sum(loss)`` with ``dx`` along the class axis."""
    xp = p.xp
    shape = tuple(input.shape)
    per_row = shape[: p.axis] + shape[p.axis + 1 :] if p.reduction == "none" else ()
    ones = xp.ones(per_row, dtype=p.dtype, device=p.ops.device(input))
    g = xp.astype(_backward(p, input, saved, ones), p.dtype, copy=False)
    t = g * xp.astype(dx, p.dtype, copy=False)
    t = xp.sum(t, axis=p.axis) if p.reduction == "none" else xp.sum(t)
    return xp.astype(t, p.out_dtype, copy=False)


_RULE = GradRule(forward=_forward, backward=_backward, tangent=_tangent)
