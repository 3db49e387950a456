"""Registry of editing methods. Values are ``"module:attribute"`` strings, imported lazily.

* ``EDITORS[name]`` -> class ``Editor(cfg, run)`` with ``edit(model, tok, requests) -> deltas``
  (deltas: parameter name -> tensor in the parameter's shape; the model is left as it was found).
* ``TRAINERS[name]`` -> function ``train_main(cfg, run) -> dict`` (``train.py``).
"""
from __future__ import annotations

import importlib
from typing import Any

EDITORS: dict[str, str] = {
    "rome": "massedit.editing.rome:RomeEditor",
    "memit": "massedit.editing.memit:MemitEditor",
    "ft": "massedit.editing.ft:FTEditor",
    "ftw": "massedit.editing.ft:FTEditor",
    "ftl": "massedit.editing.ft:FTEditor",
    "mend": "massedit.editing.mend:MendEditor",
}

TRAINERS: dict[str, str] = {
    "ftw": "massedit.lightning_modules.ftw:train_main",
    "ft": "massedit.lightning_modules.ftw:train_main",
    "ftl": "massedit.lightning_modules.ftw:train_main",
    "mend": "massedit.lightning_modules.mend:train_main",
}


class UnknownMethodError(KeyError):
    pass


def _resolve(spec: str) -> Any:
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def editor_class(name: str):
    if name not in EDITORS:
        raise UnknownMethodError(f"unknown editing method {name!r}; choose one of {sorted(EDITORS)}")
    return _resolve(EDITORS[name])


def trainer_entry(name: str):
    if name not in TRAINERS:
        raise UnknownMethodError(f"method {name!r} has nothing to train; trainable: {sorted(TRAINERS)}")
    return _resolve(TRAINERS[name])


def build_editor(cfg, run=None):
    return editor_class(cfg.method.name)(cfg, run)
