"""Every config file loads and composes; overrides and errors behave."""
import pytest
from omegaconf import OmegaConf

from massedit.config import CONFIG_DIR, ConfigError, compose, groups, options


def test_every_group_option_composes():
    for entry in ("edit", "train"):
        for g in groups():
            for o in options(g):
                cfg = compose(entry, [f"{g}={o}"])
                assert cfg.choices[g] == o
                OmegaConf.to_yaml(cfg)  # resolvable


def test_every_yaml_parses():
    for p in CONFIG_DIR.rglob("*.yaml"):
        OmegaConf.load(p)


def test_method_configs_have_names():
    for o in options("method"):
        assert compose("edit", [f"method={o}"]).method.name, o


def test_overrides():
    cfg = compose("edit", ["method=rome", "data.num_edits=7", "model.dtype=bfloat16", "+extra.k=[1,2]", "seed=3"])
    assert cfg.method.name == "rome" and cfg.data.num_edits == 7 and cfg.model.dtype == "bfloat16"
    assert list(cfg.extra.k) == [1, 2] and cfg.seed == 3


def test_missing_value_can_be_set():
    cfg = compose("edit", ["data=user", "data.path=my.jsonl"])
    assert cfg.data.path == "my.jsonl"


def test_defaults():
    cfg = compose("edit")
    assert cfg.model.name_or_path == "smollm2-135m" and cfg.method.name == "memit" and cfg.data.path == "builtin:smollm2_facts"


@pytest.mark.parametrize("ov,match", [("data.num_edit=5", "unknown config key"), ("method=nope", "no option 'nope'"),
                                      ("novalue", "key=value")])
def test_errors(ov, match):
    with pytest.raises(ConfigError, match=match):
        compose("edit", [ov])
