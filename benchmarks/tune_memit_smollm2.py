#!/usr/bin/env python
"""Tune MEMIT for SmolLM2 on CounterFact records: z vectors once (cached on disk), then a sweep over the
layer set R (same z layer L) and lambda, measuring efficacy / paraphrase / neighbourhood success with the shared
evaluation (REFERENCE_SPEC §4.3, :func:`massedit.tasks.evaluate.evaluate`, no generation).

    python benchmarks/tune_memit_smollm2.py --data ../shared/data/counterfact/counterfact_dev.json --n 100 \
        --layers 4,5,6,7,8 --layers 6,7,8 --lambdas 15000,5000,1000

The z vectors depend only on the z layer and the z hparams, so every (R, lambda) pair reuses them; the
statistics come from massedit.stats (configs/stats/default.yaml, cached).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from massedit.core.deltas import deltas_applied  # noqa: E402

METRICS = {"ES": "efficacy_success", "PS": "paraphrase_success", "NS": "neighborhood_success"}


def success_rates(model, tok, reqs) -> dict[str, float]:
    """ES, PS, NS (%) of the shared evaluation (per record mean of [NLL(new) < NLL(true)]; NS: the reverse)."""
    from massedit.tasks.evaluate import evaluate
    from massedit.trainer import TrainerConfig

    res = evaluate(model, tok, reqs, {"generation": False}, trainer_cfg=TrainerConfig(enable_progress_bar=False))
    return {short: res.summary[key] for short, key in METRICS.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--hparams", default="smollm2-135m", help="configs/hparams/memit/<name>.yaml or a path")
    ap.add_argument("--layers", action="append", default=None, help="comma list; repeat for several sets (same max)")
    ap.add_argument("--lambdas", default=None, help="comma list of lambda values (default: the hparams')")
    ap.add_argument("--stats", default="default", help="configs/stats/<name>.yaml")
    ap.add_argument("--z-cache", default="outputs/tune_memit/zcache")
    ap.add_argument("--out", default="outputs/tune_memit/results.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from massedit.core.models import load_model_and_tokenizer
    from massedit.data.requests import load_requests
    from massedit.editing.context_templates import flatten, sample_memit_templates
    from massedit.editing.hparams import load_hparams_file
    from massedit.editing.memit import apply_memit_batch, compute_targets
    from massedit.editing.target_cache import TargetCache
    from massedit.stats.collect import get_second_moments
    from massedit.tasks.config import compose, config_dirs, resolve_hparams_path

    hp = load_hparams_file(resolve_hparams_path(args.hparams, "memit", "smollm2-135m", config_dirs()))
    layer_sets = [[int(x) for x in s.split(",")] for s in (args.layers or [",".join(map(str, hp.layers))])]
    lambdas = [float(x) for x in args.lambdas.split(",")] if args.lambdas else [hp.mom2_update_weight]
    model, tok = load_model_and_tokenizer({"name_or_path": "smollm2-135m"})
    reqs = load_requests(args.data, fmt="counterfact", num_edits=args.n)
    t0 = time.time()
    groups = sample_memit_templates(model, tok, hp.memit_template_prompts, hp.memit_template_length_params, seed=0)
    stats_cfg = compose("edit", [f"stats={args.stats}"]).stats
    all_layers = sorted({l for s in layer_sets for l in s})
    C = get_second_moments(model, tok, all_layers, stats_cfg, model_name="smollm2-135m")
    print(f"stats for {all_layers}: {time.time() - t0:.0f} s", flush=True)
    pre = success_rates(model, tok, reqs)
    print("pre", pre, flush=True)
    results = {"n": len(reqs), "pre": pre, "runs": []}
    by_L = {}
    for s in layer_sets:
        by_L.setdefault(max(s), []).append(s)
    for L, sets in by_L.items():
        hz = hp.replace(layers=[L])
        t1 = time.time()
        targets = compute_targets(model, tok, reqs, hz, flatten(groups), cache=TargetCache(args.z_cache))
        zs = time.time() - t1
        print(f"z at layer {L}: {zs:.0f} s, mean steps {sum(t.n_adam_steps for t in targets) / len(targets):.1f}", flush=True)
        for s in sets:
            for lam in lambdas:
                h = hp.replace(layers=s, mom2_update_weight=lam)
                orig = {n: p.detach().clone() for n, p in model.named_parameters() if "down_proj" in n}
                deltas, _ = apply_memit_batch(model, tok, reqs, h, groups, C, targets=targets, keep_intermediates=False,
                                              progress=False)
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if n in orig:
                            p.copy_(orig[n])
                with deltas_applied(model, deltas):
                    post = success_rates(model, tok, reqs)
                row = {"layers": s, "lambda": lam, "z_seconds": zs, **post}
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from massedit.core.io import atomic_write_json

    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
