"""Weight-delta files: the common output of every editor.

A delta file is one safetensors file whose keys are parameter names (``model.layers.5.mlp.down_proj.weight``)
and whose tensors have the parameter's own shape, so that ``W + Δ`` is the edited weight.
Applying keeps a copy of the original weights; reverting restores them bit-identically (adding and then
subtracting a float delta would not).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from massedit.core.io import atomic_save_safetensors
from massedit.core.errors import InputError
from massedit.core.placement import param_storage

Deltas = dict[str, torch.Tensor]


class DeltaShapeError(InputError):
    pass


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() hides tied duplicates; state-dict style names are what users see. Offloaded weights of a
    # dispatched model (model.device_map) are reached through their in-memory copy (massedit.core.placement).
    params = dict(model.named_parameters(remove_duplicate=False))
    return {n: (param_storage(model, n) if p.device.type == "meta" else p) for n, p in params.items()}


def check_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> None:
    params = _params(model)
    for name, d in deltas.items():
        if name not in params:
            raise DeltaShapeError(f"delta for unknown parameter {name!r}")
        if tuple(d.shape) != tuple(params[name].shape):
            raise DeltaShapeError(
                f"delta {name!r} has shape {tuple(d.shape)}, parameter has {tuple(params[name].shape)}"
            )


@torch.no_grad()
def apply_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> Deltas:
    """Add ``deltas`` to the model in place. Returns a backup of the original weights (for revert).

    The sum is formed in float32 (or the parameter's dtype if wider) and cast once to the parameter's
    dtype, so fp16/bf16 models lose no more precision than one rounding.
    """
    check_deltas(model, deltas)
    params = _params(model)
    backup: Deltas = {}
    for name, d in deltas.items():
        p = params[name]
        if name not in backup:
            backup[name] = p.detach().clone()
        acc = torch.promote_types(p.dtype, torch.float32)
        p.copy_((p.to(acc) + d.to(device=p.device, dtype=acc)).to(p.dtype))
    return backup


@torch.no_grad()
def revert_deltas(model: nn.Module, backup: Mapping[str, torch.Tensor]) -> None:
    """Restore the weights saved by :func:`apply_deltas` (bit-identical)."""
    params = _params(model)
    for name, w in backup.items():
        params[name].copy_(w)


@contextlib.contextmanager
def deltas_applied(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    backup = apply_deltas(model, deltas)
    try:
        yield model
    finally:
        revert_deltas(model, backup)


@torch.no_grad()
def diff_from(model: nn.Module, originals: Mapping[str, torch.Tensor]) -> Deltas:
    """``W_now - W_orig`` in float32 for every parameter in ``originals``."""
    params = _params(model)
    return {n: params[n].detach().float() - w.float() for n, w in originals.items()}


def save_deltas(path, deltas: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    meta = {"format": "massedit-deltas-v1"}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return atomic_save_safetensors(path, {k: v.float() for k, v in deltas.items()}, metadata=meta)


class DeltaFileError(InputError):
    """A delta file that cannot be read or used (names the file and the tensor)."""


def _open_error(path: Path, e: Exception) -> DeltaFileError:
    return DeltaFileError(f"{path}: not a readable safetensors delta file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else 'truncated or corrupt'})")


def load_deltas(path, device=None) -> Deltas:
    """The deltas of a safetensors file (safetensors never runs code; a pickle or garbage file is refused)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"delta file not found: {path}")
    if path.is_dir():
        raise DeltaFileError(f"{path}: is a directory, expected a deltas.safetensors file")
    try:
        return load_file(str(path), device=str(device) if device is not None else "cpu")
    except Exception as e:  # SafetensorError, OSError, ... (safetensors raises several types)
        raise _open_error(path, e) from None


def check_delta_file(path, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """A delta file fits a model whose parameter shapes are ``shapes``: readable safetensors, at least one tensor,
    every name a parameter, every shape the parameter's, floating point and finite (read one tensor at a time)."""
    from safetensors import safe_open

    from massedit.core.guards import EditGuardError, check_finite

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"delta file not found: {path}")
    if path.is_dir():
        raise DeltaFileError(f"{path}: is a directory, expected a deltas.safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            if not names:
                raise DeltaFileError(f"{path}: holds no tensors")
            for name in names:
                if name not in shapes:
                    raise DeltaShapeError(f"{path}: delta for unknown parameter {name!r} (made for another model?)")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(shapes[name]):
                    raise DeltaShapeError(f"{path}: delta {name!r} has shape {shape}, the parameter {tuple(shapes[name])}")
                t = f.get_tensor(name)
                if not t.is_floating_point():
                    raise DeltaFileError(f"{path}: delta {name!r} has dtype {t.dtype}, expected floating point")
                try:
                    check_finite(t, f"{path}: delta {name!r}")
                except EditGuardError as e:
                    raise DeltaFileError(str(e)) from None
    except InputError:
        raise
    except Exception as e:
        raise _open_error(path, e) from None


def delta_norms(deltas: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.float().norm()) for k, v in deltas.items()}
