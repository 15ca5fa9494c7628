"""Bytes each rank sends for the vocab-parallel cross-entropy, against an all-gather of logits.

Runs ``--world`` gloo ranks on this machine. Each holds ``rows x vocab / world`` logits and
computes the loss and the gradient of its slice with ``xent.parallel.cross_entropy`` through a
``TorchGroup`` whose all-reduces count the bytes they are given; the alternative, gathering the
full logits on every rank and calling ``xent.cross_entropy``, sends the local logits once
(``torch.distributed.all_gather``). Both are timed (median of ``--repeat``) and printed.

    python benchmarks/parallel.py --rows 1024 --vocab 8192 --world 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import xent
import xent.parallel


class CountingGroup(xent.parallel.TorchGroup):
    """A TorchGroup that adds up the bytes this rank hands to each all-reduce."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    def _all_reduce(self, x: Any, op: Any) -> Any:
        self.sent += x.numel() * x.element_size()
        return super()._all_reduce(x, op)


def _rank(rank: int, world: int, store: str, rows: int, vocab: int, repeat: int) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        local = vocab // world
        start = rank * local
        x = torch.randn(rows, local, dtype=torch.float32)
        t = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(0))
        group = CountingGroup()
        group.class_count(local, x)  # learned once per group, not per step

        def parallel_step() -> None:
            xl = x.clone().requires_grad_(True)
            xent.parallel.cross_entropy(
                xl, t, class_start=start, group=group, label_smoothing=0.1
            ).backward()

        def gather_step() -> int:
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x)
            full = torch.cat(parts, dim=1).requires_grad_(True)
            xent.cross_entropy(full, t, label_smoothing=0.1).backward()
            return x.numel() * x.element_size()

        parallel_step()
        group.sent = 0
        parallel_step()
        sent_parallel = group.sent
        sent_gather = gather_step()
        times: dict[str, list[float]] = {"parallel": [], "gather": []}
        for _ in range(repeat):
            for name, fn in (("parallel", parallel_step), ("gather", gather_step)):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        if rank == 0:
            mib = 2.0**20
            print(f"{world} gloo ranks, {rows} rows x {vocab} classes float32, label smoothing")
            print(
                f"xent.parallel.cross_entropy: {sent_parallel} bytes sent per rank per step "
                f"({sent_parallel / rows:.0f} per row), "
                f"median {statistics.median(times['parallel']) * 1e3:.1f} ms fwd+bwd"
            )
            print(
                f"all-gather of the logits   : {sent_gather} bytes ({sent_gather / mib:.1f} MiB) "
                f"sent per rank per step, "
                f"median {statistics.median(times['gather']) * 1e3:.1f} ms fwd+bwd"
            )
            print(f"ratio: {sent_gather / sent_parallel:.0f}x fewer bytes with xent.parallel")
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(
            _rank, args=(args.world, store, args.rows, args.vocab, args.repeat), nprocs=args.world
        )


if __name__ == "__main__":
    main()
