"""Benchmark: CounterFact evaluation (probability tests + token accuracies, no generation) on SmolLM2-135M.

    python benchmarks/bench_eval.py --data ../shared/data/counterfact/counterfact_dev.json --num-records 200

Prints wall time and process CPU time of ``massedit.tasks.evaluate.evaluate`` (model already loaded),
prompt/continuation/token counts, throughput, the CPU threads used and the machine load (on a shared machine the
wall time depends on the other processes; with ``--threads 1`` the CPU time is the compute the evaluation needs); ``--compare-plain`` also times the one-row-per-continuation
path (no prefix sharing).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/counterfact/counterfact_dev.json")
    ap.add_argument("--num-records", type=int, default=200)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=256, help="prompt groups per forward")
    ap.add_argument("--row-tokens", type=int, default=128, help="tokens per prefix-tree row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scoring", default="auto", choices=["auto", "packed", "plain"])
    ap.add_argument("--compare-plain", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None, help="also write the pre-edit report (summary.json, per_case.jsonl) here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from massedit.core.models import load_model_and_tokenizer
    from massedit.data.requests import load_requests
    from massedit.evaluation.report import write_report
    from massedit.tasks.evaluate import evaluate
    from massedit.trainer import TrainerConfig

    model, tok = load_model_and_tokenizer({"name_or_path": args.model, "dtype": args.dtype}, device=args.device)
    reqs = load_requests(args.data, num_edits=args.num_records)
    n_prompts = sum(1 + len(r.paraphrase_prompts) + len(r.neighborhood_prompts) for r in reqs)
    cfg = {"generation": False, "batch_size": args.batch_size, "row_tokens": args.row_tokens, "scoring": args.scoring}
    quiet = TrainerConfig(enable_progress_bar=False)
    load0 = os.getloadavg()[0]
    c0, t0 = time.process_time(), time.perf_counter()
    res = evaluate(model, tok, reqs, cfg, stage="pre", trainer_cfg=quiet)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {
        "records": len(reqs), "prompts": n_prompts, "scored_continuations": res.info["n_branches"],
        "packed_sequences": res.info["n_groups"], "scoring": res.info["scoring"], "seconds": round(dt, 2),
        "prompts_per_s": round(n_prompts / dt, 1), "threads": torch.get_num_threads(),
        "process_cpu_seconds": round(cpu, 2),
        "tokens_forwarded": res.info.get("tokens_forwarded"), "tokens_unshared": res.info.get("tokens_unshared"),
        "cpu": platform.processor() or platform.machine(), "device": args.device, "dtype": args.dtype, "load_avg_1min_before": load0,
        "load_avg_1min_after": os.getloadavg()[0], "cpu_count": os.cpu_count(),
        "summary": {k: (None if v is None else round(v, 2)) for k, v in res.summary.items()},
    }
    if args.compare_plain:
        t0 = time.perf_counter()
        evaluate(model, tok, reqs, {**cfg, "scoring": "plain"}, stage="pre", trainer_cfg=quiet)
        out["seconds_plain"] = round(time.perf_counter() - t0, 2)
    if args.out:
        print(write_report(res, None, args.out, title=f"{args.model} on {os.path.basename(args.data)} (first {len(reqs)} records)"))
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
