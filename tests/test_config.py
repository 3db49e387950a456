"""Typed configs: every config file composes into its dataclass; overrides are typed and checked; errors name the
key; hparams files (massedit YAML or reference JSON) merge under the command line; user config dirs add options."""
import json

import pytest
from omegaconf import OmegaConf

from massedit.editing.ft import FTConfig
from massedit.editing.hparams import MemitConfig, RomeConfig
from massedit.editing.mend.config import MendConfig
from massedit.tasks.config import (PACKAGE_CONFIG_DIR, ConfigError, EditJobConfig, TrainJobConfig, compose, groups,
                                   options, parse_value, to_yaml)

# options whose required keys (`???`) must be given
REQUIRED = {("data", "counterfact"): ["data.path=x.json"], ("data", "counterfact_reduced"): ["data.path=x.json"],
            ("data", "zsre"): ["data.path=x.json"], ("data", "zsre_train"): ["data.path=x.json"],
            ("data", "user"): ["data.path=x.jsonl"], ("model", "hf"): ["model.name_or_path=/m"]}


def test_every_group_option_composes():
    for entry in ("edit", "train"):
        for g in groups():
            for o in options(g):
                extra = ["data.path=x.json"] if entry == "train" and g != "data" else []  # train defaults to CounterFact
                if entry == "edit" and (g, o) == ("model", "hf"):
                    extra.append("method.hparams=gpt2-xl")  # an unknown model has no MEMIT hparams file
                job = compose(entry, [f"{g}={o}"] + REQUIRED.get((g, o), []) + extra)
                assert job.choices[g] == o
                to_yaml(job)  # serialisable


def test_every_yaml_parses():
    for p in PACKAGE_CONFIG_DIR.rglob("*.yaml"):
        OmegaConf.load(p)


def test_method_schemas():
    kinds = {"memit": MemitConfig, "rome": RomeConfig, "ft": FTConfig, "ftl": FTConfig, "ftw": FTConfig, "mend": MendConfig}
    for o in options("method"):
        assert isinstance(compose("edit", [f"method={o}"]).method, kinds[o]), o


def test_defaults_are_typed_objects():
    job = compose("edit")
    assert isinstance(job, EditJobConfig) and isinstance(compose("train", ["data.path=x.json"]), TrainJobConfig)
    assert job.model.name_or_path == "smollm2-135m" and job.data.path == "builtin:smollm2_facts"
    assert job.stats.corpus == "builtin:wikitext-2"
    # MEMIT's values come from hparams/memit/smollm2-135m.yaml merged over the dataclass defaults
    assert job.method.layers == [4, 5, 6, 7, 8] and job.method.mom2_update_weight == 3000.0
    assert job.choices["hparams_file"].endswith("hparams/memit/smollm2-135m.yaml")


def test_overrides_are_typed_and_win_over_hparams_file():
    job = compose("edit", ["method=rome", "data.num_edits=7", "model.dtype=bfloat16", "seed=3", "method.layers=[5]",
                           "method.v_lr=1e-3"])
    assert job.method.name == "rome" and job.data.num_edits == 7 and job.model.dtype == "bfloat16"
    assert job.seed == 3 and job.method.layers == [5] and job.method.v_lr == pytest.approx(1e-3)
    assert isinstance(job.method.v_lr, float)


def test_parse_value():
    assert parse_value("1e-3") == pytest.approx(1e-3) and parse_value("[4,5]") == [4, 5]
    assert parse_value("null") is None and parse_value("true") is True and parse_value("abc") == "abc"


def test_reference_json_hparams(tmp_path):
    ref = {"layers": [3, 4], "clamp_norm_factor": 0.75, "layer_selection": "all", "fact_token": "subject_last",
           "v_num_grad_steps": 25, "v_lr": 0.5, "v_loss_layer": 29, "v_weight_decay": 0.5, "kl_factor": 0.0625,
           "mom2_adjustment": True, "mom2_update_weight": 15000, "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
           "mom2_dataset": "wikitext", "mom2_n_samples": 40, "mom2_dtype": "float64"}
    p = tmp_path / "h.json"
    p.write_text(json.dumps(ref))
    job = compose("edit", [f"method.hparams={p}", "method.v_lr=0.25"])
    assert job.method.layers == [3, 4] and job.method.v_lr == 0.25
    # the reference's statistics keys go to the stats group (n_samples documents, no token cap), not ignored
    assert job.stats.n_samples == 40 and job.stats.n_tokens is None and job.stats.dtype == "float64"
    job = compose("edit", [f"method.hparams={p}", "stats.n_samples=10"])
    assert job.stats.n_samples == 10  # the command line wins
    p.write_text(json.dumps({**ref, "v_lrr": 1}))
    with pytest.raises(ConfigError, match="v_lrr"):
        compose("edit", [f"method.hparams={p}"])


def test_missing_required_value_names_option():
    with pytest.raises(ConfigError, match=r"data.path is not set \(required by data=counterfact\)"):
        compose("edit", ["data=counterfact"])
    assert compose("edit", ["data=user", "data.path=my.jsonl"]).data.path == "my.jsonl"


def test_hparams_auto_unknown_model_fails_before_loading():
    with pytest.raises(ConfigError, match="cannot read the model's config.json"):  # no weights touched
        compose("edit", ["model=hf", "model.name_or_path=/some/model"])
    for model in ("gpt2-xl", "gpt-j-6b", "gpt-neox-20b", "smollm2-135m"):
        for m in ("rome", "memit"):
            assert compose("edit", [f"model={model}", f"method={m}"]).method.layers


@pytest.mark.parametrize("ov,match", [
    ("data.num_edit=5", "unknown config key 'data.num_edit'.*num_edits"),
    ("method=nope", "no option 'nope'"),
    ("novalue", "key=value"),
    ("+extra.k=1", "typed"),
    ("method.v_lr=abc", "method.v_lr=abc"),
    ("data.num_edits=0", "data.num_edits must be >= 1"),
    ("data.num_edits=-1", "data.num_edits must be >= 1"),
    ("data.offset=-1", "data.offset must be >= 0"),
    ("eval.batch_size=0", "eval.batch_size must be >= 1"),
    ("model.dtype=float8", "model.dtype"),
    ("mode=foo", "mode='foo'"),
    ("method.v_num_grad_steps=0", "v_num_grad_steps"),
    ("method.mom2_update_weight=0", "mom2_update_weight"),
    ("method.mom2_update_weight=-5", "mom2_update_weight"),
    ("stats.n_tokens=-5", "stats.n_tokens must be positive"),
    ("trainer.precision=bf16-true", "would convert the float32 model"),
    ("trainer.strategy=horovod", "trainer.strategy"),
    ("logger.kind=tensorboardx", "logger.kind"),
])
def test_errors(ov, match):
    with pytest.raises(ConfigError, match=match):
        compose("edit", [ov])


def test_user_config_dir_adds_and_overrides(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "my-model.yaml").write_text("name: smollm2-135m\nname_or_path: /models/mine\ndtype: bfloat16\n")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "default.yaml").write_text("generation: false\n")  # shadows the shipped option
    job = compose("edit", ["model=my-model"], config_dir=[tmp_path])
    assert job.model.name_or_path == "/models/mine" and job.eval.generation is False
    monkeypatch.setenv("MASSEDIT_CONFIG_DIR", str(tmp_path))
    assert compose("edit", ["model=my-model"]).model.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="does not exist"):
        compose("edit", [], config_dir=[tmp_path / "nope"])
