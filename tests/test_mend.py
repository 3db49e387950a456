"""MEND on tiny models: editor math, concurrent editing, training, checkpoints (REFERENCE_SPEC §5)."""
from __future__ import annotations

import copy

import pytest
import torch

from massedit.data.requests import EditRequest
from massedit.editing.mend import (MendEditor, MendNet, MendNetConfig, RunningNorm, build_edit_batch, capture_factors,
                                   edited_forward, inner_params, load_editor, masked_nll, mend_deltas, save_editor)
from massedit.editing.mend.config import MendTrainConfig
from massedit.testing import tiny_model

WORDS = ["apple", "river", "stone", "cloud", "green", "table", "music", "light", "paper", "glass"]


def make_requests(n: int, offset: int = 0) -> list[EditRequest]:
    out = []
    for k in range(offset, offset + n):
        s, t = WORDS[k % 10], WORDS[(3 * k + 1) % 10] + (" " + WORDS[k % 7] if k % 3 == 0 else "")
        out.append(EditRequest(case_id=k, subject=s, prompt="The {} is made of", target_new=t,
                               paraphrase_prompts=[f"What is the {s} made of"],
                               loc=f"nq question: where is the {WORDS[(k + 2) % 10]}", loc_ans=WORDS[(k + 5) % 10]))
    return out


def true_gradient(model, tok, inner, requests) -> dict[str, torch.Tensor]:
    """Gradient of the mean target-token NLL over all requests w.r.t. each inner weight (param layout)."""
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    for p in inner:
        params[p.param].requires_grad_(True)
    b = build_edit_batch(tok, [r.filled_prompt for r in requests], [r.target_new for r in requests])
    masked_nll(m(**b.model_inputs()).logits, b.labels).backward()
    return {p.param: params[p.param].grad.clone() for p in inner}


def assert_close_scaled(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> None:
    """Equal up to fp32 summation-order noise relative to the tensor's scale."""
    scale = float(b.abs().max())
    assert scale > 0
    torch.testing.assert_close(a, b, rtol=0, atol=rel * scale)


def randomise(net: MendNet, seed: int = 0, std: float = 0.05) -> MendNet:
    """Move the editor away from the identity (non-zero U, scales, shifts) so tests are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name == "edit_lrs":
                p.copy_(torch.rand(p.shape, generator=g) * 1e-2 + 1e-3)
            else:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return net


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_identity_init_is_a_gradient_step(family):
    """Identity init and no normalisation: ΔW = -edit_lr · ∇W L (Conv1D and Linear layouts)."""
    model, tok = tiny_model(family)
    inner = inner_params(model)
    assert len(inner) == 6 and all(p.conv1d == (family == "gpt2") for p in inner)
    net = MendNet(inner, MendNetConfig(norm=False, rank=8, edit_lr=1e-3))
    reqs = make_requests(5)
    deltas = mend_deltas(model, tok, net, reqs, chunk_size=2, concurrent_loss="tokens_mean")
    grads = true_gradient(model, tok, inner, reqs)
    for p in inner:
        g = grads[p.param]
        assert deltas[p.param].shape == g.shape
        assert g.abs().max() > 0
        assert_close_scaled(deltas[p.param], -1e-3 * g)


def test_reference_sign_switch():
    model, tok = tiny_model("gpt2")
    reqs = make_requests(2)
    d_desc = mend_deltas(model, tok, MendNet(inner_params(model), MendNetConfig(norm=False, rank=4)), reqs)
    d_ref = mend_deltas(model, tok, MendNet(inner_params(model), MendNetConfig(norm=False, rank=4, update_sign=1.0)), reqs)
    for k in d_desc:
        torch.testing.assert_close(d_ref[k], -d_desc[k])


def test_running_norm_matches_rowwise_welford():
    torch.manual_seed(0)
    rows = torch.randn(37, 5) * 3 + 1
    norm = RunningNorm(5)
    for chunk in rows.split([1, 10, 3, 23]):
        norm.update(chunk)
    # the reference's row-by-row Welford
    mean, s, k = rows[0].clone(), torch.zeros(5), 1
    for r in rows[1:]:
        k += 1
        last = mean.clone()
        mean += (r - mean) / k
        s += (r - last) * (r - mean)
    torch.testing.assert_close(norm.mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.std, (s / (k - 1)).sqrt(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm(rows), (rows - mean) / ((s / (k - 1)).sqrt() + 1e-7), rtol=1e-4, atol=1e-4)


def test_stats_update_only_in_training_mode():
    model, tok = tiny_model("gpt2")
    net = MendNet(inner_params(model), MendNetConfig(rank=4))
    reqs = make_requests(3)
    mend_deltas(model, tok, net, reqs)          # editing runs in eval mode: statistics untouched
    assert all(float(t.x_norm.count) == 0 for t in net.transforms.values())
    net.train()
    b = build_edit_batch(tok, [r.filled_prompt for r in reqs], [r.target_new for r in reqs])
    _, f = capture_factors(model, net.inner, lambda: masked_nll(model(**b.model_inputs()).logits, b.labels),
                           row_mask=b.attention_mask)
    net.updates(f)
    assert all(float(t.x_norm.count) > 0 for t in net.transforms.values())


def _trained_like_net(model, tok, seed=0) -> MendNet:
    net = MendNet(inner_params(model), MendNetConfig(rank=8))
    net.train()
    reqs = make_requests(6, offset=20)
    b = build_edit_batch(tok, [r.filled_prompt for r in reqs], [r.target_new for r in reqs])
    _, f = capture_factors(model, net.inner, lambda: masked_nll(model(**b.model_inputs()).logits, b.labels),
                           row_mask=b.attention_mask)
    net.updates(f)                               # fills the normalisation statistics
    return randomise(net, seed).eval()


def test_request_sum_is_the_sum_of_single_edits():
    """Default concurrent loss: ΔW(all requests) == Σ_i ΔW(request i alone); at identity init that is
    -edit_lr · Σ_i ∇W L_i."""
    model, tok = tiny_model("llama")
    net = _trained_like_net(model, tok)
    reqs = make_requests(5)
    together = mend_deltas(model, tok, net, reqs, chunk_size=2)
    singles = [mend_deltas(model, tok, net, [r]) for r in reqs]
    for k in together:
        assert_close_scaled(together[k], sum(s[k] for s in singles))
    plain = MendNet(net.inner, MendNetConfig(norm=False, rank=4, edit_lr=1e-2))
    d = mend_deltas(model, tok, plain, reqs, chunk_size=3)
    grads = [true_gradient(model, tok, net.inner, [r]) for r in reqs]
    for k in d:
        assert_close_scaled(d[k], -1e-2 * sum(g[k] for g in grads))
    with pytest.raises(ValueError, match="concurrent_loss"):
        mend_deltas(model, tok, net, reqs, concurrent_loss="bogus")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("loss", ["tokens_mean", "request_sum"])
def test_concurrent_edit_accumulation(family, loss):
    """Chunks of any size give the same ΔW as one big chunk, and both equal Σ over rows of x̂ δ̂ᵀ."""
    model, tok = tiny_model(family)
    net = _trained_like_net(model, tok)
    reqs = make_requests(7)
    big = mend_deltas(model, tok, net, reqs, chunk_size=64, concurrent_loss=loss)
    for cs in (1, 3):
        small = mend_deltas(model, tok, net, reqs, chunk_size=cs, concurrent_loss=loss)
        for k in big:
            assert_close_scaled(small[k], big[k])
    # explicit per-row sum from the factors of one batch holding every request
    from massedit.editing.mend.factors import token_nll

    b = build_edit_batch(tok, [r.filled_prompt for r in reqs], [r.target_new for r in reqs])

    def loss_fn():
        nll, mask = token_nll(model(**b.model_inputs()).logits, b.labels)
        return nll.sum() / mask.sum() if loss == "tokens_mean" else (nll.sum(-1) / mask.sum(-1)).sum()

    _, f = capture_factors(model, net.inner, loss_fn, row_mask=b.attention_mask)
    for k, p in enumerate(net.inner):
        x, d = f[p.param]
        with torch.no_grad():
            xh, dh = net.transform(k, x, d)
            g = sum(torch.outer(dh[r], xh[r]) for r in range(x.shape[0]))
            expected = -net.edit_lrs[k] * g
        expected = expected.T if p.conv1d else expected
        assert_close_scaled(big[p.param], expected)
    # every request contributes (no last-chunk-only quirk): dropping the first request changes ΔW
    assert any((mend_deltas(model, tok, net, reqs[1:], chunk_size=3, concurrent_loss=loss)[k] - big[k]).abs().max() > 1e-6
               for k in big)


def test_edited_forward_equals_weight_update():
    from massedit.core.deltas import deltas_applied

    model, tok = tiny_model("gpt2")
    net = _trained_like_net(model, tok)
    reqs = make_requests(3)
    deltas = mend_deltas(model, tok, net, reqs)
    b = build_edit_batch(tok, [r.filled_prompt for r in reqs], [r.target_new for r in reqs])
    upd = {p.param: (deltas[p.param].T if p.conv1d else deltas[p.param]) for p in net.inner}
    with torch.no_grad(), edited_forward(model, net.inner, upd):
        hooked = model(**b.model_inputs()).logits
    with torch.no_grad(), deltas_applied(model, deltas):
        applied = model(**b.model_inputs()).logits
    torch.testing.assert_close(hooked, applied, rtol=1e-4, atol=1e-5)


def test_editor_leaves_model_as_found(tmp_path):
    from massedit.editing.mend.config import MendConfig

    model, tok = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    net = _trained_like_net(model, tok)
    path = save_editor(tmp_path / "mend_editor.pt", net)
    deltas = MendEditor(MendConfig(checkpoint=str(path), edit_chunk_size=2), progress=False).edit(model, tok, make_requests(5))
    assert set(deltas) == {p.param for p in net.inner}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}
    assert all(not m._forward_hooks for m in model.modules())


def test_checkpoint_roundtrip_and_wrong_model(tmp_path):
    model, tok = tiny_model("gpt2")
    net = _trained_like_net(model, tok)
    path = save_editor(tmp_path / "ed.pt", net, meta={"note": "x"})
    loaded = load_editor(path, model).eval()
    for k, v in net.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    reqs = make_requests(4)
    a, b = mend_deltas(model, tok, net, reqs), mend_deltas(model, tok, loaded, reqs)
    for k in a:
        assert torch.equal(a[k], b[k])
    other, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="does not have"):
        load_editor(path, other)
    bigger, _ = tiny_model("gpt2", m=48)
    with pytest.raises(ValueError, match="shape"):
        load_editor(path, bigger)
    with pytest.raises(FileNotFoundError):
        load_editor(tmp_path / "missing.pt", model)


def test_grouped_batch_equals_separate_problems():
    from massedit.datamodules.mend import MendCollate, make_examples
    from massedit.editing.mend.objective import mend_step

    model, tok = tiny_model("llama")
    net = _trained_like_net(model, tok)
    ex = make_examples(make_requests(8), seed=0)[:4]
    collate = MendCollate(tok, 64)
    with torch.no_grad():
        together = mend_step(model, net, collate(ex), 0.1, 1.0)
        apart = [mend_step(model, net, collate([e]), 0.1, 1.0) for e in ex]
    torch.testing.assert_close(together["edit_loss"], sum(a["edit_loss"] for a in apart) / 4, rtol=1e-4, atol=1e-6)


def test_gradients_reach_editor_not_model():
    from massedit.datamodules.mend import MendCollate, make_examples
    from massedit.editing.mend.objective import mend_step

    model, tok = tiny_model("gpt2")
    net = MendNet(inner_params(model), MendNetConfig(rank=8))
    net.train()
    out = mend_step(model, net, MendCollate(tok)(make_examples(make_requests(4))[:2]), 0.1, 1.0)
    out["loss"].backward()
    assert net.edit_lrs.grad is not None and net.edit_lrs.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.named_parameters() if n.endswith(".u"))
    assert all(p.grad is None for p in model.parameters())


def test_training_reduces_edit_loss_and_checkpoints(tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from massedit.datamodules.mend import MendDataModule
    from massedit.lightning_modules.mend import AtomicCheckpointIO, MendModule

    torch.manual_seed(0)
    model, tok = tiny_model("gpt2")
    reqs = make_requests(24)
    dm = MendDataModule(tok, reqs[:20], reqs[20:], n_edits=1, batch_problems=4, max_iters=48, val_size=4)
    net = MendNet(inner_params(model), MendNetConfig(rank=8))
    module = MendModule(model, net, MendTrainConfig(lr=1e-3, lr_lr=1e-3, accumulate=4))
    ck = ModelCheckpoint(dirpath=str(tmp_path / "ck"), monitor="val/loss", mode="min", save_top_k=1)
    trainer = pl.Trainer(max_epochs=1, val_check_interval=4, num_sanity_val_steps=0, inference_mode=False,
                         logger=False, callbacks=[ck], plugins=[AtomicCheckpointIO()], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.validate(module, datamodule=dm, verbose=False)
    trainer.fit(module, datamodule=dm)
    vals = [h for h in module.history if "val/edit_loss" in h]
    assert len(vals) == 4
    assert vals[-1]["val/edit_loss"] < vals[0]["val/edit_loss"] - 0.05
    assert vals[-1]["val/loss"] < vals[0]["val/loss"]
    # best checkpoint loads as an editor (Lightning .ckpt path) and edits
    loaded = load_editor(ck.best_model_path, model)
    assert any(not torch.equal(v, MendNet(net.inner, net.config).state_dict()[k]) for k, v in loaded.state_dict().items()
               if k.endswith(".u"))
    assert mend_deltas(model, tok, loaded, reqs[20:])


def test_bad_locality_data_is_reported():
    from massedit.data.requests import RequestValidationError
    from massedit.datamodules.mend import make_examples

    bare = [EditRequest(case_id=k, subject="x", prompt="{} is", target_new="y") for k in range(3)]
    with pytest.raises(RequestValidationError, match="case_id=0.*loc"):
        make_examples(bare)


def test_mend_config_composes():
    from massedit.tasks.config import compose

    cfg = compose("edit", ["method=mend", "method.checkpoint=/x/mend_editor.pt"])
    assert cfg.method.name == "mend" and cfg.method.projections == ["up", "down"] and cfg.method.num_layers == 3
    model, _ = tiny_model("llama")
    from massedit.editing.mend.editor import inner_params_from_cfg

    names = [p.param for p in inner_params_from_cfg(model, cfg.method)]
    assert names[0] == "model.layers.1.mlp.up_proj.weight" and names[-1] == "model.layers.3.mlp.down_proj.weight"


def test_datamodule_zsre_and_counterfact(shared_dir):
    from massedit.data.requests import load_requests
    from massedit.datamodules.mend import make_examples

    z = load_requests(shared_dir / "data/zsre/zsre_mend_train-1k.json", num_edits=20, zsre_target="alt",
                      skip_invalid=True)
    ex = make_examples(z)
    assert ex[0].target == z[0].extra["alt"] and ex[0].outer_prompt == z[0].paraphrase_prompts[0]
    assert all(e.loc_text.startswith("nq question:") for e in ex)
    cf = load_requests(shared_dir / "data/counterfact/counterfact_dev.json", num_edits=10)
    ex = make_examples(cf)
    assert ex[0].target == cf[0].target_new and ex[0].outer_prompt in cf[0].paraphrase_prompts
    assert any(ex[0].loc_text.startswith(p) for r in cf for p in r.neighborhood_prompts)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_trainer_precision_settings(precision):
    import pytorch_lightning as pl

    from massedit.datamodules.mend import MendDataModule
    from massedit.lightning_modules.mend import MendModule

    model, tok = tiny_model("gpt2")
    reqs = make_requests(24)
    dm = MendDataModule(tok, reqs[:20], reqs[20:], batch_problems=4, max_iters=16, val_size=4)
    net = MendNet(inner_params(model), MendNetConfig(rank=8))
    before = net.edit_lrs.detach().clone()
    module = MendModule(model, net, MendTrainConfig(lr=1e-3, lr_lr=1e-3, accumulate=4))
    trainer = pl.Trainer(max_epochs=1, val_check_interval=2, num_sanity_val_steps=0, inference_mode=False, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         precision=precision)
    trainer.fit(module, datamodule=dm)
    vals = [h["val/edit_loss"] for h in module.history if "val/edit_loss" in h]
    assert len(vals) == 2 and all(v == v for v in vals)
    assert not torch.equal(net.edit_lrs.detach().float(), before)
