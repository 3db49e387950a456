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


LOGGER_KINDS = ("wandb", "csv", "tensorboard", "mlflow", "none")
# optional extras of the Lightning loggers: logger.kind -> (module, pip extra)
LOGGER_EXTRAS = {"tensorboard": ("tensorboard", "massedit[tensorboard]"), "mlflow": ("mlflow", "massedit[mlflow]")}


class LoggerConfigError(InputError):
    """A ``logger.*`` value that cannot work (named in the message)."""


@dataclass
class LoggerConfig:
    """``logger`` config group: where the run's metrics go (W&B through Lightning's WandbLogger, CSV, or nowhere)."""

    kind: str = "wandb"          # wandb | csv | tensorboard | mlflow | none (tensorboard/mlflow: optional extras)
    mode: str = "auto"           # W&B: auto (online with an API key, else offline) | online | offline | disabled
    project: str = "massedit"
    entity: str | None = None
    name: str | None = None      # default: the run directory's name
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    job_type: str | None = None
    log_model: bool = True       # W&B: upload Lightning checkpoints (MEND training) as `model` artifacts at the end
    artifacts: bool = True       # W&B: upload deltas, statistics, MEND editor and the report as artifacts
    tracking_uri: str | None = None  # MLflow: tracking server / store (default: sqlite:///<run dir>/mlflow.db)

    def __post_init__(self) -> None:
        if self.kind not in LOGGER_KINDS:
            raise LoggerConfigError(f"logger.kind={self.kind!r}: choose one of {', '.join(LOGGER_KINDS)}")
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

    def log_evaluation(self, pre, post, summary: dict[str, Any], requests=None) -> None:
        """W&B: run summary ``eval/{stage}/{metric}`` (+ ``_ci``) and the per-case ``eval/per_case`` table (case id,
        subject, prompt, targets, then every metric before and after); other Lightning loggers (CSV, TensorBoard,
        MLflow): ``log_metrics`` of the same numbers. A logging failure never loses the written report."""
        if not getattr(self, "is_main", True):  # several ranks: rank 0 logs
            return
        flat = evaluation_metrics(summary)
        try:
            exp = self._wandb_experiment()
            if exp is not None:
                import wandb

                columns, rows = per_case_rows(pre, post, requests)
                for k, v in flat.items():
                    exp.summary[k] = v
                exp.log({"eval/per_case": wandb.Table(columns=columns, data=rows), **flat})
            elif self.logger is not None:
                self.logger.log_metrics(flat)
                if hasattr(self.logger, "save"):
                    self.logger.save()
        except Exception as e:  # pragma: no cover - logger back-ends fail in many ways
            log.warning("could not log the evaluation to %s: %s", type(self.logger).__name__, e)

    def log_artifact(self, name: str, kind: str, files: dict[str, Any] | list, metadata: dict | None = None,
                     aliases: list[str] | None = None) -> bool:
        """Upload ``files`` (``{name in the artifact: path}`` or paths) as a W&B artifact (``logger.artifacts``); with
        MLflow the files become run artifacts. Other loggers: nothing (the files stay in the run directory)."""
        if not getattr(self.config.logger, "artifacts", True) or self.logger is None or not getattr(self, "is_main", True):
            return False
        items = files.items() if isinstance(files, dict) else [(Path(f).name, f) for f in files]
        items = [(str(k), Path(v)) for k, v in items if v is not None and Path(v).is_file()]
        if not items:
            return False
        try:
            exp = self._wandb_experiment()
            if exp is not None:
                import wandb

                art = wandb.Artifact(artifact_name(name), type=kind, metadata=metadata or {})
                for k, path in items:
                    art.add_file(str(path), name=k)
                exp.log_artifact(art, aliases=aliases)
                return True
            if type(self.logger).__name__ == "MLFlowLogger":
                for k, path in items:
                    self.logger.experiment.log_artifact(self.logger.run_id, str(path), artifact_path=f"{kind}/{Path(k).parent}".rstrip("/."))
                return True
        except Exception as e:  # pragma: no cover
            log.warning("could not upload artifact %s: %s", name, e)
        return False

    def finish(self) -> None:
        status = self._record_exit()
        if self.logger is not None:
            try:
                self.logger.finalize(status)
            except Exception:  # pragma: no cover - logger teardown must not fail a finished run
                pass
            exp = getattr(self.logger, "_experiment", None)
            if exp is not None and hasattr(exp, "finish"):
                exp.finish()
        if self._file_handler is not None:
            logging.getLogger().removeHandler(self._file_handler)
            self._file_handler.close()

    def _record_exit(self) -> str:
        """Called by :meth:`finish` from the job's ``finally``: when an exception is on its way out, write what
        happened to ``run.log`` (a user error's one line, an interruption, or an unexpected error's full
        traceback — only to the file: the command line prints its own one line); ``"success"``/``"failed"``."""
        exc = sys.exc_info()[1]
        if exc is None:
            return "success"
        if self._file_handler is not None:
            from massedit.core.errors import InputError

            if isinstance(exc, InputError):
                rec = log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (exc,), None)
            elif isinstance(exc, (Interrupted, KeyboardInterrupt, SystemExit)):
                rec = log.makeRecord(log.name, logging.ERROR, __file__, 0, "interrupted (%s): the files written so far "
                                     "are complete (atomic writes); rerun with resume=true to continue",
                                     (received_signal_name() or type(exc).__name__,), None)
            else:
                rec = log.makeRecord(log.name, logging.ERROR, __file__, 0, "unexpected error (a bug in massedit: "
                                     "please report it with this traceback)", (), sys.exc_info())
            try:
                self._file_handler.handle(rec)
                self._file_handler.flush()
            except Exception:  # pragma: no cover - a full disk must not hide the original error
                pass
        return "failed"


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stderr`` is at the time of each record (not the object it was when the
    handler was made: in-process runs under a test runner or a notebook replace and close it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(level: str | int = "INFO", rank: int = 0) -> None:
    """Log to stderr at ``level``. Ranks other than 0 only log errors, prefixed ``[rank N]``: rank 0 tells the story
    of the job once (every rank runs the same steps, so their info and warnings would repeat rank 0's)."""
    root = logging.getLogger()
    if not any(getattr(h, "_massedit", False) for h in root.handlers):
        h = _StderrHandler()
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


def hand_over_run_dir(run_dir: Path, rank: int = 0, world_size: int = 1) -> Path:
    """One directory for all ranks: rank 0's choice (``output_dir``, else ``<output_root>/<run_name or
    method-timestamp>``) is left in ``$MASSEDIT_RUN_DIR`` for the ranks Lightning's launcher starts later (they
    re-run the command and inherit rank 0's environment, whatever their clock says); those ranks take it from there.
    Ranks of an external launcher (torchrun, srun) get it by broadcast once the ranks are up
    (:meth:`Run.adopt_rank0_dir`)."""
    if rank > 0:
        inherited = os.environ.get(RUN_DIR_ENV)
        return Path(inherited) if inherited else run_dir
    if world_size > 1:
        os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def flat_config(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"method.lr": ..., "data.num_edits": ...}``: the names a W&B sweep file uses, so that a
    sweep's parameters (``method: ftw``, ``method.weight_decay: 0.01``) sit beside the run's config instead of
    replacing its nested sections. Lists stay values."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(flat_config(v, key))
            else:
                out[key] = v
    return out


def artifact_name(name: str) -> str:
    """A valid W&B artifact name (letters, digits, ``-_.``)."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip("-.")[:128] or "artifact"


def evaluation_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """``eval/{stage}/{metric}`` and ``eval/{stage}/{metric}_ci`` from a report's summary dict: the one namespace
    of the evaluation numbers (W&B summary, other loggers, a sweep's ``metric.name``)."""
    flat = {}
    for name, d in summary["metrics"].items():
        for stage in ("pre", "post"):
            if d[stage] is not None:
                flat[f"eval/{stage}/{name}"] = float(d[stage])
            if d["ci"][stage] is not None:
                flat[f"eval/{stage}/{name}_ci"] = float(d["ci"][stage])
    return flat


def per_case_rows(pre, post, requests=None) -> tuple[list[str], list[list[Any]]]:
    """The per-case table: ``case_id, subject, prompt, target_new, target_true``, then ``pre/<metric>`` and
    ``post/<metric>`` for every per-case value (a row per request, pre and post side by side)."""
    any_res = post or pre
    by_id = {str(r.case_id): r for r in (requests or [])}
    stages = [(n, r) for n, r in (("pre", pre), ("post", post)) if r is not None]
    value_keys: list[str] = []
    for _, res in stages:
        for c in res.per_case:
            for k, v in c.items():
                if k != "case_id" and k not in value_keys and (v is None or isinstance(v, (int, float, bool, str))):
                    value_keys.append(k)
    per_stage = {n: {str(c["case_id"]): c for c in res.per_case} for n, res in stages}
    columns = ["case_id", "subject", "prompt", "target_new", "target_true"] + [f"{n}/{k}" for n, _ in stages for k in value_keys]
    rows = []
    for c in any_res.per_case:
        cid = str(c["case_id"])
        r = by_id.get(cid)
        row = [cid, getattr(r, "subject", None), getattr(r, "prompt", None), getattr(r, "target_new", None),
               getattr(r, "target_true", None)]
        for n, _ in stages:
            case = per_stage[n].get(cid, {})
            row += [_cell(case.get(k)) for k in value_keys]
        rows.append(row)
    return columns, rows


def _cell(v):
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _require(kind: str) -> None:
    import importlib.util

    module, extra = LOGGER_EXTRAS[kind]
    if importlib.util.find_spec(module) is None:
        raise LoggerConfigError(f"logger.kind={kind} needs the `{module}` package: pip install '{extra}'")


def make_logger(cfg: LoggerConfig, run_dir: Path, config_dict: dict[str, Any]):
    """The Lightning logger of ``logger.kind`` writing below ``run_dir`` (``None`` for ``none``). Every logger gets
    the config flat with dotted keys (:func:`flat_config`)."""
    if cfg.kind == "none":
        return None
    flat = flat_config(config_dict)
    if cfg.kind == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    if cfg.kind == "tensorboard":
        _require("tensorboard")
        from pytorch_lightning.loggers import TensorBoardLogger

        tb = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
        tb.log_hyperparams({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()})
        return tb
    if cfg.kind == "mlflow":
        _require("mlflow")
        from pytorch_lightning.loggers import MLFlowLogger

        uri = cfg.tracking_uri or f"sqlite:///{run_dir / 'mlflow.db'}"  # MLflow's file store is deprecated
        ml = MLFlowLogger(experiment_name=cfg.project, run_name=cfg.name or run_dir.name, tracking_uri=uri,
                          tags={t: "1" for t in cfg.tags} or None,
                          artifact_location=None if cfg.tracking_uri else (run_dir / "mlartifacts").as_uri())
        ml.log_hyperparams({k: str(v)[:500] for k, v in flat.items()})
        return ml
    from pytorch_lightning.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name, group=cfg.group,
                       tags=list(cfg.tags), save_dir=str(run_dir), mode=resolve_wandb_mode(cfg.mode),
                       config=flat, job_type=cfg.job_type, log_model=bool(cfg.log_model))


def start_experiment(logger) -> None:
    """Create the logger's run now (rank 0), not at its first metric: W&B then records the whole console log and
    system metrics of the job from its start."""
    if logger is None:
        return
    try:
        from pytorch_lightning.utilities.rank_zero import rank_zero_only

        if rank_zero_only.rank == 0:
            _ = logger.experiment
    except Exception as e:  # pragma: no cover - a logger that cannot start must not kill the job here
        log.warning("could not start the %s run: %s", type(logger).__name__, e)


def as_dict(job) -> dict[str, Any]:
    """The resolved job config as plain nested dicts (for config.yaml, W&B and cache keys).

    Lives here, not in :mod:`massedit.tasks.config` (which re-exports it), so that ``config`` -> ``runs``
    (for :class:`LoggerConfig`) is the only import between the two modules (no cycle)."""
    if isinstance(job, (DictConfig, ListConfig)):
        return OmegaConf.to_container(job, resolve=True)
    return OmegaConf.to_container(OmegaConf.structured(job), resolve=True)


def to_yaml(job) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(as_dict(job)))


def setup_run(job, run_dir: str | Path | None = None) -> Run:
    """Create the run directory, write the resolved config, attach a log file, seed, build the logger.

    ``run_dir``: the directory :func:`check_run_dir` accepted (validation, before anything is written); without
    it the directory is resolved and checked here. Several ranks: rank 0's directory (:func:`hand_over_run_dir`);
    only rank 0 creates it and writes to it."""
    from massedit.trainer import launch_rank

    trainer_cfg = getattr(job, "trainer", None)
    rank = launch_rank(trainer_cfg)
    world = int(getattr(trainer_cfg, "world_size", 1) or 1)
    configure_logging(job.log_level, rank=rank)
    if run_dir is None:
        run_dir = resolve_run_dir(job)
        check_run_dir(job, run_dir)
    run_dir = hand_over_run_dir(Path(run_dir), rank, world)
    fh = None
    if rank == 0:  # one directory, one config.yaml, one run.log: the other ranks write nothing
        prepare_run_dir(job, run_dir)
        atomic_write_text(run_dir / "config.yaml", to_yaml(job))
        fh = logging.FileHandler(run_dir / "run.log")
        fh.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s"))
        logging.getLogger().addHandler(fh)
    from pytorch_lightning import seed_everything

    seed_everything(int(job.seed), workers=True, verbose=False)
    logger = make_logger(job.logger, run_dir, as_dict(job)) if rank == 0 else None
    start_experiment(logger)
    log.info("run directory: %s", run_dir)
    return Run(config=job, dir=run_dir, logger=logger, _file_handler=fh, rank=rank)


# ------------------------------------------------------------------------------------------------ run-directory policy
class RunDirError(InputError):
    """``output_dir`` cannot be used (a file, not writable, or an existing run without resume/overwrite)."""


RUN_MARKERS = ("config.yaml", "run.log")  # a directory holding one of these is a massedit run directory
# keys that may differ when a run is resumed (bookkeeping and where the numbers are logged, not what is computed)
RESUME_IGNORED_KEYS = ("overrides", "choices", "resume", "overwrite", "log_level", "ckpt_path", "output_dir",
                       "output_root", "run_name", "logger")


def resolve_run_dir(job) -> Path:
    """This run's directory: ``output_dir``, else ``<output_root>/<run_name or method-timestamp>`` (absolute)."""
    return Path(job.output_dir or default_run_dir(job)).expanduser().resolve()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(job, config_file: Path) -> list[str]:
    """Keys whose value differs between ``job`` and a run's ``config.yaml`` (bookkeeping keys ignored)."""
    try:
        old = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
    except Exception as e:
        raise RunDirError(f"{config_file}: cannot read the existing run's config ({e}); use overwrite=true or "
                          f"another output_dir") from None
    a, b = _flat(old if isinstance(old, dict) else {}), _flat(as_dict(job))

    def kept(k: str) -> bool:
        if k.split(".", 1)[0] in RESUME_IGNORED_KEYS:
            return False
        # a key the run's config lacks (added by a newer massedit) at its default does not change the run
        return not (k not in a and k in b and b[k] == _field_default(job, k))

    return sorted(k for k in set(a) | set(b) if kept(k) and a.get(k, "<unset>") != b.get(k, "<unset>"))


_NO_DEFAULT = object()


def _field_default(job, key: str) -> Any:
    """The dataclass default of the dotted ``key`` of ``job`` (``_NO_DEFAULT`` where there is none)."""
    import dataclasses

    *path, name = key.split(".")
    obj = job
    for part in path:
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
        if obj is None:
            return _NO_DEFAULT
    if not dataclasses.is_dataclass(obj):
        return _NO_DEFAULT
    for f in dataclasses.fields(obj):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return _NO_DEFAULT


def worker_rank() -> bool:
    """True in a distributed worker other than global rank 0 (``RANK`` / ``LOCAL_RANK`` / ``NODE_RANK`` /
    ``SLURM_PROCID`` set by Lightning's DDP launcher, torchrun or SLURM): rank 0 owns the run directory."""
    from massedit.trainer import launch_rank

    return launch_rank() > 0


def check_run_dir(job, run_dir: Path) -> None:
    """The run-directory policy, checked before anything is written (raises :class:`RunDirError`):

    * ``output_dir`` (or a parent) that is a file, or a directory that cannot be written: refused;
    * an existing, non-empty directory: refused unless ``resume=true`` (continue the same run: same config,
      the run's files are rewritten as it completes; a ``ckpt_path`` — MEND ``ckpt_path=last`` — implies it) or
      ``overwrite=true`` (the old run's files are deleted first). Neither touches a non-empty directory that
      is not a massedit run directory (no ``config.yaml`` / ``run.log``)."""
    resume, overwrite = bool(getattr(job, "resume", False)), bool(getattr(job, "overwrite", False))
    resume = resume or bool(getattr(job, "ckpt_path", None))  # training from a checkpoint continues a run
    if worker_rank():
        return  # a DDP worker started by rank 0 (or a launcher): rank 0 applies the policy, alone
    if resume and overwrite:
        raise RunDirError("resume=true and overwrite=true contradict each other: choose one")
    for p in (run_dir, *run_dir.parents):
        if p.exists():
            if not p.is_dir():
                what = "output_dir" if p == run_dir else f"output_dir's parent {p}"
                raise RunDirError(f"output_dir={run_dir}: {what} exists and is not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise RunDirError(f"output_dir={run_dir}: {p} is not writable")
            break
    if not run_dir.is_dir():
        return
    entries = sorted(e.name for e in run_dir.iterdir())
    if not entries:
        return
    is_run = any((run_dir / m).exists() for m in RUN_MARKERS)
    if not (resume or overwrite):
        what = "an earlier run" if is_run else f"{len(entries)} file(s)"
        raise RunDirError(f"output_dir={run_dir} already holds {what} ({', '.join(entries[:5])}"
                          f"{', ...' if len(entries) > 5 else ''}); nothing was changed. Pass resume=true to continue "
                          f"that run, overwrite=true to replace it, or choose another output_dir / run_name")
    if not is_run:
        raise RunDirError(f"output_dir={run_dir} is not empty and is not a massedit run directory (no config.yaml / "
                          f"run.log); {'resume' if resume else 'overwrite'}=true only applies to run directories")
    if resume and (run_dir / "config.yaml").exists():
        diff = config_differences(job, run_dir / "config.yaml")
        if diff:
            raise RunDirError(f"resume=true: the config differs from the run's {run_dir / 'config.yaml'} in "
                              f"{diff[:8]}{' ...' if len(diff) > 8 else ''}; resume the same config, or use "
                              f"overwrite=true / another output_dir")


def prepare_run_dir(job, run_dir: Path) -> None:
    """Create ``run_dir`` (umask mode); ``overwrite=true``: delete the old run's files first; ``resume=true``:
    remove temporary files of writes a killed run left behind."""
    import shutil

    from massedit.core.io import clean_stale_tmp

    if run_dir.is_dir() and getattr(job, "overwrite", False) and not worker_rank() and any(run_dir.iterdir()):
        log.warning("overwrite=true: deleting the earlier run in %s", run_dir)
        for e in list(run_dir.iterdir()):
            if e.is_dir() and not e.is_symlink():
                shutil.rmtree(e)
            else:
                e.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(run_dir)


# ------------------------------------------------------------------------------------------------ signals
class Interrupted(BaseException):
    """Raised in the main thread by SIGINT / SIGTERM while a job runs (:func:`stop_on_signals`).

    A ``BaseException`` but not a ``KeyboardInterrupt``: Lightning turns a KeyboardInterrupt into
    ``sys.exit(1)`` and ignores SIGINT afterwards, while any other exception passes through its teardown
    unchanged. ``finally`` blocks (atomic writes, ``Run.finish``) still run."""

    def __init__(self, signum: int):
        import signal

        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


_RECEIVED: list[int] = []


def received_signal_name() -> str | None:
    import signal

    return signal.Signals(_RECEIVED[-1]).name if _RECEIVED else None


def received_signal() -> int | None:
    """The last SIGINT/SIGTERM received inside :func:`stop_on_signals` (None: none)."""
    return _RECEIVED[-1] if _RECEIVED else None


class stop_on_signals:
    """Context manager: SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, so a job stops
    at once after its pending atomic writes (exit status 128 + signal: 130 / 143 from the command line).
    Restores the previous handlers on exit; does nothing outside the main thread."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __enter__(self):
        import signal
        import threading

        _RECEIVED.clear()
        self._old: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return self

        def handler(signum, frame):
            _RECEIVED.append(signum)
            raise Interrupted(signum)

        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._old[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc) -> bool:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        return False
