"""Linear cross-entropy (issue #9): ``linear_cross_entropy(h, W, y)`` is the naive composition
``cross_entropy(h @ W.T + b, y)``, in value and in all three gradients, on every backend.

The reference is that composition in float64 NumPy: the loss from ``_reference``, the gradient
of the logits from ``cross_entropy_and_grad`` (itself checked against PyTorch and finite
differences in ``test_gradients``), chained through the product by hand.
"""

from __future__ import annotations

from typing import Any

import _reference as ref
import numpy as np
import pytest
from _helpers import (
    Backend,
    current,
    is_concrete_host,
    is_lazy,
    property_settings,
    to_numpy,
    to_xp,
    xp_assert_close,
)

import xent

TORCH_BACKENDS = (Backend.TORCH, Backend.TORCH_CUDA)
JAX_BACKENDS = (Backend.JAX, Backend.JAX_GPU)

# Each case: options of the composition, plus the layout of the data (see `_case`).
CASES: dict[str, dict[str, Any]] = {
    "plain-mean": {},
    "no-bias-sum": {"bias": False, "reduction": "sum"},
    "none": {"reduction": "none"},
    "class-weight-ignore-mean": {"class_weight": True, "ignore": True},
    "sample-weight-smoothing-sum": {"sample_weight": True, "label_smoothing": 0.2,
                                    "reduction": "sum"},
    "smoothing-class-weight-ignore-none": {"label_smoothing": 0.1, "class_weight": True,
                                           "ignore": True, "reduction": "none"},
    "z-loss-softcap-mean": {"z_loss": 0.01, "softcap": 4.0},
    "probabilities-class-weight-mean": {"probabilities": True, "class_weight": True},
    "probabilities-smoothing-none": {"probabilities": True, "label_smoothing": 0.3,
                                     "reduction": "none"},
    "kdim-batch-sample-weight-mean": {"kdim": True, "sample_weight": True, "ignore": True},
    "custom-ignore-index-sum": {"ignore": True, "ignore_index": 3, "reduction": "sum"},
}  # fmt: skip
OPTION_KEYS = ("label_smoothing", "reduction", "z_loss", "softcap", "ignore_index")
ROWS, WIDTH, CLASSES = 7, 5, 11
CHUNKS = (3, None)  # 3 leaves a ragged last block of 7 rows; None: one block from the budget


def _case(
    rng: np.random.Generator,
    spec: dict[str, Any],
    rows: int = ROWS,
    width: int = WIDTH,
    classes: int = CLASSES,
) -> dict[str, Any]:
    """Float64 NumPy inputs and options for one entry of `CASES`."""
    batch = (2, 4) if spec.get("kdim") else (rows,)
    hidden = rng.normal(size=(*batch, width))
    weight = rng.normal(size=(classes, width)) * 0.8
    bias = rng.normal(size=classes) if spec.get("bias", True) else None
    ignore_index = spec.get("ignore_index", -100)
    if spec.get("probabilities"):
        z = np.exp(rng.normal(size=(*batch, classes)) * 1.5)
        target = z / z.sum(axis=-1, keepdims=True)
    else:
        target = rng.integers(0, classes, size=batch)
        if spec.get("ignore"):
            target.reshape(-1)[1::3] = ignore_index
    opts = {k: spec[k] for k in OPTION_KEYS if k in spec}
    return {
        "hidden": hidden, "weight": weight, "bias": bias, "target": target,
        "class_weight": rng.uniform(0.5, 2.0, classes) if spec.get("class_weight") else None,
        "sample_weight": rng.uniform(0.5, 2.0, batch) if spec.get("sample_weight") else None,
        "opts": opts,
    }  # fmt: skip


def _want(case: dict[str, Any], cotangent: np.ndarray | float = 1.0) -> tuple[np.ndarray, ...]:
    """Loss and gradients of ``sum(cotangent * loss)`` of the naive composition, in float64."""
    h, w, b = case["hidden"], case["weight"], case["bias"]
    logits = h @ w.T + (0.0 if b is None else b)
    common = {"weight": case["class_weight"], "sample_weight": case["sample_weight"]}
    loss = ref.cross_entropy(logits, case["target"], **common, **case["opts"])
    _, g = xent.cross_entropy_and_grad(logits, case["target"], **common, **case["opts"])
    cot = np.asarray(cotangent, dtype=np.float64)
    g = g * (cot[..., None] if cot.ndim else cot)
    g2 = g.reshape(-1, w.shape[0])
    d_bias = None if b is None else g2.sum(axis=0)
    return loss, (g2 @ w).reshape(h.shape), g2.T @ h.reshape(-1, h.shape[-1]), d_bias


def _inputs(xp: Any, case: dict[str, Any], dtype: str = "float64") -> dict[str, Any]:
    def move(a: np.ndarray | None, as_float: bool = True) -> Any:
        return None if a is None else to_xp(xp, a, dtype=dtype if as_float else None)

    return {
        "hidden": move(case["hidden"]), "weight": move(case["weight"]),
        "target": move(case["target"], as_float=case["target"].dtype.kind == "f"),
        "bias": move(case["bias"]), "class_weight": move(case["class_weight"]),
        "sample_weight": move(case["sample_weight"]),
    }  # fmt: skip


def _call(fn: Any, arrays: dict[str, Any], opts: dict[str, Any], **more: Any) -> Any:
    return fn(
        arrays["hidden"], arrays["weight"], arrays["target"], bias=arrays["bias"],
        class_weight=arrays["class_weight"], sample_weight=arrays["sample_weight"],
        **opts, **more,
    )  # fmt: skip


def _assert_matches(
    xp: Any, loss: Any, grads: tuple[Any, ...], want: tuple[np.ndarray | None, ...]
) -> None:
    """``loss`` and ``(d_hidden, d_weight, d_bias)`` equal the composition's (`_want`)."""
    for got, expected in zip((loss, *grads), want, strict=True):
        if expected is None:
            assert got is None
        else:
            xp_assert_close(got, expected, xp=xp, dtype="float64")


class TestAgainstNaiveComposition:
    @pytest.mark.parametrize("chunk", CHUNKS, ids=["chunk3", "budget"])
    @pytest.mark.parametrize("name", list(CASES))
    def test_loss_and_all_three_gradients_match(
        self, xp: Any, rng: np.random.Generator, name: str, chunk: int | None
    ) -> None:
        case = _case(rng, CASES[name])
        want = _want(case)
        arrays = _inputs(xp, case)
        loss, grads = _call(
            xent.linear_cross_entropy_and_grad, arrays, case["opts"], chunk_size=chunk
        )
        _assert_matches(xp, loss, grads, want)
        plain = _call(xent.linear_cross_entropy, arrays, case["opts"], chunk_size=chunk)
        xp_assert_close(plain, want[0], xp=xp, dtype="float64")

    @pytest.mark.parametrize("name", ["plain-mean", "probabilities-smoothing-none",
                                      "kdim-batch-sample-weight-mean"])  # fmt: skip
    def test_logits_of_one_block_take_the_composition(
        self, xp: Any, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, name: str
    ) -> None:
        from xent import _linear

        # All the logits within one block: the cross-entropy of the logits themselves (its
        # checks, once, and its fused kernels), never the blocks; over it, the blocks.
        case = _case(rng, CASES[name])
        arrays = _inputs(xp, case)
        want = _want(case)
        calls: list[str] = []
        blocks, vocab = _linear._blocks, _linear._linear_vocab._run

        def counted(route: str, f: Any) -> Any:
            def g(*args: Any, **kwargs: Any) -> Any:
                calls.append(route)
                return f(*args, **kwargs)

            return g

        monkeypatch.setattr(_linear, "_blocks", counted("blocks", blocks))
        monkeypatch.setattr(_linear._linear_vocab, "_run", counted("blocks", vocab))
        rows = int(np.prod(case["hidden"].shape[:-1]))
        for chunk in (None, rows, 100):
            loss, grads = _call(
                xent.linear_cross_entropy_and_grad, arrays, case["opts"], chunk_size=chunk
            )
            _assert_matches(xp, loss, grads, want)
            plain = _call(xent.linear_cross_entropy, arrays, case["opts"], chunk_size=chunk)
            xp_assert_close(plain, want[0], xp=xp, dtype="float64")
        assert calls == []
        _call(xent.linear_cross_entropy_and_grad, arrays, case["opts"], chunk_size=2)
        assert calls == ["blocks"]
        monkeypatch.setattr(_linear, "_BUDGET_BYTES", 8 * CLASSES)  # one row of float64 logits
        monkeypatch.setattr(_linear, "_MAX_BUDGET_BYTES", 8 * CLASSES)
        _call(xent.linear_cross_entropy_and_grad, arrays, case["opts"])
        assert calls == ["blocks", "blocks"]

    def test_vocabulary_of_many_weight_rows_matches(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        # 2100 classes: backends that accumulate `d_weight` a slab of rows at a time (JAX on
        # the CPU, 1024 rows) take two whole slabs and a short one.
        case = _case(rng, CASES["smoothing-class-weight-ignore-none"], rows=6, width=3,
                     classes=2100)  # fmt: skip
        loss_w, dh_w, dw_w, db_w = _want(case)
        arrays = _inputs(xp, case)
        loss, grads = _call(xent.linear_cross_entropy_and_grad, arrays, case["opts"], chunk_size=4)
        for got, want in zip((loss, *grads), (loss_w, dh_w, dw_w, db_w), strict=True):
            xp_assert_close(got, want, xp=xp, dtype="float64")

    def test_float32_inputs_give_float32_results(self, xp: Any, rng: np.random.Generator) -> None:
        case = _case(rng, CASES["smoothing-class-weight-ignore-none"])
        loss_w, dh_w, dw_w, db_w = _want(case)
        arrays = _inputs(xp, case, "float32")
        loss, (dh, dw, db) = _call(
            xent.linear_cross_entropy_and_grad, arrays, case["opts"], chunk_size=2
        )
        for got, want in ((loss, loss_w), (dh, dh_w), (dw, dw_w), (db, db_w)):
            xp_assert_close(got, want, xp=xp, dtype="float32", atol=1e-5, rtol=1e-4)

    def test_empty_batch_gives_nan_mean_and_zero_gradients(self, xp: Any) -> None:
        case = {
            "hidden": np.zeros((0, WIDTH)), "weight": np.ones((CLASSES, WIDTH)),
            "bias": np.zeros(CLASSES), "target": np.zeros(0, dtype=np.int64),
            "class_weight": None, "sample_weight": None,
        }  # fmt: skip
        loss, (dh, dw, db) = _call(xent.linear_cross_entropy_and_grad, _inputs(xp, case), {})
        xp_assert_close(loss, np.nan, xp=xp, dtype="float64")
        xp_assert_close(dh, np.zeros((0, WIDTH)), xp=xp, dtype="float64")
        xp_assert_close(dw, np.zeros((CLASSES, WIDTH)), xp=xp, dtype="float64")
        xp_assert_close(db, np.zeros(CLASSES), xp=xp, dtype="float64")


class TestLowPrecision:
    @pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
    def test_low_precision_matches_the_float32_composition_and_keeps_dtypes(
        self, xp: Any, rng: np.random.Generator, dtype: str
    ) -> None:
        if current().backend.like(Backend.NUMPY, Backend.ARRAY_API_STRICT) and dtype == "bfloat16":
            pytest.skip("NumPy and array-api-strict have no bfloat16")
        case = _case(rng, CASES["class-weight-ignore-mean"])
        arrays = _inputs(xp, case, dtype)
        # The reference sees the inputs rounded to the low precision, as the backend does.
        rounded = {k: case[k] if arrays[k] is None else to_numpy(arrays[k]).astype(np.float64)
                   for k in ("hidden", "weight", "bias")}  # fmt: skip
        loss_w, dh_w, dw_w, db_w = _want({**case, **rounded})
        loss, (dh, dw, db) = _call(
            xent.linear_cross_entropy_and_grad, arrays, case["opts"], chunk_size=1
        )
        eps = 2.0**-7 if dtype == "bfloat16" else 2.0**-10
        # The logits are rounded once to the low precision (the product's output dtype), the
        # gradients once at the end; one block per row makes a low-precision sum over blocks
        # (Liger #512) show.
        for got, want in ((loss, loss_w), (dh, dh_w), (dw, dw_w), (db, db_w)):
            scale = float(np.max(np.abs(want)))
            xp_assert_close(got, want, xp=xp, dtype=dtype, rtol=4 * eps, atol=4 * eps * scale)


class TestValidation:
    def test_out_of_range_label_follows_cross_entropy_policy(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        case = _case(rng, CASES["plain-mean"])
        case["target"][4] = CLASSES
        arrays = _inputs(xp, case)
        if is_concrete_host():
            with pytest.raises(ValueError, match=rf"label {CLASSES} at position \(4,\)"):
                _call(xent.linear_cross_entropy, arrays, {})
        else:
            loss = _call(xent.linear_cross_entropy, arrays, {})
            xp_assert_close(loss, np.nan, xp=xp, dtype="float64")
        rows = _call(xent.linear_cross_entropy, arrays, {"reduction": "none"}, validate=False)
        got = to_numpy(rows)
        assert np.isnan(got[4])
        assert np.isfinite(np.delete(got, 4)).all()

    @pytest.mark.parametrize(
        ("change", "error", "match"),
        [
            ({"weight": np.ones((CLASSES, WIDTH + 1))}, ValueError, r"`weight` must have shape \(V, 5\)"),
            ({"bias": np.ones(CLASSES + 1)}, ValueError, r"`bias` must have shape \(11,\)"),
            ({"class_weight": np.ones(3)}, ValueError, r"`class_weight` must have shape \(11,\)"),
            ({"target": np.zeros((ROWS, 2), dtype=np.int64)}, ValueError, "class indices"),
            ({"sample_weight": np.ones(3)}, ValueError, "`sample_weight` must broadcast"),
        ],
        ids=["weight-width", "bias-shape", "class-weight-shape", "target-shape", "sample-weight"],
    )  # fmt: skip
    def test_shape_errors_name_what_was_expected(
        self, xp: Any, rng: np.random.Generator, change: dict[str, Any], error: type, match: str
    ) -> None:
        case = {**_case(rng, CASES["plain-mean"]), **change}
        with pytest.raises(error, match=match):
            _call(xent.linear_cross_entropy, _inputs(xp, case), {})

    @pytest.mark.parametrize(
        ("chunk", "error"), [(0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)]
    )
    def test_chunk_size_must_be_a_positive_integer(
        self, xp: Any, rng: np.random.Generator, chunk: Any, error: type
    ) -> None:
        arrays = _inputs(xp, _case(rng, CASES["plain-mean"]))
        with pytest.raises(error, match="`chunk_size` must be None or an integer >= 1"):
            _call(xent.linear_cross_entropy, arrays, {}, chunk_size=chunk)

    def test_weight_of_another_dtype_is_a_type_error(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        case = _case(rng, CASES["plain-mean"])
        arrays = _inputs(xp, case)
        arrays["weight"] = to_xp(xp, case["weight"], dtype="float32")
        with pytest.raises(TypeError, match="`weight` must have the dtype of `hidden`"):
            _call(xent.linear_cross_entropy, arrays, {})


@pytest.mark.only_backends(Backend.DASK)
class TestDask:
    def test_stays_lazy_until_computed(self, xp: Any, rng: np.random.Generator) -> None:
        import dask

        case = _case(rng, CASES["class-weight-ignore-mean"])
        arrays = _inputs(xp, case)

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a Dask graph was computed before .compute()")

        with dask.config.set(scheduler=refuse):
            loss, (dh, dw, db) = _call(
                xent.linear_cross_entropy_and_grad, arrays, case["opts"], chunk_size=3
            )
        assert is_lazy()
        loss_w, dh_w, dw_w, db_w = _want(case)
        xp_assert_close(loss, loss_w, xp=xp, dtype="float64")
        xp_assert_close(dh, dh_w, xp=xp, dtype="float64")
        xp_assert_close(dw, dw_w, xp=xp, dtype="float64")
        xp_assert_close(db, db_w, xp=xp, dtype="float64")


# --------------------------------------------------------------------------- vocabulary chunks
# Every option, a few to a case: a budget of `VOCAB_BUDGET` bytes cuts the 11 classes into
# chunks of 2 (float64, 7 rows) or 4 (3 rows), the first one short.
VOCAB_CASES: dict[str, dict[str, Any]] = {
    "index-all-options-mean": {"class_weight": True, "ignore": True, "sample_weight": True,
                               "label_smoothing": 0.2, "z_loss": 0.01, "softcap": 3.0},
    "index-no-bias-custom-ignore-none": {"bias": False, "ignore": True, "ignore_index": 3,
                                         "reduction": "none"},
    "probabilities-all-options-sum": {"probabilities": True, "class_weight": True,
                                      "sample_weight": True, "label_smoothing": 0.3,
                                      "z_loss": 0.02, "softcap": 3.0, "reduction": "sum"},
    "probabilities-kdim-none": {"probabilities": True, "kdim": True, "reduction": "none"},
}  # fmt: skip
VOCAB_CHUNKS = {"index-no-bias-custom-ignore-none": 3, "probabilities-kdim-none": 3}
VOCAB_BUDGET = 112


@pytest.fixture
def small_budget(monkeypatch: pytest.MonkeyPatch) -> int:
    """A logits budget small enough that the test cases split the vocabulary."""
    from xent import _linear

    monkeypatch.setattr(_linear, "_BUDGET_BYTES", VOCAB_BUDGET)
    return VOCAB_BUDGET


@pytest.mark.parametrize(
    ("rows", "classes", "itemsize", "chunk_size", "want"),
    [
        (4096, 32768, 4, None, (128, 32768)),  # the vocabulary fits: rows from the budget
        (8192, 128256, 4, None, (32, 128256)),
        (8192, 2**22, 4, None, (2048, 2048)),  # V = 4M: a square block of 16 MiB
        (8192, 2**22, 8, None, (1024, 2048)),
        (8192, 10**6, 4, None, (2048, 2048)),
        (300, 2**20, 4, None, (300, 2**13)),  # fewer rows than the square: all of them
        (5, 10**6, 4, None, (5, 2**19)),  # fewer rows than the least block
        (8192, 2**22, 4, 1, (1, 2**22)),  # one row of 4M float32 fits exactly
        (8192, 2**22, 8, 1, (1, 2**21)),  # an explicit block keeps its rows
        (8192, 2**20, 4, 64, (64, 2**16)),
        (0, 2**30, 4, None, (1, 2**30)),  # no rows: nothing to split
    ],
)  # fmt: skip
def test_vocabulary_is_split_only_when_the_least_block_is_over_budget(
    rows: int, classes: int, itemsize: int, chunk_size: int | None, want: tuple[int, int]
) -> None:
    from xent import _linear, _linear_vocab

    got = _linear_vocab._split(rows, classes, itemsize, chunk_size, _linear._BUDGET_BYTES)
    assert got == want


@pytest.mark.usefixtures("small_budget")
class TestVocabularyChunks:
    @pytest.mark.parametrize("name", list(VOCAB_CASES))
    def test_loss_and_all_three_gradients_match(
        self, xp: Any, rng: np.random.Generator, name: str
    ) -> None:
        case = _case(rng, VOCAB_CASES[name])
        loss, grads = _call(
            xent.linear_cross_entropy_and_grad, _inputs(xp, case), case["opts"],
            chunk_size=VOCAB_CHUNKS.get(name),
        )  # fmt: skip
        _assert_matches(xp, loss, grads, _want(case))

    @pytest.mark.only_backends(Backend.NUMPY, Backend.ARRAY_API_STRICT, Backend.TORCH)
    def test_any_options_and_chunks_match_the_composition(self, xp: Any) -> None:
        from hypothesis import given
        from hypothesis import strategies as st

        from xent import _linear

        @property_settings()
        @given(
            spec=st.fixed_dictionaries(
                {},
                optional={
                    "probabilities": st.booleans(), "class_weight": st.booleans(),
                    "sample_weight": st.booleans(), "ignore": st.booleans(),
                    "bias": st.booleans(), "kdim": st.booleans(),
                    "label_smoothing": st.sampled_from([0.0, 0.25, 1.0]),
                    "z_loss": st.sampled_from([0.0, 0.05]), "softcap": st.sampled_from([2.0, 1e3]),
                    "reduction": st.sampled_from(["mean", "sum", "none"]),
                },
            ),
            chunk=st.sampled_from([None, 1, 2, 5]),
            budget=st.integers(8, 600),
            seed=st.integers(0, 2**32 - 1),
        )  # fmt: skip
        def check(spec: dict[str, Any], chunk: int | None, budget: int, seed: int) -> None:
            if spec.get("probabilities"):
                spec = {**spec, "ignore": False}
            case = _case(np.random.default_rng(seed), spec)
            _linear._BUDGET_BYTES = budget
            loss, grads = _call(
                xent.linear_cross_entropy_and_grad, _inputs(xp, case), case["opts"],
                chunk_size=chunk,
            )  # fmt: skip
            _assert_matches(xp, loss, grads, _want(case))

        check()

    def test_masked_classes_and_nan_rows_stay_in_their_rows(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        case = _case(rng, {"reduction": "none"})
        case["bias"][[2, 5, 6]] = -np.inf  # masked classes, one of them in the first chunk
        case["target"][:] = np.where(np.isin(case["target"], [2, 5, 6]), 0, case["target"])
        case["target"][1] = 5  # a masked target: +inf
        case["hidden"][4] = np.nan  # a NaN row: NaN
        logits = case["hidden"] @ case["weight"].T + case["bias"]
        want = ref.cross_entropy(logits, case["target"], reduction="none")
        assert np.isinf(want[1])
        assert np.isnan(want[4])
        assert np.isfinite(np.delete(want, [1, 4])).all()
        loss = _call(xent.linear_cross_entropy, _inputs(xp, case), {"reduction": "none"})
        xp_assert_close(loss, want, xp=xp, dtype="float64")

    def test_gradients_skip_masked_classes_and_ignored_rows(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        case = _case(rng, {"ignore": True, "class_weight": True})
        case["bias"][[0, 7]] = -np.inf
        case["target"][:] = np.where(np.isin(case["target"], [0, 7]), 1, case["target"])
        want = _want(case)
        assert np.isfinite(want[0])
        loss, grads = _call(xent.linear_cross_entropy_and_grad, _inputs(xp, case), {})
        _assert_matches(xp, loss, grads, want)

    def test_bfloat16_matches_the_float32_composition_and_keeps_dtypes(
        self, xp: Any, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        if current().backend.like(Backend.NUMPY, Backend.ARRAY_API_STRICT):
            pytest.skip("NumPy and array-api-strict have no bfloat16")
        from xent import _linear

        # 7 rows of 4 float32 logits take the budget: chunks of 4 classes, the first one short.
        monkeypatch.setattr(_linear, "_BUDGET_BYTES", 7 * 4 * 4)
        case = _case(rng, VOCAB_CASES["index-all-options-mean"])
        arrays = _inputs(xp, case, "bfloat16")
        rounded = {k: to_numpy(arrays[k]).astype(np.float64) for k in ("hidden", "weight", "bias")}
        loss_w, dh_w, dw_w, db_w = _want({**case, **rounded})
        loss, (dh, dw, db) = _call(xent.linear_cross_entropy_and_grad, arrays, case["opts"])
        eps = 2.0**-7
        for got, want in ((loss, loss_w), (dh, dh_w), (dw, dw_w), (db, db_w)):
            scale = float(np.max(np.abs(want)))
            xp_assert_close(got, want, xp=xp, dtype="bfloat16", rtol=4 * eps, atol=4 * eps * scale)

    @pytest.mark.only_backends(*TORCH_BACKENDS)
    @pytest.mark.parametrize("name", ["index-no-bias-custom-ignore-none", "probabilities-kdim-none",
                                      "index-all-options-mean"])  # fmt: skip
    def test_torch_backward_with_random_cotangent(
        self, xp: Any, rng: np.random.Generator, name: str
    ) -> None:
        _check_torch_backward(xp, rng, VOCAB_CASES[name])

    @pytest.mark.only_backends(*TORCH_BACKENDS)
    def test_torch_gradcheck_and_gradgradcheck(self, xp: Any, rng: np.random.Generator) -> None:
        # 5 rows of 4 classes in chunks of 2: few entries, as the numerical Jacobians perturb each.
        case = _case(rng, VOCAB_CASES["index-all-options-mean"], rows=5, width=3, classes=4)
        _check_torch_gradgrad(case, chunk=None)

    @pytest.mark.only_backends(*JAX_BACKENDS)
    def test_jax_jit_grad_with_per_row_cotangent(self, xp: Any, rng: np.random.Generator) -> None:
        import jax

        spec = {"ignore": True, "label_smoothing": 0.1, "class_weight": True, "softcap": 3.0,
                "reduction": "none"}  # fmt: skip
        _check_jax_grads(xp, rng, spec, None, (lambda g, **k: jax.jit(jax.value_and_grad(g, **k)),))

    @pytest.mark.only_backends(Backend.NUMPY)
    @pytest.mark.eager("tracemalloc measures NumPy's own allocations")
    def test_peak_memory_is_a_chunk_of_logits_plus_the_gradients(
        self, xp: Any, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import tracemalloc

        from xent import _linear

        rows, width, classes, budget = 1024, 16, 2**15, 2**20
        monkeypatch.setattr(_linear, "_BUDGET_BYTES", budget)
        monkeypatch.setattr(_linear, "_MAX_BUDGET_BYTES", budget)  # no 1/32 share above it
        hidden = rng.normal(size=(rows, width)).astype(np.float32)
        weight = rng.normal(size=(classes, width)).astype(np.float32)
        target = rng.integers(0, classes, size=rows)
        # A first, smaller call: one-time allocations (imports, caches) stay out of the peak.
        xent.linear_cross_entropy_and_grad(hidden[:16], weight[:4096], target[:16] % 4096)
        tracemalloc.start()
        try:
            _, grads = xent.linear_cross_entropy_and_grad(
                hidden, weight, target, label_smoothing=0.1
            )
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        gradients = sum(g.nbytes for g in grads if g is not None)
        logits = rows * classes * 4
        # Blocks of 512 rows x 512 classes (1 MiB); the full logits (128 MiB) would be 60 times
        # the gradients (2.1 MiB).
        assert peak <= 3 * gradients + 8 * budget, (peak, gradients)
        assert peak < logits / 8


# --------------------------------------------------------------------------- PyTorch
def _torch_args(case: dict[str, Any]) -> tuple[Any, ...]:
    import torch

    def leaf(a: np.ndarray | None) -> Any:
        return None if a is None else torch.tensor(a, requires_grad=True)

    return leaf(case["hidden"]), leaf(case["weight"]), leaf(case["bias"])


def _fixed(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    def move(a: np.ndarray | None) -> Any:
        return None if a is None else torch.tensor(a)

    return {
        "class_weight": move(case["class_weight"]),
        "sample_weight": move(case["sample_weight"]),
        **case["opts"],
    }


def _check_torch_backward(
    xp: Any, rng: np.random.Generator, spec: dict[str, Any], chunk: int | None = 3
) -> None:
    """Through the autograd Function, with a random cotangent: the composition's gradients."""
    import torch

    case = _case(rng, spec)
    h, w, b = _torch_args(case)
    loss = xent.linear_cross_entropy(
        h, w, torch.tensor(case["target"]), bias=b, chunk_size=chunk, **_fixed(case)
    )
    cot = rng.normal(size=tuple(loss.shape)) * 3.0
    loss.backward(torch.tensor(cot))
    loss_w, dh_w, dw_w, db_w = _want(case, cot)
    xp_assert_close(loss, loss_w, xp=xp, dtype="float64")
    xp_assert_close(h.grad, dh_w, xp=xp, dtype="float64")
    xp_assert_close(w.grad, dw_w, xp=xp, dtype="float64")
    if b is not None:
        xp_assert_close(b.grad, db_w, xp=xp, dtype="float64")


def _check_torch_gradgrad(case: dict[str, Any], chunk: int | None) -> None:
    import torch

    target, fixed = torch.tensor(case["target"]), _fixed(case)

    def f(h: Any, w: Any, b: Any) -> Any:
        return xent.linear_cross_entropy(h, w, target, bias=b, chunk_size=chunk, **fixed)

    args = _torch_args(case)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradgradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.only_backends(*TORCH_BACKENDS)
class TestTorchAutograd:
    @pytest.mark.parametrize("chunk", CHUNKS, ids=["blocks", "one-block"])
    @pytest.mark.parametrize("name", list(CASES))
    def test_backward_with_random_cotangent_matches_composition(
        self, xp: Any, rng: np.random.Generator, name: str, chunk: int | None
    ) -> None:
        _check_torch_backward(xp, rng, CASES[name], chunk)

    @pytest.mark.parametrize("scale", [2.5, 0.0])
    def test_uniform_cotangent_of_per_row_loss_scales_forward_gradients(
        self, xp: Any, rng: np.random.Generator, scale: float
    ) -> None:
        import torch

        # The forward's gradients of sum(loss) serve any cotangent equal on every row (the
        # `.sum()` or `.mean()` of the rows); the zero cotangent too.
        case = _case(rng, CASES["smoothing-class-weight-ignore-none"])
        h, w, b = _torch_args(case)
        loss = xent.linear_cross_entropy(
            h, w, torch.tensor(case["target"]), bias=b, chunk_size=3, **_fixed(case)
        )
        cot = np.full(tuple(loss.shape), scale)
        (loss * torch.tensor(cot)).sum().backward()
        _, dh_w, dw_w, db_w = _want(case, cot)
        xp_assert_close(h.grad, dh_w, xp=xp, dtype="float64")
        xp_assert_close(w.grad, dw_w, xp=xp, dtype="float64")
        xp_assert_close(b.grad, db_w, xp=xp, dtype="float64")

    def test_empty_per_row_loss_backward_gives_zero_gradients(self, xp: Any) -> None:
        import torch

        h = torch.zeros((0, WIDTH), dtype=torch.float64, requires_grad=True)
        w = torch.ones((CLASSES, WIDTH), dtype=torch.float64, requires_grad=True)
        target = torch.zeros(0, dtype=torch.int64)
        xent.linear_cross_entropy(h, w, target, reduction="none").sum().backward()
        xp_assert_close(h.grad, np.zeros((0, WIDTH)), xp=xp, dtype="float64")
        xp_assert_close(w.grad, np.zeros((CLASSES, WIDTH)), xp=xp, dtype="float64")

    @pytest.mark.parametrize("name", ["smoothing-class-weight-ignore-none", "z-loss-softcap-mean"])
    @pytest.mark.parametrize("chunk", CHUNKS, ids=["blocks", "one-block"])
    def test_gradcheck_and_gradgradcheck(
        self, xp: Any, rng: np.random.Generator, name: str, chunk: int | None
    ) -> None:
        # Few entries: the numerical Jacobians perturb each one.
        _check_torch_gradgrad(_case(rng, CASES[name], rows=5, width=3, classes=4), chunk=chunk)

    def test_only_requested_gradients_are_computed(self, xp: Any, rng: np.random.Generator) -> None:
        import torch

        case = _case(rng, CASES["plain-mean"])
        h, w, b = _torch_args(case)
        w.requires_grad_(False)
        target = torch.tensor(case["target"])
        loss = xent.linear_cross_entropy(h, w, target, bias=b, chunk_size=3)
        loss.backward()
        assert w.grad is None
        xp_assert_close(h.grad, _want(case)[1], xp=xp, dtype="float64")
        with torch.no_grad():
            frozen = xent.linear_cross_entropy(h, w, target, bias=b)
        assert frozen.grad_fn is None
        assert not frozen.requires_grad

    def test_gradient_through_sample_weight_falls_back_to_autograd(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        import torch

        case = _case(rng, CASES["sample-weight-smoothing-sum"])
        h, w, b = _torch_args(case)
        s = torch.tensor(case["sample_weight"], requires_grad=True)
        opts = case["opts"]
        loss = xent.linear_cross_entropy(
            h, w, torch.tensor(case["target"]), bias=b, sample_weight=s, chunk_size=3, **opts
        )
        loss.backward()
        rows = ref.cross_entropy(
            case["hidden"] @ case["weight"].T + case["bias"], case["target"],
            **{**opts, "reduction": "none"},
        )  # fmt: skip
        xp_assert_close(s.grad, rows, xp=xp, dtype="float64")
        xp_assert_close(h.grad, _want(case)[1], xp=xp, dtype="float64")

    @pytest.mark.filterwarnings(
        # array-api-compat's `lru_cache` helpers make Dynamo warn while tracing; harmless.
        "ignore:Dynamo detected a call to a `functools.lru_cache`-wrapped function:UserWarning"
    )
    @pytest.mark.parametrize("budget", [None, VOCAB_BUDGET], ids=["rows", "vocab-chunks"])
    def test_torch_compile_fullgraph_matches_composition(
        self,
        xp: Any,
        rng: np.random.Generator,
        monkeypatch: pytest.MonkeyPatch,
        budget: int | None,
    ) -> None:
        import torch

        from xent import _linear

        if budget is not None:
            monkeypatch.setattr(_linear, "_BUDGET_BYTES", budget)
        torch._dynamo.reset()
        case = _case(rng, CASES["class-weight-ignore-mean"])
        target, fixed = torch.tensor(case["target"]), _fixed(case)

        def f(h: Any, w: Any, b: Any) -> Any:
            return xent.linear_cross_entropy(h, w, target, bias=b, chunk_size=3, **fixed)

        # aot_eager traces what inductor would (Dynamo, then AOT autograd), without a C++ build.
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        h, w, b = _torch_args(case)
        loss = compiled(h, w, b)
        loss.backward()
        loss_w, dh_w, dw_w, db_w = _want(case)
        xp_assert_close(loss, loss_w, xp=xp, dtype="float64")
        xp_assert_close(h.grad, dh_w, xp=xp, dtype="float64")
        xp_assert_close(w.grad, dw_w, xp=xp, dtype="float64")
        xp_assert_close(b.grad, db_w, xp=xp, dtype="float64")
        torch._dynamo.reset()


# --------------------------------------------------------------------------- JAX
def _check_jax_grads(
    xp: Any, rng: np.random.Generator, spec: dict[str, Any], chunk: int | None, transforms: Any
) -> None:
    """Each of ``transforms`` (``jax.value_and_grad``, maybe jitted) of ``sum(cot * loss)``
    with a random cotangent gives the composition's loss and gradients."""
    case = _case(rng, spec)
    arrays = _inputs(xp, case)
    loss_w = _want(case)[0]
    cot = rng.normal(size=np.shape(loss_w)) * 3.0
    _, dh_w, dw_w, db_w = _want(case, cot)
    c = to_xp(xp, cot)

    def f(h: Any, w: Any, b: Any) -> Any:
        args = {**arrays, "hidden": h, "weight": w, "bias": b}
        loss = _call(xent.linear_cross_entropy, args, case["opts"], chunk_size=chunk)
        return xp.sum(loss * c), loss

    for fn in transforms:
        (_, loss), grads = fn(f, argnums=(0, 1, 2), has_aux=True)(
            arrays["hidden"], arrays["weight"], arrays["bias"]
        )
        _assert_matches(xp, loss, grads, (loss_w, dh_w, dw_w, db_w))


@pytest.mark.only_backends(*JAX_BACKENDS)
class TestJaxAutodiff:
    @pytest.mark.parametrize("name", ["plain-mean", "none", "smoothing-class-weight-ignore-none",
                                      "probabilities-class-weight-mean",
                                      "kdim-batch-sample-weight-mean"])  # fmt: skip
    def test_jit_value_and_grad_with_random_cotangent(
        self, xp: Any, rng: np.random.Generator, name: str
    ) -> None:
        import jax

        plain = jax.value_and_grad
        for chunk in CHUNKS:
            _check_jax_grads(
                xp, rng, CASES[name], chunk, (plain, lambda g, **k: jax.jit(plain(g, **k)))
            )

    def test_uniform_cotangent_of_per_row_loss_scales_forward_gradients(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        import jax

        # A `.sum()` of the rows: the backward takes the forward's gradients, scaled.
        case = _case(rng, CASES["smoothing-class-weight-ignore-none"])
        arrays = _inputs(xp, case)
        cot = np.full(np.shape(_want(case)[0]), 2.5)
        _, dh_w, dw_w, db_w = _want(case, cot)

        def f(h: Any, w: Any, b: Any) -> Any:
            args = {**arrays, "hidden": h, "weight": w, "bias": b}
            return 2.5 * xp.sum(_call(xent.linear_cross_entropy, args, case["opts"], chunk_size=3))

        grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(
            arrays["hidden"], arrays["weight"], arrays["bias"]
        )
        for got, want in zip(grads, (dh_w, dw_w, db_w), strict=True):
            xp_assert_close(got, want, xp=xp, dtype="float64")

    def test_empty_per_row_loss_gives_zero_gradients(self, xp: Any) -> None:
        import jax

        target = xp.zeros((0,), dtype=xp.int32)

        def f(h: Any, w: Any) -> Any:
            return xp.sum(xent.linear_cross_entropy(h, w, target, reduction="none"))

        dh, dw = jax.jit(jax.grad(f, argnums=(0, 1)))(
            xp.zeros((0, WIDTH), dtype=xp.float64), xp.ones((CLASSES, WIDTH), dtype=xp.float64)
        )
        xp_assert_close(dh, np.zeros((0, WIDTH)), xp=xp, dtype="float64")
        xp_assert_close(dw, np.zeros((CLASSES, WIDTH)), xp=xp, dtype="float64")

    @pytest.mark.eager("the torch reference goes through xent too, on torch tensors")
    def test_grads_equal_torch_autograd(self, xp: Any, rng: np.random.Generator) -> None:
        import jax

        torch = pytest.importorskip("torch", reason="the comparison is with PyTorch's autograd")
        case = _case(rng, CASES["smoothing-class-weight-ignore-none"])
        arrays = _inputs(xp, case)

        def f(h: Any, w: Any, b: Any) -> Any:
            args = {**arrays, "hidden": h, "weight": w, "bias": b}
            return xp.sum(_call(xent.linear_cross_entropy, args, case["opts"]) ** 2)

        ours = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(
            arrays["hidden"], arrays["weight"], arrays["bias"]
        )
        h, w, b = _torch_args(case)
        logits = h @ w.T + b
        fixed = _fixed(case)
        fixed["weight"] = fixed.pop("class_weight")
        loss = xent.cross_entropy(logits, torch.tensor(case["target"]), **fixed)
        (loss**2).sum().backward()
        for got, want in zip(ours, (h.grad, w.grad, b.grad), strict=True):
            xp_assert_close(got, to_numpy(want), xp=xp, dtype="float64")

    def test_sharded_inputs_under_jit(self, xp: Any, rng: np.random.Generator) -> None:
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        case = _case(rng, CASES["class-weight-ignore-mean"])
        arrays = _inputs(xp, case)
        mesh = Mesh(np.array(jax.devices("cpu")), ("rows",))
        rows = NamedSharding(mesh, PartitionSpec("rows"))
        arrays["hidden"] = jax.device_put(arrays["hidden"], rows)
        arrays["target"] = jax.device_put(arrays["target"], rows)

        def f(h: Any, w: Any) -> Any:
            return _call(xent.linear_cross_entropy, {**arrays, "hidden": h, "weight": w}, {})

        loss, (dh, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(
            arrays["hidden"], arrays["weight"]
        )
        loss_w, dh_w, dw_w, _ = _want(case)
        xp_assert_close(loss, loss_w, xp=xp, dtype="float64")
        xp_assert_close(dh, dh_w, xp=xp, dtype="float64")
        xp_assert_close(dw, dw_w, xp=xp, dtype="float64")
