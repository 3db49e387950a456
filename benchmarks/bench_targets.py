#!/usr/bin/env python
"""Time MEMIT's z optimisation on SmolLM2: batched (one padded forward/backward per step for many requests)
vs one request at a time, on the same CounterFact records; prints edits/s, the speed-up and the max
relative difference between the two sets of z vectors.

    python benchmarks/bench_targets.py --data ../shared/data/counterfact/counterfact_dev.json --n 100
    python benchmarks/bench_targets.py --data ... --n 16 --steps 10 --threads 2     # quicker

Same hparams as configs/hparams/memit/smollm2-135m.yaml (override --steps / --max-tokens); templates
sampled once with seed 0. No cache is used.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _device_name(device) -> str:
    import platform

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=None, help="v_num_grad_steps (default: the hparams')")
    ap.add_argument("--max-tokens", type=int, default=None, help="padded tokens per batched forward")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hparams", default="smollm2-135m")
    ap.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    ap.add_argument("--dtype", default="float32", help="model dtype: float32 | bfloat16 | float16")
    ap.add_argument("--no-prefix-reuse", action="store_true",
                    help="recompute the blocks below the z layer at every step (hp.reuse_frozen_prefix=False)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from massedit.core.models import load_model_and_tokenizer
    from massedit.data.requests import load_requests
    from massedit.editing.context_templates import flatten, sample_memit_templates
    from massedit.editing.hparams import load_hparams_file
    from massedit.editing.memit import compute_targets
    from massedit.tasks.config import config_dirs, resolve_hparams_path

    hp = load_hparams_file(resolve_hparams_path(args.hparams, "memit", "smollm2-135m", config_dirs()))
    if args.steps:
        hp = hp.replace(v_num_grad_steps=args.steps)
    if args.no_prefix_reuse:
        hp = hp.replace(reuse_frozen_prefix=False)
    if args.max_tokens:
        hp = hp.replace(targets_max_tokens=args.max_tokens)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tok = load_model_and_tokenizer({"name_or_path": "smollm2-135m", "dtype": args.dtype}, device=device)
    reqs = load_requests(args.data, fmt="counterfact", num_edits=args.n)
    templates = flatten(sample_memit_templates(model, tok, hp.memit_template_prompts, hp.memit_template_length_params, seed=0))
    times, res = {}, {}
    for mode in ("batched", "one_at_a_time"):
        _sync(device)
        t0 = time.perf_counter()
        res[mode] = compute_targets(model, tok, reqs, hp, templates, batched=(mode == "batched"), progress=True)
        _sync(device)
        times[mode] = time.perf_counter() - t0
    diff = max(float((a.target - b.target).norm() / b.target.norm()) for a, b in zip(res["batched"], res["one_at_a_time"]))
    steps_equal = sum(a.n_adam_steps == b.n_adam_steps for a, b in zip(res["batched"], res["one_at_a_time"]))
    out = {
        "n_edits": len(reqs), "v_num_grad_steps": hp.v_num_grad_steps, "targets_max_tokens": hp.targets_max_tokens,
        "threads": args.threads, "device": _device_name(device), "dtype": args.dtype, "reuse_frozen_prefix": hp.reuse_frozen_prefix,
        "batched_s": round(times["batched"], 1), "one_at_a_time_s": round(times["one_at_a_time"], 1),
        "batched_edits_per_s": round(len(reqs) / times["batched"], 3),
        "one_at_a_time_edits_per_s": round(len(reqs) / times["one_at_a_time"], 3),
        "speedup": round(times["one_at_a_time"] / times["batched"], 2),
        "max_rel_diff_z": diff, "same_step_counts": f"{steps_equal}/{len(reqs)}",
        "mean_adam_steps": sum(r.n_adam_steps for r in res["batched"]) / len(reqs),
    }
    print(json.dumps(out, indent=1))
    if args.out:
        from massedit.core.io import atomic_write_json

        atomic_write_json(args.out, out)


if __name__ == "__main__":
    main()
