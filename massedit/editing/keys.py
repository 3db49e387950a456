"""Keys and representations at the subject's token (REFERENCE_SPEC §0.3, §0.4, §1.1, §2.3).

A key is the *input* of the rewrite module (the MLP down-projection, width m) at the subject token of
a context string; block outputs (width d) at the same token give MEMIT's current hidden states H.
Contexts are run in right-padded chunks; the forward stops right after the traced module.
"""
from __future__ import annotations

from typing import Sequence

import torch

from massedit.core.adapters import ArchAdapter
from massedit.core.nethook import Trace
from massedit.core.tokenization import resolve_index, subject_token_index, tokenize_batch


def lookup_indices(tok, templates: Sequence[str], words: Sequence[str], rule: str = "subject_last") -> list[int]:
    """Subject-token index of each ``template.format(word)`` (``-1`` = last token for rule ``last``)."""
    return [subject_token_index(tok, t, w, rule) for t, w in zip(templates, words)]


@torch.no_grad()
def module_io_at_words(model, tok, module_name: str, templates: Sequence[str], words: Sequence[str],
                       rule: str = "subject_last", chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of ``module_name`` at the subject token of every ``template.format(word)``.

    Returns two float32 tensors ``[n, width_in]`` and ``[n, width_out]`` (block outputs: the hidden
    state, element 0 of the tuple). REFERENCE_SPEC §0.4 (chunks of 128, right padding).
    """
    idxs = lookup_indices(tok, templates, words, rule)
    texts = [t.format(w) for t, w in zip(templates, words)]
    device = next(model.parameters()).device
    ins, outs = [], []
    for s in range(0, len(texts), chunk):
        enc = tokenize_batch(tok, texts[s : s + chunk], device=device)
        with Trace(model, module_name, retain_input=True, retain_output=True, stop=True) as tr:
            model(**enc)  # the tokenizer's full encoding, as the reference (token_type_ids included if emitted)
        x_in = tr.input
        x_out = ArchAdapter.block_hidden(tr.output)
        rows = torch.arange(len(texts[s : s + chunk]), device=device)
        pos = torch.tensor([resolve_index(i, enc["attention_mask"][r]) for r, i in enumerate(idxs[s : s + chunk])],
                           device=device)
        if int(pos.max()) >= enc["input_ids"].shape[1]:
            bad = int(torch.argmax(pos))
            raise ValueError(f"subject index {int(pos[bad])} beyond the tokenised context {texts[s + bad]!r}")
        # with a model spread over devices the traced tensors live on their layer's device
        ins.append(x_in[rows.to(x_in.device), pos.to(x_in.device)].float())
        outs.append(x_out[rows.to(x_out.device), pos.to(x_out.device)].float())
    return torch.cat(ins), torch.cat(outs)


def rome_key(model, tok, adapter: ArchAdapter, layer: int, request, templates: Sequence[str],
             rule: str = "subject_last") -> torch.Tensor:
    """k* (ROME §1.1): flat mean over the templates of the rewrite-module input at the subject token."""
    ctx = [t.format(request.prompt) for t in templates]
    k, _ = module_io_at_words(model, tok, adapter.rewrite_name(layer), ctx, [request.subject] * len(ctx), rule)
    return k.mean(0)


def memit_keys(model, tok, adapter: ArchAdapter, layer: int, requests, template_groups: Sequence[Sequence[str]],
               rule: str = "subject_last") -> torch.Tensor:
    """K ``[m, N]`` (MEMIT §2.3): per request, mean within each template group, then over the groups."""
    ctx, words = [], []
    for r in requests:
        for g in template_groups:
            for t in g:
                ctx.append(t.format(r.prompt))
                words.append(r.subject)
    k, _ = module_io_at_words(model, tok, adapter.rewrite_name(layer), ctx, words, rule)
    sizes = [len(g) for g in template_groups]
    per_req = sum(sizes)
    out = []
    for i in range(len(requests)):
        block = k[i * per_req : (i + 1) * per_req]
        means, s = [], 0
        for n in sizes:
            means.append(block[s : s + n].mean(0))
            s += n
        out.append(torch.stack(means).mean(0))
    return torch.stack(out, dim=1)


def bare_prompt_io(model, tok, module_name: str, requests, rule: str = "subject_last"):
    """(input, output) of ``module_name`` at the subject token of each request's bare prompt."""
    return module_io_at_words(model, tok, module_name, [r.prompt for r in requests], [r.subject for r in requests], rule)
