"""Run directories, resolved config, loggers (W&B offline without a key, CSV, none)."""
import pytest

from massedit.tasks.config import compose
from massedit.tasks.runs import resolve_wandb_mode, setup_run


@pytest.mark.parametrize("logger", ["csv", "none", "wandb"])
def test_run_dir_config_and_logger(tmp_path, logger, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    job = compose("edit", [f"output_dir={tmp_path/'run'}", f"logger={logger}", "seed=5"])
    run = setup_run(job)
    try:
        assert (run.dir / "config.yaml").exists() and (run.dir / "run.log").exists()
        assert "seed: 5" in (run.dir / "config.yaml").read_text()
        run.log_metrics({"x": 1.0})
        run.log_summary({"y": 2.0})
        run.save_json("results.json", {"ok": True})
        assert (run.dir / "results.json").exists()
        assert (run.logger is None) == (logger == "none")
    finally:
        run.finish()


def test_wandb_mode_auto(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode("online") == "offline"
