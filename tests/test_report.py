"""``python -m xent`` (docs/backends.md, "The report"): every importable backend is listed,
checked and timed.

The report runs in a subprocess twice: as users run it, and in an interpreter where every
optional array library is blocked, which must print one NumPy row and list the others with the
command that installs them. One test per run, so that pytest-xdist workers never run the same
report twice.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
from _helpers import Backend

# Backend-independent: these run once, in the NumPy runs.
pytestmark = pytest.mark.only_backends(Backend.NUMPY)

QUICK = ["--size", "64x128", "--repeat", "1"]
TOLERANCE = 1e-5

# Row name: top-level module, distribution that carries its version, command the report names.
CPU_BACKENDS = {
    "numpy": ("numpy", "numpy", "pip install numpy"),
    "array_api_strict": ("array_api_strict", "array-api-strict", "pip install array-api-strict"),
    "torch": ("torch", "torch", "pip install torch==2.13.0"),
    "jax": ("jax", "jax", "pip install jax"),
    "dask": ("dask", "dask", "pip install 'dask[array]'"),
}
OPTIONAL = ("array_api_strict", "torch", "jax", "dask", "cupy")

ROW = re.compile(
    r"^\s*(?P<backend>[a-z_]+)\s+(?P<device>cpu|cuda|gpu|tpu)\s+(?P<version>\S+)\s+"
    r"(?P<error>\S+) (?P<verdict>ok|FAIL)\s+(?P<xent>[\d.]+)\s+(?P<native>[\d.]+)\s+"
    r"(?P<ratio>[\d.]+)x\s+(?P<name>\S.*?)\s*$"
)


@dataclass
class Report:
    stdout: str
    stderr: str
    blocked: tuple[str, ...]

    def rows(self) -> dict[tuple[str, str], re.Match[str]]:
        matches = (ROW.match(line) for line in self.stdout.splitlines())
        return {(m["backend"], m["device"]): m for m in matches if m}

    def missing_section(self) -> str:
        _, found, rest = self.stdout.partition("Not available")
        assert found, self.stdout
        return rest

    def installed(self, module: str) -> bool:
        return module not in self.blocked and importlib.util.find_spec(module) is not None


def _run_report(blocked: tuple[str, ...]) -> Report:
    # sys.modules[name] = None makes `import name` raise ImportError, as if it were not installed.
    code = (
        "import runpy, sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "runpy.run_module('xent', run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *QUICK],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Report(proc.stdout, proc.stderr, blocked)


def _assert_rows_are_checked_and_timed(report: Report) -> None:
    rows = report.rows()
    assert rows, report.stdout
    for backend, (module, distribution, _) in CPU_BACKENDS.items():
        if report.installed(module):
            assert (backend, "cpu") in rows, f"{backend} has no row in\n{report.stdout}"
            assert rows[backend, "cpu"]["version"] == importlib.metadata.version(distribution)
        else:
            assert (backend, "cpu") not in rows
    for (backend, device), row in rows.items():
        assert row["verdict"] == "ok", (backend, device, row.group(0))
        assert float(row["error"]) <= TOLERANCE, (backend, device, row["error"])
        assert float(row["xent"]) > 0
        assert float(row["native"]) > 0
        assert float(row["ratio"]) > 0
    assert "FAIL" not in report.stdout


def _assert_missing_are_listed_with_install_commands(report: Report) -> None:
    missing = report.missing_section()
    for backend, (module, _, command) in CPU_BACKENDS.items():
        if not report.installed(module):
            assert re.search(rf"{backend}\s.*{re.escape(command)}", missing), missing
    if ("cupy", "cuda") not in report.rows():
        assert re.search(r"cupy\s.*pip install cupy-cuda12x", missing), missing


def _assert_explains_itself_and_shows_progress(report: Report) -> None:
    assert report.stdout.startswith("xent report")
    assert "float64 NumPy reference" in report.stdout
    assert "64 x 128 float32" in report.stdout
    # Progress: one stderr line per step.
    assert re.search(r"^\[\d+/\d+\] numpy cpu: timing xent", report.stderr, re.MULTILINE)


def test_report_checks_and_times_every_installed_backend() -> None:
    report = _run_report(blocked=())
    _assert_rows_are_checked_and_timed(report)
    _assert_missing_are_listed_with_install_commands(report)
    _assert_explains_itself_and_shows_progress(report)


def test_report_with_only_numpy_names_what_to_install() -> None:
    report = _run_report(blocked=OPTIONAL)
    assert set(report.rows()) == {("numpy", "cpu")}
    _assert_rows_are_checked_and_timed(report)
    _assert_missing_are_listed_with_install_commands(report)
    _assert_explains_itself_and_shows_progress(report)


def test_help_shows_the_default_size_as_rows_x_classes() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "xent", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "(default: 4096x8192)" in proc.stdout, proc.stdout


@pytest.mark.parametrize("repeat", ["0", "-1", "two"])
def test_repeat_below_one_is_rejected(repeat: str) -> None:
    from xent.__main__ import main

    with pytest.raises(SystemExit) as excinfo:
        main(["--repeat", repeat])
    assert excinfo.value.code == 2
