"""The main job (``massedit edit`` / ``edit.py``): edit a model and evaluate it before and after, as one Lightning run.

1. the whole run is validated before anything is written: config, request file, every file the config names, the
   model's config/tokenizer and the method's layers against it (:mod:`massedit.tasks.validate`);
2. the run directory, its ``config.yaml``, ``run.log`` and the logger are set up;
3. one Trainer is built from ``trainer.*`` (:func:`massedit.trainer.build_trainer`); the model is loaded and placed
   on its device;
4. pre-edit evaluation: ``trainer.validate`` of the evaluation module (or the cached result of an identical run);
5. statistics for ROME/MEMIT: the same Trainer's ``predict`` (or the cache);
6. the edit: the :class:`~massedit.callbacks.apply_edit.ApplyEdit` callback runs the method's editor at
   ``on_test_start``, applies and saves the deltas;
7. post-edit evaluation: ``trainer.test``; reports, table and results.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from massedit.callbacks.apply_edit import ApplyEdit
from massedit.core.deltas import delta_norms
from massedit.core.io import atomic_write_json
from massedit.core.models import load_model_and_tokenizer
from massedit.editing.context_templates import save_context_templates
from massedit.editing.editor import RomeMemitEditor, SavedDeltasEditor
from massedit.lightning_modules.stats import LightningStatsEngine
from massedit.tasks.evaluate import (eval_job, evaluation_components, evaluation_stage, load_cached_result,
                                     pre_eval_cache_path, report, save_cached_result)
from massedit.tasks.methods import build_editor, stats_provider
from massedit.tasks.runs import setup_run
from massedit.tasks.validate import validate_job
from massedit.trainer import build_trainer, place_model

log = logging.getLogger("massedit.edit")

SUMMARY_KEYS = ("score", "efficacy_success", "paraphrase_success", "neighborhood_success")


def edit_job(job) -> dict[str, Any]:
    """Run the job described by ``job`` (an :class:`~massedit.tasks.config.EditJobConfig`, or a train job of FT)."""
    checked = validate_job(job)  # everything checkable before the run directory exists (tasks/validate.py)
    requests = checked.requests
    run = setup_run(job, run_dir=checked.run_dir)
    try:
        log.info("%d edit requests from %s", len(requests), job.data.path)
        trainer = build_trainer(job.trainer, model_dtype=job.model.torch_dtype, logger=run.logger)
        model, tok = load_model_and_tokenizer(job.model)
        place_model(model, trainer)
        if getattr(job, "mode", "edit") == "eval":
            return eval_job(job, run, trainer, model, tok, requests)
        results = _edit_and_evaluate(job, run, trainer, model, tok, requests)
        if trainer.is_global_zero:
            print(f"\nOutputs written to {run.dir}")
        return results
    finally:
        run.finish()


def _edit_and_evaluate(job, run, trainer, model, tok, requests) -> dict[str, Any]:
    module, dm = evaluation_components(model, tok, requests, job.eval)
    pre = None
    if job.eval.pre:
        cache = pre_eval_cache_path(model, requests, job.eval) if job.eval.cache_pre else None
        pre = load_cached_result(cache) if cache is not None else None
        if pre is None:
            pre = evaluation_stage(trainer, module, dm, "pre")
            if cache is not None and trainer.is_global_zero:
                save_cached_result(cache, pre)

    deltas_file = getattr(job, "deltas", None)
    if deltas_file:
        editor = SavedDeltasEditor(deltas_file)
        log.info("re-applying saved deltas from %s", deltas_file)
    else:
        editor = build_editor(job, stats=stats_provider(job, LightningStatsEngine(trainer)), logger=run.logger)
    if isinstance(editor, RomeMemitEditor):
        editor.prefetch_stats(model, tok)  # Trainer.predict now: it cannot run inside the test stage below
    save_path = run.dir / "deltas.safetensors" if job.save_deltas else None
    apply = ApplyEdit(editor, requests, save_path=save_path,
                      metadata={"model": job.model.name_or_path, "method": job.method.name},
                      max_relative_norm=job.edit_guard.max_relative_norm)
    trainer.callbacks.append(apply)
    t0 = time.time()
    post = None
    if job.eval.post:
        post = evaluation_stage(trainer, module, dm, "post")  # ApplyEdit edits at on_test_start
    else:
        apply.apply(trainer, module)
    edit_s = apply.seconds if apply.seconds is not None else time.time() - t0

    results: dict[str, Any] = {"method": job.method.name, "num_requests": len(requests), "edit_seconds": edit_s,
                               "delta_norms": delta_norms(apply.deltas), "editor": editor.info}
    if post is not None:
        results["post"] = post.summary
        results["pre"] = pre.summary if pre is not None else None
        results.update({k: post.summary.get(k) for k in SUMMARY_KEYS if k in post.summary})
    if trainer.is_global_zero:
        if editor.info:
            run.save_json(f"{job.method.name}_info.json", editor.info)
        templates = getattr(editor, "context_templates", None)
        if templates is not None:
            save_context_templates(run.dir / "context_templates.json", templates)
        if post is not None or pre is not None:
            results["table"] = report(run, pre, post, title=f"{job.method.name} on {job.model.name}")
        run.save_json("results.json", {k: v for k, v in results.items() if k != "table"})
        trial_file = os.environ.get("MASSEDIT_TRIAL_RESULT")  # the offline sweep runner reads a trial's numbers here
        if trial_file:
            atomic_write_json(trial_file, {**{k: v for k, v in results.items() if k != "table"}, "run_dir": str(run.dir)})
        run.log_summary({"edit_seconds": edit_s, **{k: v for k, v in results.items()
                                                    if k in SUMMARY_KEYS and v is not None}})
    return results
