"""What a new user does on a fresh machine: the main job from an empty directory with no ../shared and an empty
cache, and massedit installed from its wheel into a new virtual environment, run from outside the repository."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MASSEDIT_CONFIG_DIR")}
    env.update({"WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2", **extra})
    return env


@pytest.mark.slow
def test_main_job_runs_from_an_empty_directory_with_an_empty_cache(tmp_path):
    """The default job (MEMIT on SmolLM2, built-in requests, built-in statistics corpus) with small settings, run
    from an empty working directory (no ../shared next to it) and an empty MASSEDIT_CACHE."""
    work = tmp_path / "work"
    work.mkdir()
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "massedit", "edit", "data.num_edits=2", "stats.n_tokens=3000",
           "method.v_num_grad_steps=6", "eval.generation=false", "logger=csv", "output_dir=run"]
    p = subprocess.run(cmd, cwd=work, env=_env(MASSEDIT_CACHE=str(cache)), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "Efficacy success (ES)" in p.stdout and "Pre" in p.stdout and "Post" in p.stdout  # the pre/post table
    run = work / "run"
    from massedit.core.deltas import load_deltas

    deltas = load_deltas(run / "deltas.safetensors")
    assert sorted(deltas) == sorted(f"model.layers.{i}.mlp.down_proj.weight" for i in (4, 5, 6, 7, 8))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_cases"] == 2 and summary["metrics"]["efficacy_success"]["post"] is not None
    assert "corpus: builtin:wikitext-2" in (run / "config.yaml").read_text()
    assert list((cache / "stats").rglob("*.safetensors"))       # statistics computed from the shipped corpus
    assert (cache / "models" / "smollm2-135m" / "model.safetensors").exists()
    assert "../shared" not in (run / "run.log").read_text()


@pytest.mark.slow
def test_wheel_installs_into_a_new_venv_and_runs_outside_the_repository(tmp_path):
    """``pip install`` of the wheel (configs, built-in corpus and requests included), then ``massedit --help`` and a
    tiny edit from another directory. Dependencies come from this environment (a .pth file), so nothing is
    downloaded."""
    whl = tmp_path / "whl"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(whl), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    vpy = venv / "bin" / "python"
    site = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "massedit_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(vpy), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(next(whl.glob("*.whl")))],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env(MASSEDIT_CACHE=str(tmp_path / "cache"))
    where = subprocess.run([str(vpy), "-c", "import massedit; print(massedit.__file__)"], cwd=elsewhere, env=env,
                           check=True, capture_output=True, text=True).stdout
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout
    h = subprocess.run([str(venv / "bin" / "massedit"), "--help"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert h.returncode == 0 and "massedit {edit,train,eval,stats}" in h.stdout and "model" in h.stdout

    from massedit.testing import tiny_model

    model, tok = tiny_model("gpt2", seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    (tmp_path / "facts.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"case_id": 1, "subject": "Japan", "prompt": "The capital of {} is", "target": "Rome", "target_true": "Tokyo"},
        {"case_id": 2, "subject": "Michael Jordan", "prompt": "{} plays", "target": "soccer", "target_true": "basketball"},
    ]) + "\n")
    cmd = [str(venv / "bin" / "massedit"), "edit", "model=hf", f"model.name_or_path={tmp_path / 'tiny'}",
           "method.hparams=gpt2-xl", "method.layers=[1,2]", "method.v_loss_layer=3", "method.v_num_grad_steps=4",
           "data=user", f"data.path={tmp_path / 'facts.jsonl'}", "data.num_edits=2", "stats.n_tokens=500",
           "eval.generation=false", "logger=none", "trainer.accelerator=cpu", "output_dir=out"]
    p = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert (elsewhere / "out" / "deltas.safetensors").exists() and (elsewhere / "out" / "summary.json").exists()
    assert "corpus: builtin:wikitext-2" in (elsewhere / "out" / "config.yaml").read_text()
