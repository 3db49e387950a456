#!/usr/bin/env python
"""MEMIT's editing step on 1 rank vs N ranks (Lightning DDP on CPU, gloo), one thread per process.

Runs the main job (``python -m massedit edit``) once per rank count on the same CounterFact records, with the
statistics taken from the cache (collected once before the timed runs), no z cache and no evaluation, and reports
``edit_seconds`` (rank 0's ApplyEdit: templates, z, keys, solve, write — everything the edit does), the speed-up,
the same speed-up from each rank's own CPU seconds in z + keys + solve (the slowest rank: the critical path; it does
not depend on what else runs on the machine), the largest relative difference between the deltas, and the machine
load (``os.getloadavg``) around each run:

    python benchmarks/bench_ddp.py --data ../shared/data/counterfact/counterfact_dev.json --n 8
    python benchmarks/bench_ddp.py --data ... --n 8 --ranks 1 2 --repeats 2 --out bench_ddp.json

Each process gets ``OMP_NUM_THREADS=1`` (one core each), so N ranks use N cores: measure on an otherwise idle
machine. This is a benchmark, not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_job(ranks: int, args, out: Path, extra=()) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MASSEDIT_RUN_DIR", None)
    cmd = [sys.executable, "-m", "massedit", "edit", "data=counterfact", f"data.path={args.data}",
           f"data.num_edits={args.n}", "method=memit", "method.z_cache=false", "logger=none",
           "trainer.accelerator=cpu", f"trainer.devices={ranks}", "trainer.enable_progress_bar=false",
           "eval.pre=false", "eval.post=false", f"output_dir={out}", *args.set, *extra]
    load0 = os.getloadavg()
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"{ranks} rank(s) failed ({p.returncode}):\n{p.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    timing = json.loads((out / "memit_info.json").read_text()).get("timing_per_rank", [[]])[0]
    cpu = [round(sum(t.get(k, 0.0) for k in ("z_cpu_s", "keys_cpu_s", "solve_cpu_s")), 2) for t in timing]
    return {"ranks": ranks, "edit_seconds": res["edit_seconds"], "job_wall_seconds": round(wall, 1),
            "timing_per_rank": timing, "cpu_seconds_per_rank": cpu,
            "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()],
            "targets": res["editor"].get("targets"), "deltas": str(out / "deltas.safetensors")}


def max_rel_diff(a_path: str, b_path: str) -> float:
    sys.path.insert(0, str(REPO))
    from massedit.core.deltas import load_deltas

    a, b = load_deltas(a_path), load_deltas(b_path)
    return max(float((a[k].double() - b[k].double()).norm() / a[k].double().norm()) for k in a)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CounterFact JSON (ROME release format)")
    ap.add_argument("--n", type=int, default=8, help="records (edits)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        tmp = Path(tmp)
        print("statistics (collected once if not cached) ...", flush=True)
        run_job(1, args, tmp / "warm", extra=("data.num_edits=1",))
        runs = []
        for rep in range(args.repeats):
            for r in args.ranks:
                res = run_job(r, args, tmp / f"r{r}_{rep}")
                runs.append(res)
                print(json.dumps({k: v for k, v in res.items() if k != "deltas"}), flush=True)
        base = [x for x in runs if x["ranks"] == args.ranks[0]]
        summary = {"n": args.n, "cpu_count": os.cpu_count(), "runs": [{k: v for k, v in x.items() if k != "deltas"}
                                                                      for x in runs]}
        for r in args.ranks[1:]:
            mine = [x for x in runs if x["ranks"] == r]
            t1, tr = min(x["edit_seconds"] for x in base), min(x["edit_seconds"] for x in mine)
            summary[f"speedup_{r}_ranks"] = round(t1 / tr, 3)
            # the same from each process's own CPU time (z + keys + solve; robust to other load on the machine)
            c1 = min(max(x["cpu_seconds_per_rank"]) for x in base)
            cr = min(max(x["cpu_seconds_per_rank"]) for x in mine)
            summary[f"cpu_critical_path_speedup_{r}_ranks"] = round(c1 / cr, 3)
            summary[f"max_rel_delta_diff_{r}_ranks"] = max_rel_diff(base[0]["deltas"], mine[0]["deltas"])
        print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
