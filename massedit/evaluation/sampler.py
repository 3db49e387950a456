"""The reference's custom top-k sampler ``generate_fast`` (REFERENCE_SPEC §6.4), seeded.

Right-padded batch of prompts; decoding starts at the shortest prompt's length with a KV cache; each step takes
the softmax of the last-position logits, keeps the top-k, renormalises and samples one token per row; a row takes
the sampled token only when its last real token sits exactly before the decoding column (longer prompts keep
their own tokens until the cursor passes them); a column is appended when needed; stops when the width reaches
``max_out_len`` (prompt included).

Deliberate differences ([QUIRK] decisions):
* seeded: ``torch.multinomial`` draws from a ``torch.Generator`` seeded per call (the reference is unseeded);
* every token fed to the model is real (prompt or sampled), so the attention mask is all ones — the reference
  passes a sliced mask that old transformers ignored with a cache;
* decoding drops padding columns and the tokenizer's BOS/EOS/pad strings (the reference removes only
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
    for s in specials:
        text = text.replace(s, "")
    return text


@torch.no_grad()
def generate_fast(
    model,
    tok,
    prompts: Sequence[str],
    *,
    n_gen_per_prompt: int = 1,
    top_k: int = 5,
    max_out_len: int = 100,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Sample continuations of ``prompts`` with the reference's ragged top-k sampler (§6.4); texts include the prompt."""
    device = next(model.parameters()).device
    inp = [p for p in prompts for _ in range(n_gen_per_prompt)]
    enc = tokenize_batch(tok, inp, device=device)
    input_ids, attention_mask = enc["input_ids"].clone(), enc["attention_mask"].clone()
    batch_size = input_ids.size(0)
    pad_id = tok.pad_token_id
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past = None
    start = int(attention_mask.sum(1).min().item())
    cur = slice(0, start)
    while input_ids.size(1) < max_out_len:
        width = cur.stop
        out = model(
            input_ids=input_ids[:, cur],
            attention_mask=torch.ones(batch_size, width, dtype=attention_mask.dtype, device=device),
            use_cache=True,
            **{cache_kw: past},
        )
        past = out.get("cache", None) if out.get("cache", None) is not None else out.get("past_key_values")
        probs = torch.softmax(out.logits[:, -1, :].float(), dim=1)
        new_toks = top_k_sample(probs, top_k, generator)
        if cur.stop == input_ids.size(1):
            attention_mask = torch.cat([attention_mask, attention_mask.new_zeros(batch_size, 1)], dim=1)
            input_ids = torch.cat([input_ids, input_ids.new_full((batch_size, 1), pad_id)], dim=1)
        last = attention_mask.sum(1) - 1
        for i in range(batch_size):
            new_idx = int(last[i]) + 1
            if new_idx != cur.stop:
                continue  # this row still has prompt tokens at the cursor
            if new_idx < max_out_len:
                input_ids[i, new_idx] = new_toks[i]
                attention_mask[i, new_idx] = 1
        cur = slice(cur.stop, cur.stop + 1)
    texts = []
    for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        ids = [t for t, m in zip(row, mask) if m]
        texts.append(clean_generated_text(tok, tok.decode(ids)))
    return texts
