"""LightningDataModule over edit requests for FT-style training (prompt -> target batches, right padding).

Batches are built by :func:`massedit.editing.ft.make_ft_batch` (the layout depends on the loss:
``bag_last_position`` = prompt-only inputs + padded target ids; ``autoregressive`` = prompt+target
inputs with ``labels``). Tokenisation follows REFERENCE_SPEC §6.3 (pad = eos, right padding, targets
with a leading space and no special tokens).
"""
from __future__ import annotations

import math
import os
from functools import partial
from typing import Iterator, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from massedit.editing.ft import LOSSES, make_ft_batch


class RequestDataset(Dataset):
    """Index -> EditRequest (a list with a Dataset face)."""

    def __init__(self, requests: Sequence):
        self.requests = list(requests)

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i):
        if isinstance(i, tuple):  # (index, counts) from RequestBatchSampler
            return self.requests[i[0]], i[1]
        return self.requests[i]


def collate_requests(requests, tok, loss: str):
    """A training batch; with :class:`RequestBatchSampler` it also carries ``n_real`` (requests of this rank that
    count; 0 for a placeholder) and ``n_global`` (requests of the whole batch over all ranks)."""
    items = list(requests)
    if items and isinstance(items[0], tuple):
        reqs = [r for r, _ in items]
        batch = make_ft_batch(tok, reqs, loss=loss)
        batch["n_real"] = torch.tensor(sum(c[0] for _, c in items))
        batch["n_global"] = torch.tensor(items[0][1][1])
        return batch
    return make_ft_batch(tok, items, loss=loss)


class RequestBatchSampler(Sampler):
    """Batches of ``batch_size`` requests in file order (or a seeded shuffle per epoch, drawn exactly as
    ``DataLoader(shuffle=True, generator=g)`` draws it), split across ranks: rank ``r`` takes elements
    ``r::world_size`` of every batch, so every request is used exactly once per epoch and every rank runs the same
    number of steps. A rank left without a request in a (last, small) batch gets the batch's first request as a
    placeholder that counts zero. One rank: the batches of a plain ``DataLoader``."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                 rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.shuffle, self.generator = int(n), int(batch_size), bool(shuffle), generator
        self.rank, self.world_size = int(rank), max(1, int(world_size))

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list]:
        if self.shuffle:  # torch's own shuffle (the draws of DataLoader(shuffle=True, generator=g))
            order = [int(i) for i in RandomSampler(range(self.n), generator=self.generator)]
        else:
            order = list(range(self.n))
        for s in range(0, self.n, self.batch_size):
            glob = order[s: s + self.batch_size]
            mine = glob[self.rank:: self.world_size]
            if mine:
                yield [(i, (1, len(glob))) for i in mine]
            else:
                yield [(glob[0], (0, len(glob)))]


class EditRequestsDataModule(pl.LightningDataModule):
    """Training batches of edit requests.

    ``batch_size`` requests per batch (the last one may be smaller), in file order unless
    ``shuffle`` (the reference does not shuffle), ``seed`` fixes the shuffle order. Under DDP every batch is split
    across the ranks (:class:`RequestBatchSampler`; use ``Trainer(use_distributed_sampler=False)``).
    """

    def __init__(self, requests: Sequence, tok, *, batch_size: int = 64, loss: str = "bag_last_position",
                 shuffle: bool = False, seed: int | None = None, num_workers: int = 0):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss {loss!r}; choose one of {LOSSES}")
        if not requests:
            raise ValueError("no edit requests to train on")
        if int(batch_size) < 1:
            raise ValueError("batch_size must be >= 1")
        self.requests = list(requests)
        self.tok = tok
        self.batch_size = int(batch_size)
        self.loss = loss
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.num_workers = int(num_workers)
        # tokenise everything once now: bad records fail before training starts, with their case id
        make_ft_batch(tok, self.requests, loss=loss)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        gen = None
        seed = self.seed
        if self.shuffle and seed is None and world > 1:  # every rank must draw the same order
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        if self.shuffle and seed is not None:
            gen = torch.Generator().manual_seed(int(seed))
        sampler = RequestBatchSampler(len(self.requests), self.batch_size, shuffle=self.shuffle, generator=gen,
                                      rank=rank, world_size=world)
        return DataLoader(
            RequestDataset(self.requests),
            batch_sampler=sampler,
            generator=gen,  # the loader draws its base seed from it first, as DataLoader(shuffle=True, generator=gen)
            num_workers=self.num_workers,
            collate_fn=partial(collate_requests, tok=self.tok, loss=self.loss),
        )
