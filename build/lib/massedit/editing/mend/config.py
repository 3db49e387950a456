"""``method=mend`` config (REFERENCE_SPEC §5; docs/readme/mend.md): edited weights, editor network, editing and
training options, one typed schema."""
from __future__ import annotations

from dataclasses import dataclass, field
from massedit.core.errors import InputError


class MendConfigError(InputError):
    """A ``method.*`` value of MEND that cannot work (named in the message)."""


@dataclass
class MendTrainConfig:
    """``method.train``: how ``massedit train method=mend`` trains the editor (§5.4, §5.5)."""

    val_path: str | None = None      # held-out requests; null -> the last `val_fraction` of cfg.data
    val_fraction: float = 0.1
    val_size: int = 50               # validation examples used each validation round
    n_edits: int = 1                 # edits combined into one ΔW per problem (reference data.n_edits)
    batch_problems: int = 1          # independent edit problems per forward batch (speed knob)
    max_length: int | None = 64
    cedit: float = 0.1
    cloc: float = 1.0
    lr: float = 1e-6                 # Adam over editor params (+ edit LRs, see lrs_in_main_opt)
    lr_lr: float = 1e-4              # Adam over the edit LRs
    lrs_in_main_opt: bool = True     # [QUIRK] reference steps edit_lrs with both optimisers
    accumulate: int = 10             # accumulate_bs: optimiser step every N edit problems
    grad_clip: float = 100.0
    max_iters: int = 100000          # edit problems seen (reference iterations, 1e6)
    val_interval: int = 5000         # validate every N iterations
    monitor: str = "val/loss"        # ModelCheckpoint / early stopping: cedit·edit + cloc·loc on validation
    early_stop_patience: int | None = None  # validations without improvement before stopping; null = off
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < float(self.val_fraction) < 1:
            raise MendConfigError(f"method.train.val_fraction must be in (0, 1), got {self.val_fraction}")
        for k in ("val_size", "n_edits", "batch_problems", "accumulate", "max_iters", "val_interval"):
            if int(getattr(self, k)) < 1:
                raise MendConfigError(f"method.train.{k} must be >= 1, got {getattr(self, k)}")
        if not float(self.lr) > 0 or not float(self.lr_lr) > 0:
            raise MendConfigError("method.train.lr and method.train.lr_lr must be > 0")


@dataclass
class MendConfig:
    """``method=mend``: a trained editor network applied to many requests at once."""

    name: str = "mend"
    checkpoint: str | None = None    # editor file (mend_editor.pt) or Lightning .ckpt of a MEND run; null = untrained
    # ---- edited weights (§5.1), chosen through the architecture adapter
    layers: list[int] | None = None  # null -> the last `num_layers` layers
    num_layers: int = 3
    projections: list[str] = field(default_factory=lambda: ["up", "down"])  # up | down | gate | mlp_in_all
    # ---- editor network (§5.3); defaults = reference
    rank: int = 1920
    n_hidden: int = 1
    norm: bool = True
    combine: bool = True
    shared: bool = True
    relu_last: bool = True           # [QUIRK] reference clamps the last IDMLP layer too (false: plain residual)
    edit_lr: float = 1e-4            # initial learned per-parameter LR
    update_sign: float = -1.0        # W + sign·α·G̃. -1: a descent step at init; reference +1 (sign learned)
    # ---- editing (§5.6; deviation from the §5.7 last-chunk-only quirk: every chunk counts)
    concurrent_loss: str = "request_sum"  # request_sum: ΔW = sum of single-request edits | tokens_mean (reference)
    edit_chunk_size: int = 64        # requests per forward/backward; the result does not depend on it
    lr_scale: float = 1.0
    max_length: int | None = None    # truncate edit sequences (tokens); null = no truncation
    train: MendTrainConfig = field(default_factory=MendTrainConfig)

    def __post_init__(self) -> None:
        if self.concurrent_loss not in ("request_sum", "tokens_mean"):
            raise MendConfigError(f"method.concurrent_loss={self.concurrent_loss!r}: choose request_sum or tokens_mean")
        bad = [p for p in self.projections if p not in ("up", "down", "gate", "mlp_in_all")]
        if bad or not self.projections:
            raise MendConfigError(f"method.projections={self.projections!r}: choose from up, down, gate, mlp_in_all")
        for k in ("num_layers", "rank", "edit_chunk_size"):
            if int(getattr(self, k)) < 1:
                raise MendConfigError(f"method.{k} must be >= 1, got {getattr(self, k)}")
        if isinstance(self.train, dict):
            self.train = MendTrainConfig(**self.train)
