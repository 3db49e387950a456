"""ROME on tiny random models of every family: the edit works, only the rewrite weight changes, the
model is left exactly as found, and delta files round-trip (apply / revert bit-identical)."""
import pytest
import torch

from massedit.core.adapters import get_adapter
from massedit.core.deltas import apply_deltas, load_deltas, revert_deltas, save_deltas
from massedit.core.tokenization import target_token_ids
from massedit.data.requests import EditRequest
from massedit.editing.hparams import EditHparams
from massedit.testing import corpus_second_moments
from massedit.editing.rome import RomeEditor, apply_rome, left_vector, rank_one_update, right_vector
from massedit.testing import _CORPUS, FAMILIES, rome_direction_error, tiny_model

TEXTS = [s.strip() + "." for s in _CORPUS.split(".") if s.strip()]
TEMPLATES = ["{}", "The city. {}", "I think that. {}"]
# Random tiny models barely route information from earlier tokens to the last one, so the subject ends the
# prompt here (the edit then acts on the predicting position directly); the mechanics are what is tested.
REQ = EditRequest(case_id=1, subject="Japan", prompt="The capital of {}", target_new="Rome", target_true="Tokyo")


def rome_hp(layer):
    # no weight decay and a wide clamp: v0 of a random 0.02-init model is tiny, the paper's wd/clamp pin δ to ~0
    return EditHparams(layers=[layer], v_num_grad_steps=20, v_lr=0.5, clamp_norm_factor=1000.0, v_weight_decay=0.0,
                       kl_factor=0.0625)


def next_token_argmax(model, tok, text):
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        return int(model(**ids).logits[0, -1].argmax())


def anisotropic_C(m: int, seed: int = 0) -> torch.Tensor:
    """A well-conditioned second moment that is far from any multiple of I (eigenvalues spread over ~30x)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(8 * m, m, generator=g) * torch.linspace(0.3, 1.7, m)
    return X.T @ X / (8 * m)


def test_rank_one_algebra():
    torch.manual_seed(0)
    C = anisotropic_C(6)
    k_star, k0 = torch.randn(6), torch.randn(6)
    u = left_vector(k_star, torch.inverse(C))
    expected = torch.linalg.solve(C.double(), k_star.double())
    expected = (expected / expected.norm()).float()
    assert torch.allclose(u, expected, atol=1e-5)  # u = C⁻¹k*/‖C⁻¹k*‖ ...
    assert float(torch.dot(u, k_star / k_star.norm())) < 0.95  # ... which C makes different from k*/‖k*‖
    assert torch.allclose(left_vector(k_star, None), k_star / k_star.norm())  # mom2_adjustment=False
    W = torch.randn(4, 6)
    v_star = torch.randn(4)
    r = right_vector(v_star, W @ k0, u, k0)
    dW = rank_one_update(u, r)
    assert torch.allclose((W + dW) @ k0, v_star, atol=1e-5)  # bare key maps to v*
    assert rome_direction_error(dW, k_star, C) < 1e-5
    # keys with uᵀk = 0 (C⁻¹-orthogonal to k*) are left alone
    k_perp = torch.randn(6)
    k_perp = k_perp - torch.dot(k_perp, u) * u
    assert torch.allclose(dW @ k_perp, torch.zeros(4), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_rome_edits_argmax_and_touches_only_rewrite_weight(family):
    torch.set_num_threads(1)
    model, tok = tiny_model(family, seed=0)
    a = get_adapter(model)
    layer = 1
    C = corpus_second_moments(model, tok, [layer], TEXTS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = target_token_ids(tok, " " + REQ.target_new)[0]
    assert next_token_argmax(model, tok, REQ.filled_prompt) != target
    editor = RomeEditor(hparams=rome_hp(layer), stats=lambda m, t, l: C, context_templates=TEMPLATES,
                        progress=False)
    deltas = editor.edit(model, tok, [REQ])
    # model left exactly as found
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert set(deltas) == {a.rewrite_weight_name(layer)}
    assert deltas[a.rewrite_weight_name(layer)].shape == a.rewrite_weight(layer).shape
    # ΔW = r uᵀ with u ∝ C⁻¹k* (k* from the editor's intermediates; C⁻¹k* solved here): fails for u = k*
    k_star = editor.intermediates["requests"][0]["k_star"]
    err = rome_direction_error(a.from_param_layout(deltas[a.rewrite_weight_name(layer)]), k_star, C[layer])
    assert err < 1e-3, err
    backup = apply_deltas(model, deltas)
    try:
        assert next_token_argmax(model, tok, REQ.filled_prompt) == target
        for k, v in model.state_dict().items():
            if k != a.rewrite_weight_name(layer) and not (a.lm_head_tied and "embed" in k):
                assert torch.equal(v, before[k]), f"{k} changed"
    finally:
        revert_deltas(model, backup)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # update is rank one
    assert torch.linalg.matrix_rank(deltas[a.rewrite_weight_name(layer)].double(), rtol=1e-6) == 1


def test_rome_sequential_two_requests_and_delta_file(tmp_path):
    torch.set_num_threads(1)
    model, tok = tiny_model("gpt2", seed=1)
    layer = 2
    C = corpus_second_moments(model, tok, [layer], TEXTS)
    reqs = [REQ, EditRequest(case_id=2, subject="Michael Jordan", prompt="The sport of {}", target_new="guitar",
                        target_true="basketball")]
    deltas, inters = apply_rome(model, tok, reqs, rome_hp(layer), TEMPLATES, C, progress=False)
    assert len(inters) == 2 and all(i["n_adam_steps"] <= 19 for i in inters)
    name = get_adapter(model).rewrite_weight_name(layer)
    # sum of two rank-one updates (sequential): rank 2
    assert torch.linalg.matrix_rank(deltas[name].double(), rtol=1e-6) == 2
    path = save_deltas(tmp_path / "deltas.safetensors", deltas, {"method": "rome"})
    loaded = load_deltas(path)
    assert torch.equal(loaded[name], deltas[name].float())
    w0 = model.get_parameter(name).detach().clone()
    backup = apply_deltas(model, loaded)
    assert not torch.equal(model.get_parameter(name), w0)
    for r in reqs:
        t = target_token_ids(tok, " " + r.target_new)[0]
        assert next_token_argmax(model, tok, r.filled_prompt) == t
    revert_deltas(model, backup)
    assert torch.equal(model.get_parameter(name), w0)


def test_rome_on_the_last_layer():
    """The edited MLP sits inside the final block, both traced with stop=True: the trace must run the block to its
    end (it used to stop inside the MLP, leaving the final block's output unset)."""
    torch.set_num_threads(1)
    model, tok = tiny_model("gpt2", seed=0, n_layer=3)
    a = get_adapter(model)
    layer = a.num_layers - 1
    C = corpus_second_moments(model, tok, [layer], TEXTS)
    editor = RomeEditor(hparams=rome_hp(layer), stats=lambda m, t, l: C, context_templates=TEMPLATES, progress=False)
    deltas = editor.edit(model, tok, [REQ])
    assert set(deltas) == {a.rewrite_weight_name(layer)}
    backup = apply_deltas(model, deltas)
    try:
        assert next_token_argmax(model, tok, REQ.filled_prompt) == target_token_ids(tok, " " + REQ.target_new)[0]
    finally:
        revert_deltas(model, backup)
