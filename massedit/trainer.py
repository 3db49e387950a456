"""The one place where ``trainer.*`` settings become a Lightning ``Trainer`` and a model gets its device.

Every Lightning run of massedit (the edit job's evaluation, statistics and edit stage, FT-W and MEND
training) is built by :func:`build_trainer` from one :class:`TrainerConfig` (the ``trainer`` config
group); stage-specific switches (``max_epochs``, checkpoint callbacks, ...) are passed as keyword
arguments and never read from the config elsewhere. :func:`place_model` puts a model where that
Trainer will run it (this rank's device), and :func:`keep_device` undoes Lightning's habit of moving a
module back to the CPU when a stage ends.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from massedit.core.errors import InputError

log = logging.getLogger(__name__)

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
PRECISIONS = ("auto", "32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")
_TRUE_DTYPE = {"32-true": torch.float32, "32": torch.float32, "16-true": torch.float16, "bf16-true": torch.bfloat16,
               "64-true": torch.float64}
_NATURAL = {torch.float32: "32-true", torch.float16: "16-true", torch.bfloat16: "bf16-true", torch.float64: "64-true"}


class TrainerConfigError(InputError):
    """A ``trainer.*`` value that cannot work (named in the message)."""


@dataclass
class TrainerConfig:
    """``trainer`` config group: how every Lightning run of the job executes."""

    accelerator: str = "auto"        # auto | cpu | gpu | mps
    devices: Any = 1                 # number of devices (>1: DDP), a list of device indices, or "auto"
    strategy: str = "auto"           # auto | ddp | ddp_spawn | ddp_fork
    precision: str = "auto"          # auto (= the model's dtype) | 16-mixed | bf16-mixed | 32-true | bf16-true | 16-true
    num_nodes: int = 1
    enable_progress_bar: bool = True

    def __post_init__(self) -> None:
        if str(self.accelerator) not in ACCELERATORS:
            raise TrainerConfigError(f"trainer.accelerator={self.accelerator!r}: choose one of {ACCELERATORS}")
        if str(self.strategy) not in STRATEGIES:
            raise TrainerConfigError(f"trainer.strategy={self.strategy!r}: choose one of {STRATEGIES}")
        if str(self.precision) not in PRECISIONS:
            raise TrainerConfigError(f"trainer.precision={self.precision!r}: choose one of {PRECISIONS}")
        if int(self.num_nodes) < 1:
            raise TrainerConfigError(f"trainer.num_nodes must be >= 1, got {self.num_nodes}")
        d = self.devices
        if isinstance(d, str) and d != "auto":
            try:
                self.devices = int(d)
            except ValueError:
                raise TrainerConfigError(f"trainer.devices={d!r}: an integer, a list of indices or 'auto'") from None
        if isinstance(self.devices, int) and self.devices < 1:
            raise TrainerConfigError(f"trainer.devices must be >= 1, got {self.devices}")

    @property
    def world_size(self) -> int:
        """Processes this config asks for (``auto`` counts as 1 until Lightning resolves it)."""
        d = self.devices
        n = len(d) if isinstance(d, (list, tuple)) else (int(d) if isinstance(d, int) else 1)
        return n * int(self.num_nodes)


def resolve_precision(precision: str, model_dtype: torch.dtype | None) -> str:
    """Lightning precision for a model of ``model_dtype``: ``auto`` = its own dtype; ``*-true`` only when it equals
    that dtype (Lightning would otherwise convert the user's model in place); ``*-mixed`` as asked."""
    p = str(precision)
    if model_dtype is None:
        return "32-true" if p == "auto" else p
    natural = _NATURAL.get(model_dtype, "32-true")
    if p == "auto":
        return natural
    want = _TRUE_DTYPE.get(p)
    if want is not None and want != model_dtype and p not in ("32-true", "32"):  # 32-true converts nothing
        raise TrainerConfigError(
            f"trainer.precision={p} would convert the {str(model_dtype).replace('torch.', '')} model in place; "
            f"set model.dtype to match, use trainer.precision=auto, or a mixed precision (16-mixed / bf16-mixed)")
    return p


def lightning_kwargs(cfg: TrainerConfig, model_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The ``pytorch_lightning.Trainer`` arguments that come from the config."""
    accelerator = "gpu" if cfg.accelerator == "cuda" else cfg.accelerator
    strategy = cfg.strategy
    if strategy == "auto" and cfg.world_size > 1 and accelerator in ("cpu",):
        strategy = "ddp"  # Lightning's default on CPU would be ddp_spawn, which cannot hand results back
    return {"accelerator": accelerator, "devices": cfg.devices, "strategy": strategy,
            "precision": resolve_precision(cfg.precision, model_dtype), "num_nodes": int(cfg.num_nodes),
            "enable_progress_bar": bool(cfg.enable_progress_bar)}


def build_trainer(cfg: TrainerConfig | None = None, *, model_dtype: torch.dtype | None = None, logger: Any = False,
                  callbacks: Sequence[Any] = (), **stage_kwargs):
    """A ``pytorch_lightning.Trainer`` for ``cfg`` (``trainer`` group) plus stage-specific ``stage_kwargs``.

    Defaults for massedit's runs: no checkpointing or model summary unless asked, no sanity validation,
    ``inference_mode=False`` (edits run inside Lightning hooks and need autograd), and our datamodules shard
    their own data across ranks (``use_distributed_sampler=False``; training stages pass ``True``).
    """
    import pytorch_lightning as pl

    cfg = cfg or TrainerConfig()
    kw: dict[str, Any] = dict(enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                              inference_mode=False, use_distributed_sampler=False, log_every_n_steps=1)
    kw.update(lightning_kwargs(cfg, model_dtype))
    kw.update(stage_kwargs)
    with quiet_lightning():
        return pl.Trainer(logger=logger, callbacks=with_rich_progress(callbacks, kw["enable_progress_bar"]), **kw)


def with_rich_progress(callbacks: Sequence[Any], enabled: bool) -> list[Any]:
    """One progress library for every run: Lightning's stages get ``RichProgressBar`` (rich, like massedit's own
    bars in :mod:`massedit.core.progress`) unless a progress bar callback is given."""
    from pytorch_lightning.callbacks import ProgressBar, RichProgressBar

    callbacks = list(callbacks)
    if enabled and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(RichProgressBar(leave=False))
    return callbacks


def place_model(model: torch.nn.Module, trainer) -> torch.device:
    """Move ``model`` to the device ``trainer`` runs this rank on (the local rank's GPU under DDP) and return it.

    Models dispatched over several devices (``hf_device_map``, ``model.device_map``) are left where they are."""
    if getattr(model, "hf_device_map", None):
        return next(model.parameters()).device
    device = trainer.strategy.root_device
    if next(model.parameters()).device != device:
        model.to(device)
    return device


@contextlib.contextmanager
def keep_device(model):
    """Run a Lightning stage over ``model`` and leave it on the device it was on.

    Lightning's strategy teardown moves the LightningModule (and so the wrapped model) to the CPU at the end
    of ``fit``/``validate``/``test``/``predict``; restored on exit, also after an exception.
    """
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    try:
        yield device
    finally:
        q = next(iter(model.parameters()), None)
        if q is not None and q.device != device and not getattr(model, "hf_device_map", None):
            model.to(device)


_BANNER_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning_fabric",
    "lightning_fabric.utilities.rank_zero",
    "pytorch_lightning.accelerators.cuda",
    "lightning.pytorch",
)
_EXPECTED_WARNINGS = (
    ".*does not have many workers.*",   # batches are pre-built; workers would only add overhead
    ".*LeafSpec.*",                     # Lightning/torch pytree deprecation noise
    r".*module\(s\) in eval mode.*",     # FT trains one weight of a model kept in eval mode (no dropout)
    ".*is an invalid version and will not be supported.*",
)


@contextlib.contextmanager
def quiet_lightning():
    """Hide Lightning's per-Trainer banners (GPU/TPU available, tips) and expected, harmless warnings."""
    loggers = [logging.getLogger(n) for n in _BANNER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for msg in _EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=msg)
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
