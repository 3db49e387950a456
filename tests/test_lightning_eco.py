"""Lightning ecosystem: MEND training resumes from ``ckpt_path`` (counters, history and optimiser state continue,
the remaining steps only), TensorBoard / MLflow loggers through Lightning, rich progress bars."""
from __future__ import annotations

import json

import pytest
import torch

WORDS = ["wood", "glass", "steel", "paper", "stone", "gold", "silver", "copper", "clay", "wool"]


def _zsre_file(path, n=24):
    rows = []
    for k in range(n):
        s = WORDS[k % 10] + (" box" if k % 2 else " cup")
        rows.append({"src": f"What is the {s} made of?", "subject": s, "alt": WORDS[(3 * k + 1) % 10],
                     "answers": [WORDS[k % 10]], "rephrase": f"The {s} is made of what?",
                     "loc": f"nq question: where is the {WORDS[(k + 2) % 10]}", "loc_ans": WORDS[(k + 5) % 10]})
    path.write_text(json.dumps(rows))
    return path


def _mend_args(tiny_dir, data, out):
    return ["method=mend", "model=hf", f"model.name_or_path={tiny_dir}", "data=zsre_train", f"data.path={data}",
            "method.rank=8", "method.train.max_iters=48", "method.train.batch_problems=4", "method.train.val_size=4",
            "method.train.val_interval=16", "method.train.accumulate=4", "method.train.lr=1e-3", "logger=csv",
            f"output_dir={out}", "trainer.enable_progress_bar=false"]


def test_mend_resumes_from_ckpt_path(tiny_dir, tmp_path, monkeypatch):
    """A run killed after 7 of 12 steps (last checkpoint at step 4) resumes with ckpt_path=last in its output_dir:
    5 -> 12 run, not 12 more; the iteration counter and the history continue; the result equals an
    uninterrupted run's number of iterations."""
    from massedit.core.errors import InputError
    from massedit.lightning_modules.mend import MendModule
    from massedit.tasks.config import compose
    from massedit.tasks.train import train_job

    torch.set_num_threads(1)
    data = _zsre_file(tmp_path / "zsre.json")
    out = tmp_path / "run"
    steps = []
    orig = MendModule.training_step

    def crashing(self, batch, batch_idx):
        if self.iters >= 28 and not steps:  # batch 7 of 12 (4 problems each)
            steps.append(self.iters)
            raise RuntimeError("simulated crash")
        return orig(self, batch, batch_idx)

    monkeypatch.setattr(MendModule, "training_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_job(compose("train", _mend_args(tiny_dir, data, out)))
    last = out / "checkpoints" / "last.ckpt"
    ck = torch.load(last, map_location="cpu", weights_only=False)
    assert ck["mend_progress"] == {"iters": 16, "batches": 4, "skipped": 0}  # the validation after batch 4

    seen = []

    def counting(self, batch, batch_idx):
        seen.append(self.iters)
        return orig(self, batch, batch_idx)

    monkeypatch.setattr(MendModule, "training_step", counting)
    res = train_job(compose("train", _mend_args(tiny_dir, data, out) + ["ckpt_path=last"]))
    assert seen == [16, 20, 24, 28, 32, 36, 40, 44]  # batches 5..12: only the rest of the run
    assert res["iterations"] == 48
    hist = json.loads((out / "mend_history.json").read_text())
    assert [h["iter"] for h in hist if "val/loss" in h][0] == 0  # the first run's iteration-0 validation is kept
    assert sorted({h["iter"] for h in hist if "val/loss" in h}) == [0, 16, 32, 48]
    with pytest.raises(InputError, match="no checkpoint"):
        train_job(compose("train", _mend_args(tiny_dir, data, tmp_path / "fresh") + ["ckpt_path=last"]))


@pytest.mark.parametrize("kind", ["tensorboard", "mlflow"])
def test_tensorboard_and_mlflow_loggers(kind, tmp_path):
    pytest.importorskip(kind)
    from massedit.tasks.config import compose
    from massedit.tasks.runs import setup_run

    job = compose("edit", [f"output_dir={tmp_path / 'run'}", f"logger.kind={kind}"])
    run = setup_run(job)
    try:
        assert type(run.logger).__name__ == {"tensorboard": "TensorBoardLogger", "mlflow": "MLFlowLogger"}[kind]
        run.log_metrics({"eval/post/score": 50.0})
    finally:
        run.finish()
    if kind == "tensorboard":
        assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    else:
        import mlflow

        client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
        assert [m.value for m in client.get_metric_history(run.logger.run_id, "eval/post/score")] == [50.0]
        assert client.get_run(run.logger.run_id).data.params["data.path"] == "builtin:smollm2_facts"


def test_logger_kind_without_its_package_says_which_extra(monkeypatch, tmp_path):
    import importlib.util

    from massedit.tasks.config import compose
    from massedit.tasks.runs import LoggerConfigError, setup_run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a))
    job = compose("edit", [f"output_dir={tmp_path / 'run'}", "logger.kind=mlflow"])
    with pytest.raises(LoggerConfigError, match=r"massedit\[mlflow\]"):
        setup_run(job)


def test_progress_bar_fields_and_disable(monkeypatch):
    from massedit.core.progress import progress_bar

    bar = progress_bar(3, "memit z", unit="req")
    bar.update(1, loss=0.5, done="1/3")
    assert bar.n == 1 and "loss 0.5" in bar._info() and "done 1/3" in bar._info()
    bar.close()
    monkeypatch.setenv("MASSEDIT_PROGRESS", "0")
    off = progress_bar(3, "x")
    off.update(2)
    assert not off.enabled and off.n == 2


def test_one_progress_library():
    """No tqdm anywhere in massedit: Lightning's stages get RichProgressBar, massedit's own bars are rich."""
    import pathlib

    from pytorch_lightning.callbacks import RichProgressBar

    from massedit.trainer import TrainerConfig, build_trainer

    root = pathlib.Path(__file__).resolve().parents[1] / "massedit"
    assert not [str(p) for p in root.rglob("*.py") if "tqdm" in p.read_text()]
    t = build_trainer(TrainerConfig(accelerator="cpu"))
    assert isinstance(t.progress_bar_callback, RichProgressBar)
    assert build_trainer(TrainerConfig(accelerator="cpu", enable_progress_bar=False)).progress_bar_callback is None


def test_target_optimisation_reports_every_step(monkeypatch):
    """The z bar advances with the requests done and shows the step and the loss at every optimisation step."""
    import massedit.core.progress as progress
    from massedit.data.requests import EditRequest
    from massedit.editing.hparams import EditHparams
    from massedit.editing.memit import compute_targets
    from massedit.testing import tiny_model

    torch.set_num_threads(1)
    calls = []

    class Recorder(progress.ProgressBar):
        def update(self, n=1, **fields):
            calls.append((n, dict(fields)))
            super().update(n, **fields)

    monkeypatch.setattr(progress, "progress_bar", lambda *a, **k: Recorder(*a, **{**k, "enabled": False}))
    model, tok = tiny_model("gpt2")
    reqs = [EditRequest(case_id=i, subject=s, prompt="The capital of {}", target_new="Rome")
            for i, s in enumerate(["Japan", "France"])]
    hp = EditHparams(layers=[1], v_num_grad_steps=5, early_stop_loss=0.0)
    compute_targets(model, tok, reqs, hp, ["{}"], progress=True)
    steps = [f["step"] for _, f in calls if "step" in f]
    assert steps == [f"{i}/5" for i in range(1, 6)] and all("loss" in f for _, f in calls if "step" in f)
    assert sum(n for n, _ in calls) == 2  # both requests counted as done


def test_mend_run_uploads_checkpoints_and_editor_as_wandb_artifacts(tiny_dir, tmp_path, monkeypatch):
    import wandb_offline
    from massedit.tasks.config import compose
    from massedit.tasks.train import train_job

    torch.set_num_threads(1)
    monkeypatch.setenv("WANDB_MODE", "offline")
    data = _zsre_file(tmp_path / "zsre.json")
    args = [a for a in _mend_args(tiny_dir, data, tmp_path / "run") if a != "logger=csv"]
    train_job(compose("train", args + ["method.train.max_iters=16", "logger=wandb"]))
    kinds = {a["type"]: a for a in wandb_offline.artifacts(tmp_path / "run")}
    assert kinds["model"]["files"] == ["model.ckpt"]  # Lightning checkpoints (WandbLogger log_model)
    assert "mend_editor.pt" in kinds["mend-editor"]["files"]
