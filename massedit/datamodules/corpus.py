"""LightningDataModule serving the pre-packed token batches of a statistics corpus (``massedit.data.corpus``)."""
from __future__ import annotations

from typing import Sequence

import pytorch_lightning as pl
import torch

from massedit.data.corpus import TokenBatches


SKIP = -1  # index of a padding step (a rank with fewer batches than the others)


class _BatchList(torch.utils.data.Dataset):
    def __init__(self, tb: TokenBatches, indices: Sequence[int]):
        self.tb, self.indices = tb, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        j = self.indices[k]
        return {"skip": torch.tensor(True)} if j == SKIP else self.tb.tensors(j)


def batch_loader(tb: TokenBatches, indices: Sequence[int]) -> torch.utils.data.DataLoader:
    """A DataLoader yielding the pre-packed batches ``indices`` of ``tb`` in order (batch_size=None)."""
    return torch.utils.data.DataLoader(_BatchList(tb, indices), batch_size=None, shuffle=False)


class CorpusDataModule(pl.LightningDataModule):
    """Serves pre-packed token batches; each rank gets its round-robin shard (``TokenBatches.shard``),
    minus the ``resume_batches`` its LightningModule already accumulated (resume after a kill).

    Use with ``Trainer(use_distributed_sampler=False)``: the sharding is done here, without the padding
    a DistributedSampler would add (padding would count tokens twice).
    """

    def __init__(self, token_batches: TokenBatches):
        super().__init__()
        self.tb = token_batches

    def rank_indices(self) -> list[int]:
        """This rank's batches not yet accumulated, padded with :data:`SKIP` steps to the same count on every rank
        (at least one), so a rank with no batch left still takes part in the collective end of the epoch."""
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        done = int(getattr(getattr(trainer, "lightning_module", None), "resume_batches", 0) or 0)
        idx = self.tb.shard(rank, world)[done:]
        steps = max(1, -(-len(self.tb.batches) // world) - done)
        return idx + [SKIP] * max(0, steps - len(idx))

    def predict_dataloader(self):
        return batch_loader(self.tb, self.rank_indices())
