"""Reference equivalence on SmolLM2-135M: per-prompt NLLs and ES/PS/NS of the official runner (fixtures)."""
from __future__ import annotations

import json

import pytest

from massedit.core.deltas import deltas_applied, load_deltas
from massedit.data.requests import load_requests
from massedit.tasks.evaluate import evaluate

from test_eval_model import QUIET, _compare_to_reference


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rome", "memit"])
def test_smollm2_pre_and_post_match_reference_runner(smollm2, shared_dir, method):
    model, tok = smollm2
    fx = shared_dir / "fixtures" / "smollm2"
    metrics = json.loads((fx / f"metrics_{method}.json").read_text())
    reqs = load_requests(fx / "requests.json")
    pre = evaluate(model, tok, reqs, {"generation": False}, stage="pre", trainer_cfg=QUIET)
    # reference runner: transformers 4.46.3; NLLs agree to float32 rounding
    _compare_to_reference(pre, metrics["per_request_pre"], metrics["pre"], atol=2e-4)
    assert pre.summary["score"] == pytest.approx(100 * metrics["pre"]["score"], abs=1e-6)
    # the reference edit's deltas applied: post-edit numbers of the runner
    with deltas_applied(model, load_deltas(fx / f"{method}_expected.safetensors")):
        post = evaluate(model, tok, reqs, {"generation": False}, stage="post", trainer_cfg=QUIET)
    _compare_to_reference(post, metrics["per_request_post"], metrics["post"], atol=2e-3)
    assert post.summary["score"] == pytest.approx(100 * metrics["post"]["score"], abs=1e-6)
