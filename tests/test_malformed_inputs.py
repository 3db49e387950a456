"""The malformed-input suite (issue 15): every bad input is one ``error:`` line naming the file / option / record /
field, exit status 2, no traceback, and nothing written — no run directory, no file anywhere under the test's
folder (inputs and the cache included) — and the model's weights are never loaded (validation runs first).

Cases cover the five request formats (CounterFact, CounterFact-reduced, zsRE, user JSONL / CSV / JSON), the
config, delta files, statistics files and corpora. The CLI runs in-process (``massedit.cli.run_command``) on a
tiny GPT-2 saved to a temporary folder.
"""
from __future__ import annotations

import builtins
import copy
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

DELETE = object()
MODULE = "transformer.h.1.mlp.c_proj"   # the tiny GPT-2's rewrite module at layer 1 (m = 64, d = 32)


class Payload:
    """A pickle that creates ``marker`` when it is unpickled (stands in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


# ------------------------------------------------------------------------------------------------ fixtures
def base_args(tiny: Path, command: str = "edit", args=()) -> list[str]:
    """The tiny model, and (for ROME/MEMIT, the default method) hparams that fit it."""
    out = ["model=hf", f"model.name_or_path={tiny}", "eval.generation=false", "logger=none", "trainer.accelerator=cpu"]
    method = next((a.split("=", 1)[1] for a in args if a.startswith("method=")), None if command == "train" else "memit")
    if command != "eval" and method in ("rome", "memit"):
        out += ["method.hparams=gpt2-xl", "method.layers=[1]", "method.v_loss_layer=3", "method.v_num_grad_steps=2",
                "stats.n_tokens=500"]
    return out


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@dataclass
class Case:
    id: str
    expect: str | tuple[str, ...]               # substrings of the error line (file / option / record / field)
    files: dict[str, Any] = field(default_factory=dict)   # name -> str | bytes | callable(path) that writes it
    args: list[str] = field(default_factory=list)         # "{in}" = the inputs folder, "{tiny}" = the model
    command: str = "edit"


# ------------------------------------------------------------------------------------------------ request records
CF = {"case_id": 7, "requested_rewrite": {"prompt": "{} is located in", "subject": "The Eiffel Tower",
                                          "target_new": {"str": "Rome", "id": "Q1"},
                                          "target_true": {"str": "Paris", "id": "Q2"}, "relation_id": "P1"},
      "paraphrase_prompts": ["Where is the Eiffel Tower? It is in"], "neighborhood_prompts": ["The Louvre is in"],
      "attribute_prompts": ["Rome is known for"], "generation_prompts": ["The Eiffel Tower is"]}
CFR = {"case_id": 3, "subject": "The Eiffel Tower", "prompt": "The Eiffel Tower is located in", "target_new": "Rome",
       "ground_truth": "Paris", "rephrase_prompt": "Where is the Eiffel Tower? In", "locality_prompt": "The Louvre is in",
       "locality_ground_truth": "Paris"}
ZS = {"case_id": 0, "subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
      "answers": ["Illinois Institute of Technology"], "alt": "University of Michigan",
      "rephrase": "What university did Watts Humphrey take part in?",
      "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving"}
US = {"case_id": 1, "subject": "Japan", "prompt": "The capital of {} is", "target": "Rome", "target_true": "Tokyo"}
LONG = "Eiffel " * 3000   # ~6000 tokens: over the tiny model's 128-token context


def mutate(rec: dict, path: str, value) -> dict:
    rec = copy.deepcopy(rec)
    *parents, leaf = path.split(".")
    node = rec
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return rec


def with_case(rec: dict, cid) -> dict:
    return {**copy.deepcopy(rec), "case_id": cid}


def json_file(*records) -> str:
    return json.dumps(list(records))


def jsonl_file(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def record_cases(prefix: str, good: dict, data_args: list[str], name: str, writer: Callable[..., str],
                 muts: list[tuple[str, str, Any, Any]]) -> list[Case]:
    """One case per mutation of the second of two records: (case id, dotted path, value, expected field)."""
    out = []
    for cid, path, value, fld in muts:
        bad = mutate(with_case(good, 99), path, value) if path else value
        exp = ("record 1", fld) if fld else ("record 1",)
        out.append(Case(f"{prefix}-{cid}", exp, {name: writer(good, bad)}, [*data_args, f"data.path={{in}}/{name}"]))
    return out


CF_MUTS = [
    ("no-rewrite", "requested_rewrite", DELETE, "requested_rewrite"),
    ("rewrite-str", "requested_rewrite", "x", "requested_rewrite"),
    ("rewrite-list", "requested_rewrite", [], "requested_rewrite"),
    ("no-subject", "requested_rewrite.subject", DELETE, "requested_rewrite.subject"),
    ("subject-int", "requested_rewrite.subject", 5, "requested_rewrite.subject"),
    ("subject-empty", "requested_rewrite.subject", "", "requested_rewrite.subject"),
    ("subject-blank", "requested_rewrite.subject", "   ", "requested_rewrite.subject"),
    ("subject-null", "requested_rewrite.subject", None, "requested_rewrite.subject"),
    ("no-prompt", "requested_rewrite.prompt", DELETE, "requested_rewrite.prompt"),
    ("prompt-int", "requested_rewrite.prompt", 3, "requested_rewrite.prompt"),
    ("prompt-no-placeholder", "requested_rewrite.prompt", "somewhere in", "requested_rewrite.prompt"),
    ("prompt-two-placeholders", "requested_rewrite.prompt", "{} and {} are in", "requested_rewrite.prompt"),
    ("prompt-stray-brace", "requested_rewrite.prompt", "{} is in {x}", "requested_rewrite.prompt"),
    ("prompt-no-space", "requested_rewrite.prompt", "Where is{}", "requested_rewrite.prompt"),
    ("prompt-empty", "requested_rewrite.prompt", "", "requested_rewrite.prompt"),
    ("no-target-new", "requested_rewrite.target_new", DELETE, "requested_rewrite.target_new"),
    ("target-new-int", "requested_rewrite.target_new", 5, "requested_rewrite.target_new"),
    ("target-new-no-str", "requested_rewrite.target_new", {"id": "Q"}, "requested_rewrite.target_new.str"),
    ("target-new-str-empty", "requested_rewrite.target_new", {"str": ""}, "requested_rewrite.target_new.str"),
    ("target-new-str-int", "requested_rewrite.target_new", {"str": 3}, "requested_rewrite.target_new.str"),
    ("target-new-blank", "requested_rewrite.target_new", "  ", "target_new"),
    ("target-true-int", "requested_rewrite.target_true", 5, "requested_rewrite.target_true"),
    ("target-true-str-int", "requested_rewrite.target_true", {"str": 1}, "requested_rewrite.target_true.str"),
    ("paraphrase-int", "paraphrase_prompts", [1], "paraphrase_prompts"),
    ("paraphrase-dict", "paraphrase_prompts", {"a": 1}, "paraphrase_prompts"),
    ("neighborhood-null", "neighborhood_prompts", [None], "neighborhood_prompts"),
    ("attribute-int", "attribute_prompts", 5, "attribute_prompts"),
    ("generation-nested", "generation_prompts", [["x"]], "generation_prompts"),
    ("case-id-float", "case_id", 1.5, "case_id"),
    ("case-id-bool", "case_id", True, "case_id"),
    ("case-id-list", "case_id", [1], "case_id"),
    ("case-id-duplicate", "case_id", 7, "duplicate case_id"),
    ("record-number", "", 5, "expected an object"),
    ("record-list", "", [CF], "expected an object"),
    ("record-null", "", None, "expected an object"),
    ("subject-50k-chars", "requested_rewrite.subject", LONG.strip(), "subject"),
    ("paraphrase-too-long", "paraphrase_prompts", [LONG], "paraphrase_prompts[0]"),
]
CFR_MUTS = [
    ("no-subject", "subject", DELETE, "subject"),
    ("subject-int", "subject", 5, "subject"),
    ("subject-empty", "subject", "", "subject"),
    ("no-prompt", "prompt", DELETE, "prompt"),
    ("prompt-without-subject", "prompt", "Somewhere in", "prompt"),
    ("prompt-two-placeholders", "prompt", "{} or {} is in", "prompt"),
    ("prompt-list", "prompt", ["a"], "prompt"),
    ("no-target-new", "target_new", DELETE, "target_new"),
    ("target-new-empty", "target_new", "", "target_new"),
    ("target-new-list", "target_new", [1], "target_new"),
    ("ground-truth-int", "ground_truth", 5, "ground_truth"),
    ("rephrase-int", "rephrase_prompt", [1], "rephrase_prompt"),
    ("locality-int", "locality_prompt", 5, "locality_prompt"),
    ("locality-answers-mismatch", "locality_ground_truth", ["a", "b"], "locality_ground_truth"),
    ("case-id-float", "case_id", 2.5, "case_id"),
    ("case-id-duplicate", "case_id", 3, "duplicate case_id"),
    ("prompt-too-long", "rephrase_prompt", LONG, "paraphrase_prompts[0]"),
    ("record-string", "", "just text", "expected an object"),
]
ZS_MUTS = [
    ("no-subject", "subject", DELETE, "subject"),
    ("subject-not-in-src", "subject", "Someone Else", "src"),
    ("no-src", "src", DELETE, "src"),
    ("src-int", "src", 5, "src"),
    ("src-stray-brace", "src", "What {university did Watts Humphrey attend?", "src"),
    ("answers-empty", "answers", [], "answers"),
    ("answers-string", "answers", "Illinois", "answers"),
    ("answers-blank", "answers", [""], "answers"),
    ("answers-int", "answers", [5], "answers"),
    ("no-answers", "answers", DELETE, "answers"),
    ("loc-int", "loc", 5, "loc"),
    ("loc-ans-list", "loc_ans", ["x"], "loc_ans"),
    ("rephrase-int", "rephrase", [1], "rephrase"),
    ("rephrase-number", "rephrase", 5, "rephrase"),
    ("case-id-bool", "case_id", False, "case_id"),
    ("case-id-duplicate", "case_id", 0, "duplicate case_id"),
    ("src-too-long", "rephrase", LONG, "paraphrase_prompts[0]"),
    ("record-list", "", [ZS], "expected an object"),
]
US_MUTS = [
    ("no-subject", "subject", DELETE, "subject"),
    ("subject-int", "subject", 3, "subject"),
    ("no-prompt", "prompt", DELETE, "prompt"),
    ("prompt-no-placeholder", "prompt", "The capital is", "prompt"),
    ("prompt-two-placeholders", "prompt", "{} {} is", "prompt"),
    ("no-target", "target", DELETE, "target_new"),
    ("target-empty", "target", "", "target"),
    ("target-true-int", "target_true", 5, "target_true"),
    ("paraphrase-int", "paraphrase_prompts", [1], "paraphrase_prompts"),
    ("neighborhood-number", "neighborhood_prompts", 5, "neighborhood_prompts"),
    ("neighborhood-targets-mismatch", "neighborhood_targets", ["a", "b"], "neighborhood_targets"),
    ("case-id-float", "case_id", 0.5, "case_id"),
    ("case-id-duplicate", "case_id", 1, "duplicate case_id"),
    ("prompt-too-long", "prompt", LONG + "{} is", "prompt"),
    ("record-number", "", 3, "expected an object"),
]


def file_cases(prefix: str, name: str, data_args: list[str], contents: list[tuple[str, Any, str]]) -> list[Case]:
    return [Case(f"{prefix}-{cid}", (name, exp) if exp else (name,), {name: content},
                 [*data_args, f"data.path={{in}}/{name}"]) for cid, content, exp in contents]


JSON_FILE_CASES = [
    ("malformed", '[{"case_id": 1,', "malformed JSON"),
    ("trailing-garbage", json_file(CF) + "]]", "malformed JSON"),
    ("top-level-number", "5", "expected a JSON list"),
    ("top-level-string", '"hello"', "expected a JSON list"),
    ("empty-list", "[]", "no edit requests"),
    ("empty-file", "", "malformed JSON"),
    ("whitespace", "  \n\n ", "malformed JSON"),
    ("latin1", b'[{"subject": "caf\xe9"}]', "not UTF-8"),
    ("nan-literal", '[{"case_id": NaN}]', "case_id"),
]


def cases() -> list[Case]:
    out: list[Case] = []
    cf_args = ["data=counterfact", "data.num_edits=null"]
    out += record_cases("counterfact", CF, cf_args, "cf.json", json_file, CF_MUTS)
    out += file_cases("counterfact-file", "cf.json", cf_args, JSON_FILE_CASES)
    out.append(Case("counterfact-directory", ("is a directory",), {"cfdir/x.json": json_file(CF)},
                    [*cf_args, "data.path={in}/cfdir"]))
    out.append(Case("counterfact-missing-file", ("request file not found", "nope.json"), {},
                    [*cf_args, "data.path={in}/nope.json"]))
    out.append(Case("counterfact-offset-past-end", ("no edit requests", "after offset 5"), {"cf.json": json_file(CF)},
                    [*cf_args, "data.path={in}/cf.json", "data.offset=5"]))
    out.append(Case("auto-unrecognised-layout", ("record 1", "unrecognised record layout"),
                    {"x.json": json_file(CF, {"foo": 1})}, ["data.format=auto", "data.path={in}/x.json"]))
    cfr_args = ["data=counterfact_reduced", "data.num_edits=null"]
    out += record_cases("cf-reduced", CFR, cfr_args, "cfr.json", json_file, CFR_MUTS)
    out += file_cases("cf-reduced-file", "cfr.json", cfr_args, JSON_FILE_CASES[:4])
    zs_args = ["data=zsre", "data.num_edits=null"]
    out += record_cases("zsre", ZS, zs_args, "zsre.json", json_file, ZS_MUTS)
    out += record_cases("zsre-alt", ZS, [*zs_args, "data.zsre_target=alt"], "zsre.json", json_file,
                        [("alt-empty", "alt", "", "alt"), ("no-alt", "alt", DELETE, "alt")])
    out += file_cases("zsre-file", "zsre.json", zs_args, JSON_FILE_CASES[:5])
    us_args = ["data=user"]
    out += record_cases("user-jsonl", US, us_args, "facts.jsonl", jsonl_file, US_MUTS)
    out += file_cases("user-jsonl-file", "facts.jsonl", us_args, [
        ("malformed-line", jsonl_file(US) + '{"subject": "x",\n', "line 2"),
        ("truncated-last-line", jsonl_file(US) + '{"case_id": 2, "subj', "line 2"),
        ("line-is-list", jsonl_file(US) + "[1, 2]\n", "record 1"),
        ("empty", "", "no edit requests"),
        ("blank-lines", "\n\n  \n", "no edit requests"),
        ("latin1", b'{"subject": "\xe9t\xe9", "prompt": "{} is", "target": "x"}\n', "not UTF-8"),
    ])
    out += record_cases("user-json", US, us_args, "facts.json", json_file, US_MUTS[:8])
    out += file_cases("user-json-file", "facts.json", us_args, [
        ("dict-without-list", '{"foo": 1}', "subject"),
        ("requests-not-list", '{"requests": "x"}', "subject"),
        ("string", '"x"', "expected a JSON list"),
        ("malformed", '[{"subject": "Japan"', "malformed JSON"),
    ])
    hdr = "case_id,subject,prompt,target,target_true\n"
    row = "1,Japan,The capital of {} is,Rome,Tokyo\n"
    out += file_cases("user-csv", "facts.csv", us_args, [
        ("no-prompt-column", "case_id,subject,target\n1,Japan,Rome\n", "prompt"),
        ("empty-subject", hdr + row + "2,,The capital of {} is,Oslo,\n", "subject"),
        ("bad-prompt", hdr + row + "2,France,The capital is,Oslo,Paris\n", "prompt"),
        ("extra-cells", hdr + row + "2,France,The capital of {} is,Oslo,Paris,extra\n", "record 1"),
        ("fewer-cells", hdr + row + "2,France,The capital of {} is\n", "record 1"),
        ("header-only", hdr, "no edit requests"),
        ("empty", "", "empty CSV"),
        ("latin1", (hdr + "2,Caf\xe9,The {} is,x,y\n").encode("latin-1"), "not UTF-8"),
        ("duplicate-header", "subject,subject,prompt,target\nJapan,Japan,The capital of {} is,Rome\n", "repeats column"),
        ("duplicate-case-id", hdr + row + row.replace("Rome", "Oslo"), "duplicate case_id"),
        ("bom-bad-record", ("\ufeff" + hdr + row + "2,France,no placeholder,Oslo,Paris\n").encode("utf-8"), "prompt"),
        ("prompt-too-long", hdr + f"1,Japan,{LONG}{{}} is,Rome,Tokyo\n", "prompt"),
        ("unterminated-quote", hdr + '1,"Japan,The capital of {} is,Rome,Tokyo\n', "facts.csv"),
    ])
    return out


# ------------------------------------------------------------------------------------------------ config cases
def _run_dir(p: Path) -> None:
    p.mkdir(parents=True)
    (p / "config.yaml").write_text("seed: 0\n")
    (p / "results.json").write_text("{}")


def _model_without_config(p: Path) -> None:
    p.mkdir(parents=True)
    (p / "model.safetensors").write_bytes(b"x")


def _model_config_only(p: Path) -> None:
    p.mkdir(parents=True)
    (p / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))


def _model_unsupported(p: Path) -> None:
    from transformers import BertConfig

    p.mkdir(parents=True)
    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
               is_decoder=True).save_pretrained(p)
    (p / "model.safetensors").write_bytes(b"x")


def _model_pickled_bin(p: Path) -> None:
    p.mkdir(parents=True)
    (p / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 8, "n_head": 2,
                                               "vocab_size": 10, "n_positions": 16}))
    torch.save({"w": Payload(p.parent / "PWNED_bin")}, p / "pytorch_model.bin")


def _templates(p: Path, content) -> None:
    p.write_text(content if isinstance(content, str) else json.dumps(content))


def _mend_payload(p: Path) -> None:
    torch.save({"format": "massedit-mend-v1", "state_dict": {}, "describe": Payload(p.parent / "PWNED_mend")}, p)


def _mend_other_model(p: Path) -> None:
    from massedit.editing.mend.config import MendConfig
    from massedit.editing.mend.editor import build_mend_net, save_editor
    from massedit.testing import tiny_model

    other, _ = tiny_model("llama", n_layer=2)
    save_editor(p, build_mend_net(other, MendConfig(rank=4, num_layers=1)))


def _ckpt_payload(p: Path) -> None:
    torch.save({"state_dict": {}, "epoch": Payload(p.parent / "PWNED_ckpt")}, p)


def config_cases() -> list[Case]:
    C = Case
    return [
        C("config-unknown-key", "data.num_edit", args=["data.num_edit=5"]),
        C("config-unknown-option", "no option 'nope'", args=["method=nope"]),
        C("config-not-key-value", "key=value", args=["novalue"]),
        C("config-plus-key", "typed", args=["+extra.k=1"]),
        C("config-bad-float", "method.v_lr=abc", args=["method.v_lr=abc"]),
        C("config-num-edits-zero", "data.num_edits", args=["data.num_edits=0"]),
        C("config-num-edits-negative", "data.num_edits", args=["data.num_edits=-1"]),
        C("config-num-edits-abc", "data.num_edits", args=["data.num_edits=abc"]),
        C("config-offset-negative", "data.offset", args=["data.offset=-1"]),
        C("config-batch-size-zero", "eval.batch_size", args=["eval.batch_size=0"]),
        C("config-dtype-float8", "model.dtype", args=["model.dtype=float8"]),
        C("config-mode-foo", "mode=", args=["mode=foo"]),
        C("config-grad-steps-zero", "v_num_grad_steps", args=["method.v_num_grad_steps=0"]),
        C("config-lambda-zero", "mom2_update_weight", args=["method.mom2_update_weight=0"]),
        C("config-lambda-negative", "mom2_update_weight", args=["method.mom2_update_weight=-5"]),
        C("config-stats-tokens-negative", "stats.n_tokens", args=["stats.n_tokens=-5"]),
        C("config-precision-mismatch", "trainer.precision", args=["trainer.precision=bf16-true"]),
        C("config-strategy", "trainer.strategy", args=["trainer.strategy=horovod"]),
        C("config-logger-kind", "logger.kind", args=["logger.kind=tensorboardx"]),
        C("config-max-input-tokens-zero", "data.max_input_tokens", args=["data.max_input_tokens=0"]),
        C("config-guard-zero", "edit_guard.max_relative_norm", args=["edit_guard.max_relative_norm=0"]),
        C("config-log-level", "log_level", args=["log_level=LOUD"]),
        C("config-dir-missing", "does not exist", args=["--config-dir", "{in}/nope"]),
        C("config-dir-bad-yaml", ("cannot parse", "bad.yaml"), {"cfg/model/bad.yaml": "name: [unclosed\n"},
          ["--config-dir", "{in}/cfg", "model=bad"]),
        C("layers-out-of-range", ("method.layers", "outside the model's 4 layers"), args=["method.layers=[99]"]),
        C("layers-negative", ("method.layers", "-1"), args=["method.layers=[-1]"]),
        C("layers-one-bad", ("method.layers", "[7]"), args=["method.layers=[1,7]"]),
        C("v-loss-layer-out-of-range", "method.v_loss_layer", args=["method.v_loss_layer=9"]),
        C("rome-layers-out-of-range", "method.layers", args=["method=rome", "method.layers=[4]"]),
        C("ft-layers-out-of-range", "method.layers", args=["method=ft", "method.layers=[12]"]),
        C("ft-param-names-no-match", "method.param_names", args=["method=ft", "method.param_names=[nothing_like_this]"]),
        C("mend-layers-out-of-range", "method.layers", args=["method=mend", "method.layers=[5]"]),
        C("mend-num-layers-too-many", "method.num_layers", args=["method=mend", "method.num_layers=9"]),
        C("mend-checkpoint-missing", ("method.checkpoint", "nope.pt"), args=["method=mend", "method.checkpoint={in}/nope.pt"]),
        C("mend-checkpoint-garbage", ("mend.pt", "not a loadable MEND editor"), {"mend.pt": b"garbage bytes"},
          ["method=mend", "method.checkpoint={in}/mend.pt"]),
        C("mend-checkpoint-pickle", ("mend.pt", "not a loadable MEND editor"), {"mend.pt": _mend_payload},
          ["method=mend", "method.checkpoint={in}/mend.pt"]),
        C("mend-checkpoint-other-model", ("mend.pt", "does not have"), {"mend.pt": _mend_other_model},
          ["method=mend", "method.checkpoint={in}/mend.pt"]),
        C("mend-checkpoint-directory", ("method.checkpoint", "directory"), {"ckdir/x": "x"},
          ["method=mend", "method.checkpoint={in}/ckdir"]),
        C("mend-train-ckpt-missing", ("ckpt_path", "nope.ckpt"), {"f.jsonl": jsonl_file(*[with_case(US, i) for i in range(6)])},
          ["method=mend", "data=user", "data.path={in}/f.jsonl", "ckpt_path={in}/nope.ckpt"], command="train"),
        C("mend-train-val-path-missing", ("method.train.val_path", "val.json"), {"f.jsonl": jsonl_file(US)},
          ["method=mend", "data=user", "data.path={in}/f.jsonl", "method.train.val_path={in}/val.json"],
          command="train"),
        C("mend-train-too-few", ("too few", "val_fraction"), {"two.jsonl": jsonl_file(US, with_case(US, 2))},
          ["method=mend", "data=user", "data.path={in}/two.jsonl"], command="train"),
        C("mend-train-no-locality", ("field 'loc'", "no locality input"),
          {"f.jsonl": jsonl_file(*[with_case(US, i) for i in range(6)])},
          ["method=mend", "data=user", "data.path={in}/f.jsonl"], command="train"),
        C("train-nothing-to-train", ("nothing to train",), {"f.jsonl": jsonl_file(US)},
          ["method=memit", "data=user", "data.path={in}/f.jsonl"], command="train"),
        C("hparams-file-missing", "method.hparams", args=["method.hparams={in}/nope.yaml"]),
        C("hparams-file-unknown-key", "v_lrr", {"hp.yaml": "v_lrr: 1\nlayers: [1]\n"}, ["method.hparams={in}/hp.yaml"]),
        C("hparams-file-malformed", ("hp.json", "cannot parse"), {"hp.json": "{layers: "}, ["method.hparams={in}/hp.json"]),
        C("templates-missing", "context templates file not found", args=["method.context_templates={in}/t.json"]),
        C("templates-malformed", ("t.json", "not valid JSON"), {"t.json": "[oops"}, ["method.context_templates={in}/t.json"]),
        C("templates-no-placeholder", "t.json", {"t.json": json.dumps([["no placeholder"]])},
          ["method.context_templates={in}/t.json"]),
        C("model-path-missing", ("model.name_or_path", "does not exist"), args=["model.name_or_path={in}/nomodel"]),
        C("model-path-file", ("model.name_or_path", "is a file"), {"m.bin": b"x"}, ["model.name_or_path={in}/m.bin"]),
        C("model-no-config", ("model.name_or_path", "config.json"), {"m1": _model_without_config},
          ["model.name_or_path={in}/m1"]),
        C("model-no-weights", ("model.name_or_path", "holds no weights"), {"m2": _model_config_only},
          ["model.name_or_path={in}/m2"]),
        C("model-unsupported-architecture", ("model_type='bert'",), {"m3": _model_unsupported},
          ["model.name_or_path={in}/m3"]),
        C("model-pickled-weights", ("pytorch_model.bin", "safe loader"), {"m4": _model_pickled_bin},
          ["model.name_or_path={in}/m4"]),
        C("output-dir-is-file", ("output_dir", "not a directory"), {"afile": "x"}, ["output_dir={in}/afile"]),
        C("output-dir-parent-is-file", ("output_dir", "afile", "not a directory"), {"afile": "x"},
          ["output_dir={in}/afile/run"]),
        C("output-dir-existing-run", ("already holds an earlier run", "resume=true", "overwrite=true"),
          {"oldrun": _run_dir}, ["output_dir={in}/oldrun"]),
        C("output-dir-foreign-files-overwrite", ("not a massedit run directory",), {"foreign/notes.txt": "mine"},
          ["output_dir={in}/foreign", "overwrite=true"]),
        C("output-dir-resume-and-overwrite", ("contradict",), {"oldrun": _run_dir},
          ["output_dir={in}/oldrun", "resume=true", "overwrite=true"]),
        C("output-dir-resume-other-config", ("resume=true", "differs"), {"oldrun": _run_dir},
          ["output_dir={in}/oldrun", "resume=true"]),
        C("stats-cache-dir-is-file", ("stats.cache_dir",), {"afile": "x"}, ["stats.cache_dir={in}/afile/cache"]),
        C("z-cache-dir-is-file", ("method.z_cache_dir",), {"afile": "x"}, ["method.z_cache_dir={in}/afile"]),
        C("consistency-file-missing", ("eval.consistency.idf",), {"s.json": "[]"},
          ["eval.generation=true", "eval.consistency.attribute_snippets={in}/s.json", "eval.consistency.idf={in}/idf.npy"]),
        C("consistency-snippets-malformed", ("eval.consistency", "s.json"), {"s.json": json.dumps([{"x": 1}])},
          ["eval.generation=true", "eval.consistency.attribute_snippets={in}/s.json"]),
        C("consistency-idf-pickle", ("eval.consistency",), {"s.json": json.dumps([]), "v.json": json.dumps({"a": 0}),
                                                           "idf.npy": lambda p: np.save(p, np.array([Payload(p.parent / "PWNED_idf")], dtype=object), allow_pickle=True)},
          ["eval.generation=true", "eval.consistency.attribute_snippets={in}/s.json",
           "eval.consistency.idf={in}/idf.npy", "eval.consistency.tfidf_vocab={in}/v.json"]),
        C("data-builtin-unknown", ("built-in request set", "nope"), args=["data.path=builtin:nope"]),
        C("data-path-missing", ("request file not found",), args=["data=user", "data.path={in}/none.jsonl"]),
        C("data-format-unknown", "data.format", args=["data.format=xml"]),
        C("stats-command-layers-out-of-range", ("stats.layers", "outside"), args=["stats.layers=[99]"], command="stats"),
        C("stats-command-no-layers", ("no layers",), args=["method=ft", "stats.layers=null"], command="stats"),
        C("eval-command-mode-edit", ("mode='edit'",), args=["mode=edit"], command="eval"),
    ]


# ------------------------------------------------------------------------------------------------ deltas / stats
def _safetensors(tensors: dict, meta=None):
    def write(p: Path):
        from safetensors.torch import save_file

        save_file(tensors, str(p), metadata=meta)

    return write


W = MODULE + ".weight"            # Conv1D: [in=64, out=32]


def delta_cases() -> list[Case]:
    good = torch.zeros(64, 32)
    nan = good.clone()
    nan[3, 4] = float("nan")
    inf = good.clone()
    inf[0, 0] = float("inf")

    def truncated(p: Path):
        _safetensors({W: torch.randn(64, 32)})(p)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])

    def pickle_payload(p: Path):
        p.write_bytes(pickle.dumps({W: Payload(p.parent / "PWNED_delta")}))

    C = Case
    args = lambda name: ["deltas={in}/" + name]
    return [
        C("deltas-missing", ("deltas=", "d.safetensors", "file not found"), args=args("d.safetensors")),
        C("deltas-directory", ("deltas=", "directory"), {"ddir/x": "x"}, args("ddir")),
        C("deltas-garbage", ("d.safetensors", "not a readable safetensors"), {"d.safetensors": b"\x00garbage" * 10},
          args("d.safetensors")),
        C("deltas-empty-file", ("d.safetensors", "not a readable safetensors"), {"d.safetensors": b""},
          args("d.safetensors")),
        C("deltas-truncated", ("d.safetensors", "not a readable safetensors"), {"d.safetensors": truncated},
          args("d.safetensors")),
        C("deltas-pickle", ("d.safetensors", "not a readable safetensors"), {"d.safetensors": pickle_payload},
          args("d.safetensors")),
        C("deltas-json", ("d.json", "not a readable safetensors"), {"d.json": '{"a": 1}'}, args("d.json")),
        C("deltas-unknown-parameter", ("d.safetensors", "unknown parameter", "model.layers.1.mlp.down_proj.weight"),
          {"d.safetensors": _safetensors({"model.layers.1.mlp.down_proj.weight": torch.zeros(2, 2)})},
          args("d.safetensors")),
        C("deltas-wrong-shape", ("d.safetensors", W, "shape (32, 64)"),
          {"d.safetensors": _safetensors({W: torch.zeros(32, 64)})}, args("d.safetensors")),
        C("deltas-nan", ("d.safetensors", W, "non-finite"), {"d.safetensors": _safetensors({W: nan})},
          args("d.safetensors")),
        C("deltas-inf", ("d.safetensors", W, "Inf"), {"d.safetensors": _safetensors({W: inf})}, args("d.safetensors")),
        C("deltas-int-dtype", ("d.safetensors", W, "dtype"),
          {"d.safetensors": _safetensors({W: torch.zeros(64, 32, dtype=torch.int32)})}, args("d.safetensors")),
        C("deltas-no-tensors", ("d.safetensors", "holds no tensors"), {"d.safetensors": _safetensors({})},
          args("d.safetensors")),
        C("deltas-eval-mode-nan", ("d.safetensors", "non-finite"), {"d.safetensors": _safetensors({W: nan})},
          ["mode=eval", "deltas={in}/d.safetensors"]),
        C("deltas-eval-command-shape", ("d.safetensors", "shape"),
          {"d.safetensors": _safetensors({W: torch.zeros(1, 1)})}, ["deltas={in}/d.safetensors"], command="eval"),
    ]


def _npz(arrays: dict, pickle_ok: bool = False):
    def write(p: Path):
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as fh:
            np.savez(fh, **arrays) if not pickle_ok else np.savez(fh, allow_pickle=True, **arrays)

    return write


REF = f"ref/wikitext_stats/{MODULE}_float32_mom2_100.npz"


def stats_cases() -> list[Case]:
    good = np.eye(64, dtype=np.float32)
    nan = good.copy()
    nan[1, 2] = np.nan
    inf = good.copy()
    inf[0, 0] = np.inf

    def ref(arrays):
        return {REF: _npz(arrays)}

    def truncated(p: Path):
        _npz({"mom2.mom2": good, "mom2.count": np.array(100)})(p)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 3])

    def object_array(p: Path):
        p.parent.mkdir(parents=True, exist_ok=True)
        arr = np.array([Payload(p.parents[2] / "PWNED_npz")], dtype=object)
        with open(p, "wb") as fh:
            np.savez(fh, **{"mom2.mom2": arr, "mom2.count": np.array(100)})

    def plain_npy(p: Path):
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as fh:
            np.save(fh, good)

    def garbage(p: Path):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"PK\x03\x04 not really a zip")

    C = Case
    args = ["stats.reference_dir={in}/ref"]
    return [
        C("refstats-dir-missing", ("stats.reference_dir", "not a directory"), args=args),
        C("refstats-dir-is-file", ("stats.reference_dir", "not a directory"), {"ref": "x"}, args),
        C("refstats-missing-error", ("stats.reference_dir", MODULE, "reference_missing=error"), {"ref/README": "x"},
          [*args, "stats.reference_missing=error"]),
        C("refstats-object-array-pickle", (MODULE, "not a readable reference statistics npz"), {REF: object_array}, args),
        C("refstats-no-count", (MODULE, "mom2.count"), ref({"mom2.mom2": good}), args),
        C("refstats-no-mom2", (MODULE, "mom2.mom2"), ref({"mom2.count": np.array(100)}), args),
        C("refstats-wrong-shape", (MODULE, "shape (32, 32)"), ref({"mom2.mom2": np.eye(32, dtype=np.float32),
                                                                 "mom2.count": np.array(100)}), args),
        C("refstats-not-square", (MODULE, "square"), ref({"mom2.mom2": np.ones((64, 3), np.float32),
                                                          "mom2.count": np.array(100)}), args),
        C("refstats-one-dimensional", (MODULE, "square"), ref({"mom2.mom2": np.ones(64, np.float32),
                                                               "mom2.count": np.array(100)}), args),
        C("refstats-nan", (MODULE, "non-finite"), ref({"mom2.mom2": nan, "mom2.count": np.array(100)}), args),
        C("refstats-inf", (MODULE, "Inf"), ref({"mom2.mom2": inf, "mom2.count": np.array(100)}), args),
        C("refstats-count-zero", (MODULE, "mom2.count must be a positive integer"),
          ref({"mom2.mom2": good, "mom2.count": np.array(0)}), args),
        C("refstats-count-negative", (MODULE, "mom2.count"), ref({"mom2.mom2": good, "mom2.count": np.array(-4)}), args),
        C("refstats-count-fraction", (MODULE, "mom2.count"), ref({"mom2.mom2": good, "mom2.count": np.array(2.5)}), args),
        C("refstats-count-string", (MODULE, "mom2.count"), ref({"mom2.mom2": good, "mom2.count": np.array("many")}), args),
        C("refstats-int-matrix", (MODULE, "float"), ref({"mom2.mom2": np.eye(64, dtype=np.int64),
                                                         "mom2.count": np.array(100)}), args),
        C("refstats-truncated", (MODULE, "not a readable reference statistics npz"), {REF: truncated}, args),
        C("refstats-garbage", (MODULE, "not a readable reference statistics npz"), {REF: garbage}, args),
        C("refstats-plain-npy", (MODULE, "not an npz archive"), {REF: plain_npy}, args),
        C("refstats-stats-command", (MODULE, "non-finite"), ref({"mom2.mom2": nan, "mom2.count": np.array(100)}),
          [*args, "stats.layers=[1]"], command="stats"),
        C("corpus-missing", ("stats.corpus", "does not exist"), args=["stats.corpus={in}/nocorpus.txt"]),
        C("corpus-empty-folder", ("corpus folder", "holds no"), {"corp/readme.md": "x"}, ["stats.corpus={in}/corp"]),
        C("corpus-unknown-builtin", ("stats.corpus", "no built-in corpus"), args=["stats.corpus=builtin:nope"]),
        C("corpus-stats-command-missing", ("stats.corpus", "does not exist"),
          args=["stats.corpus={in}/nocorpus.txt", "stats.layers=[1]"], command="stats"),
    ]


ALL = cases() + config_cases() + delta_cases() + stats_cases()


def test_suite_size():
    assert len(ALL) >= 150, len(ALL)
    assert len({c.id for c in ALL}) == len(ALL)


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_malformed_input(case: Case, tiny_dir, tmp_path, capsys, monkeypatch):
    from massedit.cli import run_command

    monkeypatch.setenv("MASSEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    inp = tmp_path / "in"
    inp.mkdir()
    for name, content in case.files.items():
        p = inp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(p)
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was validated")

    for mod in ("massedit.tasks.edit", "massedit.tasks.train", "massedit.tasks.stats"):
        monkeypatch.setattr(f"{mod}.load_model_and_tokenizer", no_load)
    fmt = {"in": str(inp), "tiny": str(tiny_dir)}
    args = [a.format(**fmt) for a in case.args]
    out_args = [] if any(a.startswith("output_dir=") for a in args) else [f"output_dir={tmp_path / 'out'}"]
    before = snapshot(tmp_path)
    rc = run_command(case.command, base_args(tiny_dir, case.command, args) + args + out_args)
    err = capsys.readouterr().err
    error_lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2, err[-3000:]
    assert len(error_lines) == 1 and "Traceback" not in err, err[-3000:]
    for exp in (case.expect if isinstance(case.expect, tuple) else (case.expect,)):
        assert exp in error_lines[0], (exp, error_lines[0])
    assert not (tmp_path / "out").exists()
    assert snapshot(tmp_path) == before, sorted(set(snapshot(tmp_path)) ^ set(before))
    assert not list(tmp_path.rglob("PWNED*")), "a crafted pickle ran"
