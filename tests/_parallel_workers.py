"""Workers for tests/test_parallel.py that need their own process: gloo ranks and 8 JAX devices.

Each compares the vocab-parallel loss and gradient slices with the unsplit `xent.cross_entropy`
(float64, 1e-12) on one combined scenario: label smoothing, z-loss, class and sample weights,
an ignored row, and slices of which one holds no target at all.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
import pytest

TOL = 1e-12
OPTIONS = [
    {"reduction": "mean", "label_smoothing": 0.1, "z_loss": 1e-3, "weighted": True},
    {"reduction": "none", "label_smoothing": 0.3, "z_loss": 0.0, "weighted": True},
    {"reduction": "sum", "label_smoothing": 0.0, "z_loss": 0.0, "weighted": False},
]
"""Combined scenarios; the JAX meshes take the first two (each is a compilation) and the
gradient of the mapped function taken outside ``shard_map`` adds a plain sum."""


def scenario(classes: int, rows: int, empty_slice: tuple[int, int]) -> dict[str, np.ndarray]:
    """Logits, labels (one ignored, none in ``empty_slice``), class and sample weights."""
    rng = np.random.default_rng(classes * 100 + rows)
    x = rng.normal(size=(rows, classes)) * 3.0
    choices = np.setdiff1d(np.arange(classes), np.arange(*empty_slice))
    t = rng.choice(choices, size=rows)
    t[1] = -100
    return {
        "x": x,
        "t": t,
        "w": rng.uniform(0.5, 2.0, classes),
        "s": rng.uniform(0.5, 2.0, rows),
    }


def close(a: object, b: object) -> None:
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=TOL, atol=TOL)


def torch_rank(rank: int, world: int, store_path: str, sizes: list[int]) -> None:
    """One gloo rank: its slice, loss and gradient against the unsplit cross-entropy."""
    import torch
    import torch.distributed as dist

    import xent
    import xent.parallel

    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        start = sum(sizes[:rank])
        stop = start + sizes[rank]
        data = scenario(sum(sizes), 7, (sum(sizes[:-1]), sum(sizes)))

        class Counting(xent.parallel.TorchGroup):
            calls = 0

            def _all_reduce(self, x: Any, op: Any) -> Any:
                Counting.calls += 1
                return super()._all_reduce(x, op)

        group = Counting()
        for i, opts in enumerate(OPTIONS):
            opts = dict(opts)
            weighted = opts.pop("weighted")
            x = torch.tensor(data["x"], requires_grad=True)
            t = torch.tensor(data["t"])
            w = torch.tensor(data["w"]) if weighted else None
            s = torch.tensor(data["s"])
            full = xent.cross_entropy(x, t, weight=w, sample_weight=s, **opts)
            (full_grad,) = torch.autograd.grad(full.sum(), x)
            local = x.detach()[:, start:stop].clone().requires_grad_(True)
            before = Counting.calls
            loss = xent.parallel.cross_entropy(
                local, t, class_start=start, group=group,
                weight=None if w is None else w[start:stop], sample_weight=s, **opts,
            )  # fmt: skip
            # Two all-reduces per forward (and, the first time, one for the class count).
            assert Counting.calls - before == (2 if i else 3), Counting.calls - before
            sent = Counting.calls
            loss.sum().backward()
            assert Counting.calls == sent, "the backward communicated"
            assert torch.allclose(loss, full.detach(), rtol=TOL, atol=TOL), (rank, opts)
            grad = full_grad[:, start:stop]
            assert torch.allclose(local.grad, grad, rtol=TOL, atol=TOL), (rank, opts)
        linear_head(group, start, stop, sum(sizes))
        # Labels are checked against the global class count, on every rank.
        bad = torch.tensor([0, sum(sizes)])
        zeros = torch.zeros(2, stop - start)
        with pytest.raises(ValueError, match=rf"label {sum(sizes)} at position \(1,\)"):
            xent.parallel.cross_entropy(zeros, bad, class_start=start, group=group)
        # Weights are constants of the analytic backward: one that needs a gradient is refused.
        w = torch.ones(stop - start, dtype=torch.float64, requires_grad=True)
        with pytest.raises(TypeError, match="tensors requiring grad behind weight"):
            xent.parallel.cross_entropy(local, t, class_start=start, group=group, weight=w)
    finally:
        dist.destroy_process_group()


def head(classes: int, rows: int, width: int) -> dict[str, np.ndarray]:
    """A linear head on :func:`scenario`'s labels and weights: hidden, projection, bias."""
    data = scenario(classes, rows, (0, 0))
    rng = np.random.default_rng(classes + rows * width)
    data.update(h=rng.normal(size=(rows, width)), W=rng.normal(size=(classes, width)))
    data["b"] = rng.normal(size=classes)
    return data


HEAD_OPTIONS: dict[str, Any] = {"label_smoothing": 0.1, "z_loss": 1e-3}


def linear_head(group: Any, start: int, stop: int, classes: int) -> None:
    """The row-split linear head on gloo: loss and autograd gradients against the unsplit
    head, and what is sent: 2 all-reduces per block, then one of d hidden."""
    import torch

    import xent
    import xent.parallel

    d = {k: torch.tensor(v) for k, v in head(classes, 7, 5).items()}
    full, (dh, dw, db) = xent.linear_cross_entropy_and_grad(
        d["h"], d["W"], d["t"], bias=d["b"], class_weight=d["w"], sample_weight=d["s"],
        **HEAD_OPTIONS,
    )  # fmt: skip
    args = [
        a.clone().requires_grad_(True) for a in (d["h"], d["W"][start:stop], d["b"][start:stop])
    ]
    before = type(group).calls
    loss = xent.parallel.linear_cross_entropy(
        args[0], args[1], d["t"], class_start=start, group=group, bias=args[2], chunk_size=3,
        class_weight=d["w"][start:stop], sample_weight=d["s"], **HEAD_OPTIONS,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, args)
    assert db is not None
    assert type(group).calls - before == 2 * 3 + 1, type(group).calls - before  # 7 rows: 3 blocks
    close(loss.detach(), full)
    for got, want in zip(grads, (dh, dw[start:stop], db[start:stop]), strict=True):
        close(got, want)


def jax_main() -> None:
    """8 host devices: shard_map over (2, 4) and (1, 8) meshes, pmap, and sharded arrays
    through the ordinary functions, eagerly and under jit."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import xent
    import xent.parallel

    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 8

    meshes = [(2, 4), (1, 8)] if xent.backends.native_enabled() else []
    for batch, split in meshes:
        auto = (jax.sharding.AxisType.Auto,) * 2
        mesh = jax.make_mesh((batch, split), ("b", "c"), axis_types=auto)
        classes = 8 * split
        data = scenario(classes, 6, (classes - classes // split, classes))
        x, t, w, s = (jnp.asarray(data[k]) for k in "xtws")
        local = classes // split
        for opts in OPTIONS[:2]:
            opts = dict(opts)
            weighted = opts.pop("weighted")
            reduction = opts["reduction"]
            opts["reduction"] = "sum" if reduction == "mean" and batch > 1 else reduction

            def body(xl, tl, wl, sl, opts=opts, weighted=weighted, local=local):
                start = jax.lax.axis_index("c") * local

                def f(xl):
                    loss = xent.parallel.cross_entropy(
                        xl, tl, class_start=start, group=xent.parallel.JaxAxis("c"),
                        weight=wl if weighted else None, sample_weight=sl, **opts,
                    )  # fmt: skip
                    return jnp.sum(loss), loss

                (_, loss), grad = jax.value_and_grad(f, has_aux=True)(xl)
                if opts["reduction"] == "sum":
                    loss = jax.lax.psum(loss, "b")
                elif opts["reduction"] == "mean":  # one batch shard: replicated over "b" as is
                    loss = jax.lax.pmean(loss, "b")
                return loss, grad

            loss_spec = P("b") if opts["reduction"] == "none" else P()
            specs = (P("b", "c"), P("b"), P("c"), P("b"))
            mapped = jax.shard_map(
                body, mesh=mesh, in_specs=specs, out_specs=(loss_spec, P("b", "c"))
            )
            run = jax.jit(mapped)
            loss, grad = run(x, t, w, s)
            wf = w if weighted else None
            full, full_grad = xent.cross_entropy_and_grad(x, t, weight=wf, sample_weight=s, **opts)
            close(loss, full)
            close(grad, full_grad)

        # The gradient of the mapped function, taken outside shard_map.
        def per_row(xl, tl, local=local):
            start = jax.lax.axis_index("c") * local
            group = xent.parallel.JaxAxis("c")
            return xent.parallel.cross_entropy(
                xl, tl, class_start=start, group=group, label_smoothing=0.2, reduction="none"
            )

        outer = jax.shard_map(per_row, mesh=mesh, in_specs=(P("b", "c"), P("b")), out_specs=P("b"))
        g_outer = jax.grad(lambda x, outer=outer, t=t: jnp.sum(outer(x, t)))(x)
        close(g_outer, xent.cross_entropy_and_grad(x, t, label_smoothing=0.2, reduction="sum")[1])
        shard_map_head(mesh, split)
        print(f"shard_map {batch}x{split} ok")

    if xent.backends.native_enabled():
        pmap_check()
    sharded_arrays()


def shard_map_head(mesh: Any, split: int) -> None:
    """The row-split linear head in ``shard_map``, rows over "b", classes over "c": jax.grad
    inside the body and of the mapped function, against the unsplit head."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import xent
    import xent.parallel

    classes = 4 * split
    d = {k: jnp.asarray(v) for k, v in head(classes, 6, 5).items()}
    local = classes // split
    opts: dict[str, Any] = dict(HEAD_OPTIONS, chunk_size=2)
    full, grads = xent.linear_cross_entropy_and_grad(
        d["h"], d["W"], d["t"], bias=d["b"], class_weight=d["w"], sample_weight=d["s"],
        reduction="sum", **opts,
    )  # fmt: skip
    rest = (d["t"], d["s"], d["w"])

    def loss(h: Any, w: Any, b: Any, t: Any, s: Any, cw: Any, reduction: Any = "sum") -> Any:
        start = jax.lax.axis_index("c") * local
        group = xent.parallel.JaxAxis("c")
        return xent.parallel.linear_cross_entropy(
            h, w, t, class_start=start, group=group, bias=b, class_weight=cw, sample_weight=s,
            reduction=reduction, **opts,
        )  # fmt: skip

    def body(*args: Any) -> Any:
        value, g = jax.value_and_grad(loss, argnums=(0, 1, 2))(*args)
        return jax.lax.psum(value, "b"), *g

    specs = (P("b", None), P("c", None), P("c"), P("b"), P("b"), P("c"))
    outs = (P(), P("b", None), P("c", None), P("c"))
    inside = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=outs))
    value, *got = inside(d["h"], d["W"], d["b"], d["t"], d["s"], d["w"])
    close(value, full)
    for a, b in zip(got, grads, strict=True):
        close(a, b)
    # The gradient of the mapped function, taken outside shard_map (per-row losses).
    rows = jax.shard_map(
        lambda h, w, b, t, s, cw: loss(h, w, b, t, s, cw, reduction="none"),
        mesh=mesh,
        in_specs=specs,
        out_specs=P("b"),
    )
    outer = jax.jit(jax.grad(lambda h, w, b: jnp.sum(rows(h, w, b, *rest)), argnums=(0, 1, 2)))
    for a, b in zip(outer(d["h"], d["W"], d["b"]), grads, strict=True):
        close(a, b)


def pmap_check() -> None:
    """pmap over 8 devices, classes split 8 ways."""
    import jax
    import jax.numpy as jnp

    import xent
    import xent.parallel

    data = scenario(24, 5, (21, 24))
    x, t = jnp.asarray(data["x"]), jnp.asarray(data["t"])
    slices = jnp.stack(jnp.split(x, 8, axis=1))
    pm = jax.pmap(
        lambda xl, i: jax.value_and_grad(
            lambda xl: xent.parallel.cross_entropy(
                xl, t, class_start=i * 3, group=xent.parallel.JaxAxis("d"), label_smoothing=0.1
            )
        )(xl),
        axis_name="d",
    )
    loss, grads = pm(slices, jnp.arange(8))
    full, full_grad = xent.cross_entropy_and_grad(x, t, label_smoothing=0.1)
    close(loss, jnp.full(8, full))
    close(jnp.concatenate(list(grads), axis=1), full_grad)
    print("pmap ok")


def sharded_arrays() -> None:
    """Arrays sharded over a (2, 4) mesh, by rows, classes or both, through the ordinary
    functions eagerly and under jit, on Auto and Explicit meshes."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import xent

    data = scenario(16, 8, (0, 0))
    xn, tn, wn = data["x"], data["t"], data["w"]
    ref = xent.cross_entropy(xn, tn, weight=wn, label_smoothing=0.1)
    ref_grad = xent.cross_entropy_and_grad(xn, tn, weight=wn, label_smoothing=0.1)[1]
    layouts = {
        jax.sharding.AxisType.Auto: [P("b", None), P(None, "c")],
        jax.sharding.AxisType.Explicit: [P("b", "c")],
    }
    for types, specs in layouts.items():
        mesh = jax.make_mesh((2, 4), ("b", "c"), axis_types=(types, types))
        with jax.set_mesh(mesh):
            for spec in specs:
                x = jax.device_put(jnp.asarray(xn), NamedSharding(mesh, spec))
                t = jax.device_put(jnp.asarray(tn), NamedSharding(mesh, P(spec[0])))
                w = jax.device_put(jnp.asarray(wn), NamedSharding(mesh, P()))

                def f(x, t, w):
                    return xent.cross_entropy(x, t, weight=w, label_smoothing=0.1)

                close(f(x, t, w), ref)
                close(jax.jit(f)(x, t, w), ref)
                close(xent.cross_entropy_and_grad(x, t, weight=w, label_smoothing=0.1)[1], ref_grad)
                close(jax.jit(jax.grad(f))(x, t, w), ref_grad)
        print(f"sharded {types} ok")


def torch_main(world: int, sizes: list[int], store_path: str, timeout: float) -> None:
    """Spawn ``world`` gloo ranks; fail (and end them) if one fails or they outlive ``timeout``."""
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(
        torch_rank, args=(world, store_path, sizes), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} gloo ranks still running after {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    print(f"torch gloo x{world} ok")


if __name__ == "__main__":
    if sys.argv[1] == "jax":
        jax_main()
    else:
        sizes = [int(n) for n in sys.argv[3].split(",")]
        torch_main(int(sys.argv[2]), sizes, sys.argv[4], timeout=120)
