#!/usr/bin/env python
"""Draw docs/img/architecture.png from the layer contract in pyproject.toml ([tool.importlinter]), so the picture
always shows the layers CI enforces (`lint-imports`).

    python scripts/draw_architecture.py            # writes docs/img/architecture.png
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# what each package holds (one line each); the layer order and siblings come from pyproject.toml
ROLES = {
    "__main__": "python -m massedit", "testing": "tiny models for tests",
    "cli": "massedit edit | train | eval | stats | sweep",
    "tasks": "config composition, runs, methods,\nedit / evaluate / train / stats / sweep jobs, API",
    "callbacks": "ApplyEdit (+ ROME, MEMIT)", "lightning_modules": "evaluation, statistics,\nFT-W, MEND modules",
    "datamodules": "evaluation batches, corpus batches,\nedit requests, MEND examples",
    "trainer": "build_trainer (trainer.*), place_model",
    "editing": "ROME, MEMIT, z / v*, keys,\nFT, MEND (plain torch)", "stats": "C = E[kkᵀ]: collect, cache,\nreference npz",
    "evaluation": "CounterFact / zsRE scoring,\nmetrics, reports",
    "data": "edit requests, corpora,\nbuilt-in requests + WikiText-2",
    "core": "adapters, hooks, tokenisation, atomic I/O,\ndeltas, model loading, sampler, errors",
}
TIERS = {"cli": "CLI", "tasks": "tasks", "callbacks": "Lightning glue", "datamodules": "Lightning glue",
         "trainer": "Lightning glue", "editing": "math", "data": "data", "core": "core", "__main__": "entry points"}


def layers() -> list[list[str]]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in cfg["tool"]["importlinter"]["contracts"] if c["type"] == "layers")
    return [[p.strip() for p in layer.replace(":", "|").split("|")] for layer in contract["layers"]]


def main(out: str = "docs/img/architecture.png") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    rows = layers()
    fig, ax = plt.subplots(figsize=(12, 0.95 * len(rows) + 0.8))
    ax.set_xlim(0, 12)
    ax.set_ylim(-0.2, len(rows) + 0.3)
    ax.axis("off")
    palette = {"entry points": "#eeeeee", "CLI": "#f4d6d6", "tasks": "#f6e3c8", "Lightning glue": "#d9e7f5",
               "math": "#dff0d8", "data": "#efe5f7", "core": "#e8e8e8"}
    tier = "entry points"
    for i, row in enumerate(rows):
        y = len(rows) - 1 - i
        tier = TIERS.get(row[0], tier)
        ax.text(0.1, y + 0.42, tier, fontsize=9, fontweight="bold", va="center")
        width = 9.6 / len(row)
        for j, name in enumerate(row):
            x = 2.2 + j * width
            ax.add_patch(FancyBboxPatch((x + 0.05, y + 0.08), width - 0.1, 0.72, boxstyle="round,pad=0.02",
                                        fc=palette[tier], ec="#555555"))
            ax.text(x + width / 2, y + 0.58, f"massedit.{name}", ha="center", va="center", fontsize=9, family="monospace")
            ax.text(x + width / 2, y + 0.3, ROLES.get(name, ""), ha="center", va="center", fontsize=7.2)
        if i < len(rows) - 1:
            ax.annotate("", xy=(1.85, y - 0.05), xytext=(1.85, y + 0.75), arrowprops={"arrowstyle": "->", "color": "#888888"})
    ax.text(1.6, len(rows) / 2, "imports point down", rotation=90, ha="center", va="center", fontsize=8, color="#666666")
    ax.set_title("massedit layers (enforced by the import-linter contract in pyproject.toml; boxes in one row are "
                 "independent siblings)", fontsize=10)
    path = ROOT / out
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
