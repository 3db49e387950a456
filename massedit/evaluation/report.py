"""Reports: ``per_case.jsonl``, ``summary.json``, a rich table in the terminal, a Markdown table (README format)
and the experiment logger (W&B summary + per-case table; any Lightning logger's ``log_metrics``)."""
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


def _rank_zero() -> bool:
    from massedit.evaluation.api import is_global_zero

    return is_global_zero()


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


def log_to_logger(logger, pre, post, summary: dict[str, Any]) -> None:
    """W&B (Lightning ``WandbLogger``): run summary ``{stage}/{metric}`` and a per-case ``wandb.Table``; other
    Lightning loggers (CSV, ...): ``log_metrics`` of the same numbers."""
    flat = {}
    for name, d in summary["metrics"].items():
        for stage in ("pre", "post"):
            if d[stage] is not None:
                flat[f"eval/{stage}/{name}"] = float(d[stage])
            if d["ci"][stage] is not None:
                flat[f"eval/{stage}/{name}_ci"] = float(d["ci"][stage])
    exp = None
    try:
        from pytorch_lightning.loggers import WandbLogger

        if isinstance(logger, WandbLogger):
            exp = logger.experiment
    except ImportError:  # pragma: no cover
        pass
    if exp is not None and hasattr(exp, "summary"):
        import wandb

        for k, v in flat.items():
            exp.summary[k] = v
        exp.summary["eval/metrics_version"] = METRICS_VERSION
        names = [n for n in (post or pre).summary if n != "score"]
        columns = ["case_id", "stage"] + names
        table = wandb.Table(columns=columns)
        for stage, res in (("pre", pre), ("post", post)):
            if res is None:
                continue
            for c in res.per_case:
                table.add_data(str(c["case_id"]), stage, *[c.get(n) for n in names])
        exp.log({"eval/per_case": table, **flat})
        return
    if hasattr(logger, "log_metrics"):
        logger.log_metrics(flat)
        if hasattr(logger, "save"):
            logger.save()


def write_report(pre, post, out_dir: Path, logger=None, title: str = "") -> str:
    """Write ``per_case.jsonl`` and ``summary.json`` to ``out_dir``, print a rich table, log to ``logger`` (W&B /
    CSV / None) and return the Markdown table. In DDP only rank 0 writes and logs (all ranks return the table)."""
    if pre is None and post is None:
        raise ValueError("write_report: nothing to report (pre and post are both None)")
    for a, b in ((pre, post),):
        if a is not None and b is not None and len(a.per_case) != len(b.per_case):
            raise ValueError("write_report: pre and post cover different numbers of cases")
    md = markdown_table(pre, post, title)
    if not _rank_zero():
        return md
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summary_dict(pre, post)
    atomic_write_jsonl(out_dir / "per_case.jsonl", per_case_rows(pre, post))
    atomic_write_json(out_dir / "summary.json", summary)
    from massedit.core.io import atomic_write_text

    atomic_write_text(out_dir / "summary.md", md)
    print_rich_table(pre, post, title)
    if logger is not None:
        try:
            log_to_logger(logger, pre, post, summary)
        except Exception as e:  # a logging failure must not lose a finished evaluation (files are written)
            log.warning("could not log evaluation to %s: %s", type(logger).__name__, e)
    return md
