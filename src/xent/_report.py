"""The report printed by ``python -m xent``: what xent finds, whether it is right, how fast it is.

For every array library and device it can import, the report gives the version, the largest error
of xent over a fixed set of cases against a float64 NumPy reference (computed with the backends'
native overrides on and off), and the time of xent next to the library's own loss on one size.
Only NumPy is required: the other libraries are imported here, lazily. The output is plain text;
progress goes to stderr, one line per step.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from . import __version__, backends, cross_entropy
from ._typing import Reduction

TOLERANCE = 1e-5
"""Largest accepted error of a float32 loss, relative to ``max(1, |reference|)``."""

DEFAULT_SIZE = (4096, 8192)
"""Rows and classes of the timed problem (float32 logits, 128 MiB)."""

_CHECK_CLASSES = 7
_IGNORE = -100
_ON_GPU = "on an NVIDIA GPU: pip install"


# ---------------------------------------------------------------------------------------------
# What a backend on one device is, and how to find them.


@dataclass
class Target:
    """One backend on one device: how to move data there and back, and the two losses to time."""

    backend: str
    device: str
    version: str
    to_device: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]
    native_name: str
    native: Callable[[Any, Any], Any]
    xent: Callable[[Any, Any], Any] = cross_entropy
    ready: Callable[[Any], object] = lambda out: out
    device_name: str = ""


@dataclass
class Missing:
    """A backend or device that is not there, and what would bring it."""

    backend: str
    device: str
    reason: str
    install: str


@dataclass
class Result:
    """What the report measured for one target."""

    target: Target
    error: float | None = None
    failure: str | None = None
    xent_s: float | None = None
    native_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None and self.error is not None and self.error <= TOLERANCE


def _naive(xp: Any, gather: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """The loss as written without xent: ``mean(logsumexp(x) - x[y])`` from max, exp, sum, log."""

    def loss(x: Any, y: Any) -> Any:
        m = xp.max(x, axis=-1, keepdims=True)
        lse = xp.log(xp.sum(xp.exp(x - m), axis=-1)) + m[..., 0]
        return xp.mean(lse - gather(x, y))

    return loss


def _take_along(xp: Any) -> Callable[[Any, Any], Any]:
    return lambda x, y: xp.take_along_axis(x, y[..., None], axis=-1)[..., 0]


def _find_numpy() -> Iterator[Target | Missing]:
    yield Target(
        "numpy",
        "cpu",
        np.__version__,
        to_device=np.asarray,
        to_numpy=np.asarray,
        native_name="naive expression",
        native=_naive(np, _take_along(np)),
    )


def _find_strict() -> Iterator[Target | Missing]:
    try:
        import array_api_strict as xp
    except ImportError:
        yield Missing("array_api_strict", "cpu", "not installed", "pip install array-api-strict")
        return
    yield Target(
        "array_api_strict",
        "cpu",
        xp.__version__,
        to_device=xp.asarray,
        to_numpy=np.asarray,
        native_name="naive expression",
        native=_naive(xp, _take_along(xp)),
    )


def _find_torch() -> Iterator[Target | Missing]:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        yield Missing("torch", "cpu, cuda", "not installed", "pip install torch==2.13.0")
        return
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    else:
        yield Missing("torch", "cuda", "no CUDA device", f"{_ON_GPU} torch==2.13.0")

    def ready(out: Any) -> object:
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        return out

    def to_device(a: np.ndarray, device: str) -> Any:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    for name in devices:
        yield Target(
            "torch",
            name,
            torch.__version__,
            to_device=partial(to_device, device=name),
            to_numpy=lambda t: t.detach().cpu().numpy(),
            native_name="F.cross_entropy",
            native=F.cross_entropy,
            ready=ready,
            device_name=torch.cuda.get_device_name() if name == "cuda" else "",
        )


def _find_jax() -> Iterator[Target | Missing]:
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        yield Missing("jax", "cpu, gpu", "not installed", "pip install jax")
        return
    try:
        import optax

        def reference(x: Any, y: Any) -> Any:
            return optax.losses.softmax_cross_entropy_with_integer_labels(x, y).mean()

        native_name = "optax (jit)"
    except ImportError:

        def reference(x: Any, y: Any) -> Any:
            picked = jnp.take_along_axis(jax.nn.log_softmax(x), y[:, None], axis=-1)
            return -jnp.mean(picked)

        native_name = "jax.nn.log_softmax (jit)"

    def to_device(a: np.ndarray, device: Any) -> Any:
        # JAX without x64 holds no int64; class indices fit int32 whatever the setting.
        return jax.device_put(a.astype(np.int32) if a.dtype == np.int64 else a, device)

    platforms = {d.platform: d for d in reversed(jax.devices())}
    platforms.setdefault("cpu", jax.devices("cpu")[0])
    if "gpu" not in platforms:
        yield Missing("jax", "gpu", "no GPU device", f"{_ON_GPU} 'jax[cuda12]'")
    for name, device in sorted(platforms.items()):
        yield Target(
            "jax",
            name,
            jax.__version__,
            to_device=partial(to_device, device=device),
            to_numpy=np.asarray,
            native_name=native_name,
            native=jax.jit(reference),
            xent=jax.jit(cross_entropy),
            ready=lambda out: out.block_until_ready(),
            device_name="" if name == "cpu" else device.device_kind,
        )


def _find_cupy() -> Iterator[Target | Missing]:
    try:
        import cupy
    except ImportError:
        yield Missing("cupy", "cuda", "not installed", f"{_ON_GPU} cupy-cuda12x")
        return
    if not cupy.is_available():
        yield Missing("cupy", "cuda", "no CUDA device", f"{_ON_GPU} cupy-cuda12x")
        return

    def ready(out: Any) -> object:
        cupy.cuda.get_current_stream().synchronize()
        return out

    yield Target(
        "cupy",
        "cuda",
        cupy.__version__,
        to_device=cupy.asarray,
        to_numpy=cupy.asnumpy,
        native_name="naive expression",
        native=_naive(cupy, _take_along(cupy)),
        ready=ready,
        device_name=cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
    )


def _find_dask() -> Iterator[Target | Missing]:
    try:
        import dask.array as da
    except ImportError:
        yield Missing("dask", "cpu", "not installed", "pip install 'dask[array]'")
        return

    def to_device(a: np.ndarray) -> Any:
        # Two or more chunks along the rows, so that the check sees a chunked reduction.
        rows = max(1, (a.shape[0] + 1) // 2)
        return da.from_array(a, chunks=(rows, *a.shape[1:]))  # type: ignore[no-untyped-call,unused-ignore]

    def one_hot_gather(x: Any, y: Any) -> Any:
        # dask.array has no take_along_axis (dask/dask#3663); a one-hot compare stays lazy.
        return da.where(y[..., None] == da.arange(x.shape[-1]), x, 0).sum(axis=-1)

    yield Target(
        "dask",
        "cpu",
        _version("dask"),
        to_device=to_device,
        to_numpy=lambda a: np.asarray(a.compute()),
        native_name="naive expression",
        native=_naive(da, one_hot_gather),
        ready=lambda out: out.compute(),
    )


FINDERS: tuple[tuple[str, Callable[[], Iterator[Target | Missing]]], ...] = (
    ("numpy", _find_numpy),
    ("array_api_strict", _find_strict),
    ("torch", _find_torch),
    ("jax", _find_jax),
    ("cupy", _find_cupy),
    ("dask", _find_dask),
)


# ---------------------------------------------------------------------------------------------
# The conformance quick-check.


@dataclass(frozen=True)
class Case:
    """A loss call of the quick-check: the target kind, the options, and the reduction."""

    name: str
    probabilities: bool
    options: dict[str, Any]
    reduction: Reduction
    shape: tuple[int, ...] = (6, _CHECK_CLASSES)
    axis: int = -1


_WEIGHT = tuple(np.linspace(0.5, 2.0, _CHECK_CLASSES).tolist())

# name: (probability targets, options, shape, axis); every scenario runs with every reduction.
_SCENARIOS: dict[str, tuple[bool, dict[str, Any], tuple[int, ...], int]] = {
    "class indices": (False, {}, (6, _CHECK_CLASSES), -1),
    "probabilities": (True, {}, (6, _CHECK_CLASSES), -1),
    "class weights": (False, {"weight": _WEIGHT}, (6, _CHECK_CLASSES), -1),
    "ignore_index": (False, {"ignore_index": _IGNORE}, (6, _CHECK_CLASSES), -1),
    "label smoothing": (False, {"label_smoothing": 0.1}, (6, _CHECK_CLASSES), -1),
    "smoothed probabilities": (True, {"label_smoothing": 0.2}, (6, _CHECK_CLASSES), -1),
    "all options, (N, C, d) with axis=1": (
        False,
        {"weight": _WEIGHT, "ignore_index": _IGNORE, "label_smoothing": 0.05},
        (3, _CHECK_CLASSES, 4),
        1,
    ),
}
_REDUCTIONS: tuple[Reduction, ...] = ("mean", "sum", "none")


def _cases() -> list[Case]:
    return [
        Case(name, probabilities, options, reduction, shape, axis)
        for (name, (probabilities, options, shape, axis)), reduction in itertools.product(
            _SCENARIOS.items(), _REDUCTIONS
        )
    ]


def _case_data(case: Case) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(sum(map(ord, case.name)))
    logits = (3 * rng.standard_normal(case.shape)).astype(np.float32)
    classes = case.shape[case.axis]
    if case.probabilities:
        raw = rng.random(case.shape).astype(np.float32)
        return logits, raw / raw.sum(axis=case.axis, keepdims=True)
    label_shape = tuple(n for i, n in enumerate(case.shape) if i != case.axis % len(case.shape))
    labels = rng.integers(0, classes, size=label_shape)
    if case.options.get("ignore_index") == _IGNORE:
        labels.flat[::3] = _IGNORE
    return logits, labels


def reference_loss(
    logits: np.ndarray,
    target: np.ndarray,
    *,
    axis: int = -1,
    weight: np.ndarray | None = None,
    ignore_index: int = _IGNORE,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
) -> np.ndarray:
    """The loss of docs/semantics.md in float64 NumPy, written for clarity rather than speed."""
    x = np.moveaxis(logits.astype(np.float64), axis, -1)
    classes = x.shape[-1]
    m = x.max(axis=-1, keepdims=True)
    lp = x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    w = np.ones(classes) if weight is None else weight.astype(np.float64)
    e = label_smoothing
    if np.issubdtype(target.dtype, np.integer):
        valid = target != ignore_index
        safe = np.where(valid, target, 0)
        nll = -w[safe] * np.take_along_axis(lp, safe[..., None], axis=-1)[..., 0]
        smooth = -(w * lp).sum(axis=-1)
        loss = np.where(valid, (1 - e) * nll + e / classes * smooth, 0.0)
        denominator = np.where(valid, w[safe], 0.0).sum()
    else:
        q = (1 - e) * np.moveaxis(target.astype(np.float64), axis, -1) + e / classes
        loss = -(w * q * lp).sum(axis=-1)
        denominator = loss.size
    if reduction == "none":
        return loss
    total = loss.sum()
    return np.asarray(total if reduction == "sum" else total / denominator)


def check(target: Target, cases: Sequence[Case]) -> float:
    """Largest error of xent over ``cases`` on ``target``, native overrides on and off."""
    worst = 0.0
    previous = backends.native_enabled()
    try:
        for native, case in itertools.product((True, False), cases):
            backends.set_native(native)
            logits, labels = _case_data(case)
            options = dict(case.options)
            if "weight" in options:
                options["weight"] = np.asarray(options["weight"], dtype=np.float32)
            expected = reference_loss(
                logits, labels, axis=case.axis, reduction=case.reduction, **options
            )
            if "weight" in options:
                options["weight"] = target.to_device(options["weight"])
            got = cross_entropy(
                target.to_device(logits),
                target.to_device(labels),
                axis=case.axis,
                reduction=case.reduction,
                **options,
            )
            scale = np.maximum(1.0, np.abs(expected))
            got_np = target.to_numpy(got).astype(np.float64)
            if got_np.shape != expected.shape:
                raise AssertionError(
                    f"{case.name}, reduction={case.reduction!r}: shape {got_np.shape}, "
                    f"expected {expected.shape}"
                )
            error = float(np.max(np.abs(got_np - expected) / scale, initial=0.0))
            worst = max(worst, error if np.isfinite(error) else np.inf)
    finally:
        backends.set_native(previous)
    return worst


# ---------------------------------------------------------------------------------------------
# Timing.


def best_time(
    fn: Callable[[Any, Any], Any],
    ready: Callable[[Any], object],
    x: Any,
    y: Any,
    *,
    repeat: int,
    budget_s: float = 1.0,
) -> float:
    """Best wall time of ``ready(fn(x, y))`` over up to ``repeat`` runs after one warm-up run
    (which also compiles under ``jit``); stops early once ``budget_s`` is spent."""
    ready(fn(x, y))
    times: list[float] = []
    while len(times) < repeat and sum(times) < budget_s:
        start = time.perf_counter()
        ready(fn(x, y))
        times.append(time.perf_counter() - start)
    return min(times)


def timing_data(rows: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((rows, classes), dtype=np.float32)
    labels = rng.integers(0, classes, size=rows)
    return logits, labels


# ---------------------------------------------------------------------------------------------
# Running it and showing progress.


class _Progress:
    """One line per step on stderr: ``[3/12] torch cpu: timing xent on ...``."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0

    def start(self, total: int) -> None:
        self.total, self.done = total, 0

    def step(self, text: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)


def measure(size: tuple[int, int], repeat: int) -> tuple[list[Result], list[Missing]]:
    """Find every backend and device, then check and time xent on each."""
    progress = _Progress()
    found: list[Target] = []
    missing: list[Missing] = []
    progress.start(len(FINDERS))
    for name, find in FINDERS:
        progress.step(f"looking for {name}")
        for item in find():
            if isinstance(item, Target):
                found.append(item)
            else:
                missing.append(item)

    cases = _cases()
    logits, labels = timing_data(*size)
    results = [Result(t) for t in found]
    progress.start(3 * len(found))
    for result in results:
        t = result.target
        where = f"{t.backend} {t.device}"
        try:
            progress.step(f"{where}: checking {len(cases)} cases against float64 NumPy")
            result.error = check(t, cases)
            x, y = t.to_device(logits), t.to_device(labels)
            progress.step(f"{where}: timing xent on {size[0]} x {size[1]} float32")
            result.xent_s = best_time(t.xent, t.ready, x, y, repeat=repeat)
            progress.step(f"{where}: timing {t.native_name}")
            result.native_s = best_time(t.native, t.ready, x, y, repeat=repeat)
        except Exception as exc:  # one failing backend must not hide the others
            result.failure = f"{type(exc).__name__}: {exc}"
    return results, missing


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def header(results: Sequence[Result]) -> list[tuple[str, str]]:
    lines = [
        ("xent", __version__),
        ("array-api-compat", _version("array-api-compat")),
        ("python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("platform", f"{platform.platform()}, {os.cpu_count()} CPUs"),
        ("native overrides", "on" if backends.native_enabled() else "off (XENT_NATIVE=0)"),
    ]
    names = {r.target.device: r.target.device_name for r in results if r.target.device_name}
    return lines + sorted(names.items())


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.3f}"


def _ratio(result: Result) -> str:
    if result.xent_s is None or not result.native_s:
        return "-"
    return f"{result.xent_s / result.native_s:.2f}x"


def _error(result: Result) -> str:
    if result.error is None:
        return "-"
    return f"{result.error:.1e} {'ok' if result.error <= TOLERANCE else 'FAIL'}"


COLUMNS = ("backend", "device", "version", "max error", "xent ms", "native ms", "ratio", "native")
MISSING_COLUMNS = ("backend", "device", "reason", "install")


def rows(results: Sequence[Result]) -> list[tuple[str, ...]]:
    return [
        (
            r.target.backend,
            r.target.device,
            r.target.version,
            _error(r),
            _ms(r.xent_s),
            _ms(r.native_s),
            _ratio(r),
            r.target.native_name,
        )
        for r in results
    ]


def footnotes(results: Sequence[Result], size: tuple[int, int]) -> list[str]:
    notes = [
        f"max error: largest |xent - reference| / max(1, |reference|) over {len(_cases())} "
        f"float32 cases ({'; '.join(_SCENARIOS)}; each reduction), native overrides on and off, "
        f"against a float64 NumPy reference; ok when <= {TOLERANCE:.0e}.",
        f"times: best wall time after a warm-up run, forward pass, mean loss of {size[0]} x "
        f"{size[1]} float32 logits with class indices; ratio = xent / native, lower is better; "
        "naive expression = max, exp, sum, log and a gather, written without xent.",
    ]
    notes += [
        f"FAILED {r.target.backend} {r.target.device}: {r.failure}" for r in results if r.failure
    ]
    return notes


def _align(table: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]


def render(results: Sequence[Result], missing: Sequence[Missing], size: tuple[int, int]) -> str:
    """The report as plain text: the header, one row per target, what is missing, footnotes."""
    lines = ["xent report", *_align(header(results), "  "), ""]
    lines += _align([COLUMNS, *rows(results)])
    if missing:
        lines += ["", "Not available:"]
        lines += _align(
            [MISSING_COLUMNS, *((m.backend, m.device, m.reason, m.install) for m in missing)], "  "
        )
    lines += ["", *footnotes(results, size)]
    return "\n".join(lines)


def run(size: tuple[int, int] = DEFAULT_SIZE, repeat: int = 5) -> int:
    """Print the report; return 0 if every check passed, 1 otherwise."""
    results, missing = measure(size, repeat)
    print(render(results, missing, size))
    return 0 if all(r.ok for r in results) else 1
