"""The language-model head example trains on every installed backend, to the same losses."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "lm_head.py"
STEPS = 40


def _losses(library: str) -> tuple[float, float]:
    if library != "numpy" and importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--backend", library, "--steps", str(STEPS),
         "--vocab", "256", "--tokens", "2048"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    first = re.search(r"initial train loss ([0-9.]+)", result.stdout)
    last = re.search(r"final train loss ([0-9.]+)", result.stdout)
    assert first, result.stdout
    assert last, result.stdout
    return float(first.group(1)), float(last.group(1))


@pytest.mark.parametrize("library", ["numpy", "torch", "jax"])
def test_lm_head_example_learns_the_corpus(library: str) -> None:
    first, last = _losses(library)
    # log(256) = 5.55 at chance; 40 steps take it well below, towards the floor log(4) = 1.39.
    assert first > 5.0
    assert last < 0.75 * first
