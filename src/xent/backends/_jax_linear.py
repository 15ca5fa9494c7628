"""JAX: the linear cross-entropy under a ``jax.custom_vjp`` with chunked gradients."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from .._typing import Array


def linear_custom_grad(
    rule: Any, state: Any, hidden: Array, weight: Array, bias: Array | None
) -> Array:
    """The loss as a ``jax.custom_vjp`` of ``hidden``, ``weight`` and ``bias``.

    The forward rule computes the gradients in the same pass over each block of logits and
    keeps them as residuals: for a 0-d loss the cotangent only scales them. For ``"none"``
    they are those of ``sum(loss)``: a cotangent equal on every row (a ``.sum()`` or
    ``.mean()`` of the rows, the usual case) scales them too; any other scales ``d hidden``
    row by row (each row's gradient is linear in its own cotangent) and the backward makes
    each block's logits again for ``d weight`` and ``d bias`` (``lax.cond`` picks the branch
    at run time). The arrays of ``state`` (derived from the target and the weights) are
    explicit inputs, so the rule works under ``jit`` and on sharded arrays; they get no
    gradient.
    """
    names = [
        f.name for f in dataclasses.fields(state) if isinstance(getattr(state, f.name), jax.Array)
    ]
    values = [getattr(state, name) for name in names]

    def rebuild(arrays: Any) -> Any:
        return dataclasses.replace(state, **dict(zip(names, arrays, strict=True)))

    scalar = state.reduction != "none"

    @jax.custom_vjp
    def loss(h: Array, w: Array, b: Array | None, arrays: list[Array]) -> Array:
        out: Array = rule.loss(rebuild(arrays), h, w, b)
        return out

    # The mesh axes each of hidden, weight, bias varies over, seen by the forward rule.
    axes: list[frozenset[str]] = []

    def forward(h: Array, w: Array, b: Array | None, arrays: list[Array]) -> tuple[Array, Any]:
        here = rebuild(arrays)
        axes[:] = [frozenset() if x is None else _varying(x) for x in (h, w, b)]
        out, grads = rule.loss_and_grad(here, h, w, b, None)
        return out, (grads, None if scalar else (h, w, b), arrays)

    def backward(saved: Any, cotangent: Array) -> tuple[Any, ...]:
        kept, inputs, arrays = saved
        if scalar:
            grads = _scaled(kept, cotangent)
        elif cotangent.size == 0:
            grads = kept  # no rows: the gradients are zeros whatever the cotangent
        else:
            first = jnp.reshape(cotangent, (-1,))[0]

            def again() -> Any:
                h, w, b = inputs
                dh = kept[0] * cotangent[..., None].astype(kept[0].dtype)
                need = (False, True, b is not None)
                _, (_, dw, db) = rule.loss_and_grad(rebuild(arrays), h, w, b, cotangent, need)
                return dh, dw, db

            uniform = jnp.all(cotangent == first)
            grads = jax.lax.cond(uniform, lambda: _scaled(kept, first), again)
        return (*_typed(grads, axes), [None] * len(arrays))

    loss.defvjp(forward, backward)
    out: Array = loss(hidden, weight, bias, values)
    return out


def _scaled(grads: Any, factor: Array) -> tuple[Any, ...]:
    return tuple(None if g is None else g * factor.astype(g.dtype) for g in grads)


def _typed(grads: Any, axes: list[frozenset[str]]) -> tuple[Any, ...]:
    """Each gradient summed over the ``shard_map`` axes it varies over and its input does not
    (an input replicated over the batch's axis gets the sum of every shard's rows), as the
    transpose of JAX's implicit broadcast would; outside ``shard_map`` nothing varies."""
    out = []
    for g, own in zip(grads, axes, strict=True):
        if g is not None:
            extra = tuple(sorted(_varying(g) - own))
            if extra:
                g = jax.lax.psum(g, extra)
        out.append(g)
    return tuple(out)


def _varying(x: Array) -> frozenset[str]:
    """The ``shard_map`` axes ``x`` varies over (none outside ``shard_map``)."""
    kind = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(getattr(kind, "varying", ()))
