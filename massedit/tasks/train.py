"""The training job (``massedit train`` / ``train.py``).

* ``method=ft|ftl|ftw``: fine-tune on the requests and evaluate before/after — the edit pipeline of
  :func:`massedit.tasks.edit.edit_job` (FT-W's ``Trainer.fit`` runs inside the edit callback); its
  ``results.json`` carries the post-edit Score/ES/PS/NS at the top level, what a sweep's ``metric.name`` names.
* ``method=mend``: train the MEND hypernetwork (REFERENCE_SPEC §5.4) with ``Trainer.fit``, keep the best editor by
  validation, export ``mend_editor.pt`` (for ``massedit edit method=mend method.checkpoint=...``), history and plot.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from massedit.core.errors import InputError
from massedit.core.io import atomic_path
from massedit.core.models import load_model_and_tokenizer
from massedit.datamodules.mend import MendDataModule
from massedit.editing.ft import FTConfig
from massedit.editing.mend.config import MendConfig
from massedit.editing.mend.editor import build_mend_net, load_editor, save_editor
from massedit.lightning_modules.mend import AtomicCheckpointIO, MendModule
from massedit.tasks.edit import edit_job
from massedit.tasks.methods import TRAINABLE, UnknownMethodError
from massedit.tasks.runs import setup_run
from massedit.tasks.validate import validate_job
from massedit.trainer import (build_trainer, check_device_map, finish_ranks, place_model, require_script_launch,
                              start_ranks)

log = logging.getLogger(__name__)


def train_job(job) -> dict[str, Any]:
    """Run ``job`` (a :class:`~massedit.tasks.config.TrainJobConfig`)."""
    if isinstance(job.method, FTConfig):
        return edit_job(job)
    if isinstance(job.method, MendConfig):
        return train_mend(job)
    raise UnknownMethodError(f"method {job.method.name!r} has nothing to train; trainable: {list(TRAINABLE)}")


def plot_history(history: list[dict], path) -> Path | None:
    """MEND training / validation curves (edit loss, locality KL, edit accuracy) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [h for h in history if "train/loss" in h]
    va = [h for h in history if "val/loss" in h]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = [("edit_loss", "edit NLL (edit_outer)"), ("loc_kl", "locality KL"), ("edit_acc", "edit token accuracy")]
    for ax, (key, title) in zip(axes, panels):
        if tr:
            ax.plot([h["iter"] for h in tr], [h[f"train/{key}"] for h in tr], alpha=0.35, label="train (per opt. step)")
        if va:
            ax.plot([h["iter"] for h in va], [h[f"val/{key}"] for h in va], "o-", label="validation")
            if key in ("edit_acc", "edit_loss"):
                ax.plot([h["iter"] for h in va], [h[f"val/{key}_pre"] for h in va], "k--", lw=0.8, label="before edit")
        ax.set_title(title)
        ax.set_xlabel("iteration (edit examples)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def resolve_ckpt_path(spec: str | None, run_dir: Path) -> str | None:
    """``ckpt_path``: ``last`` = this run directory's ``checkpoints/last.ckpt`` (resume an interrupted run by giving
    its ``output_dir``), a run directory (its last checkpoint) or a ``.ckpt`` file. Missing files are errors:
    Lightning would silently start from scratch."""
    if not spec:
        return None
    p = Path(run_dir) / "checkpoints" / "last.ckpt" if spec == "last" else Path(str(spec)).expanduser()
    if p.is_dir():
        p = p / "checkpoints" / "last.ckpt"
    if not p.is_file():
        hint = (" (ckpt_path=last resumes the run in output_dir: pass the interrupted run's output_dir=DIR)"
                if spec == "last" else "")
        raise InputError(f"ckpt_path={spec}: no checkpoint at {p}{hint}")
    return str(p)


def train_mend(job) -> dict[str, Any]:
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    m: MendConfig = job.method
    t = m.train
    require_script_launch(job.trainer, "massedit train method=mend")
    check_device_map(job.trainer, job.model.device_map)
    checked = validate_job(job)  # everything checkable before the run directory exists (tasks/validate.py)
    run = setup_run(job, run_dir=checked.run_dir)
    trainer, failed = None, True
    try:
        world = int(job.trainer.world_size)
        n_batches = max(1, -(-t.max_iters // (dm_batch_problems(t) * world)))  # per rank: max_iters is job-wide
        val_interval = max(1, min(t.val_interval // (dm_batch_problems(t) * world), n_batches))
        monitor = t.monitor
        mode = "max" if monitor.endswith("acc") or monitor.endswith("exact") else "min"
        ckpt_cb = ModelCheckpoint(dirpath=str(run.dir / "checkpoints"), monitor=monitor, mode=mode, save_top_k=1,
                                  save_last=True, filename="mend-best-{step}", auto_insert_metric_name=False)
        callbacks = [ckpt_cb]
        if t.early_stop_patience:
            callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=int(t.early_stop_patience)))
        trainer = build_trainer(job.trainer, model_dtype=job.model.torch_dtype, logger=run.logger, callbacks=callbacks,
                                max_epochs=1, max_steps=-1, val_check_interval=val_interval, check_val_every_n_epoch=1,
                                enable_checkpointing=True, plugins=[AtomicCheckpointIO()], default_root_dir=str(run.dir))
        start_ranks(trainer, run)  # several devices: all ranks from here on, one run directory (rank 0's)
        model, tok = load_model_and_tokenizer(job.model)
        model.eval().requires_grad_(False)
        if m.checkpoint:
            net = load_editor(m.checkpoint, model)
        else:  # the initial editor depends on the seed only (not on what drew random numbers before, e.g. the ranks)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(job.seed))
                net = build_mend_net(model, m)
        dm = MendDataModule.from_config(job.data, t, tok)
        module = MendModule(model, net, t, history_path=run.dir / "mend_history.json")
        place_model(model, trainer)
        t0 = time.time()
        log.info("MEND: %d inner params %s; %d editor parameters", len(net.inner), [p.param for p in net.inner],
                 sum(p.numel() for p in net.parameters()))
        ckpt = resolve_ckpt_path(job.ckpt_path, run.dir)
        if ckpt is None:
            trainer.validate(module, datamodule=dm, verbose=False)  # iteration 0: the untrained editor
        else:
            log.info("MEND: resuming from %s", ckpt)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        train_s = time.time() - t0

        best = ckpt_cb.best_model_path or ckpt_cb.last_model_path
        if best and trainer.is_global_zero:  # rank 0 wrote it and exports the editor
            ck = torch.load(best, map_location="cpu", weights_only=True)
            net.load_state_dict({k[len("net."):]: v for k, v in ck["state_dict"].items() if k.startswith("net.")})
        results: dict[str, Any] = {"best_checkpoint": str(best), "iterations": module.iters,
                                   "skipped_nonfinite": module.skipped, "train_seconds": train_s,
                                   "edit_lrs": [float(v) for v in net.edit_lrs.detach().cpu()]}
        vals = [h for h in module.history if "val/loss" in h]
        results["val_first"] = vals[0] if vals else None
        results["val_best"] = ((min if mode == "min" else max)(vals, key=lambda h: h[monitor])
                               if vals and monitor in vals[0] else None)
        if trainer.is_global_zero:
            editor_path = save_editor(run.dir / "mend_editor.pt", net, meta={
                "model": job.model.name_or_path, "best_checkpoint": str(best), "monitor": monitor,
                "best_score": None if ckpt_cb.best_model_score is None else float(ckpt_cb.best_model_score),
                "iterations": module.iters})
            run.save_json("mend_history.json", module.history)
            png = plot_history(module.history, run.dir / "mend_training.png")
            results.update(editor=str(editor_path), plot=str(png))
            run.save_json("results.json", results)
            # the Lightning checkpoints go up as `model` artifacts through WandbLogger(log_model=...)
            run.log_artifact(f"mend-editor-{run.dir.name}", "mend-editor",
                             {"mend_editor.pt": editor_path, "mend_history.json": run.dir / "mend_history.json",
                              "mend_training.png": png, "results.json": run.dir / "results.json"},
                             metadata={"model": job.model.name_or_path, "iterations": module.iters})
            run.log_summary({k: v for k, v in (results["val_best"] or {}).items() if isinstance(v, float)})
            log.info("MEND training done in %.0f s; editor -> %s", train_s, editor_path)
            print(f"\nOutputs written to {run.dir}")
        failed = False
        return results
    finally:
        run.finish()
        finish_ranks(trainer, failed)  # rank 0: a failure on any other rank fails the job


def dm_batch_problems(t) -> int:
    return max(1, int(t.batch_problems))
