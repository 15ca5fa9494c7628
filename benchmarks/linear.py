"""Time and peak extra memory of xent's linear cross-entropy against the naive composition.

    python benchmarks/linear.py [--sizes 4096x512x32768 ...] [--cases ...] [--threads 1]
                                [--reps 2] [--plot benchmarks/linear_memory.png]

Forward+backward of the loss of ``hidden @ weight.T + bias`` (float32, class-index targets,
``"mean"``) for the gradients of ``hidden``, ``weight`` and ``bias``. Each case runs in its own
process (so one case's freed memory does not hide another's peak), restricted to as many cores
as ``--threads``, after one warm-up call; the best wall-clock time and that call's process CPU
time are reported:

- ``torch-naive``: ``F.cross_entropy(h @ W.T + b, y).backward()``; ``torch-naive-compiled`` is
  that under ``torch.compile``; ``torch-chunked``: torch's ``F.linear_cross_entropy(...,
  options=torch.nn.LinearCrossEntropyOptions())`` where the installed torch has it;
  ``torch-xent``: ``xent.linear_cross_entropy(...).backward()``. Peak extra memory: the rise of
  the process's resident set high-water mark (``VmHWM``, reset before the timed call) over its
  resident set before it.
- ``jax-naive`` / ``jax-xent``: ``jax.jit(jax.value_and_grad(...))``; memory is XLA's compiled
  temporary memory (``.lower(...).compile().memory_analysis()``, the outputs not counted).
- ``numpy-naive`` (``cross_entropy_and_grad`` of the full logits, then the three products) /
  ``numpy-xent`` (``linear_cross_entropy_and_grad``): peak of ``tracemalloc``, to which NumPy
  reports every buffer.

``--plot`` writes the peak extra memory against V (JAX from compilation alone, NumPy measured).

``--ratios`` times small and mid-size heads instead (:data:`RATIO_SIZES`, or ``--sizes``), each
against the composition in one process, in interleaved rounds on every core (``run.py``'s
timing and table): PyTorch eager float32 (forward, and forward+backward of the three
gradients) against ``F.cross_entropy(F.linear(h, W, b), y)``; NumPy (forward, and
``linear_cross_entropy_and_grad``) against the plain ``max/exp/sum/log`` expression of
``h @ W.T + b`` and its gradients ``G @ W``, ``G.T @ h``, ``sum(G)``; JAX ``jit`` (forward and
``value_and_grad``) against Optax's loss of ``h @ W.T + b``. The elements of a row are the
logits, ``N x V``.

    python benchmarks/linear.py --ratios [--sizes 256x64x1000 ...] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MiB = 2**20
CASES = (
    "torch-naive", "torch-naive-compiled", "torch-chunked", "torch-xent",
    "jax-naive", "jax-xent", "numpy-naive", "numpy-xent",
)  # fmt: skip


def _data(n: int, h: int, v: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((n, h), dtype=np.float32)
    weight = rng.standard_normal((v, h), dtype=np.float32) * np.float32(0.02)
    bias = np.zeros(v, dtype=np.float32)
    target = rng.integers(0, v, n)
    return hidden, weight, bias, target


RATIO_SIZES = (
    "32x16x10", "128x32x100", "64x64x300", "256x64x1000", "1024x128x512", "4096x64x1000",
    "512x256x5000", "2048x256x2048", "64x512x32000",
)  # fmt: skip
"""Heads of 320 to 4 million logits (one block of 16 MiB or less: xent's composition route)
and 2048 x 256 -> 2048 ... 64 x 512 -> 32000 near the budget."""


def _ratio_cases(size: str, backends: list[str]) -> list[Any]:
    """``run.py`` cases of the head ``size`` (``NxHxV``), xent against the composition."""
    from run import Case

    import xent

    n, h, v = (int(s) for s in size.split("x"))
    hidden, weight, bias, target = _data(n, h, v)
    label = f"{n}x{v}"  # run.py's rows are N x C: the logits
    cases: list[Any] = []

    def pair(backend: str, step: str, ref: str, ref_run: Any, ours: Any) -> None:
        cases.append(Case(backend, step, label, ref, ref_run, reference=True))
        cases.append(Case(backend, step, label, "xent", ours))

    if "torch" in backends:
        import torch
        import torch.nn.functional as F

        th, tw, tb, ty = (torch.from_numpy(a) for a in (hidden, weight, bias, target))
        gh, gw, gb = (a.clone().requires_grad_() for a in (th, tw, tb))
        pair("torch linear fp32", "fwd", "F.cross_entropy(F.linear)",
             lambda: F.cross_entropy(F.linear(th, tw, tb), ty),
             lambda: xent.linear_cross_entropy(th, tw, ty, bias=tb))  # fmt: skip

        def backward(loss: Any) -> None:
            loss.backward()
            for a in (gh, gw, gb):
                a.grad = None

        pair("torch linear fp32", "fwd+bwd", "F.cross_entropy(F.linear)",
             lambda: backward(F.cross_entropy(F.linear(gh, gw, gb), ty)),
             lambda: backward(xent.linear_cross_entropy(gh, gw, ty, bias=gb)))  # fmt: skip
    if "numpy" in backends:
        rows = np.arange(n)

        def plain() -> Any:
            z = hidden @ weight.T + bias
            m = z.max(axis=1, keepdims=True)
            e = np.exp(z - m)
            s = e.sum(axis=1, keepdims=True)
            return (np.log(s[:, 0]) + m[:, 0] - z[rows, target]).mean(), e, s

        def plain_grad() -> Any:
            loss, e, s = plain()
            g = e / s
            g[rows, target] -= 1.0
            g /= n
            return loss, (g @ weight, g.T @ hidden, g.sum(axis=0))

        pair("numpy linear fp32", "fwd", "plain expression", plain,
             lambda: xent.linear_cross_entropy(hidden, weight, target, bias=bias))  # fmt: skip
        pair("numpy linear fp32", "fwd+bwd", "plain expression", plain_grad,
             lambda: xent.linear_cross_entropy_and_grad(hidden, weight, target, bias=bias))  # fmt: skip
    if "jax" in backends:
        import jax
        import jax.numpy as jnp
        import optax

        jh, jw, jb, jy = (jnp.asarray(a) for a in (hidden, weight, bias, target))

        def composed(a: Any, w: Any, b: Any) -> Any:
            return optax.softmax_cross_entropy_with_integer_labels(a @ w.T + b, jy).mean()

        def fused(a: Any, w: Any, b: Any) -> Any:
            return xent.linear_cross_entropy(a, w, jy, bias=b)

        for step, wrap in (("fwd", jax.jit), ("fwd+bwd", None)):
            ref_f = jax.jit(composed if wrap else jax.value_and_grad(composed, argnums=(0, 1, 2)))
            our_f = jax.jit(fused if wrap else jax.value_and_grad(fused, argnums=(0, 1, 2)))
            pair("jax linear fp32", step, "optax of h @ W.T + b",
                 lambda f=ref_f: jax.block_until_ready(f(jh, jw, jb)),
                 lambda f=our_f: jax.block_until_ready(f(jh, jw, jb)))  # fmt: skip
    return cases


def _ratios(sizes: list[str], backends: list[str], rounds: int) -> None:
    from run import _load, measure, results, table

    start = time.perf_counter()
    print(f"# load average before: {_load()}", flush=True)
    rows = []
    for size in sizes:
        cases = _ratio_cases(size, backends)
        measure(cases, rounds)
        found = results(cases)
        for r in found:
            print(f"  {r['backend']} {r['step']} {size}: {r['ratio']:.2f}x", flush=True)
        rows.extend(found)
    print(f"# load average after: {_load()}; {time.perf_counter() - start:.0f} s\n")
    print(table(rows, column="N x V (logits)"))


def _rss() -> tuple[int, int]:
    """(resident set, its high-water mark) of this process in bytes."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _timed(run: Callable[[], Any], reps: int) -> tuple[float, float]:
    """The best wall-clock time of ``reps`` calls after a warm-up, and the process CPU time
    (every thread) of that call: on a loaded machine the wall clock also counts the time the
    process waited for a core, the CPU time only the work done."""
    run()
    best = (float("inf"), float("inf"))
    for _ in range(reps):
        start, cpu = time.perf_counter(), time.process_time()
        run()
        best = min(best, (time.perf_counter() - start, time.process_time() - cpu))
    return best


def _torch_case(case: str, n: int, h: int, v: int, reps: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    import xent

    arrays = [torch.from_numpy(a) for a in _data(n, h, v)]
    hidden, weight, bias = (a.requires_grad_() for a in arrays[:3])
    target = arrays[3]

    def naive(hd: Any, w: Any, b: Any) -> Any:
        return F.cross_entropy(hd @ w.T + b, target)

    if case == "torch-naive":
        loss_fn = naive
    elif case == "torch-naive-compiled":
        loss_fn = torch.compile(naive)
    elif case == "torch-chunked":
        if not hasattr(F, "linear_cross_entropy"):
            return {"skipped": f"torch {torch.__version__} has no F.linear_cross_entropy"}

        def loss_fn(hd: Any, w: Any, b: Any) -> Any:
            options = torch.nn.LinearCrossEntropyOptions()
            return F.linear_cross_entropy(hd, w, target, linear_bias=b, options=options)
    else:

        def loss_fn(hd: Any, w: Any, b: Any) -> Any:
            return xent.linear_cross_entropy(hd, w, target, bias=b)

    def run() -> None:
        loss_fn(hidden, weight, bias).backward()
        for a in (hidden, weight, bias):
            a.grad = None

    run()
    gc.collect()
    before, _ = _rss()
    _reset_hwm()
    run()
    _, peak = _rss()
    seconds, cpu = _timed(run, reps)
    return {
        "seconds": seconds, "cpu": cpu, "peak_mib": (peak - before) / MiB,
        "memory": "RSS high-water",
    }  # fmt: skip


def _jax_step(case: str, target: Any) -> Any:
    import jax

    import xent

    def naive(hd: Any, w: Any, b: Any) -> Any:
        return xent.cross_entropy(hd @ w.T + b, target)

    def fused(hd: Any, w: Any, b: Any) -> Any:
        return xent.linear_cross_entropy(hd, w, target, bias=b)

    return jax.jit(jax.value_and_grad(naive if case == "jax-naive" else fused, argnums=(0, 1, 2)))


def _jax_memory(case: str, n: int, h: int, v: int) -> float:
    import jax
    import jax.numpy as jnp

    spec = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((n, h), (v, h), (v,))]
    target = jnp.zeros((n,), dtype=jnp.int32)
    stats = _jax_step(case, target).lower(*spec).compile().memory_analysis()
    return float(stats.temp_size_in_bytes) / MiB


def _jax_case(case: str, n: int, h: int, v: int, reps: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    hidden, weight, bias, target = (jnp.asarray(a) for a in _data(n, h, v))
    step = _jax_step(case, target)

    def run() -> None:
        jax.block_until_ready(step(hidden, weight, bias))

    seconds, cpu = _timed(run, reps)
    return {
        "seconds": seconds,
        "cpu": cpu,
        "peak_mib": _jax_memory(case, n, h, v),
        "memory": "XLA temporaries",
    }


def _numpy_grads(case: str, arrays: tuple[np.ndarray, ...]) -> Any:
    import xent

    hidden, weight, bias, target = arrays
    if case == "numpy-xent":
        return xent.linear_cross_entropy_and_grad(hidden, weight, target, bias=bias)
    loss, g = xent.cross_entropy_and_grad(hidden @ weight.T + bias, target)
    return loss, (g @ weight, g.T @ hidden, g.sum(axis=0))


def _numpy_case(case: str, n: int, h: int, v: int, reps: int) -> dict[str, Any]:
    arrays = _data(n, h, v)
    _numpy_grads(case, arrays)
    gc.collect()
    tracemalloc.start()
    _numpy_grads(case, arrays)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    seconds, cpu = _timed(lambda: _numpy_grads(case, arrays), reps)
    return {"seconds": seconds, "cpu": cpu, "peak_mib": peak / MiB, "memory": "tracemalloc peak"}


def _one(case: str, n: int, h: int, v: int, reps: int, threads: int) -> dict[str, Any]:
    if hasattr(os, "sched_setaffinity"):
        # As many cores as threads: XLA's and YNNPACK's pools and xent's NumPy threads size
        # themselves from the cores a process may use, whatever the thread variables say.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    if case.startswith("torch"):
        import torch

        torch.set_num_threads(threads)
        return _torch_case(case, n, h, v, reps)
    if case.startswith("jax"):
        return _jax_case(case, n, h, v, reps)
    return _numpy_case(case, n, h, v, reps)


def _env(threads: int, case: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        OPENBLAS_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        XLA_FLAGS=f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
        f"intra_op_parallelism_threads={threads}",
    )
    if case.startswith("torch"):
        # Every large buffer from mmap and back to the system when freed, so the resident set
        # follows what is live (glibc's adaptive threshold would keep freed buffers resident).
        # Only where memory is read from the resident set: each such allocation page-faults
        # anew, which doubled the time of XLA's loop (2.7 s of CPU against 5.1 s) and would
        # distort the other libraries' timings.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    return env


def _spawn(argv: list[str], threads: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, *argv], capture_output=True, text=True,
        env=_env(threads, argv[1]), check=False,
    )  # fmt: skip
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1]}
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _plot(path: Path, n: int, h: int, vocab: list[int], threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for case, style in (
        ("jax-naive", "o--"), ("jax-xent", "o-"), ("numpy-naive", "s--"), ("numpy-xent", "s-"),
    ):  # fmt: skip
        ys = []
        for v in vocab:
            argv = ["--memory-only", case, str(n), str(h), str(v)]
            ys.append(_spawn(argv, threads).get("peak_mib", float("nan")))
            print(f"  {case} V={v}: {ys[-1]:.1f} MiB", flush=True)
        ax.plot(vocab, ys, style, label=case)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("vocabulary V")
    ax.set_ylabel("peak extra memory, fwd+bwd (MiB)")
    ax.set_title(f"linear cross-entropy, N={n}, H={h}, float32")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--case", "--memory-only"):
        mode, case, n, h, v = sys.argv[1:6]
        reps, threads = (int(a) for a in sys.argv[6:8]) if len(sys.argv) > 6 else (1, 1)
        if mode == "--case":
            result = _one(case, int(n), int(h), int(v), reps, threads)
        elif case.startswith("jax"):
            result = {"peak_mib": _jax_memory(case, int(n), int(h), int(v))}
        else:
            arrays = _data(int(n), int(h), int(v))
            tracemalloc.start()
            _numpy_grads(case, arrays)
            result = {"peak_mib": tracemalloc.get_traced_memory()[1] / MiB}
        print(json.dumps(result))
        return

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=None, help="NxHxV heads")
    parser.add_argument(
        "--ratios", action="store_true",
        help="time small and mid-size heads against the composition, in one process",
    )  # fmt: skip
    parser.add_argument("--backends", nargs="+", default=["torch", "numpy", "jax"],
                        choices=["torch", "numpy", "jax"], help="with --ratios")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5, help="with --ratios: timed rounds")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--threads", type=int, default=1, help="threads per case (default 1)")
    parser.add_argument("--reps", type=int, default=2, help="timed calls; the best is kept")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of peak memory against V")
    parser.add_argument("--plot-rows", type=int, default=1024)
    args = parser.parse_args()
    if args.ratios:
        _ratios(args.sizes or list(RATIO_SIZES), args.backends, args.rounds)
        return
    for size in args.sizes or ["4096x512x32768", "4096x512x131072"]:
        n, h, v = (int(s) for s in size.split("x"))
        print(f"N={n} H={h} V={v} float32 fwd+bwd, {args.threads} thread(s)", flush=True)
        print(f"  {'case':22s} {'time (s)':>9s} {'CPU (s)':>8s} {'peak extra (MiB)':>17s}")
        for case in args.cases:
            argv = ["--case", case, str(n), str(h), str(v), str(args.reps), str(args.threads)]
            r = _spawn(argv, args.threads)
            if "seconds" in r:
                print(
                    f"  {case:22s} {r['seconds']:9.3f} {r['cpu']:8.3f} {r['peak_mib']:17.1f}"
                    f"  ({r['memory']})"
                )
            else:
                print(f"  {case:22s} {r.get('skipped') or r.get('error')}")
            sys.stdout.flush()
    if args.plot is not None:
        vocab = [2**k for k in range(12, 18)]
        _plot(args.plot, args.plot_rows, 512, vocab, args.threads)


if __name__ == "__main__":
    main()
