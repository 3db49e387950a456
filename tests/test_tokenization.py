"""Tokenisation helpers on both tokenizer kinds: GPT-2 byte-level BPE (no BOS) and SentencePiece-like (BOS)."""
import pytest
import torch

from massedit.core.tokenization import (
    last_token_index,
    prepare_tokenizer,
    special_prefix_len,
    subject_token_index,
    target_token_ids,
    tokenize_batch,
    uses_dummy_prefix,
)
from massedit.testing import tiny_tokenizer

CASES = [
    ("The {} is located in", "Eiffel Tower"),
    ("{} was born in", "Danielle Darrieux"),
    ("In {}, the language spoken is", "Saint Pierre and Miquelon"),
    ("The mother tongue of {} is", "Thomas Joannes Stieltjes"),
    ("{}", "Michael Jordan"),
]


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def tok(request):
    return prepare_tokenizer(tiny_tokenizer(request.param))


def _offsets_last_subject_token(tok, template, subject):
    text = template.format(subject)
    start = text.index(subject)
    end = start + len(subject)
    enc = tok(text, return_offsets_mapping=True)
    idx = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end and e > start]
    return idx[-1], idx[0]


def test_kinds(tok):
    if uses_dummy_prefix(tok):
        assert special_prefix_len(tok) == 1  # BOS
    else:
        assert special_prefix_len(tok) == 0


@pytest.mark.parametrize("template,subject", CASES)
def test_subject_last_matches_offsets(tok, template, subject):
    last, first = _offsets_last_subject_token(tok, template, subject)
    assert subject_token_index(tok, template, subject, "subject_last") == last
    assert subject_token_index(tok, template, subject, "subject_first") == first


def test_subject_index_rules(tok):
    n = len(tok("The Eiffel Tower is located in")["input_ids"])
    assert subject_token_index(tok, "The {} is located in", "Eiffel Tower", "last") == -1
    i = subject_token_index(tok, "The {} is located in", "Eiffel Tower", "subject_first_after_last")
    assert i == subject_token_index(tok, "The {} is located in", "Eiffel Tower") + 1 < n
    with pytest.raises(ValueError, match="end in a space"):
        subject_token_index(tok, "The({}) is", "Eiffel Tower")
    with pytest.raises(ValueError, match="exactly one"):
        subject_token_index(tok, "The {} {} is", "x")
    with pytest.raises(ValueError, match="unknown fact_token"):
        subject_token_index(tok, "The {} is", "x", "middle")


@pytest.mark.parametrize("prompt,target", [("The Eiffel Tower is located in", "Paris"),
                                           ("Toko Yasuda plays the", " guitar"),
                                           ("The capital of Japan is", "Tokyo")])
def test_target_ids_continue_the_prompt(tok, prompt, target):
    """prompt tokens + target tokens == tokens of the concatenated string (leading-space convention)."""
    ids = target_token_ids(tok, target)
    assert tok.bos_token_id not in ids or tok.bos_token_id == tok.eos_token_id
    full = tok(prompt + " " + target.lstrip())["input_ids"]
    assert full == tok(prompt)["input_ids"] + ids
    assert tok.decode(ids).strip() == target.strip()
    with pytest.raises(ValueError):
        target_token_ids(tok, "  ")


def test_right_padding(tok):
    enc = tokenize_batch(tok, ["Paris", "The Eiffel Tower is located in Paris"])
    assert tok.pad_token == tok.eos_token and tok.padding_side == "right"
    mask = enc["attention_mask"]
    assert mask[0, 0] == 1 and mask[0, -1] == 0
    last = last_token_index(mask)
    assert last[1] == enc["input_ids"].shape[1] - 1
    assert torch.all(enc["input_ids"][0, last[0] + 1 :] == tok.pad_token_id)


def test_smollm2_tokenizer(smollm2):
    _, tok = smollm2
    assert special_prefix_len(tok) == 0 and not uses_dummy_prefix(tok)
    ids = target_token_ids(tok, "Paris")
    assert tok.convert_ids_to_tokens(ids) == ["ĠParis"]
    assert subject_token_index(tok, "The native language of {} is", "Claude Rich") == len(tok("The native language of Claude Rich")["input_ids"]) - 1
