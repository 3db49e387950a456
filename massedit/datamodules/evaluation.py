"""Evaluation datamodule: every prompt of every request, tokenised once, grouped and batched (REFERENCE_SPEC §4).

Dataloader 0 yields batches of :class:`~massedit.evaluation.scoring.Group` lists (one packed forward per batch;
groups sorted by length); dataloader 1 (CounterFact with generation on) yields up to ``generation_batch_cases``
cases' generation prompts per step (every ``generation_every_k``-th case by case id, as the reference's
``generation_test_interval``), sampled in one batch with one seeded stream per case.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from massedit.data.requests import RequestValidationError
from massedit.evaluation.scoring import GroupBuilder, counterfact_branch, zsre_branch

log = logging.getLogger(__name__)


def detect_kind(requests: Sequence[Any], kind: str = "auto") -> str:
    """``counterfact`` | ``zsre``; ``auto``: zsRE when every request carries a ``loc`` question, else CounterFact."""
    if kind in ("counterfact", "zsre"):
        return kind
    if kind != "auto":
        raise ValueError(f"eval.dataset={kind!r}: choose counterfact, zsre or auto")
    return "zsre" if requests and all(getattr(r, "loc", None) for r in requests) else "counterfact"


def build_groups(tok, requests: Sequence[Any], kind: str, teacher_forcing: str = "string"):
    """All scored branches of all requests, keyed ``(case_idx, kind, prompt_idx, which)``; see scoring.py."""
    gb = GroupBuilder()
    for ci, r in enumerate(requests):
        try:
            if kind == "counterfact":
                kinds = ([r.filled_prompt], r.paraphrase_prompts, r.neighborhood_prompts)
                for k, prompts in enumerate(kinds):
                    for p, text in enumerate(prompts):
                        true = r.target_true
                        if k == 2 and r.neighborhood_targets:
                            true = r.neighborhood_targets[p]
                        for w, target in enumerate((r.target_new, true)):
                            if target is None or not str(target).strip():
                                continue
                            gb.add(*counterfact_branch(tok, text, target, teacher_forcing), (ci, k, p, w))
            else:
                kinds = ([(r.filled_prompt, r.target_new)], [(q, r.target_new) for q in r.paraphrase_prompts],
                         [(f"{r.loc}?", r.loc_ans)] if r.loc and r.loc_ans else [])
                for k, items in enumerate(kinds):
                    for p, (text, target) in enumerate(items):
                        gb.add(*zsre_branch(tok, text, target), (ci, k, p, 0))
        except (ValueError, IndexError) as e:
            raise RequestValidationError(f"cannot build evaluation prompts: {e}", index=ci, case_id=r.case_id) from None
    return gb.build()


def generation_selected(case_id, index: int, every_k: int) -> bool:
    """The reference runs generation tests when ``case_id % generation_test_interval == 0`` (index for non-int ids)."""
    if every_k is None or every_k <= 1:
        return True
    key = case_id if isinstance(case_id, int) else index
    return key % every_k == 0


class _ListDataset(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _identity(x):
    return x


class EvaluationDataModule(pl.LightningDataModule):
    def __init__(self, tok, requests: Sequence[Any], kind: str, *, batch_size: int = 32, generation: bool = False,
                 generation_every_k: int = 1, teacher_forcing: str = "string", generation_batch_cases: int = 1):
        super().__init__()
        self.tok, self.requests, self.kind = tok, list(requests), kind
        self.batch_size, self.generation, self.every_k = int(batch_size), bool(generation), int(generation_every_k or 1)
        self.teacher_forcing = teacher_forcing
        self.gen_batch = max(1, int(generation_batch_cases or 1))
        self.groups = None
        self.score_batches: list = []
        self.gen_items: list = []
        self.gen_batches: list = []

    def setup(self, stage: str | None = None) -> None:
        if self.groups is not None:
            return
        self.groups = build_groups(self.tok, self.requests, self.kind, self.teacher_forcing)
        bs = max(1, self.batch_size)
        self.score_batches = [{"type": "score", "groups": self.groups[i : i + bs]} for i in range(0, len(self.groups), bs)]
        self.gen_items = []
        if self.generation and self.kind == "counterfact":
            for ci, r in enumerate(self.requests):
                if r.generation_prompts and generation_selected(r.case_id, ci, self.every_k):
                    self.gen_items.append({"case": ci, "prompts": list(r.generation_prompts),
                                           "relation_id": r.relation_id, "target_new_id": r.target_new_id})
        gb = self.gen_batch
        self.gen_batches = [{"type": "gen", "items": self.gen_items[i : i + gb]} for i in range(0, len(self.gen_items), gb)]
        n_branches = sum(len(g.branches) for g in self.groups)
        log.info("evaluation: %d requests -> %d prompt groups, %d scored continuations, %d batches, %d generation cases "
                 "(%d batches)", len(self.requests), len(self.groups), n_branches, len(self.score_batches),
                 len(self.gen_items), len(self.gen_batches))

    def _loader(self, items):
        """This rank's share of ``items``: round-robin, every item on exactly one rank; ranks with fewer items get
        ``{"type": "skip"}`` batches so that every rank runs the same (non-zero) number of steps."""
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        shard = items[rank::world]
        steps = max(1, -(-len(items) // world))
        shard = shard + [{"type": "skip"}] * (steps - len(shard))
        return DataLoader(_ListDataset(shard), batch_size=None, shuffle=False, collate_fn=_identity, num_workers=0)

    def val_dataloader(self):
        loaders = [self._loader(self.score_batches)]
        if self.gen_batches:
            loaders.append(self._loader(self.gen_batches))
        return loaders if len(loaders) > 1 else loaders[0]

    test_dataloader = val_dataloader
