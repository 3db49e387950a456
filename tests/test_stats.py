"""Second-moment statistics (massedit.stats, REFERENCE_SPEC §0.6): fast tests on tiny models."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from massedit.core.adapters import get_adapter
from massedit.core.nethook import Trace
from massedit.data.corpus import (CorpusError, CorpusNotAvailableError, CorpusSpec, build_token_batches,
                                         is_wikitext_top_heading, load_corpus, pack_lines_by_articles,
                                         pack_lines_by_chars, token_budget_batches, unescape_wikitext)
from massedit.stats import get_second_moment, get_second_moments
from massedit.stats.collect import (SimulatedInterruption, TorchEngine, collect_layer_stats, layer_stats_keys,
                                    prepare_corpus)
from massedit.stats.config import StatsConfig
from massedit.stats.moments import accumulate_batch
from massedit.stats.reference import export_layer_stats, load_reference_stats, reference_stats_path
from massedit.testing import tiny_model

WORDS = ("the cat sat on a mat while Paris is in France and Rome is in Italy ; music guitar piano "
         "Microsoft Windows Server product language French Dutch English city tower").split()


def _write_corpus(path: Path, n_docs: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = []
    for d in range(n_docs):
        lines.append(f" = Article {d} = ")
        lines.append("")
        for _ in range(int(rng.integers(1, 4))):
            lines.append(" " + " ".join(rng.choice(WORDS, size=int(rng.integers(5, 40)))) + " @-@ x @,@ 1 @.@ 5 .")
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def corpus_file(tmp_path):
    return _write_corpus(tmp_path / "wiki.txt")


def _cfg(corpus_file, tmp_path, **kw):
    base = dict(corpus=str(corpus_file), format="wikitext", packing="articles", n_samples=None, n_tokens=1500,
                max_length=48, batch_tokens=200, cache_dir=str(tmp_path / "cache"), checkpoint_every=0,
                checkpoint_seconds=0)
    base.update(kw)
    return base


def _engine(name, **trainer_kw):
    """The plain-torch engine, or the Lightning one on a CPU Trainer built like the job's."""
    if name == "torch":
        return TorchEngine()
    from massedit.lightning_modules.stats import LightningStatsEngine
    from massedit.trainer import TrainerConfig, build_trainer

    return LightningStatsEngine(build_trainer(TrainerConfig(accelerator="cpu", enable_progress_bar=False, **trainer_kw)))


# ------------------------------------------------------------------------------------------ corpus
def test_wikitext_unescape_headings_and_packing():
    assert unescape_wikitext("a 3 @-@ 4 b , 1 @,@ 000 and 2 @.@ 5") == "a 3-4 b , 1,000 and 2.5"
    assert is_wikitext_top_heading(" = Robert Boulter = ")
    assert not is_wikitext_top_heading(" = = Career = = ")
    lines = [" = A = ", "", " text a1 ", " = = Sec = = ", " text a2 ", " = B = ", " text b "]
    assert pack_lines_by_articles(lines) == ["= A =\ntext a1\n= = Sec = =\ntext a2", "= B =\ntext b"]
    texts = pack_lines_by_chars(["x" * 10, "", "y" * 10, "z" * 3], chunk_chars=20)
    assert texts == ["x" * 10 + "\n" + "y" * 10, "z" * 3]  # 11 + 11 >= 20 closes the first text


def test_token_budget_batches_reference_rule():
    # fixture sample.json: 40 texts of 512 tokens, budget 1536 -> 13 batches of 3 and one of 1
    groups = token_budget_batches([512] * 40, 1536, sort_window=100)
    assert [len(g) for g in groups] == [3] * 13 + [1]
    groups = token_budget_batches([5, 9, 7, 2, 30], 20, sort_window=100)
    assert groups[0] == [4] and all(max([5, 9, 7, 2, 30][i] for i in g) * len(g) <= 20 for g in groups[1:])
    assert sorted(i for g in groups for i in g) == list(range(5))


def test_corpus_loader_sampling_and_exact_token_count(corpus_file):
    _, tok = tiny_model("gpt2")
    corpus = load_corpus(CorpusSpec.from_config({"corpus": str(corpus_file), "format": "auto", "packing": "articles"}))
    assert corpus.identity["format"] == "wikitext" and len(corpus.docs) == 40
    assert all(d.startswith("= Article") for d in corpus.docs) and " @-@ " not in corpus.docs[0]
    tb = build_token_batches(tok, corpus.docs, max_length=32, batch_tokens=100, n_tokens=777, seed=1)
    assert tb.n_tokens == 777 == sum(tb.batch_token_counts())
    assert max(len(s) for b in tb.batches for s in b) <= 32
    tb2 = build_token_batches(tok, corpus.docs, max_length=32, batch_tokens=100, n_samples=5, n_tokens=None, seed=1)
    assert tb2.n_docs == 5 and tb2.doc_indices == tb.doc_indices[:5]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fast_truncated_encoding_equals_tokenizer_truncation(family):
    from massedit.data.corpus import _encode_truncated

    _, tok = tiny_model(family)
    texts = ["Paris is in France. " * 300, "short text", "x" * 5000, "a b " * 3000, "  " * 900 + "end", ""]
    ref = tok(texts, truncation=True, max_length=20)["input_ids"]
    assert _encode_truncated(tok, texts, 20, True, char_cap=2) == ref


def test_missing_corpus_and_hf_without_datasets_give_clear_errors(tmp_path):
    with pytest.raises(CorpusNotAvailableError, match="does not exist"):
        load_corpus(CorpusSpec.from_config({"corpus": str(tmp_path / "nope.txt")}))
    with pytest.raises(CorpusError, match="format"):
        CorpusSpec.from_config({"corpus": "x", "format": "xml"})
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed")
    except ImportError:
        pass
    with pytest.raises(CorpusNotAvailableError, match="wikitext-2"):
        load_corpus(CorpusSpec.from_config({"corpus": "hf:wikitext:wikitext-103-raw-v1"}))


def test_hf_corpus_path_with_a_stub_datasets_module(monkeypatch):
    """The hf:NAME[:CONFIG] path (offline, with a stand-in for `datasets.load_dataset`)."""
    import sys
    import types

    calls = []

    class FakeDataset:
        column_names = ["text"]
        _fingerprint = "fp0"

        def __init__(self, rows):
            self.rows = rows

        def __getitem__(self, key):
            assert key == "text"
            return self.rows

    def load_dataset(name, config=None, split=None, revision=None):
        calls.append((name, config, split, revision))
        if name == "wikitext":  # records are lines of the WikiText files
            return FakeDataset([" = A = \n", "", " x @-@ y \n", " = B = \n", " z \n"])
        return FakeDataset(["article one", "", "article two"])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    c = load_corpus(CorpusSpec.from_config({"corpus": "hf:wikitext:wikitext-103-raw-v1", "packing": "articles"}))
    assert calls[-1] == ("wikitext", "wikitext-103-raw-v1", "train", None)
    assert c.docs == ["= A =\nx-y", "= B =\nz"] and c.ds_name == "wikitext" and c.identity["fingerprint"] == "fp0"
    c = load_corpus(CorpusSpec.from_config({"corpus": "hf:wikimedia/wikipedia:20231101.en"}))
    assert c.docs == ["article one", "article two"] and c.ds_name == "wikipedia"


# ------------------------------------------------------------------------------------------ math
def _naive_C(model, tok, layer, cfg) -> tuple[torch.Tensor, int]:
    """One full forward per document (no padding, no early stop), keys of one layer, float64."""
    s = StatsConfig.from_config(cfg)
    corpus = prepare_corpus(s)
    tb = build_token_batches(tok, corpus.docs, max_length=s.max_length, batch_tokens=10**9, seed=s.seed,
                             n_samples=s.n_samples, n_tokens=s.n_tokens)
    name = get_adapter(model).rewrite_name(layer)
    total, n = 0, 0
    for batch in tb.batches:
        for seq in batch:
            with Trace(model, name, retain_input=True, retain_output=False) as tr:
                model(input_ids=torch.tensor([seq]))
            k = tr.input[0].double()
            total = total + k.T @ k
            n += k.shape[0]
    return (total / n).float(), n


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_pass_multi_layer_equals_naive_per_layer(family, corpus_file, tmp_path):
    model, tok = tiny_model(family, n_layer=4)
    cfg = _cfg(corpus_file, tmp_path, cache=False)
    stats = collect_layer_stats(model, tok, [3, 0, 2], cfg, progress=False)
    assert sorted(stats) == [0, 2, 3]
    for layer in (0, 2, 3):
        C_naive, n = _naive_C(model, tok, layer, cfg)
        assert stats[layer].count == n == 1500  # pads never counted
        C = stats[layer].C
        assert C.dtype == torch.float32 and C.shape == (64, 64)
        assert torch.allclose(C, C_naive, rtol=1e-5, atol=1e-6 * float(C_naive.abs().max()))


@pytest.mark.parametrize("blocks", [1, 2, 3, 4])
def test_upper_block_accumulation_equals_full_outer_product(blocks):
    from massedit.stats.moments import add_second_moment_upper_blocks, symmetrize_upper_blocks

    g = torch.Generator().manual_seed(0)
    acc = torch.zeros(50, 50, dtype=torch.float64)
    full = torch.zeros(50, 50, dtype=torch.float64)
    for n in (7, 13):
        k = torch.randn(n, 50, generator=g)
        add_second_moment_upper_blocks(acc, k, blocks)
        full += k.double().T @ k.double()
    out = symmetrize_upper_blocks(acc, blocks)
    assert torch.allclose(out, full, rtol=1e-12, atol=1e-12) and torch.allclose(out, out.T, rtol=1e-12, atol=1e-12)


def test_pads_do_not_change_sums():
    model, tok = tiny_model("llama", n_layer=2)
    name = [get_adapter(model).rewrite_name(1)]
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    padded = {"input_ids": torch.tensor([seqs[0], seqs[1] + [0, 0, 0]]),
              "attention_mask": torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])}
    s1 = {name[0]: torch.zeros(64, 64, dtype=torch.float64)}
    assert accumulate_batch(model, padded, name, s1) == 9
    s2 = {name[0]: torch.zeros(64, 64, dtype=torch.float64)}
    for seq in seqs:
        accumulate_batch(model, {"input_ids": torch.tensor([seq]), "attention_mask": torch.ones(1, len(seq), dtype=torch.long)},
                         name, s2)
    # keys from a padded and an unpadded float32 forward differ only by rounding; a counted pad row would not
    assert torch.allclose(s1[name[0]], s2[name[0]], rtol=1e-5, atol=1e-6 * float(s2[name[0]].abs().max()))


def test_lightning_engine_equals_torch_engine(corpus_file, tmp_path):
    model, tok = tiny_model("gpt_neox", n_layer=3)
    a = get_second_moments(model, tok, [1, 2], _cfg(corpus_file, tmp_path, cache=False), progress=False,
                           engine=_engine("torch"))
    b = get_second_moments(model, tok, [1, 2], _cfg(corpus_file, tmp_path, cache=False), progress=False,
                           engine=_engine("lightning"))
    for layer in (1, 2):
        assert torch.equal(a[layer], b[layer])


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_forward_with_fp32_accumulation_matches_fp32(half, corpus_file, tmp_path):
    """Tolerance: relative Frobenius error of C below 2e-2 (bf16, 8-bit mantissa) / 4e-3 (fp16, 11-bit)."""
    model, tok = tiny_model("llama", n_layer=3)
    C32 = get_second_moment(model, tok, 2, _cfg(corpus_file, tmp_path, cache=False), progress=False)
    model_h, _ = tiny_model("llama", n_layer=3, dtype=half)
    st = collect_layer_stats(model_h, tok, [2], _cfg(corpus_file, tmp_path, cache=False, dtype="float32"), progress=False)[2]
    assert st.total.dtype == torch.float32
    Ch = st.C
    rel = float((Ch - C32).norm() / C32.norm())
    tol = 4e-3 if half == torch.float16 else 2e-2
    assert rel < tol, rel
    assert rel > 0  # the half forward did run in half precision


# ------------------------------------------------------------------------------------------ cache
def test_cache_key_changes_with_every_input(corpus_file, tmp_path):
    model, tok = tiny_model("llama", n_layer=4)
    a = get_adapter(model)

    def key(m=model, layer=1, **kw):
        s = StatsConfig.from_config(_cfg(corpus_file, tmp_path, **kw))
        return layer_stats_keys(m, tok, [layer], s, prepare_corpus(s), "tiny")[layer][0]

    base = key()
    assert key() == base
    other = _write_corpus(tmp_path / "other.txt", seed=1)
    variants = {
        "module": key(layer=2), "corpus": key(corpus=str(other)), "n_tokens": key(n_tokens=1400),
        "n_samples": key(n_samples=30), "max_length": key(max_length=40), "dtype": key(dtype="float64"),
        "seed": key(seed=2), "packing": key(packing="chars"), "unescape": key(unescape=False),
    }
    model2, _ = tiny_model("llama", n_layer=4)
    with torch.no_grad():
        model2.get_submodule(a.mlp_in_names(1)[0]).weight[0, 0] += 1e-3  # weight feeding layer 1's key
    variants["weights"] = key(m=model2)
    model3, _ = tiny_model("llama", n_layer=4, dtype=torch.bfloat16)
    variants["model_dtype"] = key(m=model3)
    for name, k in variants.items():
        assert k != base, f"cache key ignores {name}"
    assert len(set(variants.values())) == len(variants)
    # weights that cannot influence layer 1's key (its own rewrite module, blocks above) keep the key
    model4, _ = tiny_model("llama", n_layer=4)
    with torch.no_grad():
        model4.get_submodule(a.rewrite_name(1)).weight.add_(0.1)
        model4.get_submodule(a.block_name(3)).mlp.up_proj.weight.add_(0.1)
    assert key(m=model4) == base
    assert key(batch_tokens=999) == base  # batching changes rounding only
    model.get_submodule(a.mlp_in_names(0)[0]).weight.data[0, 0] += 1e-3  # in place through .data (no version bump)
    assert key() != base


def test_cache_hit_runs_no_forward(corpus_file, tmp_path):
    model, tok = tiny_model("llama", n_layer=3)
    cfg = _cfg(corpus_file, tmp_path)
    calls = []
    h = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        first = collect_layer_stats(model, tok, [0, 2], cfg, progress=False)
        n_first = len(calls)
        assert n_first > 0 and {s.source for s in first.values()} == {"computed"}
        second = collect_layer_stats(model, tok, [2, 0], cfg, progress=False)
        assert len(calls) == n_first, "cache hit ran a forward pass"
        assert {s.source for s in second.values()} == {"cache"}
        for layer in (0, 2):
            assert torch.equal(first[layer].C, second[layer].C)
        # adding a layer computes only that one (cached ones are reused)
        third = collect_layer_stats(model, tok, [0, 1], cfg, progress=False)
        assert third[0].source == "cache" and third[1].source == "computed"
    finally:
        h.remove()
    files = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 3 and not list((tmp_path / "cache").rglob("*.tmp"))


@pytest.mark.parametrize("engine", ["torch", "lightning"])
def test_resume_after_interruption_gives_same_C(engine, corpus_file, tmp_path):
    model, tok = tiny_model("llama", n_layer=3)
    ref = get_second_moments(model, tok, [1, 2], _cfg(corpus_file, tmp_path, cache=False), progress=False,
                             engine=_engine(engine))
    cfg = _cfg(corpus_file, tmp_path, checkpoint_every=2)
    with pytest.raises(SimulatedInterruption):
        collect_layer_stats(model, tok, [1, 2], cfg, progress=False, _interrupt_after=5, engine=_engine(engine))
    partial = list((tmp_path / "cache" / "partial").glob("*.pt"))
    assert len(partial) == 1
    assert torch.load(partial[0], weights_only=True)["state"]["batches_done"] == 4
    calls = []
    h = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        resumed = collect_layer_stats(model, tok, [1, 2], cfg, progress=False, engine=_engine(engine))
    finally:
        h.remove()
    s = StatsConfig.from_config(cfg)
    n_batches = len(build_token_batches(tok, prepare_corpus(s).docs, max_length=s.max_length, batch_tokens=s.batch_tokens,
                                        n_tokens=s.n_tokens, seed=s.seed).batches)
    assert len(calls) == n_batches - 4  # only the batches after the checkpoint were run
    for layer in (1, 2):
        assert resumed[layer].count == 1500
        assert torch.allclose(resumed[layer].C, ref[layer], rtol=1e-6, atol=1e-9)
    assert not list((tmp_path / "cache" / "partial").glob("*.pt"))  # cleaned up


def test_checkpoint_policy_by_batches_and_by_time():
    import time

    from massedit.stats.moments import CheckpointPolicy

    p = CheckpointPolicy(every_batches=3)
    assert [p.due(b) for b in range(1, 7)] == [False, False, True, False, False, True]
    p = CheckpointPolicy(every_seconds=0.05)
    assert not p.due(1)
    time.sleep(0.06)
    assert p.due(2)
    p.mark()
    assert not p.due(3)
    assert not any(CheckpointPolicy().due(b) for b in range(1, 10))


def test_two_process_ddp_equals_one_process(corpus_file, tmp_path):
    model, tok = tiny_model("gpt2", n_layer=3)
    one = get_second_moments(model, tok, [0, 2], _cfg(corpus_file, tmp_path, cache=False, dtype="float64"),
                             progress=False, engine=_engine("lightning"))
    cfg2 = _cfg(corpus_file, tmp_path, dtype="float64", cache_dir=str(tmp_path / "cache2"))
    two = collect_layer_stats(model, tok, [0, 2], cfg2, progress=False, engine=_engine("lightning", devices=2,
                                                                                       strategy="ddp_fork"))
    for layer in (0, 2):
        assert two[layer].count == 1500
        assert two[layer].meta["world_size"] == 2 and min(two[layer].meta["batches_per_rank"]) > 0
        assert torch.allclose(two[layer].C, one[layer], rtol=1e-6, atol=1e-10)


def test_two_process_ddp_with_fewer_batches_than_ranks(corpus_file, tmp_path):
    """One batch for two ranks: the idle rank pads with a skipped step and still joins the all-reduce."""
    model, tok = tiny_model("gpt2", n_layer=2)
    cfg = _cfg(corpus_file, tmp_path, cache=False, n_tokens=40, dtype="float64")
    one = get_second_moments(model, tok, [1], cfg, progress=False)
    two = collect_layer_stats(model, tok, [1], cfg, progress=False,
                              engine=_engine("lightning", devices=2, strategy="ddp_fork"))
    assert two[1].count == 40 and sorted(two[1].meta["batches_per_rank"]) == [0, 1]
    assert torch.allclose(two[1].C, one[1], rtol=1e-6, atol=1e-10)


# ------------------------------------------------------------------------------------------ reference files
def test_reference_npz_export_import_roundtrip(corpus_file, tmp_path):
    model, tok = tiny_model("gpt2", n_layer=3)
    a = get_adapter(model)
    stats = collect_layer_stats(model, tok, [1, 2], _cfg(corpus_file, tmp_path), model_name="org/tiny", progress=False)
    root = tmp_path / "ref"
    for st in stats.values():
        path = export_layer_stats(root, "org/tiny", "wikitext", st.module, st.total, st.count, 40)
        assert path == reference_stats_path(root, "org/tiny", "wikitext", st.module, 40)
        assert path.name == f"{st.module}_float32_mom2_40.npz" and path.parent.parent.name == "org_tiny"
        with np.load(path, allow_pickle=True) as z:
            assert set(z.files) == {"mom2.constructor", "mom2.count", "mom2.mom2", "sample_size"}
            assert int(z["sample_size"]) == 40 and z["mom2.mom2"].dtype == np.float32
        total, count = load_reference_stats(path)
        assert count == st.count and torch.equal(total.float(), st.total.float())
    calls = []
    h = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        got = collect_layer_stats(model, tok, [1, 2], _cfg(corpus_file, tmp_path, reference_dir=str(root)),
                                  model_name="org/tiny", progress=False)
    finally:
        h.remove()
    assert not calls
    for layer in (1, 2):
        assert got[layer].source == "reference" and a.rewrite_name(layer) in got[layer].path
        assert torch.allclose(got[layer].C, stats[layer].C, rtol=1e-6)
    with pytest.raises(FileNotFoundError):
        collect_layer_stats(model, tok, [0], _cfg(corpus_file, tmp_path, reference_dir=str(root), reference_missing="error"),
                            model_name="org/tiny", progress=False)


def test_tiny_gpt2_fixture_statistics_reproduced(shared_dir, tmp_path):
    """The official fixture's tiny GPT-2 statistics (40 WikiText-2 texts x 256 tokens) from our collector."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    fx = shared_dir / "fixtures" / "tiny_gpt2"
    sample = json.loads((fx / "stats" / "sample.json").read_text())
    model = GPT2LMHeadModel.from_pretrained(fx, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(fx)
    tok.pad_token, tok.padding_side = tok.eos_token, "right"
    wt = shared_dir / "data" / "text" / "wikitext-2"
    cfg = dict(corpus=[str(wt / "test.txt"), str(wt / "valid.txt")], format="wikitext", packing="chars",
               chunk_chars=2500, unescape=False, n_samples=sample["n_samples"], n_tokens=None,
               max_length=sample["maxlen"], batch_tokens=768, cache=False)
    s = StatsConfig.from_config(cfg)
    corpus = prepare_corpus(s)
    assert len(corpus.docs) == sample["n_texts_in_corpus"]
    tb = build_token_batches(tok, corpus.docs, max_length=s.max_length, batch_tokens=768, n_samples=40, seed=1)
    assert tb.doc_indices == sample["sample_text_indices"]
    assert [[len(b), max(map(len, b))] for b in tb.batches] == sample["sub_batches"]["shapes"]
    layers = [int(k.split(".")[2]) for k in sample["token_counts"]]
    stats = collect_layer_stats(model, tok, layers, cfg, model_name="tiny_gpt2", progress=False)
    for layer in layers:
        module = f"transformer.h.{layer}.mlp.c_proj"
        ref_total, ref_count = load_reference_stats(fx / "stats" / "tiny_gpt2" / "wikitext_stats" / f"{module}_float32_mom2_40.npz")
        assert stats[layer].count == ref_count == sample["token_counts"][module]
        C_ref = ref_total / ref_count
        rel = float((stats[layer].C.double() - C_ref).norm() / C_ref.norm())
        print(f"tiny_gpt2 fixture, layer {layer}: relative Frobenius error of C {rel:.1e}")
        assert rel < 1e-5, (layer, rel)


# ------------------------------------------------------------------------------------------ CLI
def test_stats_job_computes_and_exports(corpus_file, tmp_path, capsys):
    from massedit.tasks.config import compose
    from massedit.tasks.stats import stats_job

    model, tok = tiny_model("gpt2", n_layer=3)
    model_dir = tmp_path / "tiny-gpt2"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    ov = [f"{k}={v}" for k, v in _cfg(corpus_file, tmp_path, export_dir=str(tmp_path / "export"), ds_name="wikitext",
                                       n_samples=20).items() if v is not None]
    job = compose("edit", ["model=hf", f"model.name_or_path={model_dir}", "method.hparams=gpt2-xl", "stats.layers=[1,2]",
                           "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"] + [f"stats.{o}" for o in ov])
    summary = stats_job(job)
    assert [r["source"] for r in summary["per_layer"]] == ["computed", "computed"]
    exported = sorted((tmp_path / "export").rglob("*.npz"))
    assert [p.name for p in exported] == [f"transformer.h.{i}.mlp.c_proj_float32_mom2_20.npz" for i in (1, 2)]
    again = stats_job(job)
    assert [r["source"] for r in again["per_layer"]] == ["cache", "cache"]
    assert "trace_C" in capsys.readouterr().out
