"""A float64 NumPy reference for xent, written directly from the formulas of docs/semantics.md.

Deliberately naive (clarity over speed or memory) and independent of xent: tests compare xent on
every backend with these functions. Never import this module from `src/`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_grad",
    "cross_entropy",
    "cross_entropy_grad",
    "log_softmax",
    "logsumexp",
    "numerical_grad",
    "softmax",
]


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _shifted(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`x - m`, `sum(exp(x - m))` and `m` for the row max `m` (0 for rows without a finite max)."""
    m = np.max(x, axis=axis, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0.0)
    z = x - m
    return z, np.sum(np.exp(z), axis=axis, keepdims=True), m


def logsumexp(x: Any, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    """log(sum(exp(x))) along `axis`; an all `-inf` row gives `-inf`."""
    with np.errstate(all="ignore"):
        _, s, m = _shifted(_f64(x), axis)
        out = np.log(s) + m
    return out if keepdims else np.squeeze(out, axis=axis)


def log_softmax(x: Any, axis: int = -1) -> np.ndarray:
    """`(x - m) - log(sum(exp(x - m)))`: exact even next to logits of size float64's max."""
    with np.errstate(all="ignore"):
        z, s, _ = _shifted(_f64(x), axis)
        return z - np.log(s)


def softmax(x: Any, axis: int = -1) -> np.ndarray:
    with np.errstate(all="ignore"):
        z, s, _ = _shifted(_f64(x), axis)
        return np.exp(z) / s


def _clip_bounds(eps: float, dtype: Any) -> tuple[float, float]:
    if dtype is None:
        return eps, 1.0 - eps
    return float(np.asarray(eps, dtype=dtype)), float(np.asarray(1.0 - eps, dtype=dtype))


def _reduce(loss: np.ndarray, denominator: float, reduction: str) -> np.ndarray:
    if reduction == "none":
        return loss
    total = np.sum(loss)
    if reduction == "sum":
        return np.asarray(total)
    assert reduction == "mean", reduction
    with np.errstate(all="ignore"):
        return np.asarray(np.nan if denominator == 0 else total / denominator)


def cross_entropy(
    input: Any,
    target: Any,
    *,
    axis: int = -1,
    from_logits: bool = True,
    weight: Any = None,
    sample_weight: Any = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    softcap: float | None = None,
    eps: float = 1e-7,
    clip_dtype: Any = None,
) -> np.ndarray:
    """The cross-entropy of docs/semantics.md. Labels outside `[0, C)` that are not `ignore_index` give NaN (the
    `validate=False` contract). `clip_dtype` rounds the clip bounds `eps`, `1 - eps` to the
    dtype the computation runs in (float32's `1 - 1e-7` is `1 - 1.19e-7`)."""
    target = np.asarray(target)
    x = np.moveaxis(_f64(input), axis, -1)
    n_classes = x.shape[-1]
    e = float(label_smoothing)
    w = np.ones(n_classes) if weight is None else _f64(weight)
    with np.errstate(all="ignore"):
        if softcap is not None:
            x = softcap * np.tanh(x / softcap)
        if from_logits:
            lse = logsumexp(x, axis=-1)
            lp = log_softmax(x, axis=-1)
        else:
            p = x / np.sum(x, axis=-1, keepdims=True)
            lp = np.log(np.clip(p, *_clip_bounds(eps, clip_dtype)))
            lse = None

        if np.issubdtype(target.dtype, np.integer):
            y = target.astype(object)  # exact comparisons for every width, uint64 included
            ignored = np.asarray(y == ignore_index, dtype=bool)
            in_range = np.asarray((y >= 0) & (y < n_classes), dtype=bool)
            valid = in_range & ~ignored
            yc = np.where(valid, y, 0).astype(np.int64)
            lp_target = np.take_along_axis(lp, yc[..., None], axis=-1)[..., 0]
            w_target = w[yc]
            loss = np.zeros(yc.shape)
            if e < 1:
                loss = loss + (1.0 - e) * (-w_target * lp_target)
            if e > 0:
                loss = loss + (e / n_classes) * np.sum(-w * lp, axis=-1)
            if z_loss:
                loss = loss + z_loss * lse**2
            loss = np.where(in_range | ignored, loss, np.nan)
            loss = np.where(ignored, 0.0, loss)
            s = np.broadcast_to(1.0 if sample_weight is None else _f64(sample_weight), loss.shape)
            loss = loss * s
            denominator = float(np.sum(s * w_target * valid))
        else:
            t = np.moveaxis(_f64(target), axis, -1)
            q = (1.0 - e) * t + e / n_classes
            loss = -np.sum(np.where(q == 0, 0.0, w * q * lp), axis=-1)
            if z_loss:
                loss = loss + z_loss * lse**2
            s = np.broadcast_to(1.0 if sample_weight is None else _f64(sample_weight), loss.shape)
            loss = loss * s
            denominator = float(np.sum(s))
    return _reduce(loss, denominator, reduction)


def binary_cross_entropy(
    input: Any,
    target: Any,
    *,
    from_logits: bool = True,
    weight: Any = None,
    pos_weight: Any = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    eps: float = 1e-7,
    clip_dtype: Any = None,
) -> np.ndarray:
    """The binary cross-entropy of docs/semantics.md (PyTorch's `binary_cross_entropy_with_logits`, Keras' clipping);
    `clip_dtype` as in `cross_entropy`."""
    x = _f64(input)
    e = float(label_smoothing)
    y = _f64(target) * (1.0 - e) + e / 2.0
    w = 1.0 if weight is None else _f64(weight)
    pw = 1.0 if pos_weight is None else _f64(pos_weight)
    with np.errstate(all="ignore"):
        if from_logits:
            log_p = -np.logaddexp(0.0, -x)
            log_not_p = -np.logaddexp(0.0, x)
        else:
            p = np.clip(x, *_clip_bounds(eps, clip_dtype))
            log_p, log_not_p = np.log(p), np.log1p(-p)
        loss = -w * (pw * y * log_p + (1.0 - y) * log_not_p)
    loss = np.broadcast_to(loss, x.shape)
    if reduction == "mean":
        with np.errstate(all="ignore"):
            return np.asarray(np.mean(loss) if loss.size else np.nan)
    return _reduce(loss, 0.0, reduction)


def numerical_grad(f: Callable[[np.ndarray], Any], x: Any, h: float = 1e-6) -> np.ndarray:
    """Central differences of `sum(f(x))` with respect to every element of `x` (float64)."""
    x = _f64(x).copy()
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        saved = x[i]
        x[i] = saved + h
        up = float(np.sum(f(x)))
        x[i] = saved - h
        down = float(np.sum(f(x)))
        x[i] = saved
        grad[i] = (up - down) / (2 * h)
    return grad


def cross_entropy_grad(
    input: Any,
    target: Any,
    *,
    axis: int = -1,
    from_logits: bool = True,
    weight: Any = None,
    sample_weight: Any = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    softcap: float | None = None,
    eps: float = 1e-7,
    clip_dtype: Any = None,
) -> np.ndarray:
    """The gradient of `sum(cross_entropy(...))` with respect to `input`, analytically (valid
    labels only): with `a_c` the weight of class `c` in the loss (`(1 - e) w_y [c = y] + e w_c / C`
    for class indices, `w_c q_c` for probabilities, 0 where `q == 0`), `d l / d x_j =
    softmax_j (sum_c a_c + 2 z lse) - a_j`, chained through softcap or through the clip and
    renormalisation of `from_logits=False`; ignored rows get `0 * g` (0, or NaN where the
    row's softmax is NaN, as autodiff gives it)."""
    target = np.asarray(target)
    u = np.moveaxis(_f64(input), axis, -1)
    n_classes = u.shape[-1]
    e = float(label_smoothing)
    w = np.ones(n_classes) if weight is None else _f64(weight)
    with np.errstate(all="ignore"):
        if np.issubdtype(target.dtype, np.integer):
            y = target.astype(object)
            ignored = np.asarray(y == ignore_index, dtype=bool)
            yc = np.where(ignored, 0, y).astype(np.int64)
            a = (e / n_classes) * np.broadcast_to(w, u.shape)
            a = a + (1.0 - e) * w[yc][..., None] * np.eye(n_classes)[yc]
            denominator_terms = w[yc] * ~ignored
        else:
            q = (1.0 - e) * np.moveaxis(_f64(target), axis, -1) + e / n_classes
            a = np.where(q == 0, 0.0, w * q)
            ignored = np.zeros(u.shape[:-1], dtype=bool)
            denominator_terms = np.ones(u.shape[:-1])
        s = np.broadcast_to(1.0 if sample_weight is None else _f64(sample_weight), ignored.shape)
        r = s.copy()
        if reduction == "mean":
            r = r / np.sum(s * denominator_terms)
        if from_logits:
            x = u if softcap is None else softcap * np.tanh(u / softcap)
            p = softmax(x, axis=-1)
            total = np.sum(a, axis=-1, keepdims=True)
            if z_loss:
                total = total + 2.0 * z_loss * logsumexp(x, axis=-1, keepdims=True)
            g = p * total - a
            if softcap is not None:
                g = g * (1.0 - np.tanh(u / softcap) ** 2)
        else:
            lo, hi = _clip_bounds(eps, clip_dtype)
            total = np.sum(u, axis=-1, keepdims=True)
            prob = u / total
            inside = (prob >= lo) & (prob <= hi)
            g_prob = np.where(inside, -a / prob, 0.0)
            g = (g_prob - np.sum(g_prob * prob, axis=-1, keepdims=True)) / total
        g = np.where(ignored[..., None], 0.0 * g, g * r[..., None])
    return np.moveaxis(g, -1, axis)


def binary_cross_entropy_grad(
    input: Any,
    target: Any,
    *,
    from_logits: bool = True,
    weight: Any = None,
    pos_weight: Any = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    eps: float = 1e-7,
    clip_dtype: Any = None,
) -> np.ndarray:
    """The gradient of `sum(binary_cross_entropy(...))` with respect to `input`, analytically:
    `w ((pw y + 1 - y) sigmoid(x) - pw y)` from logits; `w ((1 - y) / (1 - p) - pw y / p)` inside
    the clip (0 outside) from probabilities."""
    x = _f64(input)
    e = float(label_smoothing)
    y = _f64(target) * (1.0 - e) + e / 2.0
    w = 1.0 if weight is None else _f64(weight)
    pw = 1.0 if pos_weight is None else _f64(pos_weight)
    with np.errstate(all="ignore"):
        if from_logits:
            g = (pw * y + 1.0 - y) / (1.0 + np.exp(-x)) - pw * y
        else:
            lo, hi = _clip_bounds(eps, clip_dtype)
            p = np.clip(x, lo, hi)
            inside = (x >= lo) & (x <= hi)
            g = np.where(inside, (1.0 - y) / (1.0 - p) - pw * y / p, 0.0)
        g = np.broadcast_to(w * g, x.shape)
        if reduction == "mean":
            g = g / x.size
    return np.asarray(g)
