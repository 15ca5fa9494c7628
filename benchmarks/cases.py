"""Time xent against the native loss on the options and layouts the shape grid leaves out.

    python benchmarks/cases.py                   # every case, PyTorch and NumPy
    python benchmarks/cases.py --backends torch --only layout
    python benchmarks/cases.py --fresh           # each case and backend in a new process
    python benchmarks/cases.py --markdown cases.md

``run.py`` times the plain call (2-D logits, classes last, mean, no options) over a grid of
shapes. This script times the other members of the class, each against the native loss called
with the same options, in the same run, as ``run.py`` does:

- *options* at four 2-D shapes: class weights, label smoothing, a tenth of the rows ignored,
  ``reduction="none"`` and ``"sum"``, int32 labels, probability targets (``probs``, against
  the native loss with the same targets), and the binary cross-entropy of logits (``binary``:
  ``xent.binary_cross_entropy`` of the ``N x C`` logits against float targets in ``[0, 1]``,
  against ``F.binary_cross_entropy_with_logits``, Optax's ``sigmoid_binary_cross_entropy`` and
  NumPy's ``max(x, 0) - x y + log1p(exp(-|x|))``), and the softmax family (``logsumexp``,
  ``log_softmax``, ``softmax`` against the framework's own: see :data:`FAMILY`);
- *layouts*: ``(B, T, V)`` logits with the classes last (against ``F.cross_entropy`` on the
  ``(B*T, V)`` view), PyTorch's ``(N, C, d1, ...)`` layout with the classes at axis 1
  (segmentation, sequences), a channels-last ``(N, C, H, W)`` and a column-major matrix.

PyTorch eager (float32 and bfloat16; forward, and forward+backward of the loss's sum) against
``torch.nn.functional.cross_entropy``; NumPy (forward, and ``cross_entropy_and_grad``) against
the plain ``max/exp/sum/log`` expression along the class axis with the same options, and its
softmax-minus-one-hot gradient; JAX under ``jit`` (float32 and bfloat16, forward and
``value_and_grad`` of the loss's sum) against Optax's loss along the class axis with the same
options, as an Optax user writes them (``smooth_labels`` of a one-hot, weights and ignored rows
by ``where``; JAX arrays have no strides, so its layouts are the contiguous ones); Dask
(``probs`` and ``binary`` only, row chunks of about 16 MiB; forward and ``_and_grad``) against
the plain expression and its gradient on the same chunks. Timing, rounds and the table are
``run.py``'s.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import _JSON_MARK, Case, _load, measure, report
from run import table as run_table

import xent

OPTION_SHAPES = ("256x10", "32x1000", "512x1000", "2048x8192")
OPTIONS = ("weight", "smoothing", "ignored", "none", "sum", "int32", "probs", "binary")
FAMILY = ("logsumexp", "log_softmax", "softmax")
"""The softmax family, timed as options of the same shapes: xent's function against the
framework's own along the last axis (``torch.logsumexp``/``log_softmax``/``softmax``,
``jax.nn.logsumexp``/``log_softmax``/``softmax``, NumPy's plain expression), forward, and
forward+backward of the sum of squares on PyTorch and JAX."""
LAYOUTS: dict[str, tuple[str, int, str]] = {
    # name: (shape, class axis, memory layout)
    "BxTxV 2x16x1000": ("2x16x1000", -1, "contiguous"),
    "BxTxV 4x256x32000": ("4x256x32000", -1, "contiguous"),
    "NxCxL 32x1000x16": ("32x1000x16", 1, "contiguous"),
    "NxCxL 16x1000x512": ("16x1000x512", 1, "contiguous"),
    "NxCxHxW 4x10x8x8": ("4x10x8x8", 1, "contiguous"),
    "NxCxHxW 8x21x64x64": ("8x21x64x64", 1, "contiguous"),
    "NxCxHxW 4x19x128x256": ("4x19x128x256", 1, "contiguous"),
    "NxCxHxW 8x21x256x256": ("8x21x256x256", 1, "contiguous"),
    "NxCxHxW 8x21x64x64 channels-last": ("8x21x64x64", 1, "channels-last"),
    "NxC 512x1000 column-major": ("512x1000", 1, "column-major"),
    "NxC 2048x8192 column-major": ("2048x8192", 1, "column-major"),
}
BACKENDS = ("torch", "numpy", "jax", "dask")


def _dims(shape: str) -> tuple[int, ...]:
    return tuple(int(v) for v in shape.split("x"))


def all_cases() -> list[str]:
    """Every case's name: ``"<shape> <option>"`` or a layout's name."""
    options = OPTIONS + FAMILY
    return [f"{s} {o}" for s in OPTION_SHAPES for o in options] + list(LAYOUTS)


def _problem(case: str, rng: np.random.Generator) -> dict[str, Any]:
    """The case's arrays (NumPy, float32 logits in their layout) and options."""
    if case in LAYOUTS:
        shape, axis, memory = LAYOUTS[case]
        dims = _dims(shape)
        x = rng.standard_normal(dims, dtype=np.float32)
        if memory == "column-major":
            x = np.asfortranarray(x)
        c = dims[axis]
        y = rng.integers(0, c, tuple(d for i, d in enumerate(dims) if i != axis % len(dims)))
        return {"x": x, "y": y, "axis": axis % len(dims), "memory": memory, "options": {},
                "kind": "index"}  # fmt: skip
    shape, option = case.split()
    n, c = _dims(shape)
    x = rng.standard_normal((n, c), dtype=np.float32)
    y = rng.integers(0, c, n)
    options: dict[str, Any] = {}
    if option == "weight":
        options["weight"] = rng.random(c, dtype=np.float32) + 0.5
    elif option == "smoothing":
        options["label_smoothing"] = 0.1
    elif option == "ignored":
        y[::10] = -100
    elif option in ("none", "sum"):
        options["reduction"] = option
    elif option == "int32":
        y = y.astype(np.int32)
    kind = option if option in ("probs", "binary", *FAMILY) else "index"
    if kind == "probs":
        y = rng.random((n, c), dtype=np.float32)
        y /= y.sum(axis=1, keepdims=True)
    elif kind == "binary":
        y = rng.random((n, c), dtype=np.float32)
    return {"x": x, "y": y, "axis": 1, "memory": "contiguous", "options": options, "kind": kind}


# --------------------------------------------------------------------------- torch
def torch_cases(case: str, rng: np.random.Generator) -> list[Case]:
    import torch
    import torch.nn.functional as F

    p = _problem(case, rng)
    axis, options, kind = p["axis"], dict(p["options"]), p["kind"]
    y = torch.from_numpy(p["y"])
    y_ref = y.long() if kind == "index" else y
    if "weight" in options:
        options["weight"] = torch.from_numpy(options["weight"])
    classes_last = axis == p["x"].ndim - 1 and p["x"].ndim > 2
    if kind in FAMILY:
        return _family_cases(case, kind, p["x"], "torch")
    cases = []
    for backend, dtype in (
        ("torch eager fp32", torch.float32),
        ("torch eager bf16", torch.bfloat16),
    ):
        x = torch.from_numpy(np.ascontiguousarray(p["x"])).to(dtype)
        if "weight" in options:  # F.cross_entropy takes weights of the logits' dtype only
            options = {**options, "weight": options["weight"].to(dtype)}
        if p["memory"] == "column-major":
            x = x.T.contiguous().T
        elif p["memory"] == "channels-last":
            x = x.contiguous(memory_format=torch.channels_last)
        xg = x.detach().requires_grad_(True)
        # dense targets in the logits' dtype, as F.cross_entropy needs them
        t = y if kind == "index" else y.to(dtype)

        def ref(a: Any, options: dict[str, Any] = options, t: Any = t) -> Any:
            if kind == "binary":
                return F.binary_cross_entropy_with_logits(a, t)
            if classes_last:
                return F.cross_entropy(a.reshape(-1, a.shape[-1]), y_ref.reshape(-1), **options)
            return F.cross_entropy(a, y_ref if kind == "index" else t, **options)

        def ours(a: Any, options: dict[str, Any] = options, t: Any = t) -> Any:
            if kind == "binary":
                return xent.binary_cross_entropy(a, t)
            return xent.cross_entropy(a, t, axis=axis, **options)

        reference = "F.binary_cross_entropy_with_logits" if kind == "binary" else "F.cross_entropy"
        for name, fn, is_ref in ((reference, ref, True), ("xent", ours, False)):

            def fwd(fn: Callable[..., Any] = fn, x: Any = x) -> Any:
                with torch.no_grad():
                    return fn(x)

            def fwd_bwd(fn: Callable[..., Any] = fn, xg: Any = xg) -> Any:
                xg.grad = None
                fn(xg).sum().backward()
                return xg.grad

            cases.append(Case(backend, "fwd", case, name, fwd, reference=is_ref))
            cases.append(Case(backend, "fwd+bwd", case, name, fwd_bwd, reference=is_ref))
    return cases


# --------------------------------------------------------------------------- jax
def _optax_loss(a: Any, y: Any, axis: int, options: dict[str, Any]) -> Any:
    """Optax's loss along ``axis`` with the case's options, written as an Optax user would."""
    import jax
    import jax.numpy as jnp
    import optax

    smoothing = options.get("label_smoothing", 0.0)
    ignored = y == -100
    safe = jnp.where(ignored, 0, y)
    if smoothing:
        onehot = jax.nn.one_hot(safe, a.shape[axis], axis=axis, dtype=a.dtype)
        targets = optax.smooth_labels(onehot, smoothing)
        rows = optax.softmax_cross_entropy(a, targets, axis=axis)
    else:
        rows = optax.softmax_cross_entropy_with_integer_labels(a, safe, axis=axis)
    w = options.get("weight")
    rw = jnp.where(ignored, 0.0, 1.0 if w is None else w[safe])
    reduction = options.get("reduction", "mean")
    if reduction == "none":
        return rows * rw
    return (rows * rw).sum() / (rw.sum() if reduction == "mean" else 1.0)


def jax_cases(case: str, rng: np.random.Generator) -> list[Case]:
    import jax
    import jax.numpy as jnp

    p = _problem(case, rng)
    if p["memory"] != "contiguous":
        return []  # JAX arrays have no strides: the same case as the contiguous layout
    import optax

    axis, given, kind = p["axis"], dict(p["options"]), p["kind"]
    if kind in FAMILY:
        return _family_cases(case, kind, p["x"], "jax")
    cases = []
    for backend, dtype in (("jax jit fp32", jnp.float32), ("jax jit bf16", jnp.bfloat16)):
        x = jnp.asarray(p["x"], dtype=dtype)
        y = jnp.asarray(p["y"]) if kind == "index" else jnp.asarray(p["y"], dtype=dtype)
        options = dict(given)
        if "weight" in options:
            options["weight"] = jnp.asarray(options["weight"])

        def ref(a: Any, b: Any, options: dict[str, Any] = options) -> Any:
            if kind == "binary":
                return optax.sigmoid_binary_cross_entropy(a, b).mean()
            if kind == "probs":
                return optax.softmax_cross_entropy(a, b, axis=axis).mean()
            return _optax_loss(a, b, axis, options)

        def ours(a: Any, b: Any, options: dict[str, Any] = options) -> Any:
            if kind == "binary":
                return xent.binary_cross_entropy(a, b)
            return xent.cross_entropy(a, b, axis=axis, **options)

        for name, fn, is_ref in (("optax", ref, True), ("xent", ours, False)):
            forward = jax.jit(fn)
            both = jax.jit(jax.value_and_grad(lambda a, b, fn=fn: jnp.sum(fn(a, b))))
            cases.append(Case(backend, "fwd", case, name,
                              lambda f=forward, x=x, y=y: jax.block_until_ready(f(x, y)),
                              reference=is_ref))  # fmt: skip
            cases.append(Case(backend, "fwd+bwd", case, name,
                              lambda f=both, x=x, y=y: jax.block_until_ready(f(x, y)),
                              reference=is_ref))  # fmt: skip
    return cases


# --------------------------------------------------------------------------- numpy
def _plain(x: np.ndarray, y: np.ndarray, axis: int, options: dict[str, Any], grad: bool) -> Any:
    """The plain expression along ``axis`` with the case's options (and its gradient)."""
    x = np.moveaxis(x, axis, -1)
    c = x.shape[-1]
    ignored = y == -100
    safe = np.where(ignored, 0, y)
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - m)
    s = e.sum(axis=-1, keepdims=True)
    lse = np.log(s[..., 0]) + m[..., 0]
    picked = np.take_along_axis(x, safe[..., None], axis=-1)[..., 0]
    rows = lse - picked
    smoothing = options.get("label_smoothing", 0.0)
    if smoothing:
        rows = (1 - smoothing) * rows + smoothing * (lse - x.mean(axis=-1))
    w = options.get("weight")
    rw = np.where(ignored, 0.0, 1.0 if w is None else w[safe]).astype(np.float32)
    reduction = options.get("reduction", "mean")
    scale = rw if reduction != "mean" else rw / rw.sum()
    loss = rows * rw if reduction == "none" else (rows * scale).sum()
    if not grad:
        return loss
    e /= s
    e *= scale[..., None]
    np.put_along_axis(e, safe[..., None], np.take_along_axis(e, safe[..., None], -1)
                      - (1 - smoothing) * scale[..., None], -1)  # fmt: skip
    if smoothing:
        e -= smoothing / c * scale[..., None]
    return loss, np.moveaxis(e, -1, axis)


def _plain_dense(x: np.ndarray, t: np.ndarray, kind: str, grad: bool) -> Any:
    """The plain expression of the dense-target losses (classes last) and their gradient:
    probability targets (``-sum(t * log_softmax(x))``, mean over rows) or the binary
    cross-entropy of logits (mean over elements)."""
    if kind == "binary":
        loss = (np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))).mean()
        return (loss, (1 / (1 + np.exp(-x)) - t) / x.size) if grad else loss
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - m)
    s = e.sum(axis=-1, keepdims=True)
    lp = x - m - np.log(s)
    loss = -(t * lp).sum(axis=-1).mean()
    if not grad:
        return loss
    e /= s
    e -= t
    e /= x.shape[0]
    return loss, e


_DENSE = {
    "binary": (xent.binary_cross_entropy, xent.binary_cross_entropy_and_grad),
    "probs": (xent.cross_entropy, xent.cross_entropy_and_grad),
}
"""The loss and its ``_and_grad`` twin of each dense-target kind."""


def numpy_cases(case: str, rng: np.random.Generator) -> list[Case]:
    p = _problem(case, rng)
    x, y, axis, options = p["x"], p["y"], p["axis"], p["options"]
    backend = "numpy fp32"
    if p["kind"] in FAMILY:
        return _family_cases(case, p["kind"], x, "numpy")
    if p["kind"] != "index":
        kind = p["kind"]
        loss, both = _DENSE[kind]
        return [
            Case(backend, "fwd", case, "plain expression",
                 lambda: _plain_dense(x, y, kind, False), reference=True),
            Case(backend, "fwd", case, "xent", lambda: loss(x, y)),
            Case(backend, "fwd+bwd", case, "plain expression",
                 lambda: _plain_dense(x, y, kind, True), reference=True),
            Case(backend, "fwd+bwd", case, "xent", lambda: both(x, y)),
        ]  # fmt: skip
    if p["memory"] == "channels-last":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        x = np.moveaxis(x, -1, 1)
    return [
        Case(backend, "fwd", case, "plain expression", lambda: _plain(x, y, axis, options, False),
             reference=True),
        Case(backend, "fwd", case, "xent", lambda: xent.cross_entropy(x, y, axis=axis, **options)),
        Case(backend, "fwd+bwd", case, "plain expression",
             lambda: _plain(x, y, axis, options, True), reference=True),
        Case(backend, "fwd+bwd", case, "xent",
             lambda: xent.cross_entropy_and_grad(x, y, axis=axis, **options)),
    ]  # fmt: skip


# --------------------------------------------------------------------------- the family
def _family_cases(case: str, kind: str, x_np: np.ndarray, library: str) -> list[Case]:
    """xent's ``kind`` against the library's own along the last axis: PyTorch eager and JAX
    ``jit`` (float32 and bfloat16; forward, and forward+backward of the sum of squares),
    NumPy (forward, against the plain expression)."""
    ours = getattr(xent, kind)
    if library == "numpy":

        def plain() -> Any:
            m = x_np.max(axis=-1, keepdims=True)
            if kind == "softmax":
                e = np.exp(x_np - m)
                return e / e.sum(axis=-1, keepdims=True)
            lse = np.log(np.exp(x_np - m).sum(axis=-1, keepdims=True))
            return (m + lse)[..., 0] if kind == "logsumexp" else x_np - m - lse

        return [
            Case("numpy fp32", "fwd", case, "plain expression", plain, reference=True),
            Case("numpy fp32", "fwd", case, "xent", lambda: ours(x_np)),
        ]
    cases = []
    if library == "torch":
        import torch

        native = {"logsumexp": torch.logsumexp, "log_softmax": torch.log_softmax,
                  "softmax": torch.softmax}[kind]  # fmt: skip
        for backend, dtype in (
            ("torch eager fp32", torch.float32),
            ("torch eager bf16", torch.bfloat16),
        ):
            x = torch.from_numpy(x_np).to(dtype)
            xg = x.detach().requires_grad_(True)
            for name, fn, is_ref in (
                (f"torch.{kind}", lambda a: native(a, -1), True),
                ("xent", ours, False),
            ):

                def fwd(fn: Callable[..., Any] = fn, x: Any = x) -> Any:
                    with torch.no_grad():
                        return fn(x)

                def fwd_bwd(fn: Callable[..., Any] = fn, xg: Any = xg) -> Any:
                    xg.grad = None
                    (fn(xg).float() ** 2).sum().backward()
                    return xg.grad

                cases.append(Case(backend, "fwd", case, name, fwd, reference=is_ref))
                cases.append(Case(backend, "fwd+bwd", case, name, fwd_bwd, reference=is_ref))
        return cases
    import jax
    import jax.numpy as jnp

    native = getattr(jax.nn, kind)
    for backend, dtype in (("jax jit fp32", jnp.float32), ("jax jit bf16", jnp.bfloat16)):
        x = jnp.asarray(x_np, dtype=dtype)
        for name, fn, is_ref in ((f"jax.nn.{kind}", native, True), ("xent", ours, False)):
            forward = jax.jit(fn)
            both = jax.jit(jax.value_and_grad(
                lambda a, fn=fn: jnp.sum(fn(a).astype(jnp.float32) ** 2)))  # fmt: skip
            cases.append(Case(backend, "fwd", case, name,
                              lambda f=forward, x=x: jax.block_until_ready(f(x)),
                              reference=is_ref))  # fmt: skip
            cases.append(Case(backend, "fwd+bwd", case, name,
                              lambda f=both, x=x: jax.block_until_ready(f(x)),
                              reference=is_ref))  # fmt: skip
    return cases


# --------------------------------------------------------------------------- dask
def dask_cases(case: str, rng: np.random.Generator) -> list[Case]:
    """The dense targets on Dask (forward, and ``_and_grad``), row chunks of about 16 MiB as in
    ``run.py``'s Dask rows, against the plain expression on the same chunks; the options and
    layouts of class indices are ``run.py``'s Dask rows' business (its grid)."""
    p = _problem(case, rng)
    kind = p["kind"]
    if kind not in ("probs", "binary"):
        return []
    import dask
    import dask.array as da

    n, c = p["x"].shape
    chunk = max(1, min(n, (16 * 2**20) // (4 * c)))
    x = da.from_array(p["x"], chunks=(chunk, c))
    t = da.from_array(p["y"], chunks=(chunk, c))

    def plain(grad: bool) -> Any:
        if kind == "binary":
            loss = (da.maximum(x, 0) - x * t + da.log1p(da.exp(-abs(x)))).mean()
            parts = (loss, (1 / (1 + da.exp(-x)) - t) / x.size) if grad else (loss,)
        else:
            m = x.max(axis=1, keepdims=True)
            e = da.exp(x - m)
            s = e.sum(axis=1, keepdims=True)
            loss = -(t * (x - m - da.log(s))).sum(axis=1).mean()
            parts = (loss, (e / s - t) / n) if grad else (loss,)
        return dask.compute(*parts, scheduler="threads")

    def ours(grad: bool) -> Any:
        out = _DENSE[kind][grad](x, t)
        return dask.compute(*(out if grad else (out,)), scheduler="threads")

    backend = "dask fp32"
    return [
        Case(backend, "fwd", case, "plain expression", lambda: plain(False), reference=True),
        Case(backend, "fwd", case, "xent", lambda: ours(False)),
        Case(backend, "fwd+bwd", case, "plain expression", lambda: plain(True), reference=True),
        Case(backend, "fwd+bwd", case, "xent", lambda: ours(True)),
    ]


# --------------------------------------------------------------------------- driver
def _elements(case: str) -> int:
    return math.prod(_dims(LAYOUTS[case][0] if case in LAYOUTS else case.split()[0]))


def results(cases: list[Case]) -> list[dict[str, Any]]:
    out = []
    for g in dict.fromkeys(c.group for c in cases):
        members = [c for c in cases if c.group == g]
        ref = next(c for c in members if c.reference)
        ours = next(c for c in members if not c.reference)
        row = {
            "backend": g[0], "step": g[1], "case": g[2], "elements": _elements(g[2]),
            "reference": ref.name, "ref_s": statistics.median(ref.times),
            "xent_s": statistics.median(ours.times),
        }  # fmt: skip
        row["ratio"] = row["xent_s"] / row["ref_s"]
        out.append(row)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    return run_table(rows, column="case", key="case")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--only", choices=("options", "layout"), default=None)
    parser.add_argument("--cases", nargs="+", default=None, help="case names, as printed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--fresh", action="store_true", help="each case in a new process")
    parser.add_argument("--json-rows", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = args.cases or [
        c for c in all_cases()
        if args.only is None or (c in LAYOUTS) == (args.only == "layout")
    ]  # fmt: skip
    header = (
        f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"rounds={args.rounds}; command: python benchmarks/cases.py "
        f"{' '.join(argv or sys.argv[1:])}"
    )
    if not args.json_rows:
        print(f"# {header}\n# load average before: {_load()}", flush=True)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    makers = {"torch": torch_cases, "numpy": numpy_cases, "jax": jax_cases, "dask": dask_cases}
    for name in names:
        for backend in args.backends:
            if args.fresh:
                command = [sys.executable, __file__, "--json-rows", "--cases", name,
                           "--backends", backend, "--rounds", str(args.rounds)]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                new = [json.loads(line[len(_JSON_MARK):]) for line in done.stdout.splitlines()
                       if line.startswith(_JSON_MARK)]  # fmt: skip
                new = new[0] if new else []
                if not new:
                    print(f"# {name} {backend}: the process failed\n{done.stderr}", flush=True)
            else:
                cases = makers[backend](name, np.random.default_rng(0))
                measure(cases, args.rounds)
                new = results(cases)
                del cases
                gc.collect()
            rows += new
            if args.json_rows:
                print(_JSON_MARK + json.dumps(new), flush=True)
            elif new:
                print(table(new).split("\n", 2)[-1], flush=True)
    if args.json_rows:
        return 0
    report(table(rows), header, start, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
