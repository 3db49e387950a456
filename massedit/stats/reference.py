"""Import/export of the reference implementation's statistics files (REFERENCE_SPEC §0.6).

Layout: ``{root}/{model_name}/{ds_name}_stats/{module}_{precision}_mom2_{n_samples}.npz`` with keys
``mom2.mom2`` (the un-normalised sum Σ k kᵀ), ``mom2.count`` (token count N), ``mom2.constructor``
and ``sample_size``. ``C = mom2.mom2 / mom2.count``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from massedit.core.errors import InputError


def reference_stats_path(root, model_name: str, ds_name: str, module: str, n_samples: int, precision: str = "float32") -> Path:
    return Path(root) / model_name.replace("/", "_") / f"{ds_name}_stats" / f"{module}_{precision}_mom2_{n_samples}.npz"


def find_reference_stats(root, module: str) -> Path | None:
    """The first ``*_stats/{module}_*_mom2*.npz`` below ``root`` (any model folder/dataset/size)."""
    root = Path(root)
    hits = sorted(root.glob(f"**/*_stats/{module}_*mom2*.npz"))
    return hits[0] if hits else None


class ReferenceStatsError(InputError):
    """A reference statistics file that cannot be used (names the file and the key)."""


def _read_npz(path) -> tuple[np.ndarray, int]:
    """``(mom2.mom2, mom2.count)`` of a reference npz file; never unpickles (``allow_pickle=False``): a file with
    object arrays is refused."""
    import zipfile

    try:
        z = np.load(path, allow_pickle=False)
        if not hasattr(z, "files"):
            raise ReferenceStatsError(f"{path}: not an npz archive (a single .npy array)")
        with z:
            missing = [k for k in ("mom2.mom2", "mom2.count") if k not in z.files]
            if missing:
                raise ReferenceStatsError(f"{path}: no {missing} (keys: {sorted(z.files)}); not a reference "
                                          f"second-moment file")
            mom2 = np.asarray(z["mom2.mom2"])
            count_arr = np.asarray(z["mom2.count"])
    except ReferenceStatsError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:  # pickles, truncation, garbage
        raise ReferenceStatsError(f"{path}: not a readable reference statistics npz ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]})") from None
    if mom2.dtype.kind != "f" or mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
        raise ReferenceStatsError(f"{path}: mom2.mom2 must be a square float matrix, got {mom2.dtype} {mom2.shape}")
    if count_arr.size != 1 or count_arr.dtype.kind not in "iuf":
        raise ReferenceStatsError(f"{path}: mom2.count must be one number, got {count_arr.dtype} {count_arr.shape}")
    count = count_arr.item()
    if not float(count) > 0 or float(count) != int(count):
        raise ReferenceStatsError(f"{path}: mom2.count must be a positive integer, got {count}")
    return mom2, int(count)


def load_reference_stats(path) -> tuple[torch.Tensor, int]:
    """``(sum Σ k kᵀ as float64 tensor, token count)`` from a reference npz file."""
    mom2, count = _read_npz(path)
    return torch.from_numpy(np.asarray(mom2, dtype=np.float64)), count


def load_reference_second_moment(path, dtype=torch.float32) -> torch.Tensor:
    """``C = mom2.mom2 / mom2.count`` as the reference computes it (in float32 by default)."""
    mom2, count = _read_npz(path)
    return (torch.from_numpy(mom2).to(dtype) / count)


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
