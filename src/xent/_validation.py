"""Every check on xent's arguments, and every error message, in one place.

Messages say what was wrong, what was expected and what was given. Nothing here reads array
values except :func:`raise_on_bad_labels`, which the caller runs only where values are concrete.
"""

from __future__ import annotations

import math
from typing import Any

from ._compat import array_namespace, is_array_api_obj
from ._typing import Array, Namespace

REDUCTIONS = ("mean", "sum", "none")


def namespace(arrays: dict[str, Array | None], xp: Namespace | None) -> Namespace:
    """The namespace shared by ``arrays`` (``None`` entries are absent options)."""
    present = {name: a for name, a in arrays.items() if a is not None}
    for name, a in present.items():
        if not is_array_api_obj(a):
            raise TypeError(
                f"`{name}` must be an array of an array API library (NumPy, PyTorch, JAX, ...), "
                f"got {type(a).__name__}; convert it first, e.g. with `xp.asarray`"
            )
    if xp is not None:
        return xp
    try:
        found: Namespace = array_namespace(*present.values())
        return found
    except TypeError as err:
        kinds = ", ".join(
            f"`{name}`: {type(a).__module__}.{type(a).__name__}" for name, a in present.items()
        )
        raise TypeError(f"all arrays must come from one array library, got {kinds}") from err


def same_device(ops: Any, arrays: dict[str, Array | None]) -> None:
    """Raise TypeError if the arrays live on different devices."""
    found = [(name, ops.device(a)) for name, a in arrays.items() if a is not None]
    known = [(name, d) for name, d in found if d is not None]
    for name, d in known[1:]:
        if d != known[0][1]:
            raise TypeError(
                f"all arrays must be on one device, expected `{name}` on {known[0][1]} "
                f"(the device of `{known[0][0]}`), got {d}"
            )


def floating_input(xp: Namespace, name: str, x: Array) -> None:
    """Raise TypeError unless ``x`` has a real floating dtype."""
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"`{name}` must have a real floating dtype (logits or probabilities), got {x.dtype}"
        )


def axis(value: int, ndim: int, name: str = "input") -> int:
    """``value`` as a non-negative axis of an array with ``ndim`` dimensions."""
    if ndim == 0:
        raise ValueError(
            f"`{name}` must have at least one dimension (the class axis), got a 0-d array"
        )
    if not isinstance(value, int) or isinstance(value, bool) or not -ndim <= value < ndim:
        raise ValueError(
            f"`axis` must be an integer in [{-ndim}, {ndim}) for a {ndim}-d `{name}`, got {value!r}"
        )
    return value % ndim


def reduction(value: str) -> str:
    """Check ``reduction``."""
    if value not in REDUCTIONS:
        raise ValueError(
            f"`reduction` must be one of {', '.join(map(repr, REDUCTIONS))}, got {value!r}"
        )
    return value


def in_range(name: str, value: float, low: float, high: float, *, closed: bool) -> float:
    """Check a scalar option lies in ``[low, high]`` (``closed``) or ``(low, high)``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low <= value <= high if closed else low < value < high)
    if not ok:
        interval = f"[{low}, {high}]" if closed else f"({low}, {high})"
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}")
    return float(value)


def options(
    *,
    label_smoothing: float,
    eps: float,
    from_logits: bool,
    z_loss: float = 0.0,
    softcap: float | None = None,
    validate: bool | None = None,
) -> None:
    """Check the scalar options shared by the cross-entropies."""
    in_range("label_smoothing", label_smoothing, 0.0, 1.0, closed=True)
    in_range("eps", eps, 0.0, 0.5, closed=False)
    if not (isinstance(z_loss, (int, float)) and math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"`z_loss` must be a finite number >= 0, got {z_loss!r}")
    if softcap is not None and not (
        isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0
    ):
        raise ValueError(f"`softcap` must be None or a finite number > 0, got {softcap!r}")
    if not isinstance(from_logits, bool):
        raise TypeError(f"`from_logits` must be True or False, got {from_logits!r}")
    if not from_logits and (z_loss or softcap is not None):
        raise ValueError(
            "`z_loss` and `softcap` act on logits, expected from_logits=True when they are set, "
            f"got from_logits=False with z_loss={z_loss!r}, softcap={softcap!r}"
        )
    if validate not in (None, True, False):
        raise ValueError(f"`validate` must be None, True or False, got {validate!r}")


def target_kind(xp: Namespace, input: Array, target: Array, ax: int) -> str:
    """``"index"`` for class indices, ``"prob"`` for class probabilities."""
    per_row = input.shape[:ax] + input.shape[ax + 1 :]
    if xp.isdtype(target.dtype, "integral"):
        if tuple(target.shape) != tuple(per_row):
            raise ValueError(
                f"`target` holds class indices (dtype {target.dtype}) and has shape {_shape(target.shape)}, "
                f"expected {_shape(per_row)} (input shape {_shape(input.shape)} without axis {ax}); "
                f"probability targets would have the input's shape"
            )
        return "index"
    if xp.isdtype(target.dtype, "real floating"):
        if tuple(target.shape) != tuple(input.shape):
            raise ValueError(
                f"`target` holds class probabilities (dtype {target.dtype}) and has shape "
                f"{_shape(target.shape)}, expected the input's shape {_shape(input.shape)}; "
                f"class indices would be integers of shape {_shape(per_row)}"
            )
        return "prob"
    raise TypeError(
        f"`target` must hold integer class indices or floating class probabilities, got dtype {target.dtype}"
    )


def class_weight(weight: Array | None, classes: int) -> None:
    """Check ``weight`` has shape ``(C,)``."""
    if weight is not None and tuple(weight.shape) != (classes,):
        raise ValueError(
            f"`weight` must have shape ({classes},), one entry per class, got {_shape(weight.shape)}"
        )


def broadcastable(name: str, value: Array | None, shape: tuple[int, ...], what: str) -> None:
    """Check ``value`` broadcasts to ``shape`` without changing it."""
    if value is None:
        return
    vshape = tuple(value.shape)
    ok = len(vshape) <= len(shape) and all(
        v in (1, s) for v, s in zip(vshape[::-1], shape[::-1], strict=False)
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
    value = int(xp.reshape(labels, (-1,))[i])
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


def chunk_size(value: int | None) -> None:
    """Check ``chunk_size``: None (chosen from a memory budget) or a positive integer."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`chunk_size` must be None or an integer >= 1, got {value!r}")


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
