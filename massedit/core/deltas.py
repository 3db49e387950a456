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

Deltas = dict[str, torch.Tensor]


class DeltaShapeError(InputError):
    pass


def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    # named_parameters() hides tied duplicates; state-dict style names are what users see
    return dict(model.named_parameters(remove_duplicate=False))


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


def load_deltas(path, device=None) -> Deltas:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"delta file not found: {path}")
    return load_file(str(path), device=str(device) if device is not None else "cpu")


def delta_norms(deltas: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.float().norm()) for k, v in deltas.items()}
