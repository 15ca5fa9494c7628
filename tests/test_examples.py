"""The examples run as a user runs them: the digits example trains to its stated accuracy on NumPy
and on PyTorch; the language-model head example trains on every installed backend, to the same
losses."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import Backend

# Each example runs once per CI run: in the session of the library it trains with (the digits
# example needs scikit-learn, which only the NumPy session installs).
NUMPY_RUN = pytest.mark.only_backends(Backend.NUMPY)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DIGITS_SCRIPT = EXAMPLES / "digits_logreg.py"
EPOCHS = 30  # 0.9511 test accuracy measured on every backend; the threshold leaves slack
THRESHOLD = 0.90


@NUMPY_RUN
@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_digits_example_reaches_stated_accuracy(library: str) -> None:
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn is not installed (the example loads its bundled digits)")
    if library != "numpy" and importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed")
    result = subprocess.run(
        [sys.executable, str(DIGITS_SCRIPT), "--backend", library, "--epochs", str(EPOCHS),
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


@NUMPY_RUN
def test_digits_example_names_the_extra_when_scikit_learn_is_missing() -> None:
    # Importing sklearn fails as if it were not installed; nothing else changes.
    hide = (
        "import runpy, sys; sys.modules['sklearn'] = None; "
        f"sys.argv = [{str(DIGITS_SCRIPT)!r}, '--backend', 'numpy']; "
        f"runpy.run_path({str(DIGITS_SCRIPT)!r}, run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", hide], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "sklearn" in result.stderr
    assert "pip install -e '.[examples]'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


LM_HEAD_SCRIPT = EXAMPLES / "lm_head.py"
STEPS = 40


def _losses(library: str) -> tuple[float, float]:
    if library != "numpy" and importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed")
    result = subprocess.run(
        [sys.executable, str(LM_HEAD_SCRIPT), "--backend", library, "--steps", str(STEPS),
         "--vocab", "256", "--tokens", "2048"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    first = re.search(r"initial train loss ([0-9.]+)", result.stdout)
    last = re.search(r"final train loss ([0-9.]+)", result.stdout)
    assert first, result.stdout
    assert last, result.stdout
    return float(first.group(1)), float(last.group(1))


@pytest.mark.parametrize(
    "library",
    [
        pytest.param(name, marks=pytest.mark.only_backends(backend))
        for name, backend in (
            ("numpy", Backend.NUMPY),
            ("torch", Backend.TORCH),
            ("jax", Backend.JAX),
        )
    ],
)
def test_lm_head_example_learns_the_corpus(library: str) -> None:
    first, last = _losses(library)
    # log(256) = 5.55 at chance; 40 steps take it well below, towards the floor log(4) = 1.39.
    assert first > 5.0
    assert last < 0.75 * first
