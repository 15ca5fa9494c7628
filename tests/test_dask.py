"""Dask specifics: the gather stays linear in the number of class chunks, and every task xent adds
to a graph runs under xent's errstate, wherever and whenever the caller computes it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import _reference as ref
import numpy as np
import pytest
from _helpers import Backend, to_numpy, to_xp

import xent

pytestmark = pytest.mark.only_backends(Backend.DASK)


def _chunked(a: np.ndarray, chunks: tuple[int, ...]) -> Any:
    import dask.array as da

    return da.from_array(a, chunks=chunks)


class TestManyClassChunks:
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
    return ref.softmax(x) - np.eye(x.shape[-1])[t]


class TestErrstate:
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

    @pytest.mark.eager("the caller's own graph must reach .compute() as built, not persisted")
    def test_callers_own_tasks_still_raise(self, xp: Any) -> None:
        import dask.array as da

        x = da.log(_chunked(np.zeros((2, 3)), (1, 3)))
        out = xent.cross_entropy(x, _chunked(np.array([0, 1]), (1,)))
        with np.errstate(all="raise"), pytest.raises(FloatingPointError, match="divide"):
            out.compute()
