"""The Python API (massedit.load_model / edit / evaluate, EditResult) and the Hugging Face export: the README's
five-line snippet runs as written on a tiny model saved as a Hugging Face directory (CI) and on SmolLM2 (slow);
the exported directory loads with plain transformers and carries the edit; ``model=hf`` picks hparams from the
architecture adapter and fails before loading weights when it cannot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The README snippet, verbatim (tests substitute the model name and the request list only).
SNIPPET = '''
import massedit
model, tok = massedit.load_model("smollm2-135m")          # or any HF name/path, dtype=..., device_map=...
result = massedit.edit(model, tok, [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target": "Rome"}], method="memit")
result.apply(model); result.revert(model); result.save("edit.safetensors"); result.save_pretrained(model, tok, "out/")
metrics = massedit.evaluate(model, tok, requests)          # the paper's metrics
'''
REQUESTS = [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target": "Rome",
             "target_true": "Paris"}]


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MASSEDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_root_import_is_light():
    code = "import sys, massedit; assert 'torch' not in sys.modules and 'massedit.tasks' not in sys.modules; " \
           "assert callable(massedit.edit) and 'massedit.tasks.api' in sys.modules"
    p = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]


def test_readme_snippet_runs_as_written_on_a_tiny_model(tiny_dir, tmp_path, monkeypatch, isolated_cache):
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    code = SNIPPET.replace('"smollm2-135m"', repr(str(tiny_dir)))
    ns = {"requests": REQUESTS}
    exec(compile(code, "README-snippet", "exec"), ns)
    result = ns["result"]
    assert type(result).__name__ == "EditResult" and result.method == "memit"
    # adapter-chosen hparams for an unknown model: GPT-J's relative depth of a 4-layer model
    assert result.hparams["layers"] == [0, 1] and result.hparams["v_loss_layer"] == 3
    assert sorted(result.deltas) == ["transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.weight"]
    assert (tmp_path / "edit.safetensors").exists()
    manifest = json.loads((tmp_path / "out" / "edits.json").read_text())
    assert manifest["method"] == "memit" and manifest["requests"][0]["target_new"] == "Rome"
    assert manifest["base_model"]["name_or_path"] == str(tiny_dir) and manifest["massedit_version"]
    assert set(manifest["delta_norms"]) == set(result.deltas) and manifest["hparams"]["layers"] == [0, 1]
    assert ns["metrics"].summary["efficacy_success"] is not None
    assert list((isolated_cache / "stats").rglob("*.safetensors"))  # statistics cached for the next call


def test_edit_result_apply_revert_save_and_export_loads_with_transformers(tiny_dir, tmp_path, isolated_cache):
    from transformers import AutoModelForCausalLM

    import massedit
    from massedit.core.deltas import load_deltas

    torch.set_num_threads(1)
    model, tok = massedit.load_model(str(tiny_dir))
    pristine = _weights(model)
    # subject at the end of the prompt: a random tiny model barely moves information between positions
    reqs = [{"prompt": "The capital of {}", "subject": "Japan", "target": "Rome"}]
    result = massedit.edit(model, tok, reqs, layers=[1, 2], clamp_norm_factor=1000.0, v_weight_decay=0.0,
                           mom2_update_weight=0.1, stats={"n_tokens": 3000}, progress=False,
                           **{"edit_guard.max_relative_norm": None})  # updates ~400x the random tiny weights
    assert all(torch.equal(pristine[k], v) for k, v in model.state_dict().items())  # edit() leaves the model
    result.apply(model)
    name = "transformer.h.1.mlp.c_proj.weight"
    assert torch.allclose(model.get_parameter(name), pristine[name] + result.deltas[name])
    with pytest.raises(massedit.tasks.api.ApiError, match="already applied"):
        result.apply(model)
    enc = tok("The capital of Japan", return_tensors="pt")
    with torch.no_grad():
        edited_logits = model(**enc).logits
    result.revert(model)
    assert all(torch.equal(pristine[k], v) for k, v in model.state_dict().items())
    saved = load_deltas(result.save(tmp_path / "d.safetensors"))
    assert all(torch.equal(saved[k], result.deltas[k].float()) for k in result.deltas)

    out = result.save_pretrained(model, tok, tmp_path / "export")
    assert all(torch.equal(pristine[k], v) for k, v in model.state_dict().items())  # unedited model stays unedited
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists() and (out / "edits.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.allclose(loaded(**enc).logits, edited_logits, atol=1e-5)
    target_first = tok(" Rome")["input_ids"][0]
    gen = loaded.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=tok.eos_token_id)
    assert int(gen[0, -1]) == target_first  # generates the new fact (its first token, on a random tiny model)
    with pytest.raises(massedit.tasks.export.ExportError, match="not empty"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "keep.txt").write_text("x")
        result.save_pretrained(model, tok, tmp_path / "other")


def test_requests_validated_like_files_and_overrides_are_config_keys(tiny_dir):
    import massedit
    from massedit.data.requests import EditRequest, RequestValidationError
    from massedit.tasks.api import ApiError, as_requests, compose_for_model
    from massedit.tasks.config import ConfigError

    reqs = as_requests([{"prompt": "The Eiffel Tower is in", "subject": "The Eiffel Tower", "target_new": "Rome"},
                        EditRequest(case_id=7, subject="Japan", prompt="The capital of {}", target_new="Rome")])
    assert reqs[0].prompt == "{} is in" and reqs[0].case_id == 0 and reqs[1].case_id == 7
    with pytest.raises(RequestValidationError, match=r"requests, record 0.*field 'prompt'.*placeholder"):
        as_requests([{"prompt": "is located in", "subject": "X", "target": "Rome"}])
    with pytest.raises(RequestValidationError, match=r"record 0.*field 'target'.*empty"):
        as_requests([{"prompt": "{} is", "subject": "X", "target": " "}])
    with pytest.raises(ApiError, match="list is empty"):
        as_requests([])
    model, tok = massedit.load_model(str(tiny_dir))
    job = compose_for_model(model, "rome", {"layers": [2], "stats": {"n_tokens": 1234}, "seed": 3,
                                            "method.v_lr": 0.25})
    assert job.method.layers == [2] and job.stats.n_tokens == 1234 and job.seed == 3 and job.method.v_lr == 0.25
    assert job.method.clamp_norm_factor == 4.0  # the paper's ROME value, chosen from the architecture
    with pytest.raises(ApiError, match="unknown keyword 'layerz'"):
        compose_for_model(model, "memit", {"layerz": [1]})
    with pytest.raises(ConfigError, match="n_tokenz"):
        compose_for_model(model, "memit", {"stats": {"n_tokenz": 1}})


def test_model_hf_hparams_from_the_architecture_and_early_failures(tiny_dir, tmp_path):
    from transformers import BertConfig

    from massedit.tasks.config import ConfigError, compose

    job = compose("edit", ["model=hf", f"model.name_or_path={tiny_dir}"])
    assert job.method.layers == [0, 1] and job.method.v_loss_layer == 3 and job.method.mom2_update_weight == 15000
    assert job.choices["hparams_file"].startswith("architecture:gpt2 (4 layers)")
    job = compose("edit", ["model=hf", f"model.name_or_path={tiny_dir}", "method=rome"])
    assert job.method.layers == [1] and job.method.clamp_norm_factor == 4.0
    # the 30-layer SmolLM2 shape: GPT-J's 3..8 of 28 -> 3..9, ROME 5 of 28 -> 5
    from massedit.editing.hparams import layers_by_relative_depth

    assert layers_by_relative_depth("memit", 30) == [3, 4, 5, 6, 7, 8, 9] and layers_by_relative_depth("rome", 30) == [5]
    assert layers_by_relative_depth("memit", 28) == [3, 4, 5, 6, 7, 8] and layers_by_relative_depth("memit", 1) == [0]
    with pytest.raises(ConfigError, match="model.name_or_path is not set"):
        compose("edit", ["model=hf"])
    with pytest.raises(ConfigError, match="cannot read the model's config.json"):
        compose("edit", ["model=hf", f"model.name_or_path={tmp_path / 'missing'}"])
    bert = tmp_path / "bert"
    BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    with pytest.raises(ConfigError, match="no architecture adapter for model_type='bert'"):
        compose("edit", ["model=hf", f"model.name_or_path={bert}"])  # no weights there: nothing was loaded


def test_edit_job_export_hf_dir(tiny_dir, tmp_path, isolated_cache, capsys):
    from transformers import AutoModelForCausalLM

    from massedit.cli import main
    from massedit.core.deltas import load_deltas

    torch.set_num_threads(1)
    out = tmp_path / "hf"
    rc = main(["edit", "model=hf", f"model.name_or_path={tiny_dir}", f"export.hf_dir={out}", "data.num_edits=2",
               "stats.n_tokens=2000", "method.v_num_grad_steps=4", "eval.generation=false", "logger=none",
               f"output_dir={tmp_path / 'run'}", "trainer.enable_progress_bar=false"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    manifest = json.loads((out / "edits.json").read_text())
    assert manifest["num_requests"] == 2 and manifest["base_model"]["name_or_path"] == str(tiny_dir)
    deltas = load_deltas(tmp_path / "run" / "deltas.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    edited = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for k in edited:
        if k in deltas:
            assert torch.allclose(edited[k], base[k] + deltas[k], atol=1e-6) and not torch.equal(edited[k], base[k])
        else:
            assert torch.equal(edited[k], base[k]), k
    assert json.loads((tmp_path / "run" / "results.json").read_text())["export"] == str(out.resolve())


@pytest.mark.slow
def test_readme_snippet_on_smollm2_and_the_export_generates_the_new_fact(smollm2, tmp_path, monkeypatch):
    """The snippet as written on SmolLM2-135M (statistics from the cache after the first run); the exported
    directory loads with AutoModelForCausalLM and greedily completes the prompt with the new target."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    monkeypatch.chdir(tmp_path)
    ns = {"requests": REQUESTS}
    exec(compile(SNIPPET, "README-snippet", "exec"), ns)
    tok = ns["tok"]
    assert ns["metrics"].summary["efficacy_success"] is not None
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    enc = tok("The Eiffel Tower is located in the city of", return_tensors="pt")
    gen = loaded.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(gen[0, enc["input_ids"].shape[1]:])
    assert text.strip().startswith("Rome"), text
