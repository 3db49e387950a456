"""Small, swappable edit-success metrics used by the MEND scripts when ``massedit.evaluation`` is absent.

zsRE-style teacher-forced token accuracy (REFERENCE_SPEC §4.5): for a prompt and target ids ``y`` the
model sees ``prompt + y[:-1]`` and a target token counts as correct when the argmax at the position
before it equals it; per-case mean over the target tokens, then mean over cases ×100.

* efficacy      : ``prompt.format(subject)`` -> ``target_new``
* paraphrase    : each paraphrase prompt -> ``target_new``
* neighbourhood : zsRE ``loc + "?"`` -> ``loc_ans`` (absolute accuracy, as the reference), or CounterFact
  neighbourhood prompts -> their expected answers.
"""
from __future__ import annotations

from typing import Sequence

import torch

from massedit.data.requests import EditRequest

from .factors import build_edit_batch, model_device


@torch.no_grad()
def teacher_forced_accuracy(model, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> list[float]:
    """Per pair: fraction of target tokens predicted by argmax under teacher forcing."""
    out: list[float] = []
    dev = model_device(model)
    for i in range(0, len(prompts), batch_size):
        b = build_edit_batch(tok, prompts[i:i + batch_size], targets[i:i + batch_size]).to(dev)
        logits = model(**b.model_inputs()).logits
        pred = logits[:, :-1].argmax(-1)
        tgt = b.labels[:, 1:]
        mask = tgt != -100
        correct = ((pred == tgt) & mask).sum(-1).float() / mask.sum(-1).clamp_min(1)
        out.extend(correct.tolist())
    return out


def _neighbourhood_pairs(r: EditRequest) -> list[tuple[str, str]]:
    if r.loc and r.loc_ans:
        return [(r.loc if r.loc.rstrip().endswith("?") else r.loc + "?", r.loc_ans)]
    return [(p, t) for p, t in zip(r.neighborhood_prompts, r.neighborhood_targets) if t]


def quick_metrics(model, tok, requests: Sequence[EditRequest]) -> dict[str, float]:
    """Mean (×100) efficacy / paraphrase / neighbourhood token accuracy over ``requests``."""
    eff = teacher_forced_accuracy(model, tok, [r.filled_prompt for r in requests], [r.target_new for r in requests])
    para_p, para_t, para_case = [], [], []
    nb_p, nb_t, nb_case = [], [], []
    for k, r in enumerate(requests):
        for p in r.paraphrase_prompts:
            para_p.append(p), para_t.append(r.target_new), para_case.append(k)
        for p, t in _neighbourhood_pairs(r):
            nb_p.append(p), nb_t.append(t), nb_case.append(k)

    def per_case(prompts, targets, cases):
        if not prompts:
            return float("nan")
        acc = teacher_forced_accuracy(model, tok, prompts, targets)
        by: dict[int, list[float]] = {}
        for c, a in zip(cases, acc):
            by.setdefault(c, []).append(a)
        return 100.0 * sum(sum(v) / len(v) for v in by.values()) / len(by)

    return {
        "efficacy_acc": 100.0 * sum(eff) / max(1, len(eff)),
        "paraphrase_acc": per_case(para_p, para_t, para_case),
        "neighborhood_acc": per_case(nb_p, nb_t, nb_case),
        "n": len(requests),
    }
