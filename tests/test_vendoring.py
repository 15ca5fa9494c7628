"""xent copied into another package (``theirpkg/_vendor/xent``) works without a top-level ``xent``.

Each case builds the vendored tree in a temporary directory and imports it in a fresh interpreter
in which the name ``xent`` is blocked, so an absolute ``import xent`` anywhere in the package fails
instead of silently picking up the installed copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import Backend

import xent

# Backend-independent: these run once, in the NumPy runs.
pytestmark = pytest.mark.only_backends(Backend.NUMPY)


SOURCE = Path(xent.__file__).resolve().parent

# Logits and labels of seed document 001; the loss is recomputed by hand in the child process.
SCRIPT = """
import json, sys

sys.path.insert(0, sys.argv[1])
sys.modules["xent"] = None  # an absolute `import xent` now raises ImportError

import numpy as np

import theirpkg._vendor.xent as vx
import theirpkg._vendor.xent.__main__
import theirpkg._vendor.xent._report

logits = np.asarray([[2.0, 5.0, 1.0], [7.0, 1.0, 0.5]])
labels = np.asarray([1, 0])
loss = vx.cross_entropy(logits, labels, reduction="none")
m = logits.max(axis=1)
by_hand = m + np.log(np.exp(logits - m[:, None]).sum(axis=1)) - logits[np.arange(2), labels]

hook = sys.modules.get("theirpkg._vendor._array_api_compat_vendor")
print(json.dumps({
    "loss": np.asarray(loss).tolist(),
    "by_hand": by_hand.tolist(),
    "loss_type": type(loss).__module__ + "." + type(loss).__name__,
    "xent_modules": sorted(k for k in sys.modules if k == "xent" or k.startswith("xent.")),
    "xent_blocked": sys.modules.get("xent") is None,
    "package": vx.__name__,
    "hook_calls": None if hook is None else hook.calls,
}))
"""

HOOK = '''
"""What SciPy and scikit-learn ship: array-api-compat re-exported, here counting namespace calls."""
import array_api_compat
from array_api_compat import *  # noqa: F403

calls = 0


def array_namespace(*arrays, **kwargs):
    global calls
    calls += 1
    return array_api_compat.array_namespace(*arrays, **kwargs)
'''


def _vendor(root: Path, *, hook: bool) -> None:
    vendor = root / "theirpkg" / "_vendor"
    shutil.copytree(SOURCE, vendor / "xent", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "theirpkg" / "__init__.py").write_text('"""A package that vendors xent."""\n')
    (vendor / "__init__.py").write_text("")
    if hook:
        (vendor / "_array_api_compat_vendor.py").write_text(HOOK)


def _run_vendored(root: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(root)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_vendored_copy_computes_the_loss_without_a_top_level_xent(tmp_path: Path) -> None:
    _vendor(tmp_path, hook=False)
    result = _run_vendored(tmp_path)
    assert result["package"] == "theirpkg._vendor.xent"
    assert result["xent_blocked"]
    assert result["xent_modules"] == ["xent"]  # only the blocking entry itself
    assert result["loss_type"] == "numpy.ndarray"
    assert result["loss"] == pytest.approx(result["by_hand"], rel=1e-12)
    assert result["loss"] == pytest.approx([0.0658839, 0.0039743], abs=1e-7)
    assert result["hook_calls"] is None


def test_vendored_copy_uses_the_hosts_array_api_compat_hook(tmp_path: Path) -> None:
    _vendor(tmp_path, hook=True)
    result = _run_vendored(tmp_path)
    assert result["xent_modules"] == ["xent"]
    assert result["loss"] == pytest.approx(result["by_hand"], rel=1e-12)
    assert isinstance(result["hook_calls"], int)
    assert result["hook_calls"] > 0
