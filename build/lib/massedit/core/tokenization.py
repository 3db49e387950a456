"""Tokenisation rules shared by every editor and metric (REFERENCE_SPEC §0.3, §6.3).

* pad = eos, right padding (:func:`prepare_tokenizer`).
* Targets carry a leading space and never special tokens (:func:`target_token_ids`); this is right for
  GPT-2-style byte-level BPE (``" Paris"`` -> ``Ġ Paris``) and for SentencePiece/Llama tokenizers, whose
  dummy-prefix ``▁`` already encodes the space.
* Subject index (:func:`subject_token_index`): the reference's piece-wise rule, made BOS-safe by counting
  the prefix and the prefix+subject cumulatively (special tokens counted once, dummy prefix once).
"""
from __future__ import annotations

from typing import Sequence

import torch

FACT_TOKEN_RULES = ("subject_last", "subject_first", "subject_first_after_last", "last")


def prepare_tokenizer(tok):
    """Set ``pad_token = eos_token`` when missing and right padding (reference convention)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def emits_token_type_ids(tok) -> bool:
    """Whether ``tok(text)`` returns ``token_type_ids`` (its ``model_input_names`` list them).

    The reference feeds every editing forward as ``model(**tok(texts))`` (keys, k0/o0, the v*/z
    optimisation rows), so a tokenizer that emits ``token_type_ids`` (all zeros for single texts, pads
    included) changes what the model computes: GPT-2/GPT-J add ``wte(token_type_ids)`` = the embedding of
    token 0 at every position. Stock GPT-2/Llama tokenizers do not emit them; a transformers-4
    ``PreTrainedTokenizerFast(tokenizer_file=...)`` does (its default ``model_input_names``). Every
    editing forward here therefore passes the same inputs the tokenizer would return
    (:func:`tokenize_batch`, :func:`token_type_ids_like`); the statistics collector and the template
    sampler feed ``input_ids``/``attention_mask`` only, as the reference's ``layer_stats`` and
    ``generate_fast`` do.
    """
    return "token_type_ids" in (getattr(tok, "model_input_names", None) or ())


def token_type_ids_like(tok, input_ids: torch.Tensor) -> dict:
    """``{"token_type_ids": zeros}`` when ``tok`` emits them (:func:`emits_token_type_ids`), else ``{}``:
    what ``tok(texts, padding=True)`` would add for a batch assembled from pre-tokenised rows."""
    if not emits_token_type_ids(tok):
        return {}
    return {"token_type_ids": torch.zeros_like(input_ids)}  # single texts: segment 0 (pads too, after the text)


def _enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def special_prefix_len(tok) -> int:
    """How many special tokens (e.g. BOS) the tokenizer prepends to every text."""
    cached = getattr(tok, "_massedit_special_prefix_len", None)
    if cached is not None:
        return cached
    with_sp = tok("a")["input_ids"]
    without = _enc(tok, "a")
    # tokens the tokenizer puts in front of any text (BOS for Llama; 0 for GPT-2 BPE)
    n = 0
    for k in range(len(with_sp)):
        if with_sp[k : k + len(without)] == without:
            n = k
            break
    try:
        tok._massedit_special_prefix_len = n
    except AttributeError:  # pragma: no cover - exotic tokenizer objects
        pass
    return n


def uses_dummy_prefix(tok) -> bool:
    """True for SentencePiece-style tokenizers that encode a word at text start as ``▁word``."""
    ids = _enc(tok, "a")
    if not ids:
        return False
    first = tok.convert_ids_to_tokens(ids[0])
    return isinstance(first, str) and first.startswith("▁")


def encode(tok, text: str) -> list[int]:
    """Token ids of a full model input exactly as the model sees it (tokenizer's special tokens)."""
    return tok(text)["input_ids"]


def target_token_ids(tok, target: str) -> list[int]:
    """Ids of ``target`` as a continuation after a space (leading-space convention, no specials)."""
    text = target.lstrip(" ")
    if not text:
        raise ValueError("empty target")
    ids = _enc(tok, text) if uses_dummy_prefix(tok) else _enc(tok, " " + text)
    return ids


def with_leading_space(target: str) -> str:
    """The reference's ``" " + target`` unless the target already starts with a space."""
    return target if target.startswith(" ") else " " + target


def subject_token_index(
    tok, template: str, subject: str, rule: str = "subject_last"
) -> int:
    """Index of the subject token in ``template.format(subject)`` tokenised as the model sees it.

    Implements REFERENCE_SPEC §0.3: split the template at ``{}``; a non-empty prefix must end in a
    space, which moves onto the subject (``" " + subject.strip()``). Tokens are counted cumulatively
    (prefix, prefix+subject) so BOS/dummy prefixes are counted once. ``last`` returns ``-1``
    (meaning: the last real token; resolve with the attention mask).
    """
    if rule not in FACT_TOKEN_RULES:
        raise ValueError(f"unknown fact_token rule {rule!r}; choose one of {FACT_TOKEN_RULES}")
    if template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}': {template!r}")
    if rule == "last":
        return -1
    prefix, suffix = template.split("{}")
    if prefix:
        if not prefix.endswith(" "):
            raise ValueError(
                f"the text before '{{}}' must end in a space (reference rule): {template!r}"
            )
        prefix = prefix[:-1]
        word = " " + subject.strip()
    else:
        word = subject
    sp = special_prefix_len(tok)
    n_prefix = sp + (len(_enc(tok, prefix)) if prefix else 0)
    pw = _enc(tok, prefix + word)
    n_prefix_word = sp + len(pw)
    full = _enc(tok, prefix + word + suffix)
    n_all = sp + len(full)
    if full[: len(pw)] != pw and getattr(tok, "is_fast", False):
        # the tokenizer merged across the end of the subject (e.g. "Miquelon," as one piece): counting
        # pieces would point past the subject, so locate the subject's tokens by character offsets
        first, last = _subject_span_by_offsets(tok, prefix + word + suffix, len(prefix) + len(word) - len(word.lstrip()), len(prefix) + len(word))
        if rule == "subject_last":
            return last
        if rule == "subject_first":
            return first
        return last + 1 if n_all > last + 1 else last
    if rule == "subject_last":
        return n_prefix_word - 1
    if rule == "subject_first":
        return n_prefix
    # subject_first_after_last
    return n_prefix_word if n_all > n_prefix_word else n_prefix_word - 1


def _subject_span_by_offsets(tok, text: str, start: int, end: int) -> tuple[int, int]:
    enc = tok(text, return_offsets_mapping=True)
    idx = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]
    if not idx:
        raise ValueError(f"cannot locate the subject in {text!r}")
    return idx[0], idx[-1]


def tokenize_batch(tok, texts: Sequence[str], device=None, max_length: int | None = None):
    """Right-padded batch (pad = eos) of full model inputs with attention mask."""
    prepare_tokenizer(tok)
    enc = tok(
        list(texts),
        padding=True,
        return_tensors="pt",
        truncation=max_length is not None,
        max_length=max_length,
    )
    if device is not None:
        enc = enc.to(device)
    return enc


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row of a right-padded batch."""
    return attention_mask.sum(dim=1) - 1


def resolve_index(index: int, attention_mask_row: torch.Tensor) -> int:
    """Turn ``-1`` (rule ``last``) into the last real position of a right-padded row."""
    return int(attention_mask_row.sum().item()) - 1 if index < 0 else index
