"""JAX: tracers are unreadable; device facts; XLA-friendly primitives."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from .._typing import Array
from ._generic import Backend, GradRule
from ._jax_linear import linear_custom_grad as _linear_custom_grad

_SLAB_ROWS = 1024
"""Rows of the accumulator :meth:`Native.matmul_add` updates per step on the CPU."""


def _explicit_mesh(*arrays: Array) -> bool:
    """Whether an array is sharded over a mesh with Explicit axes (JAX's sharding in types).

    A gather there needs an output sharding that JAX will not infer, while a one-hot reduction
    along the (possibly sharded) class axis types and runs as usual.
    """
    for a in arrays:
        mesh = getattr(jax.typeof(a).sharding, "mesh", None)
        if jax.sharding.AxisType.Explicit in getattr(mesh, "axis_types", ()):
            return True
    return False


def _one_hot_take(x: Array, index: Array, axis: int) -> Array:
    classes = jnp.arange(x.shape[axis], dtype=index.dtype)
    classes = jnp.reshape(classes, tuple(-1 if i == axis % x.ndim else 1 for i in range(x.ndim)))
    return jnp.sum(jnp.where(index == classes, x, 0), axis=axis, keepdims=True)


def _widens_exactly(dtype: Any, index_dtype: Any) -> bool:
    """Whether labels of ``dtype`` cast to ``index_dtype`` without wrapping (signed ones no
    wider, unsigned ones narrower), so every such dtype takes the same path."""
    bits, index_bits = jnp.iinfo(dtype).bits, jnp.iinfo(index_dtype).bits
    if jnp.issubdtype(dtype, jnp.unsignedinteger):
        return bool(bits < index_bits)
    return bool(bits <= index_bits)


def _plain_loss(
    input: Array, target: Array, ignore: int | None, reduction: str, dtype: Any
) -> Array:
    """The plain cross-entropy as a ``jax.custom_jvp`` whose tangent is one fused pass."""
    classes = input.shape[-1]

    def masks(y: Array) -> tuple[Array, Array]:
        valid = (y >= 0) & (y < classes)
        ignored = (y == ignore) if ignore is not None else jnp.zeros_like(valid)
        # 1 for a counted row, 0 for an ignored one, NaN for an invalid label (carried into
        # the gradient by the product).
        factor = jnp.where(valid & ~ignored, 1.0, jnp.where(ignored, 0.0, jnp.nan)).astype(dtype)
        return factor, ignored

    def shifted(x: Array) -> Array:
        x = x.astype(dtype)
        shift = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
        return x - jnp.where(jnp.isfinite(shift), shift, 0)

    def reduce(z: Array, log_sum: Array, y: Array, factor: Array, ignored: Array) -> Array:
        # ``log_sum - (x_y - shift)``, not ``logsumexp - x_y``: a confident row's small loss
        # does not come from the cancellation of two large numbers.
        picked = jnp.take_along_axis(z, y[..., None], axis=-1, mode="clip")
        # An ignored row is 0 whatever its logits (NaN, infinities) hold: a select, not a
        # product.
        rows = jnp.where(ignored, 0.0, (log_sum - picked)[..., 0]) * factor
        if reduction == "none":
            return rows.astype(input.dtype)
        total = jnp.sum(rows)
        if reduction == "mean":
            total = total / jnp.sum((~ignored).astype(dtype))
        return total.astype(input.dtype)

    @jax.custom_jvp
    def loss(x: Array, y: Array) -> Array:
        # Forward only: the exponentials are summed where they are made, never stored.
        z = shifted(x)
        return reduce(z, jnp.log(jnp.sum(jnp.exp(z), axis=-1, keepdims=True)), y, *masks(y))

    def loss_jvp(primals: Any, tangents: Any) -> tuple[Array, Array]:
        x, y = primals
        dx, _ = tangents
        # With a gradient the exponentials are stored once and reused: the gradient is
        # ``softmax - onehot`` (a select at the label, not a gather, so reverse mode
        # transposes it into one elementwise pass), scaled per row.
        factor, ignored = masks(y)
        z = shifted(x)
        e = jnp.exp(z)
        total = jnp.sum(e, axis=-1, keepdims=True)
        out = reduce(z, jnp.log(total), y, factor, ignored)
        onehot = jnp.arange(classes, dtype=y.dtype) == y[..., None]
        grad = e * (1.0 / total) - onehot.astype(dtype)
        rows = jnp.sum(grad * dx.astype(dtype), axis=-1) * factor
        if reduction == "none":
            return out, rows.astype(input.dtype)
        tangent = jnp.sum(rows)
        if reduction == "mean":
            tangent = tangent / jnp.sum((~ignored).astype(dtype))
        return out, tangent.astype(input.dtype)

    loss.defjvp(loss_jvp)
    out: Array = loss(input, target)
    return out


class Facts(Backend):
    """Concrete JAX arrays can be read; tracers (jit, vmap, grad) cannot."""

    name = "jax"

    def is_traced(self, x: Array) -> bool:
        return isinstance(x, jax.core.Tracer)

    def is_lazy(self, x: Array) -> bool:
        return False

    def on_host(self, x: Array) -> bool:
        return all(d.platform == "cpu" for d in x.devices())

    def device(self, x: Array) -> Any:
        # A sharded array's `.device` is its sharding, which differs between arrays on one mesh
        # sharded differently and which arrays of another rank cannot be created with: new
        # arrays go to the default device instead and JAX moves them where they are combined.
        if self.is_traced(x):
            return None
        devices = x.devices()
        return next(iter(devices)) if len(devices) == 1 else None

    def placement(self, x: Array) -> Any:
        if self.is_traced(x):
            return None
        devices = x.devices()
        return next(iter(devices)) if len(devices) == 1 else frozenset(devices)

    def index_dtype(self) -> Any:
        # int64 only exists with jax_enable_x64; otherwise JAX's widest is int32.
        return jnp.asarray(0).dtype

    def take_along_axis(self, x: Array, index: Array, axis: int) -> Array:
        if _explicit_mesh(x, index):
            return _one_hot_take(x, index, axis)
        return super().take_along_axis(x, index, axis)

    def take(self, table: Array, index: Array) -> Array:
        if _explicit_mesh(table, index):
            return jnp.squeeze(_one_hot_take(table, index[..., None], -1), axis=-1)
        return super().take(table, index)


class Native(Backend):
    """A log-sum-exp whose shift carries no gradient, and a clipping take_along_axis."""

    native = True

    def fused_index_loss(
        self,
        input: Array,
        target: Array,
        *,
        axis: int,
        weight: Array | None,
        ignore_index: int,
        label_smoothing: float,
        reduction: str,
    ) -> Array | None:
        # Under jit (a traced target, so labels are never read and an invalid one gives NaN)
        # the plain case is one lean graph that XLA fuses as it fuses Optax's: the label masks
        # fold into one per-row factor and the mean's row count into the same reduction.
        # Other options, eager labels (validated by the core), wrapping label dtypes and
        # empty or sharded-with-types arrays stay on the general path.
        if (
            not self.is_traced(target)
            or weight is not None
            or label_smoothing
            or axis != input.ndim - 1
            or 0 in input.shape
            or not _widens_exactly(target.dtype, self.index_dtype())
            or _explicit_mesh(input, target)
        ):
            return None
        own = jnp.iinfo(target.dtype)
        ignore = ignore_index if own.min <= ignore_index <= own.max else None
        labels = target.astype(self.index_dtype())  # widening: exact, and wide enough for C
        return _plain_loss(input, labels, ignore, reduction, self.compute_dtype(input.dtype))

    def logsumexp(self, x: Array, axis: int) -> tuple[Array, Array]:
        shift = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
        shift = jnp.where(jnp.isfinite(shift), shift, 0)
        return shift, jnp.log(jnp.sum(jnp.exp(x - shift), axis=axis, keepdims=True))

    def softmax_from_lse(
        self,
        x: Array,
        shift: Array,
        log_sum: Array,
        axis: int,
        scale: Array | None = None,
        *,
        overwrite: bool = False,
    ) -> Array:
        # exp(x - shift) is the very expression logsumexp summed: XLA computes it once (CSE)
        # and the gradient costs a multiply, not a second exponential.
        factor = jnp.exp(-log_sum)
        return jnp.exp(x - shift) * (factor if scale is None else scale * factor)

    def take_along_axis(self, x: Array, index: Array, axis: int) -> Array:
        if _explicit_mesh(x, index):
            return _one_hot_take(x, index, axis)
        return jnp.take_along_axis(x, index, axis=axis, mode="clip")

    def fill_rows(self, g: Array, mask: Array, value: float) -> Array:
        # A scalar fill: XLA fuses the select into the kernel that produced g.
        return jnp.where(mask, jnp.asarray(value, dtype=g.dtype), g)

    def custom_grad(
        self, rule: GradRule, state: Any, x: Array, *, others: tuple[Array | None, ...] = ()
    ) -> Array:
        """The loss under a ``jax.custom_jvp`` whose rule is the analytic derivative.

        Reverse mode transposes the rule, so the gradient is one fused pass over the logits
        (``softmax - target``, scaled, reusing the forward's exponentials) instead of the
        autodiff of every forward op, with a select at the label in place of a scatter. The
        rule is built of jnp ops, so it is
        differentiated in turn (Hessians, ``jacfwd``). The arrays of ``state`` (derived from
        the target and weights) are explicit inputs of the custom function: where one of them
        carries a tangent, its part of the derivative comes from JAX's own ``jvp``.
        """
        names = [
            f.name
            for f in dataclasses.fields(state)
            if isinstance(getattr(state, f.name), jax.Array)
        ]
        values = [getattr(state, name) for name in names]

        def rebuild(arrays: Any) -> Any:
            return dataclasses.replace(state, **dict(zip(names, arrays, strict=True)))

        @jax.custom_jvp
        def loss(x: Array, arrays: list[Array]) -> Array:
            return rule.forward(rebuild(arrays), x)[0]

        def loss_jvp(primals: Any, tangents: Any) -> tuple[Array, Array]:
            x, arrays = primals
            dx, darrays = tangents
            here = rebuild(arrays)
            out, saved = rule.forward(here, x)
            moved = [i for i, t in enumerate(darrays) if not isinstance(t, SymbolicZero)]
            if isinstance(dx, SymbolicZero):
                tangent = jnp.zeros_like(out)
            else:
                tangent = rule.tangent(here, x, saved, dx)
            if moved:

                def through(*chosen: Array) -> Array:
                    full = list(arrays)
                    for i, v in zip(moved, chosen, strict=True):
                        full[i] = v
                    return rule.forward(rebuild(full), x)[0]

                _, more = jax.jvp(
                    through, tuple(arrays[i] for i in moved), tuple(darrays[i] for i in moved)
                )
                tangent = tangent + more
            return out, tangent

        loss.defjvp(loss_jvp, symbolic_zeros=True)
        return loss(x, values)

    def scan(self, step: Any, carry: Any, blocks: tuple[Any, ...]) -> Any:
        return jax.lax.scan(step, carry, blocks)

    def matmul_add(self, acc: Array, a: Array, b: Array) -> Array:
        # XLA:CPU runs ``a.T @ b`` (a contraction over a's leading axis) as a generic dot
        # about half as fast as the library kernel of the logits' product, into a temporary
        # of acc's size that a second pass adds. Taken a slab of acc's rows at a time, each
        # slab of ``a`` is a compact copy, the product runs at full speed and the sum is
        # written in place. Accelerators fuse the one large product and its sum instead.
        rows = int(acc.shape[0])
        count = rows // _SLAB_ROWS
        if count < 2 or jax.default_backend() != "cpu":
            return acc + jnp.matmul(a.T, b)

        def slab(i: Array, acc: Array) -> Array:
            start = i * _SLAB_ROWS
            part = jax.lax.dynamic_slice_in_dim(a, start, _SLAB_ROWS, axis=1)
            here = jax.lax.dynamic_slice_in_dim(acc, start, _SLAB_ROWS, axis=0)
            return jax.lax.dynamic_update_slice_in_dim(acc, here + part.T @ b, start, axis=0)

        acc = jax.lax.fori_loop(0, count, slab, acc)
        done = count * _SLAB_ROWS
        if done == rows:
            return acc
        return acc.at[done:].add(a[:, done:].T @ b)

    def linear_custom_grad(
        self,
        rule: Any,
        state: Any,
        hidden: Array,
        weight: Array,
        bias: Array | None,
        *,
        others: tuple[Array | None, ...] = (),
    ) -> Array:
        return _linear_custom_grad(rule, state, hidden, weight, bias)


class NativeBackend(Native, Facts):
    """The facts with the native overrides on top."""
