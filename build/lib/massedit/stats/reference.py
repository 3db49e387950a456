"""Import/export of the reference implementation's statistics files (REFERENCE_SPEC §0.6).

Layout: ``{root}/{model_name}/{ds_name}_stats/{module}_{precision}_mom2_{n_samples}.npz`` with keys
``mom2.mom2`` (the un-normalised sum Σ k kᵀ), ``mom2.count`` (token count N), ``mom2.constructor``
and ``sample_size``. ``C = mom2.mom2 / mom2.count``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def reference_stats_path(root, model_name: str, ds_name: str, module: str, n_samples: int, precision: str = "float32") -> Path:
    return Path(root) / model_name.replace("/", "_") / f"{ds_name}_stats" / f"{module}_{precision}_mom2_{n_samples}.npz"


def find_reference_stats(root, module: str) -> Path | None:
    """The first ``*_stats/{module}_*_mom2*.npz`` below ``root`` (any model folder/dataset/size)."""
    root = Path(root)
    hits = sorted(root.glob(f"**/*_stats/{module}_*mom2*.npz"))
    return hits[0] if hits else None


def load_reference_stats(path) -> tuple[torch.Tensor, int]:
    """``(sum Σ k kᵀ as float64 tensor, token count)`` from a reference npz file."""
    with np.load(path, allow_pickle=False) as z:
        mom2 = torch.from_numpy(np.asarray(z["mom2.mom2"], dtype=np.float64))
        count = int(np.asarray(z["mom2.count"]).item())
    if count <= 0:
        raise ValueError(f"{path}: mom2.count must be positive, got {count}")
    return mom2, count


def load_reference_second_moment(path, dtype=torch.float32) -> torch.Tensor:
    """``C = mom2.mom2 / mom2.count`` as the reference computes it (in float32 by default)."""
    with np.load(path, allow_pickle=False) as z:
        mom2 = torch.from_numpy(np.asarray(z["mom2.mom2"]))
        count = int(np.asarray(z["mom2.count"]).item())
    return (mom2.to(dtype) / count)


# ---------------------------------------------------------------------------------------------------
# Export (added by the statistics part; additive only)
REFERENCE_CONSTRUCTOR = "util.runningstats.SecondMoment()"


def save_reference_stats(path, total: torch.Tensor, count: int, n_samples: int, precision: str = "float32") -> Path:
    """Write one statistic in the reference npz layout: ``mom2.mom2`` (the un-normalised sum Σ k kᵀ, cast
    to ``precision``), ``mom2.count`` (N), ``mom2.constructor`` and ``sample_size`` (atomic write)."""
    from massedit.core.io import atomic_save_npz

    arr = total.detach().cpu().to(getattr(torch, precision)).numpy()
    return atomic_save_npz(
        path, **{"mom2.constructor": np.array(REFERENCE_CONSTRUCTOR), "mom2.count": np.array(int(count), dtype=np.int64),
                 "mom2.mom2": arr, "sample_size": np.array(int(n_samples), dtype=np.int64)},
    )


def export_layer_stats(root, model_name: str, ds_name: str, module: str, total: torch.Tensor, count: int,
                       n_samples: int, precision: str = "float32") -> Path:
    """Write a statistic to ``reference_stats_path(root, model_name, ds_name, module, n_samples, precision)``
    so the reference code (or ``stats.reference_dir=root``) can load it."""
    path = reference_stats_path(root, model_name, ds_name, module, n_samples, precision)
    return save_reference_stats(path, total, count, n_samples, precision)
