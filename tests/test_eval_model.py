"""Evaluation on tiny models: probabilities vs a direct per-prompt computation, zsRE token accuracy, the
sampler, reports (files, CSV and W&B loggers) and evaluation-only mode with a delta file."""
from __future__ import annotations

import json
import math

import pytest
import torch

from massedit.core.tokenization import encode, target_token_ids
from massedit.data.requests import EditRequest, load_requests
from massedit.evaluation.report import write_report
from massedit.tasks.evaluate import evaluate
from massedit.core.sampling import generate_fast, generate_fast_grouped, generate_fast_ids, generate_fast_ids_grouped
from massedit.trainer import TrainerConfig
from massedit.testing import tiny_model

QUIET = TrainerConfig(enable_progress_bar=False)


def _cf_requests():
    return [
        EditRequest(case_id=0, subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English",
                    target_true="French", paraphrase_prompts=["Danielle Darrieux was born in Bordeaux. Danielle Darrieux speaks"],
                    neighborhood_prompts=["Thomas Joannes Stieltjes is a native speaker of", "The mother tongue of Michael Jordan is"],
                    neighborhood_targets=["French", "French"],
                    generation_prompts=["Danielle Darrieux's mother tongue is", "Where Danielle Darrieux is from, people speak the language of"]),
        EditRequest(case_id=10, subject="Windows Server 2003", prompt="{} is a product of", target_new="Apple A5 chip",
                    target_true="Microsoft", paraphrase_prompts=["Windows Server 2003 was created by"],
                    neighborhood_prompts=["Apple A5 was created by"], neighborhood_targets=["Apple"],
                    generation_prompts=["Windows Server 2003 is sold by"]),
    ]


@torch.no_grad()
def _direct_nll(model, tok, prompt, target):
    """Reference formula written out for one prompt: ids of f"{prompt} {target}", ℓ_x from the prompt alone."""
    y = target_token_ids(tok, target)
    ids = encode(tok, f"{prompt} {target}")
    ell = len(encode(tok, prompt))
    logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    nll = -sum(logp[ell + j - 1, t].item() for j, t in enumerate(y)) / len(y)
    correct = all(logp[ell + j - 1].argmax().item() == t for j, t in enumerate(y))
    return nll, correct


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # byte-level BPE and SentencePiece-with-BOS tokenizers
@pytest.mark.parametrize("scoring,row_tokens", [("auto", 128), ("auto", 12), ("plain", 128)])
def test_counterfact_probabilities_match_direct_computation(family, scoring, row_tokens):
    """Every per-prompt NLL equals a direct one-sequence forward: prefix-tree rows (shared prefixes across prompts,
    e.g. "The mother tongue of"; rows split at a 12-token budget) and the plain one-row-per-branch path."""
    model, tok = tiny_model(family, seed=1)
    reqs = _cf_requests()
    res = evaluate(model, tok, reqs, {"generation": False, "scoring": scoring, "batch_size": 3, "row_tokens": row_tokens},
                   stage="pre", trainer_cfg=QUIET)
    assert res.kind == "counterfact" and res.n_cases == 2
    if scoring == "auto":
        assert res.info["scoring"]["packed"] is True
    per_case_es = []
    for req, case in zip(reqs, res.per_case, strict=True):
        assert case["case_id"] == req.case_id
        for kname, prompts, trues in (("rewrite", [req.filled_prompt], [req.target_true]),
                                      ("paraphrase", req.paraphrase_prompts, [req.target_true] * len(req.paraphrase_prompts)),
                                      ("neighborhood", req.neighborhood_prompts, req.neighborhood_targets)):
            assert len(case[kname]) == len(prompts)
            for row, prompt, true in zip(case[kname], prompts, trues, strict=True):
                assert row["prompt"] == prompt
                nll_new, ok_new = _direct_nll(model, tok, prompt, req.target_new)
                nll_true, ok_true = _direct_nll(model, tok, prompt, true)
                assert row["nll_new"] == pytest.approx(nll_new, abs=2e-5)
                assert row["nll_true"] == pytest.approx(nll_true, abs=2e-5)
                assert row["p_new"] == pytest.approx(math.exp(-nll_new), rel=1e-4)
                assert row["correct_new"] == ok_new and row["correct_true"] == ok_true
        nll_new, _ = _direct_nll(model, tok, req.filled_prompt, req.target_new)
        nll_true, _ = _direct_nll(model, tok, req.filled_prompt, req.target_true)
        per_case_es.append(float(nll_true > nll_new))
        assert case["efficacy_success"] == per_case_es[-1]
    assert res.summary["efficacy_success"] == pytest.approx(100 * sum(per_case_es) / 2)
    assert res.summary["fluency"] is None and res.summary["consistency"] is None


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_zsre_token_accuracy_matches_direct(family):
    model, tok = tiny_model(family, seed=2)
    req = EditRequest(case_id=5, subject="UniFirst", prompt="What is the product made by {}?", target_new="uniform Apple",
                      paraphrase_prompts=["Which product does UniFirst make?"], loc="nq question: who sang nice day for a white wedding",
                      loc_ans="Billy Idol")
    res = evaluate(model, tok, [req], {"dataset": "auto"}, trainer_cfg=QUIET)
    assert res.kind == "zsre"

    @torch.no_grad()
    def direct(prompt, target):
        y = target_token_ids(tok, target)
        p = encode(tok, prompt)
        ok = 0
        for i in range(len(y)):
            logits = model(input_ids=torch.tensor([p + y[:i]])).logits[0, -1]
            ok += int(logits.argmax().item() == y[i])
        return ok, len(y)

    case = res.per_case[0]
    for key, prompt, target in (("efficacy_acc", req.filled_prompt, req.target_new),
                                ("paraphrase_acc", req.paraphrase_prompts[0], req.target_new),
                                ("neighborhood_acc", req.loc + "?", req.loc_ans)):
        ok, n = direct(prompt, target)
        assert case[key] == pytest.approx(ok / n)
    assert set(res.summary) == {"score", "efficacy_acc", "paraphrase_acc", "neighborhood_acc"}


def test_generation_sampler_seeded_and_ragged():
    model, tok = tiny_model("gpt2", seed=3)
    prompts = ["The Eiffel Tower is located in the city of", "Paris"]
    g = lambda: torch.Generator().manual_seed(7)
    a = generate_fast(model, tok, prompts, max_out_len=20, generator=g())
    b = generate_fast(model, tok, prompts, max_out_len=20, generator=g())
    assert a == b
    assert a[0].startswith(prompts[0]) and a[1].startswith(prompts[1])  # longer prompt kept intact
    c = generate_fast(model, tok, prompts, max_out_len=20, generator=torch.Generator().manual_seed(8))
    assert c != a


def test_grouped_generation_equals_lone_calls():
    """Each group of a batched call is sampled exactly as alone: its own stream, drawn from its own shortest
    prompt on (here the groups start decoding at different columns), in float64 so rounding cannot flip a draw."""
    model, tok = tiny_model("gpt2", seed=3)
    model = model.double()
    groups = [["The Eiffel Tower is located in the city of", "Paris"],
              ["Danielle Darrieux's mother tongue is", "Toko Yasuda plays the", "The capital of"],
              ["Michael Jordan professionally plays the sport of basketball and"]]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    lone = [generate_fast(model, tok, g, max_out_len=24, generator=gen) for g, gen in zip(groups, gens())]
    assert generate_fast_grouped(model, tok, groups, max_out_len=24, generators=gens()) == lone
    # a group whose longest prompt reaches max_out_len is returned unchanged, as alone, and draws nothing
    ids = [[[5, 6, 7, 8, 9, 10]], [[11, 12]], [[13, 14, 15]]]
    lone = [generate_fast_ids(model, g, pad_id=0, max_out_len=6, generator=gen) for g, gen in zip(ids, gens())]
    got = generate_fast_ids_grouped(model, ids, pad_id=0, max_out_len=6, generators=gens())
    assert got == lone and got[0] == ids[0] and all(len(r) == 6 for g in got[1:] for r in g)
    with pytest.raises(ValueError, match="2 generators"):
        generate_fast_ids_grouped(model, ids, pad_id=0, generators=gens()[:2])


def test_generation_batch_cases_does_not_change_the_texts():
    model, tok = tiny_model("gpt2", seed=4)
    model = model.double()
    reqs = _cf_requests()
    cfg = {"generation": True, "generation_every_k": 1, "max_gen_len": 24, "seed": 3, "scoring": "plain"}
    one = evaluate(model, tok, reqs, {**cfg, "generation_batch_cases": 1}, stage="pre", trainer_cfg=QUIET)
    many = evaluate(model, tok, reqs, {**cfg, "generation_batch_cases": 4}, stage="pre", trainer_cfg=QUIET)
    assert [c["generations"] for c in one.per_case] == [c["generations"] for c in many.per_case]
    assert one.summary["fluency"] == many.summary["fluency"]
    with pytest.raises(Exception, match="generation_batch_cases"):
        evaluate(model, tok, reqs, {**cfg, "generation_batch_cases": 0}, stage="pre", trainer_cfg=QUIET)


def test_generation_metrics_and_report(tmp_path):
    model, tok = tiny_model("gpt2", seed=4)
    reqs = _cf_requests()
    cfg = {"generation": True, "generation_every_k": 10, "max_gen_len": 24, "seed": 3}
    pre = evaluate(model, tok, reqs, cfg, stage="pre", trainer_cfg=QUIET)
    # case 0 and case 10 are multiples of 10 -> both generated
    assert pre.info["n_generation_cases"] == 2
    assert all(c["fluency"] is not None and len(c["generations"]) == len(r.generation_prompts) for c, r in zip(pre.per_case, reqs, strict=True))
    assert pre.summary["fluency"] > 0 and pre.summary["consistency"] is None
    again = evaluate(model, tok, reqs, cfg, stage="post", trainer_cfg=QUIET)
    assert again.per_case[0]["generations"] == pre.per_case[0]["generations"]  # seeded
    md = write_report(pre, again, tmp_path, title="tiny")
    assert "| Consistency (RS) | not computed | not computed |" in md
    assert "Efficacy success (ES)" in md and "| Metric | Pre | Post |" in md
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["metrics_version"] and s["metrics"]["consistency"]["post"] is None
    assert s["metrics"]["efficacy_success"]["pre"] == pytest.approx(pre.summary["efficacy_success"])
    assert set(s["metrics"]["fluency"]["ci"]) == {"pre", "post"}
    rows = [json.loads(line) for line in (tmp_path / "per_case.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in rows] == [0, 10] and "rewrite" in rows[0]["pre"] and "post" in rows[0]


def test_report_with_csv_and_wandb_loggers(tmp_path, monkeypatch):
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    from massedit.evaluation.report import summary_dict
    from massedit.tasks.runs import Run

    model, tok = tiny_model("gpt2", seed=5)
    res = evaluate(model, tok, _cf_requests(), {"generation": False}, trainer_cfg=QUIET)
    csv = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    write_report(None, res, tmp_path / "a")
    Run(config=None, dir=tmp_path / "a", logger=csv).log_evaluation(None, res, summary_dict(None, res))
    text = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "eval/post/efficacy_success" in text
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wb = WandbLogger(project="massedit-test", save_dir=str(tmp_path), mode="offline")
    Run(config=None, dir=tmp_path / "b", logger=wb).log_evaluation(res, res, summary_dict(res, res))
    assert wb.experiment.summary["eval/post/efficacy_success"] == pytest.approx(res.summary["efficacy_success"])
    wb.experiment.finish()


def test_bad_request_names_case():
    from massedit.data.requests import RequestValidationError

    model, tok = tiny_model("gpt2")
    bad = EditRequest(case_id=77, subject="X", prompt="{} is", target_new="Y", target_true="Z",
                      neighborhood_prompts=["a", "b"], neighborhood_targets=["c"])
    with pytest.raises(RequestValidationError, match="case_id=77"):
        evaluate(model, tok, [bad], {"generation": False}, trainer_cfg=QUIET)


def test_eval_job_with_deltas(tmp_path):
    from massedit.core.adapters import get_adapter
    from massedit.core.deltas import save_deltas
    from massedit.tasks.config import compose
    from massedit.tasks.edit import edit_job

    model, tok = tiny_model("gpt2", seed=6)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    reqs = [r.to_dict() for r in _cf_requests()]
    (tmp_path / "r.json").write_text(json.dumps([{"subject": r["subject"], "prompt": r["prompt"], "target": r["target_new"],
                                                  "target_true": r["target_true"], "case_id": r["case_id"],
                                                  "paraphrase_prompts": r["paraphrase_prompts"],
                                                  "neighborhood_prompts": r["neighborhood_prompts"]} for r in reqs]))
    name = get_adapter(model).rewrite_weight_name(1)
    w = dict(model.named_parameters())[name]
    save_deltas(tmp_path / "d.safetensors", {name: torch.randn_like(w) * 0.5})
    job = compose("eval", ["model=hf", f"model.name_or_path={tmp_path / 'm'}", "data=user", f"data.path={tmp_path / 'r.json'}",
                           "eval.generation=false", f"deltas={tmp_path / 'd.safetensors'}", f"output_dir={tmp_path / 'out'}",
                           "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "logger=none",
                           "edit_guard.max_relative_norm=null"])  # a random delta 70x the tiny model's weight
    out = edit_job(job)
    pre, post = out["pre"], out["post"]
    assert pre.stage == "pre" and post.stage == "post"
    assert pre.per_case[0]["rewrite"][0]["nll_new"] != pytest.approx(post.per_case[0]["rewrite"][0]["nll_new"], abs=1e-6)
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["metrics"]["efficacy_success"]["pre"] is not None and s["metrics"]["efficacy_success"]["post"] is not None


def test_tiny_gpt2_fixture_pre_nlls(shared_dir):
    """The reference runner's per-prompt NLLs on the tiny GPT-2 fixture (SmolLM2 tokenizer), pre-edit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from massedit.core.tokenization import prepare_tokenizer

    fx = shared_dir / "fixtures" / "tiny_gpt2"
    metrics = json.loads((fx / "metrics_rome.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(fx, dtype=torch.float32).eval()
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(fx))
    reqs = load_requests(fx / "requests.json")
    res = evaluate(model, tok, reqs, {"generation": False}, trainer_cfg=QUIET)
    _compare_to_reference(res, metrics["per_request_pre"], metrics["pre"], atol=1e-4)


def _compare_to_reference(res, per_request, summary, atol):
    for ref, case in zip(per_request, res.per_case, strict=True):
        assert ref["case_id"] == case["case_id"]
        for kind in ("rewrite", "paraphrase", "neighborhood"):
            assert len(ref[kind]) == len(case[kind])
            for r, c in zip(ref[kind], case[kind], strict=True):
                assert r["prompt"] == c["prompt"]
                assert c["nll_new"] == pytest.approx(r["nll_new"], abs=atol)
                assert c["nll_true"] == pytest.approx(r["nll_true"], abs=atol)
    for key, name in (("rewrite", "efficacy"), ("paraphrase", "paraphrase"), ("neighborhood", "neighborhood")):
        assert res.summary[f"{name}_success"] == pytest.approx(100 * summary[key]["success"], abs=1e-6)
        assert res.summary[f"{name}_magnitude"] == pytest.approx(100 * summary[key]["magnitude"], abs=1e-3)


def test_consistency_computed_only_with_snippets(tmp_path):
    model, tok = tiny_model("gpt2", seed=8)
    reqs = _cf_requests()
    reqs[0].relation_id, reqs[0].target_new_id = "P103", "Q1860"
    reqs[1].relation_id, reqs[1].target_new_id = "P176", "Q312"
    snippets = [{"relation_id": "P103", "target_id": "Q1860",
                 "samples": [{"name": "A", "text": "Danielle speaks English in London."}, {"name": "B", "text": "English is spoken."}]},
                {"relation_id": "P176", "target_id": "Q1", "samples": [{"name": "C", "text": "unrelated"}]}]
    (tmp_path / "snip.json").write_text(json.dumps(snippets))
    cfg = {"generation_every_k": 1, "max_gen_len": 24, "consistency": {"attribute_snippets": str(tmp_path / "snip.json")}}
    res = evaluate(model, tok, reqs, cfg, trainer_cfg=QUIET)
    c0, c1 = res.per_case
    assert c0["consistency"] is not None and 0.0 <= c0["consistency"] <= 1.0
    assert c1["consistency"] is None  # no snippets for (P176, Q312)
    assert res.summary["consistency"] == pytest.approx(100 * c0["consistency"]) and res.n["consistency"] == 1
    assert res.info["consistency"] == "computed"
    with pytest.raises(FileNotFoundError, match="attribute_snippets"):
        evaluate(model, tok, reqs, {"consistency": {"attribute_snippets": str(tmp_path / "missing.json")}}, trainer_cfg=QUIET)
