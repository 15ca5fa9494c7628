"""A tensor-parallel language-model head trained with xent's vocab-parallel cross-entropy.

The output projection ``W`` (vocabulary x hidden) is split by rows: each worker holds
``W_local``, computes only its logits ``h @ W_local.T`` and calls
``xent.parallel.cross_entropy``; no worker ever holds a full row of logits. The head is trained
by plain gradient descent three ways, from the same seed, and the losses must agree:

- one process, full logits, ``xent.cross_entropy_and_grad`` (NumPy);
- 2 PyTorch processes over gloo (``xent.parallel.TorchGroup``, autograd);
- a 4-device JAX CPU mesh (``xent.parallel.JaxAxis`` inside ``jax.shard_map``, ``jax.grad``).

Run: ``python examples/tensor_parallel_head.py --steps 10``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

import xent

TOKENS, HIDDEN, VOCAB = 64, 16, 48
LR = 0.5
SMOOTHING = 0.1


def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hidden states, next-token labels (a few ignored) and the initial head."""
    rng = np.random.default_rng(0)
    h = rng.normal(size=(TOKENS, HIDDEN))
    t = rng.integers(0, VOCAB, size=TOKENS)
    t[::9] = -100  # padding
    w = rng.normal(size=(VOCAB, HIDDEN)) * 0.1
    return h, t, w


def single(steps: int) -> list[float]:
    h, t, w = data()
    losses = []
    for _ in range(steps):
        loss, dlogits = xent.cross_entropy_and_grad(h @ w.T, t, label_smoothing=SMOOTHING)
        w = w - LR * (dlogits.T @ h)
        losses.append(float(loss))
    return losses


def _torch_rank(rank: int, world: int, store_path: str, steps: int, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    import xent.parallel

    dist.init_process_group(
        "gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world
    )
    try:
        h_np, t_np, w_np = data()
        local = VOCAB // world
        start = rank * local
        h, t = torch.tensor(h_np), torch.tensor(t_np)
        w_local = torch.tensor(w_np[start : start + local], requires_grad=True)
        group = xent.parallel.TorchGroup()
        losses = []
        for _ in range(steps):
            loss = xent.parallel.cross_entropy(
                h @ w_local.T, t, class_start=start, group=group, label_smoothing=SMOOTHING
            )
            loss.backward()
            with torch.no_grad():
                w_local -= LR * w_local.grad
                w_local.grad = None
            losses.append(float(loss))
        if rank == 0:
            np.save(out_path, np.asarray(losses))
    finally:
        dist.destroy_process_group()


def torch_gloo(steps: int, world: int = 2) -> list[float]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "losses.npy")
        mp.spawn(_torch_rank, args=(world, os.path.join(tmp, "store"), steps, out), nprocs=world)
        return [float(v) for v in np.load(out)]


def jax_mesh(steps: int, devices: int = 4) -> list[float]:
    # Host devices must be requested before JAX starts.
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import xent.parallel

    jax.config.update("jax_enable_x64", True)
    mesh = jax.make_mesh((devices,), ("v",), axis_types=(jax.sharding.AxisType.Auto,))
    local = VOCAB // devices

    def step(w_local: jax.Array, h: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        start = jax.lax.axis_index("v") * local

        def loss_fn(w_local: jax.Array) -> jax.Array:
            return xent.parallel.cross_entropy(
                h @ w_local.T, t, class_start=start, group=xent.parallel.JaxAxis("v"),
                label_smoothing=SMOOTHING,
            )  # fmt: skip

        loss, grad = jax.value_and_grad(loss_fn)(w_local)
        return loss, w_local - LR * grad

    train = jax.jit(
        jax.shard_map(step, mesh=mesh, in_specs=(P("v"), P(), P()), out_specs=(P(), P("v")))
    )
    h_np, t_np, w_np = data()
    w = jax.device_put(jnp.asarray(w_np), NamedSharding(mesh, P("v")))
    h, t = jnp.asarray(h_np), jnp.asarray(t_np)
    losses = []
    for _ in range(steps):
        loss, w = train(w, h, t)
        losses.append(float(loss))
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)

    runs = {
        "single process": single(args.steps),
        "torch, 2 gloo ranks": torch_gloo(args.steps),
        "jax, 4-device mesh": jax_mesh(args.steps),
    }
    for name, losses in runs.items():
        print(f"{name:>20}: " + " ".join(f"{v:.10f}" for v in losses))
    reference = np.asarray(runs["single process"])
    worst = max(float(np.max(np.abs(np.asarray(v) - reference))) for v in runs.values())
    print(f"largest difference from the single process: {worst:.1e}")
    if worst > 1e-10:
        print("the losses differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
