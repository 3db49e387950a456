"""Quick look at what a model predicts: next-token top-k and target probabilities for prompts."""
from __future__ import annotations

import torch

from massedit.core.tokenization import target_token_ids, tokenize_batch


@torch.no_grad()
def next_token_topk(model, tok, prompts: list[str], k: int = 1, batch_size: int = 32) -> list[list[tuple[str, float]]]:
    """Top-k next tokens (decoded, probability) after each prompt (right-padded batches)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        enc = tokenize_batch(tok, chunk, device=device)
        logits = model(**enc).logits
        last = enc["attention_mask"].sum(1) - 1
        probs = logits[torch.arange(len(chunk), device=device), last].float().softmax(-1)
        p, ids = probs.topk(k, dim=-1)
        for row_p, row_ids in zip(p.tolist(), ids.tolist()):
            out.append([(tok.decode([t]), pp) for t, pp in zip(row_ids, row_p)])
    return out


@torch.no_grad()
def target_probability(model, tok, prompt: str, target: str) -> float:
    """P(target | prompt) as the geometric mean of per-token probabilities (teacher forced)."""
    device = next(model.parameters()).device
    tgt = target_token_ids(tok, target)
    enc = tok(prompt, return_tensors="pt").to(device)
    ids = torch.cat([enc["input_ids"], torch.tensor([tgt], device=device)], dim=1)
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    n = enc["input_ids"].shape[1]
    lp = [logp[n - 1 + j, t] for j, t in enumerate(tgt)]
    return float(torch.stack(lp).mean().exp())
