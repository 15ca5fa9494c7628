"""Every Python block of README.md runs, and prints what its comments say.

Each block runs in a fresh namespace, in the runs of the backend it uses (a block that imports
torch runs with `--backend torch`, one that imports only NumPy with `--backend numpy`), and is
skipped, with the reason, where a library it imports is not installed. An expression statement
whose comment starts with a number (`loss  # 0.034929`) must evaluate to that number, to the
digits given.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from _helpers import Backend

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_PRINTED = re.compile(r"#\s*(-?\d+\.\d+)\b")
# The backend whose runs a block belongs to: the first of these libraries it imports.
_BACKENDS = {"torch": Backend.TORCH, "jax": Backend.JAX, "dask": Backend.DASK}

pytestmark = [
    # What a user of the torch.compile block sees too: array-api-compat's `lru_cache` helpers
    # make Dynamo warn while it traces them (harmless: it traces the wrapped function), and
    # inductor's import of torch.utils.mkldnn uses the deprecated torch.jit.script_method.
    pytest.mark.filterwarnings(
        "ignore:Dynamo detected a call to a `functools.lru_cache`-wrapped function:UserWarning"
    ),
    pytest.mark.filterwarnings(
        r"ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
    ),
]


@dataclass(frozen=True)
class Block:
    line: int
    source: str

    def imports(self) -> list[str]:
        names: list[str] = []
        for node in ast.walk(ast.parse(self.source)):
            if isinstance(node, ast.Import):
                names += [alias.name.partition(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module.partition(".")[0])
        return list(dict.fromkeys(names))

    def backend(self) -> Backend:
        return next((_BACKENDS[n] for n in self.imports() if n in _BACKENDS), Backend.NUMPY)


def _blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    return [
        Block(text.count("\n", 0, match.start(1)) + 1, match.group(1))
        for match in _BLOCK.finditer(text)
    ]


@pytest.mark.only_backends(Backend.NUMPY)
def test_readme_has_python_blocks() -> None:
    assert len(_blocks()) >= 3, "the README's Python blocks were not found"


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(
            b,
            id=f"README.md:{b.line}-{b.backend().value}",
            marks=pytest.mark.only_backends(b.backend()),
        )
        for b in _blocks()
    ],
)
def test_readme_block_runs_and_prints_its_comments(block: Block) -> None:
    for name in block.imports():
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"README.md line {block.line} imports {name}, which is not installed")
    lines = block.source.splitlines()
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for statement in ast.parse(block.source).body:
        code = ast.Module(body=[statement], type_ignores=[])
        line = lines[statement.end_lineno - 1] if statement.end_lineno else ""
        printed = _PRINTED.search(line)
        if isinstance(statement, ast.Expr) and printed:
            value = eval(compile(ast.Expression(statement.value), str(README), "eval"), namespace)
            digits = len(printed.group(1).partition(".")[2])
            assert round(float(value), digits) == float(printed.group(1)), (
                f"README.md line {block.line + statement.lineno - 1}: {line.strip()!r} "
                f"gives {float(value)!r}"
            )
        else:
            exec(compile(code, str(README), "exec"), namespace)
