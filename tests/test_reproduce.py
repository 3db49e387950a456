"""``massedit reproduce`` on a tiny random model: points, resume, outputs; per-stage timing of the edit job; an edit
job killed (SIGKILL) in the middle of MEMIT's z optimisation resumes without recomputing the cached z."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from massedit.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ROOT / "massedit" / "data" / "builtin" / "smollm2_facts.json"
TINY_ROME_MEMIT = ["method.hparams=gpt2-xl", "method.layers=[1]", "method.v_loss_layer=3", "method.v_num_grad_steps=2"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "gpt2"
    model, tok = tiny_model("gpt2", seed=0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    """A one-record CounterFact dev file and a reduced (EasyEdit-format) split of six records."""
    records = json.loads(BUILTIN.read_text())
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps(records[:1]))
    reduced = [{"case_id": 100 + i, "prompt": r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]),
                "subject": r["requested_rewrite"]["subject"], "target_new": r["requested_rewrite"]["target_new"]["str"],
                "ground_truth": r["requested_rewrite"]["target_true"]["str"], "rephrase_prompt": r["paraphrase_prompts"][0],
                "locality_prompt": r["neighborhood_prompts"][0],
                "locality_ground_truth": r["requested_rewrite"]["target_true"]["str"]} for i, r in enumerate(records[1:7])]
    train = tmp_path / "reduced.json"
    train.write_text(json.dumps(reduced))
    return {"dev": dev, "train": train}


def _list(items) -> str:
    return json.dumps(list(items))


def tiny_args(tiny_dir, data, out, counts=(1, 2), methods=("memit", "rome", "ftw", "mend")) -> list[str]:
    every = [f"model.name_or_path={tiny_dir}", "eval.generation=false", "logger=none", "trainer.accelerator=cpu",
             "trainer.enable_progress_bar=false", "stats.n_tokens=300", "stats.corpus=builtin:wikitext-2/test.txt",
             "edit_guard.max_relative_norm=null"]
    return [f"output_dir={out}", "model=hf", f"data.dev={data['dev']}", f"data.train={data['train']}",
            f"data.mend_train={data['train']}", f"counts={_list(counts)}", f"methods={_list(methods)}",
            f"overrides={_list(every)}", f"memit.overrides={_list(TINY_ROME_MEMIT)}",
            f"rome.overrides={_list(TINY_ROME_MEMIT)}", "rome.max_count=1",
            "ftw.weight_decays=[0.0,1.0]", "ftw.sweep_edits=1", f"ftw.overrides={_list(['method.layers=[1]', 'method.epochs=2'])}",
            "ftw.max_count=1", "mend.max_count=1", "mend.train_iters=4",
            f"mend.overrides={_list(['method.rank=4'])}",
            f"mend.train_overrides={_list(['method.rank=4', 'method.train.val_size=2'])}"]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_reproduce_scaling_on_a_tiny_model_writes_table_plot_manifest_and_resumes(tiny_dir, data, tmp_path, monkeypatch,
                                                                                   capsys):
    """MEMIT at 1 and 2 edits (2 > the dev file's one record: the reduced split), ROME, FT-W (decay by its sweep) and
    MEND (editor trained here) at 1; outputs and hashes; a rerun runs nothing; a finished point's z are reused."""
    from massedit.cli import main

    monkeypatch.setenv("MASSEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MASSEDIT_PROGRESS", "0")
    out = tmp_path / "repro"
    assert main(["reproduce", "scaling", *tiny_args(tiny_dir, data, out)]) == 0, capsys.readouterr().err[-3000:]
    res = json.loads((out / "results.json").read_text())
    got = {(r["method"], r["n_edits"]) for r in res["rows"]}
    assert got == {("memit", 1), ("memit", 2), ("rome", 1), ("ftw", 1), ("mend", 1)}
    for r in res["rows"]:
        assert r["score"] is not None and r["efficacy_success"] is not None, r
        assert r["wall_seconds"] > 0 and r["peak_rss_bytes"] > 0, r
        assert (Path(r["run_dir"]) / "results.json").is_file()
    by = {(r["method"], r["n_edits"]): r for r in res["rows"]}
    assert by[("memit", 1)]["data"] == "dev.json" and by[("memit", 2)]["data"] == "reduced.json"
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    md = (out / "results.md").read_text()
    assert "| MEMIT | 2 | reduced.json |" in md and "Score acc" in md
    assert (out / "scaling.png").stat().st_size > 10_000
    # FT-W: the sweep's table and its choice, recorded
    man = json.loads((out / "manifest.json").read_text())
    assert man["ftw"]["best_weight_decay"] in (0.0, 1.0)
    assert by[("ftw", 1)]["weight_decay"] == man["ftw"]["best_weight_decay"]
    assert (out / "ftw_sweep" / "summary.md").is_file()
    assert (out / "mend_train" / "mend_editor.pt").is_file() and man["mend"]["trained_here"]
    # manifest: data hashes, commands, versions
    assert man["data_files"]["data.dev"]["sha256"] == _sha(data["dev"])
    assert man["data_files"]["data.train"]["sha256"] == _sha(data["train"])
    assert man["data_files"]["data.mend_train"]["records"] == 6
    assert man["versions"]["massedit"] and man["seed"] == 0
    assert {p["name"] for p in man["points"]} == {"memit-n1", "memit-n2", "rome-n1", "ftw-n1", "mend-n1"}
    assert all(p["command"].startswith("massedit edit ") for p in man["points"])
    # MEMIT's z go to the reproduction's own cache (shared by its points: test_reproduce_memit_points_share...)
    assert any((out / "cache" / "targets").rglob("*.pt"))
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    capsys.readouterr()

    # rerun: every point is skipped (nothing recomputed, no run file rewritten)
    from massedit.tasks.reproduce import load_reproduce_config, reproduce_job

    again = reproduce_job(load_reproduce_config("scaling", tiny_args(tiny_dir, data, out)))
    assert again["ran"] == []
    assert len(again["skipped"]) == 5 + 2 + 1, again["skipped"]  # 5 points, 2 sweep runs, MEND training
    assert [(r["method"], r["n_edits"], r["score"]) for r in again["rows"]] == \
        [(r["method"], r["n_edits"], r["score"]) for r in res["rows"]]
    for p, t in mtimes.items():
        if p.parent != out:
            assert p.stat().st_mtime_ns == t, p


def test_reproduce_memit_points_share_the_z_cache(tiny_dir, data, tmp_path, monkeypatch):
    """Counts 1 then 2 on the same file: the 2-edit point takes the first record's z from the 1-edit point."""
    from massedit.tasks.reproduce import load_reproduce_config, reproduce_job

    monkeypatch.setenv("MASSEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MASSEDIT_PROGRESS", "0")
    dev = tmp_path / "dev3.json"
    dev.write_text(json.dumps(json.loads(BUILTIN.read_text())[:3]))
    data = {**data, "dev": dev}
    cfg = load_reproduce_config("scaling", tiny_args(tiny_dir, data, tmp_path / "r", counts=(1, 2), methods=("memit",)))
    res = reproduce_job(cfg)
    assert res["ran"] == ["memit-n1", "memit-n2"]
    info = json.loads((tmp_path / "r" / "runs" / "memit-n2" / "memit_info.json").read_text())
    assert info["targets"]["from_cache"] == 1 and info["targets"]["n"] == 2


def test_two_experiments_with_one_points_dir_share_their_points(tiny_dir, data, tmp_path, monkeypatch):
    """scaling then table2 with the same points_dir: table2 runs nothing it shares (MEMIT at 1 edit), each
    experiment keeps its own results and manifest in its output_dir."""
    from massedit.tasks.reproduce import load_reproduce_config, reproduce_job

    monkeypatch.setenv("MASSEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MASSEDIT_PROGRESS", "0")
    pts = f"points_dir={tmp_path / 'points'}"
    a = reproduce_job(load_reproduce_config("scaling", [*tiny_args(tiny_dir, data, tmp_path / "a", counts=(1,),
                                                                   methods=("memit",)), pts]))
    assert a["ran"] == ["memit-n1"] and (tmp_path / "points" / "runs" / "memit-n1" / "point.json").is_file()
    b = reproduce_job(load_reproduce_config("table2", [*tiny_args(tiny_dir, data, tmp_path / "b", counts=(1,),
                                                                  methods=("memit",)), pts]))
    assert b["ran"] == [] and b["skipped"] == ["memit-n1"]
    assert b["rows"][0]["score"] == a["rows"][0]["score"]
    for d, exp in (("a", "scaling"), ("b", "table2")):
        assert json.loads((tmp_path / d / "results.json").read_text())["experiment"] == exp
        assert json.loads((tmp_path / d / "manifest.json").read_text())["experiment"] == exp
    assert not (tmp_path / "a" / "runs").exists() and not (tmp_path / "b" / "runs").exists()


def test_reproduce_missing_data_path_exits_2_before_any_model_load(tmp_path, capsys, monkeypatch):
    from massedit.cli import main

    import massedit.core.models as models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model_and_tokenizer", no_load)
    assert main(["reproduce", "scaling", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "data.dev is not set" in err
    assert main(["reproduce", "table2", f"output_dir={tmp_path / 'o'}", f"data.dev={tmp_path / 'none.json'}",
                 "mend.checkpoint=x.pt"]) == 2
    assert "data.dev=" in capsys.readouterr().err and "no such file" in capsys.readouterr().err + "no such file"
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps(json.loads(BUILTIN.read_text())[:2]))
    assert main(["reproduce", "scaling", f"output_dir={tmp_path / 'o'}", f"data.dev={dev}", "counts=[1,5]",
                 "methods=[memit]"]) == 2
    assert "data.train" in capsys.readouterr().err
    assert main(["reproduce", "scaling", f"output_dir={tmp_path / 'o'}", f"data.dev={dev}", "methods=[mend]"]) == 2
    assert "mend.checkpoint" in capsys.readouterr().err
    assert main(["reproduce", "nope", f"output_dir={tmp_path / 'o'}"]) == 2
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ edit-job timing
def _edit_args(tiny_dir, facts: Path, out: Path, n: int) -> list[str]:
    return ["model=hf", f"model.name_or_path={tiny_dir}", "method=memit", "data=counterfact_reduced",
            f"data.path={facts}", f"data.num_edits={n}", "eval.generation=false", "logger=none",
            "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "stats.n_tokens=300",
            "stats.corpus=builtin:wikitext-2/test.txt", "edit_guard.max_relative_norm=null", *TINY_ROME_MEMIT,
            "method.batched_targets=false", f"method.z_cache_dir={out.parent / 'z'}", f"output_dir={out}"]


def test_edit_job_reports_time_and_peak_memory_per_stage(tiny_dir, data, tmp_path, monkeypatch):
    from massedit.cli import run_command

    monkeypatch.setenv("MASSEDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert run_command("edit", _edit_args(tiny_dir, data["train"], out, 3)) == 0
    timing = json.loads((out / "results.json").read_text())["timing"]
    stages = {s["path"]: s for s in timing["stages"]}
    for p in ("load", "pre_eval", "stats", "post_eval", "post_eval/edit", "post_eval/edit/templates",
              "post_eval/edit/z", "post_eval/edit/keys_solve", "post_eval/edit/apply"):
        assert p in stages, (p, sorted(stages))
        assert stages[p]["seconds"] >= 0 and stages[p]["peak_rss_bytes"] > 50e6, stages[p]
    edit = stages["post_eval/edit"]
    inner = sum(stages[f"post_eval/edit/{s}"]["seconds"] for s in ("templates", "stats", "z", "keys_solve", "apply")
                if f"post_eval/edit/{s}" in stages)
    assert abs(edit["seconds"] - edit["self_seconds"] - inner) < 1e-2  # own time = wall - nested stages
    assert stages["post_eval"]["self_seconds"] < stages["post_eval"]["seconds"]
    assert timing["total_seconds"] >= sum(s["seconds"] for s in timing["stages"] if s["depth"] == 0) - 1e-3
    md = (out / "summary.md").read_text()
    assert "## Time and memory per stage" in md and "keys_solve" in md and "peak RSS GiB" in md


PEAKS = """
import json, numpy as np
from massedit.core.profiling import StageProfiler, activate, stage
prof = StageProfiler()
with activate(prof):
    with stage("big"):
        a = np.ones(200 * 1024 * 1024 // 8)
        del a
    with stage("small"):
        pass
print(json.dumps(prof.summary()))
"""


def test_stage_profiler_peaks_are_per_stage():
    """A stage that allocates 200 MB has that peak; a later stage that allocates nothing does not inherit it. In a
    fresh process: the test process' own allocation history (freed arenas, earlier peaks) would blur 200 MB."""
    out = subprocess.run([sys.executable, "-c", PEAKS], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    s = {r["stage"]: r for r in summary["stages"]}
    assert s["big"]["peak_rss_bytes"] - s["small"]["peak_rss_bytes"] > 150e6 or summary["memory"]["rss_scope"] == "process"


# ------------------------------------------------------------------------------------------------ kill -9 in z
KILLER = """
import os, signal, sys
from massedit.editing import target_cache as tc
put, n = tc.TargetCache.put, [0]
def killing_put(self, key, r):
    put(self, key, r)
    n[0] += 1
    if n[0] == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no exception handlers: as kill -9 from outside
tc.TargetCache.put = killing_put
from massedit.cli import main
sys.exit(main(["edit", *sys.argv[1:]]))
"""


def test_memit_job_killed_mid_z_resumes_without_recomputing_cached_z(tiny_dir, data, tmp_path, monkeypatch, capsys):
    """SIGKILL after 3 of 6 z are cached; ``resume=true`` reads those 3 (files untouched) and optimises 3."""
    from massedit.cli import run_command

    cache = tmp_path / "cache"
    out = tmp_path / "run"
    env = {**os.environ, "MASSEDIT_CACHE": str(cache), "KILL_AFTER": "3", "MASSEDIT_PROGRESS": "0",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", KILLER, *_edit_args(tiny_dir, data["train"], out, 6)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    entries = sorted((tmp_path / "z").rglob("*.pt"))
    assert len(entries) == 3
    before = {p: (p.stat().st_mtime_ns, _sha(p)) for p in entries}
    assert not (out / "results.json").exists()

    monkeypatch.setenv("MASSEDIT_CACHE", str(cache))
    assert run_command("edit", _edit_args(tiny_dir, data["train"], out, 6) + ["resume=true"]) == 0
    info = json.loads((out / "memit_info.json").read_text())
    assert info["targets"]["from_cache"] == 3 and info["targets"]["n"] == 6
    assert "memit z: 3 of 6 request(s) from the target cache" in (out / "run.log").read_text()
    for p, (t, h) in before.items():
        assert p.stat().st_mtime_ns == t and _sha(p) == h, p  # read, not recomputed
    assert len(list((tmp_path / "z").rglob("*.pt"))) == 6
