"""Benchmark: the evaluation's generation metrics (fluency texts) with cases sampled one by one vs in batches.

    python benchmarks/bench_generation.py --data ../shared/data/counterfact/counterfact_dev.json \
        --offset 200 --num-records 16 --lone 4 --batch-cases 16

Times :func:`massedit.tasks.evaluate.evaluate` with generation on every case (``generation_every_k=1``) and the
probability tests as usual, once with ``eval.generation_batch_cases=1`` on the first ``--lone`` records and once
with ``--batch-cases`` on all ``--num-records``; prints seconds per case for both (the scoring part is the same
per case in both runs; ``--no-scoring`` is not offered because the evaluation always scores), and whether the
texts of the records in both runs are identical (the batch size changes only float rounding).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/counterfact/counterfact_dev.json")
    ap.add_argument("--offset", type=int, default=200)
    ap.add_argument("--num-records", type=int, default=16)
    ap.add_argument("--lone", type=int, default=4, help="records of the one-case-at-a-time run (its first ones)")
    ap.add_argument("--batch-cases", type=int, default=16)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from massedit.core.models import load_model_and_tokenizer
    from massedit.data.requests import load_requests
    from massedit.evaluation.config import EvalConfig
    from massedit.tasks.evaluate import evaluate

    model, tok = load_model_and_tokenizer(args.model, device="cpu")
    reqs = load_requests(args.data, offset=args.offset, num_edits=args.num_records)
    runs, texts = {}, {}
    for name, bc, rq in (("lone", 1, reqs[: args.lone]), ("batched", args.batch_cases, reqs)):
        cfg = EvalConfig(generation=True, generation_every_k=1, cache_pre=False, generation_batch_cases=bc)
        t0 = time.time()
        res = evaluate(model, tok, rq, cfg, stage="pre")
        dt = time.time() - t0
        runs[name] = {"generation_batch_cases": bc, "cases": len(rq), "seconds": round(dt, 1),
                      "seconds_per_case": round(dt / len(rq), 2), "fluency": res.summary["fluency"]}
        texts[name] = [c["generations"] for c in res.per_case]
    same = sum(a == b for a, b in zip(texts["lone"], texts["batched"]))
    out = {"runs": runs, "speedup_per_case": round(runs["lone"]["seconds_per_case"] / runs["batched"]["seconds_per_case"], 2),
           "identical_texts": f"{same}/{len(texts['lone'])}", "threads": args.threads,
           "load": os.getloadavg() if hasattr(os, "getloadavg") else None}
    print(json.dumps(out, indent=2))
    if args.json:
        from massedit.core.io import atomic_write_json

        atomic_write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
