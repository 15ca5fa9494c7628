"""``python -m xent`` (SPEC section 7): every importable backend is listed, checked and timed.

The report runs in a subprocess twice: as users run it (formatted by rich where rich is
installed), and in an interpreter where ``rich`` and ``dask`` cannot be imported, which must fall
back to plain text and list dask as missing with the command that installs it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

QUICK = ["--size", "64x128", "--repeat", "1"]
TOLERANCE = 1e-5

# Top-level module, distribution that carries its version, and the pip command the report names.
CPU_BACKENDS = {
    "numpy": ("numpy", "numpy", "pip install numpy"),
    "array_api_strict": ("array_api_strict", "array-api-strict", "pip install array-api-strict"),
    "torch": ("torch", "torch", "pip install torch==2.13.0"),
    "jax": ("jax", "jax", "pip install jax"),
    "dask": ("dask", "dask", "pip install 'dask[array]'"),
}

ROW = re.compile(
    r"^\s*(?P<backend>[a-z_]+)\s+(?P<device>cpu|cuda|gpu|tpu)\s+(?P<version>\S+)\s+"
    r"(?P<error>\S+) (?P<verdict>ok|FAIL)\s+(?P<xent>[\d.]+)\s+(?P<native>[\d.]+)\s+"
    r"(?P<ratio>[\d.]+)x\s+(?P<name>\S.*?)\s*$"
)


@dataclass
class Report:
    variant: str
    returncode: int
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


def _installed(module: str, blocked: tuple[str, ...]) -> bool:
    return module not in blocked and importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module", params=["as-installed", "plain-without-dask"])
def report(request: pytest.FixtureRequest) -> Report:
    blocked: tuple[str, ...] = () if request.param == "as-installed" else ("rich", "dask")
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
    return Report(request.param, proc.returncode, proc.stdout, proc.stderr, blocked)


def test_report_passes_its_own_conformance_check(report: Report) -> None:
    assert report.returncode == 0, report.stdout + report.stderr
    assert "FAIL" not in report.stdout


def test_every_installed_cpu_backend_has_a_row_with_its_version(report: Report) -> None:
    rows = report.rows()
    for backend, (module, distribution, _) in CPU_BACKENDS.items():
        if _installed(module, report.blocked):
            assert (backend, "cpu") in rows, f"{backend} missing from\n{report.stdout}"
            version = importlib.metadata.version(distribution)
            assert rows[backend, "cpu"]["version"] == version
        else:
            assert (backend, "cpu") not in rows


def test_every_row_has_a_small_error_and_both_times(report: Report) -> None:
    rows = report.rows()
    assert rows, report.stdout
    for (backend, device), row in rows.items():
        assert float(row["error"]) <= TOLERANCE, (backend, device, row["error"])
        assert row["verdict"] == "ok"
        assert float(row["xent"]) > 0
        assert float(row["native"]) > 0
        assert float(row["ratio"]) > 0


def test_missing_backends_are_listed_with_their_install_command(report: Report) -> None:
    missing = report.missing_section()
    for backend, (module, _, command) in CPU_BACKENDS.items():
        if not _installed(module, report.blocked):
            assert re.search(rf"{backend}\s.*{re.escape(command)}", missing), missing
    if "dask" in report.blocked:
        assert "pip install 'dask[array]'" in missing
    if ("cupy", "cuda") not in report.rows():
        assert re.search(r"cupy\s.*pip install cupy-cuda12x", missing), missing


def test_report_states_what_the_numbers_mean(report: Report) -> None:
    assert report.stdout.startswith("xent report")
    assert "float64 NumPy reference" in report.stdout
    assert "64 x 128 float32" in report.stdout


def test_report_uses_rich_where_installed_and_plain_text_otherwise(report: Report) -> None:
    uses_rich = "rich" not in report.blocked and importlib.util.find_spec("rich") is not None
    assert ("━" in report.stdout) == uses_rich


def test_report_shows_progress_while_it_measures(report: Report) -> None:
    # Without a terminal the progress is one stderr line per step; with one, a rich live bar.
    assert re.search(r"^\[\d+/\d+\] numpy cpu: timing xent", report.stderr, re.MULTILINE)
