"""Hparams: reference JSON files load as is, bad keys fail with a clear message, layers are checked;
context-template files round-trip and are validated."""
import json

import pytest
from massedit.editing.context_templates import (
    TemplateError, as_groups, flatten, load_context_templates, save_context_templates,
)
from massedit.editing.hparams import EditHparams, HparamsError, load_hparams_file, read_hparams_file


def test_reference_json_loads(tmp_path):
    ref = {"layers": [4, 5], "clamp_norm_factor": 0.75, "layer_selection": "all", "fact_token": "subject_last",
           "v_num_grad_steps": 25, "v_lr": 0.5, "v_loss_layer": 29, "v_weight_decay": 0.5, "kl_factor": 0.0625,
           "mom2_adjustment": True, "mom2_update_weight": 15000, "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
           "layer_module_tmp": "model.layers.{}", "mlp_module_tmp": "model.layers.{}.mlp",
           "attn_module_tmp": "model.layers.{}.self_attn", "ln_f_module": "model.norm",
           "lm_head_module": "model.embed_tokens", "mom2_dataset": "wikitext", "mom2_n_samples": 40, "mom2_dtype": "float32"}
    p = tmp_path / "h.json"
    p.write_text(json.dumps(ref))
    hp = load_hparams_file(p)
    assert hp.layers == [4, 5] and hp.z_layer == 5 and hp.mom2_update_weight == 15000
    hp_vals, stats = read_hparams_file(p)
    assert "rewrite_module_tmp" not in hp_vals and stats == {"n_samples": 40, "n_tokens": None, "dtype": "float32"}
    p.write_text(json.dumps({**ref, "v_lrr": 1}))
    with pytest.raises(HparamsError, match="v_lrr"):
        load_hparams_file(p)


def test_layers_validated_against_the_model():
    hp = EditHparams(layers=[4, 30])
    with pytest.raises(HparamsError, match=r"\[30\] outside the model's 30 layers"):
        hp.validate(30)
    with pytest.raises(HparamsError, match="at least one layer"):
        EditHparams().validate()


def test_templates_roundtrip_and_validation(tmp_path):
    groups = [["{}"], ["A b. {}", "C d. {}"]]
    p = save_context_templates(tmp_path / "t.json", groups)
    assert load_context_templates(p) == groups
    assert flatten(groups) == ["{}", "A b. {}", "C d. {}"] and as_groups(flatten(groups)) == groups
    (tmp_path / "bad.json").write_text(json.dumps(["{}", "no slot"]))
    with pytest.raises(TemplateError, match="exactly one"):
        load_context_templates(tmp_path / "bad.json")
