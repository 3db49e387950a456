"""Run set-up: output directory, resolved config, log file, seeding and the experiment logger.

Every run writes ``config.yaml`` (fully resolved), ``run.log`` and its results to ``run.dir``. The logger is
Lightning's ``WandbLogger`` (offline automatically when no API key is configured; online otherwise, unchanged),
``CSVLogger`` (``logger=csv``) or none (``logger=none``).
"""
from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from massedit.core.io import atomic_write_json, atomic_write_text
from massedit.core.errors import InputError

log = logging.getLogger("massedit")


class LoggerConfigError(InputError):
    """A ``logger.*`` value that cannot work (named in the message)."""


@dataclass
class LoggerConfig:
    """``logger`` config group: where the run's metrics go (W&B through Lightning's WandbLogger, CSV, or nowhere)."""

    kind: str = "wandb"          # wandb | csv | none
    mode: str = "auto"           # W&B: auto (online with an API key, else offline) | online | offline | disabled
    project: str = "massedit"
    entity: str | None = None
    name: str | None = None      # default: the run directory's name
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    job_type: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("wandb", "csv", "none"):
            raise LoggerConfigError(f"logger.kind={self.kind!r}: choose wandb, csv or none")
        if self.mode not in ("auto", "online", "offline", "disabled"):
            raise LoggerConfigError(f"logger.mode={self.mode!r}: choose auto, online, offline or disabled")


def wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    try:
        return netrc.exists() and "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def resolve_wandb_mode(requested: str | None) -> str:
    """``auto`` -> ``online`` when an API key is configured, else ``offline``. WANDB_MODE wins if set."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    os.environ.pop("WANDB_MODE", None)  # an empty value would be rejected by wandb
    if requested in (None, "", "auto"):
        return "online" if wandb_api_key_configured() else "offline"
    return str(requested)


def _timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def default_run_dir(job) -> Path:
    method = getattr(getattr(job, "method", None), "name", None) or getattr(job, "mode", None) or "run"
    name = job.run_name or f"{method}-{_timestamp()}"
    return Path(job.output_root) / str(name)


def _numeric(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))}


RUN_DIR_ENV = "MASSEDIT_RUN_DIR"  # rank 0's run directory, inherited by the ranks Lightning's launcher starts


@dataclass
class Run:
    """A run directory plus the experiment logger. Several ranks: one directory, written by rank 0 only (the
    writing methods do nothing on the other ranks, which have no logger)."""

    config: Any
    dir: Path
    logger: Any = None
    _file_handler: logging.Handler | None = field(default=None, repr=False)
    rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def path(self, name: str) -> Path:
        return self.dir / name

    def save_json(self, name: str, obj: Any) -> Path:
        if not self.is_main:
            return self.dir / name
        return atomic_write_json(self.dir / name, obj)

    def adopt_rank0_dir(self, broadcast) -> None:
        """Take rank 0's directory (``broadcast(obj) -> rank 0's obj``): the ranks of an external launcher
        (torchrun, srun) cannot inherit it from rank 0's environment."""
        d = Path(broadcast(str(self.dir)))
        if d != self.dir:
            log.debug("rank %d: run directory %s (chosen by rank 0)", self.rank, d)
            self.dir = d

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.logger is not None and self.is_main:
            clean = _numeric(metrics)
            if clean:
                self.logger.log_metrics(clean, step=step)

    def log_summary(self, metrics: dict[str, Any]) -> None:
        """Final numbers: the W&B run summary when available, else regular metrics."""
        if not self.is_main:
            return
        exp = self._wandb_experiment()
        if exp is not None:
            for k, v in metrics.items():
                exp.summary[k] = v
        else:
            self.log_metrics(metrics)

    def _wandb_experiment(self):
        try:
            from pytorch_lightning.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return None
        if isinstance(self.logger, WandbLogger):
            exp = self.logger.experiment
            return exp if hasattr(exp, "summary") else None
        return None

    def log_evaluation(self, pre, post, summary: dict[str, Any]) -> None:
        """W&B: run summary ``eval/{stage}/{metric}`` and a per-case ``wandb.Table``; other Lightning loggers (CSV,
        ...): ``log_metrics`` of the same numbers. A logging failure never loses the written report."""
        if not self.is_main:
            return
        flat = {}
        for name, d in summary["metrics"].items():
            for stage in ("pre", "post"):
                if d[stage] is not None:
                    flat[f"eval/{stage}/{name}"] = float(d[stage])
                if d["ci"][stage] is not None:
                    flat[f"eval/{stage}/{name}_ci"] = float(d["ci"][stage])
        try:
            exp = self._wandb_experiment()
            if exp is not None:
                import wandb

                for k, v in flat.items():
                    exp.summary[k] = v
                names = [n for n in (post or pre).summary if n != "score"]
                table = wandb.Table(columns=["case_id", "stage"] + names)
                for stage, res in (("pre", pre), ("post", post)):
                    if res is None:
                        continue
                    for c in res.per_case:
                        table.add_data(str(c["case_id"]), stage, *[c.get(n) for n in names])
                exp.log({"eval/per_case": table, **flat})
            elif self.logger is not None:
                self.logger.log_metrics(flat)
                if hasattr(self.logger, "save"):
                    self.logger.save()
        except Exception as e:  # pragma: no cover - logger back-ends fail in many ways
            log.warning("could not log the evaluation to %s: %s", type(self.logger).__name__, e)

    def finish(self) -> None:
        if self.logger is not None:
            try:
                self.logger.finalize("success")
            except Exception:  # pragma: no cover - logger teardown must not fail a finished run
                pass
            exp = getattr(self.logger, "_experiment", None)
            if exp is not None and hasattr(exp, "finish"):
                exp.finish()
        if self._file_handler is not None:
            logging.getLogger().removeHandler(self._file_handler)
            self._file_handler.close()


def configure_logging(level: str | int = "INFO", rank: int = 0) -> None:
    """Log to stderr at ``level``. Ranks other than 0 only log errors, prefixed ``[rank N]``: rank 0 tells the story
    of the job once (every rank runs the same steps, so their info and warnings would repeat rank 0's)."""
    root = logging.getLogger()
    if not any(getattr(h, "_massedit", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        prefix = f"[rank {rank}] " if rank else ""
        h.setFormatter(logging.Formatter(prefix + "[%(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S"))
        h._massedit = True  # type: ignore[attr-defined]
        root.addHandler(h)
    if rank:
        try:  # transformers' "Loading weights" bars: once, from rank 0
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
        n = level if isinstance(level, int) else logging.getLevelName(str(level).upper())
        level = max(n if isinstance(n, int) else logging.INFO, logging.ERROR)
    root.setLevel(level)


def choose_run_dir(job, rank: int = 0, world_size: int = 1) -> Path:
    """The run directory: rank 0 picks it (``output_dir``, else ``<output_root>/<run_name or method-timestamp>``)
    and, with several ranks, leaves it in ``$MASSEDIT_RUN_DIR`` for the ranks Lightning's launcher starts later
    (they re-run the command and inherit rank 0's environment); those ranks take it from there."""
    inherited = os.environ.get(RUN_DIR_ENV) if rank > 0 else None
    run_dir = Path(inherited or job.output_dir or default_run_dir(job)).expanduser().resolve()
    if rank == 0 and world_size > 1:
        os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def make_logger(cfg: LoggerConfig, run_dir: Path, config_dict: dict[str, Any]):
    """The Lightning logger of ``logger.kind`` writing below ``run_dir`` (``None`` for ``none``)."""
    if cfg.kind == "none":
        return None
    if cfg.kind == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    from pytorch_lightning.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name, group=cfg.group,
                       tags=list(cfg.tags), save_dir=str(run_dir), mode=resolve_wandb_mode(cfg.mode),
                       config=config_dict, job_type=cfg.job_type)


def as_dict(job) -> dict[str, Any]:
    """The resolved job config as plain nested dicts (for config.yaml, W&B and cache keys).

    Lives here, not in :mod:`massedit.tasks.config` (which re-exports it), so that ``config`` -> ``runs``
    (for :class:`LoggerConfig`) is the only import between the two modules (no cycle)."""
    if isinstance(job, (DictConfig, ListConfig)):
        return OmegaConf.to_container(job, resolve=True)
    return OmegaConf.to_container(OmegaConf.structured(job), resolve=True)


def to_yaml(job) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(as_dict(job)))


def setup_run(job) -> Run:
    """Create the run directory, write the resolved config, attach a log file, seed, build the logger."""
    from massedit.trainer import launch_rank

    trainer_cfg = getattr(job, "trainer", None)
    rank = launch_rank(trainer_cfg)
    world = int(getattr(trainer_cfg, "world_size", 1) or 1)
    configure_logging(job.log_level, rank=rank)
    run_dir = choose_run_dir(job, rank, world)
    fh = None
    if rank == 0:  # one directory, one config.yaml, one run.log: the other ranks write nothing
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(job))
        fh = logging.FileHandler(run_dir / "run.log")
        fh.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s"))
        logging.getLogger().addHandler(fh)
    from pytorch_lightning import seed_everything

    seed_everything(int(job.seed), workers=True, verbose=False)
    logger = make_logger(job.logger, run_dir, as_dict(job)) if rank == 0 else None
    log.info("run directory: %s", run_dir)
    return Run(config=job, dir=run_dir, logger=logger, _file_handler=fh, rank=rank)
