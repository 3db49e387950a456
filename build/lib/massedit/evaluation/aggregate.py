"""Turn per-prompt scores into per-case results and the summary (REFERENCE_SPEC §4.3–4.6), plain numpy.

Units of the summary follow the reference's ``summarize.py``: every metric ×100 (success and accuracy in %,
magnitude in percentage points of probability, fluency = n-gram entropy in bits ×100, consistency = cosine ×100);
``score`` = harmonic mean of the ES, PS, NS percentages. Per-case values are raw (fractions, bits, nats).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from massedit.evaluation import formulas as F
from massedit.evaluation.scoring import KINDS

METRICS_VERSION = "massedit-eval-1 (REFERENCE_SPEC §4, kmeng01/memit@80426fd)"

COUNTERFACT_METRICS = (
    "score",
    "efficacy_success", "paraphrase_success", "neighborhood_success",
    "efficacy_magnitude", "paraphrase_magnitude", "neighborhood_magnitude",
    "efficacy_acc", "paraphrase_acc", "neighborhood_acc",
    "fluency", "consistency",
)
ZSRE_METRICS = ("score", "efficacy_acc", "paraphrase_acc", "neighborhood_acc")

DEFINITIONS = {
    "score": "harmonic mean of efficacy_success, paraphrase_success, neighborhood_success (CounterFact Score); zsRE: "
             "hmean of the three accuracies only when eval.zsre_score=true (ROME-repo convention), else not computed",
    "efficacy_success": "ES: % of cases with P(target_new) > P(target_true) on the rewrite prompt (mean per-token NLL)",
    "paraphrase_success": "PS: same on paraphrase prompts (mean within case, then over cases)",
    "neighborhood_success": "NS: % with P(target_true) > P(target_new) on neighbourhood prompts (absolute, edited model)",
    "efficacy_magnitude": "EM: mean of P(new) - P(true) on the rewrite prompt, P = exp(-mean token NLL)",
    "paraphrase_magnitude": "PM: same on paraphrase prompts",
    "neighborhood_magnitude": "NM: mean of P(true) - P(new) on neighbourhood prompts",
    "efficacy_acc": "token accuracy: argmax equals target_new at every target token (teacher forced) on the rewrite "
                    "prompt; zsRE: per-token teacher-forced accuracy (Efficacy)",
    "paraphrase_acc": "same on paraphrase prompts (zsRE: Paraphrase)",
    "neighborhood_acc": "argmax equals the neighbourhood's own (true) answer at every token (zsRE: Specificity, "
                        "per-token on the NQ answer)",
    "fluency": "generation entropy: mean over generated texts of (2/3·H2 + 4/3·H3)/2 in bits, ×100",
    "consistency": "reference score: TF-IDF cosine of the generated texts vs attribute snippets of (relation, "
                   "target_new), ×100; not computed without eval.consistency files",
}

LABELS = {
    "score": "Score (S)",
    "efficacy_success": "Efficacy success (ES)",
    "paraphrase_success": "Paraphrase success (PS)",
    "neighborhood_success": "Neighborhood success (NS)",
    "efficacy_magnitude": "Efficacy magnitude (EM)",
    "paraphrase_magnitude": "Paraphrase magnitude (PM)",
    "neighborhood_magnitude": "Neighborhood magnitude (NM)",
    "efficacy_acc": "Efficacy token accuracy",
    "paraphrase_acc": "Paraphrase token accuracy",
    "neighborhood_acc": "Neighborhood token accuracy",
    "fluency": "Fluency (GE)",
    "consistency": "Consistency (RS)",
}
ZSRE_LABELS = {
    "score": "Score (hmean of accuracies)",
    "efficacy_acc": "Efficacy (token acc.)",
    "paraphrase_acc": "Paraphrase (token acc.)",
    "neighborhood_acc": "Specificity (token acc.)",
}


def _prompt_table(scores: dict[str, np.ndarray]) -> dict[int, dict[int, dict[int, dict[str, float]]]]:
    """case -> kind -> prompt -> {nll_new, nll_true, correct_new, correct_true, n_correct_new, n_tok_new, ...}."""
    table: dict[int, dict[int, dict[int, dict[str, float]]]] = {}
    for i in range(len(scores["case"])):
        c, k, p, w = (int(scores[f][i]) for f in ("case", "kind", "prompt", "which"))
        suffix = "new" if w == 0 else "true"
        d = table.setdefault(c, {}).setdefault(k, {}).setdefault(p, {})
        d[f"nll_{suffix}"] = float(scores["nll"][i])
        d[f"correct_{suffix}"] = bool(scores["all_correct"][i])
        d[f"n_correct_{suffix}"] = int(scores["n_correct"][i])
        d[f"n_tok_{suffix}"] = int(scores["n_tok"][i])
    return table


def counterfact_case_metrics(prompts: dict[int, dict[int, dict[str, float]]]) -> dict[str, float]:
    """Per-case ES/EM, PS/PM, NS/NM and the token accuracies from this case's per-prompt NLLs (§4.3)."""
    out: dict[str, float] = {}
    for k, name in enumerate(("efficacy", "paraphrase", "neighborhood")):
        rows = [prompts[k][p] for p in sorted(prompts.get(k, {}))]
        new = np.array([r.get("nll_new", math.nan) for r in rows], dtype=np.float64)
        true = np.array([r.get("nll_true", math.nan) for r in rows], dtype=np.float64)
        both = ~(np.isnan(new) | np.isnan(true))
        if name == "neighborhood":
            succ, mag = F.success_true(new[both], true[both]), F.magnitude_true(new[both], true[both])
            acc = [r["correct_true"] for r in rows if "correct_true" in r]
        else:
            succ, mag = F.success_new(new[both], true[both]), F.magnitude_new(new[both], true[both])
            acc = [r["correct_new"] for r in rows if "correct_new" in r]
        out[f"{name}_success"] = F.case_mean(succ.tolist())
        out[f"{name}_magnitude"] = F.case_mean(mag.tolist())
        out[f"{name}_acc"] = F.case_mean([float(a) for a in acc])
    return out


def zsre_case_metrics(prompts: dict[int, dict[int, dict[str, float]]]) -> dict[str, float]:
    """Per-case teacher-forced token accuracy: mean of the case's per-token booleans per prompt kind (§4.5)."""
    out = {}
    for k, name in enumerate(("efficacy", "paraphrase", "neighborhood")):
        rows = list(prompts.get(k, {}).values())
        n_tok = sum(r.get("n_tok_new", 0) for r in rows)
        out[f"{name}_acc"] = sum(r.get("n_correct_new", 0) for r in rows) / n_tok if n_tok else math.nan
    return out


def summarize(per_case_metrics: Sequence[dict[str, float]], names: Sequence[str], kind: str, zsre_score: bool = False):
    """``(summary, ci, n)``: mean over cases ×100, 95% half-width ×100, number of cases with the metric (§4.6)."""
    summary: dict[str, float | None] = {}
    ci: dict[str, float | None] = {}
    n: dict[str, int] = {}
    for name in names:
        if name == "score":
            continue
        m, c, k = F.mean_and_ci95([pc.get(name, math.nan) for pc in per_case_metrics])
        summary[name] = None if m is None else 100.0 * m
        ci[name] = None if c is None else 100.0 * c
        n[name] = k
    if kind == "counterfact":
        parts = [summary.get(f"{x}_success") for x in ("efficacy", "paraphrase", "neighborhood")]
    else:
        parts = [summary.get(f"{x}_acc") for x in ("efficacy", "paraphrase", "neighborhood")] if zsre_score else [None]
    summary["score"] = F.harmonic_mean(parts)
    ci["score"] = None  # the reference reports no interval for the score
    n["score"] = min((n.get(f"{x}_success" if kind == "counterfact" else f"{x}_acc", 0)
                      for x in ("efficacy", "paraphrase", "neighborhood")), default=0)
    ordered = {k: summary.get(k) for k in names}
    return ordered, {k: ci.get(k) for k in names}, {k: n.get(k, 0) for k in names}


def build_results(
    kind: str,
    requests: Sequence[Any],
    scores: dict[str, np.ndarray],
    gen: dict[str, np.ndarray] | None,
    texts: dict[int, list[str]] | None = None,
    zsre_score: bool = False,
):
    """``(per_case, summary, ci, n)`` from the metric states (case indices refer to ``requests``)."""
    table = _prompt_table(scores)
    gen_by_case = {}
    if gen is not None:
        for c, f, s in zip(gen["case"].tolist(), gen["fluency"].tolist(), gen["consistency"].tolist()):
            gen_by_case[int(c)] = (f, s)
    per_case, case_metrics = [], []
    for ci_, req in enumerate(requests):
        prompts = table.get(ci_, {})
        if kind == "counterfact":
            m = counterfact_case_metrics(prompts)
            f, s = gen_by_case.get(ci_, (math.nan, math.nan))
            m["fluency"], m["consistency"] = f, s
        else:
            m = zsre_case_metrics(prompts)
        case_metrics.append(m)
        row: dict[str, Any] = {"case_id": req.case_id}
        row.update({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()})
        for k, kname in enumerate(KINDS):
            texts_k = _prompt_texts(req, kname, kind)
            rows = []
            for p in sorted(prompts.get(k, {})):
                d = dict(prompts[k][p])
                d = {"prompt": texts_k[p] if p < len(texts_k) else None, **d}
                if kind == "counterfact":
                    for w in ("new", "true"):
                        if f"nll_{w}" in d:
                            d[f"p_{w}"] = math.exp(-d[f"nll_{w}"])
                        d.pop(f"n_correct_{w}", None)
                        d.pop(f"n_tok_{w}", None)
                else:
                    d = {"prompt": d["prompt"], "n_correct": d.get("n_correct_new"), "n_tok": d.get("n_tok_new")}
                rows.append(d)
            row[kname] = rows
        if texts and ci_ in texts:
            row["generations"] = texts[ci_]
        per_case.append(row)
    names = COUNTERFACT_METRICS if kind == "counterfact" else ZSRE_METRICS
    summary, ci, n = summarize(case_metrics, names, kind, zsre_score)
    return per_case, summary, ci, n


def _prompt_texts(req, kname: str, kind: str) -> list[str]:
    if kname == "rewrite":
        return [req.filled_prompt]
    if kname == "paraphrase":
        return list(req.paraphrase_prompts)
    if kind == "zsre":
        return [f"{req.loc}?"] if req.loc else []
    return list(req.neighborhood_prompts)
