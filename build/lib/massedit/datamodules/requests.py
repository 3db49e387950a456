"""LightningDataModule over edit requests for FT-style training (prompt -> target batches, right padding).

Batches are built by :func:`massedit.editing.ft.make_ft_batch` (the layout depends on the loss:
``bag_last_position`` = prompt-only inputs + padded target ids; ``autoregressive`` = prompt+target
inputs with ``labels``). Tokenisation follows REFERENCE_SPEC §6.3 (pad = eos, right padding, targets
with a leading space and no special tokens).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from massedit.editing.ft import LOSSES, make_ft_batch


class RequestDataset(Dataset):
    """Index -> EditRequest (a list with a Dataset face)."""

    def __init__(self, requests: Sequence):
        self.requests = list(requests)

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i):
        return self.requests[i]


def collate_requests(requests, tok, loss: str):
    return make_ft_batch(tok, list(requests), loss=loss)


class EditRequestsDataModule(pl.LightningDataModule):
    """Training batches of edit requests.

    ``batch_size`` requests per batch (the last one may be smaller), in file order unless
    ``shuffle`` (the reference does not shuffle), ``seed`` fixes the shuffle order.
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
        gen = None
        if self.shuffle and self.seed is not None:
            gen = torch.Generator().manual_seed(int(self.seed))
        return DataLoader(
            RequestDataset(self.requests),
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            generator=gen,
            num_workers=self.num_workers,
            collate_fn=partial(collate_requests, tok=self.tok, loss=self.loss),
        )
