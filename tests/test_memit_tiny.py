"""MEMIT on tiny random models of every family: a batch of edits lands, only the rewrite weights of the
layers in R change, the model is left as found, and the z cache makes a re-run skip the optimisation."""
import pytest
import torch

from massedit.core.adapters import get_adapter
from massedit.core.deltas import deltas_applied
from massedit.core.tokenization import target_token_ids
from massedit.data.requests import EditRequest
from massedit.editing.hparams import EditHparams
from massedit.editing.memit import MemitEditor, memit_layer_update, memit_solve
from massedit.editing.target_cache import TargetCache
from massedit.testing import corpus_second_moments
from massedit.testing import _CORPUS, FAMILIES, memit_normal_equation_error, tiny_model

TEXTS = [s.strip() + "." for s in _CORPUS.split(".") if s.strip()]
GROUPS = [["{}"], ["The city. {}", "I think that. {}"]]
# subject at the end of the prompt: random tiny models barely move information between positions
REQS = [
    EditRequest(case_id=1, subject="Japan", prompt="The capital of {}", target_new="Rome", target_true="Tokyo"),
    EditRequest(case_id=2, subject="Michael Jordan", prompt="The sport of {}", target_new="guitar", target_true="basketball"),
    EditRequest(case_id=3, subject="Apple A5", prompt="The maker of {}", target_new="BMW", target_true="Apple"),
]


LAM = 0.1  # mom2_update_weight


def memit_hp(layers, **kw):
    base = dict(layers=layers, v_num_grad_steps=20, v_lr=0.5, clamp_norm_factor=1000.0, v_weight_decay=0.0,
                kl_factor=0.0625, mom2_update_weight=LAM)
    base.update(kw)
    return EditHparams(**base)


def argmax_next(model, tok, text):
    with torch.no_grad():
        return int(model(**tok(text, return_tensors="pt")).logits[0, -1].argmax())


def test_solve_matches_closed_form():
    torch.manual_seed(0)
    m, d, n = 8, 5, 3
    X = torch.randn(50, m)
    C = X.T @ X / 50
    K, E = torch.randn(m, n), torch.randn(d, n)
    A = memit_solve(K, C, 2.0)
    assert torch.allclose(A, torch.inverse(2.0 * C.double() + K.double() @ K.double().T) @ K.double(), atol=1e-10)
    A2, E_l, upd = memit_layer_update(K, E, C, 2.0, 1, 3)
    assert torch.allclose(E_l, E.double() / 2) and torch.allclose(upd, E_l @ A2.T)


@pytest.mark.parametrize("family", FAMILIES)
def test_memit_batch_edits_and_leaves_model(family, tmp_path):
    torch.set_num_threads(1)
    model, tok = tiny_model(family, seed=0)
    a = get_adapter(model)
    layers = [1, 2]
    C = corpus_second_moments(model, tok, layers, TEXTS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = MemitEditor(hparams=memit_hp(layers), stats=lambda m, t, l: C, context_templates=GROUPS,
                         cache=TargetCache(tmp_path / "z"), progress=False)
    deltas = editor.edit(model, tok, REQS)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert set(deltas) == {a.rewrite_weight_name(l) for l in layers}
    # each layer's ΔW solves ΔW (λC + KKᵀ) = E/(|R|-i) Kᵀ with the anisotropic corpus C (K, E from the editor's
    # intermediates; λC and the 1/(|R|-i) applied here): fails if the solve drops or replaces λC, or the spread
    for p in editor.intermediates["batches"][0]["per_layer"]:
        err = memit_normal_equation_error(a.from_param_layout(deltas[p["weight_name"]]), p["K"], p["E"], C[p["layer"]],
                                          LAM, p["i"], len(layers))
        assert err < 1e-3, (p["layer"], err)
    with deltas_applied(model, deltas):
        for r in REQS:
            assert argmax_next(model, tok, r.filled_prompt) == target_token_ids(tok, " " + r.target_new)[0], r.case_id
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == {a.rewrite_weight_name(l) for l in layers} or changed <= set(deltas) | {"lm_head.weight"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # second run: all z from the cache, identical deltas
    assert editor.info["targets"]["from_cache"] == 0
    again = MemitEditor(hparams=memit_hp(layers), stats=lambda m, t, l: C, context_templates=GROUPS,
                        cache=TargetCache(tmp_path / "z"), progress=False)
    d2 = again.edit(model, tok, REQS)
    assert again.info["targets"]["from_cache"] == len(REQS)
    for k in deltas:
        assert torch.equal(deltas[k], d2[k])


def test_memit_batches_compose(tmp_path):
    """batch_size=2 over 3 requests: two sequential batches, still every edit lands."""
    torch.set_num_threads(1)
    model, tok = tiny_model("gpt2", seed=0)
    layers = [1, 2]
    C = corpus_second_moments(model, tok, layers, TEXTS)
    editor = MemitEditor(hparams=memit_hp(layers, batch_size=2), stats=lambda m, t, l: C,
                         context_templates=GROUPS, progress=False)
    deltas = editor.edit(model, tok, REQS)
    with deltas_applied(model, deltas):
        for r in REQS:
            assert argmax_next(model, tok, r.filled_prompt) == target_token_ids(tok, " " + r.target_new)[0]
