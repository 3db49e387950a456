"""CUDA checks (marker ``gpu``; skipped without a CUDA device, e.g. in CI): every editor, the statistics
collector and the evaluation run on a GPU in float32, bfloat16 and float16 and agree with the CPU float32
results, on tiny random models of every family.

    python -m pytest -m gpu tests/test_gpu.py -v

Tolerances: float32 on the GPU vs the CPU 1e-3 relative for C and evaluation NLLs; the edits themselves are
compared by their effect (the edited prompts' argmax) because z optimisation amplifies rounding differences.
"""
from __future__ import annotations

import copy

import pytest
import torch

from massedit.core.deltas import deltas_applied
from massedit.core.tokenization import target_token_ids
from massedit.editing.hparams import EditHparams
from massedit.editing.memit import MemitEditor
from massedit.editing.rome import RomeEditor
from massedit.trainer import TrainerConfig
from massedit.testing import corpus_second_moments
from massedit.testing import FAMILIES, tiny_model
from test_memit_tiny import GROUPS, REQS, TEXTS  # the tiny-model edit requests (subject at the prompt end)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUIET = TrainerConfig(enable_progress_bar=False)


def hp(layers):
    return EditHparams(layers=layers, v_num_grad_steps=20, v_lr=0.5, clamp_norm_factor=1000.0, v_weight_decay=0.0,
                       kl_factor=0.0625, mom2_update_weight=0.1)


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def on(model, dtype):
    return copy.deepcopy(model).to("cuda", dtype)


def landed(model, tok, deltas) -> int:
    n = 0
    with torch.no_grad(), deltas_applied(model, deltas):
        for r in REQS:
            enc = tok(r.filled_prompt, return_tensors="pt").to(model.device)
            n += int(model(**enc).logits[0, -1].argmax()) == target_token_ids(tok, " " + r.target_new)[0]
    return n


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_memit_and_rome_on_cuda(family, dtype):
    torch.manual_seed(0)
    cpu, tok = tiny_model(family, seed=0)
    layers = [1, 2]
    C_cpu = corpus_second_moments(cpu, tok, layers, TEXTS)
    model = on(cpu, DTYPES[dtype])
    C = corpus_second_moments(model, tok, layers, TEXTS)
    for l in layers:  # C is returned on the CPU in float32 by design (cached / shared across devices)
        assert rel(C[l], C_cpu[l]) <= (1e-4 if dtype == "float32" else 3e-2), (l, rel(C[l], C_cpu[l]))
    before = _state(model)
    for name, editor in (
        ("memit", MemitEditor(hparams=hp(layers), stats=lambda m, t, l: C, context_templates=GROUPS, progress=False)),
        ("rome", RomeEditor(hparams=hp([2]), stats=lambda m, t, l: C, context_templates=["{}", "The city. {}"],
                            progress=False)),
    ):
        deltas = editor.edit(model, tok, REQS)
        assert _unchanged(model, before), name
        for k, d in deltas.items():
            assert d.device.type == "cpu" and d.dtype == torch.float32, (name, k)  # the delta-file contract
            assert torch.isfinite(d).all(), (name, k)
            assert d.shape == model.get_parameter(k).shape
        n = landed(model, tok, deltas)
        assert n == len(REQS) if dtype == "float32" else n >= len(REQS) - 1, (name, n)
        assert _unchanged(model, before), name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_evaluation_on_cuda_matches_cpu(family):
    from massedit.tasks.evaluate import evaluate
    from test_eval_model import _cf_requests

    cpu, tok = tiny_model(family, seed=0)
    reqs = _cf_requests()
    ref = evaluate(cpu, tok, reqs, {"generation": False, "batch_size": 3}, stage="pre", trainer_cfg=QUIET)
    for dtype, tol in (("float32", 1e-3), ("bfloat16", 5e-2)):
        model = on(cpu, DTYPES[dtype])
        got = evaluate(model, tok, reqs, {"generation": True, "batch_size": 3}, stage="pre", trainer_cfg=QUIET)
        assert next(model.parameters()).device == model.device
        for a, b in zip(got.per_case, ref.per_case, strict=True):
            for key in ("rewrite", "paraphrase", "neighborhood"):
                for pa, pb in zip(a[key], b[key], strict=True):
                    for w in ("nll_new", "nll_true"):
                        assert abs(pa[w] - pb[w]) <= tol * max(1.0, abs(pb[w])), (dtype, key, w, pa[w], pb[w])
        assert got.summary["fluency"] is not None


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_ftw_on_cuda(precision):
    from massedit.editing.ft import FTConfig
    from massedit.lightning_modules.ftw import FTEditor

    cpu, tok = tiny_model("llama", seed=0)
    model = on(cpu, torch.float32).train()
    before = _state(model)
    editor = FTEditor(FTConfig(lr=0.05, epochs=8, layers=[1], weight_decay=0.01),
                      TrainerConfig(enable_progress_bar=False, precision=precision, accelerator="gpu"))
    deltas = editor.edit(model, tok, REQS)
    assert _unchanged(model, before)
    assert all(torch.isfinite(d).all() and d.abs().max() > 0 for d in deltas.values())


def test_mend_on_cuda(tmp_path):
    from massedit.editing.mend import MendConfig, MendEditor, save_editor
    from test_mend import _trained_like_net, make_requests

    cpu, tok = tiny_model("gpt2", seed=0)
    net = _trained_like_net(cpu, tok)
    path = save_editor(tmp_path / "mend_editor.pt", net)
    cfg = MendConfig(checkpoint=str(path), edit_chunk_size=2)
    ref = MendEditor(cfg, progress=False).edit(cpu, tok, make_requests(5))
    model = on(cpu, torch.float32)
    got = MendEditor(cfg, progress=False).edit(model, tok, make_requests(5))
    assert set(got) == set(ref)
    for k in ref:
        assert rel(got[k], ref[k]) <= 1e-3, k


def test_stats_lightning_collection_on_cuda(tmp_path):
    from massedit.stats import get_second_moments
    from test_stats import _cfg, _write_corpus

    from massedit.lightning_modules.stats import LightningStatsEngine
    from massedit.trainer import build_trainer

    corpus = _write_corpus(tmp_path / "wiki.txt")
    cpu, tok = tiny_model("llama", seed=0)
    ref = get_second_moments(cpu, tok, [0, 2], _cfg(corpus, tmp_path / "a", cache=False))
    model = on(cpu, torch.float32)
    engine = LightningStatsEngine(build_trainer(TrainerConfig(accelerator="gpu", devices=[0], enable_progress_bar=False)))
    got = get_second_moments(model, tok, [0, 2], _cfg(corpus, tmp_path / "b", cache=False), engine=engine)
    for l in (0, 2):
        assert rel(got[l], ref[l]) <= 1e-4, l
    assert next(model.parameters()).is_cuda  # Lightning's teardown moves modules to the CPU: keep_device undoes it


def test_lightning_runs_leave_the_model_on_cuda(tmp_path):
    """Evaluation, then MEMIT with statistics collected through Lightning, as edit.py runs them: the model must
    stay on the GPU throughout (Lightning's teardown moved it to the CPU before keep_device)."""
    from massedit.tasks.evaluate import evaluate
    from massedit.stats import get_second_moments
    from test_stats import _cfg, _write_corpus

    corpus = _write_corpus(tmp_path / "wiki.txt")
    cpu, tok = tiny_model("llama", seed=0)
    model = on(cpu, torch.float32)
    evaluate(model, tok, REQS, {"generation": False}, stage="pre", trainer_cfg=QUIET)
    assert next(model.parameters()).is_cuda
    from massedit.lightning_modules.stats import LightningStatsEngine
    from massedit.trainer import build_trainer

    stats_cfg = _cfg(corpus, tmp_path, cache=False)
    engine = LightningStatsEngine(build_trainer(TrainerConfig(accelerator="gpu", devices=[0], enable_progress_bar=False)))
    editor = MemitEditor(hparams=hp([1, 2]), stats=lambda m, t, l: get_second_moments(m, t, l, stats_cfg, engine=engine),
                         context_templates=GROUPS, progress=False)
    deltas = editor.edit(model, tok, REQS)
    assert next(model.parameters()).is_cuda
    assert landed(model, tok, deltas) == len(REQS)
