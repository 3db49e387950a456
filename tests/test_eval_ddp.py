"""2-process CPU DDP evaluation (Lightning devices=2, strategy=ddp, gloo) gives exactly the 1-process numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from massedit.core.deltas import deltas_applied, load_deltas, save_deltas
from massedit.data.requests import load_requests
from massedit.evaluation.report import write_report
from massedit.tasks.evaluate import evaluate
from massedit.testing import tiny_model

from test_eval_model import QUIET, _cf_requests

REPO = Path(__file__).resolve().parents[1]


def _close(a, b, rel=1e-5, abs_=1e-7) -> bool:
    """Same structure, same strings/bools/None, floats equal to rounding."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], rel, abs_) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, rel, abs_) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return b == pytest.approx(a, rel=rel, abs=abs_)
    return a == b


@pytest.mark.slow
def test_ddp_two_processes_equal_one(tmp_path):
    from massedit.core.adapters import get_adapter

    model, tok = tiny_model("gpt2", seed=11)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    # 2 CounterFact-style cases -> odd number of batches, so the DistributedSampler pads with a duplicate
    rows = [{"case_id": r.case_id, "subject": r.subject, "prompt": r.prompt, "target": r.target_new,
             "target_true": r.target_true, "paraphrase_prompts": r.paraphrase_prompts,
             "neighborhood_prompts": r.neighborhood_prompts} for r in _cf_requests()]
    rows.append({**rows[0], "case_id": 20, "subject": "Michael Jordan", "prompt": "{} plays", "target": "soccer", "target_true": "basketball"})
    (tmp_path / "r.json").write_text(json.dumps(rows))
    name = get_adapter(model).rewrite_weight_name(2)
    torch.manual_seed(0)
    save_deltas(tmp_path / "d.safetensors", {name: torch.randn_like(dict(model.named_parameters())[name]) * 0.5})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "massedit", "eval", "model=hf", f"model.name_or_path={tmp_path / 'm'}", f"data.path={tmp_path / 'r.json'}",
           "data=counterfact", "data.format=user", "data.num_edits=null", "logger=none", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
           "trainer.enable_progress_bar=false", f"output_dir={tmp_path / 'out'}", f"deltas={tmp_path / 'd.safetensors'}",
           "edit_guard.max_relative_norm=null",  # a random delta ~70x the tiny model's weight
           "eval.batch_size=2", "eval.generation=false"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ddp = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert ddp["info"]["post"]["world_size"] == 2
    # the same in this process (1 device)
    reqs = load_requests(tmp_path / "r.json", fmt="user")
    cfg = {"batch_size": 2, "generation": False}
    pre = evaluate(model, tok, reqs, cfg, stage="pre", trainer_cfg=QUIET)
    with deltas_applied(model, load_deltas(tmp_path / "d.safetensors")):
        post = evaluate(model, tok, reqs, cfg, stage="post", trainer_cfg=QUIET)
    write_report(pre, post, tmp_path / "one")
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    # identical up to float rounding (this process may use another thread count than the DDP workers)
    assert _close(one["metrics"], ddp["metrics"])
    a = [json.loads(x) for x in (tmp_path / "one" / "per_case.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "out" / "per_case.jsonl").read_text().splitlines()]
    assert _close(a, b)
    # success flags are exactly equal
    assert [c["post"]["neighborhood_success"] for c in a] == [c["post"]["neighborhood_success"] for c in b]
    assert one["metrics"]["efficacy_success"]["pre"] is not None


@pytest.mark.slow
def test_ddp_generation_texts_gathered(tmp_path):
    """Generation cases split over 2 ranks: texts and fluency of every case come back on rank 0."""
    model, tok = tiny_model("gpt2", seed=12)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rows = [{"case_id": r.case_id, "requested_rewrite": {"prompt": r.prompt, "subject": r.subject,
             "target_new": {"str": r.target_new, "id": "Q1"}, "target_true": {"str": r.target_true, "id": "Q2"}, "relation_id": "P1"},
             "paraphrase_prompts": r.paraphrase_prompts, "neighborhood_prompts": r.neighborhood_prompts,
             "generation_prompts": r.generation_prompts} for r in _cf_requests()]
    (tmp_path / "r.json").write_text(json.dumps(rows))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    common = [sys.executable, "-m", "massedit", "eval", "model=hf", f"model.name_or_path={tmp_path / 'm'}", f"data.path={tmp_path / 'r.json'}",
              "data=counterfact", "data.num_edits=null", "logger=none", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
              "eval.generation_every_k=1", "eval.max_gen_len=20"]
    p = subprocess.run(common + ["trainer.devices=2", "trainer.strategy=ddp", f"output_dir={tmp_path / 'ddp'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    reqs = load_requests(tmp_path / "r.json")
    one = evaluate(model, tok, reqs, {"generation_every_k": 1, "max_gen_len": 20}, stage="pre", trainer_cfg=QUIET)
    b = [json.loads(x)["pre"] for x in (tmp_path / "ddp" / "per_case.jsonl").read_text().splitlines()]
    assert [c["generations"] for c in b] == [c["generations"] for c in one.per_case]
    assert [c["fluency"] for c in b] == pytest.approx([c["fluency"] for c in one.per_case])
