"""Guards that stop a broken edit before it reaches the weights: finiteness of every intermediate and of the
deltas, and a limit on the size of an update relative to the weight it changes.

Used by the editors (ROME's v*, u, r and ΔW; MEMIT's z, C, the solve result and ΔW — checked before the weight is
written), by the statistics (C and cache entries), by :class:`~massedit.callbacks.apply_edit.ApplyEdit` and by the
application of a saved delta file. They live in ``core`` because every layer above uses them (editing, stats,
callbacks and tasks are independent of each other).

A failed guard raises :class:`EditGuardError` (an :class:`~massedit.core.errors.InputError`: the run stops with
``error: ...`` and exit 2; the cause is the input — hyper-parameters such as ``method.lr=1e8``, a corrupted
statistics or delta file — not a bug). The message names the tensor, the parameter / layer / request and the
config key to change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from massedit.core.errors import InputError


class EditGuardError(InputError):
    """A non-finite value or a runaway update caught before any weight is written."""


@dataclass
class EditGuardConfig:
    """``edit_guard``: the checks every edit passes before a weight is written (all jobs; docs in core/guards.py).

    Non-finite values (NaN/Inf) are always refused. ``max_relative_norm`` bounds ‖ΔW‖_F / ‖W‖_F per edited
    parameter; the default (10: the update would be ten times the weight itself) is far above what a working
    ROME / MEMIT / MEND / FT edit produces and far below what a diverged one does (FT ``lr=1e8``: 1e8+)."""

    max_relative_norm: float | None = 10.0   # refuse ΔW with ‖ΔW‖ > this × ‖W‖ (Frobenius, per parameter); null: off

    def __post_init__(self) -> None:
        v = self.max_relative_norm
        if v is not None and not (float(v) > 0 and math.isfinite(float(v))):
            raise EditGuardError(f"edit_guard.max_relative_norm must be a positive number or null, got {v!r}")


def count_nonfinite(t: torch.Tensor) -> int:
    """Number of NaN/Inf entries of ``t`` (0 for integer tensors)."""
    if not (t.is_floating_point() or t.is_complex()):
        return 0
    return int((~torch.isfinite(t.detach())).sum())


def check_finite(t: torch.Tensor, what: str, hint: str | None = None) -> torch.Tensor:
    """Raise :class:`EditGuardError` naming ``what`` if ``t`` holds NaN or Inf; return ``t``."""
    n = count_nonfinite(t)
    if n:
        kinds = []
        td = t.detach()
        if bool(torch.isnan(td).any()):
            kinds.append("NaN")
        if bool(torch.isinf(td).any()):
            kinds.append("Inf")
        msg = f"{what} has {n} non-finite value(s) ({'/'.join(kinds)} of {t.numel()}); nothing was written"
        raise EditGuardError(msg + (f". {hint}" if hint else ""))
    return t


def check_deltas_finite(deltas: Mapping[str, torch.Tensor], source: str = "edit") -> None:
    """Every delta finite (``source``: where the deltas come from, e.g. a file name or the method)."""
    for name, d in deltas.items():
        check_finite(d, f"{source}: delta for {name!r}",
                     hint="check the method's hyper-parameters (learning rate, lr_scale) and its inputs")


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64))


def relative_norm(delta: torch.Tensor, weight: torch.Tensor) -> float:
    """‖Δ‖_F / ‖W‖_F in float64 (nan for a zero weight: no reference scale; 0 for a zero delta)."""
    dn = _norm(delta)
    if dn == 0.0:
        return 0.0
    wn = _norm(weight)
    return dn / wn if wn > 0 else math.nan


def check_update_norms(deltas: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
                       max_relative_norm: float | None, source: str = "edit") -> dict[str, float]:
    """Finite deltas and ‖ΔW‖/‖W‖ ≤ ``max_relative_norm`` for every parameter; returns the ratios.

    A parameter whose weight is all zeros (a fresh bias: no scale to compare with) is only checked for finiteness."""
    check_deltas_finite(deltas, source)
    ratios = {}
    for name, d in deltas.items():
        w = params.get(name)
        if w is None:
            continue
        r = relative_norm(d, w)
        ratios[name] = r
        if max_relative_norm is not None and not math.isnan(r) and r > float(max_relative_norm):
            raise EditGuardError(
                f"{source}: the update of {name!r} is {r:.3g} times the weight's own norm "
                f"(‖ΔW‖ = {_norm(d):.3g}, ‖W‖ = {_norm(w):.3g}), above "
                f"edit_guard.max_relative_norm={max_relative_norm}; the edit diverged (check the learning rate / "
                f"lr_scale) — nothing was written. Raise edit_guard.max_relative_norm (or null) if it is intended")
    return ratios


def check_second_moment(C: torch.Tensor, what: str, size: int | None = None) -> torch.Tensor:
    """C = E[k kᵀ]: square (``size`` x ``size`` when given) and finite."""
    if C.dim() != 2 or C.shape[0] != C.shape[1] or (size is not None and C.shape[0] != size):
        exp = f"({size}, {size})" if size is not None else "square"
        raise EditGuardError(f"{what}: second moment C has shape {tuple(C.shape)}, expected {exp}")
    return check_finite(C, what, hint="the statistics are corrupt: delete the file / cache entry, or recompute")
