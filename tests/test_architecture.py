"""The layers in pyproject.toml's import-linter contracts hold, and nothing sidesteps them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "visiontune"
ROOT = PACKAGE.parent


def test_import_contracts_are_kept():
    """In a subprocess: import-linter reconfigures logging, which would silence other tests' loggers."""
    check = (f"from importlinter.cli import lint_imports; "
             f"raise SystemExit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True))")
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_function_level_imports_of_visiontune_outside_the_cli():
    """A function-level import hides a dependency from the contract; only the CLI defers its
    imports, so that `visiontune --help` starts without torch."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "cli":
            continue
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                         else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                if any(name == "visiontune" or name.startswith("visiontune.") for name in names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found
