"""The digits example trains to its stated accuracy, unchanged, on NumPy and on PyTorch."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "digits_logreg.py"
EPOCHS = 30  # 0.9511 test accuracy measured on every backend; the threshold leaves slack
THRESHOLD = 0.90


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_digits_example_reaches_stated_accuracy(library: str) -> None:
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn is not installed (the example loads its bundled digits)")
    if library != "numpy" and importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--backend", library, "--epochs", str(EPOCHS),
         "--min-accuracy", str(THRESHOLD)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"test accuracy ([0-9.]+)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) >= THRESHOLD, result.stdout
    loss = re.search(r"final train loss ([0-9.]+)", result.stdout)
    assert loss, result.stdout
    assert float(loss.group(1)) < 0.35, result.stdout
