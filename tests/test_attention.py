"""The grouped attention of the block runner (:func:`grouped_attention`, ``hp.block_attention="grouped"``) computes the
model's attention: against transformers' eager arithmetic with repeated key/value heads in float64 (outputs and
gradients, boolean and additive masks, grouped-query and plain multi-head), and through :meth:`ArchAdapter.run_blocks`
on tiny models of every family against the model's own implementation. The switch is in force only while the blocks
run and the model's setting comes back afterwards, also after an error."""
import pytest
import torch

from massedit.core.adapters import PrefixKVCache, get_adapter
from massedit.core.attention import GROUPED, attention_implementation, grouped_attention
from massedit.editing.hparams import EditHparams, HparamsError
from massedit.testing import FAMILIES, tiny_model


def _eager(query, key, value, mask, scaling):
    """transformers' eager attention: repeat the key/value heads, then softmax(q kᵀ s + mask) v."""
    g = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    s = query @ key.transpose(-1, -2) * scaling
    if mask.dtype == torch.bool:
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    else:
        s = s + mask
    return (torch.softmax(s, -1) @ value).transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (6, 1)])
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "per_head"])
def test_grouped_attention_equals_eager_float64(heads, kv_heads, mask_kind):
    g = torch.Generator().manual_seed(0)
    B, Q, K, D = 5, 4, 11, 8
    q = torch.randn(B, heads, Q, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, kv_heads, K, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, kv_heads, K, D, generator=g, dtype=torch.float64, requires_grad=True)
    allowed = torch.rand(B, heads if mask_kind == "per_head" else 1, Q, K, generator=g) > 0.4
    allowed[..., 0] = True
    mask = allowed if mask_kind != "additive" else torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(
        ~allowed, torch.finfo(torch.float64).min)
    out, weights = grouped_attention(None, q, k, v, mask, scaling=0.37)
    ref = _eager(q, k, v, mask, 0.37)
    assert weights is None and out.shape == (B, Q, heads, D)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), go)
    grads_ref = torch.autograd.grad(ref, (q, k, v), go)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_grouped_attention_refuses_heads_that_do_not_group():
    q, kv = torch.zeros(1, 4, 2, 8), torch.zeros(1, 3, 2, 8)
    with pytest.raises(ValueError, match="4 query heads"):
        grouped_attention(None, q, kv, kv, None)


def _lanes(B, Q, P, generator):
    """A cached prefix of P keys and Q new tokens per lane, each query seeing a random part of the prefix and the
    new tokens causally (as the target step's lanes)."""
    prefix = torch.rand(B, Q, P, generator=generator) > 0.5
    causal = torch.ones(Q, Q, dtype=torch.bool).tril()[None].expand(B, Q, Q)
    return torch.cat([prefix, causal], dim=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_run_blocks_grouped_equals_model_attention(family):
    model, tok = tiny_model(family, dtype=torch.float64)
    a = get_adapter(model)
    g = torch.Generator().manual_seed(1)
    B, P, Q, d = 3, 5, 4, a.hidden_size
    h_prefix = torch.randn(B, P, d, generator=g, dtype=torch.float64)
    cache = PrefixKVCache()
    causal = torch.ones(P, P, dtype=torch.bool).tril()[None].expand(B, P, P)
    a.run_blocks(h_prefix, 1, a.num_layers - 1, allowed=causal, position_ids=torch.arange(P)[None].expand(B, P),
                 cache=cache, attention="model")
    cache.recording = False
    x = torch.randn(B, Q, d, generator=g, dtype=torch.float64, requires_grad=True)
    allowed, pos = _lanes(B, Q, P, g), (P + torch.arange(Q))[None].expand(B, Q)
    outs = {}
    for attention in ("model", "grouped"):
        hs = a.run_blocks(x, 1, a.num_layers - 1, allowed=allowed, position_ids=pos, cache=cache, keep=(2,),
                          attention=attention)
        grad, = torch.autograd.grad(hs[a.num_layers - 1].sum() + hs[2].square().sum(), x)
        outs[attention] = (hs[2], hs[a.num_layers - 1], grad)
    for m, gr in zip(outs["model"], outs["grouped"]):
        assert torch.allclose(gr, m, rtol=1e-10, atol=1e-12), family


def test_run_blocks_switches_the_attention_only_while_it_runs():
    model, _ = tiny_model("llama")
    a = get_adapter(model)
    seen = []
    attn = next(m for n, m in model.named_modules() if n.endswith("self_attn"))
    attn.register_forward_pre_hook(lambda mod, args: seen.append(mod.config._attn_implementation))
    before = model.config._attn_implementation
    h = torch.randn(2, 3, a.hidden_size)
    allowed = torch.ones(3, 3, dtype=torch.bool).tril()[None].expand(2, 3, 3)
    pos = torch.arange(3)[None].expand(2, 3)
    a.run_blocks(h, 0, a.num_layers - 1, allowed=allowed, position_ids=pos, attention="grouped")
    a.run_blocks(h, 0, a.num_layers - 1, allowed=allowed, position_ids=pos)
    assert seen == [GROUPED, before]
    assert model.config._attn_implementation == before
    with pytest.raises(RuntimeError, match="boom"):
        with attention_implementation(model.config, GROUPED):
            assert model.config._attn_implementation == GROUPED
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    with pytest.raises(ValueError, match="attention must be"):
        a.run_blocks(h, 0, 0, allowed=allowed, position_ids=pos, attention="flash")


def test_configs_the_grouped_attention_does_not_compute_keep_the_model_attention():
    model, _ = tiny_model("gpt2")
    model.config.reorder_and_upcast_attn = True
    model.config._attn_implementation = "eager"
    for m in model.modules():
        if hasattr(m, "reorder_and_upcast_attn"):
            m.reorder_and_upcast_attn = True
    a = get_adapter(model)
    assert "reorder_and_upcast_attn" in a.grouped_attention_unsupported()
    seen = []
    attn = next(m for n, m in model.named_modules() if n.endswith(".attn"))
    attn.register_forward_pre_hook(lambda mod, args: seen.append(mod.config._attn_implementation))
    h = torch.randn(1, 3, a.hidden_size)
    a.run_blocks(h, 0, 0, allowed=torch.ones(1, 3, 3, dtype=torch.bool).tril(),
                 position_ids=torch.arange(3)[None], attention="grouped")
    assert seen == ["eager"]
    assert get_adapter(tiny_model("llama")[0]).grouped_attention_unsupported() is None


def test_block_attention_hparam_validated():
    assert EditHparams(layers=[1]).block_attention == "grouped"
    with pytest.raises(HparamsError, match="block_attention"):
        EditHparams(layers=[1], block_attention="flash")
