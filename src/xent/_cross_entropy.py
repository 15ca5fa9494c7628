"""Cross-entropy over a class axis, and its analytic gradient.

One algorithm for every namespace: validate, form log-probabilities (``x - logsumexp(x)``, or
``log(clip(p))`` for probability inputs), take the target term, weight, reduce. The backend
supplies the primitives (``logsumexp``, the gather, the in-place scatter of the gradient) and,
where the framework has autodiff, attaches :func:`_backward` as the analytic gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import _validation
from ._typing import Array, Namespace, Reduction
from .backends import Backend, GradRule, IndexOptions, lookup, namespace_of, scaled_gap

__all__ = ["cross_entropy", "cross_entropy_and_grad"]

_IGNORE_INDEX = -100
"""The default ``ignore_index`` (PyTorch's)."""


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
    bad: Array | None  # invalid labels; None where the labels were read and none is
    probs: Array | None  # probability targets in the compute dtype
    overwrite: bool = False  # the input is xent's own temporary: the gradient may replace it


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
    >>> loss = xent.cross_entropy(logits, xp.asarray([1, 0]))
    >>> round(float(loss), 6)
    0.034929
    """
    c = _check(
        input, target, axis=axis, from_logits=from_logits, weight=weight,
        sample_weight=sample_weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
        reduction=reduction, z_loss=z_loss, softcap=softcap, eps=eps, validate=validate, xp=xp,
    )  # fmt: skip
    if c.fused is not None:
        # The backend's plan for arrays and options like these, remembered with the checks
        # (it is what fused_index_loss would make of them again).
        loss = c.fused(input, target, weight)
        if loss is not None:
            return loss
    elif c.plain and sample_weight is None and not _checks_lazy_labels(c, input):
        # A backend may hand the plain case to a fused kernel of the same semantics; it
        # declines (None) wherever a label is invalid, so errors and NaNs come from below.
        fused = c.ops.fused_index_loss if c.kind == "index" else c.ops.fused_prob_loss
        loss = fused(input, target, c.index_options(weight))
        if loss is not None:
            return loss
    p = _problem(input, target, c, weight=weight, sample_weight=sample_weight)
    loss = p.ops.custom_grad(_RULE, p, input, others=(target, weight, sample_weight))
    return p.ops.finish(loss, input, target, weight, sample_weight)


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
    c = _check(
        input, target, axis=axis, from_logits=from_logits, weight=weight,
        sample_weight=sample_weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
        reduction=reduction, z_loss=z_loss, softcap=softcap, eps=eps, validate=validate, xp=xp,
    )  # fmt: skip
    if c.plain and sample_weight is None and not _checks_lazy_labels(c, input):
        fused = (
            c.ops.fused_index_loss_and_grad if c.kind == "index" else c.ops.fused_prob_loss_and_grad
        )
        both = fused(input, target, c.index_options(weight))
        if both is not None:
            return both
    p = _problem(input, target, c, weight=weight, sample_weight=sample_weight)
    loss, saved = _forward(p, input)
    grad = _backward(p, input, saved, p.xp.ones_like(loss))
    inputs = (input, target, weight, sample_weight)
    return p.ops.finish(loss, *inputs), p.ops.finish(grad, *inputs)


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
        x = _cap(xp, x, p.softcap)
    if p.empty:
        return x, None
    return x, p.ops.logsumexp(x, p.axis)


def _cap(xp: Namespace, x: Array, cap: float) -> Array:
    """``cap * tanh(x / cap)``, degrading smoothly to ``x`` as ``cap`` grows.

    The plain form is exact while ``cap`` is at most the square root of the dtype's max. Beyond,
    ``x / cap`` could flush to zero and ``cap`` itself overflow, so the cap is taken as
    ``x * (tanh(u) / u)`` with ``u = x / cap`` (``1 - u**2 / 3`` where ``u`` is tiny), which is
    ``x`` once ``cap`` is out of range; infinite logits go to ``+-cap`` (at most the max).
    Every branch stays finite where it is not selected, so autodiff through it is too.
    """
    info = xp.finfo(x.dtype)
    if cap <= math.sqrt(float(info.max)):
        return cap * xp.tanh(x / cap)
    infinite = xp.isinf(x)
    finite_x = xp.where(infinite, xp.zeros_like(x), x)
    u = finite_x * (1.0 / cap)
    tiny = xp.abs(u) < 1e-4
    u_safe = xp.where(tiny, xp.ones_like(u), u)
    ratio = xp.where(tiny, 1.0 - u * u / 3.0, xp.tanh(u_safe) / u_safe)
    edge = xp.sign(x) * min(cap, float(info.max))
    return xp.where(infinite, edge, finite_x * ratio)


def _forward(p: _Problem, input: Array) -> tuple[Array, tuple[Array, _Stats | None]]:
    xp = p.xp
    with p.ops.quiet():
        x, stats = _log_input(p, input)
        if p.empty:
            rows = _no_rows(p, x)
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
        # Inside the guard: a float16 result that overflows is inf, without a warning.
        loss = xp.astype(loss, p.out_dtype, copy=False)
    return loss, (x, stats)


def _no_rows(p: _Problem, x: Array) -> Array:
    """The empty per-row losses, built from every differentiable input (an autodiff system
    then gives each a zero gradient) without reductions over no rows, whose shapes Dask gets
    wrong."""
    first = tuple(slice(0, 1) if i == p.axis else slice(None) for i in range(x.ndim))
    rows = 0.0 * x[first]
    if p.probs is not None:
        rows = rows + 0.0 * p.probs[first]
    return rows if p.weight is None else rows + 0.0 * p.xp.sum(p.weight)


def _neg_logprob(x: Array, stats: _Stats | None) -> Array:
    if stats is None:
        return -x
    shift, log_sum = stats
    return log_sum - (x - shift)


def _lse(stats: _Stats) -> Array:
    shift, log_sum = stats
    return shift + log_sum


def _smoothed(at_label: Array, spread: Array, smoothing: float) -> Array:
    """``(1 - e) * at_label + spread``, ``spread`` being the smoothing's share ``(e / C) *
    sum_c w_c (-lp_c)``; with ``e == 1`` the label's term is left out rather than multiplied
    by 0, so an infinite ``-lp[y]`` (a target logit at ``-inf``) gives the ``inf`` of the
    spread, not ``0 * inf``."""
    if smoothing == 1.0:
        return spread
    return (1.0 - smoothing) * at_label + spread


def _spread(p: _Problem, x: Array, stats: _Stats | None) -> Array:
    """The smoothing's share of each row's loss, ``sum_c a_c (-lp_c)`` with ``a_c = (e / C)
    w_c``, class axis kept.

    Each class's term is scaled before the sum, ``-lp_c = log_sum + (shift - x_c)`` taken as
    ``scaled_gap(shift, x_c, a_c)`` plus, once per row, ``log_sum sum_c a_c``: a row whose
    share is finite stays finite where the unscaled sum, or the gap itself, would overflow
    (logits up to the dtype's max at both signs; a ``softcap`` near it, where a masked
    ``-inf`` logit becomes ``-softcap``)."""
    share = p.smoothing / p.classes
    a = share if p.weight is None else p.weight * share
    if stats is None:
        return p.ops.class_sum(lambda x, a: -(a * x), (x, a), p.axis)
    shift, log_sum = stats
    gaps = p.ops.class_sum(scaled_gap, (shift, x, a), p.axis)
    return gaps + (share * p.weight_total) * log_sum


def _index_rows(p: _Problem, x: Array, stats: _Stats | None) -> Array:
    xp = p.xp
    rows = _neg_logprob(p.ops.take_along_axis(x, p.labels, p.axis), stats)
    if p.label_weight is not None:
        rows = rows * p.label_weight
    if p.smoothing:
        rows = _smoothed(rows, _spread(p, x, stats), p.smoothing)
    rows = _with_z_loss(p, rows, stats)
    rows = xp.where(p.ignored, xp.zeros_like(rows), rows)
    if p.bad is None:
        return rows
    # Invalid labels: NaN by a product, not a select, so autodiff carries the NaN into the
    # gradient as well (a select would give those rows a zero, finite gradient).
    return rows * _nan_where(xp, p.bad, rows)


def _nan_where(xp: Namespace, mask: Array, like: Array) -> Array:
    """NaN where ``mask``, 1 elsewhere, in ``like``'s dtype."""
    return xp.where(mask, xp.full_like(like, math.nan), xp.ones_like(like))


def _smoothed_probs(p: _Problem, q: Array | None = None) -> Array:
    """The target probabilities (``q``, or the problem's own) with the label smoothing."""
    q = p.probs if q is None else q
    assert q is not None
    if p.smoothing:
        q = (1.0 - p.smoothing) * q + p.smoothing / p.classes
    return q


def _prob_rows(p: _Problem, x: Array, stats: _Stats | None) -> Array:
    xp = p.xp
    assert p.probs is not None
    weights = () if p.weight is None else (p.weight,)

    def terms(x: Array, q: Array, *rest: Array) -> Array:
        # A class with no target mass adds 0, even where its log-probability is -inf (masking
        # before the product also keeps 0 * inf out of lazily computed graphs). Only the
        # infinite entries are replaced, so the derivative with respect to the target stays
        # -w * lp.
        q = _smoothed_probs(p, q)
        mass = q * rest[0] if weights else q
        neg = _neg_logprob(x, None if stats is None else (rest[-2], rest[-1]))
        return mass * xp.where((q == 0) & xp.isinf(neg), xp.zeros_like(neg), neg)

    rows = p.ops.class_sum(terms, (x, p.probs, *weights, *(stats or ())), p.axis)
    return _with_z_loss(p, rows, stats)


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
                t = x * (1.0 / p.softcap)  # tanh(input / softcap); never overflows
                g = g * (1.0 - t * t)
        else:
            g = _prob_input_grad(p, input, x, r)
        return xp.astype(g, input.dtype, copy=False)


def _row_cotangent(p: _Problem, cotangent: Array) -> Array:
    xp = p.xp
    r = xp.astype(cotangent, p.dtype, copy=False)
    if p.reduction == "none":
        r = _expand(xp, r, p.axis)
    elif p.reduction == "mean":
        r = r / p.denominator
    if p.sample is not None:
        r = r * p.sample
    if p.ignored is not None:
        # Per row, before the full-size pass: an ignored row's gradient is 0 times its softmax
        # (0 where the logits are finite, NaN where they hold NaN, as autodiff of the forward
        # gives it); an invalid label's row is NaN.
        masked = p.ignored if p.bad is None else p.ignored | p.bad
        if _readable(p.ops, masked, masked, force=False) and not bool(p.xp.any(masked)):
            return r
        r = xp.where(p.ignored, xp.zeros_like(r), r)
        if p.bad is not None:
            r = r * _nan_where(xp, p.bad, r)
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
    g = p.ops.softmax_from_lse(x, *stats, p.axis, scale=total, overwrite=p.overwrite)
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


# --------------------------------------------------------------------------- preparation
class _Checked(NamedTuple):
    """Arguments that passed every check, scalar options as Python numbers (a named tuple:
    built on every call, it costs a fraction of a frozen dataclass)."""

    xp: Namespace
    ops: Backend
    axis: int
    kind: str  # "index" or "prob"
    from_logits: bool
    smoothing: float
    eps: float
    z_loss: float
    softcap: float | None
    ignore_index: int
    reduction: str
    validate: bool | None
    fused: Callable[[Array, Array, Array | None], Array | None] | None = None
    """The backend's :meth:`~xent.backends.Backend.fused_index_plan` (or
    :meth:`~xent.backends.Backend.fused_prob_plan`) for the plain case
    (:func:`_declines` where it has none), called with the class weights of each call, set on
    remembered answers only (it depends on what their key holds); None elsewhere."""

    def index_options(self, weight: Array | None) -> IndexOptions:
        """The options as the backends' fused kernels take them."""
        return IndexOptions(self.axis, weight, self.ignore_index, self.smoothing, self.reduction)

    @property
    def plain(self) -> bool:
        """Logits (class indices or probabilities) with no softcap or z-loss: the case fused
        kernels cover."""
        return self.from_logits and self.softcap is None and not self.z_loss


def _checks_lazy_labels(c: _Checked, input: Array) -> bool:
    """Whether the labels must be checked by computing them (``validate=True`` on a lazy
    array): a lazy backend's fused kernel gives such a label NaN, so only xent's own path,
    which computes them, raises its error."""
    return c.validate is True and c.ops.is_lazy(input)


def _declines(input: Array, target: Array, weight: Array | None) -> None:
    """The remembered plan where the backend has none: the call takes xent's own path."""
    return None


_CHECKED: dict[tuple[Any, ...], _Checked] = {}
"""Answers of :func:`_check` that passed, by everything they depend on (see there)."""

_CHECKED_MAX = 256
"""Remembered answers at most (a loop over changing shapes cannot grow it further)."""


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
    ignore_index: int,
    validate: bool | None,
    xp: Namespace | None,
) -> _Checked:
    """Every check that reads no label values; ``kind`` is ``"index"`` or ``"prob"``.

    The checks' answer depends on the arrays' types, dtypes and shapes and on the options, which
    a training loop repeats call after call: for two arrays of a registered class (whose
    namespace is known without array-api-compat), concrete, and options of plain Python
    scalars, a passing answer is remembered under those and the backend that serves them (native
    overrides on or off), with the backend's plan for the plain case; a call that finds it
    still checks what the key does not hold (dense layout, one device).
    """
    key = None
    if sample_weight is None and xp is None:
        found = namespace_of(input)
        if found is not None:
            ops = lookup(found)
            # Traced arrays (a compiler's symbolic shapes) are checked each time.
            if not ops.is_traced(input):
                try:
                    key = (
                        axis, from_logits, label_smoothing, reduction, z_loss, softcap, eps,
                        ignore_index, validate, type(axis), type(from_logits),
                        type(label_smoothing), type(reduction), type(z_loss), type(softcap),
                        type(eps), type(ignore_index), type(validate), type(input),
                        type(target), input.dtype, target.dtype, input.shape, target.shape, ops,
                        None if weight is None else (type(weight), weight.dtype, weight.shape),
                    )  # fmt: skip
                    checked = _CHECKED.get(key)
                except (AttributeError, TypeError):  # a target that is no array; an option
                    checked = key = None  # given as an unhashable array: checked below
                if checked is not None:
                    # Only keys that passed are stored: their options were plain scalars and
                    # the target's class (in the key) of the input's namespace.
                    if not ops.dense_together(input, target) or (
                        weight is not None and not ops.dense_together(input, weight)
                    ):
                        given = {"input": input, "target": target}
                        if weight is not None:
                            given["weight"] = weight
                        _validation.dense(ops, given)
                        _validation.same_device(ops, given)
                    return checked
                # Remembered below only for options of plain scalars (an array is neither, nor
                # always hashable) and a target of the input's namespace.
                if key is not None and (
                    not _validation.plain_scalars(key[9:18])
                    or namespace_of(target) is not found
                    or (weight is not None and namespace_of(weight) is not found)
                ):
                    key = None
    arrays = {"input": input, "target": target, "weight": weight, "sample_weight": sample_weight}
    xp, ops = _validation.backend(arrays, xp)
    _validation.floating_input(xp, "input", input)
    ax, label_smoothing, eps, z_loss, softcap, ignore_index = _validation.scalars(
        axis=axis, ndim=input.ndim, reduction=reduction, label_smoothing=label_smoothing,
        eps=eps, from_logits=from_logits, z_loss=z_loss, softcap=softcap, validate=validate,
        ignore_index=ignore_index,
    )  # fmt: skip
    kind = _validation.target_kind(xp, input, target, ax)
    if kind == "prob":
        _validation.probability_target_options(ignore_index, _IGNORE_INDEX)
    classes = _validation.class_count(input.shape, ax)
    if weight is not None:
        _validation.class_weight(weight, classes)
    if sample_weight is not None:
        per_row = tuple(input.shape[:ax] + input.shape[ax + 1 :])
        _validation.broadcastable("sample_weight", sample_weight, per_row, "the per-example shape")
    _validation.real_weights(xp, "weight", weight)
    _validation.real_weights(xp, "sample_weight", sample_weight)
    checked = _Checked(
        xp, ops, ax, kind, from_logits, label_smoothing, eps, z_loss, softcap, ignore_index,
        reduction, validate,
    )  # fmt: skip
    if key is not None:
        if checked.plain and not _checks_lazy_labels(checked, input):
            planner = ops.fused_index_plan if kind == "index" else ops.fused_prob_plan
            plan = planner(input, target, checked.index_options(weight))
            checked = checked._replace(fused=_declines if plan is None else plan)
        _validation.remember(_CHECKED, key, checked, _CHECKED_MAX)
    return checked


def _problem(
    input: Array,
    target: Array,
    c: _Checked,
    *,
    weight: Array | None,
    sample_weight: Array | None,
) -> _Problem:
    xp, ops, ax = c.xp, c.ops, c.axis
    classes = int(input.shape[ax])
    per_row = tuple(input.shape[:ax] + input.shape[ax + 1 :])
    dtype = ops.compute_dtype(input.dtype)
    dev = ops.device(input)
    empty = 0 in per_row
    class_shape = tuple(classes if i == ax else 1 for i in range(input.ndim))
    w = None if weight is None else xp.reshape(xp.astype(weight, dtype), class_shape)
    sample = None
    if sample_weight is not None:
        sample = xp.broadcast_to(xp.astype(sample_weight, dtype), per_row)
        sample = _expand(xp, sample, ax)

    labels = label_weight = ignored = bad = probs = None
    if c.kind == "index":
        labels, ignored, bad = _labels(xp, ops, target, classes, c.ignore_index, c.validate, ax)
        if _checked_labels(ops, target, bad, c.validate):
            bad = None  # the labels were read and every one is a class or ignore_index
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
        if sample is None and not _validation.known_shape(per_row):
            # Sizes unknown until Dask computes (boolean indexing): count the rows lazily.
            denominator = xp.sum(xp.ones_like(xp.sum(probs, axis=ax)))
        elif sample is None:
            denominator = xp.asarray(float(math.prod(per_row)), dtype=dtype, device=dev)
        else:
            denominator = xp.sum(sample)
    return _Problem(
        xp=xp, ops=ops, axis=ax, classes=classes, dtype=dtype, out_dtype=input.dtype,
        from_logits=c.from_logits, softcap=c.softcap, eps=c.eps, smoothing=c.smoothing,
        z_loss=c.z_loss, reduction=c.reduction, empty=empty, weight=w,
        weight_total=float(classes) if w is None else xp.sum(w),
        sample=sample, denominator=denominator if c.reduction == "mean" else None,
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
    """Safe gather indices and the ignored/invalid masks, class axis kept with size 1.

    No label is ever taken for another: ``ignore_index`` matches only labels equal to it in
    their own dtype, and a label the cast to the index dtype would wrap is invalid. Widening
    casts are exact; an unsigned dtype as wide as the index dtype wraps its upper half onto
    negative values, which no class index or (for unsigned labels) no ``ignore_index`` is.
    """
    own = xp.iinfo(target.dtype)
    index_dtype = ops.index_dtype()
    if own.bits > xp.iinfo(index_dtype).bits:
        y = target  # narrower index dtype (JAX without x64): compare before the cast
    else:
        y = xp.astype(target, index_dtype, copy=False)
    if own.min <= ignore_index <= own.max:
        match = ignore_index
        if y is not target and ignore_index > xp.iinfo(index_dtype).max:
            # The cast wrapped the label's upper half (unsigned, as wide as the index dtype);
            # wrapping `ignore_index` the same way keeps equality exact.
            match = ignore_index - 2**own.bits
        ignored = y == match
    else:
        ignored = xp.zeros(target.shape, dtype=xp.bool, device=ops.device(target))
    valid = (y >= 0) & (y < classes) if classes <= own.max else y >= 0
    bad = ~(valid | ignored)
    # Under jit a label array captured from outside is concrete while `bad`, built inside the
    # trace, is not; both must be readable.
    if _checked_labels(ops, target, bad, validate):
        _validation.raise_on_bad_labels(xp, target, bad, classes, ignore_index)
    safe = xp.astype(xp.where(valid, y, xp.zeros_like(y)), index_dtype, copy=False)
    return _expand(xp, safe, ax), _expand(xp, ignored, ax), _expand(xp, bad, ax)


def _expand(xp: Namespace, a: Array, ax: int) -> Array:
    """``a`` with a new axis of size 1 at ``ax``: ``expand_dims`` where every size is known,
    else by indexing (Dask's ``expand_dims`` refuses arrays whose sizes are unknown until
    computed; array-api-strict's indexing costs eight times its ``expand_dims``)."""
    if _validation.known_shape(a.shape):
        return xp.expand_dims(a, axis=ax)
    return a[(*(slice(None),) * ax, None, ...)]


def _checked_labels(ops: Backend, target: Array, bad: Array, validate: bool | None) -> bool:
    """Whether ``validate`` has the labels read (and an invalid one raise): ``bad``, made from
    them, must be readable too."""
    return validate is not False and _readable(ops, target, bad, force=validate is True)


def _readable(ops: Backend, x: Array, derived: Array, *, force: bool) -> bool:
    if ops.is_traced(x) or ops.is_traced(derived):
        return False
    return force or (not ops.is_lazy(x) and ops.on_host(x))
