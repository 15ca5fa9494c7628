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


def test_digits_example_names_the_extra_when_scikit_learn_is_missing() -> None:
    # Importing sklearn fails as if it were not installed; nothing else changes.
    hide = (
        "import runpy, sys; sys.modules['sklearn'] = None; "
        f"sys.argv = [{str(SCRIPT)!r}, '--backend', 'numpy']; "
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", hide], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "sklearn" in result.stderr
    assert "pip install -e '.[examples]'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
