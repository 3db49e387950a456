"""FT / FT-L / FT-W: losses on hand-checked examples, batches, parameter selection, optimiser, FT-L
constraint, the weight-decay trade-off, and the editor contract (model left as found)."""
from __future__ import annotations

import math

import pytest
import torch

from massedit.core.deltas import deltas_applied
from massedit.core.tokenization import encode, target_token_ids
from massedit.data.requests import EditRequest, RequestValidationError
from massedit.editing.ft import (
    AnchoredAdamW,
    FTConfig,
    FTConfigError,
    autoregressive_target_nll,
    bag_of_tokens_last_position_nll,
    ft_loss,
    make_ft_batch,
    power_law_weight_decay,
    project_to_linf_ball_,
    select_ft_parameters,
)
from massedit.lightning_modules.ftw import FTEditor, fit_ft
from massedit.testing import tiny_model
from massedit.trainer import TrainerConfig, TrainerConfigError

QUIET = TrainerConfig(enable_progress_bar=False)

torch.set_num_threads(1)


def _requests():
    facts = [("The Eiffel Tower", "{} is located in the city of", "Rome", "Paris", "The Colosseum is located in the city of"),
             ("Danielle Darrieux", "The mother tongue of {} is", "English", "French", "The mother tongue of Claude Rich is"),
             ("Toko Yasuda", "{} plays the", "piano", "guitar", "Michael Jordan plays the"),
             ("Apple A5", "{} was created by", "Microsoft", "Apple", "Windows Server 2003 is a product of")]
    return [EditRequest(case_id=i, subject=s, prompt=p, target_new=tn, target_true=tt,
                        paraphrase_prompts=[f"In a few words: {p.format(s)}"],
                        neighborhood_prompts=[nb], neighborhood_targets=[tt])
            for i, (s, p, tn, tt, nb) in enumerate(facts)]


# ------------------------------------------------------------------------------------------ losses
def test_bag_loss_hand_checked():
    # V = 4. Row 0: 3 real tokens, last real position 2; row 1: 2 real tokens, last real position 1.
    logits = torch.zeros(2, 3, 4)
    logits[0, 2] = torch.tensor([math.log(1), math.log(2), math.log(3), math.log(4)])  # p = [.1,.2,.3,.4]
    logits[1, 1] = torch.tensor([0.0, 0.0, 0.0, math.log(5)])                          # p = [1,1,1,5]/8
    logits[1, 2] = 100.0  # a padding position: must be ignored
    am = torch.tensor([[1, 1, 1], [1, 1, 0]])
    tids = torch.tensor([[1, 3], [3, 0]])   # row 1 has one target token (second is padding)
    tmask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    want0 = -(math.log(0.2) + math.log(0.4)) / 2   # both target tokens scored at the SAME position
    want1 = -math.log(5 / 8)
    got = bag_of_tokens_last_position_nll(logits, am, tids, tmask)
    assert got.item() == pytest.approx((want0 + want1) / 2, rel=1e-6)


def test_autoregressive_loss_hand_checked():
    # one row: prompt of 2 tokens (positions 0,1), target tokens 2 and 1 at positions 2 and 3
    logits = torch.zeros(1, 4, 3)
    logits[0, 1] = torch.tensor([0.0, 0.0, math.log(2)])   # predicts position 2: p(2) = 2/4
    logits[0, 2] = torch.tensor([0.0, math.log(3), 0.0])   # predicts position 3: p(1) = 3/5
    logits[0, 3] = 50.0                                    # after the last token: unused
    labels = torch.tensor([[-100, -100, 2, 1]])
    want = -(math.log(0.5) + math.log(0.6)) / 2
    assert autoregressive_target_nll(logits, labels).item() == pytest.approx(want, rel=1e-6)
    # per-row mean first, then mean over rows: a 1-token row weighs as much as a 2-token row
    logits2 = torch.zeros(2, 4, 3)
    logits2[0] = logits[0]
    logits2[1, 0] = torch.tensor([math.log(2), 0.0, 0.0])  # row 1 predicts its only target (0) at pos 1: p = 1/2
    labels2 = torch.tensor([[-100, -100, 2, 1], [-100, 0, -100, -100]])
    assert autoregressive_target_nll(logits2, labels2).item() == pytest.approx((want + math.log(2)) / 2, rel=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batches_match_unpadded_per_example_losses(family):
    """Right padding changes nothing: the batch loss equals the mean of single-example losses."""
    model, tok = tiny_model(family)
    reqs = _requests()
    for loss in ("bag_last_position", "autoregressive"):
        batch = make_ft_batch(tok, reqs, loss=loss)
        with torch.no_grad():
            full = ft_loss(model, batch, loss).item()
            singles = [ft_loss(model, make_ft_batch(tok, [r], loss=loss), loss).item() for r in reqs]
        assert full == pytest.approx(sum(singles) / len(singles), rel=1e-4, abs=1e-5)


def test_batch_layout_uses_target_convention():
    model, tok = tiny_model("llama")  # SentencePiece-like with BOS
    reqs = _requests()[:2]
    bag = make_ft_batch(tok, reqs, loss="bag_last_position")
    ar = make_ft_batch(tok, reqs, loss="autoregressive")
    for b, r in enumerate(reqs):
        p = encode(tok, r.filled_prompt)
        t = target_token_ids(tok, r.target_new)
        assert p[0] == tok.bos_token_id and tok.bos_token_id not in t
        assert bag["input_ids"][b, : len(p)].tolist() == p and int(bag["attention_mask"][b].sum()) == len(p)
        assert bag["target_ids"][b, : len(t)].tolist() == t and int(bag["target_mask"][b].sum()) == len(t)
        assert ar["input_ids"][b, : len(p) + len(t)].tolist() == p + t
        lab = ar["labels"][b]
        assert lab[len(p) : len(p) + len(t)].tolist() == t
        assert (lab[: len(p)] == -100).all() and (lab[len(p) + len(t):] == -100).all()


def test_single_token_targets_make_both_losses_equal():
    model, tok = tiny_model("gpt2")
    words = [w for w in ("the", "is", "in", "of", "a", "plays") if len(target_token_ids(tok, w)) == 1]
    assert len(words) >= 2, "need single-token targets in the tiny vocabulary"
    reqs = [EditRequest(case_id=i, subject=r.subject, prompt=r.prompt, target_new=words[i % len(words)])
            for i, r in enumerate(_requests())]
    with torch.no_grad():
        a = ft_loss(model, make_ft_batch(tok, reqs, "bag_last_position"), "bag_last_position")
        b = ft_loss(model, make_ft_batch(tok, reqs, "autoregressive"), "autoregressive")
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_bad_request_names_record_and_field():
    _, tok = tiny_model("gpt2")
    bad = EditRequest(case_id=7, subject="X", prompt="{} is", target_new="  ")
    with pytest.raises(RequestValidationError, match=r"case_id=7.*target_new"):
        make_ft_batch(tok, [bad])


# ------------------------------------------------------------------------------------------ config / params
def test_parameter_selection_exact_and_sets():
    model, _ = tiny_model("gpt2", n_layer=12)
    sel = select_ft_parameters(model, layers=[1], params="rewrite")
    assert list(sel) == ["transformer.h.1.mlp.c_proj.weight"]  # layer 1 never matches 10, 11
    assert set(select_ft_parameters(model, layers=[1], params="rewrite_all")) == {
        "transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias"}
    block = select_ft_parameters(model, layers=[-1], params="block")
    assert block and all(n.startswith("transformer.h.11.") for n in block)
    assert list(select_ft_parameters(model)) == ["transformer.h.9.mlp.c_proj.weight"]  # round(0.75 * 12)
    llama, _ = tiny_model("llama")
    assert set(select_ft_parameters(llama, layers=[0, 2], params="mlp_in")) == {
        f"model.layers.{i}.mlp.{p}.weight" for i in (0, 2) for p in ("up_proj", "gate_proj")}
    assert list(select_ft_parameters(llama, param_names=[r"layers\.3\.mlp\.down"])) == ["model.layers.3.mlp.down_proj.weight"]
    with pytest.raises(FTConfigError, match="out of range"):
        select_ft_parameters(llama, layers=[9])


def test_config_validation_and_power_law():
    with pytest.raises(FTConfigError, match="loss"):
        FTConfig(loss="nope")
    with pytest.raises(FTConfigError, match="norm_constraint"):
        FTConfig(norm_constraint=-1)
    with pytest.raises(FTConfigError, match="weight_decay"):
        FTConfig(weight_decay=-1)
    assert power_law_weight_decay(10_000) == pytest.approx(3.9e-4, rel=0.03)  # REFERENCE_SPEC §3.2
    from massedit.editing.ft import effective_weight_decay

    cfg = FTConfig(weight_decay=0.5, wd_power_law=[-0.87028798, 0.15589562])
    assert effective_weight_decay(cfg, 10_000) == pytest.approx(power_law_weight_decay(10_000))
    assert effective_weight_decay(FTConfig(weight_decay=0.5), 10_000) == 0.5


def test_anchored_adamw_matches_torch_adamw_and_decays_towards_anchor():
    torch.manual_seed(0)
    w = torch.randn(5, 3)
    g = torch.randn(5, 3)
    a = torch.nn.Parameter(w.clone())
    b = torch.nn.Parameter(w.clone())
    opt_a = AnchoredAdamW([a], anchors=[torch.zeros_like(w)], lr=0.1, weight_decay=0.5)
    opt_b = torch.optim.AdamW([b], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert torch.allclose(a, b, atol=1e-6)  # anchor 0 == plain decoupled AdamW
    # decay towards the initial value with zero gradient signal beyond the decay: first step by hand
    c = torch.nn.Parameter(w + 1.0)
    opt_c = AnchoredAdamW([c], anchors=[w], lr=0.1, weight_decay=2.0)
    c.grad = torch.zeros_like(w)
    opt_c.step()
    assert torch.allclose(c, w + 1.0 - 0.1 * 2.0 * 1.0, atol=1e-6)


def test_projection_onto_linf_ball():
    w0 = torch.zeros(4)
    p = torch.nn.Parameter(torch.tensor([0.5, -0.5, 0.01, -0.002]))
    project_to_linf_ball_({"p": p}, {"p": w0}, 0.05)
    assert p.tolist() == pytest.approx([0.05, -0.05, 0.01, -0.002])


# ------------------------------------------------------------------------------------------ training
def _train(model, tok, reqs, **kw):
    opts = {"lr": 0.05, "epochs": 15, "layers": [2], "batch_size": 8, "skip_loss_below": 0, "stop_loss_below": 0}
    opts.update(kw)
    return fit_ft(model, tok, reqs, FTConfig(**opts), trainer_cfg=QUIET)


def test_ftl_norm_constraint_holds():
    model, tok = tiny_model("gpt2")
    res = _train(model, tok, _requests(), norm_constraint=1e-3, lr=0.1)
    (d,) = res.deltas.values()
    assert d.abs().max().item() <= 1e-3 + 1e-7
    assert d.abs().max().item() > 0.9e-3  # the constraint was active, not trivially satisfied


def _neighbourhood_shift(model, tok, reqs, deltas) -> float:
    """Mean KL(pre || post) of the next-token distribution on the neighbourhood prompts."""
    from massedit.core.tokenization import last_token_index, tokenize_batch

    enc = tokenize_batch(tok, [p for r in reqs for p in r.neighborhood_prompts])
    rows, last = torch.arange(enc["input_ids"].shape[0]), last_token_index(enc["attention_mask"])
    with torch.no_grad():
        lp = model(**enc).logits[rows, last].log_softmax(-1)
        with deltas_applied(model, deltas):
            lq = model(**enc).logits[rows, last].log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_weight_decay_trades_efficacy_for_specificity():
    """decay 0 vs large decay: larger decay -> smaller edit, smaller neighbourhood shift, worse fit."""
    model, tok = tiny_model("gpt2")
    reqs = _requests()
    free = _train(model, tok, reqs, weight_decay=0.0)
    decayed = _train(model, tok, reqs, weight_decay=10.0)  # lr*wd = 0.5 of the edit removed per step
    assert decayed.delta_norm < 0.7 * free.delta_norm
    assert decayed.epoch_losses[-1] > free.epoch_losses[-1]
    assert _neighbourhood_shift(model, tok, reqs, decayed.deltas) < _neighbourhood_shift(model, tok, reqs, free.deltas)
    # target probability on the rewrite prompts is higher without decay (efficacy direction)
    batch = make_ft_batch(tok, reqs)
    with torch.no_grad(), deltas_applied(model, free.deltas):
        nll_free = ft_loss(model, batch).item()
    with torch.no_grad(), deltas_applied(model, decayed.deltas):
        nll_decay = ft_loss(model, batch).item()
    assert nll_free < nll_decay


def test_make_optimizer_variants():
    from massedit.editing.ft import make_optimizer

    p = {"w": torch.nn.Parameter(torch.ones(2, 2))}
    w0 = {"w": torch.zeros(2, 2)}
    opt = make_optimizer(p, w0, FTConfig(decay_to="zero"), 0.3)  # plain decoupled AdamW
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.3 and opt._anchors is None
    opt = make_optimizer(p, w0, FTConfig(decay_to="init"), 0.3)  # decay of W - W0, decoupled
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt._anchor_wd == 0.3 and opt._anchors is not None
    opt = make_optimizer(p, w0, FTConfig(optimizer="adam"), 0.3)  # reference: coupled L2
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["weight_decay"] == 0.3
    assert list(opt.param_groups[0]["params"]) == [p["w"]]  # tuned weights only


def test_reference_adam_and_autoregressive_variants_train():
    model, tok = tiny_model("llama")
    reqs = _requests()
    for kw in ({"optimizer": "adam", "weight_decay": 1e-3}, {"loss": "autoregressive"}):
        res = _train(model, tok, reqs, epochs=6, **kw)
        assert res.epoch_losses[-1] < res.epoch_losses[0]


def test_editor_leaves_model_as_found_and_returns_deltas():
    from massedit.tasks.config import compose
    from massedit.tasks.methods import build_editor

    for name in ("ftw", "ft", "ftl"):
        assert isinstance(build_editor(compose("edit", [f"method={name}"])), FTEditor)
    model, tok = tiny_model("llama")
    model.train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)  # an unrelated flag that must survive
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    reqs = _requests()
    editor = FTEditor(FTConfig(lr=0.05, epochs=5, layers=[1], weight_decay=0.1), TrainerConfig(enable_progress_bar=False,
                                                                                             precision="32-true"))
    deltas = editor.edit(model, tok, reqs)
    assert list(deltas) == ["model.layers.1.mlp.down_proj.weight"]
    assert editor.info["n_requests"] == len(reqs) and editor.info["optimizer_steps"] > 0
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training
    model.eval()
    batch = make_ft_batch(tok, reqs)
    with torch.no_grad():
        pre = ft_loss(model, batch).item()
        with deltas_applied(model, deltas):
            post = ft_loss(model, batch).item()
    assert post < pre


def test_true_precision_that_would_convert_the_model_is_refused():
    model, tok = tiny_model("gpt2")
    with pytest.raises(TrainerConfigError, match="convert"):
        fit_ft(model, tok, _requests(), FTConfig(epochs=1), trainer_cfg=TrainerConfig(precision="bf16-true"))


@pytest.mark.slow
def test_ftw_on_smollm2_makes_edits(smollm2, shared_dir):
    from massedit.data.requests import load_requests

    model, tok = smollm2
    reqs = load_requests(shared_dir / "data/counterfact/counterfact_dev.json", num_edits=8)
    res = fit_ft(model, tok, reqs, FTConfig(lr=2e-2, epochs=6, weight_decay=0.0), trainer_cfg=QUIET)
    batch = make_ft_batch(tok, reqs)
    with torch.no_grad():
        pre = ft_loss(model, batch).item()
        with deltas_applied(model, res.deltas):
            post = ft_loss(model, batch).item()
    assert post < 0.5 * pre


def test_mixed_precision_and_bf16_models_train():
    model, tok = tiny_model("llama")
    res = fit_ft(model, tok, _requests(), FTConfig(epochs=3, lr=0.05),
                 trainer_cfg=TrainerConfig(enable_progress_bar=False, precision="bf16-mixed"))
    assert res.epoch_losses[-1] < res.epoch_losses[0]
    assert all(d.dtype == torch.float32 for d in res.deltas.values())
    half, tok = tiny_model("llama", dtype=torch.bfloat16)
    before = {n: p.clone() for n, p in half.named_parameters()}
    res = fit_ft(half, tok, _requests(), FTConfig(epochs=3, lr=0.05), trainer_cfg=QUIET)
    assert res.epoch_losses[-1] < res.epoch_losses[0]
    assert all(p.dtype == torch.bfloat16 and torch.equal(before[n], p) for n, p in half.named_parameters())
