"""The generic backend: every primitive written against the array API standard alone.

Each backend module subclasses :class:`Backend` twice over: a *facts* mixin that says what the
arrays are (traced, lazy, on the host) and is always in force, and a *native* mixin that replaces
primitives with faster ones and can be switched off (:func:`xent.backends.set_native`). The core
only ever calls the methods below, never asks which library it is running on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from .._compat import device, is_lazy_array
from .._typing import Array, Namespace

ForwardFn = Callable[[Any, Array], tuple[Array, Any]]
"""``forward(state, x) -> (loss, saved)``: the loss and what its derivatives may reuse."""

BackwardFn = Callable[[Any, Array, Any, Array], Array]
"""``backward(state, x, saved, cotangent) -> d(loss . cotangent)/dx``; ``saved`` may be None."""

TangentFn = Callable[[Any, Array, Any, Array], Array]
"""``tangent(state, x, saved, dx) -> (d loss/dx) dx``: the forward-mode derivative along ``dx``."""


@dataclass(frozen=True)
class GradRule:
    """A loss of ``x`` with its analytic derivatives, for backends to attach to their autodiff.

    ``state`` (the validated problem, passed to each function) is a frozen dataclass; its array
    fields are derived from the caller's other arguments, which a backend may differentiate
    through (JAX passes them to its custom rule as explicit inputs).
    """

    forward: ForwardFn
    backward: BackwardFn
    tangent: TangentFn


def scaled_gap(shift: Any, x: Any, a: Any) -> Any:
    """``a * (shift - x)`` for ``a`` of at most 1 in size: taken as ``(shift / 2 - x / 2) *
    (2 a)``, whose halves are exact, so the gap is rounded once, as ``shift - x`` would be, but
    never overflows for values up to the dtype's max of both signs. The label smoothing's
    terms (``a = (e / C) w_c``), scaled before they are summed, on every path. Operators only:
    any array library's arrays, and Python numbers."""
    return (0.5 * shift - 0.5 * x) * (2.0 * a)


SAFE_SUMS = {
    "float32": (2.0**-20, 2.0**100, 2.0**-27),
    "float64": (2.0**-100, 2.0**900, 2.0**-120),
}
"""For backends that sum ``exp(x)`` of a row with no shift, per compute dtype's name, ``(low,
high, tiny)``: a row's unshifted sum within ``[low, high]`` neither overflowed nor lost a term
that matters (every ``exp`` below the smallest normal number is under ``2**-100`` of such a
sum), so it is the row's sum; and a label term of at least ``tiny`` divides it with no overflow
(``high / tiny`` fits the dtype). In float32 that takes logits up to about 69; a label logit
under about -18.7 gives a loss of 18 or more, then taken as ``log(sum) - x[label]`` to the same
relative precision. Any other sum (a logit near the dtype's max, a row far below zero, inf or
NaN) sends the rows to a pass shifted by the row max."""


class IndexOptions(NamedTuple):
    """The options of the plain case (logits and class indices, or logits and class
    probabilities) as the fused kernels take them, checked: the class axis made non-negative,
    the class weights (or None), ``ignore_index`` (the default, for probabilities),
    ``label_smoothing`` and ``reduction``."""

    axis: int
    weight: Array | None
    ignore_index: int
    label_smoothing: float
    reduction: str


class BinaryOptions(NamedTuple):
    """The options of the binary cross-entropy from logits as the fused kernels take them,
    checked: element weights and positive weights (each None or broadcastable to the input),
    ``label_smoothing`` and ``reduction``."""

    weight: Array | None
    pos_weight: Array | None
    label_smoothing: float
    reduction: str


class Backend:
    """Primitives and facts for one array namespace, all in standard array API calls."""

    name = "generic"
    native = False

    def __init__(self, xp: Namespace) -> None:
        self.xp = xp

    # ------------------------------------------------------------------ facts
    def is_traced(self, x: Array) -> bool:
        """True where values do not exist yet (jit tracing, compilation, vmap)."""
        return False

    def is_lazy(self, x: Array) -> bool:
        """True where reading values would compute a pending graph."""
        return bool(is_lazy_array(x))

    def on_host(self, x: Array) -> bool:
        """True where values live in host memory, so reading them costs no device sync."""
        return True

    def device(self, x: Array) -> Any:
        """The array's device, or None where it cannot be known (inside a trace)."""
        if self.is_traced(x):
            return None
        return device(x)

    def placement(self, x: Array) -> Any:
        """Where the array's values live, for checking that arrays are together (None: unknown).

        The device itself, except where one array spans several devices (a sharded JAX array):
        there the set of those devices, so that arrays sharded differently over one mesh agree.
        """
        return self.device(x)

    def unsupported(self, x: Array) -> str | None:
        """What ``x`` is, where xent cannot compute with it faithfully (a masked or sparse
        container, whose extra structure some primitives would ignore); None otherwise."""
        return None

    def dense_together(self, a: Array, b: Array) -> bool:
        """True where ``a`` and ``b`` are plain dense arrays on one device: a quick answer for
        a caller whose other checks are remembered; False sends it to the full checks, which
        raise where something is wrong."""
        return (
            self.unsupported(a) is None
            and self.unsupported(b) is None
            and self.placement(a) == self.placement(b)
        )

    def index_dtype(self) -> Any:
        """The signed integer dtype labels are cast to before they index."""
        return self.xp.int64

    def compute_dtype(self, dtype: Any) -> Any:
        """The dtype a real floating ``dtype`` computes in, decided by width (never by ``==``,
        which a byte order or an extended type defeats): wider than 32 bits in float64 (so
        ``longdouble`` too), 32 bits and narrower in float32."""
        xp = self.xp
        return xp.float64 if xp.finfo(dtype).bits > 32 else xp.float32

    def quiet(self) -> contextlib.AbstractContextManager[None]:
        """A context that silences floating-point warnings (``log(0)`` of masked rows)."""
        return contextlib.nullcontext()

    def finish(self, result: Array, *inputs: Array | None) -> Array:
        """``result`` as the caller receives it; ``inputs`` are the caller's arrays.

        Lazy backends override this to make the computation they recorded run under
        :meth:`quiet` later, when the caller computes it outside xent.
        """
        return result

    # ------------------------------------------------------------- primitives
    def logsumexp(self, x: Array, axis: int) -> tuple[Array, Array]:
        """``(shift, log_sum)`` with ``logsumexp(x) = shift + log_sum``, both ``keepdims``.

        ``shift`` is the row max (0 where it is not finite), so ``(x - shift) - log_sum`` is the
        log-softmax without cancellation even for logits near the dtype's max.
        """
        xp = self.xp
        m = self.row_max(x, axis)
        m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
        return m, xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True))

    def class_sum(self, f: Callable[..., Array], operands: tuple[Any, ...], axis: int) -> Array:
        """``sum(f(*operands), axis, keepdims)``: the sum along the classes of an elementwise
        ``f`` of ``operands`` (arrays of ``x``'s shape, of size 1 along ``axis`` or along every
        other axis, and scalars, broadcasting together). Passing the arrays and the work apart
        lets a backend sum the rows in parts where its reductions are slow along long ones."""
        return self.xp.sum(f(*operands), axis=axis, keepdims=True)

    def row_max(self, x: Array, axis: int) -> Array:
        """The max along ``axis``, ``keepdims`` (the shift of :meth:`logsumexp`)."""
        return self.xp.max(x, axis=axis, keepdims=True)

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
        """``exp(x - shift - log_sum) * scale``: the softmax once the row's log-sum-exp is
        known, times a per-row ``scale`` (``keepdims``) when one is given.

        ``overwrite``: ``x`` is xent's own temporary, read by nothing after this call, so a
        backend may write the result into it."""
        p = self.xp.exp((x - shift) - log_sum)
        return p if scale is None else p * scale

    def fill_rows(self, g: Array, mask: Array, value: float) -> Array:
        """``g`` with ``value`` on the rows where ``mask`` (class axis of size 1) is True.

        ``g`` is xent's own temporary, so a backend may write it in place.
        """
        xp = self.xp
        return xp.where(mask, xp.full_like(g, value), g)

    def take_along_axis(self, x: Array, index: Array, axis: int) -> Array:
        """``x`` at ``index`` along ``axis`` (``index`` has size 1 there and valid values)."""
        xp = self.xp
        if hasattr(xp, "take_along_axis"):
            return xp.take_along_axis(x, index, axis=axis)
        # Namespaces without take_along_axis (Dask) still reduce a one-hot mask lazily.
        return xp.sum(xp.where(self._one_hot(x, index, axis), x, 0), axis=axis, keepdims=True)

    def take(self, table: Array, index: Array) -> Array:
        """``table[index]`` for a 1-D ``table`` and valid indices of any shape."""
        xp = self.xp
        flat = xp.reshape(index, (-1,))
        return xp.reshape(xp.take(table, flat, axis=0), index.shape)

    def subtract_at(self, g: Array, index: Array, values: Array, axis: int) -> Array:
        """``g`` with ``values`` subtracted at ``index`` along ``axis``; ``g`` is xent's own."""
        xp = self.xp
        return g - xp.where(self._one_hot(g, index, axis), values, xp.zeros_like(values))

    def fused_index_loss(self, input: Array, target: Array, options: IndexOptions) -> Array | None:
        """The cross-entropy of logits and class indices from one fused native kernel, or None.

        The core asks only once every argument has passed its checks, and only for the plain
        options (logits, class indices, no ``softcap``, ``z_loss`` or ``sample_weight``). A
        backend answers where a kernel of exactly xent's semantics serves the arrays, keeping
        them differentiable as :meth:`custom_grad` would; it returns None (never raises) where
        any label lies outside ``[0, C)`` and is not ``ignore_index``, so that the core's own
        path raises xent's error or gives the NaN of ``validate=False``. A lazy backend
        (:meth:`is_lazy`), which cannot read the labels without computing them, answers with
        a result that holds NaN for each such label instead (the loss of ``validate=False``);
        the core does not ask it with ``validate=True``, whose error needs that compute. Here:
        the backend's :meth:`fused_index_plan` for these arrays and options, called on them.
        """
        plan = self.fused_index_plan(input, target, options)
        return None if plan is None else plan(input, target, options.weight)

    def fused_index_plan(
        self, input: Array, target: Array, options: IndexOptions
    ) -> Callable[[Array, Array, Array | None], Array | None] | None:
        """A callable ``plan(input, target, weight)`` that gives :meth:`fused_index_loss` for
        arrays of these arrays' types, dtypes and shapes, class weights of the type, dtype and
        shape of ``options.weight`` (or none) and these options, or None where no fused kernel
        serves them.

        The core remembers the plan with its checks' answer and calls it on later calls alike
        (where :meth:`is_traced` says False of ``input``) with their own class weights, so its
        decisions may depend on nothing else: it reads the weights' values, and checks the
        device, the autodiff state (of the weights too), the layout, the labels and the tracing
        of ``target`` of each call itself, declining (None) on the same terms. The generic
        backend has none.
        """
        return None

    def fused_index_loss_and_grad(
        self, input: Array, target: Array, options: IndexOptions
    ) -> tuple[Array, Array] | None:
        """:meth:`fused_index_loss` and the gradient of ``sum(loss)`` with respect to ``input``
        (of its shape and dtype), or None, on the same terms."""
        return None

    def fused_prob_loss(self, input: Array, target: Array, options: IndexOptions) -> Array | None:
        """The cross-entropy of logits and class probabilities (``target`` of ``input``'s shape)
        from one fused native kernel, or None, on the terms of :meth:`fused_index_loss` (there
        are no labels to judge; a kernel whose answer differs from xent's for non-finite logits
        declines where its result is not finite). Here: :meth:`fused_prob_plan`'s plan."""
        plan = self.fused_prob_plan(input, target, options)
        return None if plan is None else plan(input, target, options.weight)

    def fused_prob_plan(
        self, input: Array, target: Array, options: IndexOptions
    ) -> Callable[[Array, Array, Array | None], Array | None] | None:
        """:meth:`fused_index_plan` for probability targets: remembered by the core on the same
        terms. The generic backend has none."""
        return None

    def fused_prob_loss_and_grad(
        self, input: Array, target: Array, options: IndexOptions
    ) -> tuple[Array, Array] | None:
        """:meth:`fused_prob_loss` and the gradient of ``sum(loss)`` with respect to ``input``,
        or None."""
        return None

    def fused_binary_loss(
        self, input: Array, target: Array, options: BinaryOptions
    ) -> Array | None:
        """The binary cross-entropy of logits (``from_logits=True``) from a fused native
        kernel, or None. The core asks once every argument has passed its checks; ``target``
        is the caller's (bool, integer or floating, ``input``'s shape), not yet cast or
        smoothed. A backend answers where a kernel of xent's semantics serves the arrays,
        keeping them differentiable as :meth:`custom_grad` would, and declines (None) where
        its result is not finite (infinite logits, NaN), where the core's own path gives each
        element its exact value. The generic backend has none."""
        return None

    def fused_binary_loss_and_grad(
        self, input: Array, target: Array, options: BinaryOptions
    ) -> tuple[Array, Array] | None:
        """:meth:`fused_binary_loss` and the gradient of ``sum(loss)`` with respect to
        ``input``, or None, on the same terms."""
        return None

    def fused_softmax(self, kind: str, x: Array, axis: int) -> Array | None:
        """``logsumexp`` (with the class axis kept), ``log_softmax`` or ``softmax`` (``kind``)
        of ``x`` along ``axis`` from a fused native kernel, in ``x``'s dtype (float16/bfloat16
        computed in float32), or None. Asked once the arguments passed their checks; a backend
        answers only where its kernel gives what the general path gives (declining rows that
        hold ``+inf`` or NaN, or rows of ``-inf``, where kernels disagree), keeping ``x``
        differentiable. The generic backend has none."""
        return None

    def custom_grad(
        self, rule: GradRule, state: Any, x: Array, *, others: tuple[Array | None, ...] = ()
    ) -> Array:
        """The loss ``rule.forward(state, x)[0]``, differentiated by the framework's autodiff.

        Backends with an autodiff system override this to attach the rule's analytic
        derivatives for ``x`` (kept differentiable for higher orders). ``others`` are the
        caller's remaining array arguments: the analytic rule does not differentiate them, so
        a backend must fall back to plain autodiff, or differentiate ``state``'s arrays its own
        way, when one of them needs a gradient.
        """
        return rule.forward(state, x)[0]

    def scratch(self, shape: tuple[int, ...], dtype: Any, like: Array) -> Array | None:
        """A buffer of ``shape`` that xent may overwrite block after block (the logits of a
        linear head), on ``like``'s device; None where arrays cannot be written in place or
        autodiff is recording ``like``. The generic backend makes new arrays instead."""
        return None

    def linear_logits(
        self, h: Array, weight: Array, bias: Array | None, dtype: Any, out: Array | None
    ) -> Array:
        """``h @ weight.T + bias`` in ``dtype`` (the product in the inputs' dtype, whose matrix
        kernels accumulate in float32 for float16/bfloat16); ``out`` is None or a
        :meth:`scratch` buffer of the result's shape that a backend may write it into."""
        xp = self.xp
        z = h @ xp.matrix_transpose(weight)
        if z.dtype != dtype:
            z = xp.astype(z, dtype)
        if bias is None:
            return z
        return z + (bias if bias.dtype == dtype else xp.astype(bias, dtype))

    def matmul_add(self, acc: Array, a: Array, b: Array) -> Array:
        """``acc + a.T @ b``; ``acc`` is xent's own accumulator, so a backend may write it."""
        return acc + self.xp.matrix_transpose(a) @ b

    def scan(self, step: Callable[..., Any], carry: Any, blocks: tuple[Any, ...]) -> Any:
        """``lax.scan``'s contract over the leading axis of ``blocks`` (None entries stay None):
        ``step(carry, block) -> (carry, out)``; returns the last carry and the outs stacked."""
        xp = self.xp
        count = next(int(b.shape[0]) for b in blocks if b is not None)
        outs = []
        for i in range(count):
            carry, out = step(carry, tuple(None if b is None else b[i, ...] for b in blocks))
            outs.append(out)
        stacked = tuple(
            None if outs[0][k] is None else xp.stack([o[k] for o in outs])
            for k in range(len(outs[0]))
        )
        return carry, stacked

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
        """The loss ``rule.loss(state, hidden, weight, bias)`` of a linear head.

        Backends with autodiff override this to attach ``rule.loss_and_grad`` as the gradient of
        ``hidden``, ``weight`` and ``bias``; here the framework differentiates the chunked
        forward itself.
        """
        return rule.loss(state, hidden, weight, bias)

    def _one_hot(self, x: Array, index: Array, axis: int) -> Array:
        xp = self.xp
        n = x.shape[axis]
        shape = [1] * x.ndim
        shape[axis] = n
        classes = xp.reshape(xp.arange(n, dtype=index.dtype, device=self.device(x)), tuple(shape))
        return index == classes
