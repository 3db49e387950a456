"""``eval`` config group and the result of one evaluation (plain data; no Lightning)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from massedit.core.errors import InputError


class EvalConfigError(InputError):
    """An ``eval.*`` value that cannot work (named in the message)."""


@dataclass
class ConsistencyFiles:
    """The CounterFact release's consistency companions; all null = consistency "not computed"."""

    attribute_snippets: str | None = None   # attribute_snippets.json
    idf: str | None = None                  # idf.npy (null with snippets given: refit on the snippets, as the reference)
    tfidf_vocab: str | None = None          # tfidf_vocab.json


@dataclass
class EvalConfig:
    """``eval`` config group (REFERENCE_SPEC §4; docs/readme/evaluation.md)."""

    dataset: str = "auto"             # counterfact | zsre | auto (zsRE when every request has a `loc` question)
    batch_size: int = 256             # prompt groups per forward, packed into prefix-tree rows
    row_tokens: int = 128             # tokens per packed row (a longer single sequence gets a row of its own)
    generation: bool = True           # fluency (+ consistency) from sampled generations; CounterFact only
    generation_every_k: int = 10      # cases with case_id % k == 0 (reference generation_test_interval; 1 = all)
    generation_batch_cases: int = 16  # cases sampled together in one batch, each with its own seeded stream
    max_gen_len: int = 100            # tokens incl. the prompt (reference max_out_len)
    top_k: int = 5                    # the reference sampler's top-k
    seed: int = 0                     # generation sampling seed (per case; the reference is unseeded)
    consistency: ConsistencyFiles = field(default_factory=ConsistencyFiles)
    pre: bool = True                  # evaluate the unedited model first
    post: bool = True                 # evaluate the edited model
    cache_pre: bool = True            # reuse pre-edit results of the same (model weights, requests, eval settings)
    teacher_forcing: str = "string"   # string: tokenise f"{prompt} {target}" (reference) | tokens: ids + target ids
    scoring: str = "auto"             # auto (self-checked prefix-tree packing) | packed | plain
    zsre_score: bool = False          # zsRE: also report the hmean of the three accuracies (ROME-repo convention)
    tfidf_backend: str = "auto"       # auto | sklearn | numpy

    def __post_init__(self) -> None:
        choices = {"dataset": ("auto", "counterfact", "zsre"), "teacher_forcing": ("string", "tokens"),
                   "scoring": ("auto", "packed", "plain"), "tfidf_backend": ("auto", "sklearn", "numpy")}
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise EvalConfigError(f"eval.{k}={getattr(self, k)!r}: choose one of {allowed}")
        for k in ("batch_size", "row_tokens", "generation_every_k", "generation_batch_cases", "max_gen_len",
                  "top_k"):
            if int(getattr(self, k)) < 1:
                raise EvalConfigError(f"eval.{k} must be >= 1, got {getattr(self, k)}")
        if isinstance(self.consistency, dict):
            self.consistency = ConsistencyFiles(**self.consistency)


@dataclass
class EvalResult:
    """Metrics of one model state. ``summary``/``ci`` are in the reference's ×100 units (see aggregate.py);
    ``None`` = not computed. ``per_case``: one dict per request with its per-prompt NLLs/probabilities/flags."""

    stage: str
    kind: str
    summary: dict[str, float | None]
    ci: dict[str, float | None]
    n: dict[str, int]
    per_case: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_cases(self) -> int:
        return len(self.per_case)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "kind": self.kind, "summary": self.summary, "ci": self.ci, "n": self.n,
                "info": self.info, "n_cases": self.n_cases}
