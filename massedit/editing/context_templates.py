"""Context (prefix) templates for ROME and MEMIT (REFERENCE_SPEC §0.5, §6.4).

Both methods average keys and optimise targets over the edit prompt preceded by short texts sampled
from the *unedited* model. ROME uses a flat list of 21 templates, MEMIT two groups
``[["{}"], [5 sampled]]`` (the grouping sets the key weights, §2.3). Sampling is the reference's
top-k sampler (:func:`massedit.core.sampling.generate_fast_ids`), **seeded** (the reference is not), and the templates are saved
with every run and accepted back as input (``method.context_templates=FILE``).
"""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Sequence

import torch

from massedit.core.io import atomic_write_json
from massedit.core.progress import progress_bar
from massedit.core.sampling import generate_fast_ids
from massedit.core.errors import InputError

Templates = list[str] | list[list[str]]


class TemplateError(InputError):
    pass


def _clean(text: str, drop: Sequence[str]) -> str:
    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    for s in drop:
        if s:
            text = text.replace(s, "")
    return text


def _seed_ids(tok, seed_text: str) -> list[int]:
    """ids of the ROME seed text: ``<|endoftext|>`` if it is one token, else BOS/EOS ([QUIRK] §6.3: for
    Llama the reference feeds the literal string)."""
    ids = tok(seed_text, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return ids
    for t in (tok.bos_token_id, tok.eos_token_id):
        if t is not None:
            return [t]
    raise TemplateError("tokenizer has neither a one-token seed text nor BOS/EOS to start sampling from")


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _decode(tok, ids: list[int], drop_prefix: int) -> str:
    return tok.decode(ids[drop_prefix:])


def _special_strings(tok) -> list[str]:
    out = ["<|endoftext|>"]
    for t in (tok.bos_token, tok.eos_token, tok.pad_token):
        if t:
            out.append(t)
    return list(dict.fromkeys(out))


def _sanitize(text: str) -> str:
    return text.replace("{", " ").replace("}", " ")


def sample_rome_templates(model, tok, length_params=((5, 10), (10, 10)), seed: int | None = 0,
                          seed_text: str = "<|endoftext|>", sanitize_braces: bool = True) -> list[str]:
    """``["{}"] + [sample + ". {}" ...]``: for each ``[max_out_len, n]`` n samples after the seed token."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        start = _seed_ids(tok, seed_text)
        texts = []
        bar = progress_bar(len(length_params), "context templates", unit="set", transient=True)
        for length, n in length_params:
            bar.update(0)
            for ids in generate_fast_ids(model, [start], pad_id=_pad_id(tok), n_gen_per_prompt=int(n),
                                         max_out_len=int(length)):
                t = _clean(_decode(tok, ids, 0), _special_strings(tok))
                texts.append((_sanitize(t) if sanitize_braces else t) + ". {}")
            bar.update(1)
        bar.close()
    return ["{}"] + texts


def sample_memit_templates(model, tok, prompts=("The", "Therefore", "Because", "I", "You"),
                           length_params=((10, 5),), seed: int | None = 0) -> list[list[str]]:
    """``[["{}"], [sample + ". {}" for each prompt]]`` (n // len(prompts) samples per prompt word)."""
    groups: list[list[str]] = [["{}"]]
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        bar = progress_bar(len(length_params), "context templates", unit="set", transient=True)
        for length, n in length_params:
            prompt_ids = [tok(p)["input_ids"] for p in prompts]
            outs = generate_fast_ids(model, prompt_ids, pad_id=_pad_id(tok),
                                     n_gen_per_prompt=max(1, int(n) // len(prompts)), max_out_len=int(length))
            groups.append([_sanitize(_clean(tok.decode(ids), _special_strings(tok))) + ". {}" for ids in outs])
            bar.update(1)
        bar.close()
    return groups


# ------------------------------------------------------------------------------------- files
def validate_templates(templates, grouped: bool, source: str = "context templates") -> Templates:
    """Every template is a string with exactly one ``{}``; grouped = list of non-empty lists."""
    if not isinstance(templates, list) or not templates:
        raise TemplateError(f"{source}: expected a non-empty JSON list")
    groups = templates if grouped else [templates]
    for gi, g in enumerate(groups):
        if not isinstance(g, list) or not g:
            raise TemplateError(f"{source}: group {gi} must be a non-empty list of strings")
        for ti, t in enumerate(g):
            if not isinstance(t, str):
                raise TemplateError(f"{source}: template {gi}.{ti} is not a string")
            try:
                ok = t.count("{}") == 1 and t.format("X").count("X") >= 1
            except (IndexError, KeyError, ValueError):
                ok = False
            if not ok:
                raise TemplateError(f"{source}: template {gi}.{ti} must contain exactly one '{{}}' and no other braces: {t!r}")
    return templates


def is_grouped(templates) -> bool:
    return bool(templates) and all(isinstance(g, list) for g in templates)


def as_groups(templates) -> list[list[str]]:
    """MEMIT layout: a flat list becomes ``[["{}"], rest]`` if it starts with ``"{}"``, else one group."""
    if is_grouped(templates):
        return [list(g) for g in templates]
    flat = list(templates)
    if flat and flat[0] == "{}" and len(flat) > 1:
        return [["{}"], flat[1:]]
    return [flat]


def flatten(templates) -> list[str]:
    return [t for g in templates for t in g] if is_grouped(templates) else list(templates)


def load_context_templates(path) -> Templates:
    """A JSON list of template strings (ROME) or a list of groups (MEMIT, the reference's layout)."""
    path = Path(path)
    if not path.exists():
        raise TemplateError(f"context templates file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TemplateError(f"{path}: not valid JSON ({e})") from None
    return validate_templates(data, is_grouped(data), source=str(path))


def save_context_templates(path, templates: Templates) -> Path:
    return atomic_write_json(path, templates, indent=1)
