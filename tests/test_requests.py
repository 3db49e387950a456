"""Edit-request loading for every format and every validation error (file, record, case id, field)."""
import json

import pytest

from massedit.data.requests import EditRequest, RequestValidationError, load_requests

CF = {
    "case_id": 7,
    "pararel_idx": 1,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103", "subject": "Danielle Darrieux",
                          "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}},
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux speaks the language"],
    "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Robert Schuman, a native"],
    "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
REDUCED = {"case_id": 10, "prompt": "BBC One, by", "target_new": "Sega", "subject": "BBC One", "ground_truth": "BBC",
           "rephrase_prompt": "BBC One is my favorite product out of everything owned by",
           "locality_prompt": "BBC Radio, by", "locality_ground_truth": "BBC"}
ZSRE = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
        "loc": "nq question: john goodman's character in the big lebowski", "loc_ans": "Walter Sobchak"}


def write(tmp_path, records, name="r.json"):
    p = tmp_path / name
    if name.endswith(".jsonl"):
        p.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        p.write_text(json.dumps(records))
    return p


def test_counterfact(tmp_path):
    (r,) = load_requests(write(tmp_path, [CF]))
    assert isinstance(r, EditRequest)
    assert (r.case_id, r.subject, r.prompt, r.target_new, r.target_true) == (7, "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
    assert r.filled_prompt == "The mother tongue of Danielle Darrieux is"
    assert r.neighborhood_targets == ["French", "French"]
    assert r.relation_id == "P103" and r.target_new_id == "Q1860"
    assert r.generation_prompts and r.attribute_prompts and r.paraphrase_prompts


def test_counterfact_reduced(tmp_path):
    (r,) = load_requests(write(tmp_path, [REDUCED]), fmt="counterfact_reduced")
    assert r.prompt == "{}, by" and r.target_true == "BBC"
    assert r.paraphrase_prompts == [REDUCED["rephrase_prompt"]]
    assert r.neighborhood_prompts == ["BBC Radio, by"] and r.neighborhood_targets == ["BBC"]


def test_zsre(tmp_path):
    rs = load_requests(write(tmp_path, [ZSRE, dict(ZSRE, subject="Delta Serpentis", src="Which constellation is Delta Serpentis in?")]))
    r = rs[0]
    assert r.prompt == "What is the product made by {}?" and r.target_new == "uniform"
    assert r.loc.startswith("nq question") and r.loc_ans == "Walter Sobchak" and r.case_id == 0 and rs[1].case_id == 1
    (r,) = load_requests(write(tmp_path, [ZSRE]), zsre_target="alt")
    assert r.target_new == "unmanned aircraft"


def test_user_jsonl_and_csv(tmp_path):
    rows = [{"subject": "Eiffel Tower", "prompt": "The Eiffel Tower is in", "target": "Rome"},
            {"subject": "Colosseum", "prompt": "The {} is in", "target": "Paris", "target_true": "Rome", "case_id": "c2"}]
    rs = load_requests(write(tmp_path, rows, "u.jsonl"))
    assert rs[0].prompt == "The {} is in" and rs[1].case_id == "c2" and rs[1].target_true == "Rome"
    p = tmp_path / "u.csv"
    p.write_text("subject,prompt,target\nEiffel Tower,The Eiffel Tower is in,Rome\n")
    (r,) = load_requests(p)
    assert r.target_new == "Rome" and r.prompt == "The {} is in"


def test_builtin_set():
    rs = load_requests("builtin:smollm2_facts")
    assert 25 <= len(rs) <= 40
    assert all(r.target_true and r.paraphrase_prompts and r.neighborhood_prompts for r in rs)
    assert len({r.case_id for r in rs}) == len(rs)
    assert len(load_requests("builtin:smollm2_facts", num_edits=5, offset=2)) == 5


def _bad(tmp_path, rec, match, field, index=0, name="bad.json", **kw):
    p = write(tmp_path, [CF if index else rec] + ([rec] if index else []), name)
    with pytest.raises(RequestValidationError, match=match) as ei:
        load_requests(p, **kw)
    e = ei.value
    assert e.field == field and e.index == index and str(p) in str(e)
    return e


def cf_with(**rr):
    return dict(CF, requested_rewrite=dict(CF["requested_rewrite"], **rr))


def test_missing_placeholder(tmp_path):
    e = _bad(tmp_path, cf_with(prompt="The mother tongue of him is"), "no '\\{\\}' placeholder", "requested_rewrite.prompt")
    assert e.case_id == 7 and "case_id=7" in str(e)


def test_subject_absent(tmp_path):
    _bad(tmp_path, dict(ZSRE, src="What is the product made by them?"), "does not occur", "src")
    _bad(tmp_path, dict(REDUCED, prompt="Something, by"), "does not contain the subject", "prompt")


def test_empty_target(tmp_path):
    _bad(tmp_path, cf_with(target_new={"str": " ", "id": None}), "empty", "requested_rewrite.target_new.str")
    _bad(tmp_path, dict(REDUCED, target_new=""), "empty", "target_new")


def test_wrong_types(tmp_path):
    _bad(tmp_path, cf_with(subject=5), "expected a string", "requested_rewrite.subject")
    _bad(tmp_path, dict(CF, paraphrase_prompts=[1, 2]), "list of strings", "paraphrase_prompts")
    _bad(tmp_path, dict(CF, case_id=[1]), "case_id must be", "case_id")
    _bad(tmp_path, dict(ZSRE, answers=[]), "non-empty list", "answers")


def test_two_placeholders_and_spacing(tmp_path):
    _bad(tmp_path, cf_with(prompt="{} and {} is"), "exactly one", "requested_rewrite.prompt")
    _bad(tmp_path, cf_with(prompt="The({}) is"), "end in a space", "requested_rewrite.prompt")


def test_duplicate_case_ids(tmp_path):
    e = _bad(tmp_path, CF, "duplicate case_id", "case_id", index=1)
    assert "first seen at record 0" in str(e)


def test_malformed_json(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[{"case_id": 1,}')
    with pytest.raises(RequestValidationError, match="malformed JSON") as ei:
        load_requests(p)
    assert "broken.json" in str(ei.value)
    p = tmp_path / "broken.jsonl"
    p.write_text(json.dumps(REDUCED) + "\n{oops\n")
    with pytest.raises(RequestValidationError, match="line 2"):
        load_requests(p)


def test_unknown_layout_and_not_object(tmp_path):
    _bad(tmp_path, {"foo": 1}, "unrecognised record layout", None)
    _bad(tmp_path, "just a string", "expected an object", None)


def test_skip_invalid_counts(tmp_path, caplog):
    p = write(tmp_path, [CF, cf_with(prompt="no placeholder"), dict(CF, case_id=8)])
    rs = load_requests(p, skip_invalid=True)
    assert [r.case_id for r in rs] == [7, 8]
    assert "skipped 1 invalid record" in caplog.text


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        load_requests("/nonexistent/requests.json")
    with pytest.raises(FileNotFoundError, match="built-in"):
        load_requests("builtin:nope")


def test_cli_exit_code_2(tmp_path, capsys):
    from massedit.cli import run_command

    p = write(tmp_path, [cf_with(prompt="no placeholder here")])
    rc = run_command("edit", [f"data.path={p}", f"output_dir={tmp_path/'out'}", "logger=none"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "record 0" in err and "requested_rewrite.prompt" in err and "case_id=7" in err


def test_shared_data_loads(shared_dir):
    """Every record of the real data files passes validation."""
    d = shared_dir / "data"
    assert len(load_requests(d / "counterfact/counterfact_dev.json")) == 1709
    assert len(load_requests(d / "counterfact/counterfact_reduced_val.json")) == 1919
    assert len(load_requests(d / "zsre/zsre_eval_dev.json")) == 519
    with pytest.raises(RequestValidationError, match="record 534.*'alt': empty"):
        load_requests(d / "zsre/zsre_mend_train-1k.json", zsre_target="alt")
    assert 990 <= len(load_requests(d / "zsre/zsre_mend_train-1k.json", zsre_target="alt", skip_invalid=True)) < 1000
