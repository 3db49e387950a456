"""Benchmark: second-moment statistics for several layers in ONE forward pass (stopping after the highest
layer) vs one pass per layer (the reference's ``layer_stats`` loop, which also stops after its layer), over
the same tokens.

    python benchmarks/bench_stats.py                                  # SmolLM2, layers 4-8, 10k WikiText-2 tokens
    python benchmarks/bench_stats.py --n-tokens 20000 --threads 2 --engine lightning

Prints the time and tokens/s of both and their ratio, and checks that both give the same C. The cache is
disabled (every run computes). On a shared CPU, timings vary with the load of other processes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="4,5,6,7,8")
    ap.add_argument("--corpus", default=str(REPO.parent / "shared" / "data" / "text" / "wikitext-2"))
    ap.add_argument("--n-tokens", type=int, default=10_000)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--dtype", default="float32", help="accumulation dtype")
    ap.add_argument("--model-dtype", default="float32")
    ap.add_argument("--engine", default="torch", choices=["torch", "lightning"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-per-layer", action="store_true", help="time only the one-pass collection")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    import torch

    from massedit.core.models import load_model_and_tokenizer
    from massedit.stats.collect import collect_layer_stats
    from massedit.stats.config import StatsConfig

    torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    model, tok = load_model_and_tokenizer({"name_or_path": args.model, "dtype": args.model_dtype})
    cfg = StatsConfig(corpus=args.corpus, format="wikitext", packing="chars", n_samples=None, n_tokens=args.n_tokens,
                      max_length=args.max_length, batch_tokens=args.batch_tokens, dtype=args.dtype, cache=False,
                      checkpoint_every=0)
    engine = None  # the plain-torch loop (massedit.stats.collect.TorchEngine)
    if args.engine == "lightning":  # Trainer.predict, as the edit job runs it (massedit.tasks.stats / edit)
        from massedit.lightning_modules.stats import LightningStatsEngine
        from massedit.trainer import TrainerConfig, build_trainer

        engine = LightningStatsEngine(build_trainer(TrainerConfig(accelerator="cpu", enable_progress_bar=False)))

    t0 = time.perf_counter()
    one = collect_layer_stats(model, tok, layers, cfg, model_name=args.model, progress=False, engine=engine)
    t_one = time.perf_counter() - t0
    n_tok = one[layers[0]].count
    res = {"model": args.model, "layers": layers, "tokens": n_tok, "engine": args.engine, "threads": args.threads,
           "model_dtype": args.model_dtype, "acc_dtype": args.dtype, "batch_tokens": args.batch_tokens,
           "max_length": args.max_length, "one_pass_s": round(t_one, 2), "one_pass_tokens_per_s": round(n_tok / t_one, 1),
           "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared)", "torch": torch.__version__}
    print(f"one pass, layers {layers}: {t_one:.1f} s  ({n_tok / t_one:.0f} tokens/s, {n_tok} tokens)", flush=True)
    if not args.skip_per_layer:
        t_per, max_rel = 0.0, 0.0
        for layer in layers:
            t0 = time.perf_counter()
            st = collect_layer_stats(model, tok, [layer], cfg, model_name=args.model, progress=False,
                                     engine=engine)[layer]
            dt = time.perf_counter() - t0
            t_per += dt
            rel = float((st.C - one[layer].C).norm() / one[layer].C.norm())
            max_rel = max(max_rel, rel)
            print(f"  per-layer pass, layer {layer}: {dt:.1f} s", flush=True)
        res.update(per_layer_s=round(t_per, 2), per_layer_tokens_per_s=round(n_tok / t_per, 1),
                   ratio_per_layer_over_one_pass=round(t_per / t_one, 2), max_rel_diff_C=max_rel)
        print(f"one pass per layer ({len(layers)} passes): {t_per:.1f} s  ({n_tok / t_per:.0f} tokens/s)")
        print(f"ratio (per-layer / one-pass): {t_per / t_one:.2f}x   max rel. difference of C: {max_rel:.1e}")
    print(json.dumps(res))
    if args.json:
        from massedit.core.io import atomic_write_json

        atomic_write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
