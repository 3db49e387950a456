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
import io
import logging
import pickle
import signal
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
    timeout_minutes: float = 30.0    # several ranks: how long one collective may wait (ROME: ranks > 0 wait for rank
                                     # 0's whole sequential edit; raise it for long ROME jobs)

    def __post_init__(self) -> None:
        if str(self.accelerator) not in ACCELERATORS:
            raise TrainerConfigError(f"trainer.accelerator={self.accelerator!r}: choose one of {ACCELERATORS}")
        if str(self.strategy) not in STRATEGIES:
            raise TrainerConfigError(f"trainer.strategy={self.strategy!r}: choose one of {STRATEGIES}")
        if str(self.precision) not in PRECISIONS:
            raise TrainerConfigError(f"trainer.precision={self.precision!r}: choose one of {PRECISIONS}")
        if int(self.num_nodes) < 1:
            raise TrainerConfigError(f"trainer.num_nodes must be >= 1, got {self.num_nodes}")
        if not float(self.timeout_minutes) > 0:
            raise TrainerConfigError(f"trainer.timeout_minutes must be > 0, got {self.timeout_minutes}")
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
    if strategy == "auto" and cfg.world_size > 1:
        strategy = "ddp"  # Lightning's default would be ddp_spawn on CPU (ddp_fork in notebooks): no results back
    if strategy == "ddp" and cfg.world_size > 1:
        import datetime

        from pytorch_lightning.strategies import DDPStrategy

        strategy = DDPStrategy(timeout=datetime.timedelta(minutes=float(cfg.timeout_minutes)))
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
    with quiet_lightning():  # logger None = no logger (Lightning's None would mean a default one in ./lightning_logs)
        return pl.Trainer(logger=logger if logger is not None else False,
                          callbacks=with_rich_progress(callbacks, kw["enable_progress_bar"]), **kw)


class KeepDispatched:
    """Mixin for the LightningModules that wrap a language model: Lightning moves a module to the stage's device
    (``module.to(root_device)``) at every stage; a submodule that accelerate dispatched over several devices
    (``model.device_map``: ``hf_device_map``, offloaded ``meta`` weights) is skipped and stays where it was put."""

    def _apply(self, fn, *args, **kwargs):
        mods = self._modules
        if not any(getattr(m, "hf_device_map", None) for m in mods.values()):
            return super()._apply(fn, *args, **kwargs)
        object.__setattr__(self, "_modules", {k: m for k, m in mods.items() if not getattr(m, "hf_device_map", None)})
        try:
            return super()._apply(fn, *args, **kwargs)
        finally:
            object.__setattr__(self, "_modules", mods)


def check_device_map(cfg: TrainerConfig, device_map) -> None:
    """``model.device_map`` spreads ONE copy of the model over the visible devices in one process: refuse it with
    several ranks (each rank would dispatch its own copy over the same devices)."""
    if device_map not in (None, "") and cfg.world_size > 1:
        raise TrainerConfigError(f"model.device_map={device_map} runs one process over all visible devices: set "
                                 f"trainer.devices=1 (now {cfg.devices}); use several ranks only for models that fit "
                                 f"one device each")


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


SPAWNING_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook")


def require_script_launch(cfg: TrainerConfig, job: str = "this job") -> None:
    """Refuse strategies whose ranks are spawned/forked workers for the edit, eval and train jobs.

    Those jobs keep the edited model, the deltas and the evaluation results in the process that runs the job;
    with ``ddp_spawn``/``ddp_fork`` every stage runs in short-lived workers and nothing comes back to it.
    ``ddp`` (Lightning re-runs the command once per rank) and external launchers (torchrun, srun) work."""
    if str(cfg.strategy) in SPAWNING_STRATEGIES and cfg.world_size > 1:
        raise TrainerConfigError(
            f"trainer.strategy={cfg.strategy} is not supported by {job}: its ranks are spawned workers that cannot "
            f"hand the edited model, deltas and results back; use trainer.strategy=ddp (the default for "
            f"trainer.devices>1: every rank runs the whole command) or start the ranks with torchrun / srun")


def launch_rank(cfg: TrainerConfig | None = None) -> int:
    """This process's global rank as the launcher announced it in the environment, before any Trainer exists
    (``RANK`` from torchrun; ``SLURM_PROCID`` under ``srun`` with several tasks; else Lightning's
    ``NODE_RANK * devices + LOCAL_RANK``); 0 for a plain single process."""
    import os

    env = os.environ
    if env.get("RANK", "").isdigit():
        return int(env["RANK"])
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_PROCID", "").isdigit():
        return int(env["SLURM_PROCID"])
    local = int(env.get("LOCAL_RANK", "0") or 0)
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", "0")) or 0)
    per_node = (cfg.world_size // max(1, int(cfg.num_nodes))) if cfg is not None else 1
    return node * per_node + local


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
    ".*torch.distributed.nn.functional.all_gather is deprecated.*",  # inside Lightning's strategy.all_gather
    ".*predict returned None.*",
    ".*when logging on epoch level in distributed setting.*",  # FT-W logs losses already reduced over ranks        # the no-op step that starts the ranks (lightning_modules/distributed.py)
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


# ================================================================================================ several ranks
# How a multi-device job runs (``trainer.devices=N`` with ``trainer.strategy=ddp``, or an external launcher such as
# ``torchrun`` / ``srun`` that starts N copies of the command itself):
#
# * Lightning's launcher re-runs the command once per extra rank when the first stage starts. :func:`start_ranks`
#   makes that happen right after the Trainer is built (a one-step no-op ``predict``), before the model is loaded,
#   so every later step runs on all ranks in lockstep and collectives work between stages too.
# * :class:`StrategyCollective` is the :class:`~massedit.core.collective.Collective` the plain-torch editors get:
#   it goes through ``trainer.strategy`` (``all_gather``, ``reduce``, ``broadcast``, ``barrier``).
# * :func:`finish_ranks` ends the job: rank 0 waits for the ranks it launched and fails (non-zero exit) if any of
#   them failed; after a failure on rank 0 the launched ranks are stopped.


class RankFailedError(RuntimeError):
    """Another rank of this job exited with an error (its own message is above, prefixed with its rank)."""


def _strategy(trainer_or_strategy):
    return getattr(trainer_or_strategy, "strategy", trainer_or_strategy)


def distributed_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class StrategyCollective:
    """:class:`~massedit.core.collective.Collective` over a Lightning strategy (``trainer.strategy``).

    Tensors travel on the strategy's ``root_device`` (this rank's GPU under NCCL, the CPU under gloo) and come
    back on the device they were given on."""

    def __init__(self, trainer_or_strategy):
        self.strategy = _strategy(trainer_or_strategy)

    @property
    def rank(self) -> int:
        return int(self.strategy.global_rank)

    @property
    def world_size(self) -> int:
        return int(self.strategy.world_size) if distributed_ready() else 1

    @property
    def device(self) -> torch.device:
        return self.strategy.root_device

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        buf = io.BytesIO()
        pickle.dump(obj, buf, protocol=pickle.HIGHEST_PROTOCOL)
        data = torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8).to(self.device)
        sizes = self.strategy.all_gather(torch.tensor([data.numel()], dtype=torch.int64, device=self.device))
        sizes = [int(s) for s in sizes.reshape(-1).tolist()]
        padded = torch.zeros(max(sizes), dtype=torch.uint8, device=self.device)
        padded[: data.numel()] = data
        parts = self.strategy.all_gather(padded).cpu()
        return [pickle.loads(parts[r, : sizes[r]].numpy().tobytes()) for r in range(len(sizes))]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        return self.strategy.broadcast(obj, src=src)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor.clone()
        t = tensor.detach().to(self.device, copy=True).contiguous()
        return self.strategy.reduce(t, reduce_op="sum").to(tensor.device)

    def barrier(self, name: str = "") -> None:
        if self.world_size > 1:
            self.strategy.barrier(name or None)


def collective_for(trainer):
    """A :class:`StrategyCollective` for ``trainer`` when it runs several ranks, else ``None`` (one process)."""
    if trainer is None or int(getattr(trainer, "world_size", 1)) <= 1 or not distributed_ready():
        return None
    return StrategyCollective(trainer)


# ------------------------------------------------------------------------------------------ start / finish
def start_ranks(trainer, run=None) -> None:
    """Start this job's other ranks now (no-op with one device or when they already run); ``run`` (a
    :class:`massedit.tasks.runs.Run`) then takes rank 0's run directory on every rank.

    Lightning's launcher re-runs the command for each extra rank when the first stage begins; doing it here, right
    after the Trainer is built, means the other ranks only repeat the cheap steps before this call (compose, read
    the requests, build the Trainer), and the process group exists for every collective that follows."""
    if int(trainer.world_size) <= 1:
        return
    if type(getattr(trainer.strategy, "launcher", None)).__name__ == "_MultiProcessingLauncher":
        return  # ddp_spawn / ddp_fork (`massedit stats` only): workers live for one stage, nothing to start now
    if not distributed_ready():
        _launch(trainer)
    if run is not None:
        run.adopt_rank0_dir(StrategyCollective(trainer).broadcast_object)


def _launch(trainer) -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    class _Launch(pl.LightningModule):  # one no-op step: its only purpose is to start the ranks
        def predict_step(self, batch, batch_idx):
            return None

    bar = getattr(trainer, "progress_bar_callback", None)
    was_enabled = bar is not None and bar.is_enabled
    if was_enabled:
        bar.disable()
    try:
        with quiet_lightning():
            trainer.predict(_Launch(), dataloaders=DataLoader([0], batch_size=1), return_predictions=False)
    finally:
        if was_enabled:
            bar.enable()
    log.info("rank %d of %d started", trainer.global_rank, trainer.world_size)


def rank0_value(trainer, value):
    """Rank 0's ``value`` on every rank (e.g. a cache lookup whose answer decides whether a stage runs: every rank
    must take the same branch)."""
    c = collective_for(trainer)
    return value if c is None else c.broadcast_object(value)


def _children(trainer) -> list:
    launcher = getattr(trainer.strategy, "launcher", None) if trainer is not None else None
    return list(getattr(launcher, "procs", None) or [])


def finish_ranks(trainer, failed: bool, timeout_s: float = 600.0) -> None:
    """End of the job on this rank. Rank 0 of a job whose ranks Lightning launched waits for them; if one of them
    failed, :class:`RankFailedError` (non-zero exit). After a failure here the launched ranks are stopped, so none
    is left waiting in a collective. Ranks started by an external launcher (torchrun, srun) are that launcher's
    business: it reports a failure of any rank."""
    procs = _children(trainer)
    if not procs:
        return
    if failed:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        return
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout_s))
        except Exception:  # a rank that never finishes: stop it and fail
            p.send_signal(signal.SIGKILL)
            codes.append(f"still running after {timeout_s:.0f} s")
    bad = [(i + 1, c) for i, c in enumerate(codes) if c != 0]
    if bad:
        raise RankFailedError("rank(s) " + ", ".join(f"{r} (exit {c})" for r, c in bad) +
                              " failed; see their messages above")
