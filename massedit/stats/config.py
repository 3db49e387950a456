"""Resolved ``stats`` config (``configs/stats/*.yaml``); every key has a default, so editors may pass a
partial config or a plain dict."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from massedit.datamodules.corpus import CorpusSpec

ACC_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
              "double": torch.float64}


class StatsConfigError(ValueError):
    pass


@dataclass
class StatsConfig(CorpusSpec):
    # corpus: the fields of massedit.datamodules.corpus.CorpusSpec (format, packing, chunk_chars, ...), one source
    corpus: Any = "../shared/data/text/wikitext-2"
    # sample
    n_samples: int | None = None
    n_tokens: int | None = 100_000
    max_length: int = 512
    seed: int = 1
    add_special_tokens: bool = True
    # batching / numerics
    batch_tokens: int = 4096
    sort_window: int = 100
    dtype: str = "float32"
    # cache / reference files / resume
    cache: bool = True
    cache_dir: str | None = None
    reference_dir: str | None = None
    reference_missing: str = "compute"
    checkpoint_every: int = 50
    checkpoint_seconds: float = 300.0
    # execution
    engine: str = "lightning"
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_workers: int = 0
    # CLI-only (stats.py)
    layers: Any = None
    export_dir: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Any) -> "StatsConfig":
        if isinstance(cfg, StatsConfig):
            return cfg
        if cfg is None:
            return cls()
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        if not isinstance(cfg, dict):
            cfg = dict(vars(cfg))
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in cfg.items() if k in names and k != "extra"}
        extra = {k: v for k, v in cfg.items() if k not in names}
        out = cls(**known, extra=extra)
        out.validate()
        return out

    @property
    def acc_dtype(self) -> torch.dtype:
        return ACC_DTYPES[self.dtype]

    @property
    def acc_dtype_name(self) -> str:
        return str(self.acc_dtype).replace("torch.", "")

    def validate(self) -> None:
        if self.dtype not in ACC_DTYPES:
            raise StatsConfigError(f"stats.dtype={self.dtype!r}: accumulate in one of {sorted(ACC_DTYPES)}")
        if self.n_samples is None and self.n_tokens is None:
            raise StatsConfigError("set stats.n_samples and/or stats.n_tokens (both null would read the whole corpus; "
                                   "say so explicitly with a large n_samples)")
        for k in ("n_samples", "n_tokens", "max_length", "batch_tokens"):
            v = getattr(self, k)
            if v is not None and int(v) <= 0:
                raise StatsConfigError(f"stats.{k} must be positive, got {v}")
        if self.engine not in ("lightning", "torch"):
            raise StatsConfigError(f"stats.engine={self.engine!r}: choose lightning or torch")
        if self.reference_missing not in ("compute", "error"):
            raise StatsConfigError(f"stats.reference_missing={self.reference_missing!r}: choose compute or error")

    def to_dict(self) -> dict:
        return asdict(self)
