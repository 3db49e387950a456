#!/usr/bin/env python
"""Held-out comparison: trained MEND editor vs the untrained editor vs single plain gradient steps.

    OMP_NUM_THREADS=1 python benchmarks/mend_compare.py \
        --editor outputs/mend-smollm2-zsre/mend_editor.pt \
        --data ../shared/data/zsre/zsre_eval_dev.json --n 100 --out outputs/mend_compare.json

Conditions (all edit the same weights, the editor's inner parameters):
* ``mend_trained``   the checkpoint.
* ``mend_untrained`` identity-initialised editor with the initial ``edit_lr`` and the checkpoint's
  normalisation statistics (data statistics, not learned weights): the editor at step 0 of training.
* ``gd_lr=η``        one plain gradient-descent step ``W ← W − η ∇W L`` on the same loss (mean target NLL),
  for each η of ``--gd-lrs``; the best η (picked on these very requests, favouring the baseline) is reported.

``--mode single`` (default): each request is edited alone (what MEND is trained for), evaluated, reverted;
the factors are captured once per request and shared by all conditions. ``--mode concurrent``: all
requests edited at once (REFERENCE_SPEC §5.6). Metrics: the shared evaluation (REFERENCE_SPEC §4, the one the edit
job reports, :mod:`massedit.tasks.evaluate`, without generation): zsRE teacher-forced token accuracy ×100
(efficacy / paraphrase / neighbourhood); in single mode the mean over requests of each request's own evaluation.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from massedit.core.deltas import deltas_applied  # noqa: E402
from massedit.core.io import atomic_write_json  # noqa: E402
from massedit.core.models import load_model_and_tokenizer  # noqa: E402
from massedit.data.requests import load_requests  # noqa: E402
from massedit.editing.mend import (MendNet, MendNetConfig, build_edit_batch, capture_factors, load_editor,  # noqa: E402
                                   masked_nll, mend_deltas)
from massedit.editing.mend.editor import deltas_from_factors  # noqa: E402
from massedit.evaluation.config import EvalConfig  # noqa: E402
from massedit.tasks.evaluate import evaluation_components, evaluation_stage  # noqa: E402
from massedit.trainer import TrainerConfig, build_trainer  # noqa: E402

METRICS = ("efficacy_acc", "paraphrase_acc", "neighborhood_acc")
EVAL = EvalConfig(generation=False)


def untrained_like(net: MendNet) -> MendNet:
    """Fresh identity editor with ``net``'s normalisation statistics."""
    fresh = MendNet(net.inner, net.config).to(net.edit_lrs.device)
    sd = {k: v for k, v in net.state_dict().items() if "_norm." in k}
    fresh.load_state_dict(sd, strict=False)
    return fresh.eval()


def gd_net(net: MendNet, lr: float) -> MendNet:
    """Identity editor without normalisation: ΔW = −lr ∇W L (a plain gradient step)."""
    return MendNet(net.inner, MendNetConfig(norm=False, rank=1, edit_lr=lr, update_sign=-1.0)).eval()


def accuracies(trainer, model, tok, requests) -> dict[str, float]:
    """The three token accuracies (×100) of the shared evaluation of ``model`` as it is now on ``requests``."""
    module, dm = evaluation_components(model, tok, requests, EVAL)
    summary = evaluation_stage(trainer, module, dm, "pre").summary
    return {k: float("nan") if summary.get(k) is None else float(summary[k]) for k in METRICS}


def mean_rows(rows: list[dict]) -> dict[str, float]:
    keys = rows[0].keys()
    out = {}
    for key in keys:
        vals = [r[key] for r in rows if r[key] == r[key]]
        out[key] = sum(vals) / len(vals) if vals else float("nan")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", required=True, help="mend_editor.pt or a MEND Lightning .ckpt")
    ap.add_argument("--data", default="../shared/data/zsre/zsre_eval_dev.json")
    ap.add_argument("--format", default="auto")
    ap.add_argument("--zsre-target", default="answers", choices=["answers", "alt"])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--gd-lrs", type=float, nargs="+", default=[0.1, 1.0, 10.0])
    ap.add_argument("--mode", choices=["single", "concurrent"], default="single")
    ap.add_argument("--concurrent-loss", default="request_sum", choices=["request_sum", "tokens_mean"])
    ap.add_argument("--lr-scale", type=float, default=1.0, help="method.lr_scale for the MEND editors")
    ap.add_argument("--only", nargs="+", default=None, help="conditions to run (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="outputs/mend_compare.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tok = load_model_and_tokenizer({"name_or_path": args.model, "dtype": "float32"})
    reqs = load_requests(args.data, fmt=args.format, num_edits=args.n, offset=args.offset, skip_invalid=True,
                         zsre_target=args.zsre_target)
    trained = load_editor(args.editor, model).eval()
    nets = {"mend_trained": trained, "mend_untrained": untrained_like(trained)}
    nets.update({f"gd_lr={lr:g}": gd_net(trained, lr) for lr in args.gd_lrs})
    if args.only:
        nets = {k: v for k, v in nets.items() if k in args.only}
    scales = {k: (args.lr_scale if k.startswith("mend") else 1.0) for k in nets}
    trainer = build_trainer(TrainerConfig(accelerator="cpu", enable_progress_bar=False))  # one Trainer, every evaluation
    t0 = time.time()
    if args.mode == "single":
        rows: dict[str, list[dict]] = {"pre": []}
        for i, r in enumerate(reqs):
            b = build_edit_batch(tok, [r.filled_prompt], [r.target_new])
            _, f = capture_factors(model, trained.inner,
                                   lambda: masked_nll(model(**b.model_inputs()).logits, b.labels),
                                   row_mask=b.attention_mask)
            rows["pre"].append(accuracies(trainer, model, tok, [r]))
            for name, net in nets.items():
                with deltas_applied(model, deltas_from_factors(net, f, scales[name])):
                    rows.setdefault(name, []).append(accuracies(trainer, model, tok, [r]))
            if (i + 1) % 10 == 0:
                print(f"[{i + 1}/{len(reqs)}] {time.time() - t0:.0f}s "
                      + " ".join(f"{k}:{mean_rows(v)['efficacy_acc']:.1f}" for k, v in rows.items()), flush=True)
        summary = {k: mean_rows(v) for k, v in rows.items()}
    else:
        summary = {"pre": accuracies(trainer, model, tok, reqs)}
        for name, net in nets.items():
            d = mend_deltas(model, tok, net, reqs, chunk_size=64, concurrent_loss=args.concurrent_loss,
                            lr_scale=scales[name])
            with deltas_applied(model, d):
                summary[name] = accuracies(trainer, model, tok, reqs)
            print(name, summary[name], flush=True)
    gd = {k: v for k, v in summary.items() if k.startswith("gd_")}
    best_gd = max(gd, key=lambda k: (gd[k]["efficacy_acc"] + gd[k]["paraphrase_acc"]) / 2) if gd else None
    result = {"mode": args.mode, "n": len(reqs), "concurrent_loss": args.concurrent_loss, "lr_scale": args.lr_scale, "data": args.data, "zsre_target": args.zsre_target,
              "editor": args.editor, "seconds": time.time() - t0, "best_gd": best_gd, "summary": summary}
    atomic_write_json(args.out, result)
    print(f"\n{args.mode} editing of {len(reqs)} requests ({time.time() - t0:.0f} s); token accuracy x100")
    print(f"{'condition':18s} {'efficacy':>9s} {'paraphrase':>11s} {'neighbourhood':>14s}")
    for k, v in summary.items():
        mark = "  <- best GD" if k == best_gd else ""
        print(f"{k:18s} {v['efficacy_acc']:9.1f} {v['paraphrase_acc']:11.1f} {v['neighborhood_acc']:14.1f}{mark}")
    return result


if __name__ == "__main__":
    main()
