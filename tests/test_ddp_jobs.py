"""The main jobs on 2 CPU ranks (Lightning DDP, gloo) through the command line, against the same job on 1 rank:
same deltas, one run directory, one copy of each file and log line, a failing rank fails the job."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from massedit.core.deltas import load_deltas

REPO = Path(__file__).resolve().parents[1]

ROWS = [
    {"case_id": 1, "subject": "Japan", "prompt": "The capital of {} is", "target": "Rome", "target_true": "Tokyo",
     "paraphrase_prompts": ["Japan's capital city is"], "neighborhood_prompts": ["The capital of China is"]},
    {"case_id": 2, "subject": "Michael Jordan", "prompt": "{} plays", "target": "soccer", "target_true": "basketball",
     "paraphrase_prompts": ["Michael Jordan is a professional"], "neighborhood_prompts": ["Kobe Bryant plays"]},
    {"case_id": 3, "subject": "Paris", "prompt": "{} is in", "target": "Italy", "target_true": "France",
     "paraphrase_prompts": ["The city of Paris lies in"], "neighborhood_prompts": ["Lyon is in"]},
    {"case_id": 4, "subject": "The Beatles", "prompt": "{} came from", "target": "Ohio", "target_true": "Liverpool",
     "paraphrase_prompts": ["The Beatles were formed in"], "neighborhood_prompts": ["Oasis came from"]},
    {"case_id": 5, "subject": "Mars", "prompt": "{} is a", "target": "fruit", "target_true": "planet",
     "paraphrase_prompts": ["Mars is known as a"], "neighborhood_prompts": ["Venus is a"]},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from massedit.testing import tiny_model

    root = tmp_path_factory.mktemp("ddp")
    model, tok = tiny_model("gpt2", seed=0)
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    (root / "facts.json").write_text(json.dumps(ROWS))
    return root


def massedit(root: Path, command: str, devices: int, *args: str, cache: str, script: str | None = None,
             timeout: int = 600, torchrun: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO),
           "MASSEDIT_CACHE": str(root / cache), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MASSEDIT_RUN_DIR", None)
    entry = [script] if script else ["-m", "massedit"]
    if torchrun:  # the ranks started by torch's launcher, not by Lightning's
        entry = ["-m", "torch.distributed.run", f"--nproc_per_node={devices}", "--master_port=29611"] + entry
    cmd = [sys.executable, *entry, command, "model=hf", f"model.name_or_path={root / 'tiny'}", "data=user",
           f"data.path={root / 'facts.json'}", "data.num_edits=null", "logger=none", "trainer.accelerator=cpu",
           f"trainer.devices={devices}", "trainer.enable_progress_bar=false", "eval.generation=false",
           "stats.n_tokens=600", "stats.batch_tokens=128", "stats.dtype=float64",
           "edit_guard.max_relative_norm=null", *args]  # a tiny random model's updates dwarf its weights
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


MEMIT = ("method=memit", "method.hparams=gpt2-xl", "method.layers=[1,2]", "method.v_loss_layer=3",
         "method.v_num_grad_steps=4", "method.z_cache=false")
METHODS = {
    "rome": ("method=rome", "method.hparams=gpt2-xl", "method.layers=[1]", "method.v_loss_layer=3",
             "method.v_num_grad_steps=4"),
    "mend": ("method=mend", "method.rank=8", "method.edit_chunk_size=2"),
    "ftw": ("method=ftw", "method.layers=[1]", "method.epochs=3", "method.batch_size=3"),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def messages(log_text: str) -> list[str]:
    """run.log lines without their time stamps."""
    return [re.sub(r"^\[[^\]]*?(INFO|WARNING|ERROR|DEBUG)", r"[\1", line) for line in log_text.splitlines() if line]


def assert_one_copy(run_dir: Path, stdout: str) -> None:
    dupes = [m for m, n in Counter(messages((run_dir / "run.log").read_text())).items() if n > 1]
    assert not dupes, dupes
    assert stdout.count("Outputs written to") == 1
    assert stdout.count("Efficacy success (ES)") == 1  # one report table


@pytest.mark.slow
def test_memit_two_ranks_equal_one_rank(tiny):
    """MEMIT on 2 ranks (z, keys, H split by request; statistics collected on both ranks inside the run) gives the
    1-rank deltas; one run directory (no output_dir: rank 0 names it), each file and log line once."""
    one = massedit(tiny, "edit", 1, *MEMIT, "output_dir=one", cache="cache1")
    assert one.returncode == 0, one.stderr[-3000:]
    two = massedit(tiny, "edit", 2, *MEMIT, "output_root=runs2", cache="cache2")
    assert two.returncode == 0, two.stderr[-3000:]
    runs = list((tiny / "runs2").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    assert not (tiny / "lightning_logs").exists()
    assert_one_copy(run, two.stdout)
    log = (run / "run.log").read_text()
    assert "2 rank(s)" in log  # the statistics were collected by both ranks of this run (cache2 was empty)
    d1, d2 = load_deltas(tiny / "one" / "deltas.safetensors"), load_deltas(run / "deltas.safetensors")
    assert d1.keys() == d2.keys()
    for k in d1:
        assert rel(d2[k], d1[k]) <= 1e-5, k
    info = json.loads((run / "memit_info.json").read_text())
    assert info["world_size"] == 2 and info["targets"]["from_cache"] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["info"]["post"]["world_size"] == 2
    # the same job started by torchrun (each rank runs the command; rank 0's directory is broadcast)
    tr = massedit(tiny, "edit", 2, *MEMIT, "output_root=runs_torchrun", cache="cache2", torchrun=True)
    assert tr.returncode == 0, tr.stderr[-3000:]
    runs = list((tiny / "runs_torchrun").iterdir())
    assert len(runs) == 1, runs
    assert_one_copy(runs[0], tr.stdout)
    d3 = load_deltas(runs[0] / "deltas.safetensors")
    for k in d1:
        assert rel(d3[k], d1[k]) <= 1e-5, k


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rome", "mend", "ftw"])
def test_other_editors_two_ranks_equal_one_rank(tiny, method):
    """ROME (rank 0 edits, deltas broadcast), MEND (pseudo-gradients all-reduced), FT-W (DDP over the requests)."""
    args = METHODS[method]
    one = massedit(tiny, "edit", 1, *args, f"output_dir={method}1", cache="cache1")
    assert one.returncode == 0, one.stderr[-3000:]
    two = massedit(tiny, "edit", 2, *args, f"output_dir={method}2", cache="cache1")
    assert two.returncode == 0, two.stderr[-3000:]
    assert_one_copy(tiny / f"{method}2", two.stdout)
    d1 = load_deltas(tiny / f"{method}1" / "deltas.safetensors")
    d2 = load_deltas(tiny / f"{method}2" / "deltas.safetensors")
    assert d1.keys() == d2.keys()
    for k in d1:
        assert rel(d2[k], d1[k]) <= (0.0 if method == "rome" else 1e-5), k


FAILING = """import os, sys
if os.environ.get("LOCAL_RANK") == "1":  # rank 1 raises in the middle of the edit
    from massedit.editing import memit
    def boom(*args, **kwargs):
        raise RuntimeError("injected failure on rank 1")
    memit.compute_targets = boom
from massedit.cli import main
sys.exit(main())
"""


FAILING_LATE = """import os, sys
if os.environ.get("LOCAL_RANK") == "1":  # rank 1 fails after the last collective (rank 0 has nothing left to wait on)
    from massedit.tasks import runs
    def boom(self):
        raise RuntimeError("injected late failure on rank 1")
    runs.Run.finish = boom
from massedit.cli import main
sys.exit(main())
"""


@pytest.mark.slow
def test_a_failing_rank_fails_the_job(tiny):
    script = tiny / "failing_edit.py"
    script.write_text(FAILING)
    p = massedit(tiny, "edit", 2, *MEMIT, "output_dir=failed", cache="cache1", script=str(script), timeout=300)
    assert p.returncode != 0
    assert "injected failure on rank 1" in p.stderr
    assert not (tiny / "failed" / "deltas.safetensors").exists()
    # a failure after rank 0's work is done still fails the job (rank 0 waits for the ranks it launched)
    script.write_text(FAILING_LATE)
    p = massedit(tiny, "edit", 2, *MEMIT, "output_dir=late", cache="cache1", script=str(script), timeout=300)
    assert "injected late failure on rank 1" in p.stderr
    assert (tiny / "late" / "results.json").exists()  # rank 0 finished its part
    assert p.returncode != 0 and "rank(s) 1 (exit 1) failed" in p.stderr


@pytest.mark.slow
def test_mend_training_two_ranks(tiny):
    """max_iters counts the job's edit problems with 1 or 2 ranks; the normalisation statistics see every row."""
    (tiny / "mend.json").write_text(json.dumps([{**r, "case_id": 10 * k + r["case_id"]} for k in range(3) for r in ROWS]))
    args = ("method=mend", "method.rank=8", f"data.path={tiny / 'mend.json'}", "method.train.max_iters=8",
            "method.train.val_interval=4", "method.train.accumulate=2", "method.train.val_size=4",
            "method.train.lr=1e-3", "method.train.lr_lr=1e-3")
    runs = {}
    for n in (1, 2):
        p = massedit(tiny, "train", n, *args, f"output_dir=mend_train{n}", cache="cache1")
        assert p.returncode == 0, p.stderr[-3000:]
        runs[n] = tiny / f"mend_train{n}"
    assert_train = [json.loads((runs[n] / "results.json").read_text()) for n in (1, 2)]
    assert assert_train[0]["iterations"] == assert_train[1]["iterations"] == 8
    e1, e2 = (torch.load(runs[n] / "mend_editor.pt", weights_only=True)["state_dict"] for n in (1, 2))
    norms = [k for k in e1 if "_norm." in k]
    assert norms
    for k in norms:  # the same rows were seen in all: identical statistics (up to the order of merging)
        assert rel(e2[k], e1[k]) <= 1e-5, k
    h1, h2 = (json.loads((runs[n] / "mend_history.json").read_text()) for n in (1, 2))
    assert [h["iter"] for h in h1] == [h["iter"] for h in h2]
    assert h1[0]["val/loss"] == pytest.approx(h2[0]["val/loss"], rel=1e-6)


def test_spawning_strategies_are_refused(tmp_path, capsys):
    from massedit.cli import run_command

    for strategy in ("ddp_spawn", "ddp_fork"):
        rc = run_command("edit", ["trainer.devices=2", f"trainer.strategy={strategy}", f"output_dir={tmp_path / 'x'}",
                                  "logger=none"])
        assert rc == 2
        assert f"trainer.strategy={strategy} is not supported" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_launch_rank_and_run_directory_handover(monkeypatch, tmp_path):
    """Rank from the launcher's environment; rank 0 picks the directory and leaves it for the ranks it launches."""
    from massedit.tasks.config import compose
    from massedit.tasks.runs import RUN_DIR_ENV, hand_over_run_dir, resolve_run_dir
    from massedit.trainer import TrainerConfig, check_device_map, launch_rank

    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_NTASKS", "SLURM_PROCID", RUN_DIR_ENV):
        monkeypatch.delenv(k, raising=False)
    cfg = TrainerConfig(devices=4, num_nodes=2)
    assert launch_rank(cfg) == 0
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("NODE_RANK", "1")
    assert launch_rank(cfg) == 7  # Lightning's launcher: node * devices + local
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert launch_rank(cfg) == 5
    monkeypatch.setenv("RANK", "6")  # torchrun
    assert launch_rank(cfg) == 6

    job = compose("edit", [f"output_root={tmp_path}", "trainer.devices=2"])
    d0 = hand_over_run_dir(resolve_run_dir(job), rank=0, world_size=2)
    assert d0.parent == tmp_path and str(d0) == __import__("os").environ[RUN_DIR_ENV]
    assert hand_over_run_dir(tmp_path / "other-clock", rank=1, world_size=2) == d0  # a launched rank inherits it
    with pytest.raises(Exception, match="device_map"):
        check_device_map(TrainerConfig(devices=2), "auto")
    check_device_map(TrainerConfig(devices=1), "auto")
