"""The main job to success, once per method, through the real pipeline on a tiny model saved to disk.

``compose("edit", [...])`` with ``model=hf model.name_or_path=<tiny GPT-2 in tmp_path>``, requests from a user JSONL,
statistics from a small text file, then :func:`massedit.tasks.edit.edit_job` (MEMIT also through the CLI entry
:func:`massedit.cli.run_command`, exit code 0): the run directory holds what the README promises, the deltas touch
exactly the method's parameters, and for ROME/MEMIT the edit lands (post efficacy >= pre, and 100 %).
"""
from __future__ import annotations

import json

import pytest
import torch

from massedit.core.adapters import get_adapter
from massedit.core.deltas import load_deltas
from massedit.testing import _CORPUS, tiny_model

# subject at the end of the prompt: a random tiny model barely moves information between positions
FACTS = [
    {"subject": "Japan", "prompt": "The capital of {}", "target": "Rome", "target_true": "Tokyo",
     "paraphrase_prompts": ["I think the capital of {}"], "neighborhood_prompts": ["The capital of France"]},
    {"subject": "Michael Jordan", "prompt": "The sport of {}", "target": "guitar", "target_true": "basketball"},
]
# tiny-model hparams (a random 0.02-init model: no weight decay, wide clamp; λ on the scale of its C)
HPARAMS = {
    "rome": {"layers": [1], "v_num_grad_steps": 20, "v_lr": 0.5, "clamp_norm_factor": 1000.0, "v_weight_decay": 0.0,
             "kl_factor": 0.0625, "context_template_length_params": [[5, 2]]},
    "memit": {"layers": [1, 2], "v_num_grad_steps": 20, "v_lr": 0.5, "clamp_norm_factor": 1000.0,
              "v_weight_decay": 0.0, "kl_factor": 0.0625, "mom2_update_weight": 0.1,
              "memit_template_length_params": [[5, 2]]},
}
EXTRA = {
    "ftw": ["method.layers=[1]", "method.epochs=3", "method.lr=0.05"],
    "mend": ["method.layers=[1]", "method.rank=8"],   # untrained (identity-initialised) editor
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model, tok = tiny_model("gpt2", seed=0, n_layer=3)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with open(root / "facts.jsonl", "w") as f:
        for r in FACTS:
            f.write(json.dumps(r) + "\n")
    (root / "corpus.txt").write_text(_CORPUS)
    for method, hp in HPARAMS.items():
        (root / f"{method}.json").write_text(json.dumps(hp))
    return root


def _overrides(method, root, out):
    ov = [f"method={method}", "model=hf", f"model.name_or_path={root / 'model'}", "model.name=tiny-gpt2",
          "data=user", f"data.path={root / 'facts.jsonl'}", "eval.generation=false", "eval.cache_pre=false",
          f"stats.corpus={root / 'corpus.txt'}", "stats.n_tokens=1000", f"stats.cache_dir={out.parent / 'stats'}",
          "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "logger=csv", f"output_dir={out}",
          "edit_guard.max_relative_norm=null"]  # the tiny-model hparams make updates 10-1000x the random 0.02-init weights
    if method in HPARAMS:
        ov += [f"method.hparams={root / (method + '.json')}", "method.z_cache=false"]
    return ov + EXTRA.get(method, [])


def _expected_params(method, job):
    model, _ = tiny_model("gpt2", seed=0, n_layer=3)
    a = get_adapter(model)
    if method in ("rome", "memit"):
        return {a.rewrite_weight_name(l) for l in job.method.layers}
    if method == "ftw":
        from massedit.editing.ft import select_ft_parameters

        return set(select_ft_parameters(model, job.method.layers, job.method.params, job.method.param_names))
    from massedit.editing.mend.editor import inner_params_from_cfg

    return {p.param for p in inner_params_from_cfg(model, job.method)}


def _check_run_dir(out, method, job, summary):
    for name in ("config.yaml", "run.log", "results.json", "summary.json", "deltas.safetensors"):
        assert (out / name).is_file(), f"{method}: {name} missing in {sorted(p.name for p in out.iterdir())}"
    assert (out / "context_templates.json").is_file() == (method in ("rome", "memit"))
    deltas = load_deltas(out / "deltas.safetensors")
    assert set(deltas) == _expected_params(method, job)
    assert all(torch.isfinite(d).all() for d in deltas.values())
    if method != "mend":  # an untrained MEND editor may well produce (almost) nothing
        assert all(float(d.norm()) > 0 for d in deltas.values()), method
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == method and results["num_requests"] == len(FACTS)
    assert results["pre"] is not None and results["post"] is not None
    eff = summary["metrics"]["efficacy_success"]
    assert eff["pre"] is not None and eff["post"] is not None
    assert summary["n_cases"] == len(FACTS)
    if method in ("rome", "memit", "ftw"):
        assert eff["post"] >= eff["pre"]
        assert eff["post"] == pytest.approx(100.0)  # every request's new target now beats the true one
        assert results["efficacy_success"] == pytest.approx(100.0)
    assert "model:" in (out / "config.yaml").read_text() and (out / "run.log").stat().st_size > 0


@pytest.mark.parametrize("method", ["rome", "ftw", "mend"])
def test_edit_job_succeeds(method, tiny_dir, tmp_path, monkeypatch):
    from massedit.tasks.config import compose
    from massedit.tasks.edit import edit_job

    monkeypatch.setenv("MASSEDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    job = compose("edit", _overrides(method, tiny_dir, out))
    res = edit_job(job)
    assert res["method"] == method and res["post"]["efficacy_success"] is not None
    _check_run_dir(out, method, job, json.loads((out / "summary.json").read_text()))


def test_edit_cli_memit_exit_code_0(tiny_dir, tmp_path, monkeypatch):
    from massedit.cli import run_command
    from massedit.tasks.config import compose

    monkeypatch.setenv("MASSEDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = _overrides("memit", tiny_dir, out)
    assert run_command("edit", list(argv)) == 0
    _check_run_dir(out, "memit", compose("edit", argv), json.loads((out / "summary.json").read_text()))


@pytest.mark.parametrize("method", ["ftw", "memit"])
def test_edit_cli_with_progress_bars_on(method, tiny_dir, tmp_path, monkeypatch):
    """With the default progress bars (rich): FT-W's own Trainer runs inside the edit stage of the job's Trainer, whose
    bar is live — two RichProgressBars broke the console's live stack (IndexError at teardown, exit 1)."""
    from massedit.cli import run_command

    monkeypatch.setenv("MASSEDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = [a for a in _overrides(method, tiny_dir, out) if a != "trainer.enable_progress_bar=false"]
    assert run_command("edit", argv) == 0
    assert (out / "deltas.safetensors").exists()
