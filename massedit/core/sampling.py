"""The reference's custom top-k sampler ``generate_fast`` (REFERENCE_SPEC §6.4), seeded; used for the context
templates of ROME/MEMIT (``massedit.editing.context_templates``) and the generation metrics of the evaluation.

Right-padded batch of prompts; decoding starts at the shortest prompt's length with a KV cache; each step takes
the softmax of the last-position logits, keeps the top-k, renormalises and samples one token per row; a row takes
the sampled token only when its last real token sits exactly before the decoding column (longer prompts keep
their own tokens until the cursor passes them); a column is appended when needed; stops when the width reaches
``max_out_len`` (prompt included).

Deliberate differences ([QUIRK] decisions):
* seeded: ``torch.multinomial`` draws from ``generator`` when one is given (the reference is unseeded; without a
  generator the global RNG is used, as the reference);
* every token fed to the model is real (prompt or sampled), so the attention mask is all ones — the reference
  passes a sliced mask that old transformers ignored with a cache;
* text decoding drops padding columns and the tokenizer's BOS/EOS/pad strings (the reference removes only
  ``<|endoftext|>``, which is GPT-2's eos/pad); then NFKD normalisation and ``"\\n\\n" -> " "`` as the reference.
"""
from __future__ import annotations

import inspect
import unicodedata
from typing import Sequence

import torch

from massedit.core.tokenization import tokenize_batch


def top_k_sample(probs: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from the top-k of ``probs`` renormalised (``torch.multinomial``) → [B]."""
    top = torch.topk(probs, k, dim=1).indices
    p = torch.gather(probs, 1, top)
    p = p / p.sum(1, keepdim=True)
    pick = torch.multinomial(p, 1, generator=generator)
    return torch.gather(top, 1, pick).squeeze(1)


def clean_generated_text(tok, text: str) -> str:
    """Reference post-processing: NFKD, ``"\\n\\n" -> " "``, special-token strings removed."""
    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    specials = {"<|endoftext|>"} | {t for t in (tok.bos_token, tok.eos_token, tok.pad_token) if t}
    for s in sorted(specials, key=len, reverse=True):
        text = text.replace(s, "")
    return text


def _cache_keyword(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.x); use whichever this model's forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def generate_fast_ids(model, prompt_ids: Sequence[Sequence[int]], *, pad_id: int, n_gen_per_prompt: int = 1,
                      top_k: int = 5, max_out_len: int = 100,
                      generator: torch.Generator | None = None) -> list[list[int]]:
    """Sample continuations of token-id prompts (module docstring); returns each row's real ids, prompt included."""
    return generate_fast_ids_grouped(model, [prompt_ids], pad_id=pad_id, n_gen_per_prompt=n_gen_per_prompt,
                                     top_k=top_k, max_out_len=max_out_len, generators=[generator])[0]


@torch.no_grad()
def generate_fast_ids_grouped(model, groups: Sequence[Sequence[Sequence[int]]], *, pad_id: int,
                              n_gen_per_prompt: int = 1, top_k: int = 5, max_out_len: int = 100,
                              generators: Sequence[torch.Generator | None] | None = None) -> list[list[list[int]]]:
    """Several independent :func:`generate_fast_ids` calls in one batch: ``groups[g]`` (a list of prompts) is
    sampled with ``generators[g]`` exactly as it would be alone. A group draws from its generator only at the
    steps its lone call would run (from its own shortest prompt on) with the same ``[rows, k]`` shapes, so its
    random stream does not depend on the other groups; only float rounding of the batched forward differs (in
    float32 a draw near a top-k boundary can flip, and the rest of that row with it). A group whose longest prompt
    already reaches ``max_out_len`` is returned unchanged, as alone. Returns ``[group][row]`` real ids."""
    generators = list(generators) if generators is not None else [None] * len(groups)
    if len(generators) != len(groups):
        raise ValueError(f"{len(groups)} prompt groups but {len(generators)} generators")
    out: list[list[list[int]]] = [[list(p) for p in g for _ in range(n_gen_per_prompt)] for g in groups]
    live = [gi for gi, rows in enumerate(out) if rows and max(len(r) for r in rows) < max_out_len]
    if not live:
        return out
    device = next(model.parameters()).device
    rows = [r for gi in live for r in out[gi]]
    spans, at = [], 0  # each live group's rows [a, b) in the batch and the column its lone call starts decoding at
    for gi in live:
        n = len(out[gi])
        spans.append((gi, at, at + n, min(len(r) for r in out[gi])))
        at += n
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, device=device)
        attention_mask[i, : len(r)] = 1
    batch_size = len(rows)
    cache_kw = _cache_keyword(model)
    past = None
    cur = slice(0, min(s[3] for s in spans))
    while input_ids.size(1) < max_out_len:
        out_ = model(input_ids=input_ids[:, cur],
                     attention_mask=torch.ones(batch_size, cur.stop, dtype=attention_mask.dtype, device=device),
                     use_cache=True, **{cache_kw: past})
        past = out_.get("cache", None) if out_.get("cache", None) is not None else out_.get("past_key_values")
        probs = torch.softmax(out_.logits[:, -1, :].float(), dim=1)
        new_toks = torch.full((batch_size,), int(pad_id), dtype=torch.long, device=device)
        for gi, a, b, start in spans:
            if cur.stop >= start:  # the steps this group's lone call runs
                new_toks[a:b] = top_k_sample(probs[a:b], top_k, generators[gi])
        if cur.stop == input_ids.size(1):
            attention_mask = torch.cat([attention_mask, attention_mask.new_zeros(batch_size, 1)], dim=1)
            input_ids = torch.cat([input_ids, input_ids.new_full((batch_size, 1), int(pad_id))], dim=1)
        # a row takes the sample only when its last real token sits right before the cursor
        take = attention_mask.sum(1) == cur.stop
        if cur.stop < max_out_len and bool(take.any()):
            input_ids[take, cur.stop] = new_toks[take]
            attention_mask[take, cur.stop] = 1
        cur = slice(cur.stop, cur.stop + 1)
    ids, mask = input_ids.tolist(), attention_mask.tolist()
    for gi, a, b, _ in spans:
        out[gi] = [[t for t, m in zip(ids[i], mask[i]) if m] for i in range(a, b)]
    return out


def generate_fast(model, tok, prompts: Sequence[str], *, n_gen_per_prompt: int = 1, top_k: int = 5,
                  max_out_len: int = 100, generator: torch.Generator | None = None) -> list[str]:
    """Sample continuations of text ``prompts`` (tokenised as one right-padded batch); cleaned texts incl. the prompt."""
    return generate_fast_grouped(model, tok, [list(prompts)], n_gen_per_prompt=n_gen_per_prompt, top_k=top_k,
                                 max_out_len=max_out_len, generators=[generator])[0]


def generate_fast_grouped(model, tok, groups: Sequence[Sequence[str]], *, n_gen_per_prompt: int = 1, top_k: int = 5,
                          max_out_len: int = 100,
                          generators: Sequence[torch.Generator | None] | None = None) -> list[list[str]]:
    """:func:`generate_fast` of each group of text prompts with its own generator, in one batch
    (:func:`generate_fast_ids_grouped`); cleaned texts per group."""
    flat = [p for g in groups for p in g]
    if not flat:
        return [[] for _ in groups]
    enc = tokenize_batch(tok, flat, device="cpu")
    ids = [row[: int(m.sum())].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    parts, at = [], 0
    for g in groups:
        parts.append(ids[at : at + len(g)])
        at += len(g)
    out = generate_fast_ids_grouped(model, parts, pad_id=tok.pad_token_id, n_gen_per_prompt=n_gen_per_prompt,
                                    top_k=top_k, max_out_len=max_out_len, generators=generators)
    return [[clean_generated_text(tok, tok.decode(r)) for r in rows] for rows in out]
