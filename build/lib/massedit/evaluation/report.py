"""Reports: ``per_case.jsonl``, ``summary.json``, a rich table in the terminal and a Markdown table (README format).
Logging the same numbers to the experiment logger is the task's job (``massedit.tasks.runs.Run.log_evaluation``)."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from massedit.core.io import atomic_write_json, atomic_write_jsonl
from massedit.evaluation.aggregate import DEFINITIONS, LABELS, METRICS_VERSION, ZSRE_LABELS

log = logging.getLogger(__name__)

UNITS = ("reference summarize.py units: every metric x100 (success/accuracy in %, magnitude in probability "
         "percentage points, fluency = n-gram entropy bits x100, consistency = TF-IDF cosine x100); ci = 95% "
         "half-width 1.96*std/sqrt(N) (population std) over cases; null = not computed")


def _fmt(v, ci=None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "not computed"
    s = f"{v:.1f}"
    if ci is not None:
        s += f" (±{ci:.1f})"
    return s


def summary_dict(pre, post) -> dict[str, Any]:
    """``summary.json`` content: metric -> {pre, post, ci: {pre, post}, n: {pre, post}}, plus metadata."""
    any_res = post or pre
    names = list((any_res.summary if any_res else {}).keys())
    metrics = {}
    for name in names:
        metrics[name] = {
            "pre": pre.summary.get(name) if pre else None,
            "post": post.summary.get(name) if post else None,
            "ci": {"pre": pre.ci.get(name) if pre else None, "post": post.ci.get(name) if post else None},
            "n": {"pre": pre.n.get(name) if pre else None, "post": post.n.get(name) if post else None},
        }
    return {
        "metrics_version": METRICS_VERSION,
        "kind": any_res.kind if any_res else None,
        "n_cases": any_res.n_cases if any_res else 0,
        "units": UNITS,
        "metrics": metrics,
        "definitions": {k: DEFINITIONS[k] for k in names if k in DEFINITIONS},
        "info": {"pre": pre.info if pre else None, "post": post.info if post else None},
    }


def markdown_table(pre, post, title: str = "") -> str:
    any_res = post or pre
    labels = ZSRE_LABELS if any_res.kind == "zsre" else LABELS
    cols = [("Pre", pre), ("Post", post)]
    cols = [(c, r) for c, r in cols if r is not None]
    lines = []
    if title:
        lines.append(f"**{title}** — {any_res.kind}, {any_res.n_cases} cases, mean (95% CI) ×100")
        lines.append("")
    lines.append("| Metric | " + " | ".join(c for c, _ in cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    for name in any_res.summary:
        cells = [_fmt(r.summary.get(name), r.ci.get(name)) for _, r in cols]
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_rich_table(pre, post, title: str = "") -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(markdown_table(pre, post, title))
        return
    any_res = post or pre
    labels = ZSRE_LABELS if any_res.kind == "zsre" else LABELS
    t = Table(title=f"{title} — {any_res.kind}, {any_res.n_cases} cases (mean ±95% CI, ×100)" if title else None)
    t.add_column("Metric")
    for c, r in (("Pre", pre), ("Post", post)):
        if r is not None:
            t.add_column(c, justify="right")
    for name in any_res.summary:
        t.add_row(labels.get(name, name), *[_fmt(r.summary.get(name), r.ci.get(name)) for r in (pre, post) if r is not None])
    Console().print(t)


def per_case_rows(pre, post) -> list[dict[str, Any]]:
    """One row per case: ``{case_id, pre: {...}, post: {...}}`` (stages present only)."""
    base = post or pre
    rows = []
    for i, c in enumerate(base.per_case):
        row: dict[str, Any] = {"case_id": c["case_id"]}
        if pre is not None:
            row["pre"] = {k: v for k, v in pre.per_case[i].items() if k != "case_id"}
        if post is not None:
            row["post"] = {k: v for k, v in post.per_case[i].items() if k != "case_id"}
        rows.append(row)
    return rows


def write_report(pre, post, out_dir: Path, title: str = "", print_table: bool = True) -> str:
    """Write ``per_case.jsonl``, ``summary.json`` and ``summary.md`` to ``out_dir``, print a rich table and return the
    Markdown table. The caller decides who writes (rank 0 only, in DDP)."""
    if pre is None and post is None:
        raise ValueError("write_report: nothing to report (pre and post are both None)")
    for a, b in ((pre, post),):
        if a is not None and b is not None and len(a.per_case) != len(b.per_case):
            raise ValueError("write_report: pre and post cover different numbers of cases")
    md = markdown_table(pre, post, title)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summary_dict(pre, post)
    atomic_write_jsonl(out_dir / "per_case.jsonl", per_case_rows(pre, post))
    atomic_write_json(out_dir / "summary.json", summary)
    from massedit.core.io import atomic_write_text

    atomic_write_text(out_dir / "summary.md", md)
    if print_table:
        print_rich_table(pre, post, title)
    return md
