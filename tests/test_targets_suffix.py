"""The suffix forward of the target optimisation (``targets_forward="suffix"``: prefix K/V cached once, per step
only the positions from the subject token on through the blocks above the edit point) gives the targets of the
whole-row forward (``"full"``).

In float64 the two agree to rounding far below the tolerance used here (relative 1e-5, identical Adam step
counts; measured: exactly equal, δ being float32); in float32 Adam's normalised steps amplify rounding where
gradients are near zero, so the float32 check uses the fixtures' 1e-3. Rows differ in length (templates of
different lengths, the short KL row, a subject at the very start) so padding of both prefix and suffix is exercised;
early stops shrink the batch mid-run.
"""
import pytest
import torch

from massedit.core.adapters import PrefixKVCache, get_adapter
from massedit.data.requests import EditRequest
from massedit.editing.hparams import EditHparams, HparamsError
from massedit.editing.prefix_forest import build_forest
from massedit.editing.targets import build_target_problem, optimise_targets, pack_rows, suffix_spans
from massedit.testing import FAMILIES, tiny_model

TEMPLATES = ["{}", "The city. {}", "I think that this is what they said. {}"]
REQS = [
    EditRequest(case_id=1, subject="The Eiffel Tower", prompt="{} is located in the city of", target_new="Rome"),
    EditRequest(case_id=2, subject="Michael Jordan", prompt="{} plays", target_new="guitar"),
    EditRequest(case_id=3, subject="Windows Server 2003", prompt="{} is a product of", target_new="BMW Italian"),
    EditRequest(case_id=4, subject="Toko Yasuda", prompt="The mother tongue of {} is", target_new="Dutch"),
    EditRequest(case_id=5, subject="Paris", prompt="{}, the capital of", target_new="Japan"),
]
TOL64 = 1e-5
TOL32 = 1e-3


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _hp(block: bool, **kw):
    base = dict(layers=[1], v_num_grad_steps=8, v_lr=0.5, clamp_norm_factor=0.75 if block else 4.0, v_weight_decay=0.5,
                early_stop_loss=5.9)
    base.update(kw)
    return EditHparams(**base)


def _run(model, tok, hp, layer: int, block: bool, mode: str, nll_layer: int | None = None, **kw):
    a = get_adapter(model)
    probs = [build_target_problem(tok, r, TEMPLATES) for r in REQS]
    # "full": the model's own whole forward at every step (hooks only, no frozen-prefix reuse) as the reference
    return optimise_targets(model, tok, probs, hp.replace(targets_forward=mode, reuse_frozen_prefix=mode != "full"),
                            edit_module=a.block_name(layer) if block else a.mlp_name(layer), edit_is_block=block,
                            nll_block=None if nll_layer is None else a.block_name(nll_layer),
                            prefix_block=layer if block else layer - 1, progress=False, **kw)


def _staggering_threshold(results) -> float:
    """An early-stop threshold at which the requests stop at the most different steps (the batch shrinks mid-run)."""
    losses = torch.stack([r.loss_trace[:, 1] for r in results])  # [n, steps]

    def stops(thr):
        return {int(torch.nonzero(row < thr)[0]) if bool((row < thr).any()) else -1 for row in losses}

    return max((float(v) + 1e-9 for v in losses.flatten()), key=lambda thr: len(stops(thr)))


def _compare(suffix, full, tol):
    for x, y in zip(suffix, full, strict=True):
        assert x.n_adam_steps == y.n_adam_steps and x.early_stopped == y.early_stopped
        assert _rel(x.init, y.init) <= tol
        assert _rel(x.target, y.target) <= tol
        assert torch.allclose(x.loss_trace, y.loss_trace, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("block", [True, False], ids=["memit_block", "rome_mlp"])
def test_suffix_equals_full_float64(family, block):
    torch.set_num_threads(1)
    model, tok = tiny_model(family, seed=0, dtype=torch.float64)
    probe = _run(model, tok, _hp(block, early_stop_loss=0.0), 1, block, "full")
    hp = _hp(block, early_stop_loss=_staggering_threshold(probe))
    full = _run(model, tok, hp, 1, block, "full")
    suffix = _run(model, tok, hp, 1, block, "suffix")
    steps = [r.n_adam_steps for r in full]
    assert len(set(steps)) > 1 and max(steps) > 0
    _compare(suffix, full, TOL64)


@pytest.mark.parametrize("family", FAMILIES)
def test_suffix_equals_full_edge_layers(family):
    """Edit at the last block (nothing above it), ROME at layer 0 (no frozen blocks), the NLL read below the top."""
    torch.set_num_threads(1)
    model, tok = tiny_model(family, seed=1, dtype=torch.float64)
    last = get_adapter(model).num_layers - 1
    for layer, block, nll in ((last, True, None), (0, False, None), (1, True, 2), (1, True, 1)):
        hp = _hp(block, v_num_grad_steps=5, early_stop_loss=0.0)
        full = _run(model, tok, hp, layer, block, "full", nll_layer=nll)
        suffix = _run(model, tok, hp, layer, block, "suffix", nll_layer=nll)
        _compare(suffix, full, TOL64)


@pytest.mark.parametrize("family", FAMILIES)
def test_suffix_equals_full_float32_batched(family):
    """float32, sub-batches of one request and of all: the same targets as the whole-row forward."""
    torch.set_num_threads(1)
    model, tok = tiny_model(family, seed=0)
    hp = _hp(True)
    full = _run(model, tok, hp, 1, True, "full", batched=False)
    for max_tokens in (1, 10_000):
        _compare(_run(model, tok, hp, 1, True, "suffix", batched=True, step_tokens=max_tokens), full, TOL32)
    # the once-per-group forwards in chunks of a single lane
    _compare(_run(model, tok, hp, 1, True, "suffix", batched=True, max_tokens=1), full, TOL32)


def test_suffix_runs_only_the_suffix_and_the_frozen_blocks_once():
    """Blocks up to the edit point run once per group; blocks above it see only the suffix positions per step, in
    length buckets (a silent fall-back to whole rows would fail here); no module of the model is replaced."""
    model, tok = tiny_model("llama", seed=0)
    a = get_adapter(model)
    before = {n: id(m) for n, m in model.named_modules()}
    calls = {0: [], 3: []}
    hooks = [a.block(i).register_forward_pre_hook(lambda m, args, kw, i=i: calls[i].append(
        tuple((args[0] if args else kw["hidden_states"]).shape[:2])), with_kwargs=True) for i in calls]
    try:
        hp = _hp(True, v_num_grad_steps=4, early_stop_loss=0.0)
        res = _run(model, tok, hp, 1, True, "suffix")
    finally:
        for h in hooks:
            h.remove()
    probs = [build_target_problem(tok, r, TEMPLATES) for r in REQS]
    width = max(p.max_len for p in probs)
    rows = sum(p.n_rows for p in probs)
    ids = [r for p in probs for r in p.input_ids]
    spans = [sp for p in probs for sp in suffix_spans(p)]
    whole, prefix = build_forest(ids, [e for _, e in spans], 128, 0), build_forest(ids, [s for s, _ in spans], 128, 0)
    # the frozen part: one forward of the rows' distinct prefixes (fewer slots than the rows have positions)
    assert calls[0] == [(whole.n_lanes, whole.width)] and whole.n_slots < sum(e for _, e in spans)
    assert len(calls[3]) == 1 + hp.v_num_grad_steps  # prefix pass + one suffix pass per step
    assert calls[3][0] == (prefix.n_lanes, prefix.width) and prefix.n_slots < sum(s for s, _ in spans)
    lanes, w = calls[3][1]
    real = sum(b - a for a, b in spans)
    assert w < width / 2                          # the suffix is short: subject token .. end of the row
    assert lanes < rows and lanes * w < 1.5 * real  # rows share lanes: little padding
    assert all(r.n_adam_steps == 3 for r in res)
    assert {n: id(m) for n, m in model.named_modules()} == before


@pytest.mark.parametrize("family", ["gptj", "gpt_neox", "llama"])
def test_broken_prefix_cache_or_positions_are_caught(family, monkeypatch):
    """The equivalence check can fail: prefix K/V of the wrong rows, or suffix positions restarting at 0 (rotary
    families), change the targets far beyond the tolerance."""
    torch.set_num_threads(1)
    model, tok = tiny_model(family, seed=0, dtype=torch.float64)
    hp = _hp(True, v_num_grad_steps=4, early_stop_loss=0.0)
    full = _run(model, tok, hp, 1, True, "full")

    def err():
        return max(_rel(x.target, y.target) for x, y in zip(_run(model, tok, hp, 1, True, "suffix"), full))

    assert err() <= TOL64
    real_gather = PrefixKVCache.gather
    with monkeypatch.context() as m:  # each lane gets the prefix K/V of the next lane
        def wrong_rows(self, rows, positions):
            out = real_gather(self, rows, positions)
            out.layers = {i: (k.roll(1, 0), v.roll(1, 0)) for i, (k, v) in out.layers.items()}
            return out
        m.setattr(PrefixKVCache, "gather", wrong_rows)
        assert err() > 10 * TOL64
    adapter_cls = type(get_adapter(model))
    real_run = adapter_cls.run_blocks
    with monkeypatch.context() as m:
        def shifted(self, hidden, start, stop, *, position_ids, cache=None, **kw):
            if cache is not None and not cache.recording:
                position_ids = position_ids - position_ids[:, :1]
            return real_run(self, hidden, start, stop, position_ids=position_ids, cache=cache, **kw)
        m.setattr(adapter_cls, "run_blocks", shifted)
        assert err() > 10 * TOL64


def test_autocast_is_ignored_on_cpu():
    model, tok = tiny_model("gpt2", seed=0)
    hp = _hp(True, v_num_grad_steps=3)
    a = _run(model, tok, hp, 1, True, "suffix")
    b = _run(model, tok, hp.replace(targets_autocast="bf16"), 1, True, "suffix")
    for x, y in zip(a, b):
        assert torch.equal(x.target, y.target)


def test_hparams_switches_validated():
    with pytest.raises(HparamsError, match="targets_forward"):
        EditHparams(layers=[1], targets_forward="prefix")
    with pytest.raises(HparamsError, match="targets_autocast"):
        EditHparams(layers=[1], targets_autocast="int8")
    assert EditHparams(layers=[1]).targets_forward == "suffix"


def test_pack_rows():
    """First fit by decreasing length: every row in one lane, no lane over its width, short rows share lanes."""
    lengths = [3, 1, 2, 6, 2, 5, 6, 1]
    lanes = pack_rows(lengths, 6)
    assert lanes == [[3], [6], [5, 1], [0, 2, 7], [4]]
    assert sorted(i for lane in lanes for i in lane) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in lane) <= 6 for lane in lanes)
    with pytest.raises(ValueError, match="row 3"):
        pack_rows(lengths, 5)


@pytest.mark.parametrize("pack", [True, False])
def test_suffix_equals_full_packed_or_not(pack):
    """Several rows per lane or one: the same targets (float64) as the whole-row forward."""
    torch.set_num_threads(1)
    model, tok = tiny_model("llama", seed=0, dtype=torch.float64)
    hp = _hp(True, v_num_grad_steps=5, early_stop_loss=0.0, targets_pack_rows=pack)
    _compare(_run(model, tok, hp, 1, True, "suffix"), _run(model, tok, hp, 1, True, "full"), TOL64)
