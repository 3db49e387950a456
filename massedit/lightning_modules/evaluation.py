"""Evaluation LightningModule: thin glue running the plain-torch scoring / sampling per batch into torchmetrics.

``validation_step`` / ``test_step`` (dataloader 0): pack a batch of prompt groups, one forward, per-branch
NLL/accuracy -> :class:`PromptScoreMetric`. Dataloader 1: sample a few cases' generation texts with the reference
sampler in one batch (one seeded stream per case), fluency + consistency -> :class:`GenerationMetric`. At the epoch end the (DDP-synced) states become an
:class:`~massedit.evaluation.config.EvalResult` in ``self.result`` on every rank.

The edit job evaluates the unedited model with ``trainer.validate`` and the edited one with ``trainer.test``
(the edit callback fires at ``on_test_start``), so one module serves both stages.
"""
from __future__ import annotations

import math
import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from massedit.core.io import stable_hash
from massedit.core.sampling import generate_fast_grouped
from massedit.evaluation.aggregate import METRICS_VERSION, build_results
from massedit.evaluation.config import EvalConfig, EvalResult
from massedit.evaluation.metrics import GenerationMetric, PromptScoreMetric
from massedit.evaluation.scoring import branch_scores, choose_scoring_mode, pack_groups, selected_logits
from massedit.evaluation.text import fluency
from massedit.trainer import KeepDispatched


def case_seed(seed: int, case_id) -> int:
    """Per-case sampling seed: independent of batching, rank and evaluation order."""
    return int(stable_hash(["massedit-eval-generation", int(seed), str(case_id)]), 16) % (2**63 - 1)


class EvaluationModule(KeepDispatched, pl.LightningModule):
    """Scores ``model`` on ``requests`` (the data comes from :class:`~massedit.datamodules.evaluation.EvaluationDataModule`)."""

    def __init__(self, model, tok, requests, cfg: EvalConfig, *, kind: str, consistency_scorer=None):
        super().__init__()
        self.model = model
        self.tok = tok
        self.requests = list(requests)
        self.cfg = cfg
        self.kind = kind
        self.seed, self.top_k, self.max_gen_len = int(cfg.seed), int(cfg.top_k), int(cfg.max_gen_len)
        self.consistency_scorer = consistency_scorer
        self.scoring_mode = cfg.scoring
        self.row_tokens = int(cfg.row_tokens)
        self.tokens_forwarded = 0
        self._mode: tuple[bool, bool] | None = None
        self.prompt_scores = PromptScoreMetric()
        self.generation = GenerationMetric()
        self.texts: dict[int, list[str]] = {}
        self.results: dict[str, Any] | None = None
        self.result: EvalResult | None = None
        self.stage = "pre"
        self._t0 = 0.0

    def on_validation_start(self) -> None:
        self._start("pre")

    def on_test_start(self) -> None:
        self._start("post")

    def _start(self, stage: str) -> None:
        self.stage, self._t0, self.tokens_forwarded, self.result = stage, time.time(), 0, None

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
        elif batch["type"] == "gen":
            self._generate(batch)
        # "skip": a padding step of a rank with fewer batches than the others

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

    def _generate(self, batch) -> None:
        items = batch["items"]
        gens = []
        for item in items:
            g = torch.Generator(device=self.device)
            g.manual_seed(case_seed(self.seed, self.requests[item["case"]].case_id))
            gens.append(g)
        all_texts = generate_fast_grouped(self.model, self.tok, [item["prompts"] for item in items], top_k=self.top_k,
                                          max_out_len=self.max_gen_len, generators=gens)
        cases, flus, cons = [], [], []
        for item, texts in zip(items, all_texts):
            con = math.nan
            if self.consistency_scorer is not None:
                con = self.consistency_scorer(texts, item.get("relation_id"), item.get("target_new_id"))
            self.texts[item["case"]] = texts
            cases.append(item["case"])
            flus.append(fluency(texts))
            cons.append(con)
        self.generation.update(torch.tensor(cases), torch.tensor(flus, dtype=torch.float64),
                               torch.tensor(cons, dtype=torch.float64))

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
        self.result = self._to_result()

    on_test_epoch_end = on_validation_epoch_end

    def _to_result(self) -> EvalResult:
        res = self.results
        per_case, summary, ci, n = build_results(self.kind, self.requests, res["scores"], res["generation"],
                                                 res["texts"], zsre_score=bool(self.cfg.zsre_score))
        from massedit.evaluation.text import word_tokenizer_name

        dm = self.trainer.datamodule if self._trainer is not None else None
        groups = getattr(dm, "groups", None) or []
        gen_items = getattr(dm, "gen_items", None) or []
        cfg = self.cfg
        info = {
            "metrics_version": METRICS_VERSION,
            "seconds": round(time.time() - self._t0, 3),
            "n_groups": len(groups),
            "n_branches": sum(len(g.branches) for g in groups),
            "tokens_forwarded": self.tokens_forwarded,  # this rank's token slots incl. padding, after prefix sharing
            "tokens_unshared": sum(g.length for g in groups),  # each prompt once + its continuations
            "n_generation_cases": len(gen_items),
            "scoring": {"packed": self._mode[0], "head_only_selected": self._mode[1]} if self._mode else None,
            "teacher_forcing": cfg.teacher_forcing,
            "word_tokenizer": word_tokenizer_name() if gen_items else None,
            "consistency": "computed" if self.consistency_scorer is not None
            else "not computed (eval.consistency files not given)",
            "generation": {"on": bool(cfg.generation) and self.kind == "counterfact", "every_k": cfg.generation_every_k,
                           "max_gen_len": cfg.max_gen_len, "top_k": cfg.top_k, "seed": cfg.seed,
                           "batch_cases": cfg.generation_batch_cases},
            "world_size": self.trainer.world_size if self._trainer is not None else 1,
        }
        return EvalResult(stage=self.stage, kind=self.kind, summary=summary, ci=ci, n=n, per_case=per_case, info=info)
