"""Evaluation LightningModule: thin glue running the plain-torch scoring / sampling per batch into torchmetrics.

``validation_step`` (dataloader 0): pack a batch of prompt groups, one forward, per-branch NLL/accuracy ->
:class:`PromptScoreMetric`. Dataloader 1: sample the case's generation texts with the reference sampler,
fluency + consistency -> :class:`GenerationMetric`. ``on_validation_epoch_end`` computes (DDP-synced) states
into ``self.results``.
"""
from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from massedit.core.io import stable_hash
from massedit.evaluation.metrics import PromptScoreMetric, GenerationMetric
from massedit.evaluation.sampler import generate_fast
from massedit.evaluation.scoring import branch_scores, choose_scoring_mode, pack_groups, selected_logits
from massedit.evaluation.text import fluency


def case_seed(seed: int, case_id) -> int:
    """Per-case sampling seed: independent of batching, rank and evaluation order."""
    return int(stable_hash(["massedit-eval-generation", int(seed), str(case_id)]), 16) % (2**63 - 1)


class EvaluationModule(pl.LightningModule):
    def __init__(self, model, tok, requests, *, kind: str, seed: int = 0, top_k: int = 5, max_gen_len: int = 100,
                 consistency_scorer=None, scoring_mode: str = "auto", row_tokens: int = 128):
        super().__init__()
        self.model = model
        self.tok = tok
        self.requests = list(requests)
        self.kind = kind
        self.seed, self.top_k, self.max_gen_len = int(seed), int(top_k), int(max_gen_len)
        self.consistency_scorer = consistency_scorer
        self.scoring_mode = scoring_mode
        self.row_tokens = int(row_tokens)
        self.tokens_forwarded = 0
        self._mode: tuple[bool, bool] | None = None
        self.prompt_scores = PromptScoreMetric()
        self.generation = GenerationMetric()
        self.texts: dict[int, list[str]] = {}
        self.results: dict[str, Any] | None = None

    def _scoring_mode(self, groups) -> tuple[bool, bool]:
        if self._mode is None:
            if self.scoring_mode == "packed":
                self._mode = (True, True)
            elif self.scoring_mode == "plain":
                self._mode = (False, False)
            else:
                self._mode = choose_scoring_mode(self.model, groups, self.tok.pad_token_id)
        return self._mode

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        if batch["type"] == "score":
            self._score(batch["groups"])
        else:
            self._generate(batch)

    test_step = validation_step

    def _score(self, groups) -> None:
        packed, head_only = self._scoring_mode(groups)
        b = pack_groups(groups, self.tok.pad_token_id, packed=packed, row_tokens=self.row_tokens).to(self.device)
        self.tokens_forwarded += b.n_tokens
        s = branch_scores(selected_logits(self.model, b, head_only_selected=head_only), b)
        keys, vals = [], []
        for bi, owners in enumerate(b.owners):
            v = [s["nll"][bi], s["all_correct"][bi], s["n_correct"][bi], s["n_tok"][bi]]
            for o in owners:
                keys.append(list(o))
                vals.append(torch.stack(v))
        self.prompt_scores.update(torch.tensor(keys, device=self.device), torch.stack(vals))

    def _generate(self, item) -> None:
        ci = item["case"]
        req = self.requests[ci]
        g = torch.Generator(device=self.device)
        g.manual_seed(case_seed(self.seed, req.case_id))
        texts = generate_fast(self.model, self.tok, item["prompts"], top_k=self.top_k, max_out_len=self.max_gen_len, generator=g)
        flu = fluency(texts)
        con = math.nan
        if self.consistency_scorer is not None:
            con = self.consistency_scorer(texts, item.get("relation_id"), item.get("target_new_id"))
        self.texts[ci] = texts
        self.generation.update(torch.tensor([ci]), torch.tensor([flu], dtype=torch.float64), torch.tensor([con], dtype=torch.float64))

    def on_validation_epoch_end(self) -> None:
        texts = dict(self.texts)
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, texts)
            for part in gathered:
                texts.update(part or {})
        # one placeholder row per rank (case -1, dropped on compute): a rank with no rows of a kind would
        # otherwise skip the collective gather of that state and the other ranks would wait for it
        self.prompt_scores.update(torch.full((1, 4), -1, device=self.device), torch.zeros(1, 4, dtype=torch.float64))
        self.generation.update(torch.tensor([-1]), torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
        self.results = {"scores": self.prompt_scores.compute(), "generation": self.generation.compute(), "texts": texts}
        self.prompt_scores.reset()
        self.generation.reset()
        self.texts = {}

    on_test_epoch_end = on_validation_epoch_end
