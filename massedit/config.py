"""Config composition from ``configs/`` with OmegaConf (a small, dependency-free take on Hydra's groups).

``configs/<entry>.yaml`` (``edit``, ``train``) carries a ``defaults`` list choosing one option per group;
``configs/<group>/<option>.yaml`` is placed under key ``<group>``. Command-line overrides:

* ``group=option``   pick ``configs/<group>/<option>.yaml`` (e.g. ``method=rome``, ``model=gpt2-xl``)
* ``a.b=value``      set a value (OmegaConf dotlist; lists as ``[4,5,6]``)
* ``+a.b=value``     add a key that the config does not have yet

Unknown keys without ``+`` are rejected with the list of valid keys, so typos fail loudly.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

CONFIG_DIR = Path(os.environ.get("MASSEDIT_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))


class ConfigError(ValueError):
    pass


def groups(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.name for p in config_dir.iterdir() if p.is_dir() and p.name not in ("sweeps",))


def options(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml errors: say which file
        raise ConfigError(f"cannot parse {path}: {e}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} must hold a mapping")
    return cfg


def _load_group(group: str, option: str, config_dir: Path) -> DictConfig:
    path = config_dir / group / f"{option}.yaml"
    if not path.exists():
        raise ConfigError(f"no option {option!r} in config group {group!r}; choose one of {options(group, config_dir)}")
    cfg = _load_yaml(path)
    base = cfg.pop("_base_", None) if "_base_" in cfg else None
    if base:  # simple inheritance inside a group: `_base_: other_option`
        cfg = OmegaConf.merge(_load_group(group, str(base), config_dir), cfg)
    return cfg


def _split(overrides: Iterable[str]) -> list[tuple[str, str]]:
    out = []
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value")
        k, v = ov.split("=", 1)
        out.append((k.strip(), v))
    return out


def compose(entry: str, overrides: Sequence[str] = (), config_dir: Path | str = CONFIG_DIR) -> DictConfig:
    """Compose ``configs/<entry>.yaml`` with its group defaults and the command-line overrides."""
    config_dir = Path(config_dir)
    root = _load_yaml(config_dir / f"{entry}.yaml")
    defaults = root.pop("defaults", []) if "defaults" in root else []
    choice: dict[str, str | None] = {}
    for item in defaults:
        if isinstance(item, (dict, DictConfig)):
            (g, o), = dict(item).items()
            choice[str(g)] = None if o is None else str(o)
    pairs = _split(overrides)
    group_names = set(groups(config_dir))
    rest = []
    for k, v in pairs:
        key = k.lstrip("+")
        if key in group_names and not k.startswith("+") and (config_dir / key / f"{v}.yaml").exists():
            choice[key] = v
        elif key in group_names and "." not in key and not k.startswith("+"):
            raise ConfigError(f"no option {v!r} in config group {key!r}; choose one of {options(key, config_dir)}")
        else:
            rest.append((k, v))
    cfg = OmegaConf.create({})
    for g, o in choice.items():
        if o is not None:
            cfg[g] = _load_group(g, o, config_dir)
    cfg = OmegaConf.merge(cfg, root)  # entry-level keys (seed, output_dir, ...) and entry-level group tweaks
    for g, o in choice.items():
        if o is not None and g in root and isinstance(root[g], DictConfig):
            cfg[g] = OmegaConf.merge(_load_group(g, o, config_dir), root[g])
    OmegaConf.set_struct(cfg, True)
    for k, v in rest:
        add = k.startswith("+")
        key = k.lstrip("+")
        value = _parse_value(v)
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not add and not (isinstance(node, DictConfig) and leaf in node.keys()):
            valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
            raise ConfigError(f"unknown config key {key!r} (use +{key}=... to add it); valid keys here: {valid}")
        with open_dict(cfg):
            OmegaConf.update(cfg, key, value, merge=True, force_add=True)
    with open_dict(cfg):
        cfg.choices = {g: o for g, o in choice.items()}
        cfg.overrides = list(overrides)
    return cfg


def _parse_value(v: str):
    """Parse a CLI value with YAML rules (ints, floats, bools, null, lists, dicts, strings)."""
    import yaml

    try:
        parsed = yaml.safe_load(v)
    except yaml.YAMLError:
        return v
    if isinstance(parsed, str):
        return v  # keep the user's exact string (no YAML-side stripping)
    return parsed


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def as_dict(cfg) -> dict:
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)
