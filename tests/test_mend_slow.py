"""MEND on the real SmolLM2 (slow): default inner params, concurrent-edit accumulation, one training step."""
from __future__ import annotations

import pytest
import torch

from massedit.data.requests import EditRequest

pytestmark = pytest.mark.slow


def _reqs():
    return [
        EditRequest(case_id=0, subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English",
                    paraphrase_prompts=["Danielle Darrieux spoke the language"], loc="nq question: who wrote hamlet",
                    loc_ans="William Shakespeare"),
        EditRequest(case_id=1, subject="Toko Yasuda", prompt="{} plays the instrument", target_new="the piano",
                    paraphrase_prompts=["Toko Yasuda is known for playing"], loc="nq question: capital of france",
                    loc_ans="Paris"),
        EditRequest(case_id=2, subject="Paris", prompt="{} is the capital of", target_new="Japan",
                    paraphrase_prompts=["The city of Paris is the capital of"], loc="nq question: largest planet",
                    loc_ans="Jupiter"),
    ]


def test_smollm2_mend_concurrent_equals_one_batch_and_gradient(smollm2):
    from massedit.editing.mend import MendNetConfig, build_edit_batch, masked_nll, mend_deltas
    from massedit.editing.mend.editor import build_mend_net
    from massedit.tasks.config import compose

    model, tok = smollm2
    net = build_mend_net(model, compose("edit", ["method=mend"]).method)
    assert [p.param for p in net.inner] == [f"model.layers.{i}.mlp.{n}.weight" for i in (27, 28, 29)
                                            for n in ("up_proj", "down_proj")]
    assert sorted(net.transforms.keys()) == ["1536x576", "576x1536"]
    reqs = _reqs()
    # norm off + identity => -edit_lr * true gradient; chunks of 1 == one batch
    from massedit.editing.mend import MendNet

    plain = MendNet(net.inner, MendNetConfig(norm=False, rank=4, edit_lr=1.0))
    a = mend_deltas(model, tok, plain, reqs, chunk_size=1, concurrent_loss="tokens_mean")
    b = mend_deltas(model, tok, plain, reqs, chunk_size=8, concurrent_loss="tokens_mean")
    params = dict(model.named_parameters())
    names = [p.param for p in net.inner]
    for n in names:
        params[n].requires_grad_(True)
    try:
        batch = build_edit_batch(tok, [r.filled_prompt for r in reqs], [r.target_new for r in reqs])
        masked_nll(model(**batch.model_inputs()).logits, batch.labels).backward()
        for n in names:
            g = params[n].grad
            # fp32 with another batch composition sums in another order: measured up to 1.4e-4 * max|g| with 2 CPU
            # threads (under 1e-4 with 1); a 1 % error in a chunk's scale already fails at 5e-4
            scale = float(g.abs().max())
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=5e-4 * scale)
            torch.testing.assert_close(b[n], -g, rtol=0, atol=5e-4 * scale)
    finally:
        for n in names:
            params[n].grad = None
            params[n].requires_grad_(False)


def test_smollm2_one_training_step_moves_editor(smollm2):
    from massedit.datamodules.mend import MendCollate, make_examples
    from massedit.editing.mend import MendNet, MendNetConfig, inner_params
    from massedit.editing.mend.objective import mend_step

    model, tok = smollm2
    net = MendNet(inner_params(model), MendNetConfig(rank=32))
    net.train()
    batch = MendCollate(tok, 48)(make_examples(_reqs(), seed=0)[:2])
    out = mend_step(model, net, batch, 0.1, 1.0, with_pre=True)
    assert out["edit_loss"] < out["edit_loss_pre"]      # the (normalised) gradient step already helps
    out["loss"].backward()
    assert net.edit_lrs.grad is not None and torch.isfinite(net.edit_lrs.grad).all()
    assert all(p.grad is None for p in model.parameters())
