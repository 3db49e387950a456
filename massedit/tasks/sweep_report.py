"""Reports of a sweep (:mod:`massedit.tasks.sweep`): the Markdown table, the plot of ES / PS / NS / Score with their
95% confidence intervals against the swept value, ``summary.json`` and the W&B summary run."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

from massedit.core.io import atomic_write_json, atomic_write_text

log = logging.getLogger("massedit.tasks.sweep")

SUMMARY_COLUMNS = ("efficacy_success", "paraphrase_success", "neighborhood_success", "score")


def _as_float(v):
    try:
        f = float(v)
        return f if math.isfinite(f) else None
    except (TypeError, ValueError):
        return None


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if (abs(v) < 1e-2 or abs(v) >= 1e4) and v != 0 else f"{v:.2f}"
    return str(v)


def summary_markdown(summary: Mapping[str, Any]) -> str:
    cols = ["trial", *summary["varying"], *SUMMARY_COLUMNS, "delta_norm", "status"]
    if summary["metric"] not in SUMMARY_COLUMNS and summary["metric"] not in [f"eval/post/{c}" for c in SUMMARY_COLUMNS]:
        cols.insert(-2, "metric")
    best = summary["best"]["trial"] if summary["best"] else None
    lines = [f"Sweep `{summary['name']}`: {summary['n_finished']}/{summary['n_trials']} trials finished"
             f" ({summary['n_failed']} failed); metric `{summary['metric']}` ({summary['goal']}).", ""]
    if summary.get("pre") and any(v is not None for v in summary["pre"].values()):
        lines += ["Unedited model: " + ", ".join(f"{c} {_cell(v)}" for c, v in summary["pre"].items()), ""]
    lines += ["| " + " | ".join(c if c != "metric" else summary["metric"] for c in cols) + " |",
              "|" + "|".join("---" for _ in cols) + "|"]
    for r in summary["rows"]:
        cells = [_cell(r.get(c)) for c in cols]
        if r["trial"] == best:
            cells = [f"**{c}**" for c in cells]
            cells[0] += " (best)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _save_figure(fig, path) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
    import matplotlib.pyplot as plt

    from massedit.core.io import atomic_path

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def plot_summary(summary: Mapping[str, Any], path: str | Path, logx: bool | None = None) -> Path | None:
    """Efficacy, paraphrase (generalisation), neighbourhood (specificity) and Score after the edit against the swept
    value, with their 95% confidence intervals as bands; dashed: the unedited model. ``logx``: log-scaled x axis
    (``None``: when the swept values are positive and span a factor of 10 or more)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    x = summary["x"]
    rows = [r for r in summary["rows"] if r["status"] == "finished"]
    if not rows:
        return None
    xs_raw = [r.get(x) if x else i for i, r in enumerate(rows)]
    numeric = all(_as_float(v) is not None for v in xs_raw)
    if numeric:
        order = sorted(range(len(rows)), key=lambda i: float(xs_raw[i]))
        xs = [float(xs_raw[i]) for i in order]
    else:
        order = list(range(len(rows)))
        xs = list(range(len(rows)))
    rows = [rows[i] for i in order]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = {"efficacy_success": "Efficacy (ES)", "paraphrase_success": "Generalisation (PS)",
              "neighborhood_success": "Specificity (NS)", "score": "Score"}
    styles = {"efficacy_success": "o-", "paraphrase_success": "s-", "neighborhood_success": "^-", "score": "D-"}
    colors = {"efficacy_success": "C0", "paraphrase_success": "C1", "neighborhood_success": "C2", "score": "C3"}
    pre = summary.get("pre") or {}
    nan = float("nan")
    for c in SUMMARY_COLUMNS:
        ys = [r.get(c) for r in rows]
        if any(y is not None for y in ys):
            y = [v if v is not None else nan for v in ys]
            ax.plot(xs, y, styles[c], label=labels[c], lw=2.5 if c == "score" else 1.5, color=colors[c])
            ci = [r.get(f"{c}_ci") for r in rows]
            if any(v is not None for v in ci):
                lo = [a - b if a is not None and b is not None else nan for a, b in zip(ys, ci)]
                hi = [a + b if a is not None and b is not None else nan for a, b in zip(ys, ci)]
                ax.fill_between(xs, lo, hi, color=colors[c], alpha=0.15, lw=0)
        pre_ys = [r.get(f"pre_{c}") for r in rows]
        if any(v is not None for v in pre_ys):  # the unedited model on each trial's own requests
            ax.plot(xs, [v if v is not None else nan for v in pre_ys], "--", color=colors[c], lw=0.8, alpha=0.5)
        elif pre.get(c) is not None:
            ax.axhline(pre[c], color=colors[c], ls="--", lw=0.8, alpha=0.5)
    if any(r.get(f"{c}_ci") is not None for r in rows for c in SUMMARY_COLUMNS):
        ax.fill_between([], [], [], color="gray", alpha=0.15, label="95% CI")
    if any(v is not None for v in pre.values()) or any(r.get(f"pre_{c}") is not None for r in rows for c in SUMMARY_COLUMNS):
        ax.plot([], [], "k--", lw=0.8, alpha=0.5, label="unedited model (dashed)")
    if summary["metric"] not in SUMMARY_COLUMNS and not str(summary["metric"]).endswith("/score"):
        ax.plot(xs, [r.get("metric") for r in rows], "k--", label=summary["metric"])
    best = summary.get("best")
    if best is not None and len(rows) > 1:
        bi = next((i for i, r in enumerate(rows) if r["trial"] == best["trial"]), None)
        if bi is not None:
            by = best.get("score") if best.get("score") is not None else best.get("metric")
            ax.axvline(xs[bi], color="gray", ls=":", lw=1)
            ax.plot([xs[bi]], [by], marker="*", ms=18, color="gold", mec="black", zorder=5,
                    label=f"best {summary['metric']} ({_cell(best.get('metric'))})")
    if numeric:
        set_x_scale(ax, xs, logx)
    else:
        ax.set_xticks(xs, [str(v) for v in (xs_raw[i] for i in order)], rotation=30)
    ax.set_xlabel(x or "trial")
    ax.set_ylabel("% (after the edit)")
    ax.set_title(f"Sweep {summary['name']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save_figure(fig, path)


def set_x_scale(ax, xs, logx: bool | None) -> None:
    """Log-scaled x axis when ``logx`` (``None``: when the positive values span a factor of 10 or more); symlog when
    a value is ≤ 0; integer values label their own ticks."""
    pos = [v for v in xs if v > 0]
    span = max(pos) / min(pos) if pos else 1.0
    if logx or (logx is None and pos and span >= 10):
        if min(xs) <= 0:
            ax.set_xscale("symlog", linthresh=min(pos))
        else:
            ax.set_xscale("log")
            ticks = sorted(set(xs))
            if all(float(v).is_integer() for v in ticks):
                from matplotlib.ticker import NullFormatter

                ax.set_xticks(ticks, [str(int(v)) for v in ticks])
                ax.xaxis.set_minor_formatter(NullFormatter())


METHOD_COLUMNS = {"efficacy_success": "Efficacy (ES)", "paraphrase_success": "Generalisation (PS)",
                  "neighborhood_success": "Specificity (NS)", "score": "Score"}


def plot_methods(rows, path: str | Path, *, x: str = "n_edits", logx: bool | None = True,
                 title: str = "") -> Path | None:
    """One panel per metric (ES, PS, NS, Score) against ``x`` with one line per ``row["method"]`` and its 95%
    confidence band (``<metric>_ci``); dotted grey: the unedited model on the same records (``pre_<metric>``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    rows = [r for r in rows if _as_float(r.get(x)) is not None]
    if not rows:
        return None
    methods = list(dict.fromkeys(r["method"] for r in rows))
    nan = float("nan")
    fig, axes = plt.subplots(1, len(METHOD_COLUMNS), figsize=(4.2 * len(METHOD_COLUMNS), 3.8), sharex=True)
    for ax, (c, label) in zip(axes, METHOD_COLUMNS.items()):
        for k, m in enumerate(methods):
            mine = sorted((r for r in rows if r["method"] == m), key=lambda r: float(r[x]))
            xs = [float(r[x]) for r in mine]
            ys = [_as_float(r.get(c)) for r in mine]
            ax.plot(xs, [v if v is not None else nan for v in ys], "o-", color=f"C{k}", label=m, lw=1.8)
            ci = [_as_float(r.get(f"{c}_ci")) for r in mine]
            if any(v is not None for v in ci):
                lo = [a - b if a is not None and b is not None else nan for a, b in zip(ys, ci)]
                hi = [a + b if a is not None and b is not None else nan for a, b in zip(ys, ci)]
                ax.fill_between(xs, lo, hi, color=f"C{k}", alpha=0.15, lw=0)
        pre = {}
        for r in rows:
            if _as_float(r.get(f"pre_{c}")) is not None:
                pre.setdefault(float(r[x]), _as_float(r[f"pre_{c}"]))
        if pre:
            px = sorted(pre)
            ax.plot(px, [pre[v] for v in px], ":", color="gray", lw=1.2, label="unedited")
        set_x_scale(ax, [float(r[x]) for r in rows], logx)
        ax.set_title(label)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% (after the edits)")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if title:
        fig.suptitle(title)
    return _save_figure(fig, path)


def write_summary(out_dir: str | Path, spec, summary: Mapping[str, Any],
                  logx: bool | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": atomic_write_json(out_dir / "summary.json", summary),
             "md": atomic_write_text(out_dir / "summary.md", summary_markdown(summary))}
    png = plot_summary(summary, out_dir / "sweep.png", logx=logx)
    if png is not None:
        paths["png"] = png
    return paths


def log_summary_to_wandb(out_dir: Path, spec, summary: Mapping[str, Any], group: str | None) -> bool:
    """Log the summary table and plot as a W&B run (``job_type=sweep-summary``) in the sweep's group."""
    try:
        import wandb

        from massedit.tasks.runs import resolve_wandb_mode
    except ImportError:
        log.warning("wandb not installed; summary not logged to W&B")
        return False
    try:
        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(project=spec.project, entity=spec.entity, group=group, name=f"{spec.name}-summary",
                         job_type="sweep-summary", dir=str(out_dir), mode=resolve_wandb_mode("auto"),
                         config={"sweep": spec.raw}, reinit="finish_previous")
        cols = ["trial", *summary["varying"], *SUMMARY_COLUMNS, "delta_norm", "status"]
        table = wandb.Table(columns=cols, data=[[_table_value(r.get(c)) for c in cols] for r in summary["rows"]])
        payload = {"sweep_summary": table}
        png = Path(out_dir) / "sweep.png"
        if png.exists():
            payload["sweep_plot"] = wandb.Image(str(png))
        run.log(payload)
        if summary["best"]:
            run.summary["best_trial"] = summary["best"]["trial"]
            run.summary[f"best_{spec.metric}"] = summary["best"]["metric"]
        run.finish()
        return True
    except Exception as e:  # logging must not lose a finished sweep
        log.warning("could not log the sweep summary to W&B: %s", e)
        return False


def _table_value(v):
    return v if isinstance(v, (int, float, str)) or v is None else str(v)
