"""Second-moment statistics on the real SmolLM2 model vs the official fixture (slow)."""
from __future__ import annotations

import json

import pytest
import torch

from massedit.stats.collect import collect_layer_stats
from massedit.stats.reference import load_reference_stats


@pytest.mark.slow
def test_smollm2_layer6_statistics_match_reference_fixture(shared_dir, smollm2, tmp_path):
    """WikiText-2 test+valid packed into 2,500-char texts, the reference's 40-text sample (random.Random(1)),
    512 tokens each, sub-batches of <= 1536 tokens: C of layer 6 equals the fixture's to float32 rounding
    (an independent float64 re-computation agreed with it to 7.5e-8)."""
    model, tok = smollm2
    fx = shared_dir / "fixtures" / "smollm2" / "stats"
    sample = json.loads((fx / "sample.json").read_text())
    wt = shared_dir / "data" / "text" / "wikitext-2"
    cfg = dict(corpus=[str(wt / "test.txt"), str(wt / "valid.txt")], format="wikitext", packing="chars",
               chunk_chars=2500, unescape=False, n_samples=sample["n_samples"], n_tokens=None,
               max_length=sample["maxlen"], batch_tokens=sample["sub_batches"]["token_budget"],
               cache_dir=str(tmp_path / "cache"))
    module = "model.layers.6.mlp.down_proj"
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        st = collect_layer_stats(model, tok, [6], cfg, model_name="smollm2-135m", progress=False)[6]
    finally:
        torch.set_num_threads(n)
    ref_total, ref_count = load_reference_stats(fx / "smollm2-135m" / "wikitext_stats" / f"{module}_float32_mom2_40.npz")
    assert st.module == module and st.count == ref_count == 20480
    C_ref = ref_total / ref_count
    rel = float((st.C.double() - C_ref).norm() / C_ref.norm())
    print(f"SmolLM2 fixture, layer 6: relative Frobenius error of C {rel:.1e}")
    assert rel < 1e-5, rel
