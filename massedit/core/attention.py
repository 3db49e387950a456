"""Attention for the blocks massedit runs itself (:meth:`ArchAdapter.run_blocks`): many short queries, small heads.

The target optimisation's step runs a few suffix tokens of every row against that row's cached prefix keys:
tensors like ``[93 lanes, 9 heads, 6 queries, 64]`` against 41 keys. On a CPU the SDPA kernels spend most of their
time on per-head overhead there, and for grouped-query attention (Llama, SmolLM2: 9 query heads on 3 key/value
heads) transformers first copies every key/value head ``n_groups`` times and sums the copies' gradients back in the
backward pass. :func:`grouped_attention` computes the same ``softmax(q kᵀ · scaling + mask) v`` with the query heads
that share a key/value head stacked along the query axis, so each key/value head is read once, in two batched
matmuls (measured on 2 cores for the shape above: forward + backward 4-7 ms against 21-38 ms for SDPA).

It is registered with transformers' :class:`~transformers.AttentionInterface` under :data:`GROUPED` and switched on
for the duration of a block run by :func:`attention_implementation`; the model's own setting is restored afterwards.
"""
from __future__ import annotations

import contextlib

import torch

GROUPED = "massedit_grouped"


def grouped_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """``softmax(q kᵀ · scaling + mask) v`` for ``query`` ``[B, H, Q, D]`` and ``key``/``value`` ``[B, Hk, K, D]``
    with ``H = g · Hk`` (query head ``h`` reads key/value head ``h // g``, as transformers' ``repeat_kv``).
    ``attention_mask``: ``[B, 1 | H, Q, K]``, boolean (True = attend) or additive. Returns ``[B, Q, H, D]`` (the
    layout transformers' attention functions return) and no weights."""
    B, H, Q, D = query.shape
    Hk, K = key.shape[1], key.shape[2]
    if H % Hk:
        raise ValueError(f"{H} query heads do not split into groups over {Hk} key/value heads")
    g = H // Hk
    scale = D ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query.reshape(B, Hk, g * Q, D), key.transpose(-1, -2)).view(B, Hk, g, Q, K)
    scores = scores * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        m = attention_mask
        m = m[:, :, None] if m.shape[1] == 1 else m.view(B, Hk, g, Q, K)  # [B, 1|Hk, 1|g, Q, K]
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min)
        else:
            scores = scores + m.to(scores.dtype)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(value.dtype)
    if dropout and module is not None and getattr(module, "training", False):
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs.view(B, Hk, g * Q, K), value).view(B, H, Q, D)
    return out.transpose(1, 2), None


_registered = False


def register() -> str:
    """Register :func:`grouped_attention` with transformers (once); returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(GROUPED, grouped_attention)
        _registered = True
    return GROUPED


@contextlib.contextmanager
def attention_implementation(config, name: str | None):
    """Run the model of ``config`` with attention implementation ``name`` inside the block (None: leave it);
    the previous setting (of the config and its sub-configs) is restored on exit."""
    if name is None or getattr(config, "_attn_implementation", None) == name:
        yield
        return
    if name == GROUPED:
        register()
    configs = [config] + [getattr(config, k) for k in getattr(config, "sub_configs", {}) if getattr(config, k, None)]
    before = [c._attn_implementation for c in configs]
    config._attn_implementation = name
    try:
        yield
    finally:
        for c, b in zip(configs, before):  # the top config first (its setter also sets the sub-configs)
            c._attn_implementation = b
