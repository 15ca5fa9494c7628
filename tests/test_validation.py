"""Bad input gives a clear error (what was wrong, expected and given), never a wrong number
(docs/semantics.md, validation and errors); also the label checks where they raise."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
from _helpers import Backend, is_concrete_host, is_lazy, to_numpy, to_xp

import xent
import xent.parallel


def _all(*parts: str) -> str:
    """A `match=` pattern requiring every part (regexes) somewhere in the message."""
    return "(?s)" + "".join(f"(?=.*{p})" for p in parts)


def _shape(shape: tuple[int, ...]) -> str:
    return re.escape(str(tuple(shape)))


@pytest.fixture
def logits(xp: Any, rng: np.random.Generator) -> Any:
    return to_xp(xp, rng.normal(size=(4, 5)))


@pytest.fixture
def labels(xp: Any) -> Any:
    return to_xp(xp, np.array([0, 4, 1, 2]))


class TestTargetShapeAndDtype:
    """A target of the wrong shape or dtype names the shapes expected and given."""

    @pytest.mark.parametrize(
        ("target_shape", "dtype"),
        [
            ((3,), "int64"),
            ((4, 1), "int64"),
            ((4, 5), "int64"),
            ((4,), "float64"),
            ((4, 6), "float64"),
            ((5, 4), "float64"),
        ],
    )
    def test_target_shape_that_fits_neither_kind_names_both_shapes(
        self, xp: Any, logits: Any, target_shape: tuple[int, ...], dtype: str
    ) -> None:
        target = to_xp(xp, np.zeros(target_shape), dtype=dtype)
        with pytest.raises(ValueError, match=_all(_shape(target_shape), _shape((4, 5)))):
            xent.cross_entropy(logits, target)

    def test_target_shape_error_respects_the_class_axis(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        x = to_xp(xp, rng.normal(size=(2, 3, 4)))
        ok = to_xp(xp, np.zeros((2, 4), dtype=np.int64))
        xent.cross_entropy(x, ok, axis=1)  # (2, 3, 4) without axis 1
        with pytest.raises(ValueError, match=_all(_shape((2, 4)), _shape((2, 3, 4)))):
            xent.cross_entropy(x, ok, axis=-1)

    @pytest.mark.parametrize("dtype", ["bool", "complex128"])
    def test_target_of_neither_integer_nor_floating_dtype_is_rejected(
        self, xp: Any, logits: Any, dtype: str
    ) -> None:
        target = to_xp(xp, np.zeros((4,)), dtype=dtype)
        with pytest.raises((TypeError, ValueError), match="target"):
            xent.cross_entropy(logits, target)

    def test_binary_target_shape_must_match_input(self, xp: Any, logits: Any) -> None:
        target = to_xp(xp, np.zeros((4, 4)))
        with pytest.raises(ValueError, match=_all(_shape((4, 4)), _shape((4, 5)))):
            xent.binary_cross_entropy(logits, target)


class TestLabelRange:
    """Labels outside `[0, C)` raise with their value and position where checked."""

    @pytest.mark.eager("the error names label values, which eager JAX has and jax.jit does not")
    @pytest.mark.parametrize("bad", [5, -1, 9, 127])
    def test_label_out_of_range_raises_with_value_and_position(
        self, xp: Any, rng: np.random.Generator, bad: int
    ) -> None:
        if not is_concrete_host():
            pytest.skip(
                "labels are not concrete host values here; they give NaN (test_cross_entropy)"
            )
        x = to_xp(xp, rng.normal(size=(2, 3, 5)))
        t = np.zeros((2, 3), dtype=np.int64)
        t[1, 2] = bad
        with pytest.raises(ValueError, match=_all(rf"(?<![\d.]){bad}(?![\d.])", r"1,\s*2")):
            xent.cross_entropy(x, to_xp(xp, t))

    @pytest.mark.eager("the error names label values, which eager JAX has and jax.jit does not")
    @pytest.mark.parametrize("func", ["cross_entropy", "cross_entropy_and_grad"])
    def test_label_out_of_range_raises_in_a_flat_batch(
        self, xp: Any, rng: np.random.Generator, func: str
    ) -> None:
        if not is_concrete_host():
            pytest.skip(
                "labels are not concrete host values here; they give NaN (test_cross_entropy)"
            )
        x = to_xp(xp, rng.normal(size=(6, 5)))
        t = to_xp(xp, np.array([0, 1, 2, 3, -3, 4]), dtype="int8")
        with pytest.raises(ValueError, match=_all("-3", r"(?<![\d.])4(?![\d.])")):
            getattr(xent, func)(x, t)

    @pytest.mark.eager(
        "validate=True reads the labels: a Dask compute by design, and under jax.jit none"
    )
    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    def test_validate_true_raises_on_every_backend(
        self, xp: Any, rng: np.random.Generator, reduction: str
    ) -> None:
        x = to_xp(xp, rng.normal(size=(4, 5)))
        t = to_xp(xp, np.array([0, 1, 7, 3]))
        with pytest.raises(
            ValueError, match=_all(r"(?<![\d.])7(?![\d.])", r"(?<![\d.])2(?![\d.])")
        ):
            out = xent.cross_entropy(x, t, validate=True, reduction=reduction)
            # a backend that defers the check to compute time must still raise when computed
            np.asarray(out.compute() if hasattr(out, "compute") else out)

    @pytest.mark.parametrize("value", ["yes", "none", "auto"])
    def test_validate_accepts_only_none_true_false(
        self, xp: Any, logits: Any, labels: Any, value: Any
    ) -> None:
        with pytest.raises((TypeError, ValueError), match="validate"):
            xent.cross_entropy(logits, labels, validate=value)


class TestOptions:
    """Unknown or out-of-range options name the option, the allowed values and the value given."""

    @pytest.mark.parametrize("func", ["cross_entropy", "binary_cross_entropy"])
    @pytest.mark.parametrize("reduction", ["avg", "MEAN", "", None])
    def test_unknown_reduction_lists_allowed_values(
        self, xp: Any, logits: Any, func: str, reduction: Any
    ) -> None:
        target = to_xp(xp, np.zeros((4, 5)))
        given = re.escape(str(reduction)) if reduction else "''|\"\"" if reduction == "" else "None"
        with pytest.raises(ValueError, match=_all("mean", "sum", "none", f"({given})")):
            getattr(xent, func)(logits, target, reduction=reduction)

    @pytest.mark.parametrize("func", ["cross_entropy", "binary_cross_entropy"])
    @pytest.mark.parametrize(
        ("option", "value"),
        [
            ("label_smoothing", -0.1),
            ("label_smoothing", 1.5),
            ("eps", 0.0),
            ("eps", 0.5),
            ("eps", -1e-7),
            ("eps", 0.7),
        ],
    )
    def test_out_of_range_option_names_option_and_value(
        self, xp: Any, logits: Any, func: str, option: str, value: float
    ) -> None:
        target = to_xp(xp, np.zeros((4, 5)))
        with pytest.raises(ValueError, match=_all(option, re.escape(repr(value)))):
            getattr(xent, func)(logits, target, **{option: value})

    @pytest.mark.parametrize(
        ("option", "value"), [("softcap", 0.0), ("softcap", -2.0), ("z_loss", -0.1)]
    )
    def test_out_of_range_cross_entropy_option_names_option_and_value(
        self, xp: Any, logits: Any, labels: Any, option: str, value: float
    ) -> None:
        with pytest.raises(ValueError, match=_all(option, re.escape(repr(value)))):
            xent.cross_entropy(logits, labels, **{option: value})

    @pytest.mark.parametrize(("option", "value"), [("z_loss", 0.1), ("softcap", 5.0)])
    def test_probability_input_rejects_logit_only_options(
        self, xp: Any, logits: Any, labels: Any, option: str, value: float
    ) -> None:
        with pytest.raises(ValueError, match=_all(option, "from_logits")):
            xent.cross_entropy(logits, labels, from_logits=False, **{option: value})

    @pytest.mark.parametrize(
        "func", ["cross_entropy", "cross_entropy_and_grad", "logsumexp", "log_softmax", "softmax"]
    )
    @pytest.mark.parametrize("axis", [2, -3, 10])
    def test_axis_out_of_range_names_axis_and_ndim(
        self, xp: Any, logits: Any, labels: Any, func: str, axis: int
    ) -> None:
        args = (logits, labels) if func.startswith("cross") else (logits,)
        with pytest.raises(ValueError, match=_all("axis", re.escape(str(axis)))):
            getattr(xent, func)(*args, axis=axis)

    @pytest.mark.parametrize("func", ["cross_entropy", "logsumexp", "log_softmax", "softmax"])
    def test_zero_dimensional_input_is_rejected(self, xp: Any, func: str) -> None:
        x = to_xp(xp, np.asarray(1.5))
        args = (x, to_xp(xp, np.asarray(0))) if func == "cross_entropy" else (x,)
        with pytest.raises(ValueError, match="at least one dimension"):
            getattr(xent, func)(*args)


class TestWeights:
    """Weights of the wrong shape name the shape expected and given."""

    @pytest.mark.parametrize("shape", [(6,), (4,), (5, 1), (1, 5), ()])
    def test_class_weight_must_have_shape_c(
        self, xp: Any, logits: Any, labels: Any, shape: tuple[int, ...]
    ) -> None:
        weight = to_xp(xp, np.ones(shape))
        with pytest.raises(ValueError, match=_all("weight", _shape(shape), _shape((5,)))):
            xent.cross_entropy(logits, labels, weight=weight)

    @pytest.mark.parametrize("shape", [(5,), (3,), (4, 2), (2, 4)])
    def test_sample_weight_must_broadcast_to_per_example_shape(
        self, xp: Any, logits: Any, labels: Any, shape: tuple[int, ...]
    ) -> None:
        sw = to_xp(xp, np.ones(shape))
        with pytest.raises(ValueError, match=_all("sample_weight", _shape(shape), _shape((4,)))):
            xent.cross_entropy(logits, labels, sample_weight=sw)

    @pytest.mark.parametrize("option", ["weight", "pos_weight"])
    @pytest.mark.parametrize("shape", [(4,), (3, 5), (2, 4, 5)])
    def test_binary_weights_must_broadcast_to_input(
        self, xp: Any, logits: Any, option: str, shape: tuple[int, ...]
    ) -> None:
        w = to_xp(xp, np.ones(shape))
        target = to_xp(xp, np.zeros((4, 5)))
        with pytest.raises(ValueError, match=_all(option, _shape(shape), _shape((4, 5)))):
            xent.binary_cross_entropy(logits, target, **{option: w})


# --- dtypes, namespaces, devices --------------------------------------------------------------


def _foreign(backend: Backend, a: np.ndarray) -> Any:
    """`a` in another namespace than the backend's."""
    if backend.like(Backend.NUMPY):
        array_api_strict = pytest.importorskip("array_api_strict")
        return array_api_strict.asarray(a)
    return np.asarray(a)


class TestDtypesNamespacesAndDevices:
    """Non-floating inputs, mixed namespaces, lists and mixed devices are type errors."""

    @pytest.mark.parametrize("dtype", ["int64", "int32", "bool", "complex128"])
    @pytest.mark.parametrize(
        "func",
        [
            "cross_entropy",
            "binary_cross_entropy",
            "logsumexp",
            "log_softmax",
            "softmax",
            "cross_entropy_and_grad",
            "binary_cross_entropy_and_grad",
        ],
    )
    def test_non_floating_input_is_a_type_error(self, xp: Any, dtype: str, func: str) -> None:
        x = to_xp(xp, np.ones((4, 5)), dtype=dtype)
        if func.startswith("cross"):
            args: tuple[Any, ...] = (x, to_xp(xp, np.zeros(4, dtype=np.int64)))
        elif func.startswith("binary"):
            args = (x, to_xp(xp, np.zeros((4, 5))))
        else:
            args = (x,)
        with pytest.raises(TypeError, match=_all(dtype.rstrip("0123456789") or dtype, "float")):
            getattr(xent, func)(*args)

    @pytest.mark.parametrize("which", ["target", "weight", "sample_weight"])
    def test_arrays_of_different_namespaces_are_a_type_error(
        self, xp: Any, backend: Backend, logits: Any, which: str
    ) -> None:
        args = {"target": to_xp(xp, np.array([0, 1, 2, 3])), "weight": None, "sample_weight": None}
        args[which] = _foreign(
            backend,
            np.array([0, 1, 2, 3]) if which == "target" else np.ones(5 if which == "weight" else 4),
        )
        with pytest.raises(TypeError):
            xent.cross_entropy(logits, args.pop("target"), **args)

    def test_binary_arrays_of_different_namespaces_are_a_type_error(
        self, xp: Any, backend: Backend, logits: Any
    ) -> None:
        with pytest.raises(TypeError):
            xent.binary_cross_entropy(logits, _foreign(backend, np.zeros((4, 5))))
        with pytest.raises(TypeError):
            xent.binary_cross_entropy(
                logits, to_xp(xp, np.zeros((4, 5))), pos_weight=_foreign(backend, np.ones(5))
            )

    @pytest.mark.parametrize(
        "func", ["cross_entropy", "binary_cross_entropy", "logsumexp", "log_softmax", "softmax"]
    )
    def test_python_list_is_a_type_error(self, xp: Any, logits: Any, func: str) -> None:
        rows = [[0.1, 0.2, 0.3, 0.4, 0.5]] * 4
        with pytest.raises(TypeError):
            if func == "cross_entropy":
                xent.cross_entropy(rows, [0, 1, 2, 3])
            elif func == "binary_cross_entropy":
                xent.binary_cross_entropy(rows, rows)
            else:
                getattr(xent, func)(rows)
        if func == "cross_entropy":
            with pytest.raises(TypeError):
                xent.cross_entropy(logits, [0, 1, 2, 3])

    @pytest.mark.only_backends(Backend.ARRAY_API_STRICT)
    def test_arrays_on_different_devices_are_a_type_error_strict(self, xp: Any) -> None:
        x = xp.asarray(np.zeros((4, 5)))
        t = xp.asarray(np.zeros(4, dtype=np.int64), device=xp.Device("device1"))
        with pytest.raises(TypeError, match="device"):
            xent.cross_entropy(x, t)
        w = xp.asarray(np.ones(5), device=xp.Device("device1"))
        with pytest.raises(TypeError, match="device"):
            xent.cross_entropy(x, xp.asarray(np.zeros(4, dtype=np.int64)), weight=w)

    @pytest.mark.only_backends(Backend.TORCH, Backend.TORCH_CUDA)
    def test_arrays_on_different_devices_are_a_type_error_torch(self, xp: Any) -> None:
        import torch

        x = to_xp(xp, np.zeros((4, 5)))
        t = torch.zeros(4, dtype=torch.int64, device="meta")
        with pytest.raises(TypeError, match="device"):
            xent.cross_entropy(x, t)
        with pytest.raises(TypeError, match="device"):
            xent.binary_cross_entropy(x, torch.zeros((4, 5), device="meta"))


# --------------------------------------------------------------------------- issue 7 classes
_PLAIN_MODULES = {
    Backend.NUMPY: "numpy",
    Backend.NUMPY_READONLY: "numpy",
    Backend.ARRAY_API_STRICT: "array_api_strict",
    Backend.TORCH: "torch",
    Backend.TORCH_CUDA: "torch",
    Backend.JAX: "jax.numpy",
    Backend.JAX_GPU: "jax.numpy",
    Backend.DASK: "dask.array",
    Backend.CUPY: "cupy",
}


class TestMaskedAndSparseContainers:
    """Containers whose structure some code paths would ignore (NumPy masked arrays, torch
    sparse layouts) are rejected with a TypeError, for every function."""

    @pytest.mark.only_backends(Backend.NUMPY, Backend.NUMPY_READONLY)
    @pytest.mark.parametrize("func", ["cross_entropy", "cross_entropy_and_grad", "softmax"])
    def test_numpy_masked_array_is_rejected(self, xp: Any, func: str) -> None:
        x = np.ma.masked_array([[1.0, 2.0, 3.0]], mask=[[False, True, False]])
        args = (x,) if func == "softmax" else (x, np.asarray([0]))
        with pytest.raises(TypeError, match="must be a plain dense array, got a NumPy masked"):
            getattr(xent, func)(*args)

    @pytest.mark.only_backends(Backend.NUMPY, Backend.NUMPY_READONLY)
    def test_masked_target_and_binary_input_are_rejected(self, xp: Any) -> None:
        with pytest.raises(TypeError, match="`target` must be a plain dense array"):
            xent.cross_entropy(np.zeros((1, 3)), np.ma.masked_array([0], mask=[True]))
        with pytest.raises(TypeError, match="`input` must be a plain dense array"):
            xent.binary_cross_entropy(np.ma.masked_array([0.0]), np.asarray([1.0]))

    @pytest.mark.only_backends(Backend.TORCH)
    def test_torch_sparse_input_is_rejected(self, xp: Any) -> None:
        import torch

        x = torch.eye(3, dtype=torch.float64).to_sparse()
        with pytest.raises(TypeError, match=r"`input` must be a plain dense array.*sparse"):
            xent.cross_entropy(x, torch.tensor([0, 1, 2]))
        with pytest.raises(TypeError, match=r"`x` must be a plain dense array.*sparse"):
            xent.log_softmax(x)


class TestComplexWeights:
    """Complex weights of any kind (class, sample, element, positive) are a TypeError instead
    of being cut to their real part."""

    @pytest.mark.parametrize("name", ["weight", "sample_weight"])
    def test_cross_entropy_complex_weights(self, xp: Any, name: str) -> None:
        x = to_xp(xp, np.zeros((2, 3)))
        w = to_xp(xp, np.ones(3 if name == "weight" else 2, dtype=np.complex128))
        with pytest.raises(TypeError, match=f"`{name}` must hold real numbers, got dtype"):
            xent.cross_entropy(x, to_xp(xp, np.asarray([0, 1])), **{name: w})

    @pytest.mark.parametrize("name", ["weight", "pos_weight"])
    def test_binary_complex_weights(self, xp: Any, name: str) -> None:
        x = to_xp(xp, np.zeros(2))
        w = to_xp(xp, np.ones(2, dtype=np.complex128))
        with pytest.raises(TypeError, match=f"`{name}` must hold real numbers"):
            xent.binary_cross_entropy_and_grad(x, to_xp(xp, np.ones(2)), **{name: w})


class TestScalarOptions:
    """Scalar options accept any real scalar (Python, NumPy, 0-d arrays) and reject bools and
    non-numbers with a TypeError whose message does not contradict itself."""

    @pytest.mark.eager("0-d arrays as options are read as numbers; under jit they are tracers")
    def test_numpy_and_zero_d_scalars_are_accepted(self, xp: Any) -> None:
        x_np = np.asarray([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]])
        t_np = np.asarray([2, 0])
        x, t = to_xp(xp, x_np), to_xp(xp, t_np)
        want = to_numpy(xent.cross_entropy(x, t, label_smoothing=0.25, z_loss=0.5, softcap=4.0))
        got = xent.cross_entropy(
            x, t, axis=np.int64(-1), label_smoothing=np.float32(0.25), z_loss=np.float64(0.5),
            softcap=np.float16(4.0), ignore_index=np.int16(-100),
        )  # fmt: skip
        np.testing.assert_allclose(to_numpy(got), want, rtol=1e-12)
        if not is_lazy():
            zero_d = xent.cross_entropy(x, t, label_smoothing=to_xp(xp, np.asarray(0.25)))
            want_s = to_numpy(xent.cross_entropy(x, t, label_smoothing=0.25))
            np.testing.assert_allclose(to_numpy(zero_d), want_s, rtol=1e-12)

    @pytest.mark.parametrize(
        "option", ["softcap", "z_loss", "label_smoothing", "eps", "axis", "ignore_index"]
    )
    def test_bools_are_rejected(self, xp: Any, option: str) -> None:
        x = to_xp(xp, np.zeros((2, 3)))
        with pytest.raises(TypeError, match=rf"`{option}` must be .*, got the bool True"):
            xent.cross_entropy(x, to_xp(xp, np.asarray([0, 1])), **{option: True})

    def test_non_numbers_are_type_errors(self, xp: Any) -> None:
        x = to_xp(xp, np.zeros((2, 3)))
        t = to_xp(xp, np.asarray([0, 1]))
        with pytest.raises(TypeError, match=r"`label_smoothing` must be a real number in .*str"):
            xent.cross_entropy(x, t, label_smoothing="0.1")
        with pytest.raises(TypeError, match=r"`axis` must be an integer in \[-2, 2\), got 1.0"):
            xent.softmax(x, axis=1.0)
        with pytest.raises(TypeError, match=r"`eps` must be .*, got the bool True"):
            xent.binary_cross_entropy(to_xp(xp, np.zeros(2)), to_xp(xp, np.ones(2)), eps=True)


class _Alone(xent.parallel.Collectives):
    """One worker holding every class: the vocab-parallel losses are the ordinary ones."""

    def all_reduce_max(self, x: Any) -> Any:
        return x

    def all_reduce_sum(self, x: Any) -> Any:
        return x

    def class_count(self, local: int, like: Any) -> int:
        return local


def _entry(name: str, xp: Any, target: str = "index") -> Any:
    """``(call, names)``: the loss ``name`` on a 2 x 3 input with 4 classes (linear heads:
    ``hidden`` 2 x 3, ``weight`` 4 x 3), as a function of its options, and the names its
    class-weight and sample-weight options go by."""
    hidden = to_xp(xp, np.linspace(-1.0, 1.0, 6).reshape(2, 3))
    weight = to_xp(xp, np.linspace(-0.5, 0.5, 12).reshape(4, 3))
    logits = to_xp(xp, np.linspace(-1.0, 1.0, 8).reshape(2, 4))
    labels = to_xp(xp, np.asarray([0, 3]))
    y = labels if target == "index" else to_xp(xp, np.full((2, 4), 0.25))
    parallel = {"class_start": 0, "group": _Alone()}
    calls = {
        "cross_entropy": (lambda **o: xent.cross_entropy(logits, y, **o), "weight"),
        "cross_entropy_and_grad": (
            lambda **o: xent.cross_entropy_and_grad(logits, y, **o),
            "weight",
        ),
        "linear_cross_entropy": (
            lambda **o: xent.linear_cross_entropy(hidden, weight, y, **o),
            "class_weight",
        ),
        "linear_cross_entropy_and_grad": (
            lambda **o: xent.linear_cross_entropy_and_grad(hidden, weight, y, **o),
            "class_weight",
        ),
        "parallel.cross_entropy": (
            lambda **o: xent.parallel.cross_entropy(logits, y, **parallel, **o),
            "weight",
        ),
        "parallel.cross_entropy_and_grad": (
            lambda **o: xent.parallel.cross_entropy_and_grad(logits, y, **parallel, **o),
            "weight",
        ),
        "parallel.linear_cross_entropy": (
            lambda **o: xent.parallel.linear_cross_entropy(hidden, weight, y, **parallel, **o),
            "class_weight",
        ),
        "parallel.linear_cross_entropy_and_grad": (
            lambda **o: xent.parallel.linear_cross_entropy_and_grad(
                hidden, weight, y, **parallel, **o
            ),
            "class_weight",
        ),
    }
    return calls[name]


_ENTRIES = (
    "cross_entropy", "cross_entropy_and_grad", "linear_cross_entropy",
    "linear_cross_entropy_and_grad", "parallel.cross_entropy", "parallel.cross_entropy_and_grad",
    "parallel.linear_cross_entropy", "parallel.linear_cross_entropy_and_grad",
)  # fmt: skip
_LINEAR = tuple(name for name in _ENTRIES if "linear" in name)


class TestEveryEntryPoint:
    """Every loss checks the options it shares with :func:`xent.cross_entropy` as it does:
    the linear heads and the vocab-parallel losses included (they once took a bool or float
    ``ignore_index``, complex weights and, with probability targets, any ``ignore_index``)."""

    @pytest.mark.parametrize("name", _ENTRIES)
    @pytest.mark.parametrize("value", [True, 1.5, None, "0"])
    def test_ignore_index_must_be_an_integer(self, xp: Any, name: str, value: Any) -> None:
        call, _ = _entry(name, xp)
        with pytest.raises(TypeError, match=r"`ignore_index` must be an integer"):
            call(ignore_index=value)

    @pytest.mark.parametrize("name", ["cross_entropy", "linear_cross_entropy",
                                      "linear_cross_entropy_and_grad"])  # fmt: skip
    def test_probability_targets_take_no_ignore_index(self, xp: Any, name: str) -> None:
        call, _ = _entry(name, xp, target="prob")
        with pytest.raises(ValueError, match=r"`ignore_index` applies to class-index targets"):
            call(ignore_index=3)

    @pytest.mark.parametrize("name", _ENTRIES)
    @pytest.mark.parametrize("which", ["class", "sample"])
    def test_complex_weights_are_type_errors(self, xp: Any, name: str, which: str) -> None:
        call, class_name = _entry(name, xp)
        option = class_name if which == "class" else "sample_weight"
        w = to_xp(xp, np.ones(4 if which == "class" else 2, dtype=np.complex128))
        with pytest.raises(TypeError, match=f"`{option}` must hold real numbers, got dtype"):
            call(**{option: w})

    @pytest.mark.parametrize("name", _ENTRIES)
    def test_class_weight_shape_error_names_the_option(self, xp: Any, name: str) -> None:
        call, class_name = _entry(name, xp)
        with pytest.raises(ValueError, match=_all(f"`{class_name}`", _shape((3,)))):
            call(**{class_name: to_xp(xp, np.ones(3))})

    @pytest.mark.parametrize("name", _ENTRIES)
    @pytest.mark.eager("0-d arrays as options are read as numbers; under jit they are tracers")
    def test_integer_scalars_of_any_library_are_accepted(self, xp: Any, name: str) -> None:
        call, _ = _entry(name, xp)
        want = call(ignore_index=3)
        got = call(ignore_index=np.int16(3))
        zero_d = call(ignore_index=np.asarray(3))
        for a, b in ((got, want), (zero_d, want)):
            np.testing.assert_allclose(
                to_numpy(a if not isinstance(a, tuple) else a[0]),
                to_numpy(b if not isinstance(b, tuple) else b[0]),
                rtol=1e-12,
            )

    @pytest.mark.parametrize("name", _LINEAR)
    @pytest.mark.eager("0-d arrays as options are read as numbers; under jit they are tracers")
    def test_chunk_size_takes_integer_scalars(self, xp: Any, name: str) -> None:
        call, _ = _entry(name, xp)
        want = call(chunk_size=1)
        for chunk in (np.int64(1), np.asarray(1, dtype=np.int32)):
            got = call(chunk_size=chunk)
            np.testing.assert_allclose(
                to_numpy(got if not isinstance(got, tuple) else got[0]),
                to_numpy(want if not isinstance(want, tuple) else want[0]),
                rtol=1e-12,
            )

    @pytest.mark.parametrize("name", _LINEAR)
    @pytest.mark.parametrize(
        ("chunk", "error"), [(True, TypeError), (2.0, TypeError), (0, ValueError)]
    )
    def test_chunk_size_errors(self, xp: Any, name: str, chunk: Any, error: type) -> None:
        call, _ = _entry(name, xp)
        with pytest.raises(error, match=r"`chunk_size` must be None or an integer >= 1"):
            call(chunk_size=chunk)


class TestRememberedChecks:
    """A passing answer of the checks is remembered per array types, dtypes and shapes and per
    option values and types: a call that differs in an option, or in an option's type alone
    (``True`` for ``1``), or in a layout the key does not hold, is checked again."""

    def test_options_are_checked_after_a_passing_call(self, xp: Any) -> None:
        x = to_xp(xp, np.zeros((2, 3)), dtype="float32")
        t = to_xp(xp, np.asarray([0, 1]))
        for _ in range(2):
            xent.cross_entropy(x, t, ignore_index=1, label_smoothing=0.5, from_logits=True)
        with pytest.raises(TypeError, match=r"`ignore_index` must be .*, got the bool True"):
            xent.cross_entropy(x, t, ignore_index=True, label_smoothing=0.5)
        with pytest.raises(ValueError, match=r"`label_smoothing` must be a number in \[0.0, 1.0\]"):
            xent.cross_entropy(x, t, ignore_index=1, label_smoothing=1.5)
        with pytest.raises(TypeError, match="`from_logits` must be True or False, got 1"):
            xent.cross_entropy(x, t, ignore_index=1, label_smoothing=0.5, from_logits=1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="`reduction` must be one of"):
            xent.cross_entropy(x, t, reduction="avg")  # type: ignore[arg-type]

    @pytest.mark.only_backends(Backend.TORCH)
    def test_torch_sparse_input_after_a_dense_one_is_rejected(self, xp: Any) -> None:
        import torch

        x = torch.eye(3, dtype=torch.float64)
        t = torch.tensor([0, 1, 2])
        xent.cross_entropy(x, t)
        with pytest.raises(TypeError, match=r"`input` must be a plain dense array.*sparse"):
            xent.cross_entropy(x.to_sparse(), t)


class TestXpArgument:
    """`xp=` takes the arrays' namespace or their plain library module; anything else (a
    string, another library) is a TypeError naming `xp`."""

    def test_plain_library_module_is_accepted(self, xp: Any, backend: Backend) -> None:
        import importlib

        module = importlib.import_module(_PLAIN_MODULES[backend])
        x = to_xp(xp, np.asarray([[1.0, 2.0, 3.0]]))
        t = to_xp(xp, np.asarray([1]))
        want = to_numpy(xent.cross_entropy(x, t))
        np.testing.assert_allclose(to_numpy(xent.cross_entropy(x, t, xp=module)), want)
        np.testing.assert_allclose(to_numpy(xent.cross_entropy(x, t, xp=xp)), want)
        assert to_numpy(xent.softmax(x, xp=module)).shape == (1, 3)

    def test_string_or_foreign_module_is_rejected(self, xp: Any, backend: Backend) -> None:
        x = to_xp(xp, np.asarray([[1.0, 2.0, 3.0]]))
        t = to_xp(xp, np.asarray([1]))
        with pytest.raises(TypeError, match=r"`xp` must be the namespace of the arrays"):
            xent.cross_entropy(x, t, xp="numpy")
        foreign = re if backend.like(Backend.NUMPY) else np
        with pytest.raises(TypeError, match=r"`xp` must be the namespace of the arrays"):
            xent.cross_entropy(x, t, xp=foreign)
