"""Backend specifics: each backend's own code paths give what xent's generic path gives.

- Dask: the gather stays linear in the number of class chunks, and every task xent adds to a graph
  runs under xent's errstate, wherever and whenever the caller computes it. The plain loss (and
  gradient) of NumPy blocks whose classes sit in one block adds a few layers (xent's NumPy loss
  per row block) and gives what the generic primitives give, lazily.
- Fused fast paths: the plain options (logits, class indices, no softcap, z_loss or
  sample_weight) may be served by a fused native kernel (``F.cross_entropy`` on the PyTorch CPU,
  one NumPy pass); each call is compared with the same call through the generic primitives, on
  the inputs where a native kernel is most likely to differ: non-finite logits, logits at the
  dtype's limits, labels of other integer dtypes, an ``ignore_index`` inside ``[0, C)``, and
  invalid labels.
- NumPy's pass on each side of its size thresholds (one block or many, rows or transposed
  blocks, one thread or several), with float16, class weights and ignored labels; and along a
  class axis that is not last (blocks of whole slabs, blocks of columns of one, or chunks of
  its classes).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import _reference as ref
import numpy as np
import pytest
from _helpers import Backend, jax_long_rows, property_settings, to_numpy, to_xp
from hypothesis import given
from hypothesis import strategies as st

import xent

DASK = pytest.mark.only_backends(Backend.DASK)


def _chunked(a: np.ndarray, chunks: tuple[int, ...]) -> Any:
    import dask.array as da

    return da.from_array(a, chunks=chunks)  # type: ignore[no-untyped-call]


@DASK
class TestDaskGather:
    """The gather over many class chunks: a graph that does not grow with them, fast and exact."""

    def _loss(self, rng: np.random.Generator, n_chunks: int) -> tuple[Any, np.ndarray]:
        x = rng.normal(size=(3, n_chunks)) * 3
        t = rng.integers(0, n_chunks, size=3)
        t[1] = n_chunks - 1
        loss = xent.cross_entropy(_chunked(x, (3, 1)), _chunked(t, (3,)), reduction="none")
        return loss, ref.cross_entropy(x, t, reduction="none")

    def test_graph_layers_do_not_grow_with_class_chunks(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        few, _ = self._loss(rng, 10)
        many, _ = self._loss(rng, 1000)
        # Each tree reduction adds a layer per level (a few for 100 times the chunks); a Python
        # chain of per-chunk arrays adds about two per chunk.
        extra = len(many.__dask_graph__().layers) - len(few.__dask_graph__().layers)
        assert extra <= 40, f"{extra} more graph layers for 1000 class chunks than for 10"
        assert len(many.__dask_graph__()) <= 12 * 1000

    def test_thousand_class_chunks_are_fast_and_exact(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        start = time.perf_counter()
        loss, want = self._loss(rng, 1000)
        got = to_numpy(loss)
        elapsed = time.perf_counter() - start
        np.testing.assert_allclose(got, want, rtol=1e-12)
        # About 1 s on a loaded 2-core machine; the per-chunk sum chain took over 50 s.
        assert elapsed < 20.0, f"1000 class chunks took {elapsed:.1f} s"


@DASK
class TestDaskEmptyBlocks:
    """Rows picked by a boolean mask (sizes unknown until computed) may leave a block empty;
    with the classes split over blocks, the row max still reduces them (Dask's own ``max``
    fails there: its chunk step gives an empty block a (1, 0) result)."""

    @pytest.mark.parametrize("kind", ["none", "mean", "and_grad", "softcap"])
    def test_class_chunked_rows_with_an_empty_block(
        self, xp: Any, rng: np.random.Generator, kind: str
    ) -> None:
        import dask.array as da

        x = rng.normal(size=(12, 5)) * 3
        t = rng.integers(0, 5, size=12)
        keep = np.array([True] * 4 + [False] * 4 + [True] * 4)
        mask = da.from_array(keep, chunks=4)
        xc, tc = _chunked(x, (4, 2))[mask], _chunked(t, (4,))[mask]
        assert np.isnan(xc.chunks[0][0])
        options: dict[str, Any] = {"softcap": 4.0} if kind == "softcap" else {}
        reduction = "none" if kind == "none" else "mean"
        previous = xent.backends.set_native(True)  # the override, whatever the fixture chose
        try:
            if kind == "and_grad":
                loss, grad = xent.cross_entropy_and_grad(xc, tc)
                want, want_grad = xent.cross_entropy_and_grad(x[keep], t[keep])
                np.testing.assert_allclose(to_numpy(grad), want_grad, rtol=1e-12, atol=1e-15)
            else:
                loss = xent.cross_entropy(xc, tc, reduction=reduction, **options)
                want = xent.cross_entropy(x[keep], t[keep], reduction=reduction, **options)
        finally:
            xent.backends.set_native(previous)
        np.testing.assert_allclose(to_numpy(loss), want, rtol=1e-12)


def _masked_problem() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits with a fully masked row, a masked class and a masked target, as (4, 6)."""
    x = np.linspace(-2.0, 3.0, 24).reshape(4, 6)
    x[1] = -np.inf
    x[2, 1] = -np.inf
    x[3, 4] = -np.inf
    t = np.array([0, 2, 3, 4])
    q = np.eye(6)[[0, 2, 3, 5]]
    return x, t, q


_CALLS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "cross_entropy": (
        lambda x, t, q: xent.cross_entropy(
            x, t, reduction="none", label_smoothing=0.1, z_loss=0.01
        ),
        lambda x, t, q: ref.cross_entropy(x, t, reduction="none", label_smoothing=0.1, z_loss=0.01),
    ),
    "cross_entropy_probabilities": (
        lambda x, t, q: xent.cross_entropy(x, q, reduction="sum", softcap=4.0),
        lambda x, t, q: ref.cross_entropy(x, q, reduction="sum", softcap=4.0),
    ),
    "cross_entropy_from_probabilities": (
        lambda x, t, q: xent.cross_entropy(x, t, from_logits=False),
        lambda x, t, q: ref.cross_entropy(x, t, from_logits=False),
    ),
    "cross_entropy_and_grad": (
        lambda x, t, q: xent.cross_entropy_and_grad(x, t, reduction="none")[1],
        lambda x, t, q: _softmax_minus_onehot(x, t),
    ),
    "binary_cross_entropy": (
        lambda x, t, q: xent.binary_cross_entropy(x, q, reduction="none"),
        lambda x, t, q: ref.binary_cross_entropy(x, q, reduction="none"),
    ),
    "binary_cross_entropy_and_grad": (
        lambda x, t, q: xent.binary_cross_entropy_and_grad(x, q, reduction="sum")[0],
        lambda x, t, q: ref.binary_cross_entropy(x, q, reduction="sum"),
    ),
    "logsumexp": (lambda x, t, q: xent.logsumexp(x), lambda x, t, q: ref.logsumexp(x)),
    "log_softmax": (lambda x, t, q: xent.log_softmax(x), lambda x, t, q: ref.log_softmax(x)),
    "softmax": (lambda x, t, q: xent.softmax(x), lambda x, t, q: ref.softmax(x)),
}


def _softmax_minus_onehot(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.asarray(ref.softmax(x) - np.eye(x.shape[-1])[t])


@DASK
class TestDaskErrstate:
    """Tasks xent adds compute under its errstate; the caller's own tasks still raise."""

    @pytest.mark.parametrize("name", list(_CALLS))
    def test_computes_under_raise_outside_xent(self, xp: Any, name: str) -> None:
        x, t, q = _masked_problem()
        call, reference = _CALLS[name]
        if name == "cross_entropy_from_probabilities":
            x = np.where(np.isfinite(x), np.exp(x), 0.0)
            x[1] = 0.0
        out = call(to_xp(xp, x), to_xp(xp, t), to_xp(xp, q))
        with np.errstate(all="raise"):
            got = out.compute()
        with np.errstate(all="ignore"):
            want = reference(x, t, q)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)

    def test_class_axis_in_one_chunk(self, xp: Any) -> None:
        x, t, _ = _masked_problem()
        out = xent.cross_entropy_and_grad(_chunked(x, (2, 6)), _chunked(t, (2,)))
        with np.errstate(all="raise"):
            loss, grad = (a.compute() for a in out)
        assert np.isnan(loss)
        assert np.isnan(grad[1]).all()
        assert np.isfinite(np.delete(grad, 1, axis=0)).all()

    @pytest.mark.eager("the graph must reach .compute() under the caller's errstate as built")
    def test_logits_far_below_the_max_underflow_quietly(self, xp: Any) -> None:
        x = np.array([[0.0, -200.0, -1000.0], [5.0, 3.0, -800.0]], dtype=np.float32)
        t = np.array([0, 2])
        out = xent.cross_entropy_and_grad(_chunked(x, (1, 3)), _chunked(t, (1,)), reduction="none")
        with np.errstate(all="raise"):
            loss, grad = (a.compute() for a in out)
        with np.errstate(all="ignore"):
            np.testing.assert_allclose(loss, ref.cross_entropy(x, t, reduction="none"), rtol=1e-6)
            np.testing.assert_allclose(grad, _softmax_minus_onehot(x, t), atol=1e-7)

    @pytest.mark.eager("the caller's own graph must reach .compute() as built, not persisted")
    def test_callers_own_tasks_still_raise(self, xp: Any) -> None:
        import dask.array as da

        x = da.log(_chunked(np.zeros((2, 3)), (1, 3)))
        out = xent.cross_entropy(x, _chunked(np.array([0, 1]), (1,)))
        with np.errstate(all="raise"), pytest.raises(FloatingPointError, match="divide"):
            out.compute()


# --- Dask's fused loss -------------------------------------------------------------------------


def _fused_and_generic(call: Callable[[], Any]) -> tuple[Any, Any]:
    """``call()``'s Dask result, not computed, with the native overrides on (the fused loss
    where it serves), then through the generic primitives."""
    previous = xent.backends.set_native(True)
    try:
        fused = call()
        xent.backends.set_native(False)
        generic = call()
    finally:
        xent.backends.set_native(previous)
    return fused, generic


def _compute(*arrays: Any) -> list[np.ndarray]:
    """The Dask ``arrays`` computed together, as NumPy arrays."""
    import dask

    return [np.asarray(a) for a in dask.compute(*arrays)]  # type: ignore[no-untyped-call]


def _added_layers(result: Any, *inputs: Any) -> int:
    """The layers of ``result``'s graph that no input's graph holds."""
    theirs = {name for a in inputs if a is not None for name in a.__dask_graph__().layers}
    return len(set(result.__dask_graph__().layers) - theirs)


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A list that names the Dask fused losses (``"loss"``, ``"loss_and_grad"``) built from
    now on."""
    from xent.backends import _dask

    calls: list[str] = []
    for name in ("loss", "loss_and_grad"):
        build = getattr(_dask, f"_fused_{name}")

        def counted(*args: Any, build: Any = build, name: str = name) -> Any:
            calls.append(name)
            return build(*args)

        monkeypatch.setattr(_dask, f"_fused_{name}", counted)
    return calls


def _assert_fused_like_generic(
    fused_calls: list[str], x: Any, y: Any, *, rtol: float, **options: Any
) -> list[np.ndarray]:
    """The fused loss served ``cross_entropy(x, y, **options)``, and the fused loss and
    gradient ``cross_entropy_and_grad``, with the generic path's dtypes, shapes and values
    (NaN for NaN, the gradient's to ``rtol`` of the largest); returns ``[loss, loss, grad]``."""
    served = len(fused_calls)
    fused, generic = _fused_and_generic(
        lambda: [xent.cross_entropy(x, y, **options), *xent.cross_entropy_and_grad(x, y, **options)]
    )
    assert fused_calls[served:] == ["loss", "loss_and_grad"], "the fused losses did not serve"
    for a, b in zip(fused, generic, strict=True):
        assert a.dtype == b.dtype
        assert a.shape == b.shape or np.isnan(a.shape).any()
    got, want = _compute(*fused), _compute(*generic)
    for a, b in zip(got, want, strict=True):
        atol = rtol * max(1.0, float(np.max(np.abs(b), initial=0.0, where=np.isfinite(b))))
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
    return got


_RTOL = {"float16": float(np.finfo(np.float16).eps), "float32": 1e-5, "float64": 1e-12}
"""Fused and generic losses sum their positions in another order; float16 may differ by one
rounding of the float32 result."""


def _fused_problem(
    rng: np.random.Generator, shape: tuple[int, ...], axis: int, ignore_index: int = -100
) -> tuple[np.ndarray, np.ndarray]:
    """Logits with a NaN, an all-masked (-inf) and a +inf position and a masked target where
    ``shape`` has room, and labels with a few ``ignore_index`` (positions along ``axis``)."""
    x = rng.normal(scale=3.0, size=shape)
    c = shape[axis]
    y = rng.integers(0, c, size=shape[:axis] + shape[axis + 1 :])
    flat_x = np.moveaxis(x, axis, -1).reshape(-1, c)  # a view: writes reach x
    flat_y = y.reshape(-1)
    if flat_y.size >= 8:
        flat_x[1] = -np.inf  # every class masked: NaN
        flat_x[2, (flat_y[2] + 1) % c] = np.inf  # +inf off target: +inf (NaN smoothed)
        flat_x[3, 0] = np.nan
        flat_x[4, flat_y[4]] = -np.inf  # the target masked: +inf
        flat_y[[5, 7]] = ignore_index
    return x, y


@DASK
class TestDaskFusedLoss:
    """The plain loss (and its gradient) of NumPy-backed Dask arrays whose classes sit in one
    block: one task per row block runs xent's NumPy loss (and gradient), giving what the
    generic primitives give, lazily."""

    _LAYERS: ClassVar[dict[str, tuple[int, int]]] = {
        "none": (1, 3), "sum": (2, 3), "mean": (2, 4)
    }  # fmt: skip
    """The layers each fused path adds to its inputs' graphs (``cross_entropy``;
    ``cross_entropy_and_grad``'s loss and gradient together): one task per row block, one that
    totals their parts for ``"sum"`` and ``"mean"``, one that counts the mean's denominator
    before the gradient's blocks, and one per output that takes the blocks' pairs apart. The
    generic primitives add some thirty."""

    @pytest.mark.eager("graph layers are counted as built, not persisted")
    @pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
    def test_adds_few_layers(self, xp: Any, rng: np.random.Generator, reduction: str) -> None:
        x = _chunked(rng.normal(size=(10, 4)), (3, 4))
        y = _chunked(rng.integers(0, 4, size=10), (3,))
        w = _chunked(rng.random(4) + 0.5, (4,))
        split = _chunked(rng.random(4) + 0.5, (2,))
        loss_layers, both_layers = self._LAYERS[reduction]
        for weight, extra in ((None, 0), (w, 0), (split, 1)):  # a split weight: one rechunk
            options = {"weight": weight, "reduction": reduction}
            fused, generic = _fused_and_generic(lambda o=options: xent.cross_entropy(x, y, **o))
            assert _added_layers(fused, x, y, weight) == loss_layers + extra
            assert _added_layers(generic, x, y, weight) > 20
            pair, _ = _fused_and_generic(lambda o=options: xent.cross_entropy_and_grad(x, y, **o))
            both = {name for a in pair for name in a.__dask_graph__().layers}
            theirs = {n for a in (x, y, weight) if a is not None for n in a.__dask_graph__().layers}
            assert len(both - theirs) == both_layers + extra

    @pytest.mark.eager("counts the computes itself, where the fixture would persist the result")
    def test_nothing_computes_until_asked(self, xp: Any, rng: np.random.Generator) -> None:
        import dask.array as da

        computed: list[int] = []

        def counted(block: np.ndarray) -> np.ndarray:
            computed.append(1)
            return block

        x = _chunked(rng.normal(size=(9, 4)), (3, 4)).map_blocks(counted, meta=np.empty((0, 0)))
        y = da.from_array(rng.integers(0, 4, size=9), chunks=3)  # type: ignore[no-untyped-call]
        previous = xent.backends.set_native(True)
        try:
            results = [xent.cross_entropy(x, y, reduction=r) for r in ("none", "sum", "mean")]
            for r in ("none", "sum", "mean"):
                results += xent.cross_entropy_and_grad(x, y, reduction=r)
        finally:
            xent.backends.set_native(previous)
        assert all(_added_layers(a, x, y) <= 3 for a in results)
        assert not computed
        _compute(*results)
        assert len(computed) == 3  # each block once, for every result together

    @pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
    @pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
    @pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
    def test_matches_general_path(
        self,
        xp: Any,
        fused_calls: list[str],
        rng: np.random.Generator,
        reduction: str,
        weighted: bool,
        smoothing: float,
    ) -> None:
        # Uneven row blocks with non-finite positions; ignore_index the default (-100) and a
        # class.
        for ignore_index in (-100, 2):
            x_np, y_np = _fused_problem(rng, (13, 6), 1, ignore_index)
            x, y = _chunked(x_np, (5, 6)), _chunked(y_np, (4,))
            w = _chunked(rng.random(6) + 0.5, (6,)) if weighted else None
            loss, _, grad = _assert_fused_like_generic(
                fused_calls, x, y, rtol=1e-12, weight=w, ignore_index=ignore_index,
                label_smoothing=smoothing, reduction=reduction,
            )  # fmt: skip
            if reduction == "none":
                np.testing.assert_array_equal(loss[[1, 3, 4]], [np.nan, np.nan, np.inf])
                assert not np.isfinite(loss[2])
                np.testing.assert_array_equal(loss[[5, 7]], 0.0)
            np.testing.assert_array_equal(grad[[5, 7]], 0.0)  # ignored: 0 times the softmax

    @pytest.mark.parametrize(
        ("shape", "axis", "chunks"),
        [((4, 5, 6), 1, (3, 5, 4)), ((3, 4, 7), -1, (2, 3, 7))],
        ids=["N-C-H", "B-T-V"],
    )
    @pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
    def test_class_axis_anywhere(
        self,
        xp: Any,
        fused_calls: list[str],
        rng: np.random.Generator,
        reduction: str,
        shape: tuple[int, ...],
        axis: int,
        chunks: tuple[int, ...],
    ) -> None:
        ax = axis % len(shape)
        x_np, y_np = _fused_problem(rng, shape, ax)
        x, y = _chunked(x_np, chunks), _chunked(y_np, chunks[:ax] + chunks[ax + 1 :])
        w = _chunked(rng.random(shape[ax]) + 0.5, (shape[ax],))
        loss, _, grad = _assert_fused_like_generic(
            fused_calls, x, y, rtol=1e-12, axis=axis, weight=w, label_smoothing=0.1,
            reduction=reduction,
        )  # fmt: skip
        assert grad.shape == shape
        if reduction == "none":
            assert loss.shape == y_np.shape

    @pytest.mark.parametrize("label_dtype", ["uint8", "int32", "int64"])
    @pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
    def test_dtypes_match_general_path_and_numpy(
        self,
        xp: Any,
        fused_calls: list[str],
        rng: np.random.Generator,
        dtype: str,
        label_dtype: str,
    ) -> None:
        x_np = (rng.normal(scale=3.0, size=(11, 5)) + 2.0).astype(dtype)
        y_np = rng.integers(0, 5, size=11).astype(label_dtype)
        w_np = (rng.random(5) + 0.5).astype(dtype)
        x, y, w = _chunked(x_np, (4, 5)), _chunked(y_np, (4,)), _chunked(w_np, (5,))
        for reduction in ("none", "sum", "mean"):
            options = {"label_smoothing": 0.1, "reduction": reduction}
            got = _assert_fused_like_generic(
                fused_calls, x, y, rtol=_RTOL[dtype], weight=w, **options
            )
            assert all(a.dtype == np.dtype(dtype) for a in got)
            want = [
                xent.cross_entropy(x_np, y_np, weight=w_np, **options),
                *xent.cross_entropy_and_grad(x_np, y_np, weight=w_np, **options),
            ]
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(a, b, rtol=_RTOL[dtype], atol=_RTOL[dtype])

    @pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
    def test_all_positions_ignored(
        self, xp: Any, fused_calls: list[str], rng: np.random.Generator, weighted: bool
    ) -> None:
        # The mean is 0 / 0 = NaN, as on the generic path (and in PyTorch); the gradient 0.
        x = _chunked(rng.normal(size=(7, 3)), (3, 3))
        y = _chunked(np.full(7, -100), (3,))
        w = _chunked(rng.random(3) + 0.5, (3,)) if weighted else None
        want = {"none": np.zeros(7), "sum": 0.0, "mean": np.nan}
        for reduction, value in want.items():
            loss, _, grad = _assert_fused_like_generic(
                fused_calls, x, y, rtol=1e-12, weight=w, reduction=reduction
            )
            np.testing.assert_array_equal(loss, value)
            np.testing.assert_array_equal(grad, 0.0)

    def test_class_weights_of_the_labels_summing_to_zero(
        self, xp: Any, fused_calls: list[str], rng: np.random.Generator
    ) -> None:
        # The mean's denominator is 0 with positions still counted: NaN, and the gradient of
        # those positions too (1 / 0 times 0), the ignored ones 0.
        x = _chunked(rng.normal(size=(7, 3)), (3, 3))
        y = _chunked(np.array([0, 0, 1, 0, -100, 1, 0]), (3,))
        w = _chunked(np.array([0.0, 0.0, 1.0]), (3,))
        loss, _, grad = _assert_fused_like_generic(fused_calls, x, y, rtol=1e-12, weight=w)
        assert np.isnan(loss)
        np.testing.assert_array_equal(np.isnan(grad).all(axis=1), [1, 1, 1, 1, 0, 1, 1])
        np.testing.assert_array_equal(grad[4], 0.0)

    def test_unknown_chunk_sizes(
        self, xp: Any, fused_calls: list[str], rng: np.random.Generator
    ) -> None:
        import dask.array as da

        x_np, y_np = _fused_problem(rng, (20, 5), 1)
        keep = np.arange(20) % 3 != 0
        mask = da.from_array(keep, chunks=6)  # type: ignore[no-untyped-call]
        x, y = _chunked(x_np, (6, 5))[mask], _chunked(y_np, (6,))[mask]
        assert np.isnan(x.shape[0])
        for reduction in ("none", "sum", "mean"):
            got = _assert_fused_like_generic(fused_calls, x, y, rtol=1e-12, reduction=reduction)
            want = [
                xent.cross_entropy(x_np[keep], y_np[keep], reduction=reduction),
                *xent.cross_entropy_and_grad(x_np[keep], y_np[keep], reduction=reduction),
            ]
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-12, equal_nan=True)

    def test_single_row(self, xp: Any, fused_calls: list[str], rng: np.random.Generator) -> None:
        x_np, y_np = rng.normal(size=7), np.asarray(3)
        x, y = _chunked(x_np, (7,)), _chunked(y_np, ())
        for reduction in ("none", "sum", "mean"):
            loss, _, grad = _assert_fused_like_generic(
                fused_calls, x, y, rtol=1e-12, reduction=reduction
            )
            np.testing.assert_allclose(loss, ref.cross_entropy(x_np, y_np, reduction="none"))
            np.testing.assert_allclose(grad, _softmax_minus_onehot(x_np, y_np), atol=1e-15)

    @pytest.mark.parametrize("validate", [None, False])
    def test_invalid_labels_give_nan(
        self, xp: Any, fused_calls: list[str], rng: np.random.Generator, validate: bool | None
    ) -> None:
        x = _chunked(rng.normal(size=(8, 4)), (3, 4))
        y_np = rng.integers(0, 4, size=8)
        y_np[[2, 6]] = [4, -7]
        y = _chunked(y_np, (3,))
        bad = np.isin(np.arange(8), [2, 6])
        for reduction in ("none", "sum", "mean"):
            loss, _, grad = _assert_fused_like_generic(
                fused_calls, x, y, rtol=1e-12, validate=validate, reduction=reduction
            )
            np.testing.assert_array_equal(np.isnan(loss), bad if reduction == "none" else True)
            np.testing.assert_array_equal(np.isnan(grad).all(axis=1), bad)

    @pytest.mark.eager("validate=True reads the labels: a Dask compute by design")
    def test_validate_true_raises(
        self, xp: Any, fused_calls: list[str], rng: np.random.Generator
    ) -> None:
        x = _chunked(rng.normal(size=(8, 4)), (3, 4))
        y_np = rng.integers(0, 4, size=8)
        y_np[6] = 9
        y = _chunked(y_np, (3,))
        previous = xent.backends.set_native(True)
        try:
            for reduction in ("none", "sum", "mean"):
                for call in (xent.cross_entropy, xent.cross_entropy_and_grad):
                    with pytest.raises(ValueError, match=r"label 9 at position \(6,\)"):
                        call(x, y, validate=True, reduction=reduction)
        finally:
            xent.backends.set_native(previous)
        assert not fused_calls

    def test_classes_over_several_blocks_decline(
        self, xp: Any, fused_calls: list[str], rng: np.random.Generator
    ) -> None:
        x_np = rng.normal(size=(6, 8))
        y_np = rng.integers(0, 8, size=6)
        x, y = _chunked(x_np, (3, 4)), _chunked(y_np, (3,))
        for reduction in ("none", "sum", "mean"):
            fused, generic = _fused_and_generic(
                lambda r=reduction: [
                    xent.cross_entropy(x, y, reduction=r),
                    *xent.cross_entropy_and_grad(x, y, reduction=r),
                ]
            )
            for a, b in zip(_compute(*fused), _compute(*generic), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-12)
        assert not fused_calls

    @pytest.mark.eager("the graph must reach .compute() under the caller's errstate as built")
    def test_computes_under_raise(self, xp: Any, fused_calls: list[str]) -> None:
        # A masked row (the log of a zero sum), a masked target, a float16 loss beyond its
        # range, a mean of no positions (0 / 0, and its gradient's 1 / 0): the caller's
        # errstate does not reach the tasks the fused paths add.
        x_np, t, _ = _masked_problem()
        x, y = _chunked(x_np, (2, 6)), _chunked(t, (2,))
        big = np.full((4, 6), 6e4, dtype=np.float16)
        big[:, 5] = -6e4
        at_low = _chunked(np.full(4, 5), (2,))
        ignored = _chunked(np.full(4, -100), (2,))
        previous = xent.backends.set_native(True)
        try:
            losses = [xent.cross_entropy(x, y, reduction=r) for r in ("none", "sum", "mean")]
            losses.append(xent.cross_entropy(_chunked(big, (2, 6)), at_low, reduction="none"))
            losses.append(xent.cross_entropy(x, ignored))
            grads = [
                xent.cross_entropy_and_grad(x, y)[1],
                xent.cross_entropy_and_grad(x, ignored)[1],
            ]
        finally:
            xent.backends.set_native(previous)
        assert len(fused_calls) == len(losses) + len(grads)
        with np.errstate(all="raise"):
            none, total, mean, overflow, empty, grad, empty_grad = _compute(*losses, *grads)
        with np.errstate(all="ignore"):
            want = ref.cross_entropy(x_np, t, reduction="none")
        np.testing.assert_allclose(none, want, rtol=1e-12)
        assert np.isnan(total)
        assert np.isnan(mean)
        np.testing.assert_array_equal(overflow, np.inf)
        assert np.isnan(empty)
        assert np.isnan(grad[1]).all()
        np.testing.assert_array_equal(np.delete(empty_grad, 1, axis=0), 0.0)  # 0 * softmax

    @pytest.mark.eager("computes on a cluster; the lazy patch would persist the result first")
    def test_computes_on_a_cluster(
        self, xp: Any, fused_calls: list[str], rng: np.random.Generator
    ) -> None:
        # Workers in other processes receive the tasks pickled: they must survive the trip.
        import pickle

        distributed = pytest.importorskip("distributed", reason="dask.distributed is absent")
        x_np, y_np = _fused_problem(rng, (40, 30), 1)
        w_np = rng.random(30) + 0.5
        x, y, w = _chunked(x_np, (10, 30)), _chunked(y_np, (10,)), _chunked(w_np, (30,))
        options = {"weight": w, "label_smoothing": 0.1}
        previous = xent.backends.set_native(True)
        try:
            results = [xent.cross_entropy(x, y, **options)]
            results += xent.cross_entropy_and_grad(x, y, **options)
        finally:
            xent.backends.set_native(previous)
        assert fused_calls == ["loss", "loss_and_grad"]
        results = [pickle.loads(pickle.dumps(a)) for a in results]
        with (
            distributed.LocalCluster(
                n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
            ) as cluster,
            distributed.Client(cluster, timeout=60) as client,
        ):
            got = client.compute(results, sync=True)
        on_numpy = dict(options, weight=w_np)
        want = [
            xent.cross_entropy(x_np, y_np, **on_numpy),
            *xent.cross_entropy_and_grad(x_np, y_np, **on_numpy),
        ]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15, equal_nan=True)

    def test_matches_general_path_on_random_problems(self, xp: Any, fused_calls: list[str]) -> None:
        @property_settings()
        @given(case=_fused_cases())
        def check(case: dict[str, Any]) -> None:
            rng = np.random.default_rng(case["seed"])
            shape, axis, dtype = case["shape"], case["axis"], case["dtype"]
            x_np, y_np = _fused_problem(rng, shape, axis, case["ignore_index"])
            rows = case["chunks"][:axis] + case["chunks"][axis + 1 :]
            x = _chunked(x_np.astype(dtype), case["chunks"])
            y = _chunked(y_np.astype(case["label_dtype"]), rows)
            w = None
            if case["weighted"]:
                w = _chunked((rng.random(shape[axis]) + 0.5).astype(dtype), (shape[axis],))
            _assert_fused_like_generic(
                fused_calls, x, y, rtol=_RTOL[dtype], axis=axis, weight=w,
                ignore_index=case["ignore_index"], label_smoothing=case["smoothing"],
                reduction=case["reduction"],
            )  # fmt: skip

        check()


@st.composite
def _fused_cases(draw: st.DrawFn) -> dict[str, Any]:
    """A plain problem the fused loss serves: up to three axes with any row blocks, the classes
    in one, and any dtype, label dtype and options."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(0, ndim - 1))
    chunks = tuple(n if i == axis else draw(st.integers(1, n)) for i, n in enumerate(shape))
    return {
        "shape": shape,
        "axis": axis,
        "chunks": chunks,
        "dtype": draw(st.sampled_from(["float16", "float32", "float64"])),
        "label_dtype": draw(st.sampled_from(["uint8", "int32", "int64"])),
        "ignore_index": draw(st.sampled_from([-100, 0, shape[axis] - 1])),
        "smoothing": draw(st.sampled_from([0.0, 0.1, 1.0])),
        "weighted": draw(st.booleans()),
        "reduction": draw(st.sampled_from(["none", "sum", "mean"])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


# --- fused fast paths -------------------------------------------------------------------------


def _both(fn: Any) -> tuple[np.ndarray, np.ndarray]:
    """``fn()`` with the current native setting, then with the generic primitives only."""
    ours = to_numpy(fn())
    previous = xent.backends.set_native(False)
    try:
        generic = to_numpy(fn())
    finally:
        xent.backends.set_native(previous)
    return ours, generic


def _logits(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    x = rng.normal(size=(n, c)).astype(np.float32)
    x[1] = -np.inf  # every class masked: NaN
    x[2, 3] = np.inf  # one +inf logit
    x[3, 4] = np.nan
    x[4, :2] = -np.inf  # masked classes, the row still finite
    x[5, 0], x[5, 1] = np.finfo(np.float32).max, -np.finfo(np.float32).max
    return x


class TestFastPaths:
    """A backend's fused kernel gives exactly what the generic primitives give."""

    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    def test_remembered_checks_take_each_calls_class_weights(
        self, xp: Any, rng: np.random.Generator, reduction: Literal["mean", "sum", "none"]
    ) -> None:
        # Calls alike but for the class weights' values share one remembered answer (and
        # plan): each gets the loss of its own weights; another shape or a non-array still
        # raises xent's error.
        x_np = rng.normal(size=(12, 7)) * 3
        y_np = rng.integers(0, 7, size=12)
        x, y = to_xp(xp, x_np, dtype="float32"), to_xp(xp, y_np)
        for _ in range(3):
            w_np = rng.random(7) + 0.1
            got = xent.cross_entropy(
                x, y, weight=to_xp(xp, w_np, dtype="float32"), reduction=reduction
            )
            want = ref.cross_entropy(x_np, y_np, weight=w_np, reduction=reduction)
            np.testing.assert_allclose(to_numpy(got), want, rtol=2e-5, atol=1e-6)
        with pytest.raises(ValueError, match=r"`weight` must have shape \(7,\)"):
            xent.cross_entropy(x, y, weight=to_xp(xp, np.ones(6), dtype="float32"))
        with pytest.raises(TypeError, match="`weight` must be an array"):
            xent.cross_entropy(x, y, weight=[1.0] * 7)  # type: ignore[arg-type]

    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    @pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
    def test_fast_path_matches_general_path_on_non_finite_rows(
        self,
        xp: Any,
        rng: np.random.Generator,
        reduction: Literal["mean", "sum", "none"],
        weighted: bool,
    ) -> None:
        x_np = _logits(rng, 8, 6)
        y_np = rng.integers(0, 6, size=8)
        y_np[4] = 0  # the label sits on a -inf logit: +inf for that row
        x, y = to_xp(xp, x_np), to_xp(xp, y_np)
        w = to_xp(xp, rng.random(6) + 0.5, dtype="float32") if weighted else None
        ours, generic = _both(lambda: xent.cross_entropy(x, y, weight=w, reduction=reduction))
        np.testing.assert_allclose(ours, generic, rtol=1e-5, equal_nan=True)
        # The finite rows alone: the plain case every fast path serves.
        keep = np.r_[0, 6, 7]
        xf, yf = to_xp(xp, x_np[keep]), to_xp(xp, y_np[keep])
        wf = w
        ours, generic = _both(lambda: xent.cross_entropy(xf, yf, weight=wf, reduction=reduction))
        np.testing.assert_allclose(ours, generic, rtol=1e-5)
        # The loss and gradient in one call (the gradient on finite rows: there the PyTorch
        # native softmax and the generic exp agree).
        for part, (a, b) in enumerate([(x, y), (xf, yf)]):

            def call(a: Any = a, b: Any = b, part: int = part) -> Any:
                return xent.cross_entropy_and_grad(a, b, weight=w, reduction=reduction)[part]

            ours, generic = _both(call)
            np.testing.assert_allclose(ours, generic, rtol=1e-5, atol=1e-7, equal_nan=True)

    @pytest.mark.parametrize("label_dtype", ["int8", "int32", "int64"])
    def test_fast_path_matches_general_path_for_label_dtypes_and_ignore_index(
        self, xp: Any, rng: np.random.Generator, label_dtype: str
    ) -> None:
        x = to_xp(xp, rng.normal(size=(7, 5)), dtype="float32")
        y_np = rng.integers(0, 5, size=7)
        y_np[2] = 2
        y = to_xp(xp, y_np, dtype=label_dtype)
        for ignore_index in (-100, 2, 4):
            ours, generic = _both(lambda i=ignore_index: xent.cross_entropy(x, y, ignore_index=i))
            np.testing.assert_allclose(ours, generic, rtol=1e-5)
        one = to_xp(xp, rng.normal(size=5), dtype="float32")
        label = to_xp(xp, np.asarray(3), dtype=label_dtype)
        ours, generic = _both(lambda: xent.cross_entropy(one, label, reduction="none"))
        np.testing.assert_allclose(ours, generic, rtol=1e-5)

    def test_fast_path_declines_invalid_labels(self, xp: Any, rng: np.random.Generator) -> None:
        x = to_xp(xp, rng.normal(size=(4, 3)), dtype="float32")
        y = to_xp(xp, np.asarray([0, 3, 1, -7]))
        ours, generic = _both(lambda: xent.cross_entropy(x, y, validate=False, reduction="none"))
        np.testing.assert_array_equal(np.isnan(ours), [False, True, False, True])
        np.testing.assert_allclose(ours, generic, rtol=1e-5, equal_nan=True)


# --- dense targets: class probabilities and binary labels --------------------------------------

_DENSE_RTOL = {"float16": 4e-3, "bfloat16": 2e-2, "float32": 2e-5, "float64": 1e-10}


@st.composite
def _dense_cases(draw: st.DrawFn) -> dict[str, Any]:
    """A probability-target or binary problem the backends' dense fast paths serve or decline:
    up to three axes, the classes in any, every float dtype of the backend, class or element
    weights (broadcast), smoothing, every reduction; ``adversarial`` puts ``-inf`` logits under
    zero target mass, ``+inf``, NaN and logits near the dtype's max into some rows."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    weights = []
    for _ in range(2):
        k = draw(st.integers(-1, ndim))
        weights.append(
            None if k < 0 else tuple(1 if draw(st.booleans()) else n for n in shape[ndim - k :])
        )
    return {
        "kind": draw(st.sampled_from(["probs", "binary"])),
        "shape": shape,
        "axis": draw(st.integers(0, ndim - 1)),
        "dtype": draw(st.sampled_from(_float_names())),
        "weights": weights,
        "smoothing": draw(st.sampled_from([0.0, 0.1, 1.0])),
        "reduction": draw(st.sampled_from(["none", "sum", "mean"])),
        "adversarial": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _float_names() -> list[str]:
    from _helpers import current

    xp = current().xp
    return ["float32", "float64", *(n for n in ("float16", "bfloat16") if hasattr(xp, n))]


def _dense_problem(xp: Any, case: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """``(x, t, options)`` of ``case`` on ``xp``."""
    rng = np.random.default_rng(case["seed"])
    shape, axis, dtype = case["shape"], case["axis"], case["dtype"]
    x = rng.normal(size=shape) * 4
    if case["kind"] == "probs":
        t = rng.random(shape) * (rng.random(shape) < 0.7)
        t = t / np.maximum(t.sum(axis=axis, keepdims=True), 1e-9)
    else:
        t = rng.random(shape)
        t[rng.random(shape) < 0.3] = 1.0
    if case["adversarial"] and x.size >= 3:
        flat_x, flat_t = x.reshape(-1), t.reshape(-1)
        zero = np.flatnonzero(flat_t == 0)
        if zero.size:
            flat_x[zero[0]] = -np.inf  # no target mass on a masked class (probabilities)
        pick = rng.permutation(x.size)[:3]
        flat_x[pick[0]] = np.inf
        flat_x[pick[1]] = np.nan
        flat_x[pick[2]] = -float(np.finfo(np.float16 if dtype == "float16" else np.float32).max)
    options: dict[str, Any] = {"label_smoothing": case["smoothing"], "reduction": case["reduction"]}
    first, second = case["weights"]
    if case["kind"] == "probs":
        if first is not None:
            options["weight"] = to_xp(xp, rng.random(shape[axis]) + 0.5, dtype=dtype)
        options["axis"] = axis
    else:
        for name, wshape in (("weight", first), ("pos_weight", second)):
            if wshape is not None:
                options[name] = to_xp(xp, rng.random(wshape) + 0.5, dtype=dtype)
    return to_xp(xp, x, dtype=dtype), to_xp(xp, t, dtype=dtype), options


def _dense_calls(kind: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    if kind == "probs":
        return xent.cross_entropy, xent.cross_entropy_and_grad
    return xent.binary_cross_entropy, xent.binary_cross_entropy_and_grad


@pytest.fixture
def dense_served(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the backends' dense fast paths each time one answers (does not decline)."""
    from xent.backends import _generic

    served: list[str] = []
    for name in (
        "fused_prob_loss", "fused_prob_plan", "fused_prob_loss_and_grad",
        "fused_binary_loss", "fused_binary_loss_and_grad",
    ):  # fmt: skip
        for cls in _backend_classes():
            if name not in vars(cls):
                continue
            method = vars(cls)[name]

            def counted(self: Any, *args: Any, method: Any = method, name: str = name) -> Any:
                out = method(self, *args)
                if out is None:
                    return None
                if name == "fused_prob_plan":

                    def plan(*a: Any, out: Any = out) -> Any:
                        got = out(*a)
                        if got is not None:
                            served.append("fused_prob_loss")
                        return got

                    return plan
                served.append(name)
                return out

            monkeypatch.setattr(cls, name, counted)
    from xent import _binary, _cross_entropy

    monkeypatch.setattr(_cross_entropy, "_CHECKED", {})
    monkeypatch.setattr(_binary, "_CHECKED", {})
    assert _generic  # the generic backend declines: nothing to count there
    return served


def _backend_classes() -> list[type]:
    import importlib

    classes = []
    for module in ("_numpy", "_torch", "_jax", "_dask", "_cupy"):
        try:
            mod = importlib.import_module(f"xent.backends.{module}")
        except ImportError:
            continue
        classes.append(mod.Native)
    return classes


class TestDenseTargets:
    """Probability targets and the binary loss: a backend's fast path (ATen's losses, NumPy's
    blocked pass, JAX's Optax-like graph) gives what the generic primitives give, gradients
    included, and declines to them where its result is not finite."""

    def test_matches_general_path_on_random_problems(self, xp: Any) -> None:
        @property_settings()
        @given(case=_dense_cases())
        def check(case: dict[str, Any]) -> None:
            x, t, options = _dense_problem(xp, case)
            loss_fn, both_fn = _dense_calls(case["kind"])
            rtol = _DENSE_RTOL[case["dtype"]]
            for part in range(3):

                def call(part: int = part) -> Any:
                    if part == 0:
                        return loss_fn(x, t, **options)
                    return both_fn(x, t, **options)[part - 1]

                ours, generic = _both(call)
                assert ours.dtype == generic.dtype, case
                assert ours.shape == generic.shape, case
                atol = rtol * max(1.0, float(np.max(np.abs(generic), initial=0.0,
                                                    where=np.isfinite(generic))))  # fmt: skip
                np.testing.assert_allclose(
                    ours, generic, rtol=rtol, atol=atol, equal_nan=True, err_msg=str(case)
                )

        check()

    @pytest.mark.parametrize("kind", ["probs", "binary"])
    def test_fast_path_serves_finite_problems(
        self, xp: Any, kind: str, dense_served: list[str], rng: np.random.Generator
    ) -> None:
        from _helpers import current

        backend = current().backend
        if not current().native or not backend.like(
            Backend.NUMPY, Backend.TORCH, Backend.JAX, Backend.DASK
        ):
            pytest.skip("only NumPy, PyTorch, JAX and Dask have dense fast paths (native on)")
        if backend.like(Backend.JAX) and kind == "binary":
            pytest.skip("JAX's general graph of the binary loss is its fast path")
        case = {"kind": kind, "shape": (6, 5), "axis": 1, "dtype": "float32",
                "weights": [(5,), None], "smoothing": 0.1, "reduction": "mean",
                "adversarial": False, "seed": 3}  # fmt: skip
        x, t, options = _dense_problem(xp, case)
        if backend.like(Backend.DASK):  # Dask's probability path takes the classes in one block
            x, t = x.rechunk({1: -1}), t.rechunk({1: -1})
        if getattr(getattr(x, "device", None), "type", "cpu") != "cpu":
            pytest.skip("PyTorch's dense fast paths serve the CPU")
        loss_fn, both_fn = _dense_calls(kind)
        name = "fused_prob_loss" if kind == "probs" else "fused_binary_loss"
        for calls in (1, 2):  # the second: the remembered checks (and plan) serve it again
            loss_fn(x, t, **options)
            count = dense_served.count(name)
            if backend.like(Backend.DASK):  # its blocks' NumPy losses count when computed
                assert count >= calls, dense_served
            elif current().traced:  # under jit the loss is traced once
                assert count == 1, dense_served
            else:
                assert count == calls, dense_served
        if backend.like(Backend.NUMPY, Backend.DASK):  # PyTorch and JAX users differentiate
            both_fn(x, t, **options)
            assert f"{name}_and_grad" in dense_served, dense_served
        if backend.like(Backend.NUMPY, Backend.TORCH):  # Dask's blocks, JAX's branch decide
            # An infinite logit: declined, the general path answers with its inf or NaN.
            served = len(dense_served)
            bad = to_numpy(x).astype(np.float64)
            bad[0, 0] = np.inf
            x_bad = to_xp(xp, bad, dtype="float32")
            ours, generic = _both(lambda: loss_fn(x_bad, t, **options))
            assert not np.isfinite(ours)
            np.testing.assert_array_equal(ours, generic)
            assert len(dense_served) == served, dense_served

    @pytest.mark.only_backends(Backend.TORCH)
    @pytest.mark.parametrize("kind", ["probs", "binary"])
    def test_torch_autograd_of_every_argument_matches_general_path(
        self, xp: Any, kind: str, rng: np.random.Generator
    ) -> None:
        # The logits, the targets and the weights, to the second order: ATen's losses
        # differentiate them all but the binary loss's weights, where the call declines.
        import torch

        case = {"kind": kind, "shape": (4, 3), "axis": 1, "dtype": "float64",
                "weights": [(3,), (1, 3)], "smoothing": 0.1, "reduction": "mean",
                "adversarial": False, "seed": 5}  # fmt: skip
        x, t, options = _dense_problem(xp, case)
        loss_fn, _ = _dense_calls(kind)
        args = [x, t, *(options[k] for k in ("weight", "pos_weight") if k in options)]
        names = [k for k in ("weight", "pos_weight") if k in options]

        def grads() -> Any:
            leaves = [a.detach().clone().requires_grad_(True) for a in args]
            opts = dict(options, **dict(zip(names, leaves[2:], strict=True)))
            loss = loss_fn(leaves[0], leaves[1], **opts)
            first = torch.autograd.grad(loss, leaves, create_graph=True)
            second = torch.autograd.grad(first[0].sum(), leaves[0])
            return torch.cat([g.reshape(-1) for g in (loss.reshape(1), *first, *second)])

        ours, generic = _both(grads)
        np.testing.assert_allclose(ours, generic, rtol=1e-10, atol=1e-12)

    @pytest.mark.only_backends(Backend.TORCH)
    def test_torch_blocks_match_general_path(
        self, xp: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # PyTorch's blocks (float32 stages of a block of rows, the gradient with the loss),
        # shrunk to a few elements so that every problem spans many: the loss, the gradient
        # under every reduction (a cotangent per position for "none"), and the second order
        # (rebuilt through ATen's whole-input entries).
        import torch
        from _helpers import current

        from xent.backends import _torch_dense

        if not current().native:
            pytest.skip("the blocks are a native override")
        monkeypatch.setattr(_torch_dense, "BLOCKS_FROM", 1)
        monkeypatch.setattr(_torch_dense, "_BINARY_F32_BLOCKS_FROM", 1)
        monkeypatch.setattr(_torch_dense, "BLOCK_ELEMENTS", 7)
        used: list[int] = []
        run = _torch_dense._run_blocks

        def counted(*args: Any, **kwargs: Any) -> Any:
            used.append(1)
            return run(*args, **kwargs)

        monkeypatch.setattr(_torch_dense, "_run_blocks", counted)

        @property_settings()
        @given(case=_dense_cases())
        def check(case: dict[str, Any]) -> None:
            case = dict(case, axis=len(case["shape"]) - 1)  # blocks take the classes last
            x, t, options = _dense_problem(xp, case)
            loss_fn, _ = _dense_calls(case["kind"])
            rtol = _DENSE_RTOL[case["dtype"]]
            cot = torch.from_numpy(np.random.default_rng(case["seed"]).random(64))

            def both() -> Any:
                leaf = x.detach().clone().requires_grad_(True)
                loss = loss_fn(leaf, t, **options)
                ct = cot[: loss.numel()].reshape(loss.shape).to(loss.dtype)
                (g,) = torch.autograd.grad(loss, leaf, ct)
                return torch.cat([loss.detach().reshape(-1).float(), g.reshape(-1).float()])

            ours, generic = _both(both)
            atol = rtol * max(1.0, float(np.max(np.abs(generic), initial=0.0,
                                                where=np.isfinite(generic))))  # fmt: skip
            np.testing.assert_allclose(
                ours, generic, rtol=rtol, atol=atol, equal_nan=True, err_msg=str(case)
            )

        check()
        assert used, "the blocks never served"
        x = torch.randn(5, 4, dtype=torch.float64)
        q = torch.softmax(torch.randn(5, 4, dtype=torch.float64), 1)
        for kind, target in (("probs", q), ("binary", torch.rand(5, 4, dtype=torch.float64))):
            loss_fn, _ = _dense_calls(kind)

            def second(loss_fn: Any = loss_fn, target: Any = target) -> Any:
                leaf = x.float().clone().requires_grad_(True)
                (g,) = torch.autograd.grad(loss_fn(leaf, target.float()), leaf, create_graph=True)
                (h,) = torch.autograd.grad((g * g).sum(), leaf)
                return torch.cat([g.detach().reshape(-1), h.reshape(-1)])

            ours, generic = _both(second)
            np.testing.assert_allclose(ours, generic, rtol=1e-4, atol=1e-6)

    @pytest.mark.only_backends(Backend.JAX)
    def test_jax_probability_loss_under_jit_vmap_and_grad(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        # Jit, vmap (one branch for every instance: a row with a masked class under zero mass
        # in one instance sends all of them to the selecting sum), and reverse mode of the
        # logits, the targets and the class weights.
        import jax
        import jax.numpy as jnp

        x_np = rng.normal(size=(3, 4, 5)) * 2
        t_np = rng.random((3, 4, 5)) * (rng.random((3, 4, 5)) < 0.7)
        t_np /= np.maximum(t_np.sum(-1, keepdims=True), 1e-9)
        zero = np.argwhere(t_np[1] == 0)[0]
        x_np[1][tuple(zero)] = -np.inf
        x, t = jnp.asarray(x_np, jnp.float32), jnp.asarray(t_np, jnp.float32)
        w = jnp.asarray(rng.random(5) + 0.5, jnp.float32)

        def loss(a: Any, b: Any, c: Any) -> Any:
            return xent.cross_entropy(a, b, weight=c, label_smoothing=0.0)

        def run() -> Any:
            batched = jax.jit(jax.vmap(loss, in_axes=(0, 0, None)))(x, t, w)
            finite = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x[0], t[0], w)
            return jnp.concatenate([batched, *(g.reshape(-1) for g in finite)])

        ours, generic = _both(run)
        assert np.isfinite(ours).all()
        np.testing.assert_allclose(ours, generic, rtol=2e-5, atol=1e-6)


# --- the softmax family ------------------------------------------------------------------------


class TestFusedSoftmax:
    """``logsumexp``, ``log_softmax`` and ``softmax`` from a backend's native kernel (ATen's,
    NumPy's blocked pass) give what the generic primitives give, rows of ``+inf``, NaN and
    ``-inf`` included (there the kernels decline), and stay differentiable."""

    def test_matches_general_path_on_random_arrays(self, xp: Any) -> None:
        @property_settings()
        @given(
            shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
            data=st.data(),
            dtype=st.sampled_from(["float32", "float64", "float16", "bfloat16"]),
            adversarial=st.booleans(),
            seed=st.integers(0, 2**32 - 1),
        )
        def check(
            shape: tuple[int, ...], data: Any, dtype: str, adversarial: bool, seed: int
        ) -> None:
            if not hasattr(xp, dtype):
                dtype = "float32"
            axis = data.draw(st.integers(-len(shape), len(shape) - 1))
            rng = np.random.default_rng(seed)
            x_np = rng.normal(size=shape) * 5
            if adversarial and x_np.size >= 4:
                flat = x_np.reshape(-1)
                low = -float(np.finfo(np.float16 if dtype == "float16" else np.float32).max)
                flat[rng.permutation(x_np.size)[:4]] = [np.inf, np.nan, -np.inf, low]
            x = to_xp(xp, x_np, dtype=dtype)
            rtol = {"float16": 4e-3, "bfloat16": 2e-2}.get(dtype, 1e-5)
            for fn in (xent.logsumexp, xent.log_softmax, xent.softmax):
                ours, generic = _both(lambda fn=fn: fn(x, axis=axis))
                assert ours.dtype == generic.dtype
                assert ours.shape == generic.shape
                np.testing.assert_allclose(
                    ours, generic, rtol=rtol, atol=rtol, equal_nan=True,
                    err_msg=f"{fn.__name__} {shape} axis {axis} {dtype}",
                )  # fmt: skip

        check()

    @pytest.mark.only_backends(Backend.TORCH, Backend.NUMPY)
    @pytest.mark.parametrize("shape", [(6, 5), (300, 400)], ids=["whole", "blocks"])
    def test_kernel_serves_finite_rows(
        self, xp: Any, shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from _helpers import current

        if not current().native:
            pytest.skip("the kernels are a native override")
        from xent.backends import _numpy_softmax

        if current().backend.like(Backend.TORCH):
            from xent.backends import _torch as module

            name = "_fused_softmax"
        else:
            module, name = _numpy_softmax, "fused"
        served: list[str] = []
        run = getattr(module, name)

        def counted(kind: str, *args: Any) -> Any:
            out = run(kind, *args)
            if out is not None:
                served.append(kind)
            return out

        monkeypatch.setattr(module, name, counted)
        x = to_xp(xp, np.random.default_rng(0).normal(size=shape), dtype="float32")
        for fn in (xent.log_softmax, xent.softmax):
            fn(x)
        assert served == ["log_softmax", "softmax"], served

    @pytest.mark.only_backends(Backend.TORCH)
    @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
    def test_torch_autograd_matches_general_path(self, xp: Any, dtype: str) -> None:
        import torch

        x_np = np.random.default_rng(1).normal(size=(5, 7))
        for fn in (xent.logsumexp, xent.log_softmax, xent.softmax):

            def grads(fn: Any = fn) -> Any:
                leaf = to_xp(xp, x_np, dtype=dtype).detach().requires_grad_(True)
                out = fn(leaf)
                (g,) = torch.autograd.grad((out.float() ** 2).sum(), leaf, create_graph=True)
                (h,) = torch.autograd.grad(g.float().sum(), leaf)
                return torch.cat([t.detach().float().reshape(-1) for t in (out, g, h)])

            ours, generic = _both(grads)
            rtol = 2e-2 if dtype == "bfloat16" else 1e-5
            np.testing.assert_allclose(ours, generic, rtol=rtol, atol=rtol)


# --- NumPy's fused pass across its thresholds --------------------------------------------------

NUMPY = pytest.mark.only_backends(Backend.NUMPY, Backend.NUMPY_READONLY)

_SHAPES = [
    (5, 7), (300, 7), (300, 10), (300, 16), (300, 20), (40, 100), (24, 300), (3, 5000), (300, 1000)
]  # fmt: skip
"""Narrow rows (transposed blocks; 10, 16 and 20 classes on either side of the forward's and the
gradient's limits in float32 and float64) and wide ones; the last spans two blocks as shipped,
and with the shrunk limits of ``numpy_limits`` each but the first spans many blocks and several
threads."""

_ND_SHAPES = [
    ((2, 5, 3), 1), ((4, 10, 64), 1), ((3, 7, 5, 6), 1), ((3, 4, 7, 6), 2), ((7, 3, 4), 0),
    ((300, 40), 0), ((50, 6, 10), 1), ((40, 100, 100), 1), ((2, 40, 8000), 1), ((5, 3, 1), 1),
]  # fmt: skip
"""Class axes that are not last, as ``(shape, axis)``, viewed as ``(A, C, B)``: below the
unshifted sums' size and above; as shipped one block each (but 2 x 40 x 8000: two in float64,
blocks of columns for a float16 gradient, which takes smaller blocks), with the shrunk limits of
``numpy_limits`` (float32) blocks of whole slabs (4 x 10 x 64, 50 x 6 x 10), blocks of columns
(2 x 40 x 8000), chunks of classes (40 x 100 x 100; 300 x 40 along axis 0, one slab whose
chunks the threads share), most over several threads; and trailing axes of size 1 (the rows of
the class axis last). ``test_blocks_as_shipped`` and ``test_many_classes_in_chunks`` split
inputs with the limits as shipped."""

_ND_IDS = [f"{'x'.join(map(str, shape))}-axis{axis}" for shape, axis in _ND_SHAPES]


@pytest.fixture
def slab_calls(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Counts the calls of the parts of NumPy's pass along a class axis that is not last: its
    blocks (``_slab_block``) and its passes over chunks of classes (``_chunk_pass``)."""
    from xent.backends import _numpy

    calls: collections.Counter[str] = collections.Counter()

    def counting(name: str) -> Callable[..., Any]:
        f = getattr(_numpy, name)

        def counted(*args: Any) -> Any:
            calls[name] += 1
            return f(*args)

        return counted

    for name in ("_slab_block", "_chunk_pass"):
        monkeypatch.setattr(_numpy, name, counting(name))
    return calls


@pytest.fixture(params=[False, True], ids=["real-limits", "small-blocks"])
def numpy_limits(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """The NumPy backend's block, thread and page limits, as shipped or shrunk to a few KiB (64
    bytes for the pages touched first) so that small inputs cross them."""
    if request.param:
        from xent.backends import _numpy

        monkeypatch.setattr(_numpy, "_BLOCK_BYTES", 4096)
        monkeypatch.setattr(_numpy, "_SLAB_BLOCK_BYTES", 4096)
        # Blocks of columns of one slab at least 16 float32 wide (at most 64 classes), else
        # chunks of classes.
        monkeypatch.setattr(_numpy, "_RUN_BYTES", 64)
        monkeypatch.setattr(_numpy, "_GRAD_RUN_BYTES", 64)
        monkeypatch.setattr(_numpy, "_NARROW_BLOCK_BYTES", 1024)
        monkeypatch.setattr(_numpy, "_PARALLEL_BYTES", 8192)
        monkeypatch.setattr(_numpy, "_UNSHIFTED_ELEMENTS", 256)
        # Fresh outputs are touched every 64 bytes first: each touched entry must be written.
        monkeypatch.setattr(_numpy, "_HUGE_PAGE_BYTES", 64)
    return bool(request.param)


def _calls(x: Any, y: Any, **options: Any) -> list[np.ndarray]:
    """Both public entry points of the fused pass: the loss alone, the loss and the gradient."""
    loss, grad = xent.cross_entropy_and_grad(x, y, **options)
    return [to_numpy(xent.cross_entropy(x, y, **options)), to_numpy(loss), to_numpy(grad)]


def _assert_like_general(
    x: Any, y: Any, rtol: float, atol: float | None = None, **options: Any
) -> list[np.ndarray]:
    """The calls with the native pass, then through the generic primitives: same values (to
    ``rtol``, and ``atol``, by default ``rtol / 100``), dtypes and shapes, the gradient
    C-contiguous."""
    ours = _calls(x, y, **options)
    previous = xent.backends.set_native(False)
    try:
        generic = _calls(x, y, **options)
    finally:
        xent.backends.set_native(previous)
    for a, b in zip(ours, generic, strict=True):
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        tol = rtol * 1e-2 if atol is None else atol
        np.testing.assert_allclose(a, b, rtol=rtol, atol=tol, equal_nan=True)
    assert ours[2].flags.c_contiguous
    return ours


def _numpy_native(xp: Any, **options: Any) -> tuple[Any, Any]:
    """NumPy's native backend for ``xp`` and the plain options (class axis 1, mean) with
    ``options`` replaced."""
    from xent.backends import IndexOptions
    from xent.backends._numpy import NativeBackend

    plain = IndexOptions(
        axis=1, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean"
    )
    return NativeBackend(xp), plain._replace(**options)


@NUMPY
class TestNumpyFusedPass:
    """NumPy's one-pass loss and gradient equal the general path on both sides of each limit."""

    @pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
    @pytest.mark.parametrize("shape", _SHAPES, ids=[f"{n}x{c}" for n, c in _SHAPES])
    def test_matches_general_path_across_limits(
        self,
        xp: Any,
        rng: np.random.Generator,
        numpy_limits: bool,
        shape: tuple[int, int],
        dtype: str,
    ) -> None:
        n, c = shape
        x_np = rng.normal(scale=4.0, size=shape)
        x = to_xp(xp, x_np, dtype=dtype)
        y = to_xp(xp, rng.integers(0, c, size=n))
        w = to_xp(xp, rng.random(c) + 0.5, dtype=dtype)
        rtol = 4 * float(np.finfo(dtype).eps) if dtype == "float16" else 1e-5
        for options in ({}, {"weight": w, "reduction": "none"}):
            ours = _assert_like_general(x, y, rtol, **options)
            assert ours[0].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(to_numpy(x), x_np.astype(dtype))  # never written

    @pytest.mark.parametrize("smoothing", [0.1, 1.0])
    @pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
    @pytest.mark.parametrize("shape", _SHAPES, ids=[f"{n}x{c}" for n, c in _SHAPES])
    def test_smoothing_matches_general_path_across_limits(
        self,
        xp: Any,
        rng: np.random.Generator,
        numpy_limits: bool,
        shape: tuple[int, int],
        dtype: str,
        smoothing: float,
    ) -> None:
        # Label smoothing in the same pass: with and without weights, every reduction, ignored
        # labels (-100, and an ignore_index that is a class), narrow and wide rows.
        n, c = shape
        x_np = rng.normal(scale=4.0, size=shape)
        x = to_xp(xp, x_np, dtype=dtype)
        y_np = rng.integers(0, c, size=n)
        w = to_xp(xp, rng.random(c) + 0.5, dtype=dtype)
        eps = float(np.finfo(dtype).eps)
        rtol = 4 * eps if dtype == "float16" else 1e-5
        ignored = y_np.copy()
        ignored[::3] = -100
        as_class = y_np.copy()
        as_class[1::4] = 2 % c
        for labels, ignore_index in ((y_np, -100), (ignored, -100), (as_class, 2 % c)):
            y = to_xp(xp, labels)
            for options in (
                {},
                {"weight": w},
                {"reduction": "sum"},
                {"weight": w, "reduction": "none"},
                {"reduction": "none"},
            ):
                # The gradient at the label cancels: some ulp of ~1 apart.
                ours = _assert_like_general(
                    x,
                    y,
                    rtol,
                    16 * eps,
                    label_smoothing=smoothing,
                    ignore_index=ignore_index,
                    **options,
                )
                assert ours[0].dtype == np.dtype(dtype)
                if options.get("reduction") == "none":
                    np.testing.assert_array_equal(ours[1][labels == ignore_index], 0.0)
                np.testing.assert_array_equal(ours[2][labels == ignore_index], 0.0)
        np.testing.assert_array_equal(to_numpy(x), x_np.astype(dtype))  # never written
        if xent.backends.native_enabled():  # served by the fused pass
            from xent.backends import IndexOptions

            ops = xent.backends.lookup(xp)
            options = IndexOptions(1, w, 2 % c, smoothing, "mean")
            assert ops.fused_index_loss(x, to_xp(xp, as_class), options) is not None
            assert ops.fused_index_loss_and_grad(x, to_xp(xp, as_class), options) is not None

    @pytest.mark.parametrize("smoothing", [0.1, 1.0])
    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    @pytest.mark.parametrize(
        ("shape", "axis"), [((40, 300), 1), ((300, 7), 1), ((3, 11, 9, 8), 1), ((5, 2, 600), 2)]
    )
    def test_smoothing_like_pytorch(
        self,
        xp: Any,
        rng: np.random.Generator,
        numpy_limits: bool,
        shape: tuple[int, ...],
        axis: int,
        reduction: str,
        smoothing: float,
    ) -> None:
        # torch.nn.functional.cross_entropy's loss with label_smoothing, and its autograd
        # gradient, in float64: with and without weights, ignore_index outside the classes and
        # inside them.
        torch = pytest.importorskip("torch")
        import torch.nn.functional as F

        c = shape[axis]
        x_np = rng.normal(scale=3.0, size=shape)
        y_np = rng.integers(0, c, size=shape[:axis] + shape[axis + 1 :])
        w_np = rng.random(c) + 0.5
        x = to_xp(xp, x_np)
        for ignore_index in (-100, 2):
            labels = y_np.copy()
            labels.reshape(-1)[::3] = ignore_index
            for w_ref in (None, w_np):
                xt = torch.tensor(np.moveaxis(x_np, axis, 1), requires_grad=True)
                want = F.cross_entropy(
                    xt,
                    torch.tensor(labels),
                    weight=None if w_ref is None else torch.tensor(w_ref),
                    ignore_index=ignore_index,
                    label_smoothing=smoothing,
                    reduction=reduction,
                )
                want.sum().backward()
                want_grad = np.moveaxis(xt.grad.numpy(), 1, axis)
                options = {
                    "axis": axis,
                    "weight": None if w_ref is None else to_xp(xp, w_ref),
                    "ignore_index": ignore_index,
                    "label_smoothing": smoothing,
                    "reduction": reduction,
                }
                y = to_xp(xp, labels)
                loss, grad = xent.cross_entropy_and_grad(x, y, **options)
                got = xent.cross_entropy(x, y, **options)
                for a in (got, loss):
                    np.testing.assert_allclose(
                        to_numpy(a), want.detach().numpy(), rtol=1e-12, atol=1e-14
                    )
                np.testing.assert_allclose(to_numpy(grad), want_grad, rtol=1e-12, atol=1e-15)

    @pytest.mark.parametrize("offset", [0.0, 30.0, 1000.0])
    @pytest.mark.parametrize(("shape", "axis"), [((64, 10), 1), ((64, 1000), 1), ((4, 300, 24), 1)])
    def test_smoothing_exact_for_logits_far_from_zero(
        self,
        xp: Any,
        rng: np.random.Generator,
        numpy_limits: bool,
        shape: tuple[int, ...],
        axis: int,
        offset: float,
    ) -> None:
        # The smoothing term sum_c w_c (lse - x_c) is summed from the shifted logits of the
        # block (not as W * lse - sum_c w_c x_c, which loses some log2(offset) bits): float32
        # within a few ulp of float64 however far the logits lie from 0, unshifted or shifted.
        c = shape[axis]
        x_np = (rng.normal(size=shape) + offset).astype(np.float32)
        y_np = rng.integers(0, c, size=shape[:axis] + shape[axis + 1 :])
        w_np = (rng.random(c) + 0.5).astype(np.float32)
        for weight in (None, w_np):
            options = {"axis": axis, "label_smoothing": 0.1, "reduction": "none"}
            want = ref.cross_entropy(x_np.astype(np.float64), y_np, weight=weight, **options)
            w = None if weight is None else to_xp(xp, weight)
            x, y = to_xp(xp, x_np), to_xp(xp, y_np)
            loss, _ = xent.cross_entropy_and_grad(x, y, weight=w, **options)
            for got in (xent.cross_entropy(x, y, weight=w, **options), loss):
                np.testing.assert_allclose(to_numpy(got), want, rtol=2e-6)

    @pytest.mark.parametrize("smoothing", [1e-20, 1e-33, 1e-40])
    @pytest.mark.parametrize("shape", [(50, 300), (3, 40, 50)])
    def test_tiny_smoothing_with_weights(
        self,
        xp: Any,
        rng: np.random.Generator,
        numpy_limits: bool,
        shape: tuple[int, ...],
        smoothing: float,
    ) -> None:
        # The weighted gradient divides by each position's e / C: where that would lose the
        # softmax's precision (a subnormal e / C, an overflowing ratio) the general path
        # answers instead; the loss and gradient are the general path's either way.
        c = shape[1]
        x = to_xp(xp, rng.normal(size=shape), dtype="float32")
        y = to_xp(xp, rng.integers(0, c, size=shape[:1] + shape[2:]))
        w = to_xp(xp, rng.random(c) + 0.5, dtype="float32")
        for reduction in ("mean", "none"):
            _assert_like_general(
                x, y, 1e-5, 1e-6, axis=1, weight=w, label_smoothing=smoothing, reduction=reduction
            )

    @pytest.mark.parametrize("dtype", ["float16", "float32"])
    def test_non_finite_positions_across_limits(
        self, xp: Any, rng: np.random.Generator, numpy_limits: bool, dtype: str
    ) -> None:
        # NaN, +inf and all -inf positions in the middle of a many-block input, a masked class
        # (the row stays finite; its -inf makes the smoothed loss inf), a label on it (+inf;
        # with smoothing 1 the general path leaves its inf out), an ignored NaN row: the loss
        # and gradient of the general path, in rows and slabs, with and without smoothing.
        rtol = 4 * float(np.finfo(dtype).eps) if dtype == "float16" else 1e-5
        for c in (7, 300):
            x_np = rng.normal(size=(64, c)).astype(dtype)
            y_np = rng.integers(0, c, size=64)
            x_np[20] = -np.inf
            x_np[33, 2] = np.inf
            x_np[40, 1] = np.nan
            x_np[50, 3] = -np.inf
            y_np[50] = 3
            x_np[60, 4] = np.nan
            y_np[60] = -100
            slabs = np.ascontiguousarray(x_np.reshape(4, 16, c).transpose(0, 2, 1))
            for smoothing in (0.0, 0.1, 1.0):
                for x, y, axis in ((x_np, y_np, 1), (slabs, y_np.reshape(4, 16), 1)):
                    options = {"axis": axis, "label_smoothing": smoothing, "reduction": "none"}
                    _assert_like_general(to_xp(xp, x), to_xp(xp, y), rtol, **options)
                    finite = np.isfinite(x).all(axis=axis)
                    if axis == 1 and x.ndim == 2:
                        _assert_like_general(
                            to_xp(xp, x[finite]), to_xp(xp, y[finite]), rtol, **options
                        )

    @pytest.mark.parametrize("label_dtype", ["int8", "uint8", "int64"])
    @pytest.mark.parametrize("classes", [10, 300])
    def test_ignored_labels(
        self,
        xp: Any,
        rng: np.random.Generator,
        numpy_limits: bool,
        classes: int,
        label_dtype: str,
    ) -> None:
        # int8 labels with 300 classes: a negative label read as unsigned lands inside [0, C).
        x = to_xp(xp, rng.normal(size=(60, classes)), dtype="float32")
        y_np = rng.integers(0, min(classes, 100), size=60)
        ignore_index = 255 if label_dtype == "uint8" else -100
        y_np[::3] = ignore_index
        y = to_xp(xp, y_np, dtype=label_dtype)
        w = to_xp(xp, rng.random(classes) + 0.5, dtype="float32")
        for options in ({}, {"weight": w}, {"reduction": "none"}):
            ours = _assert_like_general(x, y, 1e-5, ignore_index=ignore_index, **options)
            np.testing.assert_array_equal(ours[2][::3], 0.0)
        # Every row ignored: a NaN mean and a zero gradient, as PyTorch gives.
        everything = to_xp(xp, np.full(60, ignore_index), dtype=label_dtype)
        loss, _, grad = _assert_like_general(x, everything, 1e-5, ignore_index=ignore_index)
        assert np.isnan(loss)
        np.testing.assert_array_equal(grad, 0.0)

    @pytest.mark.parametrize("shape", [(60, 10), (60, 300), (3, 300, 7, 5)])
    def test_ignore_index_that_is_a_class(
        self, xp: Any, rng: np.random.Generator, numpy_limits: bool, shape: tuple[int, ...]
    ) -> None:
        # Served by the fused pass (its positions found by a comparison, not by the check of the
        # labels' range), rows and slabs; none of the labels equal to it, some, all; a label
        # outside the classes still raises.
        c = shape[1]
        x = to_xp(xp, rng.normal(size=shape), dtype="float32")
        y_np = rng.integers(0, c, size=shape[:1] + shape[2:])
        y_np[y_np == 4] = 5
        w = to_xp(xp, rng.random(c) + 0.5, dtype="float32")
        some = y_np.copy()
        some.reshape(-1)[::3] = 4
        for labels in (y_np, some, np.full_like(y_np, 4)):
            y = to_xp(xp, labels)
            for options in ({}, {"weight": w}, {"reduction": "none"}, {"reduction": "sum"}):
                ours = _assert_like_general(x, y, 1e-5, axis=1, ignore_index=4, **options)
                np.testing.assert_array_equal(np.moveaxis(ours[2], 1, -1)[labels == 4], 0.0)
        if xent.backends.native_enabled():
            from xent.backends import IndexOptions

            options = IndexOptions(1, None, 4, 0.0, "mean")
            assert (
                xent.backends.lookup(xp).fused_index_loss(x, to_xp(xp, some), options) is not None
            )
        bad = some.copy()
        bad.reshape(-1)[7] = -100
        for call in (xent.cross_entropy, xent.cross_entropy_and_grad):
            with pytest.raises(ValueError, match="label -100"):
                call(x, to_xp(xp, bad), axis=1, ignore_index=4)

    @pytest.mark.parametrize(
        ("label_dtype", "label"), [("int8", -1), ("int16", -7), ("int64", 150), ("uint8", 200)]
    )
    def test_invalid_labels_raise_xents_error(
        self, xp: Any, rng: np.random.Generator, numpy_limits: bool, label_dtype: str, label: int
    ) -> None:
        x = to_xp(xp, rng.normal(size=(40, 150)), dtype="float32")
        y_np = rng.integers(0, 100, size=40)
        if label_dtype != "uint8":
            y_np[7] = -100  # ignored: the fast path takes it, the bad label must still raise
        y_np[31] = label
        y = to_xp(xp, y_np, dtype=label_dtype)
        for call in (xent.cross_entropy, xent.cross_entropy_and_grad):
            with pytest.raises(ValueError, match=rf"label {label} at position \(31,\)"):
                call(x, y)

    def test_labels_in_either_byte_order(
        self, xp: Any, rng: np.random.Generator, numpy_limits: bool
    ) -> None:
        # The check of the labels reads them as unsigned in their own byte order.
        x = to_xp(xp, rng.normal(size=(40, 150)), dtype="float32")
        y_np = rng.integers(0, 150, size=40)
        want = _calls(x, to_xp(xp, y_np))
        for order in ("<", ">"):
            labels = y_np.astype(f"{order}i8")
            for a, b in zip(_calls(x, labels), want, strict=True):
                np.testing.assert_array_equal(a, b)
            labels[31] = -7
            for call in (xent.cross_entropy, xent.cross_entropy_and_grad):
                with pytest.raises(ValueError, match=r"label -7 at position \(31,\)"):
                    call(x, labels)

    @pytest.mark.parametrize("shape", [(7,), (2, 3, 7), (3, 2, 5, 300)])
    def test_rows_of_any_leading_shape(
        self, xp: Any, rng: np.random.Generator, numpy_limits: bool, shape: tuple[int, ...]
    ) -> None:
        x = to_xp(xp, rng.normal(size=shape), dtype="float32")
        y_np = rng.integers(0, shape[-1], size=shape[:-1])
        y = to_xp(xp, y_np)
        w = to_xp(xp, rng.random(shape[-1]) + 0.5, dtype="float32")
        for options in ({}, {"weight": w, "reduction": "none"}):
            loss, _, grad = _assert_like_general(x, y, 1e-5, **options)
            assert grad.shape == shape
            assert loss.shape == (y_np.shape if options else ())

    @pytest.mark.parametrize("dtype", ["float32", "float64"])
    def test_unshifted_sums_as_exact_as_shifted_ones(
        self, xp: Any, rng: np.random.Generator, numpy_limits: bool, dtype: str
    ) -> None:
        # Large blocks try exp(x) with no row max: confident rows (losses far below the size of
        # the logits, lost to cancellation in log(sum) - x[label]), label terms that underflow,
        # masked classes. Rows near the overflow of the sum or far below zero send their block
        # back to the shifted pass. Every row as exact as the shifted pass, against float64.
        eps = float(np.finfo(dtype).eps)
        big = 80.0 if dtype == "float32" else 700.0  # exp(big) is beyond the safe sums
        n, c = 96, 300
        x_np = rng.normal(size=(n, c))
        y_np = rng.integers(0, c, size=n)
        rows = np.arange(n)
        x_np[rows[::3], y_np[::3]] = rng.uniform(17, 18, size=32)  # confident: losses ~1e-5
        x_np[rows[1::12], y_np[1::12]] = -big * 0.75  # the label's exp below the threshold
        x_np[2, :50] = -np.inf
        y_np[2] = 60
        unsafe = x_np.copy()
        unsafe[5] += big
        unsafe[70] -= 2 * big
        for logits in (x_np.astype(dtype), unsafe.astype(dtype)):
            x, y = to_xp(xp, logits), to_xp(xp, y_np)
            want = ref.cross_entropy(logits, y_np, reduction="none")
            want_grad = ref.cross_entropy_grad(logits, y_np, reduction="none")
            loss, grad = xent.cross_entropy_and_grad(x, y, reduction="none")
            for got in (to_numpy(xent.cross_entropy(x, y, reduction="none")), to_numpy(loss)):
                np.testing.assert_allclose(got, want, rtol=4 * eps, atol=4 * eps)
            np.testing.assert_allclose(to_numpy(grad), want_grad, rtol=8 * eps, atol=4 * eps)

    def test_remembered_plan_gives_the_fused_loss(
        self, xp: Any, rng: np.random.Generator, numpy_limits: bool
    ) -> None:
        # The plan a caller may remember for arrays of these dtypes and shapes and these options
        # gives fused_index_loss's answer, and still refuses each call's bad layout or labels.
        ops, plain = _numpy_native(xp)
        x_np = rng.normal(size=(40, 300)).astype(np.float32)
        y_np = rng.integers(0, 300, size=40)
        ignored, invalid = y_np.copy(), y_np.copy()
        ignored[::4] = -100
        invalid[7] = 300
        x, y = to_xp(xp, x_np), to_xp(xp, y_np)
        for reduction in ("mean", "sum", "none"):
            options = plain._replace(reduction=reduction)
            plan = ops.fused_index_plan(x, y, options)
            assert plan is not None
            for labels in (y_np, ignored):
                t = to_xp(xp, labels)
                got = plan(x, t, None)
                want = ops.fused_index_loss(x, t, options)
                np.testing.assert_array_equal(to_numpy(got), to_numpy(want))
            np.testing.assert_allclose(
                to_numpy(plan(x, y, None)),
                ref.cross_entropy(x_np, y_np, reduction=reduction),
                rtol=1e-5,
            )
            assert plan(x, to_xp(xp, invalid), None) is None
            np.testing.assert_allclose(
                to_numpy(plan(to_xp(xp, np.asfortranarray(x_np)), y, None)),
                ref.cross_entropy(x_np, y_np, reduction=reduction),
                rtol=1e-5,
            )  # a Fortran-ordered matrix: one slab of its transpose
        # Smoothing, and an ignore_index that is a class, are served too.
        for served in ({"label_smoothing": 0.1}, {"ignore_index": 2}):
            options = plain._replace(**served)
            plan = ops.fused_index_plan(x, y, options)
            assert plan is not None
            np.testing.assert_array_equal(
                to_numpy(plan(x, y, None)), to_numpy(ops.fused_index_loss(x, y, options))
            )

    @pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
    @pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
    @pytest.mark.parametrize(("shape", "axis"), _ND_SHAPES, ids=_ND_IDS)
    def test_class_axis_not_last_matches_general_path(
        self,
        xp: Any,
        rng: np.random.Generator,
        numpy_limits: bool,
        slab_calls: collections.Counter[str],
        shape: tuple[int, ...],
        axis: int,
        dtype: str,
        smoothing: float,
    ) -> None:
        # Slabs, whole, in blocks of columns or in chunks of classes; with and without label
        # smoothing; no position ignored, some ignored at -100, some at a class.
        c = shape[axis]
        per_position = shape[:axis] + shape[axis + 1 :]
        x_np = rng.normal(scale=4.0, size=shape)
        x = to_xp(xp, x_np, dtype=dtype)
        y_np = rng.integers(0, c, size=per_position)
        some_np = y_np.copy()
        some_np.reshape(-1)[1::4] = -100
        y, some = to_xp(xp, y_np), to_xp(xp, some_np)
        as_class = to_xp(xp, np.where(some_np == -100, 1, some_np))
        w = to_xp(xp, rng.random(c) + 0.5, dtype=dtype)
        eps = float(np.finfo(dtype).eps)
        rtol = 4 * eps if dtype == "float16" else 1e-5
        for labels, options in (
            (y, {}),
            (y, {"reduction": "none"}),
            (some, {"weight": w, "reduction": "none"}),
            (some, {"weight": w, "reduction": "sum"}),
            (as_class, {"reduction": "none", "ignore_index": 1}),
            (as_class, {"weight": w, "ignore_index": 1}),
        ):
            # The gradient at the label, w (p - 1), cancels: a few ulp of the weight (<= 1.5)
            # apart where p is rounded differently (the smoothing's term adds some).
            ours = _assert_like_general(
                x, labels, rtol, (16 if smoothing else 8) * eps, axis=axis,
                label_smoothing=smoothing, **options,
            )  # fmt: skip
            assert ours[0].dtype == np.dtype(dtype)
            assert ours[2].shape == shape
            assert ours[0].shape == (per_position if options.get("reduction") == "none" else ())
        np.testing.assert_array_equal(to_numpy(x), x_np.astype(dtype))  # never written
        # The fused pass served them (not xent's general path), along the middle of (A, C, B)
        # where B > 1.
        if xent.backends.native_enabled() and math.prod(shape[axis + 1 :]) > 1:
            assert slab_calls

    @pytest.mark.parametrize(("shape", "axis"), _ND_SHAPES, ids=_ND_IDS)
    def test_class_axis_not_last_exact_in_float64(
        self,
        xp: Any,
        rng: np.random.Generator,
        numpy_limits: bool,
        shape: tuple[int, ...],
        axis: int,
    ) -> None:
        # Against the float64 reference, the gradient included; weights, reductions, ignored
        # positions (the mean's denominator their weights' sum).
        c = shape[axis]
        x_np = rng.normal(scale=4.0, size=shape)
        y_np = rng.integers(0, c, size=shape[:axis] + shape[axis + 1 :])
        y_np.reshape(-1)[1::4] = -100
        w_np = rng.random(c) + 0.5
        x, y, w = to_xp(xp, x_np), to_xp(xp, y_np), to_xp(xp, w_np)
        for reduction in ("mean", "sum", "none"):
            for weight, w_ref in ((None, None), (w, w_np)):
                options = {"axis": axis, "reduction": reduction}
                want = ref.cross_entropy(x_np, y_np, weight=w_ref, **options)
                want_grad = ref.cross_entropy_grad(x_np, y_np, weight=w_ref, **options)
                loss, grad = xent.cross_entropy_and_grad(x, y, weight=weight, **options)
                got = xent.cross_entropy(x, y, weight=weight, **options)
                for a in (got, loss):
                    np.testing.assert_allclose(to_numpy(a), want, rtol=1e-12, atol=1e-14)
                np.testing.assert_allclose(to_numpy(grad), want_grad, rtol=1e-12, atol=1e-14)
                assert np.all(np.moveaxis(to_numpy(grad), axis, -1).reshape(-1, c)[1::4] == 0)

    @pytest.mark.parametrize("shape", [(5, 100, 3000), (1, 20, 60000)], ids=["slabs", "columns"])
    def test_blocks_as_shipped(
        self,
        xp: Any,
        rng: np.random.Generator,
        slab_calls: collections.Counter[str],
        shape: tuple[int, int, int],
    ) -> None:
        # With the limits as shipped: whole slabs in two blocks (3 + 2 slabs), one slab in two
        # blocks of columns (too small for the threads; numpy_limits shrinks their limit).
        a, c, b = shape
        x = to_xp(xp, rng.normal(scale=3.0, size=shape), dtype="float32")
        y_np = rng.integers(0, c, size=(a, b))
        y_np[:, ::5] = -100
        y = to_xp(xp, y_np)
        w = to_xp(xp, rng.random(c) + 0.5, dtype="float32")
        _assert_like_general(x, y, 1e-5, 8e-7, axis=1, weight=w, reduction="none")
        if xent.backends.native_enabled():
            assert slab_calls == {"_slab_block": 2 + 2}  # the loss, the loss and its gradient

    @pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
    @pytest.mark.parametrize("dtype", ["float16", "float32"])
    @pytest.mark.parametrize("shape", [(1, 3000, 400), (1, 40000, 64)], ids=["3000", "40000"])
    def test_many_classes_in_chunks(
        self,
        xp: Any,
        rng: np.random.Generator,
        slab_calls: collections.Counter[str],
        shape: tuple[int, int, int],
        dtype: str,
        smoothing: float,
    ) -> None:
        # Slabs beyond the block whose columns would be narrow, as shipped: chunks of classes
        # for the loss (both), and for the gradient (40000 classes; 3000 take blocks of
        # columns); one slab split between the threads; with label smoothing, the chunks' sums
        # of the weighted logits. A column beyond the safe sums (a loss over 80) is computed
        # again by the blocks of columns. Against the float64 reference: the general path
        # sums the classes one after another (some 1e-5 off in float32).
        a, c, b = shape
        x_np = rng.normal(scale=3.0, size=shape).astype(dtype)
        y_np = rng.integers(0, c, size=(a, b))
        y_np[0, 3] = -100
        x_np[0, 7, 5] = 90.0
        y_np[0, 5] = 8
        w_np = (rng.random(c) + 0.5).astype(dtype)
        x, y, w = to_xp(xp, x_np), to_xp(xp, y_np), to_xp(xp, w_np)
        eps = float(np.finfo(dtype).eps)
        rtol = 4 * eps if dtype == "float16" else 1e-5
        if not xent.backends.native_enabled():
            rtol = max(rtol, 1e-4)  # the general path's sums, one class after another
        logits = x_np.astype(np.float64)
        m = logits.max(axis=1, keepdims=True)
        lse = np.log(np.exp(logits - m).sum(axis=1, keepdims=True)) + m
        kept = y_np != -100
        at = np.where(kept, y_np, 0)[:, None]
        p = np.exp(logits - lse)
        for weight, w_ref in ((None, np.ones(c)), (w, w_np.astype(np.float64))):
            wc = w_ref[None, :, None]
            on = (1 - smoothing) * w_ref[at[:, 0]] * kept
            spread = smoothing / c * kept
            want = on * (lse - np.take_along_axis(logits, at, axis=1))[:, 0]
            want += spread * (wc * (lse - logits)).sum(axis=1)
            a_n = on + spread * w_ref.sum()
            want_grad = a_n[:, None] * p - spread[:, None] * wc
            np.put_along_axis(
                want_grad, at, np.take_along_axis(want_grad, at, axis=1) - on[:, None], axis=1
            )
            options = {"axis": 1, "reduction": "none", "label_smoothing": smoothing}
            loss, grad = xent.cross_entropy_and_grad(x, y, weight=weight, **options)
            got = xent.cross_entropy(x, y, weight=weight, **options)
            for v in (got, loss):
                np.testing.assert_allclose(to_numpy(v), want, rtol=rtol, atol=4 * eps)
            np.testing.assert_allclose(to_numpy(grad), want_grad, rtol=rtol, atol=4 * eps)
        if xent.backends.native_enabled():
            assert slab_calls["_chunk_pass"] == (4 if c > 10000 else 2)
            if not smoothing:
                assert slab_calls["_slab_block"] >= (2 if c > 10000 else 3)
        # A NaN, and a position with every class masked: the general path's NaN.
        x_np[0, :, 9] = -np.inf
        x_np[a - 1, 4, b - 2] = np.nan
        x, y = to_xp(xp, x_np), to_xp(xp, y_np)
        _assert_like_general(x, y, rtol, axis=1, reduction="none")

    @pytest.mark.parametrize("label_dtype", ["int8", "uint8", "int64"])
    def test_class_axis_not_last_ignored_labels(
        self, xp: Any, rng: np.random.Generator, numpy_limits: bool, label_dtype: str
    ) -> None:
        x = to_xp(xp, rng.normal(size=(3, 300, 7, 5)), dtype="float32")
        y_np = rng.integers(0, 100, size=(3, 7, 5))
        ignore_index = 255 if label_dtype == "uint8" else -100
        y_np[:, ::3] = ignore_index
        y = to_xp(xp, y_np, dtype=label_dtype)
        w = to_xp(xp, rng.random(300) + 0.5, dtype="float32")
        for options in ({}, {"weight": w}, {"reduction": "none"}):
            ours = _assert_like_general(x, y, 1e-5, axis=1, ignore_index=ignore_index, **options)
            np.testing.assert_array_equal(ours[2][:, :, ::3], 0.0)
        # Every position ignored: a NaN mean and a zero gradient, as PyTorch gives.
        everything = to_xp(xp, np.full((3, 7, 5), ignore_index), dtype=label_dtype)
        loss, _, grad = _assert_like_general(x, everything, 1e-5, axis=1, ignore_index=ignore_index)
        assert np.isnan(loss)
        np.testing.assert_array_equal(grad, 0.0)

    @pytest.mark.parametrize(("label_dtype", "label"), [("int8", -1), ("int64", 300)])
    @pytest.mark.parametrize("axis", [0, 1, 2])
    def test_class_axis_not_last_invalid_labels_raise(
        self,
        xp: Any,
        rng: np.random.Generator,
        numpy_limits: bool,
        axis: int,
        label_dtype: str,
        label: int,
    ) -> None:
        # The error the general path raises, whichever axis holds the classes.
        shape = [9, 8, 7]
        shape[axis] = 150
        x = to_xp(xp, rng.normal(size=shape), dtype="float32")
        per_position = tuple(shape[:axis] + shape[axis + 1 :])
        y_np = rng.integers(0, 100, size=per_position)
        y_np[0, 1] = -100  # ignored: the fast path takes it, the bad label must still raise
        y_np[3, 5] = label
        y = to_xp(xp, y_np, dtype=label_dtype)
        for call in (xent.cross_entropy, xent.cross_entropy_and_grad):
            with pytest.raises(ValueError, match=rf"label {label} at position \(3, 5\)"):
                call(x, y, axis=axis)

    @pytest.mark.parametrize("dtype", ["float16", "float32"])
    def test_class_axis_not_last_non_finite_positions(
        self, xp: Any, rng: np.random.Generator, numpy_limits: bool, dtype: str
    ) -> None:
        # NaN, +inf and all -inf positions in the middle of a many-block input: the loss and
        # gradient of the general path (which the fused pass hands them back to).
        rtol = 4 * float(np.finfo(dtype).eps) if dtype == "float16" else 1e-5
        for c in (7, 300):
            x_np = rng.normal(size=(4, c, 30)).astype(dtype)
            y_np = rng.integers(0, c, size=(4, 30))
            x, y = to_xp(xp, x_np), to_xp(xp, y_np)
            _assert_like_general(x, y, rtol, axis=1, reduction="none")
            x_np[1, :, 20] = -np.inf
            x_np[2, 2, 7] = np.inf
            x_np[3, 1, 29] = np.nan
            x_np[0, 3, 5] = -np.inf  # masked class: the position stays finite
            y_np[0, 5] = 3  # the label on it: +inf
            x, y = to_xp(xp, x_np), to_xp(xp, y_np)
            _assert_like_general(x, y, rtol, axis=1, reduction="none")

    @pytest.mark.parametrize("dtype", ["float32", "float64"])
    def test_class_axis_not_last_unshifted_sums_exact(
        self, xp: Any, rng: np.random.Generator, numpy_limits: bool, dtype: str
    ) -> None:
        # As test_unshifted_sums_as_exact_as_shifted_ones, along axis 1 of (A, C, B): confident
        # positions, label terms that underflow (their logits read back from the input),
        # masked classes; blocks near the overflow of the sum or far below zero shifted. The
        # fused pass sums the classes pairwise, its error (and in float64 the reference's) up
        # to some log2(C) ulp, as the rows' pass (NumPy's pairwise sum) on the same positions;
        # the general path (NumPy's sum along an axis that is not the innermost) adds them one
        # after another, up to C ulp.
        eps = float(np.finfo(dtype).eps)
        tol = 16 * eps if xent.backends.native_enabled() else 300 * eps
        big = 80.0 if dtype == "float32" else 700.0  # exp(big) is beyond the safe sums
        a, c, b = 4, 300, 24
        x_np = rng.normal(size=(a, c, b))
        y_np = rng.integers(0, c, size=(a, b))
        i, j = np.divmod(np.arange(a * b), b)
        labels = y_np.reshape(-1)
        x_np[i[::3], labels[::3], j[::3]] = rng.uniform(17, 18, size=len(i[::3]))
        x_np[i[1::12], labels[1::12], j[1::12]] = -big * 0.75  # below the threshold
        x_np[0, :50, 2] = -np.inf
        y_np[0, 2] = 60
        unsafe = x_np.copy()
        unsafe[1, :, 5] += big
        unsafe[3, :, 22] -= 2 * big
        for logits in (x_np.astype(dtype), unsafe.astype(dtype)):
            x, y = to_xp(xp, logits), to_xp(xp, y_np)
            options = {"axis": 1, "reduction": "none"}
            want = ref.cross_entropy(logits, y_np, **options)
            want_grad = ref.cross_entropy_grad(logits, y_np, **options)
            loss, grad = xent.cross_entropy_and_grad(x, y, **options)
            for got in (to_numpy(xent.cross_entropy(x, y, **options)), to_numpy(loss)):
                np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
            np.testing.assert_allclose(to_numpy(grad), want_grad, rtol=2 * tol, atol=tol)

    def test_pairwise_class_sums(self, xp: Any, rng: np.random.Generator) -> None:
        # Every class count's halving (odd counts carry a row), in place and into a spare
        # buffer (which leaves the exponentials as they were).
        from xent.backends._numpy import _class_sum

        for c in [*range(1, 70), 100, 255, 1000]:
            e = rng.random((2, c, 3))
            want = e.sum(axis=1)
            kept = e.copy()
            total = np.empty((2, 3))
            _class_sum(e, total, np.empty((2, c // 2 + 1, 3)))
            np.testing.assert_array_equal(e, kept)
            np.testing.assert_allclose(total, want, rtol=1e-14)
            _class_sum(e, total, None)
            np.testing.assert_allclose(total, want, rtol=1e-14)

    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    def test_class_axis_not_last_like_pytorch(
        self, xp: Any, rng: np.random.Generator, numpy_limits: bool, reduction: str
    ) -> None:
        # PyTorch's (N, C, d1, d2) layout, its loss and gradient.
        torch = pytest.importorskip("torch")
        import torch.nn.functional as F

        x_np = rng.normal(scale=3.0, size=(3, 11, 9, 8))
        y_np = rng.integers(0, 11, size=(3, 9, 8))
        y_np[1, ::2] = -100
        w_np = rng.random(11) + 0.5
        xt = torch.tensor(x_np, requires_grad=True)
        want = F.cross_entropy(
            xt, torch.tensor(y_np), weight=torch.tensor(w_np), reduction=reduction
        )
        want.sum().backward()
        x, y, w = to_xp(xp, x_np), to_xp(xp, y_np), to_xp(xp, w_np)
        loss, grad = xent.cross_entropy_and_grad(x, y, axis=1, weight=w, reduction=reduction)
        np.testing.assert_allclose(to_numpy(loss), want.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(to_numpy(grad), xt.grad.numpy(), rtol=1e-12, atol=1e-15)
        got = xent.cross_entropy(x, y, axis=1, weight=w, reduction=reduction)
        np.testing.assert_allclose(to_numpy(got), want.detach().numpy(), rtol=1e-12)

    def test_class_axis_not_last_remembered_plan(
        self, xp: Any, rng: np.random.Generator, numpy_limits: bool
    ) -> None:
        # The plan for axis 1 of (A, C, B): fused_index_loss's answer, and a decline for each
        # call's bad layout or labels.
        ops, options = _numpy_native(xp, reduction="none")
        x_np = rng.normal(size=(6, 40, 50)).astype(np.float32)
        y_np = rng.integers(0, 40, size=(6, 50))
        invalid = y_np.copy()
        invalid[2, 7] = 40
        x, y = to_xp(xp, x_np), to_xp(xp, y_np)
        plan = ops.fused_index_plan(x, y, options)
        assert plan is not None
        np.testing.assert_array_equal(
            to_numpy(plan(x, y, None)), to_numpy(ops.fused_index_loss(x, y, options))
        )
        np.testing.assert_allclose(
            to_numpy(plan(x, y, None)),
            ref.cross_entropy(x_np, y_np, axis=1, reduction="none"),
            rtol=1e-5,
        )
        assert plan(x, to_xp(xp, invalid), None) is None
        # Other dense layouts are taken in their memory order (Fortran: slabs of the reversed
        # axes; classes last in memory: rows), the gradient in the input's own strides; a
        # layout with gaps declines.
        want = ref.cross_entropy(x_np, y_np, axis=1, reduction="none")
        want_grad = ref.cross_entropy_grad(x_np, y_np, axis=1, reduction="none")
        transposed = np.ascontiguousarray(x_np.transpose(0, 2, 1)).transpose(0, 2, 1)
        for layout in (np.asfortranarray(x_np), transposed):
            xl = to_xp(xp, layout)
            np.testing.assert_allclose(to_numpy(plan(xl, y, None)), want, rtol=1e-5)
            both = ops.fused_index_loss_and_grad(xl, y, options)
            assert both is not None
            np.testing.assert_allclose(to_numpy(both[0]), want, rtol=1e-5)
            np.testing.assert_allclose(to_numpy(both[1]), want_grad, rtol=1e-5, atol=1e-7)
            assert np.asarray(both[1]).strides == np.asarray(xl).strides
        gaps = to_xp(xp, np.repeat(x_np, 2, axis=2))[:, :, ::2]
        assert plan(gaps, y, None) is None
        assert ops.fused_index_loss_and_grad(gaps, y, options) is None

    def test_other_layouts_decline(self, xp: Any, rng: np.random.Generator) -> None:
        ops = xent.backends.lookup(xp)
        x = to_xp(xp, rng.normal(size=(6, 5)), dtype="float32")
        y = to_xp(xp, rng.integers(0, 3, size=6))
        plain = xent.backends.IndexOptions(
            axis=1, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean"
        )
        served = ops.fused_index_loss(x, y, plain) is not None
        assert served == xent.backends.native_enabled()
        x3, y3 = xp.reshape(x, (2, 3, 5)), xp.reshape(y, (2, 3))
        served = ops.fused_index_loss_and_grad(x3, y3, plain._replace(axis=2)) is not None
        assert served == xent.backends.native_enabled()
        for options in (
            plain._replace(label_smoothing=0.1),  # smoothing
            plain._replace(ignore_index=2),  # an ignore_index that is a class
        ):
            served = ops.fused_index_loss_and_grad(x, y, options) is not None
            assert served == xent.backends.native_enabled()
        # A transposed view is taken in its memory order; a view with gaps declines.
        transposed = xp.permute_dims(x, (1, 0))
        served = ops.fused_index_loss(transposed, y, plain._replace(axis=0)) is not None
        assert served == xent.backends.native_enabled()
        assert ops.fused_index_loss(x[:, ::2], y, plain) is None
        assert ops.fused_index_loss_and_grad(x[:, ::2], y, plain) is None

    def test_float16_logits_widen_exactly(self, xp: Any) -> None:
        # Float16 blocks are widened to float32 from their bits: every one of the 65536 values
        # (subnormals, signed zeros, infs and NaNs included) as NumPy's cast gives it, read in
        # the row layout or transposed.
        from xent.backends._numpy import _load

        every = np.arange(2**16, dtype=np.uint16).view(np.float16)
        finite = every[np.isfinite(every)]
        for values in (every, finite):
            for src in (values, values[: 2**15].reshape(128, 256).T):
                got = np.empty(src.shape, np.float32)
                _load(got, src)
                want = src.astype(np.float32)
                np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))

    def test_float16_gradient_rounds_as_numpys_cast(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        # The gradient's float16 subnormals are written from their bits (NumPy's cast of them
        # is slow); every one must be the value the cast gives, ties to even included.
        from xent.backends._numpy import _store

        k = np.arange(2048, dtype=np.float32)
        wide = rng.normal(size=4000) * 10.0 ** rng.uniform(-12, 5, size=4000)
        edges = [0.0, -0.0, np.nan, np.inf, -np.inf, 2.0**-14, 65504.0, 65520.0, 1e-45]
        v = np.concatenate([k * 2.0**-25, -(k + 0.5) * 2.0**-25, wide, edges]).astype(np.float32)
        rows = v[: 80 * 100].reshape(80, 100)
        for src in (v, rows.T):
            got = np.empty(src.shape, np.float16)
            with np.errstate(all="ignore"):
                _store(got, src)
                want = src.astype(np.float16)
            np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def _count_lean_graph(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that counts the traces of JAX's lean plain-loss graph from now on."""
    from xent.backends import _jax

    calls: list[int] = []
    lean = _jax._plain_loss

    def counted(*args: Any) -> Any:
        calls.append(1)
        return lean(*args)

    monkeypatch.setattr(_jax, "_plain_loss", counted)
    return calls


def _lean_graph_matches_general(
    monkeypatch: pytest.MonkeyPatch,
    f: Callable[..., Any],
    args: tuple[Any, ...],
    argnums: tuple[int, ...],
    dtype: str,
) -> None:
    """Under ``jit``, ``f(*args)`` alone (the forward), its value and its gradients in
    ``argnums`` are the general path's, and JAX's lean graph served them. The labels are an
    argument of each jit: traced, so unchecked (NaN where invalid)."""
    import jax

    calls = _count_lean_graph(monkeypatch)

    def call() -> Any:
        value, grads = jax.jit(jax.value_and_grad(f, argnums=argnums))(*args)
        parts = (jax.jit(f)(*args), value, *grads)
        return jax.numpy.concatenate([jax.numpy.ravel(p).astype("float32") for p in parts])

    ours, generic = _both(call)
    tol = 2e-2 if dtype == "bfloat16" else 1e-5
    np.testing.assert_allclose(ours, generic, rtol=tol, atol=tol, equal_nan=True)
    assert np.isfinite(ours).any()
    assert bool(calls) == xent.backends.native_enabled()  # the lean graph served them


@pytest.mark.only_backends(Backend.JAX)
class TestJaxFusedLoss:
    """The plain loss under ``jax.jit``: XLA's graph stays as lean as Optax's, with xent's rules."""

    @pytest.fixture(params=["as-shipped", "single-pass"])
    def forward_graph(self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
        """The forward's graphs by size as shipped (the small inputs of the forward tests take
        the row max), or the single-pass graphs at every size."""
        if request.param == "single-pass":
            from xent.backends import _jax

            monkeypatch.setattr(_jax, "_SMALL_ELEMENTS", 0)
        return str(request.param)

    @pytest.mark.parametrize(("n", "c", "branch"), [(256, 10, False), (128, 128, False), (256, 128, True), (4096, 10, True)])  # fmt: skip
    def test_forward_branches_only_beyond_small_inputs(
        self, xp: Any, rng: np.random.Generator, forward_graph: str, n: int, c: int, branch: bool
    ) -> None:
        # Small inputs take Optax's two passes with no conditional; larger ones the single pass
        # with its fallback branch (every size, with the single-pass setting).
        import jax

        x = to_xp(xp, rng.normal(size=(n, c)), dtype="float32")
        y = to_xp(xp, rng.integers(0, c, size=n), dtype="int32")
        previous = xent.backends.set_native(True)  # the override's graph, whatever the fixture
        try:
            graph = str(jax.make_jaxpr(lambda a, b: xent.cross_entropy(a, b))(x, y))
        finally:
            xent.backends.set_native(previous)
        assert ("cond[" in graph) == (branch or forward_graph == "single-pass")

    @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
    def test_forward_stores_no_logit_sized_temporary(
        self, xp: Any, rng: np.random.Generator, dtype: str
    ) -> None:
        import jax

        x = to_xp(xp, rng.normal(size=(64, 1024)), dtype=dtype)
        y = to_xp(xp, rng.integers(0, 1024, size=64))
        # The native override's graph, whichever setting the fixture chose.
        previous = xent.backends.set_native(True)
        try:
            graphs = [
                jax.jit(lambda a, b, r=reduction: xent.cross_entropy(a, b, reduction=r))
                .lower(x, y)
                .compile()
                for reduction in ("mean", "sum", "none")
            ]
        finally:
            xent.backends.set_native(previous)
        for reduction, compiled in zip(("mean", "sum", "none"), graphs, strict=True):
            # The exponentials are summed inside the reduction that reads the logits: no
            # shifted copy of them (256 KiB here) is ever stored, nor a float32 copy of
            # bfloat16 logits (which Optax's graph stores). float16 is not asked: XLA:CPU's
            # fused reductions take no float16, so its widened copy is stored either way.
            stats = compiled.memory_analysis()
            assert stats is not None
            temp = stats.temp_size_in_bytes
            assert temp < x.nbytes // 16, f"{reduction}: {temp} bytes of temporaries"

    @pytest.mark.parametrize("stacked_rows", [2**14, 0])
    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    def test_gradient_matches_general_path(
        self,
        xp: Any,
        rng: np.random.Generator,
        monkeypatch: pytest.MonkeyPatch,
        reduction: Literal["mean", "sum", "none"],
        stacked_rows: int,
    ) -> None:
        import jax

        from xent.backends import _jax

        monkeypatch.setattr(_jax, "_STACKED_ROWS", stacked_rows)

        x_np = rng.normal(size=(3, 4, 6)) * 3
        x_np[0, 1, 2] = -np.inf  # a masked class, off-target
        y_np = rng.integers(0, 6, size=(3, 4))
        y_np[0, 1] = 0
        y_np[1, :2] = 2  # ignored: ignore_index is a class here
        y_np[2, 3] = 7  # invalid, unchecked: a NaN row and NaN gradient
        x, y = to_xp(xp, x_np, dtype="float32"), to_xp(xp, y_np, dtype="int32")
        cot = to_xp(xp, rng.normal(size=(3, 4)), dtype="float32")

        def call() -> Any:
            def f(a: Any) -> Any:
                loss = xent.cross_entropy(a, y, ignore_index=2, reduction=reduction, validate=False)
                return jax.numpy.sum(loss * cot) if reduction == "none" else loss

            value, grad = jax.jit(jax.value_and_grad(f))(x)
            return jax.numpy.concatenate([jax.numpy.ravel(value), jax.numpy.ravel(grad)])

        ours, generic = _both(call)
        np.testing.assert_allclose(ours, generic, rtol=1e-5, atol=1e-7, equal_nan=True)
        grad = ours[-x_np.size :].reshape(x_np.shape)
        assert np.isnan(grad[2, 3]).all()
        assert np.isfinite(np.delete(grad.reshape(12, 6), 11, axis=0)).all()
        np.testing.assert_array_equal(grad[1, :2], 0.0)
        # The invalid row's NaN reaches the loss through every reduction.
        assert np.isnan(ours[: ours.size - x_np.size]).any()

    @pytest.mark.usefixtures("forward_graph")
    @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
    @pytest.mark.parametrize(
        ("shape", "axis"),
        # Rows of more than 100 classes gather the gradient's label term, shorter ones select it.
        [
            ((5, 7, 3), 1),
            ((5, 7, 3), 0),
            ((2, 40, 3, 2), 1),
            ((7, 3), 0),
            ((9,), 0),
            ((2, 130, 3), 1),
            ((4, 130), 1),
        ],
    )
    # Each reduction once, smoothing on and off (the product of the two took a minute of CI).
    @pytest.mark.parametrize(
        ("reduction", "smoothing"), [("mean", 0.2), ("sum", 0.0), ("none", 0.2), ("none", 0.0)]
    )
    def test_class_axis_anywhere_matches_general_path(
        self,
        xp: Any,
        rng: np.random.Generator,
        monkeypatch: pytest.MonkeyPatch,
        shape: tuple[int, ...],
        axis: int,
        dtype: str,
        reduction: Literal["mean", "sum", "none"],
        smoothing: float,
    ) -> None:
        # The lean graph reduces along the class axis where it lies (Optax's loss does too):
        # loss and gradient as on the general path, with a masked class, an ignored position,
        # an invalid label's NaN and, in the first, a row far above the unshifted sums' range.
        import jax

        x_np = rng.normal(size=shape) * 3
        classes = shape[axis]
        y_np = rng.integers(0, classes, size=shape[:axis] + shape[axis + 1 :])
        moved = np.moveaxis(x_np, axis, -1)  # a view: writes land in x_np
        if y_np.ndim:
            first = np.unravel_index(0, y_np.shape)
            last = np.unravel_index(y_np.size - 1, y_np.shape)
            moved[first][(y_np[first] + 1) % classes] = -np.inf
            moved[last][0] = 80.0  # unsafe unshifted sums: every row takes the row max
            y_np[last] = -100
            if y_np.size > 2:
                y_np[np.unravel_index(1, y_np.shape)] = classes + 3  # invalid, unchecked
        x = to_xp(xp, x_np, dtype=dtype)
        y = to_xp(xp, y_np, dtype="int32")
        cot = to_xp(xp, rng.normal(size=y_np.shape), dtype=dtype)

        def f(a: Any, b: Any) -> Any:
            loss = xent.cross_entropy(
                a, b, axis=axis, label_smoothing=smoothing, reduction=reduction
            )
            return jax.numpy.sum(loss * cot) if reduction == "none" else loss

        _lean_graph_matches_general(monkeypatch, f, (x, y), (0,), dtype)

    @pytest.mark.usefixtures("forward_graph")
    @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
    @pytest.mark.parametrize(("shape", "axis"), [((6, 5), 1), ((3, 130, 4), 1), ((2, 3, 7), -1)])
    # Each smoothing with and without an invalid label, each reduction twice (not the product).
    @pytest.mark.parametrize(
        ("reduction", "invalid", "smoothing"),
        [("mean", False, 0.0), ("sum", True, 0.0), ("none", False, 0.1), ("mean", True, 0.1),
         ("sum", False, 1.0), ("none", True, 1.0)],
    )  # fmt: skip
    def test_class_weights_match_general_path(
        self,
        xp: Any,
        rng: np.random.Generator,
        monkeypatch: pytest.MonkeyPatch,
        shape: tuple[int, ...],
        axis: int,
        dtype: str,
        reduction: Literal["mean", "sum", "none"],
        invalid: bool,
        smoothing: float,
    ) -> None:
        # Class weights scale each row by its label's weight and the mean divides by their
        # sum over the rows counted; label smoothing spreads a share over every class, each
        # by its weight; the rule differentiates the logits and the weights alike.
        import jax

        classes = shape[axis]
        x_np = rng.normal(size=shape) * 3
        y_np = rng.integers(
            0, classes, size=shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
        )
        flat = y_np.reshape(-1)
        flat[0] = -100  # ignored
        if invalid:
            flat[1] = classes + 2  # unchecked: NaN (the mean's too)
        x = to_xp(xp, x_np, dtype=dtype)
        y = to_xp(xp, y_np, dtype="int32")
        w = to_xp(xp, rng.random(classes) + 0.5, dtype="float32")
        cot = to_xp(xp, rng.normal(size=y_np.shape), dtype="float32")

        def f(a: Any, b: Any, c: Any) -> Any:
            loss = xent.cross_entropy(
                a, b, axis=axis, weight=c, label_smoothing=smoothing, reduction=reduction
            )
            return jax.numpy.sum(loss * cot) if reduction == "none" else loss

        _lean_graph_matches_general(monkeypatch, f, (x, y, w), (0, 2), dtype)

    @pytest.mark.parametrize(
        ("row", "dtype"),
        [
            ("finite", "float32"),
            ("masked-target", "float32"),
            ("logit-over-70", "float32"),
            ("logit-over-70", "bfloat16"),
            ("row-far-below-zero", "float32"),
            ("label-far-below", "float32"),
            ("confident", "float32"),
            ("logit-over-70", "float64"),
        ],
    )
    @pytest.mark.usefixtures("forward_graph")
    @pytest.mark.parametrize("classes", [40, 5])
    def test_forward_unshifted_falls_back_where_it_must(
        self, xp: Any, rng: np.random.Generator, row: str, dtype: str, classes: int
    ) -> None:
        # The forward sums exp(x) unshifted; a row whose sum is outside the safe range (a
        # logit above about 69 in float32, a row whose every logit is far below zero) sends
        # every row to the shift by the row max. A target at -inf (+inf loss), a label logit
        # too small to divide by and a confident row stay on the unshifted pass, exactly.
        # Ignored rows and invalid labels (NaN, infinite logits) never fall back, and their
        # losses stay 0 and NaN either way. Rows of 5 classes take the pass shifted by the
        # label's logit instead (few classes), whose safe sums are the finite ones: the same
        # rows come out the same.
        import jax

        if dtype == "float64" and not jax.config.jax_enable_x64:
            pytest.skip("float64 needs jax_enable_x64")
        x_np = rng.normal(size=(6, classes)) * 3
        y_np = rng.integers(0, classes, size=6)
        x_np[4, 0] = np.nan
        y_np[4] = -100  # ignored, with a NaN logit
        x_np[5, 2] = np.inf
        y_np[5] = classes + 4  # invalid, unchecked, with a +inf logit
        if row == "masked-target":
            x_np[0, y_np[0]] = -np.inf
        elif row == "logit-over-70":
            x_np[0] = 0.0
            x_np[0, (y_np[0] + 1) % classes] = 100.0 if dtype != "float64" else 700.0
        elif row == "row-far-below-zero":
            x_np[0] -= 60.0
        elif row == "label-far-below":
            x_np[0, y_np[0]] = -35.0
        elif row == "confident":
            x_np[0] = 0.0
            x_np[0, y_np[0]] = 12.0
        x = to_xp(xp, x_np, dtype=dtype)
        y = to_xp(xp, y_np, dtype="int32")
        loss = jax.jit(lambda a, b: xent.cross_entropy(a, b, reduction="none", validate=False))
        got = to_numpy(loss(x, y))
        want = ref.cross_entropy(to_numpy(x).astype(np.float64), y_np, reduction="none")
        want[4] = 0.0
        tol = {"bfloat16": 1e-2, "float32": 1e-6, "float64": 1e-12}[dtype]
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, equal_nan=True)
        assert np.isnan(got[5])
        assert np.isfinite(got[1:4]).all()
        if row == "masked-target":
            assert got[0] == np.inf

    @pytest.mark.usefixtures("forward_graph")
    def test_forward_under_vmap_falls_back_for_every_instance(
        self, xp: Any, rng: np.random.Generator
    ) -> None:
        # Under vmap the choice of shift is one for all instances (a branch, not a select
        # that computes both): an instance with a masked target sends all to the row max.
        import jax

        x_np = rng.normal(size=(3, 6, 5)) * 3
        y_np = rng.integers(0, 5, size=(3, 6))
        x_np[1, 2, y_np[1, 2]] = -np.inf
        x, y = to_xp(xp, x_np, dtype="float32"), to_xp(xp, y_np, dtype="int32")
        loss = jax.jit(jax.vmap(lambda a, b: xent.cross_entropy(a, b, reduction="none")))
        want = ref.cross_entropy(x_np, y_np, reduction="none")
        np.testing.assert_allclose(to_numpy(loss(x, y)), want, rtol=1e-5)
        np.testing.assert_allclose(to_numpy(loss(x[::2], y[::2])), want[::2], rtol=1e-5)

    @pytest.mark.parametrize("stacked_rows", [2**14, 0])
    def test_mean_counts_rows_along_every_batch_axis(
        self,
        xp: Any,
        rng: np.random.Generator,
        monkeypatch: pytest.MonkeyPatch,
        stacked_rows: int,
    ) -> None:
        # The losses and the rows counted are summed in one reduction of the two stacked (few
        # rows), or in two (many rows: here, every size).
        from xent.backends import _jax

        monkeypatch.setattr(_jax, "_STACKED_ROWS", stacked_rows)
        x_np = rng.normal(size=(3, 4, 5))
        y_np = rng.integers(0, 5, size=(3, 4))
        y_np[0, :3] = -100
        y_np[2, 1] = -100
        x, y = to_xp(xp, x_np, dtype="float32"), to_xp(xp, y_np)
        rows = ref.cross_entropy(x_np, y_np, reduction="none")
        want = rows.sum() / 8
        np.testing.assert_allclose(to_numpy(xent.cross_entropy(x, y)), want, rtol=1e-5)
        ours, generic = _both(lambda: xent.cross_entropy(x, y))
        np.testing.assert_allclose(ours, generic, rtol=1e-5)


@pytest.fixture(params=["pieces", "groups"])
def long_rows(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """JAX's sums of long rows on small inputs (``jax_long_rows``): "pieces" cuts them in
    pieces where their classes split, "groups" takes every such sum in groups of rows."""
    jax_long_rows(monkeypatch, pieces=request.param == "pieces")
    return str(request.param)


def _jaxpr_of(f: Callable[..., Any], *args: Any) -> str:
    import jax

    previous = xent.backends.set_native(True)
    try:
        return str(jax.make_jaxpr(f)(*args))
    finally:
        xent.backends.set_native(previous)


@pytest.mark.only_backends(Backend.JAX)
@pytest.mark.eager("the tests jit the calls themselves, and read the graphs they trace")
class TestJaxLongRows:
    """Sums along rows of many classes (XLA's CPU backend is slow at them from 2^15 classes
    and 256 rows on) are taken in pieces of the classes, or in groups of rows, with the very
    values of one sum: the losses, their gradients and the softmax family match the general
    path for class indices and probabilities, every option, float32 and bfloat16, rows of
    any leading shape, non-finite logits and ``vmap``."""

    @pytest.mark.parametrize("kind", ["full", "row", "class", "scalar"])
    @pytest.mark.parametrize("shape", [(8, 12), (2, 4, 12), (8, 13), (6, 13), (3, 12)])
    def test_row_sums_match_one_sum(
        self, xp: Any, rng: np.random.Generator, long_rows: str, kind: str, shape: tuple[int, ...]
    ) -> None:
        import jax
        import jax.numpy as jnp

        from xent.backends import _jax

        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        other = {
            "full": rng.normal(size=shape),
            "row": rng.normal(size=(*shape[:-1], 1)),
            "class": rng.normal(size=(1,) * (len(shape) - 1) + shape[-1:]),
            "scalar": np.float32(1.5),
        }[kind]
        o = jnp.asarray(other, jnp.float32)

        def f(a: Any, b: Any) -> Any:
            return jnp.exp(a - b) * b

        got = jax.jit(lambda a, b: _jax._row_sums(f, a, b, axis=len(shape) - 1))(x, o)
        want = jnp.sum(f(x, o), axis=-1)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
        plan = _jax._long_rows(shape, len(shape) - 1, pieces=kind != "class")
        graph = str(jax.make_jaxpr(lambda a, b: _jax._row_sums(f, a, b, axis=len(shape) - 1))(x, o))
        # Which way each shape takes: pieces where the 12 classes split (never with a
        # per-class operand), groups of rows where 8 or 6 rows split into 4 to 2.
        assert ("optimization_barrier" in graph) == (plan is not None and plan[0] == "piece")
        assert ("while" in graph or "scan" in graph) == (plan is not None and plan[0] == "group")
        assert (plan is None) == (shape[0] == 3 and (long_rows == "groups" or kind == "class"))

    @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
    @pytest.mark.parametrize(
        ("options", "target"),
        [
            ({}, "index"),
            ({"label_smoothing": 0.2, "ignore_index": 1}, "index"),
            ({"label_smoothing": 0.1, "weight": True}, "index"),
            ({"reduction": "none"}, "index"),
            ({}, "prob"),
            ({"label_smoothing": 0.1, "weight": True}, "prob"),
            # The general path: its log-sum-exp, smoothing share and probability terms.
            ({"z_loss": 1e-2, "label_smoothing": 0.1, "weight": True}, "index"),
            ({"softcap": 5.0, "label_smoothing": 0.2}, "index"),
            ({"softcap": 5.0, "label_smoothing": 0.2, "weight": True}, "prob"),
        ],
    )
    def test_losses_and_gradients_match_general_path(
        self,
        xp: Any,
        rng: np.random.Generator,
        monkeypatch: pytest.MonkeyPatch,
        long_rows: str,
        options: dict[str, Any],
        target: str,
        dtype: str,
    ) -> None:
        import jax
        import jax.numpy as jnp

        x_np = rng.normal(size=(2, 4, 12)) * 3
        x_np[0, 1, 5] = -np.inf  # a masked class
        x_np[1, 2, 0] = 90.0  # unsafe unshifted sums: every row takes the row max
        if target == "index":
            y_np = rng.integers(0, 12, size=(2, 4))
            y_np[1, 3] = 1
            y = jnp.asarray(y_np, jnp.int32)
        else:
            t_np = rng.random((2, 4, 12))
            t_np[0, 1, 5] = 0.0  # no mass at the masked class: a finite row (the exact branch)
            y = jnp.asarray(t_np / t_np.sum(-1, keepdims=True), dtype)
        x = jnp.asarray(x_np, dtype)
        kwargs = dict(options)
        if kwargs.pop("weight", False):
            kwargs["weight"] = jnp.asarray(rng.random(12) + 0.5, jnp.float32)
        cot = jnp.asarray(rng.normal(size=(2, 4)), dtype)

        def f(a: Any, b: Any) -> Any:
            loss = xent.cross_entropy(a, b, **kwargs)
            return jnp.sum(loss * cot) if loss.ndim else loss

        if target == "index" and not {"z_loss", "softcap"} & kwargs.keys():
            _lean_graph_matches_general(monkeypatch, f, (x, y), (0,), dtype)
        else:
            ours, generic = _both(
                lambda: jnp.concatenate(
                    [jnp.ravel(jax.jit(f)(x, y)), jnp.ravel(jax.jit(jax.grad(f))(x, y))]
                ).astype(jnp.float32)
            )
            tol = 2e-2 if dtype == "bfloat16" else 1e-5
            np.testing.assert_allclose(ours, generic, rtol=tol, atol=tol, equal_nan=True)
            assert np.isfinite(ours[1:]).all()  # the gradient (smoothing puts mass on -inf)
        # The native graphs (new functions: no trace of the calls above is reused) cut them.
        graph = _jaxpr_of(jax.value_and_grad(lambda a, b: f(a, b)), x, y)
        graph += _jaxpr_of(lambda a, b: f(a, b), x, y)
        assert "optimization_barrier" in graph or "while" in graph or "scan" in graph

    @pytest.mark.parametrize("name", ["logsumexp", "log_softmax", "softmax"])
    def test_softmax_family_matches_general_path(
        self, xp: Any, rng: np.random.Generator, long_rows: str, name: str
    ) -> None:
        import jax
        import jax.numpy as jnp

        x_np = rng.normal(size=(8, 12)) * 3
        x_np[2] = -np.inf
        x_np[3, 4] = np.inf
        x = jnp.asarray(x_np, jnp.float32)
        fn = getattr(xent, name)
        ours, generic = _both(lambda: jax.jit(fn)(x))
        np.testing.assert_allclose(ours, generic, rtol=1e-6, atol=1e-7, equal_nan=True)

    def test_vmap_of_the_loss(self, xp: Any, rng: np.random.Generator, long_rows: str) -> None:
        import jax
        import jax.numpy as jnp

        x_np = rng.normal(size=(3, 8, 12))
        y_np = rng.integers(0, 12, size=(3, 8))
        x_np[1, 2, y_np[1, 2]] = -np.inf  # one instance's masked target: all take the row max
        x, y = jnp.asarray(x_np, jnp.float32), jnp.asarray(y_np, jnp.int32)
        loss = jax.jit(jax.vmap(lambda a, b: xent.cross_entropy(a, b, label_smoothing=0.1)))
        want = [ref.cross_entropy(x_np[i], y_np[i], label_smoothing=0.1) for i in range(3)]
        np.testing.assert_allclose(np.asarray(loss(x, y)), want, rtol=1e-5)


# --- PyTorch CPU: the loss by blocks of rows ----------------------------------------------------

TORCH = pytest.mark.only_backends(Backend.TORCH)


@pytest.fixture
def torch_native() -> Iterator[None]:
    """Native overrides on (these tests are about them), whatever ``XENT_NATIVE`` says."""
    previous = xent.backends.set_native(True)
    yield
    xent.backends.set_native(previous)


def _count_fused_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that counts the calls of PyTorch's blocked fused loss from now on (plans
    remembered under other thresholds, which would not reach it, are forgotten)."""
    from xent.backends import _torch_rows

    calls: list[int] = []
    rows = _torch_rows.fused_rows

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return rows(*args, **kwargs)

    monkeypatch.setattr(_torch_rows, "fused_rows", counted)
    monkeypatch.setattr(xent._cross_entropy, "_CHECKED", {})
    return calls


def _channels_last(t: Any) -> Any:
    import torch

    return t.contiguous(memory_format=torch.channels_last)


_LAYOUTS: dict[str, tuple[tuple[int, ...], int, Callable[[Any], Any]]] = {
    # name: (shape drawn, class axis, the input made of a contiguous tensor of that shape)
    "slabs": ((5, 6, 11), 1, lambda t: t),
    "slab-columns": ((2, 4, 50), 1, lambda t: t),
    "4-d": ((2, 3, 5, 7), 1, lambda t: t),
    "classes-last": ((3, 4, 9), -1, lambda t: t),
    "classes-first": ((11, 13), 0, lambda t: t),
    "column-major": ((11, 13), 1, lambda t: t.T.contiguous().T),
    "channels-last": ((2, 5, 3, 4), 1, _channels_last),
    "permuted": ((4, 3, 6), 2, lambda t: t.permute(1, 0, 2).contiguous().permute(1, 0, 2)),
    "gaps": ((3, 5, 14), 1, lambda t: t[:, :, ::2]),
}
"""Layouts of PyTorch's blocked loss: rows (classes last, channels-last, permuted rows), slabs
(several to a block, one, or columns of one), and a tensor with gaps, which none serves."""


@pytest.fixture
def torch_rows(monkeypatch: pytest.MonkeyPatch, torch_native: None) -> list[int]:
    """PyTorch's blocked fused loss on small inputs: every 2-D float32/float16/bfloat16 input of
    more than 16 elements takes it, 64 elements to a block; the list counts its calls."""
    pytest.importorskip("torch")
    from xent.backends import _torch, _torch_rows

    calls = _count_fused_rows(monkeypatch)
    monkeypatch.setattr(_torch, "_FUSED_BYTES", 64)
    monkeypatch.setattr(_torch, "_HALF_ROWS_ELEMENTS", 16)
    monkeypatch.setattr(_torch_rows, "BLOCK_ELEMENTS", 64)
    return calls


def _torch_generic(fn: Callable[[], Any]) -> Any:
    previous = xent.backends.set_native(False)
    try:
        return fn()
    finally:
        xent.backends.set_native(previous)


@TORCH
class TestTorchRows:
    """The blocked fused loss (several blocks of rows, float16/bfloat16 cast per block) gives
    the generic path's loss and gradient, declines what it cannot serve, and raises xent's
    errors."""

    @pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    def test_blocks_match_general_path(
        self, torch_rows: list[int], rng: np.random.Generator, dtype: str, reduction: str
    ) -> None:
        import torch

        x_np = rng.normal(size=(13, 11)) * 4
        y_np = rng.integers(0, 11, size=13)
        y_np[[2, 9]] = 4  # ignored below
        x = torch.tensor(x_np, dtype=getattr(torch, dtype))
        y = torch.tensor(y_np)
        w = torch.tensor(rng.random(11) + 0.5, dtype=torch.float32)
        cot = None if reduction != "none" else torch.tensor(rng.random(13) + 0.5).to(x.dtype)
        tol = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-3}[dtype]
        for options in ({}, {"weight": w, "label_smoothing": 0.2, "ignore_index": 4}):

            def run(options: dict[str, Any] = options) -> tuple[Any, Any, Any]:
                xg = x.clone().requires_grad_(True)
                loss = xent.cross_entropy(xg, y, reduction=reduction, **options)
                (loss if cot is None else loss * cot).sum().backward()
                with torch.no_grad():
                    plain = xent.cross_entropy(x, y, reduction=reduction, **options)
                return loss.detach(), xg.grad, plain

            before = len(torch_rows)
            ours = run()
            assert len(torch_rows) >= before + 2  # with the gradient, then without
            generic = _torch_generic(run)
            for a, b in zip(ours, generic, strict=True):
                assert a.dtype == x.dtype
                np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=tol, atol=tol)

    @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
    @pytest.mark.parametrize("case", list(_LAYOUTS))
    def test_layouts_match_general_path(
        self, torch_rows: list[int], rng: np.random.Generator, dtype: str, case: str
    ) -> None:
        # Any class axis, any dense layout: rows or slabs of the caller's memory (slabs whole,
        # several to a block, or in blocks of columns), the per-position losses back in the
        # labels' shape and the gradient in the input's own strides.
        import torch

        shape, axis, make = _LAYOUTS[case]
        c = shape[axis]
        x = make(torch.tensor(rng.normal(size=shape) * 4, dtype=getattr(torch, dtype)))
        label_shape = tuple(s for i, s in enumerate(x.shape) if i != axis % x.ndim)
        y_np = rng.integers(0, c, size=label_shape)
        y_np.reshape(-1)[::4] = 2  # ignored below
        y = torch.tensor(y_np)
        w = torch.tensor(rng.random(c) + 0.5, dtype=torch.float32)
        cot = torch.tensor(rng.random(label_shape) + 0.5).to(x.dtype)
        tol = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
        dense = case != "gaps"
        kept = x.clone()
        for reduction in ("none", "mean", "sum"):
            for options in ({}, {"weight": w, "label_smoothing": 0.2, "ignore_index": 2}):

                def run(options: dict[str, Any] = options, r: str = reduction) -> tuple[Any, ...]:
                    xg = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).copy_(x)
                    xg.requires_grad_(True)
                    loss = xent.cross_entropy(xg, y, axis=axis, reduction=r, **options)
                    (loss * cot if r == "none" else loss).sum().backward()
                    with torch.no_grad():
                        plain = xent.cross_entropy(x, y, axis=axis, reduction=r, **options)
                    return loss.detach(), xg.grad, plain

                before = len(torch_rows)
                ours = run()
                assert len(torch_rows) >= before + 2 * dense
                assert ours[1].stride() == x.stride() or not dense
                generic = _torch_generic(run)
                for a, b in zip(ours, generic, strict=True):
                    assert a.dtype == x.dtype
                    assert a.shape == b.shape
                    np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=tol, atol=tol)
        assert torch.equal(x, kept)

    @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
    def test_column_major_input_gets_the_generic_gradient(
        self, torch_rows: list[int], rng: np.random.Generator, dtype: str
    ) -> None:
        import torch

        x = torch.tensor(rng.normal(size=(11, 13)), dtype=getattr(torch, dtype)).T
        y = torch.tensor(rng.integers(0, 11, size=13))

        def run() -> Any:
            xg = torch.empty_strided(x.shape, (1, 13), dtype=x.dtype).copy_(x)
            xent.cross_entropy(xg.requires_grad_(True), y).backward()
            return xg.grad

        ours = run()
        assert torch_rows
        tol = 1e-6 if dtype == "float32" else 1e-2
        np.testing.assert_allclose(to_numpy(ours), to_numpy(_torch_generic(run)), atol=tol)

    def test_switching_native_off_reaches_the_generic_path(
        self, torch_rows: list[int], rng: np.random.Generator
    ) -> None:
        import torch

        x = torch.tensor(rng.normal(size=(6, 5)), dtype=torch.float32)
        y = torch.tensor(rng.integers(0, 5, size=6))
        native = xent.cross_entropy(x, y)
        assert len(torch_rows) == 1
        generic = _torch_generic(lambda: xent.cross_entropy(x, y))
        assert len(torch_rows) == 1  # the remembered checks carry the backend they were made for
        np.testing.assert_allclose(to_numpy(native), to_numpy(generic), rtol=1e-6)

    def test_cotangent_and_double_backward(
        self, torch_rows: list[int], rng: np.random.Generator
    ) -> None:
        import torch

        x = torch.tensor(rng.normal(size=(9, 10)), dtype=torch.float32)
        y = torch.tensor(rng.integers(0, 10, size=9))
        v = torch.tensor(rng.normal(size=(9, 10)), dtype=torch.float32)

        def run() -> tuple[Any, Any]:
            xg = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(3.0 * xent.cross_entropy(xg, y), xg, create_graph=True)
            (h,) = torch.autograd.grad((g * v).sum(), xg)
            return g.detach(), h

        ours = run()
        assert torch_rows
        generic = _torch_generic(run)
        for a, b in zip(ours, generic, strict=True):
            np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-5, atol=1e-7)

    def test_bad_labels_raise_xent_errors_from_any_block(
        self, torch_rows: list[int], rng: np.random.Generator
    ) -> None:
        import torch

        x = torch.tensor(rng.normal(size=(12, 8)), dtype=torch.bfloat16)
        y = torch.tensor(rng.integers(0, 8, size=12))
        y[10] = 8  # in the second block of rows
        with pytest.raises(ValueError, match=r"label 8 at position \(10,\)"):
            xent.cross_entropy(x, y)
        loss = xent.cross_entropy(x, y, reduction="none", validate=False)
        assert torch_rows
        np.testing.assert_array_equal(np.isnan(to_numpy(loss)), np.arange(12) == 10)

    def test_non_finite_rows_decline_to_general_path(
        self, torch_rows: list[int], rng: np.random.Generator
    ) -> None:
        import torch

        x_np = _logits(rng, 12, 9)
        y_np = rng.integers(0, 9, size=12)
        y_np[4] = 0
        x, y = torch.tensor(x_np).to(torch.bfloat16), torch.tensor(y_np)
        for reduction in ("none", "mean"):
            ours = to_numpy(xent.cross_entropy(x, y, reduction=reduction))
            generic = to_numpy(
                _torch_generic(lambda r=reduction: xent.cross_entropy(x, y, reduction=r))
            )
            np.testing.assert_allclose(ours, generic, rtol=1e-2, equal_nan=True)
        assert torch_rows


def _plan_of(x: Any, y: Any, **options: Any) -> Any:
    """The fused plan remembered for a call like ``cross_entropy(x, y, **options)``; None where
    the backend has none (remembered as ``_declines``) or the call is not the plain case."""
    xent.cross_entropy(x, y, **options)
    defaults: dict[str, Any] = {
        "axis": -1, "from_logits": True, "weight": None, "sample_weight": None,
        "ignore_index": -100, "label_smoothing": 0.0, "reduction": "mean", "z_loss": 0.0,
        "softcap": None, "eps": 1e-7, "validate": None, "xp": None,
    }  # fmt: skip
    fused = xent._cross_entropy._check(x, y, **{**defaults, **options}).fused
    return None if fused is xent._cross_entropy._declines else fused


@TORCH
@pytest.mark.usefixtures("torch_native")
class TestTorchPlan:
    """The fused loss's decisions, remembered with the checks: taken where they apply, declined
    elsewhere, and every later call still checked where the key cannot vouch for it."""

    def test_taken_and_declined(self, rng: np.random.Generator) -> None:
        import torch

        x = torch.tensor(rng.normal(size=(6, 5)), dtype=torch.float32)
        y = torch.tensor(rng.integers(0, 5, size=6))
        assert _plan_of(x, y) is not None
        assert _plan_of(x, y, label_smoothing=0.1, reduction="sum") is not None
        assert _plan_of(x, y.to(torch.uint8)) is not None
        assert _plan_of(x.T.contiguous(), y, axis=0) is not None  # classes along axis 0
        assert _plan_of(x, y.to(torch.uint64)) is None
        assert _plan_of(x, y, z_loss=1e-3) is None
        assert _torch_generic(lambda: _plan_of(x, y)) is None

    def test_remembered_plan_with_weights_that_need_a_gradient(
        self, rng: np.random.Generator
    ) -> None:
        # The plan remembered for plain class weights declines, call by call, weights that
        # autograd records (ATen's kernel has no derivative for them, and F.cross_entropy
        # refuses them): xent's own path gives both gradients.
        import torch
        import torch.nn.functional as F

        x = torch.tensor(rng.normal(size=(10, 6)), dtype=torch.float32)
        y = torch.tensor(rng.integers(0, 6, size=10))
        w = torch.tensor(rng.random(6) + 0.5, dtype=torch.float32)
        assert _plan_of(x, y, weight=w) is not None
        xr = x.clone().requires_grad_(True)
        F.cross_entropy(xr, y, weight=w, label_smoothing=0.1).backward()

        def grads(wanted: bool) -> tuple[Any, Any]:
            xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(wanted)
            xent.cross_entropy(xg, y, weight=wg, label_smoothing=0.1).backward()
            return xg.grad, wg.grad

        for wanted in (True, False, True):
            xgrad, wgrad = grads(wanted)
            torch.testing.assert_close(xgrad, xr.grad)
            assert (wgrad is not None) == wanted
            if wanted:
                torch.testing.assert_close(wgrad, _torch_generic(lambda: grads(True))[1])

    def test_declined_plan_is_made_once(
        self, monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator
    ) -> None:
        # A remembered call that no plan serves goes straight to xent's own path: the backend
        # is not asked again (its answer depends on nothing the key does not hold).
        import torch

        from xent.backends import _torch

        asked: list[int] = []
        make = _torch.Native.fused_index_plan

        def counted(self: Any, *args: Any) -> Any:
            asked.append(1)
            return make(self, *args)

        monkeypatch.setattr(_torch.Native, "fused_index_plan", counted)
        monkeypatch.setattr(xent._cross_entropy, "_CHECKED", {})
        x = torch.tensor(rng.normal(size=(6, 5)), dtype=torch.float32)
        y = torch.tensor(rng.integers(0, 5, size=6), dtype=torch.uint64)
        want = xent.cross_entropy(x, y.long())
        asked.clear()
        for _ in range(3):
            torch.testing.assert_close(xent.cross_entropy(x, y), want)
        assert len(asked) == 1

    @pytest.mark.parametrize("smoothing", [0.0, 0.2])
    @pytest.mark.parametrize(
        ("route", "shape", "ignore", "dtype"),
        [("kernel", (4, 5), -100, "float32"), ("kernel", (4, 5, 3), -100, "float32"),
         ("kernel", (4, 5), 9, "float32"), ("kernel", (4, 5), -100, "bfloat16"),
         ("kernel", (5,), -100, "float32"), ("rows", (4, 5), -100, "float32"),
         ("rows", (4, 5, 3), 9, "float32"), ("rows", (4, 5), -100, "bfloat16")],
    )  # fmt: skip
    def test_ignored_row_holding_inf_or_nan(
        self,
        monkeypatch: pytest.MonkeyPatch,
        rng: np.random.Generator,
        route: str,
        shape: tuple[int, ...],
        ignore: int,
        dtype: str,
        smoothing: float,
    ) -> None:
        # An ignored row's gradient is 0 * softmax (0 at finite logits, NaN at +inf), as on the
        # generic path, not ATen's row of NaN; finite logits keep the fast path, ignored rows or
        # not (its log-probabilities tell, read after the forward), and so does -inf (a masked
        # class) without smoothing (with it, the spread over a masked class of a row not
        # ignored is +inf: the loss is not finite, and such calls take the general path). One
        # row alone is ignored: summed, its loss is 0 (its mean would be NaN, which takes the
        # general path too).
        import torch

        from xent.backends import _torch

        if route == "rows":  # the blocked route
            monkeypatch.setattr(_torch, "_FUSED_BYTES", 16)
            monkeypatch.setattr(_torch, "_GRAD_ROWS_ELEMENTS", 16)
            monkeypatch.setattr(_torch, "_HALF_ROWS_ELEMENTS", 16)
        monkeypatch.setattr(xent._cross_entropy, "_CHECKED", {})
        general: list[int] = []
        problem = xent._cross_entropy._problem

        def counted(*args: Any, **kwargs: Any) -> Any:
            general.append(1)
            return problem(*args, **kwargs)

        monkeypatch.setattr(xent._cross_entropy, "_problem", counted)
        x = rng.normal(size=shape).astype(np.float32)
        if len(shape) == 1:  # one row, its label 0-d: ignored
            y = np.asarray(ignore)
            x[1], x[3] = np.inf, -np.inf
        else:
            y = rng.integers(0, 5, size=(shape[0], *shape[2:]))
            y[0], y[2] = ignore, ignore
            x[0, 1], x[2, 3], x[1, 0] = np.inf, np.nan, -np.inf
        axis = 0 if len(shape) == 1 else 1
        masked = np.where(np.isfinite(x), x, -np.inf)
        finite = np.nan_to_num(x, nan=0.0, posinf=50.0, neginf=-50.0)
        for value, fast in ((x, False), (masked, not smoothing or axis == 0), (finite, True)):
            grads = []
            for native in (True, False):
                xt = torch.tensor(value).to(getattr(torch, dtype)).requires_grad_(True)
                previous = xent.backends.set_native(native)
                general.clear()
                try:
                    xent.cross_entropy(
                        xt, torch.tensor(y), axis=axis, ignore_index=ignore,
                        label_smoothing=smoothing, reduction="sum" if axis == 0 else "mean",
                    ).backward()  # fmt: skip
                finally:
                    xent.backends.set_native(previous)
                if native:
                    assert bool(general) != fast
                assert xt.grad is not None
                grads.append(xt.grad.float().numpy())
            np.testing.assert_allclose(grads[0], grads[1], rtol=1e-2, atol=1e-3)
            if len(shape) > 1:
                assert np.isfinite(grads[0][1]).all()

    def test_later_calls_still_raise_and_check(self, rng: np.random.Generator) -> None:
        import torch

        x = torch.tensor(rng.normal(size=(8, 5)), dtype=torch.float32)
        y = torch.tensor(rng.integers(0, 5, size=8))
        assert _plan_of(x, y) is not None
        bad = y.clone()
        bad[3] = 5
        with pytest.raises(ValueError, match=r"label 5 at position \(3,\)"):
            xent.cross_entropy(x, bad)
        assert np.isnan(to_numpy(xent.cross_entropy(x, bad, validate=False)))
        with pytest.raises(TypeError, match="all arrays must be on one device"):
            xent.cross_entropy(x, y.to("meta"))
        with pytest.raises(TypeError, match=r"`input` must be a plain dense array.*sparse"):
            xent.cross_entropy(x.to_sparse(), y)

    def test_subclass_and_vmapped_target_give_the_generic_loss(
        self, rng: np.random.Generator
    ) -> None:
        import torch

        class Logits(torch.Tensor):
            pass

        x = torch.tensor(rng.normal(size=(8, 5)), dtype=torch.float32)
        ys = torch.tensor(rng.integers(0, 5, size=(3, 8)))
        want = torch.stack([_torch_generic(lambda t=t: xent.cross_entropy(x, t)) for t in ys])
        xent.cross_entropy(x, ys[0])  # the plain call's plan is remembered
        got = torch.func.vmap(lambda t: xent.cross_entropy(x, t))(ys)
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), rtol=1e-6)
        sub = x.as_subclass(Logits)
        for _ in range(2):
            loss = xent.cross_entropy(sub, ys[1])
            np.testing.assert_allclose(float(loss), float(want[1]), rtol=1e-6)

    @pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
    @pytest.mark.parametrize("block", [2**20, 512])
    def test_half_equals_float32_cast_back(
        self, monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator, dtype: str, block: int
    ) -> None:
        # Below and above the threshold (one block, several), each reduction: the loss and the
        # gradient are PyTorch's float32 ones rounded once, to the bit; the input is unchanged.
        import torch
        import torch.nn.functional as F

        from xent.backends import _torch, _torch_rows

        monkeypatch.setattr(_torch_rows, "BLOCK_ELEMENTS", block)
        half = getattr(torch, dtype)
        y = torch.tensor(rng.integers(0, 300, size=40))
        y[5] = -100
        for shape in ((40, 300), (40, 7)):
            x = torch.tensor(rng.normal(size=shape) * 4).to(half)
            y = y.clamp(max=shape[1] - 1) if shape[1] < 300 else y
            kept = x.clone()
            for limit in (2**18, 0):
                monkeypatch.setattr(_torch, "_HALF_ROWS_ELEMENTS", limit)
                monkeypatch.setattr(xent._cross_entropy, "_CHECKED", {})
                for reduction in ("mean", "sum", "none"):
                    xg = x.clone().requires_grad_(True)
                    loss = xent.cross_entropy(xg, y, reduction=reduction)
                    loss.sum().backward()
                    xf = x.float().requires_grad_(True)
                    want = F.cross_entropy(xf, y, reduction=reduction)
                    want.sum().backward()
                    assert loss.dtype == half
                    assert torch.equal(loss.detach(), want.detach().to(half))
                    assert xg.grad is not None
                    assert xf.grad is not None
                    assert torch.equal(xg.grad, xf.grad.to(half))
                    with torch.no_grad():
                        plain = xent.cross_entropy(x, y, reduction=reduction)
                    assert torch.equal(plain, want.detach().to(half))
            assert torch.equal(x, kept)


# --- PyTorch under torch.compile: the plain loss as one fused graph -----------------------------

_NO_JIT_DEPRECATION = pytest.mark.filterwarnings(
    # inductor's import of torch.utils.mkldnn decorates with the deprecated torch.jit.script_method
    r"ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)


@pytest.fixture(params=["kernel", "rows"])
def workspace_route(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, torch_native: None
) -> str:
    """A fresh kept buffer and no remembered plans; ``rows``: every 2-D input of more than 16
    elements takes the blocks of rows. The route's name."""
    pytest.importorskip("torch")
    from xent.backends import _torch, _torch_workspace

    if request.param == "rows":
        monkeypatch.setattr(_torch, "_FUSED_BYTES", 16)
        monkeypatch.setattr(_torch, "_HALF_ROWS_ELEMENTS", 16)
    monkeypatch.setattr(xent._cross_entropy, "_CHECKED", {})
    monkeypatch.setattr(_torch_workspace, "_WORKSPACE", _torch_workspace._Workspace())
    return str(request.param)


@TORCH
@pytest.mark.usefixtures("torch_native")
class TestTorchWorkspace:
    """The float32 temporaries of PyTorch's fused loss (a float16/bfloat16 input's float32 copy,
    the blocks' log-probabilities) live in a buffer each thread keeps between calls: nothing
    returned aliases it, threads do not share it, and a request over its cap gets a new tensor."""

    @pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
    def test_results_outlive_later_calls(
        self, rng: np.random.Generator, workspace_route: str, dtype: str
    ) -> None:
        import torch
        import torch.nn.functional as F

        from xent.backends import _torch_workspace

        route = workspace_route
        half = getattr(torch, dtype)
        xs = [torch.tensor(rng.normal(size=(40, 300)) * 3).to(half) for _ in range(3)]
        y = torch.tensor(rng.integers(0, 300, size=40))
        kept = []
        for x in xs:  # the same shape each time: the same view of the kept buffer
            xg = x.clone().requires_grad_(True)
            rows = xent.cross_entropy(x, y, reduction="none")
            loss = xent.cross_entropy(xg, y)
            loss.backward()
            assert xg.grad is not None
            kept.append((rows, loss, xg.grad))
        for x, (rows, loss, grad) in zip(xs, kept, strict=True):
            xf = x.float().requires_grad_(True)
            want = F.cross_entropy(xf, y)
            want.backward()
            assert xf.grad is not None
            assert grad is not None
            assert torch.equal(rows, F.cross_entropy(x.float(), y, reduction="none").to(half))
            assert torch.equal(loss.detach(), want.detach().to(half))
            assert torch.equal(grad, xf.grad.to(half))
        buffer = _torch_workspace._WORKSPACE.buffer
        if route == "kernel" and dtype == "float32":
            assert buffer is None  # ATen's entry itself: no temporary of xent's
            return
        assert buffer is not None
        assert buffer.numel() == _torch_workspace._WORKSPACE_BYTES
        # Nothing returned shares the kept buffer's memory.
        base = buffer.untyped_storage().data_ptr()
        for arrays in kept:
            for a in arrays:
                assert a.untyped_storage().data_ptr() != base

    @pytest.mark.usefixtures("workspace_route")
    def test_inference_mode_and_normal_mode_share_it(self, rng: np.random.Generator) -> None:
        # A buffer or view first made under torch.inference_mode() would be an inference
        # tensor, which a later call in normal mode may not write: it is made outside it.
        import torch
        import torch.nn.functional as F

        from xent.backends import _torch_workspace

        x = torch.tensor(rng.normal(size=(40, 300)) * 3).bfloat16()
        y = torch.tensor(rng.integers(0, 300, size=40))
        xf = x.float().requires_grad_(True)
        want = F.cross_entropy(xf, y)
        want.backward()
        assert xf.grad is not None
        for first_inference in (True, False, True):
            with torch.inference_mode(first_inference):
                assert torch.equal(xent.cross_entropy(x, y), want.detach().bfloat16())
            xg = x.clone().requires_grad_(True)
            loss = xent.cross_entropy(xg, y)
            loss.backward()
            assert torch.equal(loss.detach(), want.detach().bfloat16())
            assert xg.grad is not None
            assert torch.equal(xg.grad, xf.grad.bfloat16())
        buffer = _torch_workspace._WORKSPACE.buffer
        assert buffer is not None
        assert not buffer.is_inference()
        # Every call took the fused plan: none was sent back to xent's own path.
        (checked,) = (c for c in xent._cross_entropy._CHECKED.values() if c.fused is not None)
        assert checked.fused is not None
        assert checked.fused(x, y, None) is not None

    def test_threads_keep_buffers_of_their_own(self, rng: np.random.Generator) -> None:
        import threading
        from concurrent.futures import ThreadPoolExecutor

        import torch
        import torch.nn.functional as F

        from xent.backends import _torch_workspace

        xs = [torch.tensor(rng.normal(size=(64, 500)) * 3).bfloat16() for _ in range(4)]
        y = torch.tensor(rng.integers(0, 500, size=64))
        want = [F.cross_entropy(x.float(), y, reduction="none").bfloat16() for x in xs]

        # Each task waits for the others, so that four threads run them (a pool thread that
        # finished its task early could otherwise take a second one).
        together = threading.Barrier(4, timeout=60)

        def work(i: int) -> tuple[bool, int]:
            together.wait()
            same = all(
                torch.equal(xent.cross_entropy(xs[(i + k) % 4], y, reduction="none"),
                            want[(i + k) % 4])
                for k in range(200)
            )  # fmt: skip
            buffer = _torch_workspace._WORKSPACE.buffer
            assert buffer is not None
            return same, buffer.data_ptr()

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(work, range(4)))
        assert all(same for same, _ in answers)
        assert len({pointer for _, pointer in answers}) == 4

    def test_request_over_the_cap_gets_a_new_tensor(
        self, monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator
    ) -> None:
        import torch
        import torch.nn.functional as F

        from xent.backends import _torch_workspace

        monkeypatch.setattr(_torch_workspace, "_WORKSPACE_BYTES", 4096)
        monkeypatch.setattr(_torch_workspace, "_WORKSPACE", _torch_workspace._Workspace())
        small = _torch_workspace.work((16, 16), torch.float32)
        assert small.data_ptr() == _torch_workspace.work((16, 16), torch.float32).data_ptr()
        second = _torch_workspace.work((16, 16), torch.float32, offset=1024)
        assert second.data_ptr() == small.data_ptr() + 1024
        large = _torch_workspace.work((40, 300), torch.float32)
        buffer = _torch_workspace._WORKSPACE.buffer
        assert buffer is not None
        assert buffer.numel() == 4096
        assert large.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
        # The loss itself, with most temporaries over the cap.
        monkeypatch.setattr(xent._cross_entropy, "_CHECKED", {})
        x = torch.tensor(rng.normal(size=(40, 300))).bfloat16()
        y = torch.tensor(rng.integers(0, 300, size=40))
        assert torch.equal(xent.cross_entropy(x, y), F.cross_entropy(x.float(), y).bfloat16())

    def test_float32_gradient_takes_the_blocks(
        self, monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator
    ) -> None:
        # From _GRAD_ROWS_ELEMENTS on, a float32 call that autograd records takes the blocks
        # (one array of the input's size per call, the gradient); without autograd, ATen's entry.
        import torch
        import torch.nn.functional as F

        from xent.backends import _torch

        calls = _count_fused_rows(monkeypatch)
        monkeypatch.setattr(_torch, "_GRAD_ROWS_ELEMENTS", 1000)
        x = torch.tensor(rng.normal(size=(40, 300)), dtype=torch.float32)
        y = torch.tensor(rng.integers(0, 300, size=40))
        assert torch.equal(xent.cross_entropy(x, y), F.cross_entropy(x, y))
        assert not calls
        xg, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        xent.cross_entropy(xg, y, label_smoothing=0.1).backward()
        F.cross_entropy(xf, y, label_smoothing=0.1).backward()
        assert calls
        assert xg.grad is not None
        assert xf.grad is not None
        np.testing.assert_allclose(to_numpy(xg.grad), to_numpy(xf.grad), rtol=1e-5, atol=1e-8)


@pytest.fixture
def dynamo_reset() -> Iterator[None]:
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_problem(rng: np.random.Generator, dtype: Any, adversarial: bool) -> tuple[Any, ...]:
    """Logits (9 x 6), labels and class weights; adversarial: every non-finite row kind, a
    label on a -inf logit, an invalid label, and an ignored row of NaN."""
    import torch

    x_np = _logits(rng, 9, 6) if adversarial else rng.normal(size=(9, 6)).astype(np.float32) * 3
    y_np = rng.integers(0, 6, size=9)
    y_np[[6, 7]] = 2  # ignored: ignore_index is a class here
    if adversarial:
        y_np[4] = 0  # the label sits on a -inf logit: +inf
        y_np[8] = 6  # invalid, unchecked: a NaN row and a NaN gradient row
        x_np[7] = np.nan  # ignored: loss 0, gradient NaN (0 times its softmax)
    w = torch.tensor(rng.random(6) + 0.5, dtype=torch.float32)
    return torch.tensor(x_np).to(dtype), torch.tensor(y_np), w


def _reductions(axis: int, smoothing: tuple[float, float, float]) -> Callable[..., Any]:
    """The loss under each reduction (``none``, ``mean``, ``sum``), smoothed as given."""

    def losses(x: Any, y: Any, w: Any) -> Any:
        return tuple(
            xent.cross_entropy(
                x,
                y,
                axis=axis,
                weight=w,
                reduction=r,
                label_smoothing=e,
                ignore_index=2,
                validate=False,
            )
            for r, e in zip(("none", "mean", "sum"), smoothing, strict=True)
        )

    return losses


def _with_grad(f: Callable[..., Any], x: Any, y: Any, w: Any, cot: Any) -> list[Any]:
    """``f``'s losses and the gradient of their cotangent-weighted sum."""
    import torch

    xg = x.detach().clone().requires_grad_(True)
    none, mean, total = f(xg, y, w)
    (grad,) = torch.autograd.grad((none * cot).sum() + 0.5 * mean - 2.0 * total, xg)
    return [none, mean, total, grad]


@TORCH
@_NO_JIT_DEPRECATION
class TestTorchCompiledLoss:
    """Under ``torch.compile`` the plain loss is a graph of its own (``_torch_compiled``), which
    Inductor fuses into one pass for the loss and one for the gradient: values and gradients
    are the eager generic path's on every non-finite row kind, ignored and invalid labels."""

    def test_inductor_graph_matches_eager_generic_path(
        self, rng: np.random.Generator, dynamo_reset: None, torch_native: None
    ) -> None:
        import torch
        from torch._inductor.utils import run_and_get_code

        losses = _reductions(axis=-1, smoothing=(0.1, 0.1, 0.0))
        compiled = torch.compile(losses, fullgraph=True, dynamic=False)
        cot = torch.tensor(rng.random(9) + 0.5, dtype=torch.float32)
        for adversarial in (False, True):
            x, y, w = _compiled_problem(rng, torch.float32, adversarial)
            if adversarial:
                got = _with_grad(compiled, x, y, w, cot)
            else:
                got, code = run_and_get_code(_with_grad, compiled, x, y, w, cot)
                # A graph for the losses and one for the gradient, one C++ kernel each (its
                # definition and its call), and no scatter into a zeroed buffer.
                assert [c.count("cpp_fused_") for c in code] == [2, 2]
                assert not any("scatter" in c for c in code)
            want = _torch_generic(lambda x=x, y=y, w=w: _with_grad(losses, x, y, w, cot))
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(
                    to_numpy(a), to_numpy(b), rtol=1e-5, atol=1e-6, equal_nan=True
                )
        # Without a gradient the graph takes the label's logit by a gather.
        with torch.no_grad():
            got = compiled(x, y, w)
        for a, b in zip(got, want, strict=False):
            np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-5, equal_nan=True)

    @pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
    def test_traced_graph_in_other_dtypes_and_layouts(
        self, rng: np.random.Generator, dtype: str, dynamo_reset: None, torch_native: None
    ) -> None:
        import torch

        # aot_eager runs what Inductor would compile (Dynamo's graph, AOT autograd's backward)
        # without a C++ build: the class axis in the middle, int32 labels, smoothing 1.
        losses = _reductions(axis=1, smoothing=(0.0, 1.0, 0.3))
        compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
        x, y, w = _compiled_problem(rng, getattr(torch, dtype), adversarial=True)
        x3 = x.reshape(3, 3, 6).transpose(1, 2)
        y3 = y.reshape(3, 3).to(torch.int32)
        cot = torch.tensor(rng.random((3, 3)) + 0.5).to(x.dtype)
        got = _with_grad(compiled, x3, y3, w, cot)
        want = _torch_generic(lambda: _with_grad(losses, x3, y3, w, cot))
        with torch.no_grad():
            got += list(compiled(x3, y3, w))
        want += want[:3]
        tol = 2e-2 if dtype == "bfloat16" else 1e-12
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype == x.dtype
            np.testing.assert_allclose(
                to_numpy(a.double()), to_numpy(b.double()), rtol=tol, atol=tol, equal_nan=True
            )
