"""Run set-up: output directory, resolved config, log file, seeding and the experiment logger.

Every run writes ``config.yaml`` (fully resolved), ``run.log`` and its results to ``run.dir``. The logger
is Lightning's ``WandbLogger`` (offline automatically when no API key is configured; online otherwise,
unchanged), ``CSVLogger`` (``logger=csv``) or none (``logger=none``).
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from massedit.core.io import atomic_write_json, atomic_write_text

log = logging.getLogger("massedit")


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


def default_run_dir(cfg: DictConfig) -> Path:
    name = cfg.get("run_name") or f"{cfg.get('method', {}).get('name', 'run')}-{_timestamp()}"
    return Path(cfg.get("output_root", "outputs")) / str(name)


@dataclass
class Run:
    cfg: DictConfig
    dir: Path
    logger: Any = None
    _file_handler: logging.Handler | None = field(default=None, repr=False)

    def path(self, name: str) -> Path:
        return self.dir / name

    def save_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.dir / name, obj)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.logger is not None:
            clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
            if clean:
                self.logger.log_metrics(clean, step=step)

    def log_summary(self, metrics: dict[str, Any]) -> None:
        """Final numbers: W&B run summary when available, else regular metrics."""
        exp = getattr(self.logger, "experiment", None) if self.logger is not None else None
        if exp is not None and hasattr(exp, "summary"):
            for k, v in metrics.items():
                exp.summary[k] = v
        else:
            self.log_metrics(metrics)

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


def configure_logging(level: str | int = "INFO") -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_massedit", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S"))
        h._massedit = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(level)


def make_logger(cfg: DictConfig, run_dir: Path):
    lcfg = cfg.get("logger") or {}
    kind = (lcfg.get("kind") or "none") if lcfg else "none"
    if kind == "none":
        return None
    if kind == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    if kind == "wandb":
        from pytorch_lightning.loggers import WandbLogger
        mode = resolve_wandb_mode(lcfg.get("mode", "auto"))
        os.environ.setdefault("WANDB_SILENT", "true")
        return WandbLogger(
            project=lcfg.get("project", "massedit"),
            entity=lcfg.get("entity"),
            name=lcfg.get("name") or run_dir.name,
            group=lcfg.get("group"),
            tags=list(lcfg.get("tags") or []),
            save_dir=str(run_dir),
            mode=mode,
            config=OmegaConf.to_container(cfg, resolve=True),
            job_type=lcfg.get("job_type"),
        )
    raise ValueError(f"unknown logger kind {kind!r}; choose wandb, csv or none")


def setup_run(cfg: DictConfig, *, make_dir: bool = True) -> Run:
    """Create the run directory, write the resolved config, attach a log file, seed, build the logger."""
    configure_logging(cfg.get("log_level", "INFO"))
    run_dir = Path(cfg.get("output_dir") or default_run_dir(cfg)).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    fh = logging.FileHandler(run_dir / "run.log")
    fh.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s"))
    logging.getLogger().addHandler(fh)
    seed = cfg.get("seed")
    if seed is not None:
        from pytorch_lightning import seed_everything
        seed_everything(int(seed), workers=True, verbose=False)
    logger = make_logger(cfg, run_dir)
    log.info("run directory: %s", run_dir)
    return Run(cfg=cfg, dir=run_dir, logger=logger, _file_handler=fh)
