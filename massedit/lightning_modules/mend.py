"""MEND training as a LightningModule (REFERENCE_SPEC §5.4) and the ``train.py method=mend`` entry point.

Thin glue around :mod:`massedit.editing.mend`: per step, the factors of the edit loss on ``edit_inner``
are captured, turned into weight updates by the editor, and the edited model is scored on
``edit_outer`` (NLL, weight ``cedit``) and on unrelated ``loc`` text (``KL(p_base ‖ p_edited)``, weight
``cloc``). Manual optimisation with two Adam optimisers as in the reference: ``opt`` over the editor
parameters (and the edit LRs, [QUIRK] ``lrs_in_main_opt``) and ``lr_opt`` over the edit LRs, stepped every
``accumulate`` iterations after global-norm clipping. The language model is *not* a registered
submodule: checkpoints hold only the editor, and the model's weights are never modified.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch import nn

from massedit.core.io import atomic_torch_save, atomic_write_json
from massedit.editing.mend.editor import build_mend_net, load_editor, save_editor
from massedit.editing.mend.factors import (EditBatch, capture_factors, edited_forward, group_mean_nll, kl_loc_loss,
                                           token_accuracy)
from massedit.editing.mend.network import MendNet

log = logging.getLogger(__name__)

DEFAULT_OPTS = dict(cedit=0.1, cloc=1.0, lr=1e-6, lr_lr=1e-4, lrs_in_main_opt=True, accumulate=10, grad_clip=100.0)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written atomically through :func:`massedit.core.io.atomic_torch_save`."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_torch_save(path, checkpoint)


def mend_step(model: nn.Module, net: MendNet, batch: dict, cedit: float, cloc: float,
              with_pre: bool = True) -> dict[str, torch.Tensor]:
    """One MEND objective evaluation (REFERENCE_SPEC §5.4 steps 1–5); returns losses and metrics.

    ``loss = cedit·L_edit + cloc·L_loc`` is differentiable w.r.t. the editor (first order in the model).
    A batch may hold several independent edit problems (``row_group``, ``n_groups``): each gets its own
    factors (from its own token-mean loss) and its own ΔW; ``L_edit`` is the mean of the problems'
    token-mean NLLs and ``L_loc`` the token mean over all locality rows (one problem: the reference).
    ``with_pre`` adds the unedited model's edit metrics (one more forward; used in validation).
    """
    inner: EditBatch = batch["edit_inner"]
    outer: EditBatch = batch["edit_outer"]
    loc: EditBatch = batch["loc"]
    G = int(batch.get("n_groups", 1))
    grp = batch.get("row_group")
    if grp is None:
        grp = torch.zeros(inner.input_ids.shape[0], dtype=torch.long)
    grp = grp.to(inner.input_ids.device)
    with torch.no_grad():
        base_loc = model(**loc.model_inputs(), use_cache=False).logits
        pre_outer = model(**outer.model_inputs(), use_cache=False).logits if with_pre else None
    inner_loss, factors = capture_factors(
        model, net.inner,
        lambda: group_mean_nll(model(**inner.model_inputs(), use_cache=False).logits, inner.labels, grp, G).sum(),
        row_mask=inner.attention_mask, row_group=grp)
    updates = net.updates(factors, n_groups=G)
    with edited_forward(model, net.inner, updates, row_group=grp):
        post_outer = model(**outer.model_inputs(), use_cache=False).logits
        post_loc = model(**loc.model_inputs(), use_cache=False).logits
    l_edit = group_mean_nll(post_outer, outer.labels, grp, G).mean()
    l_loc = kl_loc_loss(base_loc, post_loc, loc.attention_mask)
    post_acc, post_exact = token_accuracy(post_outer, outer.labels)
    loc_pre_acc, _ = token_accuracy(base_loc, loc.labels)
    loc_post_acc, _ = token_accuracy(post_loc, loc.labels)
    out = {
        "loss": cedit * l_edit + cloc * l_loc,
        "edit_loss": l_edit,
        "loc_kl": l_loc,
        "inner_loss_pre": inner_loss / G,
        "edit_acc": post_acc,
        "edit_exact": post_exact.mean(),
        "loc_acc_pre": loc_pre_acc,
        "loc_acc_post": loc_post_acc,
        "drawdown": loc_pre_acc - loc_post_acc,
    }
    if pre_outer is not None:
        out["edit_loss_pre"] = group_mean_nll(pre_outer, outer.labels, grp, G).mean()
        out["edit_acc_pre"] = token_accuracy(pre_outer, outer.labels)[0]
    return out


class MendModule(pl.LightningModule):
    """Trains ``net`` (a :class:`MendNet`) to edit the frozen ``model``."""

    def __init__(self, model: nn.Module, net: MendNet, opts: dict[str, Any] | None = None,
                 history_path: str | Path | None = None):
        super().__init__()
        self.history_path = history_path
        self.net = net
        self._lm = [model]                 # a list keeps it out of the registered submodules
        self.opts = {**DEFAULT_OPTS, **(opts or {})}
        self.automatic_optimization = False
        self.history: list[dict[str, Any]] = []
        self._acc: dict[str, list[float]] = {}
        self._val: dict[str, list[float]] = {}
        self.skipped = 0
        self.iters = 0                     # edit problems seen
        self._batches = 0
        self._t0 = time.time()

    @property
    def lm(self) -> nn.Module:
        return self._lm[0]

    def _place_model(self):
        if next(self.lm.parameters()).device != self.device:
            self.lm.to(self.device)

    def on_fit_start(self):
        self._place_model()

    def on_validation_start(self):
        self._place_model()

    def configure_optimizers(self):
        lrs = [self.net.edit_lrs]
        editor = [p for n, p in self.net.named_parameters() if n != "edit_lrs"]
        main = editor + lrs if self.opts["lrs_in_main_opt"] else editor
        opt = torch.optim.Adam(main, lr=float(self.opts["lr"]))
        lr_opt = torch.optim.Adam(lrs, lr=float(self.opts["lr_lr"]))
        return [opt, lr_opt]

    def training_step(self, batch, batch_idx):
        opt, lr_opt = self.optimizers()
        out = mend_step(self.lm, self.net, batch, float(self.opts["cedit"]), float(self.opts["cloc"]), with_pre=False)
        loss = out["loss"]
        G = int(batch.get("n_groups", 1))
        # `accumulate` counts edit problems (reference accumulate_bs); a batch holds G of them
        per_step = max(1, int(self.opts["accumulate"]) // G)
        if torch.isfinite(loss):             # the reference's safe_backward skips non-finite losses
            self.manual_backward(loss / per_step)
        else:
            self.skipped += 1
        self.iters += G
        self._batches += 1
        for k, v in out.items():
            self._acc.setdefault(k, []).append(float(v.detach()))
        if self._batches % per_step == 0:
            params = [p for p in self.net.parameters() if p.grad is not None]
            gnorm = torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params])) if params else torch.tensor(0.0)
            if not torch.isfinite(gnorm):
                raise FloatingPointError(f"MEND: non-finite gradient norm at iteration {self.iters}")
            self.clip_gradients(opt, gradient_clip_val=float(self.opts["grad_clip"]), gradient_clip_algorithm="norm")
            if not self.opts["lrs_in_main_opt"]:
                self.clip_gradients(lr_opt, gradient_clip_val=float(self.opts["grad_clip"]), gradient_clip_algorithm="norm")
            opt.step()
            lr_opt.step()
            opt.zero_grad(set_to_none=True)
            lr_opt.zero_grad(set_to_none=True)
            row = {f"train/{k}": sum(v) / len(v) for k, v in self._acc.items()}
            row.update({"iter": self.iters, "train/grad_norm": float(gnorm), "time_s": time.time() - self._t0,
                        "train/edit_lr_mean": float(self.net.edit_lrs.detach().mean())})
            self._acc = {}
            self.history.append(row)
            self.log_dict({k: v for k, v in row.items() if k.startswith("train/")}, on_step=True, on_epoch=False,
                          batch_size=batch["edit_inner"].input_ids.shape[0])
        self.log("train/loss_step", loss.detach(), prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=batch["edit_inner"].input_ids.shape[0])
        return loss.detach()

    def validation_step(self, batch, batch_idx):
        out = mend_step(self.lm, self.net, batch, float(self.opts["cedit"]), float(self.opts["cloc"]), with_pre=True)
        n = batch["edit_inner"].input_ids.shape[0]
        for k, v in out.items():
            self._val.setdefault(k, []).append(float(v.detach()))
            self.log(f"val/{k}", v.detach(), on_step=False, on_epoch=True, batch_size=n, prog_bar=k in ("loss", "edit_acc"),
                     sync_dist=True)
        return out["loss"]

    def on_validation_epoch_end(self):
        if not self._val:
            return
        row = {f"val/{k}": sum(v) / len(v) for k, v in self._val.items()}
        row.update({"iter": self.iters, "time_s": time.time() - self._t0})
        self._val = {}
        self.history.append(row)
        if self.history_path is not None and self.trainer.is_global_zero:
            atomic_write_json(self.history_path, self.history)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["mend_describe"] = self.net.describe()
        checkpoint["mend_history"] = self.history


# ----------------------------------------------------------------------------------- entry point
def _get(cfg, key, default=None):
    v = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if v is None else v


def trainer_kwargs(trainer_cfg) -> dict:
    keys = ("accelerator", "devices", "strategy", "precision", "num_nodes", "enable_progress_bar")
    return {k: trainer_cfg[k] for k in keys if trainer_cfg is not None and k in trainer_cfg and trainer_cfg[k] is not None}


def plot_history(history: list[dict], path) -> Path | None:
    """Training / validation curves (edit loss, locality KL, edit accuracy, drawdown) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    from massedit.core.io import atomic_path

    tr = [h for h in history if "train/loss" in h]
    va = [h for h in history if "val/loss" in h]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = [("edit_loss", "edit NLL (edit_outer)"), ("loc_kl", "locality KL"), ("edit_acc", "edit token accuracy")]
    for ax, (key, title) in zip(axes, panels):
        if tr:
            ax.plot([h["iter"] for h in tr], [h[f"train/{key}"] for h in tr], alpha=0.35, label="train (per opt. step)")
        if va:
            ax.plot([h["iter"] for h in va], [h[f"val/{key}"] for h in va], "o-", label="validation")
            if key == "edit_acc":
                ax.plot([h["iter"] for h in va], [h["val/edit_acc_pre"] for h in va], "k--", lw=0.8, label="before edit")
            if key == "edit_loss":
                ax.plot([h["iter"] for h in va], [h["val/edit_loss_pre"] for h in va], "k--", lw=0.8, label="before edit")
        ax.set_title(title)
        ax.set_xlabel("iteration (edit examples)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def train_main(cfg, run) -> dict:
    """``train.py method=mend``: train an editor on ``cfg.data`` requests, keep the best by validation,
    export ``mend_editor.pt`` (for ``edit.py method=mend method.checkpoint=...``), history and plot."""
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    from massedit.core.models import load_model_and_tokenizer
    from massedit.datamodules.mend import MendDataModule

    m = cfg.method
    t = m.train
    pl.seed_everything(int(_get(t, "seed", 0)), workers=True)
    model, tok = load_model_and_tokenizer(cfg.model)
    model.eval().requires_grad_(False)
    net = load_editor(m.checkpoint, model) if _get(m, "checkpoint") else build_mend_net(model, m)
    dm = MendDataModule.from_config(cfg, tok)
    opts = {k: _get(t, k, v) for k, v in DEFAULT_OPTS.items()}
    module = MendModule(model, net, opts, history_path=Path(run.dir) / "mend_history.json")

    max_iters = int(_get(t, "max_iters", 1000))
    n_batches = max(1, max_iters // dm.batch_problems)
    val_interval = max(1, min(int(_get(t, "val_interval", 5000)) // dm.batch_problems, n_batches))
    ckpt_dir = Path(run.dir) / "checkpoints"
    monitor = str(_get(t, "monitor", "val/loss"))
    mode = "max" if monitor.endswith("acc") or monitor.endswith("exact") else "min"
    ckpt_cb = ModelCheckpoint(dirpath=str(ckpt_dir), monitor=monitor, mode=mode, save_top_k=1, save_last=True,
                              filename="mend-best-{step}", auto_insert_metric_name=False)
    callbacks = [ckpt_cb]
    if _get(t, "early_stop_patience"):
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=int(t.early_stop_patience)))
    trainer = pl.Trainer(
        **trainer_kwargs(cfg.get("trainer")),
        max_epochs=1, max_steps=-1, val_check_interval=val_interval, check_val_every_n_epoch=1,
        num_sanity_val_steps=0, inference_mode=False, logger=run.logger if run.logger is not None else False,
        callbacks=callbacks, plugins=[AtomicCheckpointIO()], default_root_dir=str(run.dir),
        log_every_n_steps=1,
    )
    t0 = time.time()
    log.info("MEND: %d inner params %s; %d editor parameters", len(net.inner), [p.param for p in net.inner],
             sum(p.numel() for p in net.parameters()))
    trainer.validate(module, datamodule=dm, verbose=False)     # iteration 0: the untrained editor
    trainer.fit(module, datamodule=dm)
    train_s = time.time() - t0

    best = ckpt_cb.best_model_path or ckpt_cb.last_model_path
    if best:
        ck = torch.load(best, map_location="cpu", weights_only=False)
        net.load_state_dict({k[len("net."):]: v for k, v in ck["state_dict"].items() if k.startswith("net.")})
    editor_path = save_editor(Path(run.dir) / "mend_editor.pt", net,
                              meta={"model": str(cfg.model.get("name_or_path")), "best_checkpoint": str(best),
                                    "best_score": None if ckpt_cb.best_model_score is None else float(ckpt_cb.best_model_score),
                                    "monitor": monitor, "iterations": module.iters})
    run.save_json("mend_history.json", module.history)
    png = plot_history(module.history, Path(run.dir) / "mend_training.png")
    vals = [h for h in module.history if "val/loss" in h]
    results: dict[str, Any] = {
        "editor": str(editor_path),
        "best_checkpoint": str(best),
        "iterations": module.iters,
        "skipped_nonfinite": module.skipped,
        "train_seconds": train_s,
        "plot": str(png) if png else None,
        "val_first": vals[0] if vals else None,
        "val_best": (min(vals, key=lambda h: h[monitor]) if mode == "min" else max(vals, key=lambda h: h[monitor]))
        if vals and monitor in vals[0] else None,
        "edit_lrs": [float(v) for v in net.edit_lrs.detach().cpu()],
    }
    run.save_json("results.json", results)
    run.log_summary({k: v for k, v in (results["val_best"] or {}).items() if isinstance(v, float)})
    log.info("MEND training done in %.0f s; editor -> %s", train_s, editor_path)
    return results


if __name__ == "__main__":  # python -m massedit.lightning_modules.mend HISTORY.json OUT.png
    import json
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m massedit.lightning_modules.mend mend_history.json out.png")
    print(plot_history(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2]))
