#!/usr/bin/env python
"""The block runner's attention (``block_attention: grouped``) against transformers' SDPA path at a z step's shape.

    python benchmarks/bench_attention.py --threads 2
    python benchmarks/bench_attention.py --lanes 93 --heads 9 --kv-heads 3 --queries 6 --keys 41 --head-dim 64

SmolLM2's step at 20 CounterFact records (the defaults): 93 lanes of 6 suffix slots, each against its 35 cached
prefix keys plus the 6 new ones, under a random attention pattern. Times forward and forward + backward (gradients
to q, k, v) of :func:`massedit.core.attention.grouped_attention` and of transformers' ``sdpa_attention_forward``
(which repeats the key/value heads), median of ``--reps``, and prints their largest difference.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("lanes", 93), ("heads", 9), ("kv-heads", 3), ("queries", 6), ("keys", 41), ("head-dim", 64)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from massedit.core.attention import grouped_attention

    B, H, Hk, Q, K, D = args.lanes, args.heads, args.kv_heads, args.queries, args.keys, args.head_dim
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Q, H, D, generator=g).transpose(1, 2).requires_grad_()  # the projections' layout
    k = torch.randn(B, Hk, K, D, generator=g).requires_grad_()
    v = torch.randn(B, Hk, K, D, generator=g).requires_grad_()
    mask = torch.rand(B, 1, Q, K, generator=g) > 0.3
    mask[..., -1] = True
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = H // Hk, True
    go = torch.randn(B, Q, H, D, generator=g)
    fns = {"sdpa (transformers)": lambda: sdpa_attention_forward(module, q, k, v, mask, scaling=D ** -0.5)[0],
           "grouped (massedit)": lambda: grouped_attention(module, q, k, v, mask, scaling=D ** -0.5)[0]}
    diff = float((fns["sdpa (transformers)"]() - fns["grouped (massedit)"]()).detach().abs().max())
    out = {"shape": dict(lanes=B, heads=H, kv_heads=Hk, queries=Q, keys=K, head_dim=D), "max_abs_diff": diff}
    for name, f in fns.items():
        for _ in range(3):
            f().backward(go)
        fwd, both = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            o = f()
            t1 = time.perf_counter()
            o.backward(go)
            t2 = time.perf_counter()
            fwd.append(t1 - t0)
            both.append(t2 - t0)
        out[name] = {"forward_ms": round(1e3 * statistics.median(fwd), 2),
                     "forward_backward_ms": round(1e3 * statistics.median(both), 2)}
        print(f"{name:20s} forward {out[name]['forward_ms']:6.2f} ms   forward + backward "
              f"{out[name]['forward_backward_ms']:6.2f} ms")
    print(f"max |difference| {diff:.2e}")
    return out


if __name__ == "__main__":
    main()
