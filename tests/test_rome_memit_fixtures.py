"""Numerical equivalence with the official ROME/MEMIT code on the shared fixtures (../shared/fixtures).

Same model, requests, context templates, statistics and hparams as the reference run; compare step counts
first, then intermediates in pipeline order and the deltas: relative Frobenius error <= 1e-3 (the fixtures'
README). SmolLM2 runs in the slow suite; the tiny GPT-2 (Conv1D orientation) runs in CI.
"""
from __future__ import annotations

import pytest
import torch

from massedit.core.adapters import get_adapter
from massedit.core.tokenization import prepare_tokenizer
from massedit.data.requests import load_requests
from massedit.editing.context_templates import load_context_templates
from massedit.editing.hparams import load_hparams_file
from massedit.editing.memit import apply_memit, memit_solve, spread_residual
from massedit.editing.rome import apply_rome, rank_one_update
from massedit.testing import reference_stats_provider

TOL = 1e-3


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


def _load(fx, method):
    from safetensors.torch import load_file

    return (load_requests(fx / "requests.json", fmt="counterfact"), load_hparams_file(fx / f"hparams_{method}.json"),
            load_context_templates(fx / f"context_templates_{method}.json"),
            torch.load(fx / f"{method}_intermediates.pt", weights_only=True), load_file(fx / f"{method}_expected.safetensors"))


def _tiny_gpt2(fx):
    """The model, and the tokenizer as the fixture's runner built it: a transformers-4.46.3
    ``PreTrainedTokenizerFast(tokenizer_file=...)``, whose default ``model_input_names`` include
    ``token_type_ids``. The reference calls ``model(**tok(...))`` for keys, k0/o0 and the v*/z rows, so its
    GPT-2 added ``wte(0)`` at every position there (not in ``layer_stats``, the template sampler or the
    runner's metrics, which pass ids only). transformers 5 tokenizers no longer emit them by default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(fx, dtype=torch.float32).eval().requires_grad_(False)
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(fx))
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    return model, tok


def check_memit(model, tok, fx, n_requests=None):
    reqs, hp, groups, ref, expected = _load(fx, "memit")
    C = reference_stats_provider(fx / "stats")(model, tok, hp.layers)
    deltas, info = apply_memit(model, tok, reqs, hp, groups, C, progress=False)
    inter = info["batches"][0]
    for ours, theirs in zip(inter["requests"], ref["requests"], strict=True):  # step counts first (early-stop divergence)
        assert ours["n_adam_steps"] == theirs["n_adam_steps"], f"early-stop divergence for case {theirs['case_id']}"
    for ours, theirs in zip(inter["requests"], ref["requests"], strict=True):
        assert rel(ours["z"], theirs["z"]) <= TOL, theirs["case_id"]
    for ours, theirs in zip(inter["per_layer"], ref["per_layer"], strict=True):
        for k in ("K", "H", "A", "E_l"):
            assert rel(ours[k], theirs[k]) <= TOL, (theirs["layer"], k)
    assert set(deltas) == set(expected)
    for k in expected:
        assert deltas[k].shape == expected[k].shape
        assert rel(deltas[k], expected[k]) <= TOL, k


# ------------------------------------------------------------------------------------- tiny GPT-2 (CI)
def test_tiny_gpt2_update_arithmetic_conv1d(shared_dir):
    """The update formulas and the Conv1D orientation against the reference's own factors."""
    fx = shared_dir / "fixtures" / "tiny_gpt2"
    model, tok = _tiny_gpt2(fx)
    a = get_adapter(model)
    _, hp, _, ref, expected = _load(fx, "rome")
    total = sum(rank_one_update(r["u"], r["right_vector"]) for r in ref["requests"])  # [d, m]
    name = a.rewrite_weight_name(hp.layers[0])
    assert tuple(a.to_param_layout(total).shape) == tuple(expected[name].shape) == (256, 64)
    assert rel(a.to_param_layout(total), expected[name]) <= TOL
    _, hp, _, ref, expected = _load(fx, "memit")
    C = reference_stats_provider(fx / "stats")(model, tok, hp.layers)
    for p in ref["per_layer"]:
        A = memit_solve(p["K"], C[p["layer"]], hp.mom2_update_weight)
        assert rel(A, p["A"]) <= TOL
        E_l = spread_residual(p["E"], p["i"], len(hp.layers))
        assert rel(E_l, p["E_l"]) <= TOL
        assert rel(a.to_param_layout(E_l @ A.T).float(), expected[p["weight_name"]]) <= TOL


def _activations_match(model, tok, fx) -> float:
    from massedit.editing.keys import bare_prompt_io

    reqs, hp, _, ref, _ = _load(fx, "rome")
    k0, _ = bare_prompt_io(model, tok, get_adapter(model).rewrite_name(hp.layers[0]), reqs[:1])
    return rel(k0[0], ref["requests"][0]["k0"])


def test_tiny_gpt2_memit_pipeline(shared_dir):
    fx = shared_dir / "fixtures" / "tiny_gpt2"
    model, tok = _tiny_gpt2(fx)
    assert _activations_match(model, tok, fx) <= TOL  # bare-prompt k0 before any editing (token_type_ids convention)
    check_memit(model, tok, fx)


def test_tiny_gpt2_rome_matches_reference(shared_dir):
    """Sequential ROME on the 4 requests (Conv1D): step counts, every intermediate, the total delta."""
    fx = shared_dir / "fixtures" / "tiny_gpt2"
    model, tok = _tiny_gpt2(fx)
    reqs, hp, templates, ref, expected = _load(fx, "rome")
    C = reference_stats_provider(fx / "stats")(model, tok, hp.layers)
    deltas, inters = apply_rome(model, tok, reqs, hp, templates, C, progress=False)
    for ours, theirs in zip(inters, ref["requests"], strict=True):
        assert ours["n_adam_steps"] == theirs["n_adam_steps"], f"early-stop divergence for case {theirs['case_id']}"
    for ours, theirs in zip(inters, ref["requests"], strict=True):
        for k in ("k_star", "u", "v0", "v_star", "k0", "o0", "right_vector"):
            assert rel(ours[k], theirs[k]) <= TOL, (theirs["case_id"], k)
    assert set(deltas) == set(expected)
    for k in expected:
        assert rel(deltas[k], expected[k]) <= TOL, k


# ------------------------------------------------------------------------------------- SmolLM2 (slow)
@pytest.mark.slow
def test_smollm2_memit_matches_reference(shared_dir, smollm2):
    torch.set_num_threads(2)
    model, tok = smollm2
    check_memit(model, tok, shared_dir / "fixtures" / "smollm2")


@pytest.mark.slow
def test_smollm2_rome_first_request_matches_reference(shared_dir, smollm2):
    """ROME on the first request (the later ones are sequential on top of it): every intermediate and
    the rank-one update u r^T against the reference's factors."""
    torch.set_num_threads(2)
    model, tok = smollm2
    fx = shared_dir / "fixtures" / "smollm2"
    reqs, hp, templates, ref, _ = _load(fx, "rome")
    C = reference_stats_provider(fx / "stats")(model, tok, hp.layers)
    deltas, inters = apply_rome(model, tok, reqs[:1], hp, templates, C, progress=False)
    ours, theirs = inters[0], ref["requests"][0]
    assert ours["n_adam_steps"] == theirs["n_adam_steps"]
    assert ours["input_ids"] == theirs["input_ids"] and ours["lookup_idxs"] == theirs["lookup_idxs"]
    for k in ("k_star", "u", "v0", "v_star", "k0", "o0", "right_vector"):
        assert rel(ours[k], theirs[k]) <= TOL, k
    name = get_adapter(model).rewrite_weight_name(hp.layers[0])
    assert rel(deltas[name], rank_one_update(theirs["u"], theirs["right_vector"])) <= TOL


# ------------------------------------------------------------------------------------- context templates
def test_tiny_gpt2_context_templates_reproduced(shared_dir):
    """The seeded reference sampler reproduces the fixtures' templates exactly (torch.manual_seed(0))."""
    import json

    from massedit.editing.context_templates import sample_memit_templates, sample_rome_templates

    fx = shared_dir / "fixtures" / "tiny_gpt2"
    model, tok = _tiny_gpt2(fx)
    assert sample_rome_templates(model, tok, [[5, 10], [10, 10]], seed=0) == json.loads(
        (fx / "context_templates_rome.json").read_text())
    assert sample_memit_templates(model, tok, seed=0) == json.loads((fx / "context_templates_memit.json").read_text())


@pytest.mark.slow
def test_smollm2_memit_context_templates_reproduced(shared_dir, smollm2):
    import json

    from massedit.editing.context_templates import sample_memit_templates

    model, tok = smollm2
    fx = shared_dir / "fixtures" / "smollm2"
    assert sample_memit_templates(model, tok, seed=0) == json.loads((fx / "context_templates_memit.json").read_text())


def test_optimisation_rows_match_reference_tokens(shared_dir):
    """Rows (rewriting prompts + KL prompt), subject indices and target ids equal the reference's, for both
    teacher-forcing modes, both methods and both fixtures (116 rows each)."""
    from transformers import AutoTokenizer

    from massedit.editing.context_templates import flatten
    from massedit.editing.targets import build_target_problem

    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(shared_dir / "fixtures" / "tiny_gpt2"))  # the SmolLM2 tokenizer
    for name in ("tiny_gpt2", "smollm2"):
        fx = shared_dir / "fixtures" / name
        for method in ("rome", "memit"):
            reqs, _, templates, ref, _ = _load(fx, method)
            for teacher_forcing in ("ids", "string"):
                for r, theirs in zip(reqs, ref["requests"], strict=True):
                    p = build_target_problem(tok, r, flatten(templates), teacher_forcing=teacher_forcing)
                    assert p.input_ids == theirs["input_ids"], (name, method, teacher_forcing, r.case_id)
                    assert p.lookup_idxs == theirs["lookup_idxs"]
                    assert p.target_ids == theirs["target_ids"]
