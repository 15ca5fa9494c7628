"""Time xent against each backend's native cross-entropy over a grid of shapes, side by side.

    python benchmarks/run.py                     # the standard grid, table + scaling plot
    python benchmarks/run.py --heldout           # the held-out grid: other shapes, same range
    python benchmarks/run.py --quick             # four shapes, three rounds (about a minute)
    python benchmarks/run.py --sizes 256x10 4096x32768 --backends torch numpy
    python benchmarks/run.py --dry-run           # what would run or be skipped, and why
    python benchmarks/run.py --heldout --fresh   # each shape and backend in a new process

For every shape N x C (float32 logits of shape (N, C), int labels of shape (N,), mean reduction)
and every installed backend it times xent and that backend's own loss on the same data in the
same run: PyTorch eager (against ``F.cross_entropy``, float32 and bfloat16), PyTorch
``torch.compile`` (both sides compiled), NumPy and array-api-strict (against the plain
``max/exp/sum/log`` expression with a fancy-index pick), JAX under ``jit`` (against Optax's
``softmax_cross_entropy_with_integer_labels``, float32 and bfloat16) and Dask (the plain
expression on the same row chunks). Forward, and forward+backward where the library
differentiates (NumPy's forward+backward reference is the hand-written softmax-minus-one-hot
gradient, against ``xent.cross_entropy_and_grad``).

Timing: a shape's backends run one after another, each with its own arrays, freed before the
next; the candidates of a backend (xent and its reference, every pass and dtype) run in turn
within each round (load on a shared machine hits them alike); each sample repeats a candidate
until it lasts about 30 ms; the figure is the median of the rounds. The run prints the load
average (``/proc/loadavg``) before and after, and writes the Markdown table (``--markdown``) and
a log-log plot of time per call against N x C (``--plot``). A backend whose arrays would not fit
in memory on their own is skipped at that shape, with the reason printed. ``--fresh`` times
each shape and backend in a new process, so that no shape inherits the allocator's state
that the shapes before it left (which decides whether large temporaries page-fault at every
call).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import xent

GiB = 2**30
GRID = (
    "256x10", "32x1000", "4096x10", "512x1000", "16384x100", "64x50257", "2048x8192",
    "4096x32768", "1024x128256", "8192x131072",
)  # fmt: skip
HELDOUT = (
    "128x128", "1000x30", "8x32000", "8192x32", "100000x10", "2000x5000", "1024x50257",
    "16384x8192", "4096x65536",
)  # fmt: skip
"""The held-out grid: shapes not in ``GRID`` over the same range of sizes and shapes (narrow,
square, wide; 16 thousand to 268 million elements), for checking that a speed-up holds beyond
the shapes it was tuned on."""
QUICK = ("256x10", "4096x10", "512x1000", "2048x8192")
COMPILED = ("256x10", "512x1000", "2048x8192", "128x128", "1000x30", "2000x5000")
"""``torch.compile`` recompiles per shape (tens of seconds each on two cores): three shapes of
each grid."""

BIG = 2**26
"""Above this many elements only the float32 rows of NumPy, PyTorch eager and JAX are timed
(the others would take minutes per shape)."""

SAMPLE_SECONDS = 0.03
MEMORY_CAP = 20 * GiB

BACKENDS = ("torch", "numpy", "jax", "dask", "strict")


@dataclass
class Case:
    """One timed candidate: ``run()`` does the work and blocks until it is done."""

    backend: str  # "torch eager fp32"
    step: str  # "fwd" or "fwd+bwd"
    size: str
    name: str
    run: Callable[[], Any]
    reference: bool = False
    times: list[float] = field(default_factory=list)
    repeat: int = 1

    @property
    def group(self) -> tuple[str, str, str]:
        return (self.backend, self.step, self.size)


# --------------------------------------------------------------------------- numpy & strict
def _plain(xp: Any, x: Any, y: Any) -> Any:
    """The plain expression: max, exp, sum, log, and the label's logit picked by index."""
    m = xp.max(x, axis=1, keepdims=True)
    lse = xp.log(xp.sum(xp.exp(x - m), axis=1)) + m[:, 0]
    picked = xp.take_along_axis(x, y[:, None], axis=1)[:, 0]
    return xp.mean(lse - picked)


def numpy_cases(n: int, c: int, rng: np.random.Generator, big: bool) -> list[Case]:
    x = rng.standard_normal((n, c), dtype=np.float32)
    y = rng.integers(0, c, n)
    rows = np.arange(n)

    def plain() -> Any:
        m = x.max(axis=1, keepdims=True)
        return np.mean(np.log(np.exp(x - m).sum(axis=1)) + m[:, 0] - x[rows, y])

    def plain_grad() -> Any:
        m = x.max(axis=1, keepdims=True)
        e = np.exp(x - m)
        s = e.sum(axis=1, keepdims=True)
        loss = np.mean(np.log(s[:, 0]) + m[:, 0] - x[rows, y])
        e /= s
        e[rows, y] -= 1
        e /= n
        return loss, e

    size = f"{n}x{c}"
    return [
        Case("numpy fp32", "fwd", size, "plain expression", plain, reference=True),
        Case("numpy fp32", "fwd", size, "xent", lambda: xent.cross_entropy(x, y)),
        Case("numpy fp32", "fwd+bwd", size, "plain expression", plain_grad, reference=True),
        Case("numpy fp32", "fwd+bwd", size, "xent", lambda: xent.cross_entropy_and_grad(x, y)),
    ]


def strict_cases(n: int, c: int, rng: np.random.Generator, big: bool) -> list[Case]:
    if big:
        return []
    import array_api_strict as xp

    x = xp.asarray(rng.standard_normal((n, c), dtype=np.float32))
    y = xp.asarray(rng.integers(0, c, n))
    size = f"{n}x{c}"
    return [
        Case("array-api-strict fp32", "fwd", size, "plain expression", lambda: _plain(xp, x, y), True),
        Case("array-api-strict fp32", "fwd", size, "xent", lambda: xent.cross_entropy(x, y)),
    ]  # fmt: skip


def dask_cases(n: int, c: int, rng: np.random.Generator, big: bool) -> list[Case]:
    if big:
        return []
    import array_api_compat.dask.array as xp
    import dask
    import dask.array as da

    chunk = max(1, min(n, (16 * 2**20) // (4 * c)))  # row chunks of about 16 MiB
    x = da.from_array(rng.standard_normal((n, c), dtype=np.float32), chunks=(chunk, c))
    y = da.from_array(rng.integers(0, c, n), chunks=(chunk,))

    def plain() -> Any:
        m = xp.max(x, axis=1, keepdims=True)
        lse = xp.log(xp.sum(xp.exp(x - m), axis=1)) + m[:, 0]
        picked = xp.sum(xp.where(y[:, None] == xp.arange(c)[None, :], x, 0), axis=1)
        return dask.compute(xp.mean(lse - picked), scheduler="threads")[0]

    def ours() -> Any:
        return dask.compute(xent.cross_entropy(x, y), scheduler="threads")[0]

    size = f"{n}x{c}"
    return [
        Case("dask fp32", "fwd", size, "plain expression", plain, reference=True),
        Case("dask fp32", "fwd", size, "xent", ours),
    ]


# --------------------------------------------------------------------------- torch
def torch_cases(n: int, c: int, rng: np.random.Generator, big: bool, compile_: bool) -> list[Case]:
    import torch
    import torch.nn.functional as F

    size = f"{n}x{c}"
    x32 = torch.from_numpy(rng.standard_normal((n, c), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, c, n))
    variants: list[tuple[str, torch.dtype, Callable[..., Any], Callable[..., Any]]] = [
        ("torch eager fp32", torch.float32, F.cross_entropy, xent.cross_entropy)
    ]
    if not big:
        variants.append(("torch eager bf16", torch.bfloat16, F.cross_entropy, xent.cross_entropy))
    if compile_ and size in COMPILED:
        variants.append(
            (
                "torch compile fp32",
                torch.float32,
                torch.compile(F.cross_entropy, fullgraph=True, dynamic=False),
                torch.compile(xent.cross_entropy, fullgraph=True, dynamic=False),
            )
        )
    cases = []
    for backend, dtype, ref, ours in variants:
        x = x32.to(dtype)
        xg = x.detach().requires_grad_(True)  # the same storage: no second copy of the logits

        def fwd(fn: Callable[..., Any], x: Any = x) -> Callable[[], Any]:
            def run() -> Any:
                with torch.no_grad():
                    return fn(x, y)

            return run

        def fwd_bwd(fn: Callable[..., Any], xg: Any = xg) -> Callable[[], Any]:
            def run() -> Any:
                xg.grad = None
                fn(xg, y).backward()
                return xg.grad

            return run

        for step, wrap in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            cases.append(Case(backend, step, size, "F.cross_entropy", wrap(ref), reference=True))
            cases.append(Case(backend, step, size, "xent", wrap(ours)))
    return cases


# --------------------------------------------------------------------------- jax
def jax_cases(n: int, c: int, rng: np.random.Generator, big: bool) -> list[Case]:
    import jax
    import jax.numpy as jnp
    import optax

    size = f"{n}x{c}"
    x32 = jnp.asarray(rng.standard_normal((n, c), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, c, n).astype(np.int32))

    def optax_loss(a: Any, b: Any) -> Any:
        return optax.softmax_cross_entropy_with_integer_labels(a, b).mean()

    def xent_loss(a: Any, b: Any) -> Any:
        return xent.cross_entropy(a, b)

    cases = []
    for backend, dtype in (("jax jit fp32", jnp.float32), ("jax jit bf16", jnp.bfloat16)):
        if big and dtype != jnp.float32:
            continue
        x = x32.astype(dtype)
        for step in ("fwd", "fwd+bwd"):
            for name, fn, ref in (("optax", optax_loss, True), ("xent", xent_loss, False)):
                f = jax.jit(fn if step == "fwd" else jax.value_and_grad(fn))

                def run(f: Any = f, x: Any = x) -> Any:
                    return jax.block_until_ready(f(x, y))

                cases.append(Case(backend, step, size, name, run, reference=ref))
    return cases


# --------------------------------------------------------------------------- driver
def _installed(*names: str) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in names)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return MEMORY_CAP


def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


# Peak working set per backend, in multiples of the float32 logits (inputs, the reference's
# full-size temporaries, gradients; measured by peak RSS at 2048 x 65536 and 4096 x 65536: NumPy
# 3.0, PyTorch 4.1, JAX 3.0), with a margin. A shape's backends run one at a time, so each needs
# its own share only.
_FOOTPRINT = {"numpy": 3.5, "torch": 4.5, "jax": 3.5, "dask": 3.0, "strict": 4.0}
_MARGIN = 1.5 * GiB
"""Memory left to the rest of the machine, beyond a backend's share."""
_NEEDS = {"torch": ("torch",), "jax": ("jax", "optax"), "dask": ("dask",), "strict": ("array_api_strict",)}  # fmt: skip


def _shape(size: str) -> tuple[int, int]:
    n, c = (int(v) for v in size.lower().split("x"))
    return n, c


def plan(size: str, name: str) -> str | None:
    """Why backend ``name`` is skipped at ``size`` (not installed, too big, time budget), or
    None where it runs."""
    n, c = _shape(size)
    needs = _NEEDS.get(name, ())
    if not _installed(*needs):
        return f"{' and '.join(needs)} not installed"
    if n * c > BIG and name in ("dask", "strict"):
        return f"above {BIG} elements (time budget)"
    need = _FOOTPRINT[name] * 4 * n * c
    limit = min(MEMORY_CAP, _available_memory() - _MARGIN)
    if need > limit:
        return (
            f"needs about {need / GiB:.1f} GiB, {limit / GiB:.1f} GiB usable (MemAvailable less "
            f"{_MARGIN / GiB:.1f}, at most {MEMORY_CAP / GiB:.0f})"
        )
    return None


def build(size: str, name: str, compile_: bool) -> list[Case]:
    """The cases of backend ``name`` at ``size``, their arrays made afresh."""
    n, c = _shape(size)
    big = n * c > BIG
    rng = np.random.default_rng(0)
    makers: dict[str, Callable[[], list[Case]]] = {
        "numpy": lambda: numpy_cases(n, c, rng, big),
        "torch": lambda: torch_cases(n, c, rng, big, compile_),
        "jax": lambda: jax_cases(n, c, rng, big),
        "dask": lambda: dask_cases(n, c, rng, big),
        "strict": lambda: strict_cases(n, c, rng, big),
    }
    return makers[name]()


def measure(cases: list[Case], rounds: int) -> None:
    for case in cases:  # warm-up (compilation, first touch of pages), then calibration
        case.run()
        t0 = time.perf_counter()
        case.run()
        case.repeat = max(1, math.ceil(SAMPLE_SECONDS / max(time.perf_counter() - t0, 1e-7)))
    for _ in range(rounds):
        for case in cases:
            t0 = time.perf_counter()
            for _ in range(case.repeat):
                case.run()
            case.times.append((time.perf_counter() - t0) / case.repeat)


def results(cases: list[Case]) -> list[dict[str, Any]]:
    out = []
    groups = dict.fromkeys(c.group for c in cases)
    for g in groups:
        members = [c for c in cases if c.group == g]
        ref = next(c for c in members if c.reference)
        ours = next(c for c in members if not c.reference)
        n, c = (int(v) for v in g[2].split("x"))
        out.append(
            {
                "backend": g[0], "step": g[1], "size": g[2], "elements": n * c,
                "reference": ref.name, "ref_s": statistics.median(ref.times),
                "xent_s": statistics.median(ours.times),
            }
        )  # fmt: skip
        out[-1]["ratio"] = out[-1]["xent_s"] / out[-1]["ref_s"]
    return out


def _time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def table(rows: list[dict[str, Any]], column: str = "N x C", key: str = "size") -> str:
    """The Markdown table of ``rows``; ``column`` heads what ``key`` holds (an N x C shape, or
    ``cases.py``'s case); bold: over the target (1.0x; 1.3x under 1e5 elements)."""
    lines = [
        f"| backend | pass | {column} | reference | reference time | xent time "
        "| xent / reference |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        flag = "**" if r["ratio"] > (1.3 if r["elements"] < 1e5 else 1.0) else ""
        what = r[key].replace("x", " x ") if key == "size" else r[key]
        lines.append(
            f"| {r['backend']} | {r['step']} | {what} | {r['reference']} "
            f"| {_time(r['ref_s'])} | {_time(r['xent_s'])} | {flag}{r['ratio']:.2f}x{flag} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["backend"], r["step"]) for r in rows))
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.3 * nrows), squeeze=False)
    for ax, (backend, step) in zip(axes.flat, panels, strict=False):
        mine = sorted((r for r in rows if (r["backend"], r["step"]) == (backend, step)),
                      key=lambda r: r["elements"])  # fmt: skip
        e = [r["elements"] for r in mine]
        ax.loglog(e, [r["ref_s"] for r in mine], "o-", color="tab:blue", label=mine[0]["reference"])
        ax.loglog(e, [r["xent_s"] for r in mine], "s-", color="tab:orange", label="xent")
        ax.set_title(f"{backend} {step}", fontsize=9)
        ax.set_xlabel("N x C (elements)", fontsize=8)
        ax.set_ylabel("seconds per call", fontsize=8)
        ax.grid(True, which="major", lw=0.4)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"xent and each backend's own cross-entropy ({platform.machine()}, "
                 f"{os.cpu_count()} CPUs)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


_JSON_MARK = "#rows "
"""The line prefix of a child process's rows (``--json-rows``)."""


def report(text: str, header: str, start: float, markdown: Path | None) -> None:
    """Print the load after a run that began at ``start`` and its table ``text``; write both,
    with ``header``, to ``markdown`` where given."""
    load, took = _load(), time.perf_counter() - start
    print(f"# load average after: {load}; {took:.0f} s\n")
    print(text)
    if markdown:
        markdown.write_text(
            f"<!-- {header} -->\n\nLoad average (1, 5, 15 min) after the run: {load}; "
            f"the run took {took:.0f} s.\n\n{text}\n"
        )


def _in_fresh_process(
    size: str, name: str, rounds: int, compile_: bool, generic: bool
) -> list[dict[str, Any]]:
    """The rows of backend ``name`` at ``size``, timed by this script in a new process.

    A process carries its C allocator's history from shape to shape: whether a temporary of
    megabytes comes from the heap or page-faults anew at every call depends on what was
    allocated and freed before (glibc moves its mmap and trim thresholds as it goes). A new
    process per shape and backend measures each as a program that runs only it would.
    """
    command = [
        sys.executable, __file__, "--json-rows", "--sizes", size, "--backends", name,
        "--rounds", str(rounds),
    ]  # fmt: skip
    if not compile_:
        command.append("--no-compile")
    if generic:
        command.append("--generic")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(_JSON_MARK):
            rows: list[dict[str, Any]] = json.loads(line[len(_JSON_MARK) :])
            return rows
    print(f"# {size} {name}: the process failed\n{done.stdout}{done.stderr}", flush=True)
    return []


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="four shapes, three rounds")
    parser.add_argument("--heldout", action="store_true", help="the held-out grid of shapes")
    parser.add_argument(
        "--dry-run", action="store_true", help="print what would run or be skipped, time nothing"
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--sizes", nargs="+", default=None, help="NxC, e.g. 4096x32768")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    parser.add_argument("--generic", action="store_true", help="xent with native overrides off")
    parser.add_argument(
        "--plot",
        type=lambda v: Path(v) if v else None,
        default=here / "scaling.png",
        help='where the plot goes ("" for none)',
    )
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="each shape and backend in a new Python process (no allocator history carried over)",
    )
    parser.add_argument("--json-rows", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    sizes = args.sizes or (HELDOUT if args.heldout else QUICK if args.quick else GRID)
    rounds = args.rounds or (3 if args.quick else 5)
    compile_ = not (args.quick or args.no_compile)
    if args.generic:
        xent.backends.set_native(False)
    header = (
        f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"NumPy {np.__version__}, xent native={xent.backends.native_enabled()}, "
        f"rounds={rounds}; command: python benchmarks/run.py {' '.join(argv or sys.argv[1:])}"
    )
    print(f"# {header}\n# load average before: {_load()}", flush=True)
    if args.dry_run:
        for size in sizes:
            for name in args.backends:
                why = plan(size, name)
                print(f"# {size} {name}: " + ("runs" if why is None else f"skipped, {why}"))
        return 0
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for size in sizes:
        n, c = _shape(size)
        for name in args.backends:
            why = plan(size, name)
            if why is not None:
                print(f"# {size} {name}: skipped, {why}", flush=True)
                continue
            if args.fresh:
                new = _in_fresh_process(size, name, rounds, compile_, args.generic)
            else:
                cases = build(size, name, compile_)
                measure(cases, rounds if n * c <= BIG else 3)
                new = results(cases)
                del cases
                gc.collect()  # this backend's arrays go before the next one's are made
            rows += new
            if args.json_rows:
                print(_JSON_MARK + json.dumps(new), flush=True)
                continue
            if new:
                print(table(new).split("\n", 2)[-1], flush=True)
    if args.json_rows:
        return 0
    order = {b: i for i, b in enumerate(dict.fromkeys(r["backend"] for r in rows))}
    rows.sort(key=lambda r: (order[r["backend"]], r["step"], r["elements"]))
    report(table(rows), header, start, args.markdown)
    if args.plot:
        plot(rows, args.plot)
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
