"""Small helpers shared by the Lightning glue (statistics, evaluation, training)."""
from __future__ import annotations

import contextlib
import logging
import warnings

_BANNER_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning_fabric",
    "lightning_fabric.utilities.rank_zero",
    "pytorch_lightning.accelerators.cuda",
)
_EXPECTED_WARNINGS = (
    ".*does not have many workers.*",   # batches are pre-built; workers would only add overhead
    ".*DistributedSampler.*",           # evaluation de-duplicates results by key
    ".*LeafSpec.*",                     # Lightning/torch pytree deprecation noise
)


@contextlib.contextmanager
def quiet_lightning():
    """Hide Lightning's per-Trainer banners (GPU/TPU available, tips) and expected, harmless warnings."""
    loggers = [logging.getLogger(n) for n in _BANNER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for msg in _EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=msg)
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
