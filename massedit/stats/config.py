"""``stats`` config group: which text the second-moment statistics C = E[k kᵀ] are collected on, and how
(``configs/stats/*.yaml``; docs/readme/stats.md). Where they run (devices, precision) is ``trainer.*``."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from massedit.data.corpus import CorpusSpec
from massedit.core.errors import InputError

ACC_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
              "double": torch.float64}


class StatsConfigError(InputError):
    pass


@dataclass
class StatsConfig(CorpusSpec):
    # corpus: the fields of massedit.data.corpus.CorpusSpec (format, packing, chunk_chars, ...), one source
    corpus: Any = "builtin:wikitext-2"   # builtin:NAME, local file(s)/folder, a list of files, or hf:NAME[:CONFIG]
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
    artifact: str | None = None       # W&B artifact of an earlier run's statistics (entity/project/name:version),
    #                                   downloaded into the cache first (needs W&B access); edit runs upload theirs
    checkpoint_every: int = 50
    checkpoint_seconds: float = 300.0
    # `massedit stats` only
    layers: list[int] | None = None   # layers to precompute (default: the method's layers)
    export_dir: str | None = None     # also write the statistics in the reference npz layout under this folder

    def __post_init__(self) -> None:
        if isinstance(self.corpus, (list, tuple)):
            self.corpus = [str(c) for c in self.corpus]
        self.validate()

    @classmethod
    def from_config(cls, cfg: Any) -> "StatsConfig":
        """A :class:`StatsConfig` from itself, ``None`` (defaults), a dict or a DictConfig of its fields."""
        if isinstance(cfg, StatsConfig):
            return cfg
        if cfg is None:
            return cls()
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise StatsConfigError(f"unknown stats key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**cfg)

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
        if not self.corpus:
            raise StatsConfigError("stats.corpus is empty: give builtin:wikitext-2, a local file/folder or hf:NAME[:CONFIG]")
        if int(self.seed) < 0 or int(self.sort_window) < 0 or int(self.checkpoint_every) < 0 or float(self.checkpoint_seconds) < 0:
            raise StatsConfigError("stats.seed, sort_window, checkpoint_every and checkpoint_seconds must be >= 0")
        if self.reference_missing not in ("compute", "error"):
            raise StatsConfigError(f"stats.reference_missing={self.reference_missing!r}: choose compute or error")

    def to_dict(self) -> dict:
        return asdict(self)
