"""torchmetrics ``Metric``s holding the evaluation's per-prompt and per-case state (synced across DDP ranks).

Both metrics store one row per key in list ("cat") states, so every rank's rows are gathered on ``compute()``.
Rows are keyed (prompt scores: ``case, kind, prompt, which``; generation: ``case``) and de-duplicated on compute:
a ``DistributedSampler`` pads the last batches by repeating items, and a duplicated key carries the same value,
so N processes give exactly the numbers of one process. The formulas that turn the rows into metrics live in
:mod:`massedit.evaluation.aggregate` (plain numpy).
"""
from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric

SCORE_FIELDS = ("nll", "all_correct", "n_correct", "n_tok")


def _dedupe(keys: np.ndarray, *values: np.ndarray):
    """Unique rows of ``keys`` (first occurrence), sorted lexicographically, with the matching values."""
    if keys.shape[0] == 0:
        return (keys, *values)
    _, first = np.unique(keys, axis=0, return_index=True)
    order = first[np.lexsort(keys[first].T[::-1])]
    return (keys[order], *(v[order] for v in values))


class PromptScoreMetric(Metric):
    """Per (case, prompt kind, prompt index, which target) teacher-forced scores: mean NLL, all-correct flag,
    #correct tokens, #tokens (REFERENCE_SPEC §4.3, §4.5)."""

    full_state_update = False
    higher_is_better = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("keys", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> None:  # keys [K, 4] long, values [K, 4] float64
        self.keys.append(keys.to(self.device, torch.long))
        self.values.append(values.to(self.device, torch.float64))

    def compute(self) -> dict[str, np.ndarray]:
        keys = _cat(self.keys, (0, 4), torch.long)
        vals = _cat(self.values, (0, len(SCORE_FIELDS)), torch.float64)
        keep = keys[:, 0] >= 0  # drop the per-rank placeholder rows
        keys, vals = _dedupe(keys[keep], vals[keep])
        out = {"case": keys[:, 0], "kind": keys[:, 1], "prompt": keys[:, 2], "which": keys[:, 3]}
        out.update({f: vals[:, i] for i, f in enumerate(SCORE_FIELDS)})
        return out


class GenerationMetric(Metric):
    """Per-case fluency (n-gram entropy, bits) and consistency (TF-IDF cosine; NaN = not computed) (§4.4)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("case", default=[], dist_reduce_fx="cat")
        self.add_state("fluency", default=[], dist_reduce_fx="cat")
        self.add_state("consistency", default=[], dist_reduce_fx="cat")

    def update(self, case: torch.Tensor, fluency: torch.Tensor, consistency: torch.Tensor) -> None:
        self.case.append(case.reshape(-1).to(self.device, torch.long))
        self.fluency.append(fluency.reshape(-1).to(self.device, torch.float64))
        self.consistency.append(consistency.reshape(-1).to(self.device, torch.float64))

    def compute(self) -> dict[str, np.ndarray]:
        case = _cat(self.case, (0,), torch.long)
        flu = _cat(self.fluency, (0,), torch.float64)
        con = _cat(self.consistency, (0,), torch.float64)
        keep = case >= 0
        case, flu, con = _dedupe(case[keep].reshape(-1, 1), flu[keep], con[keep])
        return {"case": case[:, 0], "fluency": flu, "consistency": con}


def _cat(state, empty_shape, dtype) -> np.ndarray:
    if isinstance(state, torch.Tensor):  # after a DDP sync torchmetrics may hand back one tensor
        t = state
    elif len(state) == 0:
        t = torch.zeros(empty_shape, dtype=dtype)
    else:
        t = torch.cat([s.reshape(-1, *empty_shape[1:]) for s in state])
    return t.detach().cpu().numpy()
