"""Sessions for developing xent: ``nox`` runs the default set, ``nox -l`` lists them all.

Every test session installs PyTorch, the reference the conformance tests compare against, pinned to
the release whose CPU build this project's machines keep on local disk (an unpinned ``torch`` pulls
a multi-GB CUDA build from PyPI). Arguments after ``--`` go to pytest: ``nox -s tests-jax -- -x``.
"""

from __future__ import annotations

import nox
from packaging.requirements import Requirement

nox.options.sessions = [
    "lint",
    "typecheck",
    "minimal",
    "tests-numpy",
    "tests-strict",
    "tests-torch",
    "tests-jax",
    "tests-dask",
    "docs",
]
nox.options.reuse_existing_virtualenvs = True
# The standard library's venv: nothing to download, and no uv (which would fetch a CUDA torch).
nox.options.default_venv_backend = "venv"

TORCH = "torch==2.13.0"
# What the conformance suite compares xent with, on every backend: PyTorch's losses, Optax, and
# Keras 3 (on its JAX backend); pytest-xdist runs one worker per CPU.
REFERENCES = (TORCH, "jax", "optax", "keras", "pytest-xdist")
RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"

_TEST_EXTRA = nox.project.load_toml("pyproject.toml")["project"]["optional-dependencies"]["test"]
# The core must run with nothing but its one dependency and NumPy / array-api-strict; the
# requirements are taken from the `test` extra so that their version bounds stay in one place.
_MINIMAL = [
    req
    for req in _TEST_EXTRA
    if Requirement(req).name in {"numpy", "array-api-strict", "pytest", "hypothesis"}
]


def _install(session: nox.Session, *args: str) -> None:
    # pip byte-compiles every file it installs (a minute for torch and jax on 2 cores); the
    # interpreter compiles only the modules a run imports.
    session.install("--no-compile", *args)


def _pytest(session: nox.Session, *backends: str, xdist: bool = True) -> None:
    """pytest on ``backends``; with ``xdist``, one worker per CPU (pytest-xdist's ``-n auto``)."""
    workers = ("-n", "auto") if xdist else ()
    session.run("pytest", *workers, *(f"--backend={name}" for name in backends), *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check of the whole repository."""
    _install(session, RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on src/xent, the tests and this file, with every CPU backend installed so
    that their types are seen (the files are listed in pyproject's ``[tool.mypy]``)."""
    _install(session, "-e", ".[numpy,torch,jax,dask,test]", TORCH, "optax", "nox", MYPY)
    # A cache of its own: one shared with another environment is rebuilt at every switch.
    session.run("mypy", "--cache-dir", f"{session.virtualenv.location}/.mypy_cache")


@nox.session
def minimal(session: nox.Session) -> None:
    """NumPy and array-api-strict with no optional library: proves the core has no hidden import."""
    _install(session, "-e", ".", *_MINIMAL)
    # Every docstring example: they need nothing but NumPy and array-api-strict, so they run
    # here, where an example that imported anything else would fail.
    session.run("pytest", "--doctest-modules", "src/xent")
    _pytest(session, "numpy", "numpy_readonly", "array_api_strict", xdist=False)


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (Sphinx, MyST Markdown, numpydoc), warnings as errors, into
    ``docs/_build/html``."""
    _install(session, "-e", ".[docs]")
    session.run(
        "sphinx-build", "-W", "--keep-going", "-q", "-b", "html", "docs", "docs/_build/html"
    )


@nox.session(name="tests-numpy")
def tests_numpy(session: nox.Session) -> None:
    """Conformance suite on NumPy, with writable and with read-only inputs; the examples."""
    # The examples extra only here: the example tests load its digits and run once, in this session.
    _install(session, "-e", ".[test,examples]", *REFERENCES)
    _pytest(session, "numpy", "numpy_readonly")


@nox.session(name="tests-strict")
def tests_strict(session: nox.Session) -> None:
    """Conformance suite on array-api-strict: the core uses nothing outside the standard."""
    _install(session, "-e", ".[test]", *REFERENCES)
    _pytest(session, "array_api_strict")


@nox.session(name="tests-torch")
def tests_torch(session: nox.Session) -> None:
    """Conformance suite on PyTorch (CPU)."""
    _install(session, "-e", ".[test,torch]", *REFERENCES)
    _pytest(session, "torch")


@nox.session(name="tests-jax")
def tests_jax(session: nox.Session) -> None:
    """Conformance suite on JAX (CPU), with optax as the native loss to compare with."""
    _install(session, "-e", ".[test,jax]", *REFERENCES)
    _pytest(session, "jax")


@nox.session(name="tests-dask")
def tests_dask(session: nox.Session) -> None:
    """Conformance suite on Dask arrays."""
    _install(session, "-e", ".[test,dask]", *REFERENCES)
    _pytest(session, "dask")


_GPU_CHECK = """
import cupy, jax, torch
missing = [name for name, found in [
    ("torch CUDA", torch.cuda.is_available()),
    ("JAX GPU", any(d.platform == "gpu" for d in jax.devices())),
    ("CuPy CUDA", cupy.is_available()),
] if not found]
if missing:
    raise SystemExit("tests-gpu found no device for: " + ", ".join(missing))
"""


@nox.session(name="tests-gpu", default=False)
def tests_gpu(session: nox.Session) -> None:
    """PyTorch CUDA, JAX GPU and CuPy; needs an NVIDIA GPU, so it is not in the default set.

    It fails, rather than skipping everything, when a device is missing. On a machine whose pip
    finds a CPU-only torch wheel first (like the project's CPU machines), point pip at a CUDA one.
    """
    _install(session, "-e", ".[test]", TORCH, "jax[cuda12]", "cupy-cuda12x", "optax")
    session.run("python", "-c", _GPU_CHECK)
    # One process: the GPU is one device, and each xdist worker would hold its own CUDA context.
    _pytest(session, "torch_cuda", "jax_gpu", "cupy", xdist=False)
