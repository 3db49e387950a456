#!/usr/bin/env python
"""Time to apply N (default 1,000) concurrent edits with a trained MEND editor on SmolLM2.

    OMP_NUM_THREADS=1 python benchmarks/bench_mend.py --editor outputs/mend-smollm2-zsre/mend_editor.pt \
        --data ../shared/data/counterfact/counterfact_reduced_train.json --n 1000

Measures (wall clock, after loading): computing the deltas of all N requests together (factor capture in
chunks of ``--chunk`` requests + editor + pseudo-gradient accumulation, REFERENCE_SPEC §5.6) and writing
them into the weights (``apply_deltas``). Without ``--editor`` an untrained editor is timed (same cost).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from massedit.core.deltas import apply_deltas, delta_norms, revert_deltas  # noqa: E402
from massedit.core.io import atomic_write_json  # noqa: E402
from massedit.core.models import load_model_and_tokenizer  # noqa: E402
from massedit.data.requests import load_requests  # noqa: E402
from massedit.editing.mend import build_mend_net, load_editor, mend_deltas  # noqa: E402
from massedit.tasks.config import compose  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", default=None)
    ap.add_argument("--data", default="../shared/data/counterfact/counterfact_reduced_train.json")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="outputs/bench_mend.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tok = load_model_and_tokenizer({"name_or_path": args.model, "dtype": "float32"})
    reqs = load_requests(args.data, num_edits=args.n, skip_invalid=True)
    if args.editor:
        net = load_editor(args.editor, model)
    else:  # the configured defaults of method=mend (configs/method/mend.yaml over MendConfig)
        net = build_mend_net(model, compose("edit", ["method=mend"]).method)
    net.eval()
    t0 = time.perf_counter()
    deltas = mend_deltas(model, tok, net, reqs, chunk_size=args.chunk, progress=True)
    t_deltas = time.perf_counter() - t0
    t1 = time.perf_counter()
    backup = apply_deltas(model, deltas)
    t_apply = time.perf_counter() - t1
    revert_deltas(model, backup)
    res = {
        "n_requests": len(reqs), "chunk": args.chunk, "threads": args.threads, "editor": args.editor,
        "seconds_deltas": t_deltas, "seconds_apply": t_apply, "seconds_total": t_deltas + t_apply,
        "edits_per_second": len(reqs) / (t_deltas + t_apply), "inner_params": [p.param for p in net.inner],
        "delta_norms": delta_norms(deltas),
        "machine": f"{platform.machine()} {torch.get_num_threads()} thread(s), torch {torch.__version__}",
    }
    atomic_write_json(args.out, res)
    print(f"MEND: {len(reqs)} edits -> deltas in {t_deltas:.1f} s, applied in {t_apply:.3f} s "
          f"({res['edits_per_second']:.1f} edits/s)")
    return res


if __name__ == "__main__":
    main()
