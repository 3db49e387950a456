"""Typed job configs composed from YAML config groups and command-line overrides (OmegaConf, Hydra-style groups).

Every config group has one dataclass, the single source of its keys, types and defaults, defined in the layer
that uses it: ``model`` :class:`~massedit.core.models.ModelConfig`, ``data``
:class:`~massedit.data.requests.DataConfig`, ``stats`` :class:`~massedit.stats.config.StatsConfig`, ``eval``
:class:`~massedit.evaluation.config.EvalConfig`, ``trainer`` :class:`~massedit.trainer.TrainerConfig`, ``logger``
:class:`~massedit.tasks.runs.LoggerConfig`, and ``method`` one per editor (:data:`METHOD_SCHEMAS`). A group's YAML
file (``configs/<group>/<option>.yaml``) holds only what differs from those defaults.

Composition (:func:`compose`): ``configs/<entry>.yaml`` (``edit``, ``train``) names one option per group; for ROME
and MEMIT the per-model hyper-parameters file (``configs/hparams/<method>/<model.name>.yaml`` when
``method.hparams=auto``, a named file there, or a path; a reference hparams JSON works as is) is merged into
``method``; then the command line:

* ``group=option``   pick ``configs/<group>/<option>.yaml`` (e.g. ``method=rome``, ``model=gpt2-xl``)
* ``a.b=value``      set a value (YAML syntax: ``[4,5,6]``, ``null``, ``1e-3``); unknown keys are errors that
  list the valid ones, values are checked against the key's type, and every group's ranges are validated
  before anything is loaded.

Config files are looked up in the user's config directories first (``--config-dir DIR`` or
``MASSEDIT_CONFIG_DIR``, several separated by ``os.pathsep``) and then in the package's own ``configs``, so a user
can add options (``DIR/model/my-model.yaml``) or shadow shipped ones by name.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from massedit.core.guards import EditGuardConfig
from massedit.core.models import ModelConfig
from massedit.data.requests import DataConfig
from massedit.editing.ft import FTConfig
from massedit.editing.hparams import HparamsError, MemitConfig, RomeConfig, read_hparams_file
from massedit.editing.mend.config import MendConfig
from massedit.evaluation.config import EvalConfig
from massedit.stats.config import StatsConfig
from massedit.tasks.runs import LoggerConfig, as_dict, to_yaml  # noqa: F401  (as_dict/to_yaml: serialisation, defined in runs)
from massedit.trainer import TrainerConfig, resolve_precision
from massedit.core.errors import InputError

PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
NON_GROUP_DIRS = ("hparams", "sweeps", "reproduce")

METHOD_SCHEMAS: dict[str, type] = {
    "rome": RomeConfig, "memit": MemitConfig, "ft": FTConfig, "ftl": FTConfig, "ftw": FTConfig, "mend": MendConfig,
}


class ConfigError(InputError):
    """A config that cannot be composed or does not validate (the message names the key / file)."""


# ------------------------------------------------------------------------------------------------ job schemas
@dataclass
class ExportConfig:
    """``export``: also write the edited model as a standard Hugging Face checkpoint."""

    hf_dir: str | None = None          # directory for save_pretrained (safetensors + tokenizer + edits.json)


@dataclass
class JobConfig:
    """Keys every job has (the groups plus run bookkeeping)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None                 # one of METHOD_SCHEMAS, chosen by the method option's `name`
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    run_name: str | None = None        # default: <method>-<timestamp>
    output_root: str = "outputs"       # run directories go below this (relative: to the working directory)
    output_dir: str | None = None      # this run's directory (default: <output_root>/<run_name>)
    save_deltas: bool = True
    resume: bool = False               # output_dir holds this run already: continue it (same config; caches keep
    #                                    finished work; implied by ckpt_path, e.g. MEND ckpt_path=last). Else refused
    overwrite: bool = False            # output_dir holds an earlier run: delete its files and start afresh
    edit_guard: EditGuardConfig = field(default_factory=EditGuardConfig)  # NaN/Inf and runaway-update checks
    log_level: str = "INFO"
    choices: dict[str, Any] = field(default_factory=dict)     # bookkeeping: the option chosen per group
    overrides: list[str] = field(default_factory=list)        # bookkeeping: the command line

    def __post_init__(self) -> None:
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level={self.log_level!r}: choose DEBUG, INFO, WARNING or ERROR")
        resolve_precision(self.trainer.precision, self.model.torch_dtype)  # *-true must match model.dtype


@dataclass
class EditJobConfig(JobConfig):
    """``massedit edit`` / ``edit.py``: edit a model, evaluate before and after."""

    mode: str = "edit"                 # edit | eval (evaluation only, optionally with deltas=PATH applied)
    deltas: str | None = None          # a saved delta file to apply instead of editing (mode=edit) or to evaluate
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("edit", "eval"):
            raise ConfigError(f"mode={self.mode!r}: choose edit or eval")


@dataclass
class EvalJobConfig(JobConfig):
    """``massedit eval``: evaluate only — the model as loaded, or before and after ``deltas=PATH``."""

    mode: str = "eval"
    deltas: str | None = None          # a saved delta file (deltas.safetensors of an edit run)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode != "eval":
            raise ConfigError(f"mode={self.mode!r}: `massedit eval` only evaluates (use `massedit edit` to edit)")


@dataclass
class TrainJobConfig(JobConfig):
    """``massedit train`` / ``train.py``: FT-W fine-tuning or MEND hypernetwork training."""

    ckpt_path: str | None = None       # MEND: resume from a .ckpt, a run dir, or "last" (output_dir/checkpoints/last.ckpt)


JOB_SCHEMAS: dict[str, type] = {"edit": EditJobConfig, "eval": EvalJobConfig, "train": TrainJobConfig}


# ------------------------------------------------------------------------------------------------ search path
def config_dirs(extra: Sequence[str | Path] = ()) -> list[Path]:
    """The config search path: ``extra`` dirs, then ``$MASSEDIT_CONFIG_DIR`` entries, then the package's configs."""
    dirs = [Path(d).expanduser() for d in extra]
    env = os.environ.get("MASSEDIT_CONFIG_DIR")
    if env:
        dirs += [Path(d).expanduser() for d in env.split(os.pathsep) if d]
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"config directory {d} does not exist (--config-dir / MASSEDIT_CONFIG_DIR)")
    return dirs + [PACKAGE_CONFIG_DIR]


def groups(dirs: Sequence[Path] | None = None) -> list[str]:
    dirs = dirs or config_dirs()
    return sorted({p.name for d in dirs for p in d.iterdir() if p.is_dir() and p.name not in NON_GROUP_DIRS})


def options(group: str, dirs: Sequence[Path] | None = None) -> list[str]:
    dirs = dirs or config_dirs()
    return sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})


def find_config_file(relpath: str, dirs: Sequence[Path]) -> Path | None:
    for d in dirs:
        p = d / relpath
        if p.is_file():
            return p
    return None


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml errors: say which file
        raise ConfigError(f"cannot parse {path}: {e}") from None
    if cfg is None or (isinstance(cfg, DictConfig) and not cfg):
        return OmegaConf.create({})
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} must hold a mapping")
    return cfg


def _load_option(group: str, option: str, dirs: Sequence[Path], seen: tuple = ()) -> DictConfig:
    path = find_config_file(f"{group}/{option}.yaml", dirs)
    if path is None:
        raise ConfigError(f"no option {option!r} in config group {group!r}; choose one of {options(group, dirs)}")
    cfg = _load_yaml(path)
    base = cfg.pop("_base_", None) if "_base_" in cfg else None
    if base:  # inheritance inside a group: `_base_: other_option`
        if base in seen:
            raise ConfigError(f"{path}: _base_ cycle {seen + (base,)}")
        cfg = OmegaConf.merge(_load_option(group, str(base), dirs, seen + (option,)), cfg)
    return cfg


# ------------------------------------------------------------------------------------------------ overrides
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)$")


def parse_value(v: str) -> Any:
    """A command-line value with YAML rules (ints, floats incl. ``1e-3``, bools, null, lists, dicts, strings)."""
    import yaml

    if _FLOAT.match(v.strip()):
        return float(v)  # YAML 1.1 reads "1e-3" as a string
    try:
        parsed = yaml.safe_load(v)
    except yaml.YAMLError:
        return v
    if isinstance(parsed, str):
        return v  # keep the user's exact string (no YAML-side stripping)
    if isinstance(parsed, float) and math.isnan(parsed):
        return v
    return parsed


def split_overrides(overrides: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value (or group=option)")
        k, v = ov.split("=", 1)
        k = k.strip()
        if k.startswith("+"):
            raise ConfigError(f"override {ov!r}: the config is typed, every key already exists; drop the '+' "
                              f"(see `massedit {{edit,train}} --cfg` for the keys)")
        if not k:
            raise ConfigError(f"override {ov!r} has an empty key")
        out.append((k, v))
    return out


def _set(cfg: DictConfig, key: str, raw: str) -> None:
    parent, _, leaf = key.rpartition(".")
    try:
        node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
    except OmegaConfBaseException:
        node = None
    if not isinstance(node, DictConfig) or leaf not in node.keys():
        valid = sorted(node.keys()) if isinstance(node, DictConfig) else sorted(cfg.keys())
        where = f" under {parent!r}" if parent else ""
        raise ConfigError(f"unknown config key {key!r}; valid keys{where}: {valid}")
    try:
        OmegaConf.update(cfg, key, parse_value(raw), merge=True)
    except ValidationError as e:
        raise ConfigError(f"{key}={raw}: {str(e).splitlines()[0]}") from None


# ------------------------------------------------------------------------------------------------ hparams files
def resolve_hparams_path(spec: str, method: str, model_name: str, dirs: Sequence[Path]) -> Path:
    """``auto`` -> ``hparams/<method>/<model name>.yaml``; a bare name -> that file; else a path."""
    if spec in (None, "", "auto"):
        name = str(model_name).rstrip("/").split("/")[-1].lower()
        path = find_config_file(f"hparams/{method}/{name}.yaml", dirs)
        if path is None:
            raise ConfigError(
                f"no {method} hparams for model {model_name!r} (looked for hparams/{method}/{name}.yaml in "
                f"{[str(d) for d in dirs]}); pass method.hparams=NAME (one of {available_hparams(method, dirs)}) or a "
                f"path to a reference JSON / YAML file")
        return path
    p = Path(str(spec)).expanduser()
    if p.is_file():
        return p
    for ext in (".yaml", ".json"):
        path = find_config_file(f"hparams/{method}/{spec}{ext}", dirs)
        if path is not None:
            return path
    raise ConfigError(f"method.hparams={spec!r}: not a file and not one of {available_hparams(method, dirs)}")


def has_hparams_file(method: str, model_name: str, dirs: Sequence[Path]) -> bool:
    name = str(model_name).rstrip("/").split("/")[-1].lower()
    return find_config_file(f"hparams/{method}/{name}.yaml", dirs) is not None


def read_model_config(model_cfg) -> Any:
    """The transformers config of ``model.name_or_path`` (``config.json`` only, no weights); ConfigError if unreadable."""
    from transformers import AutoConfig

    from massedit.core.models import BUILTIN_MODELS, resolve_model_path

    if isinstance(model_cfg, DictConfig) and OmegaConf.is_missing(model_cfg, "name_or_path"):
        raise ConfigError("model.name_or_path is not set; pass model.name_or_path=NAME_OR_PATH")
    name = str(model_cfg.name_or_path)
    path = resolve_model_path(model_cfg) if name in BUILTIN_MODELS else name
    kwargs = {"revision": str(model_cfg.revision)} if model_cfg.get("revision") else {}
    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model.name_or_path={name!r}: cannot read the model's config.json ({str(e).splitlines()[0]}); "
                          f"give a local model directory or a hub id (hub access needed), or a built-in model") from None


def architecture_hparams(method: str, model_cfg, hf_config: Any = None) -> tuple[dict, dict, str]:
    """``(hparams, stats values, description)`` for a model without ``hparams/<method>/<name>.yaml``: the layers at
    the paper model's relative depth and its other values (:func:`massedit.editing.hparams.hparams_for_depth`),
    from the architecture adapter of the model's config (read without weights). Says what it chose (log) and
    raises :class:`ConfigError` when the architecture has no adapter or the config cannot be read."""
    import logging

    from massedit.core.adapters import UnsupportedArchitectureError, adapter_class
    from massedit.editing.hparams import hparams_for_depth

    config = hf_config if hf_config is not None else read_model_config(model_cfg)
    try:
        cls = adapter_class(config, f"model {model_cfg.name_or_path}")
    except UnsupportedArchitectureError as e:
        raise ConfigError(f"no {method} hparams file for model {model_cfg.name!r} and {e}") from None
    n = int(getattr(config, cls.layers_attr))
    hp = hparams_for_depth(method, n)
    desc = (f"architecture:{cls.family} ({n} layers): layers {hp['layers']} at the paper's relative depth, "
            f"v_loss_layer {hp['v_loss_layer']}, the paper's GPT-J values for the rest")
    logging.getLogger("massedit").warning(
        "no hparams/%s/%s.yaml: %s %s (override with method.layers=[...] etc., or method.hparams=FILE)",
        method, str(model_cfg.name).lower(), method, desc)
    return hp, {}, desc


def available_hparams(method: str, dirs: Sequence[Path]) -> list[str]:
    return sorted({p.stem for d in dirs for p in (d / "hparams" / method).glob("*.yaml")})


# ------------------------------------------------------------------------------------------------ compose
def _group_node(group: str, option: str | None, dirs: Sequence[Path]) -> DictConfig | None:
    if option is None:
        return None
    raw = _load_option(group, option, dirs)
    if group == "method":
        name = raw.get("name", option)
        schema = METHOD_SCHEMAS.get(str(name))
        if schema is None:
            raise ConfigError(f"configs/method/{option}.yaml: unknown editing method name {name!r}; "
                              f"choose one of {sorted(METHOD_SCHEMAS)}")
    else:
        schema = _GROUP_SCHEMAS.get(group)
        if schema is None:
            raise ConfigError(f"unknown config group {group!r}")
    try:
        node = OmegaConf.merge(_structured_template(schema), raw)  # merge copies its first argument
    except (ConfigKeyError, ValidationError) as e:
        raise ConfigError(f"configs/{group}/{option}.yaml: {_first_line(e)}") from None
    for key in OmegaConf.missing_keys(raw):  # `key: ???` in the file: required, even where the schema has a default
        OmegaConf.update(node, key, "???")
    return node


_GROUP_SCHEMAS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "eval": EvalConfig, "stats": StatsConfig,
                                   "trainer": TrainerConfig, "logger": LoggerConfig}


@functools.lru_cache(maxsize=None)
def _structured_template(schema: type) -> DictConfig:
    return OmegaConf.structured(schema)


def _structured(schema: type) -> DictConfig:
    """``OmegaConf.structured(schema)`` (a fresh copy of a node built once per schema: building reads the
    dataclass' fields and types, most of a compose's time)."""
    return copy.deepcopy(_structured_template(schema))


def _first_line(e: Exception) -> str:
    msg = str(e).splitlines()
    full_key = next((ln.split(":", 1)[1].strip() for ln in msg if ln.strip().startswith("full_key:")), None)
    return (f"{full_key}: " if full_key else "") + (msg[0] if msg else type(e).__name__)


def _assemble(entry: str, root: DictConfig, choice: dict[str, str | None], dirs: Sequence[Path],
              method_patch: dict | None, stats_patch: dict | None, pairs: list[tuple[str, str]]) -> DictConfig:
    cfg = _structured(JOB_SCHEMAS[entry])
    for g, o in choice.items():
        node = _group_node(g, o, dirs)
        if node is not None:
            cfg[g] = node
    if method_patch:
        cfg.method = OmegaConf.merge(cfg.method, method_patch)
    if stats_patch:
        cfg.stats = OmegaConf.merge(cfg.stats, stats_patch)
    try:
        cfg = OmegaConf.merge(cfg, root)  # entry-level keys (seed, output_dir, ...) and group tweaks
    except (ConfigKeyError, ValidationError) as e:
        raise ConfigError(f"configs/{entry}.yaml: {_first_line(e)}") from None
    for k, v in pairs:
        _set(cfg, k, v)
    return cfg


def compose_dictconfig(entry: str, overrides: Sequence[str] = (), config_dir: Sequence[str | Path] = (), *,
                       hf_config: Any = None) -> DictConfig:
    """The composed, type-checked (not yet range-validated) config of ``entry`` as a DictConfig. ``hf_config``: the
    transformers config of an already loaded model (for :func:`architecture_hparams`; else read from the model's
    ``config.json``)."""
    if entry not in JOB_SCHEMAS:
        raise ConfigError(f"unknown job {entry!r}; choose one of {sorted(JOB_SCHEMAS)}")
    dirs = config_dirs(config_dir)
    root_path = find_config_file(f"{entry}.yaml", dirs)
    if root_path is None:
        raise ConfigError(f"no {entry}.yaml in {[str(d) for d in dirs]}")
    root = _load_yaml(root_path)
    defaults = root.pop("defaults", []) if "defaults" in root else []
    choice: dict[str, str | None] = {}
    for item in defaults:
        if isinstance(item, (dict, DictConfig)):
            (g, o), = dict(item).items()
            choice[str(g)] = None if o is None else str(o)
    group_names = set(groups(dirs))
    pairs = []
    for k, v in split_overrides(overrides):
        if k in group_names:
            if find_config_file(f"{k}/{v}.yaml", dirs) is None:
                raise ConfigError(f"no option {v!r} in config group {k!r}; choose one of {options(k, dirs)}")
            choice[k] = v
        else:
            pairs.append((k, v))
    cfg = _assemble(entry, root, choice, dirs, None, None, pairs)
    method = cfg.get("method")
    if isinstance(method, DictConfig) and "hparams" in method:
        source = None
        try:
            if method.hparams in (None, "", "auto") and not has_hparams_file(str(method.name), str(cfg.model.name), dirs):
                hp, stats_patch, source = architecture_hparams(str(method.name), cfg.model, hf_config)
            else:
                path = resolve_hparams_path(method.hparams, str(method.name), str(cfg.model.name), dirs)
                hp, stats_patch = read_hparams_file(path)
                source = str(path)
        except HparamsError as e:
            raise ConfigError(str(e)) from None
        # the file's values under the command line: rebuild with the file, then the overrides again
        cfg = _assemble(entry, root, choice, dirs, hp, stats_patch, pairs)
        with_flag = OmegaConf.create({"hparams_file": source})
        cfg.choices = OmegaConf.merge(cfg.choices, with_flag)
    cfg.choices = OmegaConf.merge(cfg.choices, {g: o for g, o in choice.items()})
    cfg.overrides = list(overrides)
    return cfg


def compose(entry: str, overrides: Sequence[str] = (), config_dir: Sequence[str | Path] = (), *, hf_config: Any = None):
    """The typed, validated job config of ``entry`` (``edit`` -> :class:`EditJobConfig`, ``train`` ->
    :class:`TrainJobConfig`). Raises :class:`ConfigError` naming the key for any problem."""
    cfg = compose_dictconfig(entry, overrides, config_dir, hf_config=hf_config)
    return to_object(cfg)


def to_object(cfg: DictConfig):
    """DictConfig -> the job dataclass (every group's ``__post_init__`` validation runs here)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        group = key.split(".", 1)[0]
        option = cfg.choices.get(group) if isinstance(cfg.get("choices"), DictConfig) else None
        raise ConfigError(f"{key} is not set" + (f" (required by {group}={option})" if option else "")
                          + f"; pass {key}=...")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_first_line(e)) from None
    except (TypeError, ValueError) as e:  # a group's own validation (its message names the key)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None
