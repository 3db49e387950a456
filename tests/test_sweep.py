"""Offline W&B-sweep runner on Optuna: parsing, grid/random/TPE sampling, commands, resume from the journal,
summary and best trial."""
from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import pytest

from massedit.tasks.sweep import (
    JOURNAL,
    SweepSpecError,
    SweepStudy,
    build_command,
    grid_points,
    load_sweep,
    preview_trials,
    run_sweep,
    sweep_from_dict,
)

REPO = Path(__file__).resolve().parents[1]


def _spec(method="grid", params=None, **kw):
    raw = {"name": "t", "program": "train.py", "method": method, "metric": {"name": "score", "goal": "maximize"},
           "parameters": params or {"method.weight_decay": {"values": [0.0, 0.01, 0.1, 1.0]}, "data.num_edits": {"value": 5}},
           "command": ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]}
    raw.update(kw)
    return sweep_from_dict(raw)


def _fake_score(wd: float) -> dict:
    """A trade-off with a peak at wd = 0.1: efficacy falls, specificity rises with decay."""
    x = math.log10(wd) if wd > 0 else -4
    es, ns = 100 - 15 * (x + 4), 40 + 12 * (x + 4)
    ps = es - 10
    score = 3 / (1 / es + 1 / ps + 1 / ns)
    return {"efficacy_success": es, "paraphrase_success": ps, "neighborhood_success": ns, "score": score,
            "delta_norm": 1 / (1 + wd),
            "pre": {"efficacy_success": 20.0, "paraphrase_success": 20.0, "neighborhood_success": 80.0, "score": 26.7}}


# ------------------------------------------------------------------------------------------ parsing / expansion
def test_shipped_sweep_file_is_a_valid_wandb_grid_that_train_accepts():
    from massedit.tasks.config import compose

    spec = load_sweep(REPO / "configs/sweeps/ftw_weight_decay.yaml")
    assert spec.method == "grid" and spec.metric == "eval/post/score" and spec.goal == "maximize"
    assert spec.program == "train.py" and "${args_no_hyphens}" in spec.command
    wds = spec.parameters["method.weight_decay"]["values"]
    assert 0 in wds and len(wds) >= 5 and max(wds) / min(w for w in wds if w > 0) >= 1e3
    trials = preview_trials(spec)
    assert len(trials) == len(wds)
    for t in trials:  # every trial's key=value arguments compose into a train config
        # the runner's own additions (run directory, W&B group and name) must compose too
        cmd = build_command(spec, t, extra_args=["output_dir=/tmp/x", "logger.group=g", "logger.name=n", "data.path=cf.json"])
        args = cmd[cmd.index("train.py") + 1:]
        cfg = compose("train", args)
        assert cfg.method.name == "ftw" and float(cfg.method.weight_decay) == float(t["method.weight_decay"])
        assert cfg.logger.group == "g" and cfg.output_dir == "/tmp/x"


def test_grid_expansion_is_the_cartesian_product_in_file_order():
    spec = _spec(params={"a": {"values": [1, 2]}, "b": {"values": ["x", "y", "z"]}, "c": {"value": 0.5},
                         "nested": {"parameters": {"lr": {"values": [1e-3]}}}})
    trials = grid_points(spec)
    assert len(trials) == 6
    assert trials[0] == {"a": 1, "b": "x", "c": 0.5, "nested.lr": 1e-3}
    assert [(t["a"], t["b"]) for t in trials] == [(1, "x"), (1, "y"), (1, "z"), (2, "x"), (2, "y"), (2, "z")]
    assert spec.varying() == ["a", "b"]


def test_yaml11_exponent_strings_become_numbers(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(textwrap.dedent("""
        method: grid
        program: train.py
        command:
          - ${env}
          - ${interpreter}
          - ${program}
          - ${args_no_hyphens}
        metric: {name: score, goal: maximize}
        parameters:
          method.weight_decay: {values: [0, 1e-4, 1e-2]}
    """))
    assert load_sweep(f).parameters["method.weight_decay"]["values"] == [0, 1e-4, 1e-2]


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_random_and_tpe_search_distributions_and_determinism(method):
    params = {"lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-1},
              "wd": {"distribution": "uniform", "min": 0.0, "max": 2.0},
              "layer": {"distribution": "int_uniform", "min": 3, "max": 7},
              "loss": {"values": ["bag_last_position", "autoregressive"]},
              "q": {"distribution": "q_uniform", "min": 0, "max": 10, "q": 2},
              "ln": {"distribution": "log_uniform", "min": 0.0, "max": 1.0},
              "layers": {"values": [[4, 5], [6, 7, 8]]},
              "fixed": {"value": 7}}
    spec = _spec(method=method, params=params, run_cap=60)
    trials = preview_trials(spec, seed=3)
    assert len(trials) == 60
    for t in trials:
        assert 1e-5 <= t["lr"] <= 1e-1 and 0 <= t["wd"] <= 2 and t["layer"] in range(3, 8)
        assert t["loss"] in ("bag_last_position", "autoregressive") and t["fixed"] == 7
        assert t["q"] % 2 == 0 and 1 <= t["ln"] <= math.e and t["layers"] in ([4, 5], [6, 7, 8])
    if method == "random":
        lrs = sorted(math.log10(t["lr"]) for t in trials)
        assert lrs[6] < -4 and lrs[-6] > -2  # log-uniform: spread over the decades
    assert preview_trials(spec, seed=3) == trials and preview_trials(spec, seed=4) != trials
    with pytest.raises(SweepSpecError, match="run_cap"):
        preview_trials(_spec(method=method, params=params))


@pytest.mark.parametrize("raw, msg", [
    ({"method": "hyperband"}, "hyperband"),
    ({"method": "random", "parameters": {"x": {"distribution": "normal", "mu": 0, "sigma": 1}}}, "W&B server only"),
    ({"method": "grid", "parameters": {"x": {"distribution": "uniform", "min": 0, "max": 1}}}, "grid search"),
    ({"metric": {}}, "metric"),
    ({"command": None}, "args_no_hyphens"),
    ({"parameters": {"x": {"values": []}}}, "non-empty"),
    ({"parameters": {"x": {"distribution": "log_uniform_values", "min": 0, "max": 1}}, "method": "random"}, "min > 0"),
])
def test_bad_sweep_files_fail_clearly(raw, msg):
    base = {"name": "t", "program": "train.py", "method": "grid", "metric": {"name": "score", "goal": "maximize"},
            "parameters": {"a": {"values": [1]}}, "command": ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]}
    base.update(raw)
    if base.get("command") is None:
        del base["command"]
    with pytest.raises(SweepSpecError, match=msg):
        sweep_from_dict(base)


def test_command_macros_like_the_wandb_agent():
    spec = _spec(params={"method.weight_decay": {"value": 0.001}, "flag": {"value": True}})
    cmd = build_command(spec, {"method.weight_decay": 0.001, "flag": True}, extra_args=["x=1"], interpreter="python")
    assert cmd == ["/usr/bin/env", "python", "train.py", "method.weight_decay=0.001", "flag=true", "x=1"]
    spec.command = ["${interpreter}", "${program}", "${args}"]
    assert build_command(spec, {"a": 1}, interpreter="py") == ["py", "train.py", "--a=1"]


# ------------------------------------------------------------------------------------------ running
def test_runner_reports_best_trial_and_writes_summary(tmp_path):
    spec = _spec()
    seen = []

    def trial(ctx):
        seen.append(ctx.trial["id"])
        assert ctx.group.startswith("t-") and (tmp_path / JOURNAL).exists()
        return _fake_score(float(ctx.trial["params"]["method.weight_decay"]))

    summary = run_sweep(spec, tmp_path, trial, log_to_wandb=False, progress=False)
    assert seen == ["t000", "t001", "t002", "t003"]
    best_wd = max([0.0, 0.01, 0.1, 1.0], key=lambda w: _fake_score(w)["score"])
    assert summary["best"]["method.weight_decay"] == best_wd
    assert summary["x"] == "method.weight_decay"
    md = (tmp_path / "summary.md").read_text()
    assert "(best)" in md and md.count("\n|") >= 5
    assert summary["pre"]["neighborhood_success"] == 80.0 and "Unedited model" in md
    js = json.loads((tmp_path / "summary.json").read_text())
    assert js["best"]["trial"] == summary["best"]["trial"] and len(js["rows"]) == 4
    png = (tmp_path / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_minimize_goal_picks_smallest(tmp_path):
    spec = _spec(metric={"name": "delta_norm", "goal": "minimize"})
    summary = run_sweep(spec, tmp_path, lambda ctx: _fake_score(float(ctx.trial["params"]["method.weight_decay"])),
                        log_to_wandb=False, progress=False)
    assert summary["best"]["method.weight_decay"] == 1.0


class _Crash(BaseException):
    pass


def _wd(ctx):
    return float(ctx.trial["params"]["method.weight_decay"])


def test_resume_does_not_rerun_finished_trials(tmp_path):
    """A runner killed mid-sweep: the Optuna journal keeps the finished trials; the next run does the rest (the
    interrupted trial again), a third run has nothing left; another sweep in the same --out is refused."""
    spec = _spec()
    calls = []

    def crashing(ctx):
        if _wd(ctx) == 0.1:
            raise _Crash()  # the process dies mid-sweep (not an ordinary trial failure)
        calls.append(_wd(ctx))
        return _fake_score(_wd(ctx))

    with pytest.raises(_Crash):
        run_sweep(spec, tmp_path, crashing, log_to_wandb=False, progress=False)
    assert (tmp_path / JOURNAL).exists()
    states = [t.state.name for t in SweepStudy(spec, tmp_path, spec.fingerprint()).trials()]
    assert states.count("COMPLETE") == 2 and "WAITING" in states

    resumed = []

    def ok(ctx):
        resumed.append(_wd(ctx))
        return _fake_score(_wd(ctx))

    summary = run_sweep(spec, tmp_path, ok, log_to_wandb=False, progress=False)
    assert calls == [0.0, 0.01] and sorted(resumed) == [0.1, 1.0]
    assert summary["n_finished"] == 4 and summary["n_failed"] == 0 and summary["n_trials"] == 4
    assert run_sweep(spec, tmp_path, ok, log_to_wandb=False, progress=False)["n_finished"] == 4
    assert len(resumed) == 2  # a third run has nothing left to do
    with pytest.raises(SweepSpecError, match="different sweep"):
        run_sweep(_spec(params={"method.weight_decay": {"values": [5.0]}}), tmp_path, ok, log_to_wandb=False)


def test_a_killed_runner_leaves_a_running_trial_that_runs_again(tmp_path):
    import optuna

    spec = _spec()
    st = SweepStudy(spec, tmp_path, spec.fingerprint())
    assert st.prepare(None, False) == 4
    t = st.study.ask()  # a trial some killed process had started (RUNNING in the journal)
    st.study.trials  # noqa: B018
    ran = []
    s = run_sweep(spec, tmp_path, lambda c: ran.append(_wd(c)) or _fake_score(_wd(c)), log_to_wandb=False,
                  progress=False)
    assert sorted(ran) == [0.0, 0.01, 0.1, 1.0] and s["n_finished"] == 4
    assert st.study.get_trials(deepcopy=False)[t.number].state == optuna.trial.TrialState.FAIL


def test_failed_trials_are_recorded_and_retried_on_request(tmp_path):
    spec = _spec()

    def flaky(ctx):
        if _wd(ctx) == 0.01:
            raise RuntimeError("boom")
        return _fake_score(_wd(ctx))

    s = run_sweep(spec, tmp_path, flaky, log_to_wandb=False, progress=False)
    assert s["n_failed"] == 1 and s["n_finished"] == 3
    assert "boom" in next(r["error"] for r in s["rows"] if r["status"] == "failed")
    again = []
    s = run_sweep(spec, tmp_path, lambda ctx: again.append(_wd(ctx)) or _fake_score(1.0),
                  log_to_wandb=False, progress=False)
    assert again == [] and s["n_failed"] == 1
    s = run_sweep(spec, tmp_path, lambda ctx: again.append(_wd(ctx)) or _fake_score(1.0),
                  retry_failed=True, log_to_wandb=False, progress=False)
    assert again == [0.01] and s["n_failed"] == 0 and s["n_trials"] == 4


def test_random_sweep_grows_with_count_and_keeps_finished(tmp_path):
    spec = _spec(method="random", params={"method.weight_decay": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1.0}})
    first = []
    run_sweep(spec, tmp_path, lambda c: first.append(c.trial["params"]) or _fake_score(c.trial["params"]["method.weight_decay"]),
              count=3, log_to_wandb=False, progress=False)
    more = []
    s = run_sweep(spec, tmp_path, lambda c: more.append(c.trial["params"]) or _fake_score(c.trial["params"]["method.weight_decay"]),
                  count=5, log_to_wandb=False, progress=False)
    assert len(first) == 3 and len(more) == 2 and s["n_finished"] == 5
    assert not any(m in first for m in more)


def test_tpe_sweep_runs_and_resumes(tmp_path):
    spec = _spec(method="bayes", params={"method.weight_decay": {"distribution": "log_uniform_values", "min": 1e-4,
                                                                  "max": 1.0}}, run_cap=6)
    run_sweep(spec, tmp_path, lambda c: _fake_score(_wd(c)), count=4, log_to_wandb=False, progress=False)
    s = run_sweep(spec, tmp_path, lambda c: _fake_score(_wd(c)), log_to_wandb=False, progress=False)
    assert s["n_finished"] == 6 and s["best"]["metric"] == max(r["metric"] for r in s["rows"])


def test_subprocess_trial_runs_the_command_and_reads_results(tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent("""
        import json, os, sys
        kv = dict(a.split("=", 1) for a in sys.argv[1:])
        wd = float(kv["wd"])
        json.dump({"score": 50 + wd, "efficacy_success": 90, "paraphrase_success": 80,
                   "neighborhood_success": 40 + wd, "group": os.environ["WANDB_RUN_GROUP"]},
                  open(os.environ["MASSEDIT_TRIAL_RESULT"], "w"))
    """))
    spec = sweep_from_dict({"name": "sub", "program": str(prog), "method": "grid",
                            "metric": {"name": "score", "goal": "maximize"},
                            "parameters": {"wd": {"values": [1, 3, 2]}},
                            "command": ["${interpreter}", "${program}", "${args_no_hyphens}"]})
    s = run_sweep(spec, tmp_path / "out", devices=["0", "1"], log_to_wandb=False, progress=False)
    assert s["n_finished"] == 3 and s["best"]["wd"] == 3
    st = SweepStudy(spec, tmp_path / "out", spec.fingerprint())
    trials = st.study.get_trials()
    assert all(t.user_attrs["result"]["group"] == st.group for t in trials)
    assert {t.user_attrs["device"] for t in trials} <= {"0", "1"}
    assert (tmp_path / "out/trials/t000/command.txt").read_text().startswith(sys.executable)


def test_cli_dry_run_and_summary_logged_to_wandb_offline(tmp_path, monkeypatch, capsys):
    from massedit.tasks.sweep import log_summary_to_wandb, main

    assert main([str(REPO / "configs/sweeps/ftw_weight_decay.yaml"), "--dry-run", "--set", "data.num_edits=7"]) == 0
    out = capsys.readouterr().out
    assert "method.weight_decay=0.0" in out and "data.num_edits=7" in out
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = _spec()
    summary = run_sweep(spec, tmp_path, lambda c: _fake_score(float(c.trial["params"]["method.weight_decay"])),
                        log_to_wandb=False, progress=False)
    assert log_summary_to_wandb(tmp_path, spec, summary, group="g") is True
    assert list(tmp_path.glob("wandb/offline-run-*"))


@pytest.mark.slow
def test_edit_py_is_a_sweep_program(tmp_path, monkeypatch):
    """A grid over edit.py runs every trial through the real program (as the agent would) and reads its numbers
    (MASSEDIT_TRIAL_RESULT); a tiny model saved as a Hugging Face directory keeps it short."""
    import os

    from massedit.testing import tiny_model

    d = tmp_path / "tiny"
    model, tok = tiny_model("gpt2")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MASSEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = sweep_from_dict({"name": "edit", "program": str(REPO / "edit.py"), "method": "grid",
                            "metric": {"name": "eval/post/score", "goal": "maximize"},
                            "parameters": {"model": {"value": "hf"}, "model.name_or_path": {"value": str(d)},
                                           "method.v_lr": {"values": [0.5, 1.0]}, "data.num_edits": {"value": 2},
                                           "stats.n_tokens": {"value": 2000}, "method.v_num_grad_steps": {"value": 4},
                                           "eval.generation": {"value": False}, "logger": {"value": "csv"}},
                            "command": ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]})
    s = run_sweep(spec, tmp_path / "out", log_to_wandb=False, progress=False)
    assert s["n_finished"] == 2 and s["n_failed"] == 0, [r.get("error") for r in s["rows"]]
    assert all(r["efficacy_success"] is not None and r["metric"] == r["score"] for r in s["rows"])


def test_summary_reads_massedit_results_with_cis_and_the_scaling_file(tmp_path):
    """Trials report massedit's results.json layout (eval.{pre,post}.{metric,metric_ci}); the summary carries the CIs
    and the plot is written; the shipped scaling sweep is a grid over data.num_edits that `edit` accepts."""
    from massedit.tasks.config import compose

    spec = _spec(params={"data.num_edits": {"values": [1, 4, 16]}}, metric={"name": "eval/post/score",
                                                                           "goal": "maximize"})

    def trial(ctx):
        n = ctx.trial["params"]["data.num_edits"]
        post = {"efficacy_success": 100.0 - n, "paraphrase_success": 90.0 - n, "neighborhood_success": 80.0,
                "score": 85.0 - n}
        return {"eval": {"pre": {"efficacy_success": 1.0, "score": 2.0},
                         "post": {**post, **{f"{k}_ci": 10.0 / n for k in post}}}}

    s = run_sweep(spec, tmp_path, trial, log_to_wandb=False, progress=False)
    assert s["best"]["data.num_edits"] == 1 and s["best"]["metric"] == 84.0
    row16 = next(r for r in s["rows"] if r["data.num_edits"] == 16)
    assert row16["score"] == 69.0 and row16["score_ci"] == 10.0 / 16 and s["pre"]["efficacy_success"] == 1.0
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    scaling = load_sweep(REPO / "configs/sweeps/memit_num_edits_smollm2.yaml")
    assert scaling.program == "edit.py" and scaling.metric == "eval/post/score"
    for t in preview_trials(scaling):
        cmd = build_command(scaling, t, extra_args=["output_dir=/tmp/x"])
        assert compose("edit", cmd[cmd.index("edit.py") + 1:]).data.num_edits == t["data.num_edits"]
