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

import contextlib
import logging
import os
import time
from typing import Any

from massedit.callbacks.apply_edit import ApplyEdit
from massedit.core.deltas import delta_norms
from massedit.core.io import atomic_write_json, atomic_write_text, cache_lock
from massedit.core.profiling import StageProfiler, activate, stage, timing_markdown
from massedit.core.profiling import active as active_profiler
from massedit.core.models import load_model_and_tokenizer
from massedit.editing.context_templates import save_context_templates
from massedit.editing.editor import RomeMemitEditor, SavedDeltasEditor
from massedit.lightning_modules.stats import LightningStatsEngine
from massedit.tasks.evaluate import (eval_job, eval_results, evaluation_components, evaluation_stage, load_cached_result,
                                     pre_eval_cache_path, report, save_cached_result)
from massedit.tasks.methods import build_editor, log_memory_estimate, stats_provider
from massedit.tasks.runs import setup_run
from massedit.tasks.validate import validate_job
from massedit.trainer import (build_trainer, check_device_map, finish_ranks, place_model, rank0_value,
                              require_script_launch, start_ranks)

log = logging.getLogger("massedit.edit")

SUMMARY_KEYS = ("score", "efficacy_success", "paraphrase_success", "neighborhood_success")


def edit_job(job) -> dict[str, Any]:
    """Run the job described by ``job`` (an :class:`~massedit.tasks.config.EditJobConfig`, or a train job of FT)."""
    require_script_launch(job.trainer, f"massedit {getattr(job, 'mode', 'edit')}")
    check_device_map(job.trainer, job.model.device_map)
    with activate(StageProfiler()):  # wall time and peak memory per stage: results.json's `timing` block
        with stage("validate"):
            checked = validate_job(job)  # everything checkable before the run directory exists (tasks/validate.py)
        requests = checked.requests
        run = setup_run(job, run_dir=checked.run_dir)
        trainer, failed = None, True
        try:
            log.info("%d edit requests from %s", len(requests), job.data.path)
            trainer = build_trainer(job.trainer, model_dtype=job.model.torch_dtype, logger=run.logger)
            start_ranks(trainer, run)  # several devices: all ranks from here on, one run directory (rank 0's)
            with stage("load"):
                if trainer.is_global_zero:
                    log_memory_estimate(job, log)
                model, tok = load_model_and_tokenizer(job.model)
                place_model(model, trainer)
            if getattr(job, "mode", "edit") == "eval":
                results = eval_job(job, run, trainer, model, tok, requests)
            else:
                results = _edit_and_evaluate(job, run, trainer, model, tok, requests)
                if trainer.is_global_zero:
                    print(f"\nOutputs written to {run.dir}")
            failed = False
            return results
        finally:
            run.finish()
            finish_ranks(trainer, failed)  # rank 0: a failure on any other rank fails the job


def _edit_and_evaluate(job, run, trainer, model, tok, requests) -> dict[str, Any]:
    module, dm = evaluation_components(model, tok, requests, job.eval)
    pre = None
    if job.eval.pre:
        with stage("pre_eval"):  # (a cached result: the time to read it)
            cache = pre_eval_cache_path(model, requests, job.eval) if job.eval.cache_pre else None
            # one process: a parallel job evaluating the same records waits for this one (or this for it)
            lock = cache_lock(cache, "these pre-edit metrics") if cache is not None and trainer.world_size == 1 \
                else contextlib.nullcontext()
            with lock:
                pre = rank0_value(trainer, load_cached_result(cache) if cache is not None else None)  # one branch
                if pre is None:
                    pre = evaluation_stage(trainer, module, dm, "pre")
                    if cache is not None and trainer.is_global_zero:
                        save_cached_result(cache, pre)

    deltas_file = getattr(job, "deltas", None)
    if deltas_file:
        editor, provider = SavedDeltasEditor(deltas_file), None
        log.info("re-applying saved deltas from %s", deltas_file)
    else:
        provider = stats_provider(job, LightningStatsEngine(trainer))
        editor = build_editor(job, stats=provider, logger=run.logger)
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
        with stage("post_eval"):  # its own time excludes the edit (stage "edit", nested: ApplyEdit at on_test_start)
            post = evaluation_stage(trainer, module, dm, "post")
    else:
        apply.apply(trainer, module)
    edit_s = apply.seconds if apply.seconds is not None else time.time() - t0

    results: dict[str, Any] = {"method": job.method.name, "num_requests": len(requests), "edit_seconds": edit_s,
                               "delta_norms": delta_norms(apply.deltas), "editor": editor.info}
    if post is not None:
        results["post"] = post.summary
        results["pre"] = pre.summary if pre is not None else None
        results.update({k: post.summary.get(k) for k in SUMMARY_KEYS if k in post.summary})
    results["eval"] = eval_results(pre, post)
    results["timing"] = current_timing()
    if trainer.is_global_zero:
        if editor.info:
            run.save_json(f"{job.method.name}_info.json", editor.info)
        templates = getattr(editor, "context_templates", None)
        if templates is not None:
            save_context_templates(run.dir / "context_templates.json", templates)
        if post is not None or pre is not None:
            results["table"] = report(run, pre, post, title=f"{job.method.name} on {job.model.name}", requests=requests)
            append_timing(run.dir / "summary.md", results["timing"])
        hf_dir = getattr(getattr(job, "export", None), "hf_dir", None)
        if hf_dir and apply.deltas is not None:
            results["export"] = str(export_edited_model(job, model, tok, requests, apply.deltas, editor.info))
        run.save_json("results.json", {k: v for k, v in results.items() if k != "table"})
        trial_file = os.environ.get("MASSEDIT_TRIAL_RESULT")  # the offline sweep runner reads a trial's numbers here
        if trial_file:
            atomic_write_json(trial_file, {**{k: v for k, v in results.items() if k != "table"}, "run_dir": str(run.dir)})
        run.log_summary({"edit/seconds": edit_s})
        log_edit_artifacts(job, run, apply, provider)
    return results


def current_timing() -> dict[str, Any] | None:
    """The stages timed so far by the active profiler (:mod:`massedit.core.profiling`)."""
    prof = active_profiler()
    return prof.summary() if prof is not None else None


def append_timing(summary_md, timing: dict[str, Any] | None) -> None:
    """Add the time-and-memory table to the run's ``summary.md`` (atomic rewrite)."""
    if timing is None or not summary_md.exists():
        return
    atomic_write_text(summary_md, summary_md.read_text().rstrip("\n") + "\n\n" + timing_markdown(timing))


def export_edited_model(job, model, tok, requests, deltas, info) -> "os.PathLike":
    """``export.hf_dir``: the model as edited now (deltas applied) as a Hugging Face checkpoint + ``edits.json``."""
    from massedit.tasks.config import as_dict
    from massedit.tasks.export import base_model_info, edit_manifest, export_hf

    manifest = edit_manifest(requests=requests, method=job.method.name, hparams=as_dict(job)["method"], deltas=deltas,
                             base_model=base_model_info(model, job.model.name_or_path, job.model.revision), info=info)
    path = export_hf(model, tok, job.export.hf_dir, manifest)
    print(f"Edited model exported to {path} (transformers.AutoModelForCausalLM.from_pretrained)")
    return path


def log_edit_artifacts(job, run, apply, provider) -> None:
    """W&B artifacts of an edit run: the deltas and the second-moment statistics it used (reusable by another run
    with ``stats.artifact=entity/project/NAME:VERSION``)."""
    if apply.saved_to is not None:
        run.log_artifact(f"deltas-{run.dir.name}", "deltas", {"deltas.safetensors": apply.saved_to},
                         metadata={"method": job.method.name, "model": job.model.name_or_path,
                                   "num_requests": len(apply.requests), "delta_norms": delta_norms(apply.deltas)})
    used = getattr(provider, "used", None)
    if used:
        files, meta = stats_artifact_files(used, job.stats)
        if files:
            run.log_artifact(stats_artifact_name(job), "statistics", files, metadata=meta)


def stats_artifact_name(job) -> str:
    s = job.stats
    corpus = s.corpus if isinstance(s.corpus, str) else "+".join(s.corpus)
    size = f"{s.n_tokens}tok" if s.n_tokens else f"{s.n_samples}docs"
    return f"stats-{job.model.name}-{corpus.split('/')[-1].replace(':', '-')}-{size}"


def stats_artifact_files(used, stats_cfg) -> tuple[dict[str, Any], dict[str, Any]]:
    """The cached statistics files of ``used`` (``{layer: LayerStats}``), named by their path below the stats cache
    directory (a download into another cache directory is then a cache hit)."""
    from pathlib import Path

    from massedit.tasks.methods import stats_cache_root

    root = stats_cache_root(stats_cfg)
    files, meta = {}, {"layers": {}}
    for layer, st in sorted(used.items()):
        if st.path is None or st.source == "reference":
            continue
        p = Path(st.path)
        try:
            name = str(p.resolve().relative_to(root.resolve()))
        except ValueError:
            name = p.name
        files[name] = p
        meta["layers"][str(layer)] = {"module": st.module, "count": st.count, "key": st.key}
    return files, meta
