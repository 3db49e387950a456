"""Second-moment statistics of the rewrite-module input, plain torch (REFERENCE_SPEC §0.6).

For layer ``l`` the key ``k_t ∈ R^m`` is the input of the rewrite module (MLP down-projection) at token
``t``. Over the non-padding tokens of a corpus sample

    S = Σ_t k_t k_tᵀ   (un-normalised sum, accumulated in float32/float64)
    N = number of tokens
    C = S / N          (uncentred second moment, no mean subtraction)

All requested layers are collected in **one** forward pass per batch that stops right after the highest
layer's rewrite module (``TraceDict(stop=True)``), whatever the model dtype (fp16/bf16 forward, fp32/fp64
sums; REFERENCE_SPEC §6.1).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from massedit.core.nethook import TraceDict

log = logging.getLogger(__name__)


def block_bounds(m: int, blocks: int) -> list[tuple[int, int]]:
    """Split ``range(m)`` into ``blocks`` contiguous column blocks ``[(start, end), ...]``."""
    blocks = max(1, min(int(blocks), m))
    edges = [round(i * m / blocks) for i in range(blocks + 1)]
    return [(edges[i], edges[i + 1]) for i in range(blocks)]


def add_second_moment_upper_blocks(acc: torch.Tensor, keys: torch.Tensor, blocks: int = 1) -> None:
    """``acc += Kᵀ K`` restricted to the upper block triangle (row block ``i``, column blocks ``≥ i``).

    ``Kᵀ K`` is symmetric, so the strictly-lower blocks carry no information; with 3 blocks this skips a third
    of the multiply-adds (the diagonal blocks are computed in full). ``blocks=1`` is the plain ``Kᵀ K``.
    Complete the matrix with :func:`symmetrize_upper_blocks`."""
    k = keys.to(acc.dtype)
    if blocks <= 1:
        acc.addmm_(k.T, k)
        return
    for a, b in block_bounds(acc.shape[0], blocks):
        acc[a:b, a:].addmm_(k[:, a:b].T, k[:, a:])


def symmetrize_upper_blocks(acc: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """The full symmetric sum from one accumulated by :func:`add_second_moment_upper_blocks` (a new tensor)."""
    if blocks <= 1:
        return acc
    out = acc.clone()
    for a, b in block_bounds(acc.shape[0], blocks):
        out[b:, a:b] = acc[a:b, b:].T
    return out


def second_moment(total: torch.Tensor, count: int) -> torch.Tensor:
    """``C = S / N`` (the reference's ``SecondMoment.moment()``), returned as float32 (§0.6)."""
    if count <= 0:
        raise ValueError("cannot form a second moment from zero tokens")
    return (total / count).to(torch.float32)


def select_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Rows of ``hidden [B, T, m]`` at non-padding positions (``attention_mask == 1``) -> ``[N, m]``."""
    return hidden[attention_mask.to(torch.bool)]


@dataclass
class MomentState:
    """Running sums of one collection: ``sums[module] = Σ k kᵀ``, token ``count``, ``batches_done``."""

    sums: dict[str, torch.Tensor]
    count: int = 0
    batches_done: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def zeros(cls, modules: Sequence[str], m: int, acc_dtype: torch.dtype, device, blocks: int = 1) -> "MomentState":
        return cls({name: torch.zeros(m, m, dtype=acc_dtype, device=device) for name in modules},
                   extra={"blocks": int(blocks)})

    @property
    def blocks(self) -> int:
        return int(self.extra.get("blocks", 1))

    def full_sums(self) -> dict[str, torch.Tensor]:
        """``Σ k kᵀ`` per module as full symmetric matrices (see :func:`symmetrize_upper_blocks`)."""
        return {k: symmetrize_upper_blocks(v, self.blocks) for k, v in self.sums.items()}

    def to_dict(self) -> dict:
        return {"sums": {k: v.detach().cpu() for k, v in self.sums.items()}, "count": int(self.count),
                "batches_done": int(self.batches_done), "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, d: dict, device=None) -> "MomentState":
        return cls({k: v.to(device) if device is not None else v for k, v in d["sums"].items()},
                   int(d["count"]), int(d["batches_done"]), dict(d.get("extra", {})))


@torch.no_grad()
def accumulate_batch(model: torch.nn.Module, batch: dict, modules: Sequence[str], sums: dict[str, torch.Tensor],
                     blocks: int = 1) -> int:
    """One forward pass over ``batch`` (``input_ids``, ``attention_mask``) that stops after the last of
    ``modules``; adds ``Kᵀ K`` of each module's input at the non-padding tokens to ``sums[module]`` (its
    upper block triangle when ``blocks > 1``). Returns the number of tokens counted."""
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    with TraceDict(model, modules, retain_input=True, retain_output=False, stop=True) as td:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for name in modules:
        keys = td[name].input
        if keys is None:
            raise RuntimeError(f"module {name} did not run in the forward pass")
        add_second_moment_upper_blocks(sums[name], select_tokens(keys, mask), blocks)
    return int(mask.sum().item())


class CheckpointPolicy:
    """When to checkpoint partial sums: every ``every_batches`` batches and/or when ``every_seconds`` have
    passed since the last checkpoint (0 disables either rule)."""

    def __init__(self, every_batches: int = 0, every_seconds: float = 0.0):
        self.every_batches = int(every_batches or 0)
        self.every_seconds = float(every_seconds or 0.0)
        self.last = time.time()

    def due(self, batches_done: int) -> bool:
        if self.every_batches and batches_done % self.every_batches == 0:
            return True
        return bool(self.every_seconds) and time.time() - self.last >= self.every_seconds

    def mark(self) -> None:
        self.last = time.time()


class Progress:
    """Progress bar in tokens (rich; elapsed and remaining time; the rate and ETA are also logged once); a no-op
    when disabled."""

    def __init__(self, total_tokens: int, enabled: bool = True, desc: str = "C = E[kkᵀ]", initial: int = 0):
        self.bar = None
        self.t0 = time.time()
        self.done = 0
        self.total, self.initial, self.eta_announced = int(total_tokens or 0), int(initial or 0), not enabled
        if enabled:
            from massedit.core.progress import progress_bar

            self.bar = progress_bar(total_tokens, desc, unit="tok", initial=initial)

    ETA_AFTER_S = 3.0   # announce the measured rate and the remaining time once, after this many seconds

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        self._announce_eta()

    def _announce_eta(self) -> None:
        elapsed = time.time() - self.t0
        if self.eta_announced or elapsed < self.ETA_AFTER_S or not self.done or not self.total:
            return
        self.eta_announced = True
        rate = self.done / elapsed
        left = max(0, self.total - self.initial - self.done)
        import logging

        logging.getLogger("massedit.stats").info("statistics: %.0f tokens/s, ETA %.0f s for the remaining %d tokens",
                                                 rate, left / max(rate, 1e-9), left)

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return time.time() - self.t0


def collect_second_moments(
    model: torch.nn.Module,
    batches: Iterable[dict],
    modules: Sequence[str],
    *,
    acc_dtype: torch.dtype = torch.float32,
    state: MomentState | None = None,
    checkpoint: Callable[[MomentState], None] | None = None,
    checkpoint_every: int = 0,
    checkpoint_seconds: float = 0.0,
    progress: Progress | None = None,
    on_batch: Callable[[MomentState], None] | None = None,
    blocks: int = 1,
) -> MomentState:
    """Plain-torch collection loop: ``accumulate_batch`` over ``batches`` (already skipping the ones in
    ``state``), calling ``checkpoint(state)`` every ``checkpoint_every`` batches and/or
    ``checkpoint_seconds`` seconds. Returns the state (sums, count); with ``blocks > 1`` only the upper block
    triangle is accumulated (``state.full_sums()`` completes it); divide with :func:`second_moment`."""
    from massedit.core.adapters import get_adapter

    device = next(model.parameters()).device
    if state is None:
        m = get_adapter(model).mlp_inner_size
        state = MomentState.zeros(modules, m, acc_dtype, device, blocks)
    else:
        state.sums = {k: v.to(device) for k, v in state.sums.items()}
    policy = CheckpointPolicy(checkpoint_every, checkpoint_seconds)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            n = accumulate_batch(model, batch, modules, state.sums, state.blocks)
            state.count += n
            state.batches_done += 1
            if progress is not None:
                progress.update(n)
            if checkpoint is not None and policy.due(state.batches_done):
                checkpoint(state)
                policy.mark()
            if on_batch is not None:
                on_batch(state)
    finally:
        model.train(was_training)
    return state
