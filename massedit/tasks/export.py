"""Hugging Face export of an edited model: a standard ``save_pretrained`` checkpoint (safetensors + tokenizer) plus an
``edits.json`` manifest, which plain ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads.

Used by ``massedit edit export.hf_dir=DIR`` and by :meth:`massedit.EditResult.save_pretrained`. The manifest
records what was done to the base model: the requests, the method and its hyper-parameters, the norm of every
weight delta, the base model (name or path, revision / commit, dtype) and the massedit version.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from massedit.core.deltas import apply_deltas, delta_norms, revert_deltas
from massedit.core.errors import InputError
from massedit.core.io import atomic_write_json

log = logging.getLogger(__name__)

MANIFEST = "edits.json"
MANIFEST_FORMAT = "massedit-edits-v1"


class ExportError(InputError):
    """An export directory that cannot be written (named in the message)."""


def massedit_version() -> str:
    from massedit import __version__

    return __version__


def base_model_info(model, name_or_path: str | None = None, revision: str | None = None) -> dict[str, Any]:
    """Where the unedited weights came from: name or path, revision / hub commit, dtype, built-in package."""
    from massedit.core.models import BUILTIN_MODELS

    cfg = getattr(model, "config", None)
    name = name_or_path or getattr(model, "_massedit_name_or_path", None) or getattr(cfg, "_name_or_path", None) or ""
    info: dict[str, Any] = {
        "name_or_path": str(name),
        "revision": revision or getattr(model, "_massedit_revision", None),
        "commit": getattr(cfg, "_commit_hash", None),
        "model_type": getattr(cfg, "model_type", None),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    if str(name) in BUILTIN_MODELS:
        package, version, filename = BUILTIN_MODELS[str(name)]
        info["builtin"] = {"package": package.replace("_", "-"), "version": version, "file": filename}
    return info


def edit_manifest(*, requests: Sequence[Any], method: str, hparams: Mapping[str, Any] | None,
                  deltas: Mapping[str, torch.Tensor], base_model: Mapping[str, Any],
                  info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``edits.json`` content (JSON-able)."""
    norms = delta_norms(deltas)
    return {
        "format": MANIFEST_FORMAT,
        "massedit_version": massedit_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": dict(base_model),
        "method": str(method),
        "hparams": dict(hparams or {}),
        "num_requests": len(requests),
        "requests": [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in requests],
        "delta_norms": norms,
        "delta_norm_total": float(sum(v * v for v in norms.values()) ** 0.5),
        "edited_parameters": sorted(deltas),
        "editor_info": _jsonable(dict(info or {})),
    }


def _jsonable(obj):
    import json

    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"export directory {out_dir} is a file")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
        raise ExportError(f"export directory {out_dir} is not empty and holds no {MANIFEST} (not a massedit export); "
                          f"choose a new or empty directory")


def export_hf(model, tok, out_dir: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``model`` (as it is now: carrying the edit) with ``tok`` and ``manifest`` to ``out_dir``.

    Written to a temporary sibling directory and renamed into place; an earlier export in ``out_dir`` is
    replaced, any other non-empty directory is refused."""
    out_dir = Path(out_dir).expanduser().resolve()
    _check_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    from massedit.core.io import umask_mode

    os.chmod(tmp, umask_mode(0o777))  # mkdtemp creates 0700: the exported model follows the umask like every file
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / MANIFEST, dict(manifest))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported the edited model to %s (save_pretrained + %s)", out_dir, MANIFEST)
    return out_dir


def export_with_deltas(model, tok, out_dir: str | Path, deltas: Mapping[str, torch.Tensor],
                       manifest: Mapping[str, Any], *, applied: bool) -> Path:
    """Export ``model`` + ``deltas``: when the deltas are not ``applied`` yet they are added for the export and the
    model is restored bit-identically afterwards."""
    if applied:
        return export_hf(model, tok, out_dir, manifest)
    backup = apply_deltas(model, deltas)
    try:
        return export_hf(model, tok, out_dir, manifest)
    finally:
        revert_deltas(model, backup)


def read_manifest(path: str | Path) -> dict[str, Any]:
    from massedit.core.io import load_json

    p = Path(path)
    return load_json(p / MANIFEST if p.is_dir() else p)
