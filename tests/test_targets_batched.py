"""Batched target optimisation (one padded forward/backward per step for many requests, each with its own
δ, Adam state, early stop and clamp) gives the same vectors as one-at-a-time optimisation.

Tolerance: relative L2 error <= 1e-3 per target vector (the fixtures' tolerance against the reference) and
identical Adam step counts. Rows of different requests never interact, so the only differences are float32
rounding from different padding/batch shapes; Adam's normalised steps amplify them where gradients are
near zero (measured: up to ~2e-4 on these random tiny models, ~1e-6 on SmolLM2).
"""
import pytest
import torch

from massedit.core.adapters import get_adapter
from massedit.data.requests import EditRequest
from massedit.editing.hparams import EditHparams
from massedit.editing.targets import build_target_problem, optimise_targets
from massedit.testing import FAMILIES, tiny_model

TEMPLATES = ["{}", "The city. {}", "I think that this is. {}"]
REQS = [
    EditRequest(case_id=1, subject="The Eiffel Tower", prompt="{} is located in the city of", target_new="Rome"),
    EditRequest(case_id=2, subject="Michael Jordan", prompt="{} plays", target_new="guitar"),
    EditRequest(case_id=3, subject="Windows Server 2003", prompt="{} is a product of", target_new="BMW Italian"),
    EditRequest(case_id=4, subject="Toko Yasuda", prompt="The mother tongue of {} is", target_new="Dutch"),
]
TOL = 1e-3


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("block", [True, False], ids=["memit_block", "rome_mlp"])
def test_batched_equals_one_at_a_time(family, block):
    torch.set_num_threads(1)
    model, tok = tiny_model(family, seed=0)
    a = get_adapter(model)
    # early stop threshold high enough that some requests stop early and leave the batch
    hp = EditHparams(layers=[1], v_num_grad_steps=8, v_lr=0.5, clamp_norm_factor=0.75 if block else 4.0,
                     v_weight_decay=0.5, early_stop_loss=5.985)
    probs = [build_target_problem(tok, r, TEMPLATES) for r in REQS]
    kw = dict(edit_module=a.block_name(1) if block else a.mlp_name(1), edit_is_block=block, progress=False)
    one = optimise_targets(model, tok, probs, hp, batched=False, **kw)
    many = optimise_targets(model, tok, probs, hp, batched=True, max_tokens=10_000, step_tokens=10_000, **kw)
    tiny_batches = optimise_targets(model, tok, probs, hp, batched=True, max_tokens=1, step_tokens=1, **kw)  # one request per sub-batch
    for x, y, z in zip(one, many, tiny_batches, strict=True):
        assert x.n_adam_steps == y.n_adam_steps == z.n_adam_steps
        assert x.early_stopped == y.early_stopped
        assert _rel(y.target, x.target) <= TOL and _rel(z.target, x.target) <= TOL
        assert _rel(y.init, x.init) <= TOL
        assert torch.allclose(x.loss_trace, y.loss_trace, rtol=1e-3, atol=1e-4)


def test_clamp_and_step_budget():
    model, tok = tiny_model("gpt2", seed=0)
    a = get_adapter(model)
    hp = EditHparams(layers=[1], v_num_grad_steps=5, v_lr=5.0, clamp_norm_factor=0.5, v_weight_decay=0.0)
    probs = [build_target_problem(tok, r, TEMPLATES) for r in REQS]
    res = optimise_targets(model, tok, probs, hp, edit_module=a.block_name(1), edit_is_block=True, progress=False)
    for r in res:
        assert r.n_adam_steps == 4 and r.n_forward == 5  # never steps after the last forward
        assert float(r.delta.norm()) <= 0.5 * float(r.init.norm()) * (1 + 1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_prefix_reuse_is_exact(family):
    """``targets_forward=full``: running the blocks above the edit point on the output kept from the first step
    (computed once) gives the same targets as the model's whole forward every step; no module is swapped."""
    torch.set_num_threads(1)
    model, tok = tiny_model(family, seed=0)
    a = get_adapter(model)
    probs = [build_target_problem(tok, r, TEMPLATES) for r in REQS]
    for block, layer, prefix in ((True, 2, 2), (False, 2, 1)):
        hp = EditHparams(layers=[layer], v_num_grad_steps=6, v_lr=0.5, clamp_norm_factor=4.0, v_weight_decay=0.5,
                         early_stop_loss=5.985, targets_forward="full")
        kw = dict(edit_module=a.block_name(layer) if block else a.mlp_name(layer), edit_is_block=block,
                  progress=False, batched=True, prefix_block=prefix)
        on = optimise_targets(model, tok, probs, hp, **kw)
        off = optimise_targets(model, tok, probs, hp.replace(reuse_frozen_prefix=False), **kw)
        for x, y in zip(on, off, strict=True):
            assert x.n_adam_steps == y.n_adam_steps
            assert _rel(x.target, y.target) <= 1e-5
    assert all(type(a.block(i)).__module__.startswith("transformers.") for i in range(a.num_layers))
