"""The evaluation's equations, one plain function each (no Lightning, no I/O).

Every function cites REFERENCE_SPEC §4. Per-prompt quantities take mean per-token NLLs (``s``), lower =
more likely; "probability" of a multi-token target = ``exp(-s)`` = geometric mean of its token probabilities.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch


# ------------------------------------------------------------------------------------------ per prompt
def mean_token_nll(logprobs: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Mean per-token NLL ``s = -(1/T) Σ_j log p(t_j)`` (§4.3).

    ``logprobs``: [T, V] log-softmax rows, row j predicting ``target_ids[j]``.
    """
    return -logprobs.gather(-1, target_ids.view(-1, 1)).squeeze(-1).mean()


def all_tokens_correct(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Argmax at every target position equals the target token (§4.3 ``*_correct`` flag)."""
    return (logits.argmax(-1) == target_ids).all()


def success_new(nll_new: np.ndarray, nll_true: np.ndarray) -> np.ndarray:
    """ES/PS per prompt: ``1[s_true > s_new]`` (the new target is more likely) (§4.3)."""
    return (np.asarray(nll_true) > np.asarray(nll_new)).astype(np.float64)


def success_true(nll_new: np.ndarray, nll_true: np.ndarray) -> np.ndarray:
    """NS per prompt: ``1[s_true < s_new]`` (the true target is still preferred) (§4.3)."""
    return (np.asarray(nll_true) < np.asarray(nll_new)).astype(np.float64)


def magnitude_new(nll_new: np.ndarray, nll_true: np.ndarray) -> np.ndarray:
    """EM/PM per prompt: ``exp(-s_new) - exp(-s_true)`` (§4.3)."""
    return np.exp(-np.asarray(nll_new, dtype=np.float64)) - np.exp(-np.asarray(nll_true, dtype=np.float64))


def magnitude_true(nll_new: np.ndarray, nll_true: np.ndarray) -> np.ndarray:
    """NM per prompt: ``exp(-s_true) - exp(-s_new)`` (§4.3)."""
    return -magnitude_new(nll_new, nll_true)


# ------------------------------------------------------------------------------------------ aggregation
def case_mean(values: Sequence[float]) -> float:
    """Per-case mean over that case's prompts (NaN when the case has none) (§4.6: per-case means first)."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def mean_and_ci95(per_case: Iterable[float]) -> tuple[float | None, float | None, int]:
    """Mean over cases and the 95% interval half-width ``1.96·std/√N`` with population std (§4.6).

    NaN cases (metric not defined for that case) are left out; returns ``(None, None, 0)`` when no case has it.
    """
    x = np.asarray([v for v in per_case if v is not None], dtype=np.float64)
    x = x[~np.isnan(x)]
    n = int(x.size)
    if n == 0:
        return None, None, 0
    return float(x.mean()), float(1.96 * x.std() / math.sqrt(n)), n


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean ``n / Σ 1/x`` (Score = hmean(ES, PS, NS), §4.3); 0 if any value is 0, None if any is missing."""
    if not values or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None
    if any(v < 0 for v in values):
        raise ValueError(f"harmonic mean needs non-negative values, got {values}")
    if any(v == 0 for v in values):
        return 0.0
    return float(len(values) / sum(1.0 / v for v in values))
