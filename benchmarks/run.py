"""Time xent against each installed backend's native cross-entropy, side by side.

    python benchmarks/run.py [--quick] [--rounds N] [--sizes 4096x32768 ...] [--backends ...]

For every size and backend it measures xent and the references on the same data in the same
run, forward and forward+backward, taking the candidates in turn within each round (so load on
a shared machine hits all of them alike); a fast candidate is repeated within its sample until
the sample lasts about 50 ms. It prints the median time, the ratio to the row's
reference and the peak extra memory, and writes a PNG of the ratios (``--plot``).

Peak memory: NumPy through ``tracemalloc`` (NumPy reports its buffers to it, so the figure is
exact); CUDA through the allocator's peak counters; PyTorch CPU and JAX CPU by sampling the
process's resident set every millisecond (approximate, marked ``~``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import platform
import statistics
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import xent

MiB = 2**20
FULL_SIZES = ("32x32768", "4096x32768", "1024x128256")
QUICK_SIZES = ("512x32768",)


@dataclass
class Case:
    """One timed candidate: ``run()`` does the work and blocks until it is done."""

    group: str  # "numpy fwd 4096x32768"
    name: str
    run: Callable[[], Any]
    reference: bool = False
    memory: str = "rss"  # "tracemalloc", "cuda", "cupy", "rss" or "none"
    times: list[float] = field(default_factory=list)
    repeat: int = 1  # runs per timing sample (set by the warm-up)
    peak: float | None = None
    peak_approx: bool = False


# --------------------------------------------------------------------------- memory
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _peak_rss(run: Callable[[], Any]) -> float:
    gc.collect()
    base = _rss()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out = run()
    peak = max(peak, _rss())
    done.set()
    t.join()
    del out
    return (peak - base) / MiB


def _peak(case: Case) -> None:
    if case.memory == "tracemalloc":
        gc.collect()
        tracemalloc.start()
        out = case.run()
        case.peak = tracemalloc.get_traced_memory()[1] / MiB
        tracemalloc.stop()
        del out
    elif case.memory == "cuda":
        import torch

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = case.run()
        case.peak = (torch.cuda.max_memory_allocated() - base) / MiB
        del out
    elif case.memory == "cupy":
        import cupy

        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()
        base = pool.used_bytes()
        out = case.run()
        case.peak = (pool.total_bytes() - base) / MiB
        del out
    elif case.memory == "rss":
        case.peak = _peak_rss(case.run)
        case.peak_approx = True


# --------------------------------------------------------------------------- numpy
def numpy_cases(n: int, c: int, rng: np.random.Generator) -> list[Case]:
    import array_api_compat.numpy as xp

    x = rng.standard_normal((n, c), dtype=np.float32)
    y = rng.integers(0, c, n)
    rows = np.arange(n)

    def naive() -> Any:
        # The plain array-API expression: max, exp, sum, log, each a full-size temporary.
        m = xp.max(x, axis=-1, keepdims=True)
        lse = xp.log(xp.sum(xp.exp(x - m), axis=-1, keepdims=True)) + m
        picked = xp.take_along_axis(x, y[:, None], axis=-1)
        return xp.mean(lse - picked)

    def scipy_lse() -> Any:
        from scipy.special import logsumexp

        return np.mean(logsumexp(x, axis=-1) - x[rows, y])

    def chunked(block_bytes: int = 16 * MiB) -> Any:
        # What a careful NumPy user writes: rows in blocks, one reused scratch buffer.
        step = max(1, block_bytes // (c * 4))
        buf = np.empty((min(step, n), c), dtype=np.float32)
        lse = np.empty(n, dtype=np.float32)
        for s in range(0, n, step):
            b = x[s : s + step]
            t = buf[: b.shape[0]]
            m = b.max(axis=1, keepdims=True)
            np.subtract(b, m, out=t)
            np.exp(t, out=t)
            lse[s : s + step] = np.log(t.sum(axis=1)) + m[:, 0]
        return np.mean(lse - x[rows, y])

    def chunked_grad(block_bytes: int = 16 * MiB) -> Any:
        step = max(1, block_bytes // (c * 4))
        g = np.empty_like(x)
        lse = np.empty(n, dtype=np.float32)
        for s in range(0, n, step):
            b = x[s : s + step]
            t = g[s : s + step]
            m = b.max(axis=1, keepdims=True)
            np.subtract(b, m, out=t)
            np.exp(t, out=t)
            z = t.sum(axis=1, keepdims=True)
            t /= z
            lse[s : s + step] = np.log(z[:, 0]) + m[:, 0]
        g[rows, y] -= 1
        g /= n
        return np.mean(lse - x[rows, y]), g

    size = f"{n}x{c}"
    fwd = f"numpy fwd {size}"
    bwd = f"numpy fwd+bwd {size}"
    return [
        Case(fwd, "chunked in-place loop", chunked, reference=True, memory="tracemalloc"),
        Case(fwd, "xent", lambda: xent.cross_entropy(x, y), memory="tracemalloc"),
        Case(fwd, "naive array-API expr", naive, memory="tracemalloc"),
        Case(fwd, "scipy logsumexp", scipy_lse, memory="tracemalloc"),
        Case(bwd, "chunked in-place loop", chunked_grad, reference=True, memory="tracemalloc"),
        Case(bwd, "xent", lambda: xent.cross_entropy_and_grad(x, y), memory="tracemalloc"),
    ]


# --------------------------------------------------------------------------- torch
def torch_cases(n: int, c: int, rng: np.random.Generator, *, compile_: bool) -> list[Case]:
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [case for dev in devices for case in _torch_device(dev, n, c, rng, compile_)]


def _torch_device(dev: str, n: int, c: int, rng: np.random.Generator, compile_: bool) -> list[Case]:
    import torch
    import torch.nn.functional as F

    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    x = torch.from_numpy(rng.standard_normal((n, c), dtype=np.float32)).to(dev, dtype)
    y = torch.from_numpy(rng.integers(0, c, n)).to(dev)
    xg = x.detach().clone().requires_grad_(True)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    memory = "cuda" if dev == "cuda" else "rss"

    def fwd(fn: Callable[..., Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                out = fn(x, y)
            sync()
            return out

        return run

    def fwd_bwd(fn: Callable[..., Any]) -> Callable[[], Any]:
        def run() -> Any:
            xg.grad = None
            fn(xg, y).backward()
            sync()
            return xg.grad

        return run

    impls: list[tuple[str, Callable[..., Any], bool]] = [
        ("F.cross_entropy", F.cross_entropy, True),
        ("xent", xent.cross_entropy, False),
    ]
    if compile_:
        impls.append(("torch.compile(F.cross_entropy)", torch.compile(F.cross_entropy), False))
    if dev == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers.functional import liger_cross_entropy

        impls.append(("Liger cross_entropy", liger_cross_entropy, False))
    label = f"torch-{dev} {'bf16 ' if dtype == torch.bfloat16 else ''}"
    cases = [
        Case(f"{label}fwd {n}x{c}", name, fwd(fn), reference=ref, memory=memory)
        for name, fn, ref in impls
    ]
    cases += [
        Case(f"{label}fwd+bwd {n}x{c}", name, fwd_bwd(fn), reference=ref, memory=memory)
        for name, fn, ref in impls
    ]
    return cases


# --------------------------------------------------------------------------- jax
def jax_cases(n: int, c: int, rng: np.random.Generator) -> list[Case]:
    import jax
    import jax.numpy as jnp
    import optax

    x = jnp.asarray(rng.standard_normal((n, c), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, c, n).astype(np.int32))

    def optax_loss(a: Any, b: Any) -> Any:
        return optax.softmax_cross_entropy_with_integer_labels(a, b).mean()

    def xent_loss(a: Any, b: Any) -> Any:
        return xent.cross_entropy(a, b)

    cases = []
    for kind in ("fwd", "fwd+bwd"):
        for name, fn, ref in (("optax (jit)", optax_loss, True), ("xent (jit)", xent_loss, False)):
            f = jax.jit(fn if kind == "fwd" else jax.value_and_grad(fn))
            f(x, y)  # compile outside the timing

            def run(f: Any = f) -> Any:
                return jax.block_until_ready(f(x, y))

            cases.append(Case(f"jax fwd{'' if kind == 'fwd' else '+bwd'} {n}x{c}", name, run, ref))
    return cases


# --------------------------------------------------------------------------- cupy
def cupy_cases(n: int, c: int, rng: np.random.Generator) -> list[Case]:
    import cupy as cp

    x = cp.asarray(rng.standard_normal((n, c), dtype=np.float32))
    y = cp.asarray(rng.integers(0, c, n))

    def naive() -> Any:
        m = x.max(axis=1, keepdims=True)
        out = cp.mean(cp.log(cp.exp(x - m).sum(axis=1)) + m[:, 0] - x[cp.arange(n), y])
        cp.cuda.Device().synchronize()
        return out

    def ours() -> Any:
        out = xent.cross_entropy(x, y)
        cp.cuda.Device().synchronize()
        return out

    g = f"cupy fwd {n}x{c}"
    return [
        Case(g, "naive cupy expr", naive, reference=True, memory="cupy"),
        Case(g, "xent", ours, memory="cupy"),
    ]


# --------------------------------------------------------------------------- driver
def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _cupy_usable() -> bool:
    if not _installed("cupy"):
        return False
    try:
        import cupy

        return bool(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return False


def build(size: str, backends: list[str], compile_: bool) -> list[Case]:
    n, c = (int(v) for v in size.lower().split("x"))
    rng = np.random.default_rng(0)
    cases: list[Case] = []
    if "numpy" in backends:
        cases += numpy_cases(n, c, rng)
    if "torch" in backends and _installed("torch"):
        cases += torch_cases(n, c, rng, compile_=compile_)
    if "jax" in backends and _installed("jax") and _installed("optax"):
        cases += jax_cases(n, c, rng)
    if "cupy" in backends and _cupy_usable():
        cases += cupy_cases(n, c, rng)
    return cases


SAMPLE_SECONDS = 0.05
"""Each timing sample repeats a fast candidate until it lasts about this long (as ``timeit``
does), so millisecond cases are not one cold call right after another library's work."""


def measure(cases: list[Case], rounds: int) -> None:
    for case in cases:  # warm-up: compilation, first-touch of pages, caches; calibration
        case.run()
        t0 = time.perf_counter()
        case.run()
        case.repeat = max(1, math.ceil(SAMPLE_SECONDS / max(time.perf_counter() - t0, 1e-6)))
    for _ in range(rounds):
        for case in cases:
            t0 = time.perf_counter()
            for _ in range(case.repeat):
                case.run()
            case.times.append((time.perf_counter() - t0) / case.repeat)
    for case in cases:
        _peak(case)


def rows(cases: list[Case]) -> list[dict[str, Any]]:
    out = []
    refs = {c.group: statistics.median(c.times) for c in cases if c.reference}
    for c in cases:
        med = statistics.median(c.times)
        ref = refs.get(c.group)
        peak = "-" if c.peak is None else f"{'~' if c.peak_approx else ''}{max(c.peak, 0):.0f}"
        out.append(
            {
                "group": c.group,
                "name": c.name + (" (ref)" if c.reference else ""),
                "ms": med * 1e3,
                "ratio": med / ref if ref else float("nan"),
                "peak": peak,
                "is_xent": c.name.startswith("xent"),
            }
        )
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| case | implementation | median ms | ratio to ref | peak extra MiB |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:
        name = f"**{r['name']}**" if r["is_xent"] else r["name"]
        lines.append(f"| {r['group']} | {name} | {r['ms']:.1f} | {r['ratio']:.2f}x | {r['peak']} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r["group"] for r in results))
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(results) + 1.5))
    labels, values, colors = [], [], []
    for g in groups:
        for r in (r for r in results if r["group"] == g):
            labels.append(f"{g} | {r['name']}")
            values.append(r["ratio"])
            colors.append("tab:orange" if r["is_xent"] else "tab:blue")
    ypos = np.arange(len(values))[::-1]
    ax.barh(ypos, values, color=colors)
    ax.set_yticks(ypos, labels, fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("median time / reference (lower is better; xent in orange)")
    ax.set_title(f"xent vs native cross-entropy ({platform.processor() or platform.machine()})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one mid-size case, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--sizes", nargs="+", default=None, help="NxC, e.g. 4096x32768")
    parser.add_argument(
        "--backends", nargs="+", default=["numpy", "torch", "jax", "cupy"],
        help="any of numpy torch jax cupy (those not installed are skipped)",
    )  # fmt: skip
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    parser.add_argument("--generic", action="store_true", help="xent with native overrides off")
    parser.add_argument("--plot", type=Path, default=here / "results.png")
    args = parser.parse_args(argv)

    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    rounds = args.rounds or (3 if args.quick else 5)
    compile_ = not (args.quick or args.no_compile)
    if args.generic:
        xent.backends.set_native(False)
    import os

    print(
        f"# {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
        f"numpy {np.__version__}, xent native={xent.backends.native_enabled()}, "
        f"rounds={rounds}"
    )
    results: list[dict[str, Any]] = []
    for size in sizes:
        cases = build(size, args.backends, compile_)
        measure(cases, rounds)
        results += rows(cases)
        del cases
        gc.collect()
        print(table([r for r in results if size in r["group"]]).split("\n", 2)[-1], flush=True)
    print()
    print(table(results))
    if args.plot:
        plot(results, args.plot)
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
