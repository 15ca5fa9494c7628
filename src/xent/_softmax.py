"""The softmax family: ``logsumexp``, ``log_softmax``, ``softmax``."""

from __future__ import annotations

import math

from . import _validation
from ._typing import Array, Namespace
from .backends import Backend, lookup

__all__ = ["log_softmax", "logsumexp", "softmax"]


def _prepare(x: Array, axis: int, xp: Namespace | None) -> tuple[Namespace, Backend, int]:
    xp = _validation.namespace({"x": x}, xp)
    _validation.floating_input(xp, "x", x)
    ax = _validation.axis(axis, x.ndim, "x")
    return xp, lookup(xp), ax


def _computed(xp: Namespace, ops: Backend, x: Array) -> Array:
    """``x`` in its compute dtype (float16/bfloat16 in float32)."""
    return xp.astype(x, ops.compute_dtype(x.dtype), copy=False)


def _stats(xp: Namespace, x: Array, ax: int) -> tuple[Array, Array]:
    """``(shift, log_sum)``; over no rows at all, zeros (Dask mis-shapes empty reductions)."""
    shape = tuple(x.shape)
    if math.prod(shape[:ax] + shape[ax + 1 :]) == 0:  # no generator: torch.compile traces this
        keep = (*shape[:ax], 1, *shape[ax + 1 :])
        zeros = xp.zeros(keep, dtype=x.dtype, device=lookup(xp).device(x))
        return zeros, zeros
    return lookup(xp).logsumexp(x, ax)


def logsumexp(
    x: Array, /, *, axis: int = -1, keepdims: bool = False, xp: Namespace | None = None
) -> Array:
    r"""Log of the sum of exponentials along ``axis``, without overflow.

    .. math:: \operatorname{logsumexp}(x) = m + \log \sum_c e^{x_c - m},\quad m = \max_c x_c

    Parameters
    ----------
    x : array
        Real floating array with at least one dimension.
    axis : int, default -1
        The axis to reduce.
    keepdims : bool, default False
        Keep the reduced axis with size 1.
    xp : namespace, optional
        The array namespace; inferred from ``x`` when omitted.

    Returns
    -------
    array
        Same namespace, device and dtype as ``x`` (float16/bfloat16 are computed in float32).
        A row of all ``-inf`` gives ``-inf``; a NaN gives NaN for its row only.

    Raises
    ------
    TypeError
        If ``x`` is not a real floating array.
    ValueError
        If ``axis`` is out of range or ``x`` is 0-d.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import xent
    >>> out = xent.logsumexp(xp.asarray([[0.0, 0.0], [1000.0, 1000.0]]))
    >>> [round(float(out[i]), 6) for i in range(2)]  # log(2) and 1000 + log(2), no overflow
    [0.693147, 1000.693147]
    """
    xp, ops, ax = _prepare(x, axis, xp)
    fused = ops.fused_softmax("logsumexp", x, ax)
    if fused is not None:
        return fused if keepdims else xp.squeeze(fused, axis=ax)
    xc = _computed(xp, ops, x)
    with ops.quiet():
        shift, log_sum = _stats(xp, xc, ax)
        out = shift + log_sum
        if not keepdims:
            out = xp.squeeze(out, axis=ax)
        return ops.finish(
            xp.astype(out, x.dtype, copy=False), x
        )  # float16 overflow: inf, no warning


def log_softmax(x: Array, /, *, axis: int = -1, xp: Namespace | None = None) -> Array:
    r"""Logarithm of the softmax along ``axis``: ``x - logsumexp(x)``.

    Parameters
    ----------
    x : array
        Real floating array with at least one dimension.
    axis : int, default -1
        The class axis.
    xp : namespace, optional
        The array namespace; inferred from ``x`` when omitted.

    Returns
    -------
    array
        Same shape, namespace, device and dtype as ``x``. ``-inf`` entries stay ``-inf``.

    Raises
    ------
    TypeError
        If ``x`` is not a real floating array.
    ValueError
        If ``axis`` is out of range or ``x`` is 0-d.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import xent
    >>> xent.log_softmax(xp.asarray([0.0, 0.0]))
    Array([-0.69314718, -0.69314718], dtype=array_api_strict.float64)
    """
    xp, ops, ax = _prepare(x, axis, xp)
    fused = ops.fused_softmax("log_softmax", x, ax)
    if fused is not None:
        return fused
    xc = _computed(xp, ops, x)
    with ops.quiet():
        shift, log_sum = _stats(xp, xc, ax)
        out = (xc - shift) - log_sum
        return ops.finish(xp.astype(out, x.dtype, copy=False), x)


def softmax(x: Array, /, *, axis: int = -1, xp: Namespace | None = None) -> Array:
    r"""Softmax along ``axis``: ``exp(x - logsumexp(x))``.

    Parameters
    ----------
    x : array
        Real floating array with at least one dimension.
    axis : int, default -1
        The class axis.
    xp : namespace, optional
        The array namespace; inferred from ``x`` when omitted.

    Returns
    -------
    array
        Same shape, namespace, device and dtype as ``x``; each row sums to 1 (a row of all
        ``-inf`` gives NaN).

    Raises
    ------
    TypeError
        If ``x`` is not a real floating array.
    ValueError
        If ``axis`` is out of range or ``x`` is 0-d.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import xent
    >>> xent.softmax(xp.asarray([0.0, 0.0]))
    Array([0.5, 0.5], dtype=array_api_strict.float64)
    """
    xp, ops, ax = _prepare(x, axis, xp)
    fused = ops.fused_softmax("softmax", x, ax)
    if fused is not None:
        return fused
    xc = _computed(xp, ops, x)
    with ops.quiet():
        shift, log_sum = _stats(xp, xc, ax)
        out = ops.softmax_from_lse(xc, shift, log_sum, ax)
        return ops.finish(xp.astype(out, x.dtype, copy=False), x)
