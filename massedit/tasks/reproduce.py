"""``massedit reproduce {scaling,table2}``: the paper's scaling curves and Table 2, as ordinary edit jobs.

* ``scaling``: MEMIT at every count of ``counts`` (CounterFact dev up to its size, the reduced split beyond it),
  ROME (sequential) up to ``rome.max_count``, FT-W with the weight decay its own small sweep picks (best post-edit
  Score over ``ftw.weight_decays`` on ``ftw.sweep_edits`` records; or ``ftw.weight_decay`` as given) and MEND with
  a trained editor (``mend.checkpoint``, else one trained here by the train job with ``mend.train_iters``).
* ``table2``: the same editors at one count (default 1000) on the same records, in the paper's Table-2 layout
  (Score, ES, PS, NS, GE and the token-accuracy variant), with the unedited model's row.

Every point is an edit job (:func:`massedit.tasks.edit.edit_job`, in this process) in its own run directory
``<points_dir>/runs/<method>-n<count>`` (``points_dir`` defaults to ``output_dir``); the FT-W sweep runs below
``ftw_sweep/``, MEND's training in ``mend_train/``. Two experiments with the same ``points_dir`` (and different
``output_dir``) share every point they have in common: table2's 1,000-edit MEMIT point is the scaling curve's. Resumable: a finished point (its ``point.json``) is skipped on a rerun, an interrupted one
continues (``resume=true``: MEMIT's z are read from the target cache ``<points_dir>/cache/targets`` shared by all
points — a z depends only on the unedited model, the request, the templates and the hparams, so the 100-edit
point reuses those of the 10-edit one; interrupted MEND training continues from its last checkpoint).

Outputs in ``output_dir``: ``results.md`` / ``results.csv`` / ``results.json`` (one row per point: Score, ES, PS,
NS with 95% CIs, GE, token accuracies and their harmonic mean, wall time, peak memory), ``scaling.png`` (ES / PS /
NS / Score against the number of edits, log x, one line per method) and ``manifest.json`` (the commands, seeds,
versions, git commit and the sha256 of every data file used). The config: ``configs/reproduce/<experiment>.yaml``
(:class:`ReproduceConfig`), overridden with ``key=value``; data paths have no defaults.
"""
from __future__ import annotations

import csv
import gc
import io
import json
import logging
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import MISSING, OmegaConf

from massedit.core.errors import InputError
from massedit.core.io import atomic_write_json, atomic_write_text, load_json, sha256_file, stable_hash

log = logging.getLogger("massedit.reproduce")

EXPERIMENTS = ("scaling", "table2")
METHODS = ("memit", "rome", "ftw", "mend")
TABLE2_ORDER = ("ftw", "mend", "rome", "memit")  # the paper's row order
METRICS = ("score", "efficacy_success", "paraphrase_success", "neighborhood_success", "fluency",
           "efficacy_acc", "paraphrase_acc", "neighborhood_acc")
MANIFEST_FORMAT = "massedit-reproduce-manifest-1"


class ReproduceError(InputError):
    """A reproduction config that cannot run (names the key)."""


# ------------------------------------------------------------------------------------------------ config
@dataclass
class ReproduceData:
    """Request files; none has a default (pass them as ``data.dev=PATH`` ...)."""

    dev: str | None = None             # CounterFact, full records (counterfact_dev.json): every count up to its size
    train: str | None = None           # reduced split (counterfact_reduced_train.json): counts beyond the dev size
    mend_train: str | None = None      # MEND training requests (any format), when mend.checkpoint is not given


@dataclass
class MethodSettings:
    """Per-method options of a reproduction."""

    max_count: int | None = None       # run this method only at counts up to this (null: every count)
    overrides: list[str] = field(default_factory=list)  # extra edit-job overrides for this method's points


@dataclass
class FtwSettings(MethodSettings):
    weight_decay: float | None = None  # null: choose it by the sweep below; a value: use it (no sweep)
    weight_decays: list[float] = field(default_factory=lambda: [0.0, 10.0, 100.0, 300.0, 1000.0])  # lr*wd range of FT-W
    sweep_edits: int = 10              # records per sweep run (the first ones after sweep_offset of data.dev)
    sweep_offset: int = 0


@dataclass
class MendSettings(MethodSettings):
    checkpoint: str | None = None      # a trained editor (mend_editor.pt / .ckpt); null: train one in mend_train/
    train_iters: int = 1000            # training budget (edit problems seen; method.train.max_iters)
    train_overrides: list[str] = field(default_factory=list)  # extra train-job overrides (method.train.*)


@dataclass
class ReproduceConfig:
    """``configs/reproduce/<experiment>.yaml`` + ``key=value`` overrides."""

    experiment: str = "scaling"        # scaling | table2
    output_dir: str = MISSING          # the reproduction's directory (rerun with the same one to resume)
    points_dir: str | None = None      # where the points' runs, the FT-W sweep, MEND's training and the z cache live
    #                                    (null: output_dir); give two experiments the same one to share their points
    model: str = "smollm2-135m"        # a model option (configs/model/NAME.yaml); model.* keys go in overrides
    data: ReproduceData = field(default_factory=ReproduceData)
    counts: list[int] = field(default_factory=lambda: [10, 100, 1000, 10000])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seed: int = 0
    overrides: list[str] = field(default_factory=list)  # edit-job overrides of every point (model.*, eval.*, ...)
    memit: MethodSettings = field(default_factory=MethodSettings)
    rome: MethodSettings = field(default_factory=lambda: MethodSettings(max_count=100))
    ftw: FtwSettings = field(default_factory=FtwSettings)
    mend: MendSettings = field(default_factory=MendSettings)
    logx: bool = True
    command_line: list[str] = field(default_factory=list)  # bookkeeping: the overrides given (for the manifest)


def load_reproduce_config(experiment: str, overrides: Sequence[str] = (),
                          config_dir: Sequence[str | Path] = ()) -> ReproduceConfig:
    """``configs/reproduce/<experiment>.yaml`` with ``key=value`` overrides, typed and checked (no file read)."""
    from omegaconf.errors import OmegaConfBaseException

    from massedit.tasks.config import _load_yaml, _set, config_dirs, find_config_file, split_overrides

    if experiment not in EXPERIMENTS:
        raise ReproduceError(f"unknown reproduction {experiment!r}; choose one of {EXPERIMENTS}")
    dirs = config_dirs(config_dir)
    path = find_config_file(f"reproduce/{experiment}.yaml", dirs)
    cfg = OmegaConf.structured(ReproduceConfig)
    try:
        if path is not None:
            cfg = OmegaConf.merge(cfg, _load_yaml(path))
    except OmegaConfBaseException as e:
        raise ReproduceError(f"{path}: {str(e).splitlines()[0]}") from None
    for k, v in split_overrides(overrides):
        if k == "command_line":
            raise ReproduceError("command_line is bookkeeping (set from the command line), not an option")
        _set(cfg, k, v)
    cfg.command_line = list(overrides)
    if OmegaConf.is_missing(cfg, "output_dir"):
        raise ReproduceError("output_dir is not set; pass output_dir=DIR (rerun with the same one to resume)")
    try:
        out: ReproduceConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ReproduceError(str(e).splitlines()[0]) from None
    check_config(out)
    return out


def check_config(cfg: ReproduceConfig) -> None:
    """Values that cannot work, before any file is read."""
    if cfg.experiment not in EXPERIMENTS:
        raise ReproduceError(f"experiment={cfg.experiment!r}: choose one of {EXPERIMENTS}")
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise ReproduceError(f"methods={cfg.methods}: choose from {list(METHODS)}")
    if not cfg.counts or any(int(n) < 1 for n in cfg.counts):
        raise ReproduceError(f"counts={cfg.counts}: positive numbers of edits")
    if not cfg.data.dev:
        raise ReproduceError("data.dev is not set: pass data.dev=PATH (CounterFact with full records, e.g. "
                             "counterfact_dev.json); a reproduction has no default data")
    if "ftw" in cfg.methods and cfg.ftw.weight_decay is None and not cfg.ftw.weight_decays:
        raise ReproduceError("ftw.weight_decays is empty: give weight decays to sweep, or ftw.weight_decay=VALUE")
    if "mend" in cfg.methods and not cfg.mend.checkpoint and not cfg.data.mend_train:
        raise ReproduceError("MEND needs an editor: pass mend.checkpoint=FILE (a trained mend_editor.pt), or "
                             "data.mend_train=PATH to train one here (mend.train_iters sets the budget)")


# ------------------------------------------------------------------------------------------------ data
def count_records(path: str | Path, key: str) -> int:
    """Number of records in a request file (JSON list, or JSONL / CSV lines); the error names ``key``."""
    from massedit.data.requests import _read_records

    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ReproduceError(f"{key}={path}: no such file")
    return len(_read_records(p))


@dataclass
class Point:
    """One edit job of a reproduction."""

    method: str
    n_edits: int
    name: str
    data_key: str                      # data.dev | data.train | data.dev (ftw sweep)
    overrides: list[str]
    run_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        return stable_hash(self.overrides)


def data_overrides(cfg: ReproduceConfig, n: int, sizes: dict[str, int], offset: int = 0) -> tuple[str, list[str]]:
    """``(data key, overrides)`` for the first ``n`` records (after ``offset``): dev while it has them, else the
    reduced split."""
    if offset + n <= sizes["data.dev"]:
        return "data.dev", ["data=counterfact", f"data.path={Path(cfg.data.dev).expanduser().resolve()}",
                            f"data.num_edits={n}", f"data.offset={offset}"]
    if not cfg.data.train:
        raise ReproduceError(f"{n} edits need more records than data.dev holds ({sizes['data.dev']}): pass "
                             f"data.train=PATH (the reduced split, counterfact_reduced_train.json) or lower counts")
    if offset + n > sizes["data.train"]:
        raise ReproduceError(f"{n} edits: data.train={cfg.data.train} holds {sizes['data.train']} records")
    return "data.train", ["data=counterfact_reduced", f"data.path={Path(cfg.data.train).expanduser().resolve()}",
                          f"data.num_edits={n}", f"data.offset={offset}"]


def counts_for(cfg: ReproduceConfig, method: str) -> list[int]:
    cap = getattr(cfg, method).max_count
    return sorted({int(n) for n in cfg.counts if cap is None or int(n) <= int(cap)})


def common_overrides(cfg: ReproduceConfig) -> list[str]:
    return [f"model={cfg.model}", f"seed={cfg.seed}"]


def method_overrides(cfg: ReproduceConfig, method: str, out: Path) -> list[str]:
    """The method's options of every point (FT-W's decay and MEND's editor are added when known)."""
    ov = [f"method={method}"]
    if method == "memit":  # one z cache for every point: each z is computed once
        ov.append(f"method.z_cache_dir={out / 'cache' / 'targets'}")
    return ov


def plan_points(cfg: ReproduceConfig, out: Path, sizes: dict[str, int]) -> list[Point]:
    """Every edit point, method by method, counts ascending (FT-W / MEND get their decay / editor later)."""
    points = []
    for method in cfg.methods:
        for n in counts_for(cfg, method):
            key, dov = data_overrides(cfg, n, sizes)
            name = f"{method}-n{n}"
            ov = [*common_overrides(cfg), *dov, *method_overrides(cfg, method, out), *cfg.overrides,
                  *getattr(cfg, method).overrides, f"output_dir={out / 'runs' / name}"]
            points.append(Point(method, n, name, key, ov, out / "runs" / name))
    return points


def ftw_sweep_points(cfg: ReproduceConfig, out: Path, sizes: dict[str, int]) -> list[Point]:
    points = []
    n = int(cfg.ftw.sweep_edits)
    key, dov = data_overrides(cfg, n, sizes, offset=int(cfg.ftw.sweep_offset))
    for wd in cfg.ftw.weight_decays:
        name = f"ftw-wd{float(wd):g}"
        ov = [*common_overrides(cfg), *dov, "method=ftw", *cfg.overrides, *cfg.ftw.overrides,
              f"method.weight_decay={float(wd)!r}", f"output_dir={out / 'ftw_sweep' / name}"]
        points.append(Point("ftw", n, name, key, ov, out / "ftw_sweep" / name, {"weight_decay": float(wd)}))
    return points


# ------------------------------------------------------------------------------------------------ running
def edit_command(overrides: Sequence[str], command: str = "edit") -> str:
    return shlex.join(["massedit", command, *overrides])


def finished_result(point: Point) -> dict[str, Any] | None:
    """The results of a finished point (``point.json`` + ``results.json``), None if it has not finished; a point
    finished with other settings is an error (another output_dir, or delete that run directory)."""
    marker = point.run_dir / "point.json"
    if not marker.is_file() or not (point.run_dir / "results.json").is_file():
        return None
    done = load_json(marker)
    if done.get("fingerprint") != point.fingerprint():
        raise ReproduceError(f"{point.run_dir} holds point {point.name} run with other settings "
                             f"({done.get('command')}); use another output_dir or delete that directory")
    return {**load_json(point.run_dir / "results.json"), "_point": done}


def run_point(point: Point, stats: dict[str, list[str]], command: str = "edit",
              continue_with: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or skip / resume) one point in this process; returns its ``results.json`` plus ``_point``.
    ``continue_with``: the overrides that continue an interrupted run (default ``resume=true``)."""
    done = finished_result(point)
    if done is not None:
        log.info("[reproduce] %s: finished earlier, skipped (%s)", point.name, point.run_dir)
        stats["skipped"].append(point.name)
        return done
    from massedit.tasks.config import compose

    resume = (point.run_dir / "config.yaml").is_file()
    overrides = point.overrides + (list(continue_with if continue_with is not None else ["resume=true"])
                                   if resume else [])
    log.info("[reproduce] %s: %s (%s)", point.name, "resuming the interrupted run" if resume else "running",
             edit_command(overrides, command))
    t0 = time.time()
    job = compose(command, overrides)
    if command == "train":
        from massedit.tasks.train import train_job

        train_job(job)
    else:
        from massedit.tasks.edit import edit_job

        edit_job(job)
    wall = time.time() - t0
    _release_memory()
    marker = {"name": point.name, "method": point.method, "n_edits": point.n_edits, "fingerprint": point.fingerprint(),
              "command": edit_command(point.overrides, command), "overrides": point.overrides, "resumed": resume,
              "wall_seconds": round(wall, 3), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **point.extra}
    if not _worker():
        atomic_write_json(point.run_dir / "point.json", marker)
    stats["ran"].append(point.name)
    return {**load_json(point.run_dir / "results.json"), "_point": marker}


def _release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass


def _worker() -> bool:
    from massedit.tasks.runs import worker_rank

    return worker_rank()


def choose_ftw_decay(cfg: ReproduceConfig, out: Path, sizes: dict[str, int], stats) -> tuple[float, dict | None]:
    """FT-W's weight decay: ``ftw.weight_decay``, else the best post-edit Score of a sweep over
    ``ftw.weight_decays`` (its table and plot in ``ftw_sweep/``; ties: the first in the list)."""
    if cfg.ftw.weight_decay is not None:
        return float(cfg.ftw.weight_decay), None
    from massedit.tasks.sweep_report import write_summary

    rows = []
    for p in ftw_sweep_points(cfg, out, sizes):
        res = run_point(p, stats)
        rows.append({"trial": p.name, "status": "finished", "method.weight_decay": p.extra["weight_decay"],
                     **point_metrics(res), "metric": point_metrics(res)["score"], "error": None,
                     "seconds": res["_point"]["wall_seconds"], "delta_norm": _total_norm(res.get("delta_norms"))})
    scored = [r for r in rows if r["metric"] is not None]
    if not scored:
        raise ReproduceError("the FT-W sweep produced no Score (check eval.post)")
    best = max(scored, key=lambda r: r["metric"])  # max keeps the first of equal scores
    pre = {c: rows[0].get(f"pre_{c}") for c in ("efficacy_success", "paraphrase_success", "neighborhood_success",
                                                "score")}
    summary = {"name": "ftw_weight_decay", "metric": "eval/post/score", "goal": "maximize", "x": "method.weight_decay",
               "varying": ["method.weight_decay"], "rows": rows, "best": best, "pre": pre, "n_finished": len(rows),
               "n_trials": len(rows), "n_failed": 0, "engine": "massedit reproduce"}
    if not _worker():
        write_summary(out / "ftw_sweep", None, summary, logx=None)
    log.info("[reproduce] FT-W: weight decay %g has the best Score (%.2f) of %s", best["method.weight_decay"],
             best["metric"], [r["method.weight_decay"] for r in rows])
    return float(best["method.weight_decay"]), {"best_weight_decay": best["method.weight_decay"],
                                                "best_score": best["metric"], "n_edits": int(cfg.ftw.sweep_edits),
                                                "rows": [{k: r.get(k) for k in ("method.weight_decay", "score",
                                                                              "efficacy_success", "paraphrase_success",
                                                                              "neighborhood_success")} for r in rows]}


def mend_editor(cfg: ReproduceConfig, out: Path, stats) -> tuple[str, dict]:
    """MEND's editor: ``mend.checkpoint``, else trained once by the train job in ``mend_train/`` (a finished
    training is reused; an interrupted one continues from its last Lightning checkpoint)."""
    if cfg.mend.checkpoint:
        p = Path(cfg.mend.checkpoint).expanduser()
        if not p.is_file():
            raise ReproduceError(f"mend.checkpoint={cfg.mend.checkpoint}: no such file")
        return str(p.resolve()), {"checkpoint": str(p.resolve()), "trained_here": False}
    run_dir = out / "mend_train"
    iters = int(cfg.mend.train_iters)
    ov = mend_train_overrides(cfg, out)
    point = Point("mend", 0, "mend-train", "data.mend_train", ov, run_dir)
    # finished: reused; interrupted: continued from its last checkpoint, or started again when it has none yet
    again = ["ckpt_path=last"] if (run_dir / "checkpoints" / "last.ckpt").is_file() else ["overwrite=true"]
    done = run_point(point, stats, command="train", continue_with=again)
    editor = done.get("editor") or str(run_dir / "mend_editor.pt")
    return editor, {"checkpoint": editor, "trained_here": True, "train_iters": iters,
                    "command": edit_command(ov, "train"), "wall_seconds": done["_point"]["wall_seconds"]}


def mend_train_overrides(cfg: ReproduceConfig, out: Path) -> list[str]:
    """The train job of MEND's editor (``mend.train_iters`` edit problems, validation four times)."""
    iters = int(cfg.mend.train_iters)
    return [*common_overrides(cfg), "method=mend", f"data.path={Path(cfg.data.mend_train).expanduser().resolve()}",
            "data.format=auto", "data.num_edits=null", f"method.train.max_iters={iters}",
            f"method.train.val_interval={max(1, iters // 4)}", *cfg.overrides, *cfg.mend.train_overrides,
            f"output_dir={out / 'mend_train'}"]


def _total_norm(norms) -> float | None:
    if not isinstance(norms, dict) or not norms:
        return None
    return float(sum(float(v) ** 2 for v in norms.values()) ** 0.5)


# ------------------------------------------------------------------------------------------------ results
def point_metrics(res: dict[str, Any]) -> dict[str, Any]:
    """Post-edit metrics (+ CIs), the unedited model's (``pre_*``) and the token-accuracy Score of one point."""
    from massedit.evaluation.formulas import harmonic_mean

    ev = res.get("eval") or {}
    post, pre = ev.get("post") or {}, ev.get("pre") or {}
    out: dict[str, Any] = {}
    for c in METRICS:
        out[c] = post.get(c)
        out[f"{c}_ci"] = post.get(f"{c}_ci")
        out[f"pre_{c}"] = pre.get(c)
    for prefix, src in (("", post), ("pre_", pre)):
        accs = [src.get(f"{x}_acc") for x in ("efficacy", "paraphrase", "neighborhood")]
        out[f"{prefix}score_acc"] = harmonic_mean(accs)
    return out


def result_row(point: Point, res: dict[str, Any], data_file: str) -> dict[str, Any]:
    timing = res.get("timing") or {}
    return {"method": point.method, "n_edits": point.n_edits, "data": Path(data_file).name,
            **point_metrics(res), "wall_seconds": res["_point"].get("wall_seconds"),
            "edit_seconds": res.get("edit_seconds"), "peak_rss_bytes": timing.get("peak_rss_bytes"),
            "peak_cuda_bytes": timing.get("peak_cuda_bytes"), "run_dir": str(point.run_dir), **point.extra}


CSV_COLUMNS = ("method", "n_edits", "data", "score", "efficacy_success", "efficacy_success_ci", "paraphrase_success",
               "paraphrase_success_ci", "neighborhood_success", "neighborhood_success_ci", "fluency", "fluency_ci",
               "efficacy_acc", "paraphrase_acc", "neighborhood_acc", "score_acc", "pre_score",
               "pre_efficacy_success", "pre_paraphrase_success", "pre_neighborhood_success", "pre_fluency",
               "pre_score_acc", "wall_seconds", "edit_seconds", "peak_rss_bytes", "peak_cuda_bytes", "weight_decay",
               "run_dir")


def _num(v, ci=None) -> str:
    if v is None:
        return "–"
    return f"{float(v):.1f}" + (f" ±{float(ci):.1f}" if ci is not None else "")


def _gib(v) -> str:
    return "–" if v is None else f"{float(v) / 1024 ** 3:.2f}"


def results_markdown(cfg: ReproduceConfig, rows: list[dict[str, Any]], title: str) -> str:
    """``scaling``: one row per (method, count); ``table2``: the paper's layout (the unedited model first, then
    FT-W, MEND, ROME, MEMIT). Metrics ×100, ± = 95% CI half-width."""
    head = ["Editor", "n", "data", "Score", "ES", "PS", "NS", "GE", "ES acc", "PS acc", "NS acc", "Score acc",
            "wall s", "peak RSS GiB", "peak CUDA GiB"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if cfg.experiment == "table2":
        rows = sorted(rows, key=lambda r: (TABLE2_ORDER.index(r["method"]), r["n_edits"]))
        if rows:
            r = rows[0]
            lines.append(f"| unedited ({cfg.model}) | {r['n_edits']} | {r['data']} | {_num(r['pre_score'])} | "
                         f"{_num(r['pre_efficacy_success'])} | {_num(r['pre_paraphrase_success'])} | "
                         f"{_num(r['pre_neighborhood_success'])} | {_num(r['pre_fluency'])} | "
                         f"{_num(r['pre_efficacy_acc'])} | {_num(r['pre_paraphrase_acc'])} | "
                         f"{_num(r['pre_neighborhood_acc'])} | {_num(r['pre_score_acc'])} | – | – | – |")
    for r in rows:
        name = r["method"].upper().replace("FTW", "FT-W") + (f" (wd {r['weight_decay']:g})" if "weight_decay" in r else "")
        lines.append(f"| {name} | {r['n_edits']} | {r['data']} | {_num(r['score'])} | "
                     f"{_num(r['efficacy_success'], r['efficacy_success_ci'])} | "
                     f"{_num(r['paraphrase_success'], r['paraphrase_success_ci'])} | "
                     f"{_num(r['neighborhood_success'], r['neighborhood_success_ci'])} | "
                     f"{_num(r['fluency'], r['fluency_ci'])} | {_num(r['efficacy_acc'])} | {_num(r['paraphrase_acc'])} | "
                     f"{_num(r['neighborhood_acc'])} | {_num(r['score_acc'])} | {_num(r['wall_seconds'])} | "
                     f"{_gib(r['peak_rss_bytes'])} | {_gib(r['peak_cuda_bytes'])} |")
    lines += ["", "Score = harmonic mean of ES, PS, NS; GE = generation entropy (fluency); \"acc\" = the token-accuracy "
              "variant (argmax equals the target at every token), Score acc = their harmonic mean. GE needs "
              "generation prompts (not in the reduced split) and eval.generation=true. wall s: the point's edit job "
              "(its last attempt); per-stage times in each run's summary.md."]
    return "\n".join(lines) + "\n"


def results_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in CSV_COLUMNS})
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ manifest
def git_commit() -> dict[str, Any] | None:
    """The checkout's commit and whether it had uncommitted changes (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip()), "root": str(root)}
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import torch
    import transformers

    from massedit import __version__

    return {"massedit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def data_file_record(path: str | Path, n_records: int | None) -> dict[str, Any]:
    p = Path(str(path)).expanduser().resolve()
    return {"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size, "records": n_records}


# ------------------------------------------------------------------------------------------------ the job
def reproduce_job(cfg: ReproduceConfig) -> dict[str, Any]:
    """Run (or resume) the reproduction; returns ``{"rows", "ran", "skipped", "files", ...}``."""
    out = Path(cfg.output_dir).expanduser().resolve()
    work = points_root(cfg)
    sizes = {"data.dev": count_records(cfg.data.dev, "data.dev")}
    if cfg.data.train:
        sizes["data.train"] = count_records(cfg.data.train, "data.train")
    if "mend" in cfg.methods and not cfg.mend.checkpoint:
        sizes["data.mend_train"] = count_records(cfg.data.mend_train, "data.mend_train")
    points = plan_points(cfg, work, sizes)
    sweep = ftw_sweep_points(cfg, work, sizes) if "ftw" in cfg.methods and cfg.ftw.weight_decay is None else []
    check_points(cfg, points + sweep)  # every job's config composes before anything runs
    used = {p.data_key for p in points + sweep} | ({"data.mend_train"} if "data.mend_train" in sizes else set())
    files = {k: {"data.dev": cfg.data.dev, "data.train": cfg.data.train, "data.mend_train": cfg.data.mend_train}[k]
             for k in sorted(used)}
    manifest = {"format": MANIFEST_FORMAT, "experiment": cfg.experiment,
                "command": shlex.join(["massedit", "reproduce", cfg.experiment, *cfg.command_line]),
                "config": OmegaConf.to_container(OmegaConf.structured(cfg)), "seed": cfg.seed,
                "versions": versions(), "git": git_commit(),
                "data_files": {k: data_file_record(v, sizes.get(k)) for k, v in files.items()},
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "points": []}
    if not _worker():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "manifest.json", manifest)
    log.info("[reproduce] %s: %d points (%s) -> %s", cfg.experiment, len(points), ", ".join(p.name for p in points), out)
    stats: dict[str, list[str]] = {"ran": [], "skipped": []}
    rows, extras, t0 = [], {}, time.time()
    for i, p in enumerate(points):
        if p.method == "ftw":
            if "ftw" not in extras:
                wd, extras["ftw"] = choose_ftw_decay(cfg, work, sizes, stats)
                extras["ftw_weight_decay"] = wd
            p.overrides.insert(-1, f"method.weight_decay={extras['ftw_weight_decay']!r}")
            p.extra["weight_decay"] = extras["ftw_weight_decay"]
        if p.method == "mend":
            if "mend" not in extras:
                extras["mend_checkpoint"], extras["mend"] = mend_editor(cfg, work, stats)
            p.overrides.insert(-1, f"method.checkpoint={extras['mend_checkpoint']}")
        log.info("[reproduce] point %d/%d: %s (%.0f s so far)", i + 1, len(points), p.name, time.time() - t0)
        res = run_point(p, stats)
        rows.append(result_row(p, res, files[p.data_key]))
        manifest["points"].append({"name": p.name, "method": p.method, "n_edits": p.n_edits, "data": p.data_key,
                                   "command": edit_command(p.overrides), "run_dir": str(p.run_dir),
                                   "seed": cfg.seed, "wall_seconds": res["_point"].get("wall_seconds"), **p.extra})
        if not _worker():
            manifest.update({k: v for k, v in extras.items() if k in ("ftw", "mend")})
            atomic_write_json(out / "manifest.json", manifest)
            write_results(cfg, out, rows)
    manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    paths = write_results(cfg, out, rows) if not _worker() else {}
    if not _worker():
        atomic_write_json(out / "manifest.json", manifest)
    log.info("[reproduce] done in %.0f s: %d point(s) run, %d skipped as finished; %s", time.time() - t0,
             len(stats["ran"]), len(stats["skipped"]), out / "results.md")
    return {"rows": rows, **stats, "files": {k: str(v) for k, v in paths.items()}, "manifest": manifest,
            **{k: v for k, v in extras.items() if k in ("ftw", "mend")}}


def points_root(cfg: ReproduceConfig) -> Path:
    """The folder of the points' run directories (``points_dir``, default ``output_dir``)."""
    return Path(cfg.points_dir or cfg.output_dir).expanduser().resolve()


def check_points(cfg: ReproduceConfig, points: Sequence[Point]) -> None:
    """Compose every point's edit config (unknown keys, bad values) before the first job runs."""
    from massedit.tasks.config import compose

    for p in points:
        compose("edit", p.overrides)
    if "mend" in cfg.methods and not cfg.mend.checkpoint:
        compose("train", mend_train_overrides(cfg, points_root(cfg)))


def write_results(cfg: ReproduceConfig, out: Path, rows: list[dict[str, Any]]) -> dict[str, Path]:
    """``results.md`` / ``.csv`` / ``.json`` and, for ``scaling``, ``scaling.png``."""
    from massedit.tasks.sweep_report import plot_methods

    title = (f"massedit reproduce {cfg.experiment}: {cfg.model}" +
             (f", {rows[0]['n_edits']} edits" if cfg.experiment == "table2" and rows else ""))
    paths = {"md": atomic_write_text(out / "results.md", results_markdown(cfg, rows, title)),
             "csv": atomic_write_text(out / "results.csv", results_csv(rows)),
             "json": atomic_write_json(out / "results.json", {"experiment": cfg.experiment, "rows": rows})}
    if cfg.experiment == "scaling":
        png = plot_methods(rows, out / "scaling.png", x="n_edits", logx=cfg.logx,
                           title=f"{cfg.model}: metrics after N edits (95% CI)")
        if png is not None:
            paths["png"] = png
    return paths


USAGE = """usage: massedit reproduce {scaling,table2} [key=value ...] [--cfg] [--config-dir DIR]

  scaling   MEMIT / ROME / FT-W / MEND against the number of edits (counts=[10,100,1000,10000])
  table2    the four editors at one count (counts=[1000]) in the paper's Table-2 layout

Required: output_dir=DIR data.dev=counterfact_dev.json; counts beyond the dev size: data.train=
counterfact_reduced_train.json; MEND: mend.checkpoint=FILE or data.mend_train=FILE. Every key:
massedit/tasks/reproduce.py:ReproduceConfig (configs/reproduce/<experiment>.yaml); --cfg prints the config.
Rerun the same command to resume (finished points are skipped).
"""


def parse_args(argv: Sequence[str]) -> tuple[ReproduceConfig | None, bool]:
    """``(config, show_cfg)`` from the command line (``None``: help was printed)."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        if not argv:
            raise ReproduceError("name the reproduction: massedit reproduce {scaling,table2} ...")
        return None, False
    experiment, rest = argv[0], argv[1:]
    dirs, keep, i = [], [], 0
    while i < len(rest):
        a = rest[i]
        if a == "--config-dir" and i + 1 < len(rest):
            dirs.append(rest[i + 1])
            i += 2
            continue
        if a.startswith("--config-dir="):
            dirs.append(a.split("=", 1)[1])
        elif a in ("-h", "--help"):
            print(USAGE)
            return None, False
        else:
            keep.append(a)
        i += 1
    show = "--cfg" in keep
    keep = [a for a in keep if a != "--cfg"]
    return load_reproduce_config(experiment, keep, dirs), show


def run_reproduce(cfg: ReproduceConfig, show_cfg: bool = False) -> dict[str, Any] | None:
    """The command's job: print the config (``--cfg``) or run the reproduction and print its table."""
    if show_cfg:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return None
    from massedit.tasks.runs import configure_logging

    configure_logging("INFO")
    res = reproduce_job(cfg)
    print(Path(res["files"]["md"]).read_text() if res["files"].get("md") else "")
    print(f"results: {', '.join(res['files'].values())}; manifest: {Path(cfg.output_dir) / 'manifest.json'}")
    return res
