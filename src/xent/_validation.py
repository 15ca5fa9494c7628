"""Every check on xent's arguments, and every error message, in one place.

Messages say what was wrong, what was expected and what was given. Nothing here reads array
values except :func:`raise_on_bad_labels`, which the caller runs only where values are concrete.
"""

from __future__ import annotations

import operator
from typing import Any

from ._compat import array_namespace, is_array_api_obj
from ._typing import Array, Namespace
from .backends import Backend, lookup, namespace_of, same_library

REDUCTIONS = ("mean", "sum", "none")

# array-api-compat's type tests are `functools.lru_cache` functions, which torch.compile warns
# about on every trace. The answers depend on the arrays' types alone, so xent remembers them
# per type: a compiled call whose types were seen before (e.g. eagerly) never reaches them.
_ARRAY_TYPES: dict[type, bool] = {}
_NAMESPACES: dict[tuple[type, ...], Namespace] = {}

_KINDS: dict[tuple[Any, Any, str], bool] = {}
"""``xp.isdtype(dtype, kind)`` per namespace, dtype and kind (dtypes are few, the calls many)."""


def isdtype(xp: Namespace, dtype: Any, kind: str) -> bool:
    """``xp.isdtype(dtype, kind)``, remembered."""
    key = (id(xp), dtype, kind)
    found = _KINDS.get(key)
    if found is None:
        found = _KINDS[key] = bool(xp.isdtype(dtype, kind))
    return found


def backend(arrays: dict[str, Array | None], xp: Namespace | None) -> tuple[Namespace, Backend]:
    """The namespace of ``arrays`` (or ``xp``), its backend, once ``arrays`` are checked to
    share one library and one device."""
    xp = namespace(arrays, xp)
    ops = lookup(xp)
    same_device(ops, arrays)
    return xp, ops


def namespace(arrays: dict[str, Array | None], xp: Namespace | None) -> Namespace:
    """The namespace shared by ``arrays`` (``None`` entries are absent options).

    ``xp`` may be the namespace itself or the plain library module (``numpy``, ``torch``,
    ``jax.numpy``, ...): either resolves to the namespace the arrays have.
    """
    present = {name: a for name, a in arrays.items() if a is not None}
    first = None
    for a in present.values():
        found = namespace_of(a)
        if found is None or (first is not None and found is not first):
            first = None
            break
        first = found
    if first is not None:
        return _checked(present, xp, first)
    for name, a in present.items():
        known = _ARRAY_TYPES.get(type(a))
        if known is None:
            known = _ARRAY_TYPES.setdefault(type(a), bool(is_array_api_obj(a)))
        if not known:
            raise TypeError(
                f"`{name}` must be an array of an array API library (NumPy, PyTorch, JAX, ...), "
                f"got {type(a).__name__}; convert it first, e.g. with `xp.asarray`"
            )
    key = tuple(type(a) for a in present.values())
    found = _NAMESPACES.get(key)
    if found is None:
        try:
            found = array_namespace(*present.values())
        except TypeError as err:
            kinds = ", ".join(
                f"`{name}`: {type(a).__module__}.{type(a).__name__}" for name, a in present.items()
            )
            raise TypeError(f"all arrays must come from one array library, got {kinds}") from err
        _NAMESPACES[key] = found
    return _checked(present, xp, found)


def _checked(present: dict[str, Array], xp: Namespace | None, found: Namespace) -> Namespace:
    """``found``, once ``xp`` agrees with it and every array is a plain dense one."""
    if xp is not None and xp is not found and not same_library(xp, found):
        raise TypeError(
            f"`xp` must be the namespace of the arrays ({getattr(found, '__name__', found)}) or "
            f"its library module, got {getattr(xp, '__name__', None) or repr(xp)}"
        )
    dense(lookup(found), present)
    return found


def dense(ops: Any, present: dict[str, Array]) -> None:
    """Raise TypeError for an array that is not a plain dense one (masked, sparse)."""
    for name, a in present.items():
        why = ops.unsupported(a)
        if why is not None:
            raise TypeError(f"`{name}` must be a plain dense array, got {why}")


def same_device(ops: Any, arrays: dict[str, Array | None]) -> None:
    """Raise TypeError if the arrays live on different devices."""
    first_name, first = "", None
    for name, a in arrays.items():
        d = None if a is None else ops.placement(a)
        if d is None:
            continue
        if first is None:
            first_name, first = name, d
        elif d != first:
            raise TypeError(
                f"all arrays must be on one device, expected `{name}` on {first} "
                f"(the device of `{first_name}`), got {d}"
            )


def floating_input(xp: Namespace, name: str, x: Array) -> None:
    """Raise TypeError unless ``x`` has a real floating dtype."""
    if not isdtype(xp, x.dtype, "real floating"):
        raise TypeError(
            f"`{name}` must have a real floating dtype (logits or probabilities), got {x.dtype}"
        )


def _is_bool(value: Any) -> bool:
    """True for Python and NumPy-style booleans and for 0-d boolean arrays of any library."""
    if isinstance(value, bool):
        return True
    dtype = getattr(value, "dtype", None)
    return dtype is not None and str(dtype).rsplit(".", 1)[-1] in ("bool", "bool_")


def integer(name: str, value: Any, expected: str) -> int:
    """``value`` as a Python int: any integer scalar (``operator.index``), never a bool."""
    if _is_bool(value):
        raise TypeError(f"`{name}` must be {expected}, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"`{name}` must be {expected}, got {value!r} of type {type(value).__name__}"
        ) from None


def real(name: str, value: Any, expected: str) -> float:
    """``value`` as a Python float: any real scalar or 0-d real array, never a bool.

    Values that are symbolic (a ``torch.compile(dynamic=True)`` SymFloat) pass through as they
    are, since reading them would specialise the graph; the caller's range checks skip them.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int beyond the float range: out of every range checked
            return float("inf") if value > 0 else float("-inf")
    if _symbolic(value):
        return value  # type: ignore[no-any-return]
    if _is_bool(value):
        raise TypeError(f"`{name}` must be {expected}, got the bool {value!r}")
    kind = str(getattr(value, "dtype", "")).rsplit(".", 1)[-1]
    if isinstance(value, (str, bytes)):
        raise TypeError(
            f"`{name}` must be {expected}, got {value!r} of type {type(value).__name__}"
        )
    if kind.startswith("complex") or isinstance(value, complex):
        raise TypeError(f"`{name}` must be {expected}, got the complex {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"`{name}` must be {expected}, got {value!r} of type {type(value).__name__}"
        ) from None


def _finite(value: float) -> bool:
    """``math.isfinite`` by arithmetic, which symbolic floats (torch.compile) support too."""
    return bool(value - value == 0)


def _symbolic(value: Any) -> bool:
    return type(value).__name__ in ("SymFloat", "SymInt")


def axis(value: Any, ndim: int, name: str = "input") -> int:
    """``value`` as a non-negative axis of an array with ``ndim`` dimensions."""
    if ndim == 0:
        raise ValueError(
            f"`{name}` must have at least one dimension (the class axis), got a 0-d array"
        )
    index = integer("axis", value, f"an integer in [{-ndim}, {ndim})")
    if not -ndim <= index < ndim:
        raise ValueError(
            f"`axis` must be an integer in [{-ndim}, {ndim}) for a {ndim}-d `{name}`, got {index}"
        )
    return index % ndim


def ignore_index(value: Any) -> int:
    """``ignore_index`` as a Python int (integers only: a float or None would match nothing)."""
    return integer("ignore_index", value, "an integer (the label value to ignore)")


def reduction(value: str) -> str:
    """Check ``reduction``."""
    if value not in REDUCTIONS:
        raise ValueError(
            f"`reduction` must be one of {', '.join(map(repr, REDUCTIONS))}, got {value!r}"
        )
    return value


def in_range(name: str, value: Any, low: float, high: float, *, closed: bool) -> float:
    """``value`` as a float, checked to lie in ``[low, high]`` (``closed``) or ``(low, high)``."""
    interval = f"[{low}, {high}]" if closed else f"({low}, {high})"
    number = real(name, value, f"a real number in {interval}")
    if _symbolic(number):
        return number
    ok = _finite(number) and (low <= number <= high if closed else low < number < high)
    if not ok:
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}")
    return number


def options(
    *,
    label_smoothing: Any,
    eps: Any,
    from_logits: bool,
    z_loss: Any = 0.0,
    softcap: Any = None,
    validate: bool | None = None,
) -> tuple[float, float, float, float | None]:
    """Check the scalar options shared by the cross-entropies; return ``(label_smoothing,
    eps, z_loss, softcap)`` as Python floats."""
    smoothing = in_range("label_smoothing", label_smoothing, 0.0, 1.0, closed=True)
    clip = in_range("eps", eps, 0.0, 0.5, closed=False)
    z = real("z_loss", z_loss, "a finite number >= 0")
    if not _symbolic(z) and not (_finite(z) and z >= 0):
        raise ValueError(f"`z_loss` must be a finite number >= 0, got {z_loss!r}")
    cap = None if softcap is None else real("softcap", softcap, "None or a finite number > 0")
    if cap is not None and not _symbolic(cap) and not (_finite(cap) and cap > 0):
        raise ValueError(f"`softcap` must be None or a finite number > 0, got {softcap!r}")
    if not isinstance(from_logits, bool):
        raise TypeError(f"`from_logits` must be True or False, got {from_logits!r}")
    if not from_logits and (z_loss or softcap is not None):
        raise ValueError(
            "`z_loss` and `softcap` act on logits, expected from_logits=True when they are set, "
            f"got from_logits=False with z_loss={z_loss!r}, softcap={softcap!r}"
        )
    if validate not in (None, True, False) or not isinstance(validate, (bool, type(None))):
        raise ValueError(f"`validate` must be None, True or False, got {validate!r}")
    return smoothing, clip, z, cap


_axis, _reduction, _ignore_index = axis, reduction, ignore_index
"""The checks under other names, for :func:`scalars`, whose keywords shadow them."""

_PLAIN = frozenset((int, float, bool, str, type(None)))
"""Types of scalar options whose checks are remembered by value (immutable, hashable, exact)."""

_SCALARS: dict[tuple[Any, ...], tuple[int, float, float, float, float | None, int]] = {}
"""Results of :func:`scalars` that passed, by the options' values and types."""

_SCALARS_MAX = 256
"""Remembered combinations at most (a loop over changing options cannot grow it further)."""


def remember(answers: dict[Any, Any], key: Any, answer: Any, limit: int = 256) -> None:
    """Store a passing answer of the checks under ``key``, in a table of at most ``limit``
    answers (a loop over changing shapes empties it rather than growing it)."""
    if len(answers) >= limit:
        answers.clear()
    answers[key] = answer


def plain_scalars(types: tuple[type, ...]) -> bool:
    """Whether every type in ``types`` is a plain Python scalar's, whose checks may be
    remembered by value."""
    return _PLAIN.issuperset(types)


def scalars(
    *,
    axis: Any,
    ndim: int,
    reduction: Any,
    label_smoothing: Any,
    eps: Any,
    from_logits: Any,
    z_loss: Any,
    softcap: Any,
    validate: Any,
    ignore_index: Any,
) -> tuple[int, float, float, float, float | None, int]:
    """Check the cross-entropy's scalar options in order (axis, reduction, the numeric options,
    ``ignore_index``); return ``(axis, label_smoothing, eps, z_loss, softcap, ignore_index)``.

    The checks depend on the values alone, so combinations of plain Python scalars that passed
    are remembered (keyed by type as well: ``True``, ``1`` and ``1.0`` are told apart); only a
    call that passes is stored, so every error is raised by the checks themselves.
    """
    values = (axis, ndim, reduction, label_smoothing, eps, from_logits, z_loss, softcap)
    key = (*values, validate, ignore_index, *map(type, values), type(validate), type(ignore_index))
    plain = plain_scalars(key[10:])
    if plain:
        found = _SCALARS.get(key)
        if found is not None:
            return found
    ax = _axis(axis, ndim)
    _reduction(reduction)
    smoothing, clip, z, cap = options(
        label_smoothing=label_smoothing, eps=eps, from_logits=from_logits, z_loss=z_loss,
        softcap=softcap, validate=validate,
    )  # fmt: skip
    result = (ax, smoothing, clip, z, cap, _ignore_index(ignore_index))
    if plain:
        if len(_SCALARS) >= _SCALARS_MAX:
            _SCALARS.clear()
        _SCALARS[key] = result
    return result


def real_weights(xp: Namespace, name: str, value: Array | None) -> None:
    """Raise TypeError unless the weight ``value`` holds real numbers (a complex weight would
    be cut to its real part)."""
    if value is not None and not xp.isdtype(value.dtype, ("real floating", "integral", "bool")):
        raise TypeError(f"`{name}` must hold real numbers, got dtype {value.dtype}")


def probability_target_options(ignore_index: int, default: int) -> None:
    """Raise ValueError for an ``ignore_index`` set with probability targets (it has no
    labels to match there)."""
    if ignore_index != default:
        raise ValueError(
            f"`ignore_index` applies to class-index targets, expected the default "
            f"{default} with floating (probability) targets, got ignore_index={ignore_index}"
        )


def target_kind(xp: Namespace, input: Array, target: Array, ax: int) -> str:
    """``"index"`` for class indices, ``"prob"`` for class probabilities."""
    shape = tuple(input.shape)
    per_row = shape[:ax] + shape[ax + 1 :]
    if isdtype(xp, target.dtype, "integral"):
        if tuple(target.shape) != per_row and not same_shape(target.shape, per_row):
            raise ValueError(
                f"`target` holds class indices (dtype {target.dtype}) and has shape {_shape(target.shape)}, "
                f"expected {_shape(per_row)} (input shape {_shape(input.shape)} without axis {ax}); "
                f"probability targets would have the input's shape"
            )
        return "index"
    if isdtype(xp, target.dtype, "real floating"):
        if tuple(target.shape) != shape and not same_shape(target.shape, shape):
            raise ValueError(
                f"`target` holds class probabilities (dtype {target.dtype}) and has shape "
                f"{_shape(target.shape)}, expected the input's shape {_shape(input.shape)}; "
                f"class indices would be integers of shape {_shape(per_row)}"
            )
        return "prob"
    raise TypeError(
        f"`target` must hold integer class indices or floating class probabilities, got dtype {target.dtype}"
    )


def _known(n: Any) -> bool:
    return n is not None and n == n  # Dask writes an unknown size as NaN


def same_shape(a: Any, b: Any) -> bool:
    """Whether shapes ``a`` and ``b`` can be equal: sizes match where both are known (Dask
    leaves sizes unknown after boolean indexing; it checks them when it computes)."""
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(
        not (_known(m) and _known(n)) or m == n for m, n in zip(a, b, strict=True)
    )


def known_shape(shape: Any) -> bool:
    """Whether every size in ``shape`` is known."""
    return all(_known(n) for n in shape)


def class_count(shape: Any, ax: int) -> int:
    """The size ``C`` of the class axis, which must be known and at least 1."""
    classes = shape[ax]
    if not _known(classes):
        raise ValueError(
            f"`input` must have a known size along the class axis {ax}, got shape "
            f"{_shape(shape)}; compute the chunk sizes first (Dask: `compute_chunk_sizes()`)"
        )
    if classes == 0:
        raise ValueError(
            f"`input` must have at least one class along axis {ax}, got shape {_shape(shape)}"
        )
    return int(classes)


def binary_target(xp: Namespace, target: Array, shape: tuple[int, ...]) -> None:
    """Check a binary cross-entropy target: the input's shape, bool, integer or floating."""
    if not same_shape(target.shape, shape):
        raise ValueError(
            f"`target` must have the input's shape {_shape(shape)} (one label per element), "
            f"got {_shape(target.shape)}"
        )
    if not xp.isdtype(target.dtype, ("bool", "integral", "real floating")):
        raise TypeError(
            f"`target` must be bool, integer 0/1 or floating in [0, 1], got dtype {target.dtype}"
        )


def class_weight(weight: Array | None, classes: int, name: str = "weight") -> None:
    """Check the class weights ``weight`` (the option ``name``) have shape ``(C,)``."""
    if weight is not None and not same_shape(weight.shape, (classes,)):
        raise ValueError(
            f"`{name}` must have shape ({classes},), one entry per class, got {_shape(weight.shape)}"
        )


def broadcastable(name: str, value: Array | None, shape: tuple[int, ...], what: str) -> None:
    """Check ``value`` broadcasts to ``shape`` without changing it."""
    if value is None:
        return
    vshape = tuple(value.shape)
    ok = len(vshape) <= len(shape) and all(
        v == 1 or same_shape((v,), (s,)) for v, s in zip(vshape[::-1], shape[::-1], strict=False)
    )
    if not ok:
        raise ValueError(
            f"`{name}` must broadcast to {what} {_shape(shape)}, got shape {_shape(vshape)}"
        )


def raise_on_bad_labels(
    xp: Namespace, labels: Array, bad: Array, classes: int, ignore_index: int
) -> None:
    """Raise ValueError naming the first label outside ``[0, C)`` that is not ``ignore_index``."""
    if not bool(xp.any(bad)):
        return
    flat = xp.reshape(xp.astype(bad, xp.int8), (-1,))
    i = int(xp.argmax(flat))
    element = xp.reshape(labels, (-1,))[i]
    try:
        value = int(element)
    except (RuntimeError, OverflowError):  # torch cannot read a uint64 above int64's max
        value = int(xp.astype(element, xp.int64)) % (int(xp.iinfo(labels.dtype).max) + 1)
    position = _unravel(i, tuple(bad.shape))
    raise ValueError(
        f"`target` has label {value} at position {position}, expected a class index in "
        f"[0, {classes}) or ignore_index={ignore_index}"
    )


def _unravel(i: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for n in reversed(shape):
        out.append(i % n)
        i //= n
    return tuple(reversed(out))


def _shape(shape: Any) -> str:
    return str(tuple(int(s) if s is not None and s == s else s for s in shape))


# --------------------------------------------------------------------------- xent.parallel
def parallel_group(group: Any, base: type) -> None:
    """Check ``group`` supplies the collectives (a subclass of ``xent.parallel.Collectives``)."""
    if not isinstance(group, base):
        raise TypeError(
            "`group` must be a xent.parallel.Collectives (TorchGroup, JaxAxis or a subclass), "
            f"got {type(group).__name__}"
        )


def parallel_options(
    group: Any, base: type, how: str, label_smoothing: Any, z_loss: Any, ignore: Any
) -> int:
    """Check the options every vocab-parallel loss takes (``group``, ``reduction``, logits-only
    ``label_smoothing`` and ``z_loss``, ``ignore_index``); return ``ignore_index`` as an int."""
    parallel_group(group, base)
    reduction(how)
    # Logits only: the probability clip `eps` does not apply, so its default passes.
    options(label_smoothing=label_smoothing, eps=1e-7, from_logits=True, z_loss=z_loss)
    return ignore_index(ignore)


def parallel_slice(
    xp: Namespace,
    start: Any,
    local: int,
    classes: int,
    weight: Array | None,
    sample_weight: Array | None,
    per_row: tuple[int, ...],
    name: str = "weight",
) -> None:
    """Check the local slice of ``classes``: where it starts, its class weights (the option
    ``name``: real numbers, one per local class), and the per-example weights (real numbers
    broadcastable to the per-row shape)."""
    class_start(xp, start, local, classes)
    class_weight(weight, local, name)
    broadcastable("sample_weight", sample_weight, per_row, "the per-example shape")
    real_weights(xp, name, weight)
    real_weights(xp, "sample_weight", sample_weight)


def parallel_index_target(xp: Namespace, input: Array, target: Array, ax: int) -> None:
    """Check the vocab-parallel target: integer class indices of the per-row shape."""
    if not xp.isdtype(target.dtype, "integral"):
        raise TypeError(
            "`target` of the vocab-parallel cross-entropy must hold integer class indices "
            f"(class probabilities are not split across workers), got dtype {target.dtype}"
        )
    target_kind(xp, input, target, ax)


def class_start(xp: Namespace, value: Any, local: int, classes: int) -> None:
    """Check ``class_start`` (an int, or a 0-d integer array) puts the slice inside ``[0, C)``."""
    if isinstance(value, bool):
        raise TypeError(f"`class_start` must be an integer or a 0-d integer array, got {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= classes - local:
            raise ValueError(
                f"`class_start` must lie in [0, {classes - local}] so that the {local} local "
                f"classes fall inside the {classes} classes of the group, got {value}"
            )
        return
    if not (is_array_api_obj(value) and value.ndim == 0 and xp.isdtype(value.dtype, "integral")):
        raise TypeError(
            "`class_start` must be an integer or a 0-d integer array, got "
            f"{type(value).__name__} {getattr(value, 'shape', '')}"
        )


def parallel_constants(tracked: list[str]) -> None:
    """Refuse class or sample weights that require a gradient in the vocab-parallel loss."""
    if tracked:
        raise TypeError(
            "xent.parallel.cross_entropy differentiates `local_input` only, expected `weight` "
            "and `sample_weight` that need no gradient (detach them), got tensors requiring "
            f"grad behind {', '.join(tracked)}"
        )


def parallel_linear_constants(tracked: list[str]) -> None:
    """Refuse class or sample weights that require a gradient in the vocab-parallel linear
    cross-entropy."""
    if tracked:
        raise TypeError(
            "xent.parallel.linear_cross_entropy differentiates `hidden`, `local_weight` and "
            "`bias` only, expected `class_weight` and `sample_weight` that need no gradient "
            f"(detach them), got tensors requiring grad: {', '.join(tracked)}"
        )


def parallel_local_classes(local: int, ax: int, shape: tuple[int, ...]) -> None:
    """Check a worker holds at least one class (an empty slice has no row max to share)."""
    if local == 0:
        raise ValueError(
            f"`local_input` must hold at least one class along axis {ax}, got shape {shape}"
        )


def linear_inputs(xp: Namespace, hidden: Array, weight: Array, bias: Array | None) -> None:
    """Check the shapes and dtypes of a linear head: ``hidden (..., H)``, ``weight (V, H)``,
    ``bias (V,)``, all of one real floating dtype."""
    floating_input(xp, "hidden", hidden)
    if hidden.ndim == 0:
        raise ValueError("`hidden` must have shape (..., H), got a 0-d array")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"`weight` must have shape (V, {int(hidden.shape[-1])}) to project `hidden` of shape "
            f"{_shape(hidden.shape)}, got {_shape(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"`weight` must have at least one class (row), got {_shape(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (int(weight.shape[0]),):
        raise ValueError(
            f"`bias` must have shape ({int(weight.shape[0])},), one entry per row of `weight`, "
            f"got {_shape(bias.shape)}"
        )
    for name, a in (("weight", weight), ("bias", bias)):
        if a is not None and a.dtype != hidden.dtype:
            raise TypeError(
                f"`{name}` must have the dtype of `hidden` ({hidden.dtype}), got {a.dtype}"
            )


def chunk_size(value: Any) -> int | None:
    """``chunk_size`` as a Python int, or None (chosen from a memory budget): any integer
    scalar or 0-d integer array of at least 1 (TypeError for a bool or a non-integer,
    ValueError below 1)."""
    if value is None:
        return None
    expected = "None or an integer >= 1"
    number = integer("chunk_size", value, expected)
    if number < 1:
        raise ValueError(f"`chunk_size` must be {expected}, got {value!r}")
    return number


def linear_class_weight(xp: Namespace, class_weight: Array | None, classes: int) -> None:
    """Check ``class_weight`` of a linear head: real numbers of shape ``(V,)``."""
    if class_weight is None:
        return
    if tuple(class_weight.shape) != (classes,):
        raise ValueError(
            f"`class_weight` must have shape ({classes},), one entry per row of `weight`, "
            f"got {_shape(class_weight.shape)}"
        )
    if not xp.isdtype(class_weight.dtype, ("real floating", "integral")):
        raise TypeError(f"`class_weight` must hold real numbers, got dtype {class_weight.dtype}")
