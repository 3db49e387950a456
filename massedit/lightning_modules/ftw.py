"""FT / FT-L / FT-W as a LightningModule trained with ``Trainer.fit`` (REFERENCE_SPEC §3), and the ``Editor`` of
``method=ft|ftl|ftw`` (:class:`FTEditor`).

Thin glue: the loss, parameter selection, L∞ projection and optimiser are plain-torch functions in
:mod:`massedit.editing.ft`. The module reproduces the reference loop: ``epochs`` passes over the
requests in batches, no step on a batch whose loss is below ``skip_loss_below``, FT-L projection after
every batch, stop when an epoch's mean loss is below ``stop_loss_below``.
"""
from __future__ import annotations

import dataclasses

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from massedit.core.deltas import Deltas, delta_norms, diff_from, revert_deltas
from massedit.datamodules.requests import EditRequestsDataModule
from massedit.editing.ft import FTConfig, FTConfigError, effective_weight_decay, ft_loss, make_optimizer, project_to_linf_ball_, select_ft_parameters
from massedit.trainer import KeepDispatched, TrainerConfig, build_trainer, keep_device, quiet_lightning

log = logging.getLogger(__name__)


class FTWModule(KeepDispatched, pl.LightningModule):
    """Fine-tunes ``param_names`` of ``model`` on edit-request batches (see module docstring)."""

    def __init__(self, model: nn.Module, param_names: Sequence[str], originals: Mapping[str, torch.Tensor],
                 cfg: FTConfig, weight_decay: float):
        super().__init__()
        self.model = model
        self.param_names = list(param_names)
        self.originals = dict(originals)
        self.cfg = cfg
        self.weight_decay = float(weight_decay)
        self._epoch_losses: list[torch.Tensor] = []
        self.epoch_mean_losses: list[float] = []
        self.optimizer_steps = 0
        self.skipped_batches = 0

    def _tuned(self) -> dict[str, nn.Parameter]:
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.param_names}

    def on_train_batch_start(self, batch, batch_idx):
        if not self.cfg.dropout:
            self.model.eval()  # reference: the model stays in eval mode (no dropout)

    def _batch_loss(self, loss: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss of the whole batch, loss to backpropagate on this rank)``. One process: both are the loss. Under
        DDP each rank holds ``n_real`` of the batch's ``n_global`` requests; the batch loss is their weighted mean
        (all-reduced: every rank takes the same skip/stop decisions) and the backward loss is scaled so that DDP's
        gradient average equals the gradient of the whole batch's mean loss, as with one process."""
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1 or "n_real" not in batch:
            return loss, loss
        n_real, n_global = batch["n_real"].to(loss), batch["n_global"].to(loss)
        total = trainer.strategy.reduce((loss.detach() * n_real).reshape(1).clone(), reduce_op="sum")[0]
        return total / n_global, loss * n_real * trainer.world_size / n_global

    def training_step(self, batch, batch_idx):
        loss, local = self._batch_loss(ft_loss(self.model, batch, self.cfg.loss), batch)
        bs = int(batch["n_global"]) if "n_global" in batch else int(batch["input_ids"].shape[0])
        self._epoch_losses.append(loss.detach())
        # one name per number: the step loss here, the epoch mean as train/epoch_loss (no _step/_epoch copies)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=bs)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"FT loss is {loss.item()} at batch {batch_idx}; lower method.lr or use fp32")
        if loss.item() < float(self.cfg.skip_loss_below or 0.0):
            self.skipped_batches += 1
            return None  # reference: no backward/step on an already-fitted batch
        self.optimizer_steps += 1
        return local

    def on_train_batch_end(self, outputs, batch, batch_idx):
        eps = self.cfg.norm_constraint
        if eps:
            project_to_linf_ball_(self._tuned(), self.originals, float(eps))

    def on_train_epoch_end(self):
        if not self._epoch_losses:
            return
        mean = float(torch.stack(self._epoch_losses).float().mean())
        self._epoch_losses.clear()
        self.epoch_mean_losses.append(mean)
        self.log("train/epoch_loss", mean, on_epoch=True)
        if mean < float(self.cfg.stop_loss_below or 0.0):
            self.trainer.should_stop = True

    def configure_optimizers(self):
        return make_optimizer(self._tuned(), self.originals, self.cfg, self.weight_decay)


@dataclass
class FTResult:
    deltas: dict[str, torch.Tensor]
    param_names: list[str]
    weight_decay: float
    epoch_losses: list[float] = field(default_factory=list)
    optimizer_steps: int = 0
    skipped_batches: int = 0
    seconds: float = 0.0

    @property
    def delta_norm(self) -> float:
        return float(math.sqrt(sum(float(d.float().pow(2).sum()) for d in self.deltas.values())))

    def summary(self) -> dict[str, Any]:
        return {"param_names": self.param_names, "weight_decay": self.weight_decay,
                "epoch_losses": self.epoch_losses, "final_loss": self.epoch_losses[-1] if self.epoch_losses else None,
                "optimizer_steps": self.optimizer_steps, "skipped_batches": self.skipped_batches,
                "train_seconds": self.seconds, "delta_norm": self.delta_norm, "delta_norms": delta_norms(self.deltas)}


def fit_ft(model: nn.Module, tok, requests: Sequence, cfg: FTConfig, trainer_cfg: TrainerConfig | None = None,
           logger=None, callbacks=None) -> FTResult:
    """Fine-tune on ``requests`` with ``Trainer.fit`` and return the deltas ``W − W₀`` (float32).

    Runs on the model's own device (``trainer.*`` decides precision and, with several devices, DDP over the
    requests); afterwards the model is restored exactly (weights bit-identical, ``requires_grad`` flags,
    train/eval mode, device).
    """
    params = select_ft_parameters(model, cfg.layers, cfg.params, cfg.param_names)
    offloaded = [n for n, p in params.items() if p.device.type == "meta"]
    if offloaded:
        raise FTConfigError(f"FT cannot train weights that model.device_map offloaded (kept off the devices): "
                            f"{offloaded[:3]}{' ...' if len(offloaded) > 3 else ''}; give the devices more room "
                            f"(model.max_memory) or tune layers that sit on a device")
    wd = effective_weight_decay(cfg, len(requests))
    dm = EditRequestsDataModule(requests, tok, batch_size=int(cfg.batch_size), loss=cfg.loss, shuffle=bool(cfg.shuffle),
                                seed=cfg.seed)
    originals = {n: p.detach().clone() for n, p in params.items()}
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    trainer_cfg = trainer_cfg or TrainerConfig()
    log.info("FT: tuning %s (%d values), wd=%.3g (%s, decay_to=%s), loss=%s, lr=%g, epochs=%s, batch=%s",
             list(params), sum(p.numel() for p in params.values()), wd, cfg.optimizer, cfg.decay_to,
             cfg.loss, cfg.lr, cfg.epochs, cfg.batch_size)
    module = FTWModule(model, list(params), originals, cfg, wd)
    t0 = time.time()
    try:
        with quiet_lightning(), keep_device(model):  # Lightning's teardown would move the module to the CPU
            # several devices: DDP over the requests (RequestBatchSampler splits every batch). Inside a running
            # multi-rank job this Trainer joins the existing ranks and process group (nothing is launched again).
            if _inside_live_display() and trainer_cfg is not None and trainer_cfg.enable_progress_bar:
                # FT inside another Trainer's stage (ApplyEdit in the edit job): that stage's rich bar is live, and a
                # second RichProgressBar would tear the console's live stack down under it (IndexError at teardown)
                trainer_cfg = dataclasses.replace(trainer_cfg, enable_progress_bar=False)
                log.info("FT: training inside the running stage: no second progress bar (epoch losses go to the logger and the results)")
            trainer = build_trainer(trainer_cfg, model_dtype=next(model.parameters()).dtype,
                                    logger=logger if logger is not None else False, callbacks=list(callbacks or []),
                                    max_epochs=int(cfg.epochs), max_steps=int(cfg.max_steps),
                                    gradient_clip_val=cfg.grad_clip, use_distributed_sampler=False)
            model.requires_grad_(False)
            for p in params.values():
                p.requires_grad_(True)
            # DDP syncs only the tuned weights (not the whole frozen model at wrap time)
            module._ddp_params_and_buffers_to_ignore = (
                [f"model.{n}" for n, _ in model.named_parameters() if n not in params]
                + [f"model.{n}" for n, _ in model.named_buffers()])
            trainer.fit(module, datamodule=dm)
        deltas = diff_from(model, originals)
    finally:
        revert_deltas(model, originals)
        for n, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(n, False))
        model.train(was_training)
    return FTResult(deltas=deltas, param_names=list(params), weight_decay=wd,
                    epoch_losses=list(module.epoch_mean_losses), optimizer_steps=module.optimizer_steps,
                    skipped_batches=module.skipped_batches, seconds=time.time() - t0)


def _inside_live_display() -> bool:
    """Whether a rich live display (another stage's progress bar) is running on the console."""
    try:
        import rich

        return bool(getattr(rich.get_console(), "_live_stack", None))
    except Exception:  # noqa: BLE001 - no rich: no live display
        return False


class FTEditor:
    """``Editor`` of ``method=ft|ftl|ftw``: fine-tune on the requests with Lightning, return ``W − W₀``.

    The model is left exactly as found (weights restored bit-identically, ``requires_grad`` flags and
    train/eval mode restored). ``info`` holds the training summary of the last edit.
    """

    distributed = "shared"  # several ranks: every rank trains (DDP over the requests), same deltas everywhere

    def __init__(self, cfg: FTConfig, trainer_cfg: TrainerConfig | None = None, logger=None):
        self.cfg, self.trainer_cfg, self.logger = cfg, trainer_cfg, logger
        self.last_result: FTResult | None = None
        self.info: dict[str, Any] = {}

    @property
    def method(self) -> str:
        return self.cfg.name

    def edit(self, model: nn.Module, tok, requests: Sequence) -> Deltas:
        if not requests:
            raise ValueError("no edit requests")
        result = fit_ft(model, tok, requests, self.cfg, trainer_cfg=self.trainer_cfg, logger=self.logger)
        self.last_result = result
        self.info = {"method": self.cfg.name, "n_requests": len(requests), **result.summary()}
        return result.deltas
