"""JAX: tracers are unreadable; device facts; XLA-friendly primitives."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from .._typing import Array
from ._generic import SAFE_SUMS, Backend, GradRule, IndexOptions, scaled_gap
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


_SMALL_ELEMENTS = 2**14
"""Inputs of at most this many logits take the row max first, in Optax's two passes, with no
conditional: there XLA runs every op on one thread, and the single pass's gather, predicate and
branch cost more than the pass they save. Measured on two cores against Optax, medians of seven
paired rounds: at 256 x 10, 128 x 128, 512 x 32, 100 x 100 and 2048 x 8 the single pass took
1.39x, 1.08x, 1.07x, 1.05x and 0.98x, the row max 1.00x, 1.00x, 1.02x, 0.99x and 0.90x; from
2^15 logits (256 x 128, 64 x 512, 32 x 1000, 4096 x 10) the single pass is 0.56x-0.74x."""

_SELECT_ELEMENTS = 2**12
"""Inputs of at most this many logits compute both label-smoothing sums (the plain one and the
one that cannot overflow) and select per row; larger ones branch (``lax.cond``) to the second
only where the first is not finite. Medians of 15 interleaved rounds against Optax, float32
forward+backward: the branch cost 256 x 10 1.07x (0.90x without it), the select 128 x 128
0.86x-0.89x (0.65x-0.76x without it), 256 x 10 0.92x-0.94x."""

_FEW_CLASSES = 16
"""Rows of at most this many classes take the forward shifted by the label's logit; wider ones
the unshifted sums (see ``_plain_loss``). Measured on two cores against Optax: unshifted
0.62x-0.77x and shifted 0.93x-0.96x at 8192 x 32 and 16384 x 100 (medians of paired rounds);
shifted 0.56x-1.01x and unshifted 0.67x-1.29x at 4096 x 10, 65536 x 8 and 100000 x 10.
(Smaller inputs, such as 256 x 10, take neither: see ``_SMALL_ELEMENTS``.)"""


_STACKED_ROWS = 2**14
"""A mean over at most this many rows sums the losses and the rows counted in one reduction of
the two stacked; more rows take two reductions, which XLA splits over the threads where the
stacked one runs on one. Measured on two cores against Optax, forward, medians of nine
interleaved rounds, stacked / two: 0.70x / 0.95x at 8192 x 32, 1.09x / 1.58x at 4096 x 10,
0.66x / 0.68x at 16384 x 100, 0.89x / 0.71x at 50000 x 30, 0.98x / 0.87x at 262144 x 4, and
1.19x / 0.90x at (4, 19, 128, 256) with the classes at axis 1."""

_ONE_HOT_CLASSES = 100
"""Rows of at most this many classes take the gradient's label term as a one-hot select, which
XLA fuses into the pass that writes the gradient; wider ones gather it, which the transpose
writes as one value per row into that buffer. Where rows are short, that scatter (a loop over
the rows of its own) costs more than a compare per logit. Measured on two cores against Optax,
forward+backward, medians of nine interleaved rounds, one-hot / gather: 0.75x / 0.95x at
4096 x 10, 0.98x / 1.12x at 16384 x 100, 0.88x / 1.29x at (16, 10, 256) and 0.68x / 0.97x at
(64, 100, 8) with the classes at axis 1; 1.27x / 0.97x-1.13x at (32, 1000, 16)."""


def _row_shift(x: Array, axis: int, dtype: Any, *, keepdims: bool = True) -> Array:
    """xent's shift of each row: its max along ``axis`` (taken of ``x`` itself, exact in
    float16/bfloat16, which XLA then widens only inside the pass that reads it), 0 where it is
    not finite, in ``dtype``, carrying no derivative."""
    m = jnp.max(x, axis=axis, keepdims=keepdims)
    return jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0).astype(dtype))


def _row_sums(f: Any, *operands: Array, axis: int, stored: bool = False) -> Array:
    """``jnp.sum(f(*operands), axis=axis)``, in XLA's fast way on the CPU where rows are long.

    ``operands`` broadcast together: each has the full shape, or size 1 along ``axis`` (one
    value a row), or size 1 along every other axis (one value a class), or none; ``f`` is
    elementwise. Pass the arrays themselves and do the work in ``f``: where rows are long,
    the full-size ones are cut (as views) and ``f`` runs on the cuts.

    XLA's CPU backend (its YNNPACK reduce fusion, jaxlib 0.10) sums any fused elementwise
    work (an ``exp``, a difference, a product) along rows of more than 2^15 classes about
    eight times as slowly as along shorter ones from 256 such rows on, and up to twice as
    slowly below (2.2 ns a logit against 0.2-0.4 ns at 1024 x 50257, 256 x 32769 and
    4096 x 65536, where 1024 x 32768 and 128 x 50257 are fast). Such rows are summed in pieces
    of at most 2^15 classes where their classes split evenly, then the pieces (behind a
    barrier, so that XLA does not fold the two sums back into one); else in groups of rows (a
    ``lax.map``) where their number splits evenly (:func:`_long_rows`). ``stored``: the
    caller stores these terms too (a gradient's exponentials), so that one sum of them costs
    no second pass: cut only where the sum is slowest, and never in groups.
    """
    shape = jnp.broadcast_shapes(*(jnp.shape(o) for o in operands))
    kinds = [_operand_kind(jnp.shape(o), shape) for o in operands]
    plan = None
    if None not in kinds:
        plan = _long_rows(shape, axis, pieces="class" not in kinds, stored=stored)
    if plan is None:
        return jnp.sum(f(*operands), axis=axis)
    lead, classes = shape[:-1], shape[-1]
    how, size = plan
    if how == "piece":
        count = classes // size
        full = [
            jnp.reshape(o, (-1, size)) for o, k in zip(operands, kinds, strict=True) if k == "full"
        ]
        cut = iter(jax.lax.optimization_barrier(full))
        parts = [
            next(cut) if k == "full"
            else jnp.reshape(jnp.broadcast_to(o, (*lead, count)), (-1, 1)) if k == "row"
            else o
            for o, k in zip(operands, kinds, strict=True)
        ]  # fmt: skip
        return jnp.sum(jnp.reshape(jnp.sum(f(*parts), axis=-1), (*lead, count)), axis=-1)
    mapped = [
        jnp.reshape(
            jnp.broadcast_to(o, (*lead, 1) if k == "row" else shape), (-1, size, o.shape[-1])
        )
        for o, k in zip(operands, kinds, strict=True)
        if k in ("full", "row")
    ]
    kept = [
        jnp.reshape(o, (1, classes)) if k == "class" else o
        for o, k in zip(operands, kinds, strict=True)
    ]

    def group(rows: list[Array]) -> Array:
        given = iter(rows)
        args = [
            next(given) if k in ("full", "row") else o for o, k in zip(kept, kinds, strict=True)
        ]
        return jnp.sum(f(*args), axis=-1)

    return jnp.reshape(jax.lax.map(group, mapped), lead)


def _exp_sums(
    x: Array, shift: Array | None, axis: int, dtype: Any, *, stored: bool = False
) -> Array:
    """``sum(exp(x - shift))`` along ``axis`` in ``dtype`` (:func:`_row_sums`; ``shift``
    keeps the class axis, of size 1; None: no shift)."""
    if shift is None:
        return _row_sums(lambda x: jnp.exp(x.astype(dtype)), x, axis=axis, stored=stored)
    exp = lambda x, s: jnp.exp(x.astype(dtype) - s)  # noqa: E731
    return _row_sums(exp, x, shift, axis=axis, stored=stored)


def _operand_kind(own: tuple[int, ...], shape: tuple[int, ...]) -> str | None:
    """How an operand of shape ``own`` lies in a sum of ``shape`` (classes last): "full",
    "row" (one value a row), "class" (one a class), "scalar", or None (another broadcast)."""
    if not own:
        return "scalar"
    if len(own) != len(shape):
        return None
    if own == shape:
        return "full"
    if own[-1] == 1 and own[:-1] == shape[:-1]:
        return "row"
    if own[-1] == shape[-1] and math.prod(own[:-1]) == 1:
        return "class"
    return None


def _long_rows(
    shape: tuple[int, ...], axis: int, *, pieces: bool = True, stored: bool = False
) -> tuple[str, int] | None:
    """How :func:`_row_sums` cuts rows of ``shape`` (classes along ``axis``): ``("piece",
    w)`` for pieces of ``w`` classes (where ``pieces``), ``("group", g)`` for groups of ``g``
    rows, or None to sum them as they are (short rows; classes along another axis; another
    platform; ``stored`` terms, but in pieces from ``_MANY_ROWS`` rows)."""
    classes = shape[axis] if shape else 1
    if axis != len(shape) - 1 or classes <= _LONG_ROWS or jax.default_backend() != "cpu":
        return None
    many = math.prod(shape[:-1]) >= _MANY_ROWS
    for count in range(2, classes // _LEAST_PIECE + 1) if pieces and (many or not stored) else ():
        if classes % count == 0 and classes // count <= _LONG_ROWS:
            return "piece", classes // count
    rows = math.prod(shape[:-1])
    if not many or stored:
        return None
    for size in range(_GROUP_ROWS, max(_GROUP_ROWS // 8, 1) - 1, -1):
        if rows % size == 0:
            return "group", size
    return None


_LONG_ROWS = 2**15
"""Rows of more classes than this are summed in pieces or groups (:func:`_row_sums`)."""

_LEAST_PIECE = 64
"""Pieces of fewer classes cost more than they save (1.2x at 32, 1.7x at 16, 4.7x at 8
classes, against pieces of 64 to 2^15 at 1024 x 65536)."""

_MANY_ROWS = 256
"""From this many rows on, XLA's slowest sums of long rows set in. Below, pieces still pay
for themselves in a forward (64 x 50257: 0.29x Optax's time, 0.55x summed whole) but not
beside a gradient's stored exponentials (1.16x there, 1.00x summed whole); from here on they
do (bfloat16 256 x 50257: 0.39x, 0.80x summed whole)."""

_GROUP_ROWS = 64
"""Rows per group of :func:`_row_sums` (the most rows up to this number, and down to an
eighth of it, that split the rows evenly): 20 ms at 1024 x 50261 where one sum takes 119 ms
and groups of 128 rows 27 ms. In a gradient, groups compute the stored exponentials a second
time (1.16x Optax's time at 1000 x 50261, 1.01x summed whole)."""


@jax.custom_batching.custom_vmap
def _every(ok: Array) -> Array:
    """Whether every entry of a boolean array is true: one answer for a whole ``vmap`` batch."""
    return jnp.all(ok)


@_every.def_vmap
def _every_batched(axis_size: int, in_batched: list[bool], ok: Array) -> tuple[Array, bool]:
    # Unbatched, so that a ``lax.cond`` on it stays a branch under ``vmap`` instead of a
    # select that computes both sides.
    return jnp.all(ok), False


def _plain_loss(
    input: Array,
    target: Array,
    weight: Array | None,
    axis: int,
    ignore: int | None,
    smoothing: float,
    reduction: str,
    dtype: Any,
) -> Array:
    """The plain cross-entropy as a ``jax.custom_jvp`` whose rule XLA fuses as it fuses Optax's.

    The shift and the logit at the label are read from ``input`` itself, so the shifted
    logits are never stored: the forward sums the exponentials of ``input`` itself, unshifted
    where the sums are safe, in the reduction that first reads it, so that it reads the logits
    once (Optax's reads them twice, for the row max first). Every per-row mask works on a
    vector of rows, and the mean's row count is summed with the losses in one reduction.
    The classes lie along ``axis`` (non-negative), as in Optax's loss: XLA reduces along any
    axis in place, so no transposed copy of the logits is made. Class weights (``weight``, of
    a floating dtype) scale each row by its label's weight, and the mean divides by the sum
    of those weights over the rows counted; the rule differentiates them too. Label
    smoothing ``s`` makes a row's loss ``(1 - s) w_y (lse - x_y) + (s / C) sum_c w_c (lse -
    x_c)`` (PyTorch's), the spread summed from the logits shifted as the pass shifts them.
    """
    classes = input.shape[axis]
    class_shape = tuple(-1 if i == axis else 1 for i in range(input.ndim))

    def per_class(a: Array) -> Array:
        """A per-row array with the class axis put back, of size 1."""
        return jnp.expand_dims(a, axis)

    def row_sums(f: Any, *operands: Array) -> Array:
        """``sum(f(*operands))`` over the classes (:func:`_row_sums`)."""
        return _row_sums(f, *operands, axis=axis)

    def exp_sums(x: Array, shift: Array | None, *, stored: bool = False) -> Array:
        """``sum(exp(x - shift))`` per row, in ``dtype`` (None: no shift)."""
        shift = None if shift is None else per_class(shift)
        return _exp_sums(x, shift, axis, dtype, stored=stored)

    def label_logit(x: Array, y: Array) -> Array:
        """``x_y`` per row, in ``dtype`` (a clipped label's logit for an invalid one)."""
        # A float16/bfloat16 label logit is gathered at its own width and then widened. XLA
        # would otherwise move the widening ahead of the gather, onto the whole input, and
        # share that widened copy with the sum of exponentials: a float32 copy of the logits
        # written and read again (Optax's graph stores one). Behind the barrier the sum
        # widens each logit as it reads it.
        source = x if jnp.dtype(x.dtype) == jnp.dtype(dtype) else jax.lax.optimization_barrier(x)
        picked = jnp.take_along_axis(source, per_class(y), axis=axis, mode="clip")
        return jnp.squeeze(picked, axis).astype(dtype)

    def stats(x: Array, y: Array) -> tuple[Array, Array]:
        """``(shift, x_y - shift)`` per row, in ``dtype``."""
        # The max converts exactly (the conversion is monotone), so float16/bfloat16 rows
        # are reduced at their own width and shifted in ``dtype``.
        shift = _row_shift(x, axis, dtype, keepdims=False)
        # ``log_sum - (x_y - shift)``, not ``logsumexp - x_y``: a confident row's small loss
        # does not come from the cancellation of two large numbers.
        return shift, label_logit(x, y) - shift

    def masked(rows: Array, y: Array) -> Array:
        """0 for an ignored row whatever its logits (NaN, infinities) hold; NaN for an
        invalid label, by a product, so that reverse mode carries it to whatever the row
        depends on (a select would transpose into a 0 there)."""
        ok = (y >= 0) & (y < classes)
        if ignore is not None:
            rows = jnp.where(y == ignore, 0.0, rows)
            ok = ok | (y == ignore)
        return rows * jnp.where(ok, 1.0, jnp.nan).astype(rows.dtype)

    def counted(v: Array, y: Array) -> Array:
        """A per-row ``v`` with the ignored rows' entries 0 (the mean's denominator's terms)."""
        return v if ignore is None else jnp.where(y == ignore, 0.0, v)

    def at_labels(w: Array, y: Array) -> Array:
        """Each row's label's class weight, in ``dtype`` (a clipped label's for an invalid
        one, whose row is NaN)."""
        return jnp.take(w.astype(dtype), y, mode="clip")

    def along_classes(w: Array) -> Array:
        """A per-class vector laid along the class axis, in ``dtype``."""
        return jnp.reshape(w.astype(dtype), class_shape)

    def spread(x: Array, w: Array | None, log_total: Array, shift: Array | None) -> Array:
        """The smoothing's share ``(s / C) sum_c w_c (lse - x_c)`` per row from
        ``log_total = lse - shift``, read with the same shift (so no two large numbers
        cancel; None: no shift); ``w`` None: every weight 1. The weighted sum is scaled once:
        it overflows only for logits near the dtype's max, where :func:`robust_spread`
        answers (the passes that take it check that it is finite)."""
        shifts = () if shift is None else (per_class(shift),)

        def shifted(x: Array, *s: Array) -> Array:
            return x.astype(dtype) - s[0] if s else x.astype(dtype)

        if w is None:
            summed = row_sums(shifted, x, *shifts)
            return (smoothing / classes) * (classes * log_total - summed)
        total = jnp.sum(w.astype(dtype))
        weighted = row_sums(lambda x, w, *s: w * shifted(x, *s), x, along_classes(w), *shifts)
        return (smoothing / classes) * (total * log_total - weighted)

    def robust_spread(x: Array, w: Array | None, log_total: Array, shift: Array) -> Array:
        """:func:`spread` with each class's term scaled before the sum (``scaled_gap``, ``a_c
        = (s / C) w_c``): a finite share stays finite for logits up to the dtype's max of both
        signs, as on xent's general path, at two more products per logit."""
        share = smoothing / classes
        total = float(classes) if w is None else jnp.sum(w.astype(dtype))
        a = share if w is None else along_classes(w) * share
        gaps = row_sums(lambda x, s, a: scaled_gap(s, x.astype(dtype), a), x, per_class(shift), a)
        return gaps + (share * total) * log_total

    def finite_spread(x: Array, w: Array | None, log_total: Array, shift: Array) -> Array:
        """:func:`spread`, or where some row's is not finite (an overflow, or a masked
        class), :func:`robust_spread`: one branch for all rows; in inputs of at most
        ``_SELECT_ELEMENTS`` both, selected per row (see there)."""
        cheap = spread(x, w, log_total, shift)
        if math.prod(x.shape) <= _SELECT_ELEMENTS:
            return jnp.where(jnp.isfinite(cheap), cheap, robust_spread(x, w, log_total, shift))
        return jax.lax.cond(
            _every(jnp.isfinite(cheap)),
            lambda: cheap,
            lambda: robust_spread(x, w, log_total, shift),
        )

    def smoothed(raw: Array, spread_: Array | None, wy: Array | None) -> Array:
        """A row's loss from its label's term ``raw`` and the smoothing's share over every
        class: with ``smoothing`` 1 the label's term is left out (not multiplied by 0)."""
        label = raw if wy is None else raw * wy
        if spread_ is None:
            return label
        if smoothing == 1.0:
            return spread_
        return (1.0 - smoothing) * label + spread_

    def reduce(rows: Array, y: Array, wy: Array | None = None) -> tuple[Array, Array | float]:
        """The loss from the row losses (each already weighted by its label's weight), and
        the mean's row count (the sum of the counted rows' weights)."""
        rows = masked(rows, y)
        if reduction == "none":
            return rows.astype(input.dtype), 1.0
        count: Array | float
        if wy is not None:
            total = jnp.sum(rows)
            count = jnp.sum(counted(wy, y))
        elif reduction == "sum" or ignore is None:
            count = float(math.prod(y.shape))
            total = jnp.sum(rows)
        elif math.prod(y.shape) <= _STACKED_ROWS:
            # One reduction for both sums: the losses and the rows counted.
            both = jnp.stack([jnp.ravel(rows), jnp.ravel(y != ignore).astype(dtype)])
            total, count = jnp.sum(both, axis=1)
        else:
            total = jnp.sum(rows)
            count = jnp.sum(y != ignore, dtype=dtype)
        if reduction == "mean":
            total = total / count
        return total.astype(input.dtype), count

    def exact_rows(x: Array, y: Array, w: Array | None) -> tuple[Array, Array | None]:
        """``(rows, spread)`` shifted by the row max: every row, whatever its logits hold
        (``spread`` None without smoothing)."""
        shift, picked = stats(x, y)
        total = exp_sums(x, shift)
        log_total = jnp.log(total)
        return log_total - picked, finite_spread(x, w, log_total, shift) if smoothing else None

    def masked_rows(y: Array) -> Array:
        """Rows that are ignored, or whose label is invalid: masked whatever they hold."""
        masked = (y < 0) | (y >= classes)
        return masked | (y == ignore) if ignore is not None else masked

    def unshifted(x: Array, y: Array, w: Array | None) -> tuple[Array, Array | None, Array]:
        """``(rows, spread, safe)``: the row losses from sums of ``exp(x)`` with no shift, and
        whether every sum is safe (``SAFE_SUMS``).

        No row max, and no gather ahead of the reduction that reads the logits: XLA runs a
        gather as a loop split over the threads, and one just ahead of the reduction slowed
        it by 10-45% on two cores. A safe sum neither overflowed nor lost a term that
        matters, so the loss is ``log(sum / exp(x_y))``: as exact as a shifted sum's where
        the label's logit dominates its row (no cancellation of two large numbers), and
        ``log(sum) - x_y`` where ``exp(x_y)`` is too small to divide by (a loss of 18 or more).
        """
        low, high, tiny = SAFE_SUMS[jnp.dtype(dtype).name]
        total = exp_sums(x, None)
        spread_ = spread(x, w, jnp.log(total), None) if smoothing else None
        # The labels pass the barrier with the sums, so that the gather comes after them.
        total, after = jax.lax.optimization_barrier((total, y))
        picked = label_logit(x, after)
        at = jnp.exp(picked)
        kept = at >= tiny
        rows = jnp.log(jnp.where(kept, total / jnp.where(kept, at, 1), total))
        rows = rows - jnp.where(kept, 0, picked)
        return rows, spread_, ((total >= low) & (total <= high)) | masked_rows(y)

    def label_shifted(x: Array, y: Array, w: Array | None) -> tuple[Array, Array | None, Array]:
        """``(rows, spread, safe)`` for rows of few classes, shifted by the label's logit: a
        row's sum then holds the label's own term, 1, so its log is the loss itself, and a
        safe sum is a finite one. Where rows are many and of few classes, the per-row work of
        the unshifted pass (a gather, an ``exp``, a divide and a ``log`` a row) costs more
        than the gather ahead of the reduction does."""
        at_label = label_logit(x, y)
        total = jnp.sum(jnp.exp(x.astype(dtype) - per_class(at_label)), axis=axis)
        log_total = jnp.log(total)
        spread_ = spread(x, w, log_total, at_label) if smoothing else None
        safe = jnp.isfinite(total) if spread_ is None else jnp.isfinite(total + spread_)
        return log_total, spread_, safe | masked_rows(y)

    @jax.custom_jvp
    def loss(x: Array, y: Array, w: Array | None) -> Array:
        # Forward only: one pass over the logits where it can be (Optax's graph makes two,
        # the row max first), but in small inputs (``_SMALL_ELEMENTS``). Where a row's sum is
        # unsafe (a logit near the dtype's max or about 69 and above in float32 for the
        # unshifted sums, a row far below zero, infinities, NaN), every row takes the pass that
        # finds the row max first, and that pass alone runs. Rows that are ignored, or whose
        # label is invalid, are masked whatever their sum holds.
        wy = None if w is None else at_labels(w, y)
        if math.prod(x.shape) <= _SMALL_ELEMENTS:
            return reduce(smoothed(*exact_rows(x, y, w), wy), y, wy)[0]
        one_pass = label_shifted if classes <= _FEW_CLASSES else unshifted
        fast_rows, fast_spread, safe = one_pass(x, y, w)
        # One answer for all rows (of every instance of a ``vmap``): either side is exact.
        rows, spread_ = jax.lax.cond(
            _every(safe), lambda: (fast_rows, fast_spread), lambda: exact_rows(x, y, w)
        )
        return reduce(smoothed(rows, spread_, wy), y, wy)[0]

    def loss_jvp(primals: Any, tangents: Any) -> tuple[Array, Array]:
        x, y, w = primals
        dx, _, dw = tangents
        # With a gradient the exponentials are stored once and reused.
        shift, picked = stats(x, y)
        e = jnp.exp(x.astype(dtype) - per_class(shift))
        total = exp_sums(x, shift, stored=True)  # e's sum (the same expression: computed once)
        log_total = jnp.log(total)
        raw = log_total - picked
        wy = None if w is None else at_labels(w, y)
        spread_ = finite_spread(x, w, log_total, shift) if smoothing else None
        out, count = reduce(smoothed(raw, spread_, wy), y, wy)
        rows = jnp.zeros_like(raw)
        if not isinstance(dx, SymbolicZero):
            # A row's factor is 1 when counted, 0 when ignored and NaN for an invalid label,
            # multiplied in (a select would give an ignored row whose softmax is NaN a 0,
            # where xent's gradient of it is 0 * softmax).
            factor = masked(jnp.ones_like(raw), y)
            rows = rows + factor * logit_tangent(e, total, y, w, wy, dx)
        dwy = None
        if w is not None and not isinstance(dw, SymbolicZero):
            # d (w_y r) = w_y dr + dw_y r, r the row's loss (0 ignored, NaN invalid); the
            # spread's sum_c w_c (lse - x_c) moves by sum_c dw_c (lse - x_c).
            dwy = at_labels(dw, y)
            moved = robust_spread(x, dw, log_total, shift) if smoothing else None
            rows = rows + masked(smoothed(raw, moved, dwy), y)
        if reduction == "none":
            return out, rows.astype(input.dtype)
        tangent = jnp.sum(rows)
        if reduction == "mean":
            if dwy is not None:
                # The mean's denominator moves with the weights: d (T / K) = (dT - mean dK) / K.
                tangent = tangent - out.astype(dtype) * jnp.sum(counted(dwy, y))
            tangent = tangent / count
        return out, tangent.astype(input.dtype)

    def logit_tangent(
        e: Array, total: Array, y: Array, w: Array | None, wy: Array | None, dx: Array
    ) -> Array:
        """Per row, ``sum_c (a p_c - (1 - s) w_y [c = y] - (s / C) w_c) dx_c`` with
        ``a = (1 - s) w_y + (s / C) W`` (``s`` the smoothing, ``W`` the weights' sum)."""
        # Reverse mode transposes the gather into Optax's gradient: one multiply per element
        # (``e`` times a row's scale), then one value per row scattered into that buffer in
        # place. Where the gradient is cast back to a narrower input dtype, the scatter would
        # need a pass of its own before the cast, and where rows are short
        # (``_ONE_HOT_CLASSES``) it costs more than a compare per logit, so the label's term
        # is a one-hot select there, which the transpose fuses with the multiply (and the
        # cast) into one pass.
        dx = dx.astype(dtype)
        label_weight: Array | float = 1.0 if wy is None else wy
        if smoothing == 1.0:
            at_label: Array | float = 0.0
        elif jnp.dtype(input.dtype) == jnp.dtype(dtype) and classes > _ONE_HOT_CLASSES:
            at_label = jnp.squeeze(
                jnp.take_along_axis(dx, per_class(y), axis=axis, mode="clip"), axis
            )
        else:
            onehot = jnp.reshape(jnp.arange(classes, dtype=y.dtype), class_shape) == per_class(y)
            at_label = jnp.sum(jnp.where(onehot, dx, 0), axis=axis)
        softmax_part = jnp.sum(e * dx, axis=axis) * (1.0 / total)
        if not smoothing:
            return label_weight * (softmax_part - at_label)
        every = float(classes) if w is None else jnp.sum(w.astype(dtype))
        spread_part = jnp.sum(dx if w is None else along_classes(w) * dx, axis=axis)
        scale = (smoothing / classes) * every
        if smoothing != 1.0:
            scale = scale + (1.0 - smoothing) * label_weight
        return (
            scale * softmax_part
            - (1.0 - smoothing) * label_weight * at_label
            - (smoothing / classes) * spread_part
        )

    loss.defjvp(loss_jvp, symbolic_zeros=True)
    out: Array = loss(input, target, weight)
    return out


def _prob_loss(
    input: Array,
    target: Array,
    weight: Array | None,
    axis: int,
    smoothing: float,
    reduction: str,
    dtype: Any,
) -> Array:
    """The cross-entropy of logits and class probabilities in the graph XLA fuses as it fuses
    Optax's ``softmax_cross_entropy``: per row ``sum_c m_c (lse - x_c)``, with ``m = w q`` and
    ``q`` smoothed, differentiated by JAX (logits, targets and class weights alike).

    A class with no target mass adds 0 even where its log-probability is infinite (xent's
    rule, where ``0 * inf`` would be NaN), but the select that says so costs XLA's CPU
    backend as much as the rest of the loss. So the rows are summed without it, and only where
    one of them is not finite (of every instance of a ``vmap``: one answer) a branch sums them
    again with it.
    """
    classes = input.shape[axis]
    class_shape = tuple(-1 if i == axis else 1 for i in range(input.ndim))

    def weights(w: Array | None) -> tuple[Array, ...]:
        """The class weights laid along the class axis in ``dtype``, as an operand of
        :func:`_row_sums` and :func:`mass` (none without them)."""
        return () if w is None else (jnp.reshape(w.astype(dtype), class_shape),)

    def mass(q: Array, *w: Array) -> tuple[Array, Array]:
        """``(q, m)``: the smoothed target and its mass ``w q``, in ``dtype`` (``w`` as
        :func:`weights` gives it)."""
        q = q.astype(dtype)
        if smoothing:
            q = (1.0 - smoothing) * q + smoothing / classes
        return q, (q * w[0] if w else q)

    def stats(x: Array, *, exact: bool = False, stored: bool = False) -> tuple[Array, Array]:
        """``(shift, sum(exp(x - shift)))`` per row, the class axis kept, in ``dtype``: the
        shift the row max (of ``x`` itself, exact in float16/bfloat16), carrying no
        derivative; ``exact``: 0 where the max is not finite, as on the general path (else
        such a row is NaN, and goes to the exact branch: the select costs XLA a fifth of
        the forward at 512 x 1000)."""
        if exact:
            shift = _row_shift(x, axis, dtype)
        else:
            shift = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True)).astype(dtype)
        return shift, jnp.expand_dims(_exp_sums(x, shift, axis, dtype, stored=stored), axis)

    def exact_rows(x: Array, q: Array, w: Array | None) -> Array:
        """Each row's loss as the general path gives it: the shift 0 where the max is not
        finite, a class without mass adding 0 at an infinite log-probability."""
        shift, total = stats(x, exact=True)

        def term(x: Array, q: Array, s: Array, log_total: Array, *w: Array) -> Array:
            q, m = mass(q, *w)
            neg = log_total - (x.astype(dtype) - s)
            return m * jnp.where((q == 0) & jnp.isinf(neg), 0, neg)

        return _row_sums(term, x, q, shift, jnp.log(total), *weights(w), axis=axis)

    def per_row(
        x: Array, q: Array, w: Array | None, given: tuple[Array, Array] | None = None
    ) -> Array:
        """Each row's loss: the fast sum (from the ``given`` statistics where the caller has
        them), or where one is not finite, the selecting sum of the exact parts."""
        shift, total = stats(x) if given is None else given

        def term(x: Array, q: Array, s: Array, log_total: Array, *w: Array) -> Array:
            return mass(q, *w)[1] * (log_total - (x.astype(dtype) - s))

        fast = _row_sums(term, x, q, shift, jnp.log(total), *weights(w), axis=axis)
        return jax.lax.cond(_every(jnp.isfinite(fast)), lambda: fast, lambda: exact_rows(x, q, w))

    def reduce(values: Array) -> Array:
        if reduction == "none":
            return values.astype(input.dtype)
        out = jnp.sum(values)
        if reduction == "mean":
            out = out / values.size if values.size else out * math.nan
        return out.astype(input.dtype)

    @jax.custom_jvp
    def loss(x: Array, q: Array, w: Array | None) -> Array:
        return reduce(per_row(x, q, w))

    def loss_jvp(primals: Any, tangents: Any) -> tuple[Array, Array]:
        # The logits' part is analytic, sum_c (softmax_c sum(m) - m_c) dx_c per row, which
        # reverse mode transposes into one fused pass; the targets' and weights' part (rare)
        # is JAX's own derivative of the rows.
        x, q, w = primals
        dx, dq, dw = tangents
        # One exp pass for the loss and the tangent (a row whose max is not finite is NaN
        # in both, as on the general path).
        given = stats(x, stored=True)
        out = reduce(per_row(x, q, w, given))
        moved = jnp.zeros(
            out.shape if reduction != "none" else x.shape[:axis] + x.shape[axis + 1 :], dtype
        )
        if not isinstance(dx, SymbolicZero):
            _, m = mass(q, *weights(w))
            shift, total = given
            e = jnp.exp(x.astype(dtype) - shift)
            dx = dx.astype(dtype)
            every = _row_sums(lambda q, *w: mass(q, *w)[1], q, *weights(w), axis=axis)
            scale = jnp.expand_dims(every, axis) / total
            moved = jnp.sum(e * scale * dx - m * dx, axis=axis)
        if not (isinstance(dq, SymbolicZero) and (w is None or isinstance(dw, SymbolicZero))):
            zero_q = jnp.zeros_like(q) if isinstance(dq, SymbolicZero) else dq
            tangents_ = (
                (zero_q,)
                if w is None
                else (zero_q, jnp.zeros_like(w) if isinstance(dw, SymbolicZero) else dw)
            )
            primals_ = (q,) if w is None else (q, w)
            _, more = jax.jvp(
                lambda *a: exact_rows(x, a[0], a[1] if len(a) > 1 else None),
                primals_,
                tangents_,
            )
            moved = moved + more
        return out, reduce(moved)

    loss.defjvp(loss_jvp, symbolic_zeros=True)
    result: Array = loss(input, target, weight)
    return result


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

    def fused_index_loss(self, input: Array, target: Array, options: IndexOptions) -> Array | None:
        # Under jit (a traced target, so labels are never read and an invalid one gives NaN)
        # the plain case is one lean graph that XLA fuses as it fuses Optax's: the label masks
        # fold into one per-row factor and the mean's row count into the same reduction;
        # class weights scale the rows (and the rule differentiates them), label smoothing
        # adds each row's spread over the classes, summed in the pass that reads the logits.
        # Eager labels (validated by the core), integer weights, wrapping label dtypes and
        # empty or sharded-with-types arrays stay on the general path.
        axis, weight, ignore_index, label_smoothing, reduction = options
        if (
            not self.is_traced(target)
            or (weight is not None and not jnp.issubdtype(weight.dtype, jnp.floating))
            or 0 in input.shape
            or not _widens_exactly(target.dtype, self.index_dtype())
            or _explicit_mesh(input, target, *(() if weight is None else (weight,)))
        ):
            return None
        own = jnp.iinfo(target.dtype)
        ignore = ignore_index if own.min <= ignore_index <= own.max else None
        labels = target.astype(self.index_dtype())  # widening: exact, and wide enough for C
        dtype = self.compute_dtype(input.dtype)
        return _plain_loss(
            input, labels, weight, axis % input.ndim, ignore, label_smoothing, reduction, dtype
        )

    def fused_prob_loss(self, input: Array, target: Array, options: IndexOptions) -> Array | None:
        # Optax's graph, with xent's rule for classes without target mass kept in a branch
        # that runs only where a row is not finite (see _prob_loss); integer class weights
        # and sharded-with-types arrays stay on the general path.
        axis, weight, _, label_smoothing, reduction = options
        if (
            (weight is not None and not jnp.issubdtype(weight.dtype, jnp.floating))
            or 0 in input.shape
            or _explicit_mesh(input, target, *(() if weight is None else (weight,)))
        ):
            return None
        dtype = self.compute_dtype(input.dtype)
        return _prob_loss(
            input, target, weight, axis % input.ndim, label_smoothing, reduction, dtype
        )

    def fused_softmax(self, kind: str, x: Array, axis: int) -> Array | None:
        # The general path's formulas, with the row max taken of the input itself: exact in
        # float16/bfloat16, and XLA then widens the logits only inside the exp-sum pass. Cast
        # first, as the general path does, XLA's CPU backend read a widened copy twice:
        # logsumexp of bfloat16 took 6.3x jax.nn.logsumexp's time at 2048 x 8192 (1.5x at
        # 512 x 1000), 0.96x this way.
        if 0 in x.shape or _explicit_mesh(x):
            return None
        dtype = self.compute_dtype(x.dtype)
        shift = _row_shift(x, axis, dtype)
        shifted = x.astype(dtype) - shift
        log_sum = jnp.log(jnp.expand_dims(_exp_sums(x, shift, axis, dtype), axis))
        if kind == "logsumexp":
            out = shift + log_sum
        elif kind == "log_softmax":
            out = shifted - log_sum
        else:
            out = jnp.exp(shifted) * jnp.exp(-log_sum)
        return out.astype(x.dtype)

    def class_sum(self, f: Any, operands: tuple[Any, ...], axis: int) -> Array:
        ndim = max(jnp.ndim(o) for o in operands)
        return jnp.expand_dims(_row_sums(f, *operands, axis=axis % ndim), axis)

    def logsumexp(self, x: Array, axis: int) -> tuple[Array, Array]:
        shift = _row_shift(x, axis, x.dtype)
        return shift, jnp.log(jnp.expand_dims(_exp_sums(x, shift, axis, x.dtype), axis))

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
