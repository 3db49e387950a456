"""MEND training as a LightningModule (REFERENCE_SPEC §5.4); ``massedit train method=mend`` runs it
(:mod:`massedit.tasks.train`).

Thin glue around :mod:`massedit.editing.mend` (objective: :func:`massedit.editing.mend.objective.mend_step`):
per step, the factors of the edit loss on ``edit_inner``
are captured, turned into weight updates by the editor, and the edited model is scored on
``edit_outer`` (NLL, weight ``cedit``) and on unrelated ``loc`` text (``KL(p_base ‖ p_edited)``, weight
``cloc``). Manual optimisation with two Adam optimisers as in the reference: ``opt`` over the editor
parameters (and the edit LRs, [QUIRK] ``lrs_in_main_opt``) and ``lr_opt`` over the edit LRs, stepped every
``accumulate`` iterations after global-norm clipping. The language model is *not* a registered
submodule: checkpoints hold only the editor, and the model's weights are never modified.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch import nn

from massedit.core.io import atomic_torch_save, atomic_write_json
from massedit.editing.mend.config import MendTrainConfig
from massedit.editing.mend.network import MendNet
from massedit.editing.mend.objective import mend_step

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written atomically through :func:`massedit.core.io.atomic_torch_save` and read
    back with ``weights_only=True`` always (``ckpt_path`` is user input: a pickled object is refused, never run)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_torch_save(path, checkpoint)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        from massedit.editing.mend.editor import MendCheckpointError

        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # UnpicklingError (refused object), truncated / foreign file
            raise MendCheckpointError(f"ckpt_path: {path} is not a loadable Lightning checkpoint ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


class MendModule(pl.LightningModule):
    """Trains ``net`` (a :class:`MendNet`) to edit the frozen ``model``."""

    def __init__(self, model: nn.Module, net: MendNet, cfg: MendTrainConfig | None = None,
                 history_path: str | Path | None = None):
        super().__init__()
        self.history_path = history_path
        self.net = net
        self._lm = [model]                 # a list keeps it out of the registered submodules
        self.cfg = cfg or MendTrainConfig()
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
        if getattr(self.lm, "hf_device_map", None):  # model.device_map: accelerate placed it
            return
        if next(self.lm.parameters()).device != self.device:
            self.lm.to(self.device)

    @property
    def _world(self) -> int:
        return int(self._trainer.world_size) if self._trainer is not None else 1

    def on_fit_start(self):
        self._place_model()
        from massedit.trainer import collective_for

        self.net.set_collective(collective_for(self._trainer))  # several ranks: one set of norm statistics

    def on_fit_end(self):
        self.net.set_collective(None)

    def on_validation_start(self):
        self._place_model()

    def configure_optimizers(self):
        lrs = [self.net.edit_lrs]
        editor = [p for n, p in self.net.named_parameters() if n != "edit_lrs"]
        main = editor + lrs if self.cfg.lrs_in_main_opt else editor
        opt = torch.optim.Adam(main, lr=float(self.cfg.lr))
        lr_opt = torch.optim.Adam(lrs, lr=float(self.cfg.lr_lr))
        return [opt, lr_opt]

    def training_step(self, batch, batch_idx):
        opt, lr_opt = self.optimizers()
        out = mend_step(self.lm, self.net, batch, float(self.cfg.cedit), float(self.cfg.cloc), with_pre=False)
        loss = out["loss"]
        G = int(batch.get("n_groups", 1))
        # `accumulate` counts edit problems (reference accumulate_bs) per optimiser step; a batch holds G of them
        # and under DDP every step averages the gradients of all ranks' batches
        world = self._world
        per_step = max(1, int(self.cfg.accumulate) // (G * world))
        if torch.isfinite(loss):             # the reference's safe_backward skips non-finite losses
            self.manual_backward(loss / per_step)
        else:
            self.skipped += 1
        self.iters += G * world  # edit problems seen by the whole job
        self._batches += 1
        for k, v in out.items():
            self._acc.setdefault(k, []).append(float(v.detach()))
        if self._batches % per_step == 0:
            params = [p for p in self.net.parameters() if p.grad is not None]
            gnorm = torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params])) if params else torch.tensor(0.0)
            if not torch.isfinite(gnorm):
                raise FloatingPointError(f"MEND: non-finite gradient norm at iteration {self.iters}")
            self.clip_gradients(opt, gradient_clip_val=float(self.cfg.grad_clip), gradient_clip_algorithm="norm")
            if not self.cfg.lrs_in_main_opt:
                self.clip_gradients(lr_opt, gradient_clip_val=float(self.cfg.grad_clip), gradient_clip_algorithm="norm")
            opt.step()
            lr_opt.step()
            opt.zero_grad(set_to_none=True)
            lr_opt.zero_grad(set_to_none=True)
            row = {f"train/{k}": sum(v) / len(v) for k, v in self._acc.items()}
            if world > 1:  # the job's numbers: mean over the ranks' batches of this step
                keys = sorted(row)
                mean = self.trainer.strategy.reduce(torch.tensor([row[k] for k in keys], dtype=torch.float64,
                                                                 device=self.device), reduce_op="mean")
                row = dict(zip(keys, mean.tolist()))
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
        out = mend_step(self.lm, self.net, batch, float(self.cfg.cedit), float(self.cfg.cloc), with_pre=True)
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
        checkpoint["mend_progress"] = {"iters": self.iters, "batches": self._batches, "skipped": self.skipped}

    def on_load_checkpoint(self, checkpoint):
        """Resume (``trainer.fit(ckpt_path=...)``): the history and counters continue where the checkpoint was."""
        self.history = list(checkpoint.get("mend_history", []))
        prog = checkpoint.get("mend_progress", {})
        self.iters = int(prog.get("iters", 0))
        self._batches = int(prog.get("batches", 0))
        self.skipped = int(prog.get("skipped", 0))
