"""JAX collectives over a named mesh axis for :mod:`xent.parallel`, and its ``custom_vjp``."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from .._parallel import Backward, Collectives, Forward, _Stats
from .._typing import Array
from . import _jax_linear


class JaxAxis(Collectives):
    """The devices along a named axis, inside ``jax.shard_map`` (or ``jax.pmap``).

    Parameters
    ----------
    axis_name : str
        The mesh axis (``shard_map``) or ``axis_name`` (``pmap``) the classes are split over.

    Notes
    -----
    The forward is one ``lax.pmax`` and one ``lax.psum`` of per-row buffers. The loss is a
    ``jax.custom_vjp`` whose backward uses the forward's all-reduced stats: it sends nothing,
    and every device gets the gradient of its own slice (``jax.grad`` inside the mapped
    function, or of the mapped function). Every device must hold the same number of classes
    (``shard_map`` splits evenly); ``class_start`` is ``lax.axis_index(axis_name) * C_local``.
    """

    def __init__(self, axis_name: str) -> None:
        self.axis_name = axis_name

    def all_reduce_max(self, x: Array) -> Array:
        return jax.lax.pmax(x, self.axis_name)

    def all_reduce_sum(self, x: Array) -> Array:
        return jax.lax.psum(x, self.axis_name)

    def class_count(self, local: int, like: Array) -> int:
        return local * int(jax.lax.axis_size(self.axis_name))

    def attach_linear_grad(
        self, rule: Any, state: Any, hidden: Array, weight: Array, bias: Array | None
    ) -> Array:
        return _jax_linear.linear_custom_grad(rule, state, hidden, weight, bias)

    def attach_grad(self, forward: Forward, backward: Backward, state: Any, x: Array) -> Array:
        # The stats dataclass goes to the backward as its array fields (the residuals); the
        # rest (None, Python numbers) is static and kept aside.
        statics: dict[str, Any] = {}

        @jax.custom_vjp
        def loss(x: Array) -> Array:
            return forward(state, x)[0]

        def loss_fwd(x: Array) -> tuple[Array, Any]:
            out, (x_used, stats) = forward(state, x)
            arrays = {}
            for f in dataclasses.fields(stats):
                value = getattr(stats, f.name)
                if isinstance(value, jax.Array):
                    arrays[f.name] = value
                else:
                    statics[f.name] = value
            return out, (x_used, arrays)

        def loss_bwd(res: Any, cotangent: Array) -> tuple[Array]:
            x_used, arrays = res
            stats = _Stats(**arrays, **statics)
            return (backward(state, x_used, (x_used, stats), cotangent),)

        loss.defvjp(loss_fwd, loss_bwd)
        return loss(x)
