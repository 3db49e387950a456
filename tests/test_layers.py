"""The import-linter layer contract of ``pyproject.toml`` ([tool.importlinter]) holds (issue 12).

Runs ``lint-imports`` on this checkout in a subprocess (the repository root first on ``sys.path``, so the
checked copy of ``massedit`` is the one analysed, not an installed one; no cache). Lazy (function-level) imports
count, as import-linter counts them by default. A second test keeps the contract itself strict: every
top-level module declared (``exhaustive``), no ``ignore_imports``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint() -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_kept():
    r = _lint()
    assert "No module named 'importlinter'" not in r.stderr, "install import-linter (requirements.txt) to run the contract"
    assert r.returncode == 0, f"import contract broken:\n{r.stdout}\n{r.stderr}"
    assert "0 broken" in r.stdout


def test_contract_is_strict():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contracts = cfg["contracts"]
    assert cfg["root_package"] == "massedit"
    for c in contracts:
        assert not c.get("ignore_imports"), f"{c['name']}: no exceptions allowed"
    layers = [c for c in contracts if c["type"] == "layers"]
    assert len(layers) == 1 and layers[0]["exhaustive"] is True and layers[0]["containers"] == ["massedit"]
    assert any(c["type"] == "acyclic_siblings" for c in contracts)
    # every sub-package / module of massedit is a layer (exhaustive=true enforces it; this names them)
    declared = {name.strip() for layer in layers[0]["layers"] for name in layer.replace(":", "|").split("|")}
    present = {p.stem for p in (ROOT / "massedit").glob("*.py") if p.stem != "__init__"}
    present |= {p.name for p in (ROOT / "massedit").iterdir() if (p / "__init__.py").exists()}
    assert present == declared, f"undeclared: {present - declared}; declared but absent: {declared - present}"
