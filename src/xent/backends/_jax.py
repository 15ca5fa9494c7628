"""JAX: tracers are unreadable; device facts; XLA-friendly primitives."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .._typing import Array
from ._generic import Backend


class Facts(Backend):
    """Concrete JAX arrays can be read; tracers (jit, vmap, grad) cannot."""

    name = "jax"

    def is_traced(self, x: Array) -> bool:
        return isinstance(x, jax.core.Tracer)

    def is_lazy(self, x: Array) -> bool:
        return False

    def on_host(self, x: Array) -> bool:
        return all(d.platform == "cpu" for d in x.devices())

    def index_dtype(self) -> Any:
        # int64 only exists with jax_enable_x64; otherwise JAX's widest is int32.
        return jnp.asarray(0).dtype


class Native(Backend):
    """A log-sum-exp whose shift carries no gradient, and a clipping take_along_axis."""

    native = True

    def logsumexp(self, x: Array, axis: int) -> tuple[Array, Array]:
        shift = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
        shift = jnp.where(jnp.isfinite(shift), shift, 0)
        return shift, jnp.log(jnp.sum(jnp.exp(x - shift), axis=axis, keepdims=True))

    def take_along_axis(self, x: Array, index: Array, axis: int) -> Array:
        return jnp.take_along_axis(x, index, axis=axis, mode="clip")

    def fill_rows(self, g: Array, mask: Array, value: float) -> Array:
        # A scalar fill: XLA fuses the select into the kernel that produced g.
        return jnp.where(mask, jnp.asarray(value, dtype=g.dtype), g)


class NativeBackend(Native, Facts):
    """The facts with the native overrides on top."""
