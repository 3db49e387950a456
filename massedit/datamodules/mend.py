"""Training data for MEND (REFERENCE_SPEC §5.5) from edit requests (:mod:`massedit.data.requests`).

One example = an edit (``edit_inner``: prompt -> target), its generalisation input (``edit_outer``: a
paraphrase -> the same target; the prompt itself when a request has no paraphrase) and an unrelated
locality text (``loc``) whose output distribution must not move.

* zsRE (MEND format): target = ``alt`` (``data.zsre_target``, ``data=zsre_train``; the MEND qa setup edits to an
  alternative answer), outer = ``rephrase``, locality = the ``loc`` NQ question + ``loc_ans`` of another
  record (the reference draws locality examples at random, disjoint from the edit).
* CounterFact: target = ``target_new``, outer = a paraphrase prompt, locality = a neighbourhood prompt +
  its expected answer (``target_true``) of another record.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from massedit.data.requests import DataConfig, EditRequest, RequestValidationError, load_requests, load_requests_from_config
from massedit.editing.mend.config import MendTrainConfig
from massedit.editing.mend.factors import build_edit_batch, build_text_batch

log = logging.getLogger(__name__)


@dataclass
class MendExample:
    case_id: int | str
    prompt: str          # edit_inner input
    outer_prompt: str    # edit_outer input
    target: str
    loc_text: str        # locality text (all tokens scored)


def locality_texts(req: EditRequest) -> list[str]:
    """Locality texts a request offers: zsRE ``loc? loc_ans``, CounterFact ``neighbour prompt + answer``."""
    out = []
    if req.loc:
        loc = req.loc if req.loc.rstrip().endswith("?") else req.loc + "?"
        out.append(loc + (" " + req.loc_ans.strip() if req.loc_ans else ""))
    for k, p in enumerate(req.neighborhood_prompts):
        ans = req.neighborhood_targets[k] if k < len(req.neighborhood_targets) else req.target_true
        out.append(p + (" " + ans.strip() if ans else ""))
    return out


def make_examples(requests: Sequence[EditRequest], seed: int = 0) -> list[MendExample]:
    """One :class:`MendExample` per request; paraphrase and locality partner drawn with ``seed``.

    Raises :class:`RequestValidationError` naming the request when no locality text can be formed.
    """
    rng = random.Random(seed)
    pools = [locality_texts(r) for r in requests]
    if len(requests) < 2:
        raise RequestValidationError("MEND training needs at least 2 requests (locality comes from other records)")
    with_loc = [j for j, p in enumerate(pools) if p]
    out = []
    for i, r in enumerate(requests):
        if not [j for j in with_loc if j != i]:
            raise RequestValidationError("no locality input in any other record (zsRE loc/loc_ans or CounterFact "
                                         "neighborhood_prompts)", case_id=r.case_id, field="loc")
        j = i
        while j == i or not pools[j]:
            j = rng.randrange(len(requests))
        outer = rng.choice(r.paraphrase_prompts) if r.paraphrase_prompts else r.filled_prompt
        out.append(MendExample(r.case_id, r.filled_prompt, outer, r.target_new, rng.choice(pools[j])))
    return out


class MendDataset(Dataset):
    def __init__(self, examples: Sequence[MendExample]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> MendExample:
        return self.examples[i]


class MendCollate:
    """Examples -> ``{"edit_inner", "edit_outer", "loc"}`` :class:`EditBatch` es (right-padded) and
    ``row_group`` (the edit problem of each row; ``n_edits`` consecutive examples share one ΔW)."""

    def __init__(self, tok, max_length: int | None = 64, n_edits: int = 1):
        self.tok, self.max_length, self.n_edits = tok, max_length, max(1, int(n_edits))

    def __call__(self, examples: Sequence[MendExample]) -> dict:
        # consecutive runs of n_edits examples form one edit problem (one ΔW); problems are independent
        groups = torch.arange(len(examples)) // self.n_edits
        return {
            "row_group": groups,
            "n_groups": int(groups.max()) + 1,
            "edit_inner": build_edit_batch(self.tok, [e.prompt for e in examples], [e.target for e in examples], self.max_length),
            "edit_outer": build_edit_batch(self.tok, [e.outer_prompt for e in examples], [e.target for e in examples], self.max_length),
            "loc": build_text_batch(self.tok, [e.loc_text for e in examples], self.max_length),
        }


def load_training_requests(data_cfg: DataConfig, train_cfg: MendTrainConfig) -> tuple[list[EditRequest], list[EditRequest]]:
    """Train / validation requests: ``data.path`` (all records unless ``data.num_edits``; zsRE targets from
    ``data.zsre_target``, ``alt`` for MEND's qa setup) and either ``method.train.val_path`` or the last
    ``val_fraction`` of the training records."""
    reqs = load_requests_from_config(data_cfg)
    if train_cfg.val_path:
        return reqs, load_requests(train_cfg.val_path, fmt=data_cfg.format, skip_invalid=data_cfg.skip_invalid,
                                   zsre_target=data_cfg.zsre_target)
    n_val = max(2, int(round(len(reqs) * float(train_cfg.val_fraction))))
    if len(reqs) - n_val < 2:
        raise RequestValidationError(f"{len(reqs)} requests are too few to split off {n_val} for validation "
                                     f"(method.train.val_fraction={train_cfg.val_fraction}); give more, or "
                                     f"method.train.val_path", file=data_cfg.path)
    return reqs[:-n_val], reqs[-n_val:]


class ReplacementBatchSampler(Sampler):
    """Batches of examples drawn with replacement (``max_iters × n_edits`` draws in all, seeded), shared out
    across ranks: rank ``r`` takes batches ``r::world_size``, so ``max_iters`` counts the edit problems seen by the
    whole job, with one rank or N (N ranks: rounded up to a whole number of batches per rank, every rank runs the
    same number of steps). One rank: exactly the batches of ``DataLoader(sampler=RandomSampler(replacement=True,
    num_samples, generator), batch_size)``. (Lightning must not replace it: ``use_distributed_sampler=False``.)"""

    def __init__(self, n_items: int, batch_size: int, num_samples: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.n_items, self.batch_size, self.seed = int(n_items), max(1, int(batch_size)), int(seed)
        self.rank, self.world_size = int(rank), max(1, int(world_size))
        n_batches = -(-int(num_samples) // self.batch_size)
        self.per_rank = -(-n_batches // self.world_size)
        self.num_samples = int(num_samples) if self.world_size == 1 else self.per_rank * self.world_size * self.batch_size

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        draws = list(RandomSampler(range(self.n_items), replacement=True, num_samples=self.num_samples, generator=g))
        batches = [draws[s: s + self.batch_size] for s in range(0, len(draws), self.batch_size)]
        yield from batches[self.rank:: self.world_size]


class MendDataModule(pl.LightningDataModule):
    """Random edit examples (with replacement, ``max_iters`` batches of ``n_edits``) for training; a fixed set of
    ``val_size`` examples for each validation round."""

    def __init__(self, tok, train_requests: Sequence[EditRequest], val_requests: Sequence[EditRequest], *,
                 n_edits: int = 1, batch_problems: int = 1, max_iters: int = 1000, val_size: int = 50,
                 max_length: int | None = 64, seed: int = 0):
        super().__init__()
        self.tok = tok
        self.train_examples = make_examples(train_requests, seed)
        self.val_examples = make_examples(val_requests, seed + 1)[: max(1, val_size)]
        self.n_edits, self.max_iters, self.seed = int(n_edits), int(max_iters), int(seed)
        self.batch_problems = max(1, int(batch_problems))
        self.batch_size = self.n_edits * self.batch_problems
        self.collate = MendCollate(tok, max_length, self.n_edits)

    @classmethod
    def from_config(cls, data_cfg: DataConfig, train_cfg: MendTrainConfig, tok) -> "MendDataModule":
        t = train_cfg
        train, val = load_training_requests(data_cfg, t)
        log.info("MEND data: %d train / %d validation requests from %s", len(train), len(val), data_cfg.path)
        return cls(tok, train, val, n_edits=t.n_edits, batch_problems=t.batch_problems, max_iters=t.max_iters,
                   val_size=t.val_size, max_length=t.max_length, seed=t.seed)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ReplacementBatchSampler(len(self.train_examples), self.batch_size, self.max_iters * self.n_edits,
                                          seed=self.seed, rank=rank, world_size=world)
        return DataLoader(MendDataset(self.train_examples), batch_sampler=sampler, collate_fn=self.collate,
                          num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(MendDataset(self.val_examples), batch_size=self.batch_size, shuffle=False,
                          collate_fn=self.collate, num_workers=0)
