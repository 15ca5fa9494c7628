"""Vocab-parallel cross-entropy (`xent.parallel`) and sharded / distributed inputs.

The algorithm runs on every backend against a loopback group (workers as threads exchanging
arrays in memory); the real collectives run in their own processes: gloo ranks for PyTorch, 8
host devices for JAX. Everything is compared with the unsplit `xent.cross_entropy`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _reference as ref
import numpy as np
import pytest
from _helpers import Backend, jax_long_rows, to_xp, xp_assert_close
from test_transforms import no_compute

import xent
import xent.parallel
from xent.parallel import Collectives

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


class Loopback(Collectives):
    """A group of threads, one per worker; each collective waits for all of them."""

    def __init__(self, sizes: list[int], reduce_max: Callable[..., Any]) -> None:
        self.sizes = sizes
        self.reduce_max = reduce_max
        self.barrier = threading.Barrier(len(sizes), timeout=60)
        self.slots: list[Any] = [None] * len(sizes)
        self.rank = threading.local()
        self.sent = 0

    def _exchange(self, x: Any, combine: Callable[[list[Any]], Any]) -> Any:
        self.slots[self.rank.value] = x
        self.barrier.wait()
        out = combine(list(self.slots))
        self.barrier.wait()
        return out

    def all_reduce_max(self, x: Any) -> Any:
        return self._exchange(x, lambda xs: _fold(self.reduce_max, xs))

    def all_reduce_sum(self, x: Any) -> Any:
        return self._exchange(x, lambda xs: _fold(lambda a, b: a + b, xs))

    def class_count(self, local: int, like: Any) -> int:
        return sum(self.sizes)


def _fold(op: Callable[[Any, Any], Any], xs: list[Any]) -> Any:
    out = xs[0]
    for x in xs[1:]:
        out = op(out, x)
    return out


def run_workers(
    sizes: list[int],
    xp: Any,
    work: Callable[[int, int, int, Loopback], Any],
    kind: type[Loopback] = Loopback,
) -> list[Any]:
    """``work(rank, start, stop, group)`` on one thread per slice; their results in rank order."""
    group = kind(sizes, xp.maximum)
    results: list[Any] = [None] * len(sizes)
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        group.rank.value = rank
        start = sum(sizes[:rank])
        try:
            results[rank] = work(rank, start, start + sizes[rank], group)
        except BaseException as exc:
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(len(sizes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a loopback worker did not finish"
    if errors:
        raise errors[0]
    return results


def _data(
    rng: np.random.Generator, rows: int, classes: int, empty: tuple[int, int]
) -> dict[str, Any]:
    x = rng.normal(size=(rows, classes)) * 3.0
    labels = np.setdiff1d(np.arange(classes), np.arange(*empty))
    t = rng.choice(labels, size=rows)
    t[1] = -100
    return {"x": x, "t": t, "w": rng.uniform(0.5, 2.0, classes), "s": rng.uniform(0.5, 2.0, rows)}


class TestLoopback:
    """The algorithm, with simulated workers, on every backend."""

    @pytest.mark.parametrize(
        ("sizes", "options"),
        [
            ([3, 4, 4], {"reduction": "mean", "label_smoothing": 0.2, "z_loss": 1e-2}),
            ([5, 2], {"reduction": "none", "label_smoothing": 0.0, "z_loss": 0.0}),
            ([2, 2, 3, 4], {"reduction": "sum", "label_smoothing": 0.1, "z_loss": 0.0}),
        ],
    )
    @pytest.mark.parametrize("weighted", [True, False])
    def test_loss_and_slice_gradient_equal_the_unsplit_ones(
        self, xp: Any, rng: np.random.Generator, sizes: list[int], options: dict[str, Any],
        weighted: bool,
    ) -> None:  # fmt: skip
        classes = sum(sizes)
        data = _data(rng, 6, classes, (classes - sizes[-1], classes))  # last slice: no label
        t, s = to_xp(xp, data["t"]), to_xp(xp, data["s"])
        w = data["w"] if weighted else None
        full, full_grad = xent.cross_entropy_and_grad(
            data["x"], data["t"], weight=w, sample_weight=data["s"], **options
        )

        def work(rank: int, start: int, stop: int, group: Loopback) -> Any:
            local = to_xp(xp, data["x"][:, start:stop])
            wl = to_xp(xp, data["w"][start:stop]) if weighted else None
            return xent.parallel.cross_entropy_and_grad(
                local, t, class_start=start, group=group, weight=wl, sample_weight=s, **options
            )

        results = run_workers(sizes, xp, work)
        for rank, (loss, grad) in enumerate(results):
            start = sum(sizes[:rank])
            xp_assert_close(loss, full, xp=xp, dtype="float64", rtol=1e-12, atol=1e-12)
            slice_grad = full_grad[:, start : start + sizes[rank]]
            xp_assert_close(grad, slice_grad, xp=xp, dtype="float64", rtol=1e-12, atol=1e-12)

    @pytest.mark.only_backends(Backend.JAX)
    @pytest.mark.parametrize("sizes", [[12, 13], [13, 12]])
    def test_long_slices_on_jax(
        self,
        xp: Any,
        rng: np.random.Generator,
        monkeypatch: pytest.MonkeyPatch,
        sizes: list[int],
    ) -> None:
        # Slices of more than _LONG_ROWS classes: JAX sums them in pieces (12 classes) or in
        # groups of rows (13), with the values of one sum.
        plans = jax_long_rows(monkeypatch)
        classes = sum(sizes)
        data = _data(rng, 8, classes, (0, 0))
        t = to_xp(xp, data["t"])
        options = {"label_smoothing": 0.2, "z_loss": 1e-2}
        full, full_grad = xent.cross_entropy_and_grad(
            data["x"], data["t"], weight=data["w"], **options
        )

        def work(rank: int, start: int, stop: int, group: Loopback) -> Any:
            local = to_xp(xp, data["x"][:, start:stop], dtype="float32")
            wl = to_xp(xp, data["w"][start:stop], dtype="float32")
            return xent.parallel.cross_entropy_and_grad(
                local, t, class_start=start, group=group, weight=wl, **options
            )

        for rank, (loss, grad) in enumerate(run_workers(sizes, xp, work)):
            start = sum(sizes[:rank])
            xp_assert_close(loss, full, xp=xp, dtype="float32", rtol=1e-5, atol=1e-6)
            slice_grad = full_grad[:, start : start + sizes[rank]]
            xp_assert_close(grad, slice_grad, xp=xp, dtype="float32", rtol=1e-5, atol=1e-6)
        kinds = {plan[0] for plan in plans if plan is not None}
        assert kinds == ({"piece", "group"} if xent.backends.native_enabled() else set())

    @pytest.mark.parametrize("row", ["nan", "all_neg_inf", "pos_inf"])
    def test_ignored_row_gradient_is_zero_times_its_softmax(
        self, xp: Any, rng: np.random.Generator, row: str
    ) -> None:
        """An ignored row's gradient is ``0 * softmax``, as in the unsplit cross-entropy: 0 for
        a finite row, NaN where the softmax is NaN (a NaN or all ``-inf`` row)."""
        x = rng.normal(size=(3, 5))
        if row == "pos_inf":
            x[1, 3] = np.inf
        else:
            x[1] = {"nan": np.nan, "all_neg_inf": -np.inf}[row]
        t = np.array([2, -100, 4])
        options = {"label_smoothing": 0.1, "z_loss": 1e-2}
        full_loss, full_grad = xent.cross_entropy_and_grad(x, t, **options)
        assert np.isfinite(full_loss)
        assert np.isnan(full_grad[1]).any()

        def work(rank: int, start: int, stop: int, group: Loopback) -> Any:
            return xent.parallel.cross_entropy_and_grad(
                to_xp(xp, x[:, start:stop]), to_xp(xp, t), class_start=start, group=group,
                **options,
            )  # fmt: skip

        for rank, (loss, grad) in enumerate(run_workers([2, 3], xp, work)):
            start = (0, 2)[rank]
            xp_assert_close(loss, full_loss, xp=xp, dtype="float64", rtol=1e-12)
            slice_grad = full_grad[:, start : start + (2, 3)[rank]]
            xp_assert_close(grad, slice_grad, xp=xp, dtype="float64", rtol=1e-12, atol=1e-12)

    def test_class_axis_first_and_float32(self, xp: Any, rng: np.random.Generator) -> None:
        data = _data(rng, 5, 7, (0, 0))
        x = data["x"].T.astype(np.float32)
        t = to_xp(xp, data["t"])
        full = xent.cross_entropy(x, data["t"], axis=0, label_smoothing=0.1, reduction="none")

        def work(rank: int, start: int, stop: int, group: Loopback) -> Any:
            return xent.parallel.cross_entropy(
                to_xp(xp, x[start:stop]), t, axis=0, class_start=start, group=group,
                label_smoothing=0.1, reduction="none",
            )  # fmt: skip

        for loss in run_workers([3, 4], xp, work):
            xp_assert_close(loss, full, xp=xp, dtype="float32", rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("weighted", [True, False])
    @pytest.mark.parametrize("reduction", ["mean", "none"])
    def test_smoothing_share_stays_finite_where_the_loss_is(
        self, xp: Any, weighted: bool, reduction: str
    ) -> None:
        # Logits at the float32 max of both signs: each gap `shift - x` of the smoothing's
        # sum overflows, its share (e / C) w (shift - x) does not; split over two workers.
        big = float(np.finfo(np.float32).max)
        x = np.asarray([[1.0, -1.0, 0.0, 0.5], [-1.0, 1.0, 1.0, -1.0]]) * big
        x = x.astype(np.float32)
        t = np.asarray([0, 2])
        w = np.asarray([1.39, 0.89, 1.76, 1.26]) if weighted else None
        opts: dict[str, Any] = {"label_smoothing": 0.1, "reduction": reduction}
        want = ref.cross_entropy(x.astype(np.float64), t, weight=w, **opts)
        assert np.all(np.isfinite(want))

        def work(rank: int, start: int, stop: int, group: Loopback) -> Any:
            local = None if w is None else to_xp(xp, w[start:stop])
            return xent.parallel.cross_entropy(
                to_xp(xp, x[:, start:stop]), to_xp(xp, t), class_start=start, group=group,
                weight=local, **opts,
            )  # fmt: skip

        for loss in run_workers([2, 2], xp, work):
            xp_assert_close(loss, want, xp=xp, dtype="float32", rtol=1e-5)

    @pytest.mark.only_backends(Backend.NUMPY, Backend.TORCH, Backend.ARRAY_API_STRICT)
    def test_label_outside_the_global_range_raises(self, xp: Any) -> None:
        t = to_xp(xp, np.array([0, 7]))

        def work(rank: int, start: int, stop: int, group: Loopback) -> Any:
            x = to_xp(xp, np.zeros((2, stop - start)))
            return xent.parallel.cross_entropy(x, t, class_start=start, group=group)

        with pytest.raises(
            ValueError, match=r"label 7 at position \(1,\), expected a class index in \[0, 6\)"
        ):
            run_workers([3, 3], xp, work)

    @pytest.mark.only_backends(Backend.DASK)
    def test_label_outside_the_global_range_is_nan_where_values_are_lazy(self, xp: Any) -> None:
        t = to_xp(xp, np.array([0, 7]))

        def work(rank: int, start: int, stop: int, group: Loopback) -> Any:
            x = to_xp(xp, np.zeros((2, stop - start)))
            return xent.parallel.cross_entropy(
                x, t, class_start=start, group=group, reduction="none"
            )

        for loss in run_workers([3, 3], xp, work):
            xp_assert_close(loss, [np.log(6.0), np.nan], xp=xp, dtype="float64")

    @pytest.mark.only_backends(Backend.NUMPY)
    def test_bad_arguments_say_what_was_expected(self, xp: Any) -> None:
        x = to_xp(xp, np.zeros((2, 3)))
        t = to_xp(xp, np.array([0, 1]))
        alone = Loopback([3], xp.maximum)
        alone.rank.value = 0
        call = xent.parallel.cross_entropy
        with pytest.raises(TypeError, match=r"`group` must be a xent\.parallel\.Collectives"):
            call(x, t, class_start=0, group=object())  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"`class_start` must lie in \[0, 0\]"):
            call(x, t, class_start=1, group=alone)
        with pytest.raises(TypeError, match="`class_start` must be an integer"):
            call(x, t, class_start=True, group=alone)
        with pytest.raises(TypeError, match="class probabilities are not split"):
            call(x, to_xp(xp, np.full((2, 3), 1 / 3)), class_start=0, group=alone)
        with pytest.raises(ValueError, match=r"`weight` must have shape \(3,\)"):
            call(x, t, class_start=0, group=alone, weight=to_xp(xp, np.ones(6)))
        with pytest.raises(
            ValueError, match=r"at least one class along axis 1, got shape \(2, 0\)"
        ):
            call(to_xp(xp, np.zeros((2, 0))), t, class_start=0, group=alone)
        with pytest.raises(TypeError, match="`ignore_index` must be an integer"):
            call(x, t, class_start=0, group=alone, ignore_index=None)  # type: ignore[arg-type]


def _head(rng: np.random.Generator, rows: int, width: int, classes: int) -> dict[str, Any]:
    """A linear head: hidden, projection, bias, labels (row 1 ignored), class and row weights."""
    data = _data(rng, rows, classes, (0, 0))
    data.update(h=rng.normal(size=(rows, width)), W=rng.normal(size=(classes, width)))
    data["b"] = rng.normal(size=classes)
    return data


HEAD_CASES = [
    ([3, 4, 4], {"reduction": "mean", "label_smoothing": 0.2, "z_loss": 1e-2}, True),
    ([5, 2], {"reduction": "none", "label_smoothing": 0.0, "z_loss": 1e-3}, False),
    ([2, 3, 2], {"reduction": "sum", "label_smoothing": 0.1, "z_loss": 0.0}, True),
]
"""Uneven slices; 7 rows in blocks of 3, so the last block is short."""


class TestLinearLoopback:
    """The row-split linear head against the unsplit one, with simulated workers."""

    @pytest.mark.parametrize(("sizes", "options", "weighted"), HEAD_CASES)
    def test_loss_and_gradients_equal_the_unsplit_head(
        self, xp: Any, rng: np.random.Generator, sizes: list[int], options: dict[str, Any],
        weighted: bool,
    ) -> None:  # fmt: skip
        d = _head(rng, 7, 5, sum(sizes))
        cw = d["w"] if weighted else None
        full, (dh, dw, db) = xent.linear_cross_entropy_and_grad(
            d["h"], d["W"], d["t"], bias=d["b"], class_weight=cw, sample_weight=d["s"], **options
        )
        # The naive composition agrees with the chunked unsplit head.
        logits = d["h"] @ d["W"].T + d["b"]
        naive, g = xent.cross_entropy_and_grad(
            logits, d["t"], weight=cw, sample_weight=d["s"], **options
        )
        np.testing.assert_allclose(full, naive, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dh, g @ d["W"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dw, g.T @ d["h"], rtol=1e-12, atol=1e-12)
        assert db is not None
        np.testing.assert_allclose(db, g.sum(axis=0), rtol=1e-12, atol=1e-12)
        h, t, s = to_xp(xp, d["h"]), to_xp(xp, d["t"]), to_xp(xp, d["s"])

        def work(rank: int, start: int, stop: int, group: Loopback) -> Any:
            with _eager(xp):
                return xent.parallel.linear_cross_entropy_and_grad(
                    h, to_xp(xp, d["W"][start:stop]), t, class_start=start, group=group,
                    bias=to_xp(xp, d["b"][start:stop]), chunk_size=3, sample_weight=s,
                    class_weight=None if cw is None else to_xp(xp, cw[start:stop]), **options,
                )  # fmt: skip

        for rank, (loss, (gh, gw, gb)) in enumerate(run_workers(sizes, xp, work)):
            part = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
            tol = {"xp": xp, "dtype": "float64", "rtol": 1e-12, "atol": 1e-12}
            xp_assert_close(loss, full, **tol)
            xp_assert_close(gh, dh, **tol)
            xp_assert_close(gw, dw[part], **tol)
            xp_assert_close(gb, db[part], **tol)

    @pytest.mark.only_backends(Backend.TORCH, Backend.JAX)
    # One case: the "none" loss, whose backward makes the logits again (the 0-d losses'
    # gradients, made in the forward, are checked on gloo ranks and JAX devices).
    @pytest.mark.parametrize(("sizes", "options", "weighted"), HEAD_CASES[1:2])
    def test_autodiff_gives_the_full_hidden_and_the_slices_gradients(
        self, xp: Any, backend: Backend, rng: np.random.Generator, sizes: list[int],
        options: dict[str, Any], weighted: bool,
    ) -> None:  # fmt: skip
        d = _head(rng, 7, 5, sum(sizes))
        cw = d["w"] if weighted else None
        full, (dh, dw, db) = xent.linear_cross_entropy_and_grad(
            d["h"], d["W"], d["t"], bias=d["b"], class_weight=cw, sample_weight=d["s"], **options
        )
        assert db is not None
        t, s = to_xp(xp, d["t"]), to_xp(xp, d["s"])
        # The loopback's exchanges with the real bindings' autodiff hook (the default hook is
        # the backend's, which differentiates through the collectives with the natives off).
        binding = xent.parallel.TorchGroup if backend is Backend.TORCH else xent.parallel.JaxAxis
        hooked = type("Hooked", (Loopback,), {"attach_linear_grad": binding.attach_linear_grad})

        def work(rank: int, start: int, stop: int, group: Loopback) -> Any:
            def f(h: Any, w: Any, b: Any) -> Any:
                loss = xent.parallel.linear_cross_entropy(
                    h, w, t, class_start=start, group=group, bias=b, chunk_size=3,
                    sample_weight=s, class_weight=None if cw is None else to_xp(xp, cw[start:stop]),
                    **options,
                )  # fmt: skip
                return loss

            args = [to_xp(xp, a) for a in (d["h"], d["W"][start:stop], d["b"][start:stop])]
            with _eager(xp):
                return _value_and_grads(backend, f, args)

        for rank, (loss, grads) in enumerate(run_workers(sizes, xp, work, hooked)):
            part = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
            tol = {"xp": xp, "dtype": "float64", "rtol": 1e-12, "atol": 1e-12}
            xp_assert_close(loss, full, **tol)
            for got, want in zip(grads, (dh, dw[part], db[part]), strict=True):
                xp_assert_close(got, want, **tol)


class TestLinearArguments:
    @pytest.mark.only_backends(Backend.NUMPY)
    def test_bad_arguments_say_what_was_expected(self, xp: Any) -> None:
        h = to_xp(xp, np.zeros((2, 4)))
        w = to_xp(xp, np.zeros((3, 4)))
        t = to_xp(xp, np.array([0, 1]))
        alone = Loopback([3], xp.maximum)
        alone.rank.value = 0
        call = xent.parallel.linear_cross_entropy
        with pytest.raises(TypeError, match=r"`group` must be a xent\.parallel\.Collectives"):
            call(h, w, t, class_start=0, group=object())  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"`class_start` must lie in \[0, 0\]"):
            call(h, w, t, class_start=2, group=alone)
        with pytest.raises(ValueError, match=r"`weight` must have shape \(V, 4\)"):
            call(h, to_xp(xp, np.zeros((3, 5))), t, class_start=0, group=alone)
        with pytest.raises(ValueError, match=r"`class_weight` must have shape \(3,\)"):
            call(h, w, t, class_start=0, group=alone, class_weight=to_xp(xp, np.ones(6)))
        with pytest.raises(TypeError, match="class probabilities are not split"):
            call(h, w, to_xp(xp, np.full((2, 3), 1 / 3)), class_start=0, group=alone)
        with pytest.raises(ValueError, match=r"label 3 at position \(1,\)"):
            call(h, w, to_xp(xp, np.array([0, 3])), class_start=0, group=alone)

    @pytest.mark.only_backends(Backend.TORCH)
    def test_weights_that_need_a_gradient_are_refused(self, xp: Any) -> None:
        import torch

        alone = xent.parallel.TorchGroup()
        h = torch.zeros((2, 4), dtype=torch.float64, requires_grad=True)
        w = torch.zeros((3, 4), dtype=torch.float64)
        s = torch.ones(2, dtype=torch.float64, requires_grad=True)
        with pytest.raises(TypeError, match="requiring grad: sample_weight"):
            alone.check_constants({"class_weight": None, "sample_weight": s})
        group = type("Alone", (Loopback,), {"check_constants": alone.check_constants})(
            [3], xp.maximum
        )
        group.rank.value = 0
        with pytest.raises(TypeError, match="requiring grad: sample_weight"):
            xent.parallel.linear_cross_entropy(
                h, w, torch.tensor([0, 1]), class_start=0, group=group, sample_weight=s
            )


def _eager(xp: Any) -> contextlib.AbstractContextManager[Any]:
    """JAX runs the blocks' ``lax.scan`` as a Python loop (in this thread), so the loopback
    workers exchange values rather than tracers; other libraries are eager anyway."""
    if "jax" in xp.__name__:
        import jax

        return jax.disable_jit()
    return contextlib.nullcontext()


def _value_and_grads(backend: Backend, f: Callable[..., Any], args: list[Any]) -> Any:
    """``f(*args)`` and the gradients of its sum, by the framework's autodiff."""
    if backend is Backend.TORCH:
        import torch

        args = [a.requires_grad_(True) for a in args]
        loss = f(*args)
        return loss.detach(), torch.autograd.grad(loss.sum(), args)
    import jax
    import jax.numpy as jnp

    loss, vjp = jax.vjp(f, *args)
    return loss, vjp(jnp.ones_like(loss))


def _run(args: list[str], timeout: float) -> str:
    """The worker script in a process of its own, with this run's native switch."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(TESTS)]))
    env["XENT_NATIVE"] = "1" if xent.backends.native_enabled() else "0"
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, str(TESTS / "_parallel_workers.py"), *args],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.only_backends(Backend.TORCH)
def test_torch_gloo_ranks_equal_the_unsplit_loss(backend: Backend, tmp_path: Path) -> None:
    # Two ranks with the native overrides, four (uneven slices) with the generic primitives.
    world, sizes = (2, [6, 7]) if xent.backends.native_enabled() else (4, [3, 3, 4, 3])
    out = _run(["torch", str(world), ",".join(map(str, sizes)), str(tmp_path / "store")], 150)
    assert f"torch gloo x{world} ok" in out


@pytest.mark.only_backends(Backend.JAX)
def test_jax_eight_devices_shard_map_pmap_and_sharded_arrays(backend: Backend) -> None:
    # shard_map over both meshes and pmap with the native overrides; sharded arrays through the
    # ordinary functions both ways (their gathers differ).
    out = _run(["jax"], 240)
    expected = ["sharded AxisType.Auto ok", "sharded AxisType.Explicit ok"]
    if xent.backends.native_enabled():
        expected += ["shard_map 2x4 ok", "shard_map 1x8 ok", "pmap ok"]
    for line in expected:
        assert line in out, out


@pytest.mark.only_backends(Backend.DASK)
@pytest.mark.eager("checks laziness itself; the lazy patch would persist the inputs it holds")
def test_dask_cluster_computes_a_class_chunked_loss_lazily_and_exactly(
    xp: Any, rng: np.random.Generator
) -> None:
    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")
    import dask.array as da

    data = _data(rng, 40, 30, (0, 0))
    x = da.from_array(data["x"], chunks=(10, 8))  # chunked along rows and classes
    t = da.from_array(data["t"], chunks=10)
    w = da.from_array(data["w"], chunks=8)
    options = {"label_smoothing": 0.1, "z_loss": 1e-3}
    full, full_grad = xent.cross_entropy_and_grad(data["x"], data["t"], weight=data["w"], **options)
    with no_compute():
        loss, grad = xent.cross_entropy_and_grad(x, t, weight=w, **options)
    assert grad.chunks == x.chunks
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster, timeout=60) as client,
    ):
        loss_value, grad_value = client.compute([loss, grad], sync=True)
    np.testing.assert_allclose(loss_value, full, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_value, full_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.only_backends(Backend.TORCH)
def test_tensor_parallel_example_prints_the_single_process_losses(backend: Backend) -> None:
    pytest.importorskip("jax", reason="the example also trains on a JAX mesh")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env["XENT_NATIVE"] = "1" if xent.backends.native_enabled() else "0"
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "tensor_parallel_head.py"), "--steps", "2"],
        capture_output=True, text=True, timeout=240, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line.split(":", 1)[1].split() for line in result.stdout.splitlines()[:3]]
    assert len(lines) == 3
    assert len(lines[0]) == 2
    assert lines[0] == lines[1] == lines[2], result.stdout
