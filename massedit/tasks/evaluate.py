"""Evaluation as a task: CounterFact / zsRE metrics (REFERENCE_SPEC §4) of one model state on a Lightning Trainer.

* :func:`evaluation_stage` — one evaluation on a given Trainer (``validate`` for the unedited model, ``test`` for
  the edited one, where the edit callback fires), every prompt of every request batched, torchmetrics states
  synced across ranks;
* :func:`evaluate` — the same with a Trainer of its own (the Python API);
* :func:`eval_job` — ``massedit eval`` / ``edit.py mode=eval [deltas=PATH]``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from massedit.core.io import _json_default, atomic_write_json, clean_stale_tmp, load_json, stable_hash
from massedit.core.models import default_cache_dir, model_fingerprint
from massedit.core.tokenization import prepare_tokenizer
from massedit.datamodules.evaluation import EvaluationDataModule, detect_kind
from massedit.evaluation.config import EvalConfig, EvalResult
from massedit.evaluation.report import summary_dict, write_report
from massedit.evaluation.text import consistency_scorer
from massedit.lightning_modules.evaluation import EvaluationModule
from massedit.trainer import TrainerConfig, build_trainer, keep_device, quiet_lightning

log = logging.getLogger(__name__)


def as_eval_config(cfg: EvalConfig | dict | None) -> EvalConfig:
    if isinstance(cfg, EvalConfig):
        return cfg
    return EvalConfig(**dict(cfg or {}))


def evaluation_components(model, tok, requests: Sequence[Any], cfg: EvalConfig):
    """``(EvaluationModule, EvaluationDataModule)`` for ``requests`` (ready for ``validate`` or ``test``)."""
    requests = list(requests)
    if not requests:
        raise ValueError("evaluate: no requests to evaluate")
    prepare_tokenizer(tok)
    kind = detect_kind(requests, cfg.dataset)
    scorer = consistency_scorer(cfg.consistency, cfg.tfidf_backend) if kind == "counterfact" and cfg.generation else None
    dm = EvaluationDataModule(tok, requests, kind, batch_size=cfg.batch_size, generation=cfg.generation,
                              generation_every_k=cfg.generation_every_k, teacher_forcing=cfg.teacher_forcing,
                              generation_batch_cases=cfg.generation_batch_cases)
    module = EvaluationModule(model, tok, requests, cfg, kind=kind, consistency_scorer=scorer)
    return module, dm


def evaluation_stage(trainer, module: EvaluationModule, dm: EvaluationDataModule, stage: str) -> EvalResult:
    """Run one evaluation on ``trainer``: ``pre`` = ``trainer.validate``, ``post`` = ``trainer.test``."""
    was_training = module.model.training
    with quiet_lightning(), keep_device(module.model):
        if stage == "pre":
            trainer.validate(module, datamodule=dm, verbose=False)
        else:
            trainer.test(module, datamodule=dm, verbose=False)
    module.model.train(was_training)
    res = module.result
    log.info("evaluation (%s, %s): %d cases in %.1f s", stage, res.kind, res.n_cases, res.info["seconds"])
    return res


def evaluate(model, tok, requests: Sequence[Any], cfg: EvalConfig | dict | None = None, *, stage: str = "post",
             trainer_cfg: TrainerConfig | None = None) -> EvalResult:
    """Evaluate ``model`` on ``requests`` with a Trainer of its own. ``trainer_cfg`` with ``accelerator=auto`` and
    one device (the default) runs one process on the device the model is on.

    The model's weights are not changed and it is left on the device it was on."""
    cfg = as_eval_config(cfg)
    module, dm = evaluation_components(model, tok, requests, cfg)
    trainer_cfg = trainer_cfg or TrainerConfig()
    if trainer_cfg.accelerator == "auto" and trainer_cfg.world_size == 1:
        device = next(model.parameters()).device
        trainer_cfg = dataclasses.replace(trainer_cfg, accelerator={"cuda": "gpu", "mps": "mps"}.get(device.type, "cpu"),
                                          devices=[device.index or 0] if device.type == "cuda" else 1)
    trainer = build_trainer(trainer_cfg, model_dtype=next(model.parameters()).dtype)
    return evaluation_stage(trainer, module, dm, stage)


# ------------------------------------------------------------------------------------------------ pre-edit cache
def pre_eval_cache_path(model, requests: Sequence[Any], cfg: EvalConfig) -> Path:
    """Where the unedited model's results on ``requests`` under ``cfg`` are cached (sweeps evaluate it once)."""
    key = stable_hash({"model": model_fingerprint(model), "dtype": str(next(model.parameters()).dtype),
                       "requests": [r.to_dict() for r in requests],
                       "eval": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("pre", "post", "cache_pre")}})
    return default_cache_dir() / "eval" / f"{key}.json"


EVAL_CACHE_FORMAT = "massedit-eval-cache-v2"


def load_cached_result(path: Path) -> EvalResult | None:
    """The cached result at ``path`` if it verifies (format, sha256 of its content), else None: a bad or older
    entry is discarded with a warning and the evaluation runs again."""
    clean_stale_tmp(path.parent, recursive=False)
    if not path.is_file():
        return None
    try:
        d = load_json(path)
        if not isinstance(d, dict) or d.get("format") != EVAL_CACHE_FORMAT:
            raise ValueError("older or foreign layout")
        if d.get("sha256") != stable_hash(d.get("result"), n=64):
            raise ValueError("checksum mismatch")
        res = EvalResult(**d["result"])
    except Exception as e:  # unreadable / corrupt / older layout: evaluate again
        log.warning("discarding unreadable cached evaluation %s (%s: %s); evaluating again", path, type(e).__name__, e)
        try:
            path.unlink()
        except OSError:
            pass
        return None
    log.info("pre-edit metrics from cache %s", path)
    return res


def save_cached_result(path: Path, res: EvalResult) -> None:
    result = json.loads(json.dumps(dataclasses.asdict(res), default=_json_default))  # what load_json gives back
    atomic_write_json(path, {"format": EVAL_CACHE_FORMAT, "sha256": stable_hash(result, n=64), "result": result})


# ------------------------------------------------------------------------------------------------ reports
def report(run, pre: EvalResult | None, post: EvalResult | None, title: str, requests=None) -> str:
    """Write the report files to the run directory, print the table and log the numbers, the per-case table
    (with the requests' text) and the report files as an artifact (call on rank 0)."""
    md = write_report(pre, post, run.dir, title=title)
    run.log_evaluation(pre, post, summary_dict(pre, post), requests=requests)
    run.log_artifact(f"report-{run.dir.name}", "report",
                     {n: run.dir / n for n in ("summary.md", "summary.json", "per_case.jsonl")})
    return md


def eval_results(pre: EvalResult | None, post: EvalResult | None) -> dict[str, dict[str, float | None]]:
    """``{"pre": {metric: v, metric_ci: ci}, "post": {...}}``: ``results.json``'s copy of the logged
    ``eval/{stage}/{metric}`` numbers (a sweep's ``metric.name: eval/post/score`` reads ``eval.post.score``)."""
    out = {}
    for stage, res in (("pre", pre), ("post", post)):
        if res is not None:
            out[stage] = {**res.summary, **{f"{k}_ci": v for k, v in res.ci.items()}}
    return out


def eval_job(job, run, trainer, model, tok, requests) -> dict[str, Any]:
    """``mode=eval``: the model as loaded (stage ``pre``), or before (``eval.pre``) and after a saved delta file."""
    from massedit.core.deltas import apply_deltas, check_deltas, load_deltas
    from massedit.core.guards import check_update_norms

    module, dm = evaluation_components(model, tok, requests, job.eval)
    pre = post = None
    if job.deltas:
        deltas = load_deltas(Path(job.deltas).expanduser())
        check_deltas(model, deltas)
        check_update_norms(deltas, dict(model.named_parameters(remove_duplicate=False)),
                           job.edit_guard.max_relative_norm, source=str(job.deltas))  # before the weights change
        if job.eval.pre:
            pre = evaluation_stage(trainer, module, dm, "pre")
        apply_deltas(model, deltas)
        post = evaluation_stage(trainer, module, dm, "post")
    else:
        pre = evaluation_stage(trainer, module, dm, "pre")
    title = f"{job.model.name} on {Path(str(job.data.path)).name} ({len(requests)} records)" + (
        f", deltas {Path(str(job.deltas)).name}" if job.deltas else "")
    table = report(run, pre, post, title, requests) if trainer.is_global_zero else None
    return {"pre": pre, "post": post, "table": table}
