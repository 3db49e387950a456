"""Benchmarks, scripts and the top-level entry points import only what exists in massedit.

They are not part of the package (the import contract does not see them) and most of their imports are inside
functions, so a moved or deleted module would only show when someone runs them. This reads every ``massedit``
import of every file (lazy ones included) and checks that the module and each imported name exist.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("*.py")])


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "massedit":
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "massedit":
                    yield node.lineno, a.name, []


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_massedit_imports_resolve(path):
    missing = []
    for line, module, names in _imports(path):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"l.{line}: {module} ({e})")
            continue
        for name in names:
            if not hasattr(mod, name):
                try:
                    importlib.import_module(f"{module}.{name}")  # a submodule
                except ImportError:
                    missing.append(f"l.{line}: {module}.{name}")
    assert not missing, f"{path.relative_to(ROOT)} imports what massedit no longer has:\n" + "\n".join(missing)
