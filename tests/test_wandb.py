"""W&B through Lightning, checked on offline runs of the real job on a tiny model: the run starts with the job
(console log from the first line, system metrics), the config is logged flat with dotted keys, deltas /
statistics / report are artifacts, the per-case table carries the requests' text with pre and post values, one
metric namespace, delta norms and per-request z losses; a simulated ``wandb agent`` (WANDB_SWEEP_PARAM_PATH, as
the agent sets it) keeps the whole config; ``stats.artifact`` reuses uploaded statistics."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wandb_offline

REPO = Path(__file__).resolve().parents[1]


def _small(tiny_dir, out):
    return ["model=hf", f"model.name_or_path={tiny_dir}", "data.num_edits=2", "stats.n_tokens=2000",
            "method.v_num_grad_steps=4", "eval.generation=false", f"output_dir={out}",
            "trainer.enable_progress_bar=false"]


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
                "MASSEDIT_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                **extra})
    return env


def test_offline_edit_run_has_artifacts_text_table_flat_config_and_one_namespace(tiny_dir, tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, str(REPO / "edit.py"), *_small(tiny_dir, out)], env=_env(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    arts = {a["type"]: a for a in wandb_offline.artifacts(out)}
    assert arts["deltas"]["files"] == ["deltas.safetensors"] and arts["deltas"]["name"] == "deltas-run"
    assert len(arts["statistics"]["files"]) == 2 and all(f.endswith(".safetensors") for f in arts["statistics"]["files"])
    assert set(arts["report"]["files"]) >= {"summary.md", "summary.json"}
    (table,) = wandb_offline.tables(out, "eval/per_case")
    cols = table["columns"]
    assert cols[:5] == ["case_id", "subject", "prompt", "target_new", "target_true"]
    assert "pre/efficacy_success" in cols and "post/efficacy_success" in cols
    row = dict(zip(cols, table["data"][0]))
    assert row["subject"] == "The Eiffel Tower" and row["prompt"] == "{} is located in the city of" and row["target_new"]
    cfg = wandb_offline.config(out)
    assert cfg["method.layers"] == [0, 1] and cfg["data.num_edits"] == 2 and cfg["model.name"] == "hf"
    assert not any(isinstance(v, dict) and v for v in cfg.values())  # flat: no nested sections to overwrite
    keys = set()
    for rec in wandb_offline.records(out):
        if rec.WhichOneof("record_type") == "history":
            keys |= {i.key or "/".join(i.nested_key) for i in rec.history.item}
        if rec.WhichOneof("record_type") == "summary":
            keys |= {i.key or "/".join(i.nested_key) for i in rec.summary.update}
    assert {"edit/delta_norm", "edit/z_loss", "eval/post/score", "eval/pre/efficacy_success"} <= keys
    assert "edit/delta_norm/transformer.h.0.mlp.c_proj.weight" in keys
    assert not {"score", "efficacy_success", "edit_seconds"} & keys  # one namespace, no top-level copies
    log = next(out.glob("wandb/offline-run-*/files/output.log")).read_text()
    assert "run directory:" in log.splitlines()[0]  # the run started with the job: its console log is complete
    assert any(r.WhichOneof("record_type") == "stats" for r in wandb_offline.records(out))  # system metrics
    res = json.loads((out / "results.json").read_text())
    assert res["eval"]["post"]["score"] == res["score"] and "score_ci" in res["eval"]["post"]


def test_simulated_wandb_agent_keeps_the_nested_config(tiny_dir, tmp_path):
    """What `wandb agent` does: write the trial's parameters to a config file, point WANDB_SWEEP_PARAM_PATH at it and
    run the sweep's command (program edit.py, ${args_no_hyphens}). wandb.init then merges those parameters into the
    run config; with a nested config `method: rome` would replace the whole `method` section."""
    from wandb.sdk.lib import config_util

    params = {"method": "rome", "method.v_lr": 0.25, "data.num_edits": 2}
    param_file = tmp_path / "wandb" / "sweep-abc" / "config-run1.yaml"
    config_util.save_config_file_from_dict(str(param_file), {k: {"value": v} for k, v in params.items()})
    out = tmp_path / "run"
    args = [f"{k}={v}" for k, v in params.items()]
    small = [a for a in _small(tiny_dir, out) if not a.startswith("data.num_edits")]
    p = subprocess.run([sys.executable, str(REPO / "edit.py"), *args, *small], capture_output=True, text=True,
                       env=_env(tmp_path, WANDB_SWEEP_PARAM_PATH=str(param_file)), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = wandb_offline.config(out)
    assert cfg["method"] == "rome" and cfg["method.v_lr"] == 0.25  # the sweep's own keys
    assert cfg["method.name"] == "rome" and cfg["method.layers"] == [1] and cfg["method.clamp_norm_factor"] == 4.0
    assert cfg["data.path"] == "builtin:smollm2_facts" and cfg["eval.generation"] is False  # nothing replaced
    res = json.loads((out / "results.json").read_text())
    assert res["eval"]["post"]["score"] is not None


def test_ftw_logs_each_number_once(tiny_dir, tmp_path):
    from massedit.tasks.config import compose
    from massedit.tasks.train import train_job

    torch.set_num_threads(1)
    small = [a for a in _small(tiny_dir, tmp_path / "run") if not a.startswith("method.")]
    job = compose("train", small + ["method=ftw", "data=builtin", "method.epochs=2", "logger=csv", "eval.pre=false"])
    train_job(job)
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    cols = set(rows[0])
    assert {"train/loss", "train/epoch_loss", "edit/delta_norm"} <= cols
    assert not {"train/loss_step", "train/loss_epoch"} & cols, cols


def test_stats_artifact_is_downloaded_into_the_cache(tiny_dir, tmp_path, monkeypatch):
    """``stats.artifact=...``: the artifact's files land in the statistics cache under their cache paths, so the
    collection is a cache hit (the download itself is W&B's; replaced here by a copy of an earlier run's files)."""
    import shutil

    import massedit.tasks.methods as methods
    from massedit.core.models import load_model_and_tokenizer
    from massedit.tasks.config import compose
    from massedit.tasks.edit import stats_artifact_files

    torch.set_num_threads(1)
    monkeypatch.setenv("MASSEDIT_CACHE", str(tmp_path / "cache_a"))
    job = compose("edit", _small(tiny_dir, tmp_path / "run"))
    model, tok = load_model_and_tokenizer(job.model)
    provider = methods.stats_provider(job)
    C = provider(model, tok, [0, 1])
    files, meta = stats_artifact_files(provider.used, job.stats)
    assert len(files) == 2 and meta["layers"]["0"]["count"] == 2000
    uploaded = tmp_path / "artifact"
    for name, path in files.items():
        (uploaded / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, uploaded / name)

    calls = []

    def fake_download(ref, root):
        calls.append(ref)
        shutil.copytree(uploaded, root, dirs_exist_ok=True)
        return root

    monkeypatch.setattr(methods, "_download_artifact", fake_download)
    monkeypatch.setenv("MASSEDIT_CACHE", str(tmp_path / "cache_b"))  # a fresh machine: empty cache
    job2 = compose("edit", _small(tiny_dir, tmp_path / "run2") + ["stats.artifact=me/massedit/stats-x:v0"])
    provider2 = methods.stats_provider(job2)
    C2 = provider2(model, tok, [0, 1])
    assert calls == ["me/massedit/stats-x:v0"]
    assert {st.source for st in provider2.used.values()} == {"cache"}
    assert all(torch.equal(C[l], C2[l]) for l in (0, 1))
