"""fp32 matrix-multiply rate of this machine at SmolLM2-135M's linear shapes (the evaluation's floor).

    python benchmarks/bench_gemm.py --threads 2

Times ``torch.nn.functional.linear`` on ``[tokens, in] x [out, in]`` for the four weight shapes of a SmolLM2 block
(q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536) in one batch of ``--tokens`` rows, repeated
``--reps`` times, and prints GFLOP/s (median of the repeats) and the implied seconds per 1,000 tokens of a full
forward (0.212 GFLOP per token: 30 layers x 3.54 M weights x 2).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (out, in)
FLOP_PER_TOKEN = 2 * 30 * sum(o * i for o, i in SHAPES)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048, help="rows per matmul (an evaluation batch: 16 rows x 128)")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ws = [torch.randn(o, i) for o, i in SHAPES]
    xs = {i: torch.randn(args.tokens, i) for _, i in SHAPES}
    flop = 2 * args.tokens * sum(o * i for o, i in SHAPES)
    rates = []
    with torch.inference_mode():
        for rep in range(args.reps + 2):
            t0 = time.perf_counter()
            for w in ws:
                torch.nn.functional.linear(xs[w.shape[1]], w)
            dt = time.perf_counter() - t0
            if rep >= 2:  # warm-up
                rates.append(flop / dt / 1e9)
    gflops = statistics.median(rates)
    out = {"threads": torch.get_num_threads(), "tokens": args.tokens, "gflop_per_s_median": round(gflops, 1),
           "gflop_per_s_all": [round(r, 1) for r in rates], "gflop_per_token_forward": round(FLOP_PER_TOKEN / 1e9, 3),
           "seconds_per_1000_tokens_at_this_rate": round(1000 * FLOP_PER_TOKEN / 1e9 / gflops, 2)}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
