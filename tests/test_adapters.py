"""Architecture adapters: every accessor checked against a real forward pass of a tiny model per family."""
import pytest
import torch

from massedit.core.adapters import UnsupportedArchitectureError, get_adapter
from massedit.core.nethook import Trace, TraceDict
from massedit.testing import FAMILIES, tiny_model

EXPECTED = {
    "gpt2": ("transformer.h.1.mlp.c_proj", True, True),
    "gptj": ("transformer.h.1.mlp.fc_out", False, False),
    "gpt_neox": ("gpt_neox.layers.1.mlp.dense_4h_to_h", False, False),
    "llama": ("model.layers.1.mlp.down_proj", False, True),
}


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    model, tok = tiny_model(request.param, n_layer=3)
    return request.param, model, tok, get_adapter(model)


def _inputs(tok):
    return tok(["The Eiffel Tower is located in Paris", "Danielle Darrieux"], return_tensors="pt", padding=True)


def test_sizes_and_names(fam):
    family, model, tok, a = fam
    rewrite, conv1d, tied = EXPECTED[family]
    assert a.num_layers == 3
    assert a.hidden_size == 32 and a.mlp_inner_size == 64
    assert a.rewrite_name(1) == rewrite
    assert a.rewrite_weight_name(1) == rewrite + ".weight"
    assert a.rewrite_weight_name(1) in dict(model.named_parameters())
    assert a.conv1d is conv1d
    assert a.lm_head_tied is tied
    assert a.context_length == 128
    with pytest.raises(IndexError):
        a.rewrite_name(3)
    for name in a.mlp_in_names(0):
        assert isinstance(model.get_submodule(name), torch.nn.Module)


@torch.no_grad()
def test_key_times_weight_is_value(fam):
    """The hooked rewrite input (key) mapped by the [d, m] weight (+ bias) equals the hooked output (value)."""
    _, model, tok, a = fam
    with Trace(model, a.rewrite_name(1), retain_input=True, retain_output=True) as tr:
        model(**_inputs(tok))
    k, v = tr.input, tr.output
    assert k.shape[-1] == a.mlp_inner_size and v.shape[-1] == a.hidden_size
    W = a.from_param_layout(a.rewrite_weight(1))
    assert W.shape == (a.hidden_size, a.mlp_inner_size)
    b = a.rewrite_module(1).bias
    pred = k @ W.T + (b if b is not None else 0)
    torch.testing.assert_close(pred, v, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_mlp_output_is_rewrite_output(fam):
    _, model, tok, a = fam
    with TraceDict(model, [a.mlp_name(2), a.rewrite_name(2)]) as td:
        model(**_inputs(tok))
    mlp_out = td[a.mlp_name(2)].output
    mlp_out = mlp_out[0] if isinstance(mlp_out, tuple) else mlp_out
    torch.testing.assert_close(mlp_out, td[a.rewrite_name(2)].output)


@torch.no_grad()
def test_block_output_and_unembedding(fam):
    """Block i output == hidden_states[i+1]; final norm + LM head on the last block output == logits."""
    _, model, tok, a = fam
    enc = _inputs(tok)
    with TraceDict(model, [a.block_name(i) for i in range(a.num_layers)]) as td:
        out = model(**enc, output_hidden_states=True)
    for i in range(a.num_layers - 1):
        torch.testing.assert_close(a.block_hidden(td[a.block_name(i)].output), out.hidden_states[i + 1])
    last = a.block_hidden(td[a.block_name(a.num_layers - 1)].output)
    torch.testing.assert_close(a.unembed(last), out.logits, rtol=1e-4, atol=1e-4)
    assert a.lm_head_weight().shape == (len(tok), a.hidden_size)


def test_param_layout_roundtrip(fam):
    _, model, tok, a = fam
    D = torch.randn(a.hidden_size, a.mlp_inner_size)
    P = a.to_param_layout(D)
    assert P.shape == a.rewrite_weight(0).shape
    torch.testing.assert_close(a.from_param_layout(P), D)


def _count_starts(modules):
    """Forward-pre-hooks counting how often each module's forward started."""
    calls = {name: 0 for name in modules}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: calls.__setitem__(n, calls[n] + 1))
               for name, m in modules.items()]
    return calls, handles


@torch.no_grad()
@pytest.mark.parametrize("stop", [True, False])
def test_stop_forward_early(fam, stop):
    """``stop=True`` ends the forward right after the (last) traced module: later blocks and the head never start."""
    _, model, tok, a = fam
    watched = {f"block{i}": a.block(i) for i in range(3)}
    watched["lm_head"] = a.lm_head
    calls, handles = _count_starts(watched)
    try:
        out = "not returned"
        with TraceDict(model, [a.rewrite_name(1), a.rewrite_name(0)], retain_input=True, stop=stop) as td:
            out = model(**_inputs(tok))   # stops (if at all) after block 1's rewrite module, the last one to run
        assert td[a.rewrite_name(0)].input is not None and td[a.rewrite_name(1)].input is not None
        with TraceDict(model, [a.rewrite_name(0), a.mlp_name(0)], stop=stop) as td:
            model(**_inputs(tok))          # nested: stops after block 0's MLP, which contains the rewrite module
        assert td[a.rewrite_name(0)].output is not None and td[a.mlp_name(0)].output is not None
        with Trace(model, a.rewrite_name(2), stop=stop) as t:
            model(**_inputs(tok))          # one module: stops inside the last block, before the head
        assert t.output is not None
    finally:
        for h in handles:
            h.remove()
    if stop:
        assert out == "not returned"  # the first forward never returned
        assert calls == {"block0": 3, "block1": 2, "block2": 1, "lm_head": 0}  # nothing after the stop started
    else:
        assert out is not None and calls == {"block0": 3, "block1": 3, "block2": 3, "lm_head": 3}


def test_unsupported_architecture():
    from transformers import BertConfig, BertForMaskedLM

    m = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(UnsupportedArchitectureError, match="bert"):
        get_adapter(m)
