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
    "lightning.pytorch",
)
_EXPECTED_WARNINGS = (
    ".*does not have many workers.*",   # batches are pre-built; workers would only add overhead
    ".*DistributedSampler.*",           # evaluation de-duplicates results by key
    ".*LeafSpec.*",                     # Lightning/torch pytree deprecation noise
    r".*module\(s\) in eval mode.*",     # FT trains one weight of a model kept in eval mode (no dropout)
)


@contextlib.contextmanager
def keep_device(model):
    """Run a Lightning ``Trainer`` over ``model`` and leave it on the device it was on.

    Lightning's strategy teardown moves the LightningModule (and so the wrapped model) to the CPU at the end
    of ``fit``/``validate``/``predict``; an editor that collected statistics or evaluated through Lightning
    would then silently run on the CPU. Restored on exit, also after an exception.
    """
    import torch

    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    try:
        yield device
    finally:
        q = next(iter(model.parameters()), None)
        if q is not None and q.device != device:
            model.to(device)


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
