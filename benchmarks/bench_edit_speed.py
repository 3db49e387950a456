#!/usr/bin/env python
"""Edit speed on SmolLM2-135M: the target optimisation with whole rows every step (``targets_forward=full``) vs
only the changing suffix (``suffix``), in one run, on the same requests, statistics and context templates.

    python benchmarks/bench_edit_speed.py --data /work/shared/data/counterfact/counterfact_dev.json --n 20
    python benchmarks/bench_edit_speed.py --data ... --n 4 --rome-n 2 --threads 2            # quick check
    python benchmarks/bench_edit_speed.py --data ... --device cuda --autocast bf16 --json out.json
    python benchmarks/bench_edit_speed.py --data ... --n 4 --profile-steps 4 --skip-edits    # z-step profile only

Workloads: MEMIT (z + keys + solve, one batch of the first ``--n`` CounterFact records; in the ``full`` mode the keys
are also read by a whole forward per layer, in ``suffix`` mode from the stream kept between layers) and ROME
(``--rome-n`` sequential edits). Hyper-parameters and second-moment statistics: the SmolLM2 fixture's (``--fixtures``:
hparams_{memit,rome}.json, i.e. layers 4-8 / lambda 15000 / 25 steps and layer 6 / 20 steps, and the
reference-layout ``stats/``), so no corpus is collected. Context templates are sampled once (seed 0) and shared by
both modes. Reported per workload and mode: seconds (MEMIT also z / keys / solve), edits/s, the full/suffix time
ratio, the max relative difference of the deltas (Frobenius, per weight), max |Δz| (MEMIT z / ROME v*), step-count
agreement, and the peak RSS (CPU, sampled) or peak CUDA memory while that mode ran.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _default_fixtures() -> Path:
    for cand in ([Path(os.environ["MASSEDIT_SHARED"])] if os.environ.get("MASSEDIT_SHARED") else []) + \
            [REPO.parent / "shared", REPO / "shared", Path("/work/shared")]:
        if (cand / "fixtures" / "smollm2").is_dir():
            return cand / "fixtures" / "smollm2"
    return REPO.parent / "shared" / "fixtures" / "smollm2"


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak resident memory (sampled from /proc every 10 ms) or peak CUDA allocation while the block runs (MiB)."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self._rss()
            self._t = threading.Thread(target=self._sample, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._t.join()
            self.peak = max(self.peak, self._rss())


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_memit(model, tok, reqs, hp, groups, C, device):
    from massedit.editing.memit import apply_memit

    with PeakMemory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        deltas, info = apply_memit(model, tok, reqs, hp, groups, C, progress=False)
        _sync(device)
        wall = time.perf_counter() - t0
    inter = info["batches"][0]
    timing = inter["timing_per_rank"][0]
    return {"seconds": wall, "z_s": timing.get("z_s"), "keys_s": timing.get("keys_s"), "solve_s": timing.get("solve_s"),
            "peak_mib": mem.peak, "deltas": deltas, "vectors": [r["z"] for r in inter["requests"]],
            "steps": [r["n_adam_steps"] for r in inter["requests"]]}


def run_rome(model, tok, reqs, hp, templates, C, device):
    from massedit.editing.rome import apply_rome

    with PeakMemory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        deltas, inters = apply_rome(model, tok, reqs, hp, templates, C, progress=False)
        _sync(device)
        wall = time.perf_counter() - t0
    return {"seconds": wall, "peak_mib": mem.peak, "deltas": deltas, "vectors": [i["v_star"] for i in inters],
            "steps": [i["n_adam_steps"] for i in inters]}


def compare(work: str, n: int, res: dict) -> dict:
    full, suf = res["full"], res["suffix"]
    row = {"workload": work, "n_edits": n}
    for mode in ("full", "suffix"):
        r = res[mode]
        row[f"{mode}_s"] = round(r["seconds"], 2)
        row[f"{mode}_edits_per_s"] = round(n / r["seconds"], 4)
        row[f"{mode}_peak_mib"] = round(r["peak_mib"], 1)
        for k in ("z_s", "keys_s", "solve_s"):
            if r.get(k) is not None:
                row[f"{mode}_{k}"] = r[k]
    row["ratio_full_over_suffix"] = round(full["seconds"] / suf["seconds"], 2)
    if full.get("z_s") and suf.get("z_s"):
        row["z_ratio"] = round(full["z_s"] / suf["z_s"], 2)
    row["max_rel_delta_diff"] = max(_rel(suf["deltas"][k], full["deltas"][k]) for k in full["deltas"])
    row["max_abs_vector_diff"] = max(float((a.double() - b.double()).abs().max()) for a, b in zip(suf["vectors"], full["vectors"]))
    row["max_rel_vector_diff"] = max(_rel(a, b) for a, b in zip(suf["vectors"], full["vectors"]))
    row["same_step_counts"] = f"{sum(a == b for a, b in zip(suf['steps'], full['steps']))}/{len(full['steps'])}"
    row["mean_adam_steps"] = sum(full["steps"]) / max(1, len(full["steps"]))
    return row


def print_table(rows: list[dict]) -> None:
    cols = [("workload", "workload"), ("n", "n_edits"), ("full s", "full_s"), ("suffix s", "suffix_s"),
            ("full z s", "full_z_s"), ("suffix z s", "suffix_z_s"), ("full ed/s", "full_edits_per_s"),
            ("suffix ed/s", "suffix_edits_per_s"), ("ratio", "ratio_full_over_suffix"), ("z ratio", "z_ratio"),
            ("max rel ΔW diff", "max_rel_delta_diff"), ("max |Δz|", "max_abs_vector_diff"),
            ("steps equal", "same_step_counts"), ("full peak MiB", "full_peak_mib"),
            ("suffix peak MiB", "suffix_peak_mib")]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4g}"
        return "-" if v is None else str(v)

    table = [[h for h, _ in cols]] + [[fmt(r.get(k)) for _, k in cols] for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
    for j, t in enumerate(table):
        print(" | ".join(c.rjust(w) for c, w in zip(t, widths)))
        if j == 0:
            print("-+-".join("-" * w for w in widths))


def profile_z(model, tok, reqs, hp, templates, steps: int, top: int, out: str | None) -> str:
    """torch.profiler table (top operators by self CPU time) of the suffix-mode z optimisation for ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    from massedit.editing.memit import compute_targets

    hp = hp.replace(v_num_grad_steps=steps, early_stop_loss=0.0, targets_forward="suffix")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() and
                                     str(next(model.parameters()).device).startswith("cuda") else [])
    with profile(activities=acts) as prof:
        compute_targets(model, tok, reqs, hp, templates, progress=False)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    if out:
        Path(out).write_text(table)
    return table


def _mode(hp, mode: str):
    """The hyper-parameters of one benchmark mode: ``"suffix"`` the defaults; ``"full"`` the path before the speed
    work: whole rows every target step (the frozen prefix reused), the model's own attention implementation, and the
    MEMIT keys from a whole forward per layer."""
    if mode == "suffix":
        return hp.replace(targets_forward="suffix")
    return hp.replace(targets_forward="full", keys_reuse_max_gib=0, block_attention="model")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CounterFact JSON (e.g. counterfact_dev.json)")
    ap.add_argument("--n", type=int, default=20, help="MEMIT: requests in the batch")
    ap.add_argument("--rome-n", type=int, default=10, help="ROME: sequential edits (0: skip ROME)")
    ap.add_argument("--fixtures", default=str(_default_fixtures()), help="SmolLM2 fixture folder (hparams, stats)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    ap.add_argument("--dtype", default="float32", help="model dtype: float32 | bfloat16 | float16")
    ap.add_argument("--autocast", default=None, choices=["bf16", "fp16"],
                    help="hp.targets_autocast (CUDA only): frozen forwards under autocast, δ and loss float32")
    ap.add_argument("--steps", type=int, default=None, help="override v_num_grad_steps of both methods")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed 2-step warm-up of each mode")
    ap.add_argument("--profile-steps", type=int, default=0, help="also profile the suffix z step (this many steps)")
    ap.add_argument("--profile-top", type=int, default=20)
    ap.add_argument("--profile-out", default=None, help="write the profile table to this file")
    ap.add_argument("--skip-edits", action="store_true", help="only the profile")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from massedit.core.models import load_model_and_tokenizer
    from massedit.data.requests import load_requests
    from massedit.editing.context_templates import flatten, sample_memit_templates, sample_rome_templates
    from massedit.editing.hparams import load_hparams_file
    from massedit.editing.memit import compute_targets
    from massedit.testing import reference_stats_provider

    fx = Path(args.fixtures)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tok = load_model_and_tokenizer({"name_or_path": "smollm2-135m", "dtype": args.dtype}, device=device)
    hp_m = load_hparams_file(fx / "hparams_memit.json").replace(targets_autocast=args.autocast)
    hp_r = load_hparams_file(fx / "hparams_rome.json").replace(targets_autocast=args.autocast)
    if args.steps:
        hp_m, hp_r = hp_m.replace(v_num_grad_steps=args.steps), hp_r.replace(v_num_grad_steps=args.steps)
    stats = reference_stats_provider(fx / "stats")
    reqs = load_requests(args.data, fmt="counterfact", num_edits=max(args.n, args.rome_n))
    groups = sample_memit_templates(model, tok, hp_m.memit_template_prompts, hp_m.memit_template_length_params, seed=0)
    rows = []
    meta = {"device": str(device), "dtype": args.dtype, "autocast": args.autocast, "threads": args.threads,
            "torch": torch.__version__, "memit_hparams": str(fx / "hparams_memit.json"),
            "rome_hparams": str(fx / "hparams_rome.json"), "templates_seed": 0}
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    if not args.skip_edits:
        C_m = stats(model, tok, hp_m.layers)
        if not args.no_warmup:
            for mode in ("full", "suffix"):
                compute_targets(model, tok, reqs[:1], hp_m.replace(v_num_grad_steps=2, targets_forward=mode),
                                flatten(groups), progress=False)
        # "full": whole rows every z step, the model's attention, and a whole forward per layer for the keys;
        # "suffix": the changing suffix only and the keys' stream advanced between layers (the defaults)
        res = {mode: run_memit(model, tok, reqs[: args.n], _mode(hp_m, mode), groups, C_m, device)
               for mode in ("full", "suffix")}
        rows.append(compare("memit", args.n, res))
        if args.rome_n:
            C_r = stats(model, tok, hp_r.layers)
            templates = sample_rome_templates(model, tok, hp_r.context_template_length_params, seed=0)
            res = {mode: run_rome(model, tok, reqs[: args.rome_n], _mode(hp_r, mode), templates, C_r, device)
                   for mode in ("full", "suffix")}
            rows.append(compare("rome", args.rome_n, res))
        print_table(rows)
    out = {"meta": meta, "rows": rows}
    if args.profile_steps:
        table = profile_z(model, tok, reqs[: args.n], hp_m, flatten(groups), args.profile_steps, args.profile_top,
                          args.profile_out)
        print(f"\nsuffix z optimisation, {args.n} requests, {args.profile_steps} steps (top by self CPU time):")
        print(table)
        out["profile"] = table
    if args.json:
        from massedit.core.io import atomic_write_json

        atomic_write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
