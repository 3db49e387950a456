"""Reliability and security (issue 15): safe loading of every user-supplied or cached file (a crafted pickle is
refused and never runs), finiteness and update-norm guards before any weight is written, verified caches (a bad
entry is discarded and recomputed), stale temporary files cleaned, the run-directory policy, exit codes
(2 user error, 1 bug with the traceback in run.log, 130/143 signals) and file modes that follow the umask."""
from __future__ import annotations

import builtins
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from massedit.core.errors import InputError
from massedit.core.guards import EditGuardError, check_finite, check_update_norms, relative_norm
from massedit.data.requests import EditRequest
from massedit.testing import _CORPUS, corpus_second_moments, tiny_model

REPO = Path(__file__).resolve().parents[1]
TEXTS = [s.strip() + "." for s in _CORPUS.split(".") if s.strip()]
REQ = EditRequest(case_id=1, subject="Japan", prompt="The capital of {} is", target_new="Rome", target_true="Tokyo")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Payload:
    """Unpickling this creates ``marker``: stands in for arbitrary code in a crafted file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _payload_check(tmp_path):
    marker = tmp_path / "PWNED"
    assert not marker.exists()
    return marker


# ------------------------------------------------------------------------------------------------ safe loading
def test_payload_runs_with_an_unsafe_loader(tmp_path):
    """Control: the crafted files used below do execute under pickle / weights_only=False."""
    marker = tmp_path / "PWNED"
    torch.save({"x": Payload(marker)}, tmp_path / "p.pt")
    torch.load(tmp_path / "p.pt", weights_only=False)
    assert marker.exists()


def test_reference_npz_with_pickled_object_array_is_refused(tmp_path):
    from massedit.stats.reference import ReferenceStatsError, load_reference_second_moment, load_reference_stats

    marker = _payload_check(tmp_path)
    path = tmp_path / "x_float32_mom2_1.npz"
    with open(path, "wb") as fh:
        np.savez(fh, **{"mom2.mom2": np.array([Payload(marker)], dtype=object), "mom2.count": np.array(5)})
    for load in (load_reference_stats, load_reference_second_moment):
        with pytest.raises(ReferenceStatsError, match="not a readable reference statistics npz"):
            load(path)
    assert not marker.exists()


def test_consistency_idf_npy_with_pickle_is_refused(tmp_path):
    from massedit.evaluation.text import ConsistencyScorer

    marker = _payload_check(tmp_path)
    np.save(tmp_path / "idf.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    (tmp_path / "s.json").write_text("[]")
    (tmp_path / "v.json").write_text('{"a": 0}')
    with pytest.raises(ValueError, match="allow_pickle"):
        ConsistencyScorer(tmp_path / "s.json", tmp_path / "idf.npy", tmp_path / "v.json")
    assert not marker.exists()


def test_mend_editor_file_with_pickle_is_refused(tmp_path):
    from massedit.editing.mend.editor import MendCheckpointError, load_editor

    marker = _payload_check(tmp_path)
    torch.save({"format": "massedit-mend-v1", "state_dict": {}, "describe": Payload(marker)}, tmp_path / "e.pt")
    with pytest.raises(MendCheckpointError, match="not a loadable MEND editor"):
        load_editor(tmp_path / "e.pt")
    assert not marker.exists()


def test_lightning_checkpoint_with_pickle_is_refused(tmp_path):
    from massedit.lightning_modules.mend import AtomicCheckpointIO

    marker = _payload_check(tmp_path)
    torch.save({"state_dict": {}, "epoch": Payload(marker)}, tmp_path / "last.ckpt")
    with pytest.raises(InputError, match="ckpt_path.*not a loadable Lightning checkpoint"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")
    assert not marker.exists()
    ok = {"state_dict": {"net.w": torch.ones(2)}, "epoch": 3, "loops": {"x": [1, 2]}}
    AtomicCheckpointIO().save_checkpoint(ok, tmp_path / "ok.ckpt")
    assert AtomicCheckpointIO().load_checkpoint(tmp_path / "ok.ckpt")["epoch"] == 3


def test_target_cache_entry_with_pickle_is_discarded(tmp_path, caplog):
    from massedit.editing.target_cache import TargetCache

    marker = _payload_check(tmp_path)
    cache = TargetCache(tmp_path / "targets")
    p = cache.path("ab" + "0" * 22)
    p.parent.mkdir(parents=True)
    torch.save({"case_id": Payload(marker)}, p)
    with caplog.at_level(logging.WARNING):
        assert cache.get("ab" + "0" * 22) is None
    assert not marker.exists() and not p.exists()
    assert "discarding unreadable target cache entry" in caplog.text


def test_stats_partial_checkpoint_with_pickle_is_discarded(tmp_path):
    from massedit.stats.collect import CollectionJob

    marker = _payload_check(tmp_path)
    job = CollectionJob(modules=["m"], token_batches=None, acc_dtype="float32", result_paths={}, result_meta={},
                        runkey="k", partial_dir=str(tmp_path))
    torch.save({"runkey": "k", "state": Payload(marker)}, job.partial_path(0, 1))
    assert job.load_partial(0, 1) is None
    assert not marker.exists()


def test_stats_cache_and_delta_files_with_pickle_are_refused(tmp_path):
    from massedit.core.deltas import DeltaFileError, load_deltas
    from massedit.stats.cache import CorruptStatsFile, load_stats_file

    marker = _payload_check(tmp_path)
    for name in ("s.safetensors", "d.safetensors"):
        (tmp_path / name).write_bytes(pickle.dumps({"sum": Payload(marker)}))
    with pytest.raises(CorruptStatsFile, match="unreadable"):
        load_stats_file(tmp_path / "s.safetensors")
    with pytest.raises(DeltaFileError, match="not a readable safetensors"):
        load_deltas(tmp_path / "d.safetensors")
    assert not marker.exists()


def test_model_with_pickled_bin_weights_is_refused(tmp_path):
    from massedit.core.models import ModelNotAvailableError, load_model_and_tokenizer

    marker = _payload_check(tmp_path)
    model, tok = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": Payload(marker)}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ModelNotAvailableError, match="refused"):
        load_model_and_tokenizer(str(tmp_path / "m"))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ guards
def test_guard_functions():
    w = torch.ones(4, 4)
    assert relative_norm(torch.ones(4, 4) * 2, w) == pytest.approx(2.0)
    check_update_norms({"w": torch.ones(4, 4) * 9}, {"w": w}, 10.0)
    with pytest.raises(EditGuardError, match=r"'w'.*11 times.*edit_guard.max_relative_norm=10"):
        check_update_norms({"w": torch.ones(4, 4) * 11}, {"w": w}, 10.0)
    check_update_norms({"w": torch.ones(4, 4) * 1e6}, {"w": w}, None)  # limit off: only finiteness
    for bad in (float("nan"), float("inf"), -float("inf")):
        d = torch.zeros(4, 4)
        d[1, 2] = bad
        with pytest.raises(EditGuardError, match="non-finite"):
            check_update_norms({"w": d}, {"w": w}, None)
    check_update_norms({"b": torch.ones(3)}, {"b": torch.zeros(3)}, 10.0)  # zero weight: no scale, finite passes
    with pytest.raises(EditGuardError, match="my tensor"):
        check_finite(torch.tensor([1.0, float("nan")]), "my tensor")


class _FixedEditor:
    method = "fixed"

    def __init__(self, deltas):
        self.deltas, self.info = deltas, {}

    def edit(self, model, tok, requests):
        return self.deltas


class _LM(torch.nn.Module):
    def __init__(self, model, tok):
        super().__init__()
        self.model, self.tok = model, tok


@pytest.mark.parametrize("kind", ["nan", "inf", "runaway"])
def test_apply_edit_refuses_bad_deltas_before_writing(kind, tmp_path):
    from massedit.callbacks.apply_edit import ApplyEdit

    model, tok = tiny_model("gpt2")
    name = "transformer.h.1.mlp.c_proj.weight"
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    d = torch.zeros_like(model.get_parameter(name))
    if kind == "nan":
        d[0, 0] = float("nan")
    elif kind == "inf":
        d[0, 0] = float("inf")
    else:
        d += 1e6
    cb = ApplyEdit(_FixedEditor({name: d}), [REQ], save_path=tmp_path / "deltas.safetensors")
    trainer = type("T", (), {"is_global_zero": True})()
    with pytest.raises(EditGuardError, match=name):
        cb.apply(trainer, _LM(model, tok))
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())
    assert not (tmp_path / "deltas.safetensors").exists()
    if kind == "runaway":  # the limit is configurable
        ApplyEdit(_FixedEditor({name: d}), [REQ], max_relative_norm=None).apply(trainer, _LM(model, tok))
        assert not torch.equal(model.get_parameter(name), w0[name])


def _tiny_memit_hp(**kw):
    from massedit.editing.hparams import EditHparams

    return EditHparams(**{"layers": [1], "v_num_grad_steps": 3, "v_loss_layer": 3, "mom2_update_weight": 10.0, **kw})


@pytest.mark.parametrize("where", ["C", "z", "solve"])
def test_memit_nonfinite_intermediates_stop_before_any_write(where, monkeypatch):
    import massedit.editing.memit as memit_mod
    from massedit.editing.memit import MemitEditor, apply_memit

    model, tok = tiny_model("gpt2")
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    C = corpus_second_moments(model, tok, [1], TEXTS)
    hp = _tiny_memit_hp()
    if where == "C":
        bad = {1: C[1].clone().fill_(float("nan"))}
        ed = MemitEditor(hp, stats=lambda m, t, l: bad, context_templates=[["{}"]], progress=False)
        with pytest.raises(EditGuardError, match="statistics C of layer 1"):
            ed.edit(model, tok, [REQ])
    elif where == "z":
        real = memit_mod.compute_targets

        def nan_targets(*a, **k):
            res = real(*a, **k)
            res[0].delta[0] = float("nan")
            return res

        monkeypatch.setattr(memit_mod, "compute_targets", nan_targets)
        with pytest.raises(EditGuardError, match="target z of request case_id=1"):
            apply_memit(model, tok, [REQ], hp, [["{}"]], C, progress=False)
    else:  # C with a NaN: the solve result is not finite (the editor's own C check is bypassed here)
        bad = C[1].clone()
        bad[3, 5] = float("nan")
        with pytest.raises(EditGuardError, match="solve"):
            apply_memit(model, tok, [REQ], hp, [["{}"]], {1: bad}, progress=False)
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("where", ["v_star", "C"])
def test_rome_nonfinite_intermediates_stop_before_any_write(where, monkeypatch):
    import massedit.editing.rome as rome_mod
    from massedit.editing.rome import apply_rome

    model, tok = tiny_model("gpt2")
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    C = corpus_second_moments(model, tok, [1], TEXTS)
    hp = _tiny_memit_hp(layers=[1], v_loss_layer=None)
    added = []
    monkeypatch.setattr(rome_mod, "_add_to_weight", lambda *a: added.append(a))
    if where == "v_star":
        real = rome_mod.optimise_targets

        def nan_targets(*a, **k):
            res = real(*a, **k)
            res[0].delta[:] = float("inf")
            return res

        monkeypatch.setattr(rome_mod, "optimise_targets", nan_targets)
        with pytest.raises(EditGuardError, match=r"case_id=1, layer 1: target value v\*"):
            apply_rome(model, tok, [REQ], hp, ["{}"], C, progress=False)
    else:
        with pytest.raises(EditGuardError, match="C⁻¹ of layer 1|key direction u"):
            apply_rome(model, tok, [REQ], hp, ["{}"], {1: torch.full_like(C[1], float("nan"))}, progress=False)
    assert not added
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------ CLI end to end
@pytest.fixture
def facts(tmp_path) -> Path:
    p = tmp_path / "facts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [
        {"case_id": 1, "subject": "Japan", "prompt": "The capital of {} is", "target": "Rome", "target_true": "Tokyo"},
        {"case_id": 2, "subject": "Michael Jordan", "prompt": "{} plays", "target": "soccer", "target_true": "basketball"},
    ]))
    return p


def _base(tiny, facts, tmp_path, method="memit"):
    out = ["model=hf", f"model.name_or_path={tiny}", f"method={method}", "data=user", f"data.path={facts}",
           "eval.generation=false", "logger=none", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
    if method in ("rome", "memit"):
        out += ["method.hparams=gpt2-xl", "method.layers=[1]", "method.v_loss_layer=3", "method.v_num_grad_steps=2",
                "stats.n_tokens=300", "stats.corpus=builtin:wikitext-2/test.txt"]
    return out


@pytest.mark.parametrize("method,args", [
    ("ft", ["method.lr=1e8", "method.epochs=2"]),            # ‖Δ‖ ~ 1e10: the runaway-update limit
    ("mend", ["method.lr_scale=1e30", "method.rank=4"]),     # ‖Δ‖ ~ 1e25 here (inf on SmolLM2): the limit
])
def test_runaway_edits_exit_2_without_touching_weights(method, args, tiny_dir, facts, tmp_path, capsys, monkeypatch):
    from massedit.cli import run_command

    monkeypatch.setenv("MASSEDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc = run_command("edit", _base(tiny_dir, facts, tmp_path, method) + [*args, f"output_dir={out}", "eval.pre=false"])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    line = [ln for ln in err.splitlines() if ln.startswith("error:")][-1]
    assert "edit_guard.max_relative_norm" in line or "non-finite" in line, line
    assert not (out / "deltas.safetensors").exists() and not (out / "results.json").exists()
    assert "error:" in (out / "run.log").read_text()


def _save_delta(path, name, value):
    from safetensors.torch import save_file

    save_file({name: value}, str(path))


def test_saved_deltas_with_runaway_norm_are_refused(tiny_dir, facts, tmp_path, capsys, monkeypatch):
    from massedit.cli import run_command

    monkeypatch.setenv("MASSEDIT_CACHE", str(tmp_path / "cache"))
    _save_delta(tmp_path / "d.safetensors", "transformer.h.1.mlp.c_proj.weight", torch.full((64, 32), 1e4))
    for extra in (["mode=eval"], []):
        out = tmp_path / f"out{len(extra)}"
        rc = run_command("edit", _base(tiny_dir, facts, tmp_path) + [f"deltas={tmp_path / 'd.safetensors'}",
                                                                     f"output_dir={out}", "eval.pre=false", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "edit_guard.max_relative_norm" in err, err[-2000:]
        assert not (out / "deltas.safetensors").exists() and not (out / "results.json").exists()


def test_unexpected_error_exit_1_with_traceback_in_run_log(tiny_dir, facts, tmp_path, capsys, monkeypatch):
    import massedit.tasks.edit as edit_mod
    from massedit.cli import run_command

    def boom(*a, **k):
        raise RuntimeError("boom from a bug")

    monkeypatch.setattr(edit_mod, "build_trainer", boom)
    out = tmp_path / "out"
    rc = run_command("edit", _base(tiny_dir, facts, tmp_path) + [f"output_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "unexpected internal error" in err and "boom from a bug" in err
    log = (out / "run.log").read_text()
    assert "Traceback" in log and "boom from a bug" in log and "unexpected error" in log


def test_late_user_error_is_logged_in_run_log(tiny_dir, facts, tmp_path, capsys, monkeypatch):
    import massedit.tasks.edit as edit_mod
    from massedit.cli import run_command

    def bad(*a, **k):
        raise InputError("some.key=3: cannot work")

    monkeypatch.setattr(edit_mod, "build_trainer", bad)
    out = tmp_path / "out"
    rc = run_command("edit", _base(tiny_dir, facts, tmp_path) + [f"output_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert "error: some.key=3: cannot work" in (out / "run.log").read_text()


def test_sigterm_stops_the_run_with_exit_143(tiny_dir, facts, tmp_path, capsys, monkeypatch):
    import massedit.tasks.edit as edit_mod
    from massedit.cli import run_command

    def slow(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        raise AssertionError("not interrupted")

    monkeypatch.setattr(edit_mod, "build_trainer", slow)
    out = tmp_path / "out"
    t0 = time.time()
    rc = run_command("edit", _base(tiny_dir, facts, tmp_path) + [f"output_dir={out}"])
    assert time.time() - t0 < 20
    err = capsys.readouterr().err
    assert rc == 143 and "interrupted by SIGTERM" in err and "Traceback" not in err
    assert "interrupted (SIGTERM)" in (out / "run.log").read_text()
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGTERM))
    assert not [p for p in out.rglob("*.tmp")]


@pytest.mark.slow
def test_sigterm_during_a_real_evaluation_subprocess(tiny_dir, tmp_path):
    """A real `python -m massedit edit` on many requests gets SIGTERM mid-run: exit 143 within seconds."""
    reqs = tmp_path / "many.jsonl"
    reqs.write_text("".join(json.dumps({"case_id": i, "subject": f"Country{i}", "prompt": "The capital of {} is",
                                        "target": "Rome"}) + "\n" for i in range(400)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASSEDIT_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "massedit", "edit", *_base(tiny_dir, reqs, tmp_path, "ft"),
           f"output_dir={tmp_path / 'out'}", "method.epochs=200"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "out" / "run.log").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert time.time() - t0 < 30
    assert "interrupted by SIGTERM" in err


# ------------------------------------------------------------------------------------------------ run directory
def test_run_directory_policy(tmp_path, capsys):
    from massedit.tasks.config import compose
    from massedit.tasks.runs import RunDirError, setup_run

    out = tmp_path / "run"
    base = [f"output_dir={out}", "logger=none", "seed=3"]
    run = setup_run(compose("edit", base))
    run.save_json("results.json", {"n": 1})
    run.finish()
    cfg = (out / "config.yaml").read_text()
    with pytest.raises(RunDirError, match="already holds an earlier run"):
        setup_run(compose("edit", base))
    assert (out / "config.yaml").read_text() == cfg and (out / "results.json").exists()
    with pytest.raises(RunDirError, match=r"differs.*seed"):
        setup_run(compose("edit", [f"output_dir={out}", "logger=none", "seed=4", "resume=true"]))
    run = setup_run(compose("edit", base + ["resume=true"]))  # same config: continues, files kept
    run.finish()
    assert (out / "results.json").exists()
    # a run saved before a key existed (a newer massedit added it): resumable while that key is at its default
    (out / "config.yaml").write_text(cfg.replace("  targets_pack_rows: true\n", ""))
    assert "targets_pack_rows" not in (out / "config.yaml").read_text()
    setup_run(compose("edit", base + ["resume=true"])).finish()
    (out / "config.yaml").write_text(cfg.replace("  targets_pack_rows: true\n", ""))
    with pytest.raises(RunDirError, match=r"differs.*targets_pack_rows"):
        setup_run(compose("edit", base + ["resume=true", "method.targets_pack_rows=false"]))
    run = setup_run(compose("edit", [f"output_dir={out}", "logger=none", "seed=4", "overwrite=true"]))
    run.finish()
    assert not (out / "results.json").exists() and "seed: 4" in (out / "config.yaml").read_text()


def test_existing_run_directory_via_cli_keeps_the_old_run(tiny_dir, facts, tmp_path, capsys, monkeypatch):
    from massedit.cli import run_command

    monkeypatch.setenv("MASSEDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    args = _base(tiny_dir, facts, tmp_path) + [f"output_dir={out}", "eval.pre=false", "eval.post=false"]
    assert run_command("edit", args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert run_command("edit", args + ["seed=9"]) == 2
    assert "already holds an earlier run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert run_command("edit", args + ["resume=true"]) == 0


def test_csv_with_byte_order_mark_keeps_case_ids(tmp_path):
    from massedit.data.requests import load_requests

    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffcase_id,subject,prompt,target\n100,Japan,The capital of {} is,Rome\n"
                  "101,France,The capital of {} is,Oslo\n".encode("utf-8"))
    assert [r.case_id for r in load_requests(p)] == [100, 101]


# ------------------------------------------------------------------------------------------------ caches
@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(TEXTS * 4) + "\n")
    return p


def _stats_cfg(corpus, tmp_path):
    return dict(corpus=str(corpus), format="text", packing="file", n_samples=None, n_tokens=400, max_length=32,
                batch_tokens=128, cache_dir=str(tmp_path / "stats"), checkpoint_every=0, checkpoint_seconds=0)


def _replace_bytes(path: Path, data: bytes) -> None:
    """Give ``path`` new content through a new inode (tensors loaded earlier may still map the old file)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _corrupt_tensor_bytes(path: Path, fill: bytes) -> None:
    """Overwrite the middle of a safetensors file's data (same size): NaN bytes (0xff) or a flipped value."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    mid = header + (len(data) - header) // 2
    data[mid: mid + len(fill)] = fill
    _replace_bytes(path, bytes(data))


@pytest.mark.parametrize("damage", ["nan-bytes", "flipped-byte", "truncated", "zero-length"])
def test_corrupt_stats_cache_entry_is_discarded_and_recomputed(damage, corpus, tmp_path, caplog):
    from massedit.stats.collect import collect_layer_stats

    model, tok = tiny_model("gpt2")
    cfg = _stats_cfg(corpus, tmp_path)
    first = collect_layer_stats(model, tok, [1], cfg, progress=False)[1]
    first_total = first.total.clone()
    path = Path(first.path)
    if damage == "nan-bytes":
        _corrupt_tensor_bytes(path, b"\xff" * 16)
    elif damage == "flipped-byte":
        _corrupt_tensor_bytes(path, b"\x01\x02\x03")
    elif damage == "truncated":
        _replace_bytes(path, path.read_bytes()[:200])
    else:
        _replace_bytes(path, b"")
    with caplog.at_level(logging.WARNING):
        again = collect_layer_stats(model, tok, [1], cfg, progress=False)[1]
    assert again.source == "computed" and "discarding corrupt statistics cache entry" in caplog.text
    assert torch.equal(again.total, first_total) and again.count == first.count
    hit = collect_layer_stats(model, tok, [1], cfg, progress=False)[1]
    assert hit.source == "cache"


def test_corrupt_target_cache_entry_is_discarded(tmp_path, caplog):
    from massedit.editing.target_cache import TargetCache
    from massedit.editing.targets import TargetResult

    cache = TargetCache(tmp_path / "t")
    r = TargetResult(1, torch.ones(8), torch.full((8,), 0.5), 3, False, torch.zeros(2, 7))
    key = "cd" + "1" * 22
    cache.put(key, r)
    assert torch.equal(cache.get(key).target, r.target)
    data = bytearray(cache.path(key).read_bytes())
    i = data.find(torch.full((8,), 0.5).numpy().tobytes())
    assert i > 0
    data[i: i + 4] = np.float32(7.0).tobytes()  # same size, finite, wrong: only the checksum sees it
    cache.path(key).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert cache.get(key) is None
    assert "checksum mismatch" in caplog.text and not cache.path(key).exists()
    torch.save({"case_id": 1, "init": torch.ones(8), "delta": torch.full((8,), float("nan")), "n_adam_steps": 1,
                "early_stopped": False, "loss_trace": torch.zeros(1, 7)}, cache.path(key))  # no checksum, NaN
    assert cache.get(key) is None


def test_corrupt_pre_eval_cache_is_discarded(tmp_path, caplog):
    from massedit.evaluation.config import EvalResult
    from massedit.tasks.evaluate import load_cached_result, save_cached_result

    res = EvalResult(stage="pre", kind="counterfact", summary={"efficacy_success": 50.0}, ci={}, n={}, per_case=[], info={})
    path = tmp_path / "eval" / "k.json"
    save_cached_result(path, res)
    assert load_cached_result(path).summary == res.summary
    path.write_text(path.read_text().replace("50.0", "90.0"))
    with caplog.at_level(logging.WARNING):
        assert load_cached_result(path) is None
    assert "checksum mismatch" in caplog.text and not path.exists()


def test_corrupt_partial_statistics_are_discarded(tmp_path):
    from massedit.stats.collect import CollectionJob
    from massedit.stats.moments import MomentState

    job = CollectionJob(modules=["m"], token_batches=None, acc_dtype="float32", result_paths={}, result_meta={},
                        runkey="k", partial_dir=str(tmp_path))
    job.save_partial(MomentState({"m": torch.ones(4, 4)}, 10, 2, {"blocks": 1}), 0, 1)
    assert job.load_partial(0, 1).count == 10
    p = job.partial_path(0, 1)
    d = torch.load(p, weights_only=True)
    d["state"]["sums"]["m"][0, 0] = 5.0
    torch.save(d, p)
    assert job.load_partial(0, 1) is None


# ------------------------------------------------------------------------------------------------ tmp files, modes
def test_stale_tmp_files_are_cleaned_and_live_ones_kept(tmp_path):
    from massedit.core.io import clean_stale_tmp, tmp_name

    live = tmp_path / tmp_name("a.pt")                                 # this process: alive
    dead = tmp_path / "sub" / tmp_name("b.pt").replace(f".{os.getpid()}.", ".999999999.")
    old_legacy = tmp_path / ".c.pt.ab12cd_e.tmp"                       # mkstemp name of an older massedit
    new_legacy = tmp_path / ".d.pt.zz12cd_e.tmp"
    other = tmp_path / "keep.tmp"
    for p in (live, dead, old_legacy, new_legacy, other):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    os.utime(old_legacy, (time.time() - 3 * 86400,) * 2)
    removed = clean_stale_tmp(tmp_path)
    assert sorted(removed) == sorted([dead, old_legacy])
    assert live.exists() and new_legacy.exists() and other.exists()


def test_kill_9_during_a_checkpoint_write_leaves_no_orphan_after_the_next_run(tmp_path):
    """A process killed (SIGKILL) inside an atomic checkpoint write leaves its temporary file; the next run on the
    same run directory (resume), the same statistics cache or the same target cache removes it."""
    from massedit.core.io import clean_stale_tmp
    from massedit.editing.target_cache import TargetCache

    code = ("import sys, time, torch; from massedit.core.io import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    torch.save({'x': torch.zeros(1000, 1000)}, tmp); print('writing', flush=True); time.sleep(60)\n")
    for target in (tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "targets" / "ab" / "x.pt"):
        proc = subprocess.Popen([sys.executable, "-c", code, str(target)], env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "writing"
        proc.kill()
        proc.wait()
        orphans = list(target.parent.glob(".*.tmp"))
        assert len(orphans) == 1 and orphans[0].stat().st_size > 1_000_000 and not target.exists()
    (tmp_path / "run" / "config.yaml").write_text("x: 1\n")
    from massedit.tasks.config import compose
    from massedit.tasks.runs import prepare_run_dir

    prepare_run_dir(compose("edit", ["resume=true"]), tmp_path / "run")   # what setup_run does on resume
    TargetCache(tmp_path / "targets")                                     # what an edit with the z cache does
    assert not list(tmp_path.rglob("*.tmp"))
    assert clean_stale_tmp(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(umask, tmp_path):
    from massedit.core.io import atomic_save_safetensors, atomic_torch_save, atomic_write_json

    old = os.umask(umask)
    try:
        files = [atomic_write_json(tmp_path / "a.json", {"a": 1}), atomic_torch_save(tmp_path / "b.pt", {"x": 1}),
                 atomic_save_safetensors(tmp_path / "c.safetensors", {"x": torch.zeros(2)})]
        (tmp_path / "cache" / "deep").mkdir(parents=True)
    finally:
        os.umask(old)
    for f in files:
        assert (f.stat().st_mode & 0o777) == (0o666 & ~umask), (f, oct(f.stat().st_mode))


@pytest.mark.slow
def test_mend_training_resumes_from_its_lightning_checkpoint_with_the_safe_loader(tiny_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    """``massedit train method=mend`` writes Lightning checkpoints that load with ``weights_only=True``
    (``ckpt_path=last``, which implies resume=true); without it the run directory is refused."""
    from massedit.cli import run_command

    monkeypatch.setenv("MASSEDIT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "mend.jsonl"
    data.write_text("".join(json.dumps({"case_id": i, "subject": s, "prompt": "The capital of {} is", "target": "Rome",
                                        "target_true": "Tokyo", "neighborhood_prompts": ["The capital of Japan is"]}) + "\n"
                            for i, s in enumerate(["Japan", "France", "Italy", "Spain", "Peru", "Chile", "Egypt", "Oman"])))
    args = ["method=mend", "model=hf", f"model.name_or_path={tiny_dir}", "data=user", f"data.path={data}",
            "method.rank=4", "method.train.max_iters=4", "method.train.val_interval=2", "method.train.val_size=2",
            "logger=none", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", f"output_dir={tmp_path / 'run'}"]
    assert run_command("train", args) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert run_command("train", args) == 2
    assert "already holds an earlier run" in capsys.readouterr().err
    assert run_command("train", args + ["ckpt_path=last"]) == 0
    assert run_command("train", args + ["ckpt_path=last", "method.train.lr=1e-3"]) == 2
    assert "differs" in capsys.readouterr().err


def test_python_api_edit_refuses_a_runaway_update(tiny_dir):
    import massedit

    model, tok = massedit.load_model(str(tiny_dir))
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EditGuardError, match="edit_guard.max_relative_norm"):
        massedit.edit(model, tok, [{"prompt": "The capital of {} is", "subject": "Japan", "target": "Rome"}],
                      method="ft", lr=1e8, epochs=2, layers=[1], progress=False)
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())


def test_cache_lock_makes_a_second_process_wait_and_a_killed_holder_frees_it(tmp_path):
    """Two processes wanting one cache entry: the second waits for the first, then finds its result; a holder
    killed with SIGKILL leaves no stuck lock."""
    import subprocess
    import sys
    import time as _time

    from massedit.core.io import cache_lock

    entry = tmp_path / "entry.json"
    holder = ("import sys, time\nfrom massedit.core.io import cache_lock\n"
              "with cache_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(float(sys.argv[2]))\n"
              "    open(sys.argv[1], 'w').write('done')\n")
    p = subprocess.Popen([sys.executable, "-c", holder, str(entry), "1.5"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    t0 = _time.time()
    with cache_lock(entry):
        waited = _time.time() - t0
        assert entry.read_text() == "done"  # written by the holder before it let go
    p.wait(timeout=30)
    assert waited > 0.5
    entry.unlink()
    p = subprocess.Popen([sys.executable, "-c", holder, str(entry), "600"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    p.kill()
    p.wait(timeout=30)
    t0 = _time.time()
    with cache_lock(entry):
        assert _time.time() - t0 < 5 and not entry.exists()


FINGERPRINT = """
import sys, torch
from massedit.core.models import model_fingerprint
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 1024).to(torch.bfloat16))
torch.set_num_threads(int(sys.argv[1]))
print(model_fingerprint(m))
with torch.no_grad():
    m[0].weight[1234, 5] += 1e-3
print(model_fingerprint(m))
"""


def test_model_fingerprint_is_exact_and_independent_of_the_thread_count():
    """Cache keys (pre-edit metrics, z vectors) use the fingerprint: it must not change with the number of CPU
    threads (float sums did: a job started with another thread count missed every cache), and must change
    when one weight does."""
    import subprocess
    import sys

    outs = [subprocess.run([sys.executable, "-c", FINGERPRINT, str(n)], capture_output=True, text=True, check=True,
                           env={**os.environ, "OMP_NUM_THREADS": str(n)}).stdout.split() for n in (1, 2)]
    assert outs[0] == outs[1]
    assert outs[0][0] != outs[0][1]
