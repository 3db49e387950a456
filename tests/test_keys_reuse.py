"""MEMIT's keys read with the residual stream kept between layers (:class:`MemitKeyReader`, ``keys_reuse_max_gib``)
equal the keys of a full forward per layer (the reference's arithmetic), while the layers are edited one after
another as MEMIT does; in float64 on tiny models of every family the two agree to 1e-10. A block below the last read
layer that changes afterwards is refused; a stream that would not fit the budget falls back to full forwards.
"""
import pytest
import torch

from massedit.core.adapters import get_adapter
from massedit.data.requests import EditRequest
from massedit.editing.keys import LayerwiseReader, MemitKeyReader, memit_keys
from massedit.testing import FAMILIES, tiny_model

GROUPS = [["{}"], ["The city. {}", "I think that this is what they said. {}"]]
REQS = [
    EditRequest(case_id=1, subject="The Eiffel Tower", prompt="{} is located in the city of", target_new="Rome"),
    EditRequest(case_id=2, subject="Michael Jordan", prompt="{} plays", target_new="guitar"),
    EditRequest(case_id=3, subject="Toko Yasuda", prompt="The mother tongue of {} is", target_new="Dutch"),
    EditRequest(case_id=4, subject="Paris", prompt="{}, the capital of", target_new="Japan"),
]
LAYERS = [1, 2, 3]


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _read_all(model, tok, max_gib, seed=0):
    """K, H at each layer, editing each layer's rewrite weight (a random update) right after reading it."""
    a = get_adapter(model)
    g = torch.Generator().manual_seed(seed)
    reader = MemitKeyReader(model, tok, a, REQS, GROUPS, LAYERS[-1], "subject_last", LAYERS[0], max_gib=max_gib)
    out = []
    for l in LAYERS:
        out.append(reader.read(l))
        w = a.rewrite_weight(l)
        with torch.no_grad():
            w.add_(0.3 * w.norm() / w.numel() ** 0.5 * torch.randn(w.shape, generator=g, dtype=w.dtype))
    return out, reader


@pytest.mark.parametrize("family", FAMILIES)
def test_reused_stream_equals_full_forward_per_layer(family):
    model, tok = tiny_model(family, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    full, r_full = _read_all(model, tok, max_gib=None)
    model.load_state_dict(state)
    reused, r_reused = _read_all(model, tok, max_gib=8.0)
    assert not r_full.reuse and r_reused.reuse
    for l, (Kf, Hf), (Kr, Hr) in zip(LAYERS, full, reused):
        assert Kf.shape == Kr.shape == (get_adapter(model).mlp_inner_size, len(REQS))
        assert Hf.shape == Hr.shape == (get_adapter(model).hidden_size, len(REQS))
        assert _rel(Kr, Kf) < 1e-10, (family, l)
        assert _rel(Hr, Hf) < 1e-10, (family, l)
    # the edits matter: later layers' keys differ from those of the unedited model
    model.load_state_dict(state)
    K3 = memit_keys(model, tok, get_adapter(model), LAYERS[-1], REQS, GROUPS)
    assert _rel(reused[-1][0], K3) > 1e-3


def test_changed_block_below_the_read_layer_is_refused():
    model, tok = tiny_model("llama", dtype=torch.float64)
    a = get_adapter(model)
    ctx = [t.format(r.prompt) for r in REQS for g in GROUPS for t in g]
    words = [r.subject for r in REQS for g in GROUPS for _ in g]
    reader = LayerwiseReader(model, tok, a, ctx, words, first=1)
    reader.module_inputs(2, a.rewrite_name(2))
    with torch.no_grad():
        a.rewrite_weight(1).mul_(1.1)  # below the stored stream (layer 2)
    with pytest.raises(RuntimeError, match="changed after its stream was stored"):
        reader.module_inputs(3, a.rewrite_name(3))
    with pytest.raises(ValueError, match="ascending"):
        reader.module_inputs(1, a.rewrite_name(1))


def test_over_budget_falls_back_to_full_forwards():
    model, tok = tiny_model("gpt2", dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    small, r = _read_all(model, tok, max_gib=1e-9)
    assert not r.reuse
    model.load_state_dict(state)
    full, _ = _read_all(model, tok, max_gib=None)
    for (Ks, Hs), (Kf, Hf) in zip(small, full):
        assert torch.equal(Ks, Kf) and torch.equal(Hs, Hf)


def test_gpu_budget_is_a_quarter_of_free_memory(monkeypatch):
    """On a GPU the kept streams may take at most a quarter of its free memory, whatever keys_reuse_max_gib says
    (checked on CPU: the streams are said to need 1 GiB and the first edited block to compute on cuda:0)."""
    import massedit.editing.keys as keys

    model, tok = tiny_model("gpt2", dtype=torch.float64)
    a = get_adapter(model)
    monkeypatch.setattr(keys, "layerwise_reader_bytes", lambda *args, **kw: 2**30)
    monkeypatch.setattr(keys, "execution_device", lambda m, name: torch.device("cuda", 0))
    built = []
    monkeypatch.setattr(keys, "LayerwiseReader", lambda *args, **kw: built.append(1) or (_ for _ in ()).throw(
        RuntimeError("streams built")))
    for free_gib, reuse in ((3.9, False), (4.1, True)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None, f=free_gib: (int(f * 2**30), 80 * 2**30))
        r = MemitKeyReader(model, tok, a, REQS, GROUPS, LAYERS[-1], "subject_last", LAYERS[0], max_gib=8.0)
        if reuse:
            with pytest.raises(RuntimeError, match="streams built"):
                r.read(LAYERS[0])
        else:
            r.read(LAYERS[0])  # one full forward per layer, on the CPU model
            assert not r.reuse and not built
