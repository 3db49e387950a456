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
requests edited at once (REFERENCE_SPEC §5.6). Metrics: zsRE teacher-forced token accuracy ×100
(efficacy / paraphrase / neighbourhood, :mod:`massedit.editing.mend.quick_eval`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
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
from massedit.editing.mend.quick_eval import _neighbourhood_pairs, quick_metrics  # noqa: E402


def untrained_like(net: MendNet) -> MendNet:
    """Fresh identity editor with ``net``'s normalisation statistics."""
    fresh = MendNet(net.inner, net.config).to(net.edit_lrs.device)
    sd = {k: v for k, v in net.state_dict().items() if "_norm." in k}
    fresh.load_state_dict(sd, strict=False)
    return fresh.eval()


def gd_net(net: MendNet, lr: float) -> MendNet:
    """Identity editor without normalisation: ΔW = −lr ∇W L (a plain gradient step)."""
    return MendNet(net.inner, MendNetConfig(norm=False, rank=1, edit_lr=lr, update_sign=-1.0)).eval()


class _Replay(torch.nn.Module):
    """Stands in for a lower (unedited) block: returns the recorded output of the last unedited block."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


@contextlib.contextmanager
def replay_unedited_blocks(model, first_edited: int, batch):
    """Speed-up for evaluating many edits of the top layers on the same inputs: run the blocks below
    ``first_edited`` once for ``batch``, then replay their output (exact: those weights never change)."""
    from massedit.core.adapters import get_adapter
    from massedit.core.nethook import Trace

    a = get_adapter(model)
    if first_edited == 0:
        yield
        return
    with torch.no_grad(), Trace(model, a.block_name(first_edited - 1), retain_output=True, stop=True) as tr:
        model(**batch.model_inputs(), use_cache=False)
    saved = []
    for i in range(first_edited):
        parent_name, child = a.block_name(i).rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        saved.append((parent, child, getattr(parent, child)))
        setattr(parent, child, _Replay(tr.output))
    try:
        yield
    finally:
        for parent, child, mod in saved:
            setattr(parent, child, mod)


def first_edited_layer(model, net: MendNet) -> int:
    from massedit.core.adapters import get_adapter

    a = get_adapter(model)
    layers = [i for i in range(a.num_layers) for p in net.inner if p.module.startswith(a.block_name(i) + ".")]
    return min(layers)


def request_batch(tok, r):
    prompts = [r.filled_prompt] + list(r.paraphrase_prompts)
    targets = [r.target_new] * len(prompts)
    nb = _neighbourhood_pairs(r)
    return build_edit_batch(tok, prompts + [p for p, _ in nb], targets + [t for _, t in nb]), len(prompts)


@torch.no_grad()
def eval_request(model, tok, r, batch=None) -> dict[str, float]:
    b, k = request_batch(tok, r) if batch is None else batch
    logits = model(**b.model_inputs(), use_cache=False).logits
    pred, tgt = logits[:, :-1].argmax(-1), b.labels[:, 1:]
    mask = tgt != -100
    acc = (((pred == tgt) & mask).sum(-1).float() / mask.sum(-1).clamp_min(1)).tolist()
    return {"efficacy_acc": 100 * acc[0],
            "paraphrase_acc": 100 * sum(acc[1:k]) / max(1, k - 1) if k > 1 else float("nan"),
            "neighborhood_acc": 100 * sum(acc[k:]) / max(1, len(acc) - k) if len(acc) > k else float("nan")}


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
    ap.add_argument("--no-replay", dest="replay", action="store_false",
                    help="do not reuse the unedited lower blocks' output across conditions (slower, same numbers)")
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
    t0 = time.time()
    first_edited = first_edited_layer(model, trained) if args.replay else 0
    if args.mode == "single":
        rows: dict[str, list[dict]] = {"pre": []}
        for i, r in enumerate(reqs):
            b = build_edit_batch(tok, [r.filled_prompt], [r.target_new])
            _, f = capture_factors(model, trained.inner,
                                   lambda: masked_nll(model(**b.model_inputs()).logits, b.labels),
                                   row_mask=b.attention_mask)
            eb = request_batch(tok, r)
            rows["pre"].append(eval_request(model, tok, r, eb))
            with replay_unedited_blocks(model, first_edited, eb[0]):
                if i == 0:  # self-check of the replay shortcut
                    assert eval_request(model, tok, r, eb) == rows["pre"][0], "block replay changed the result"
                for name, net in nets.items():
                    with deltas_applied(model, deltas_from_factors(net, f, scales[name])):
                        rows.setdefault(name, []).append(eval_request(model, tok, r, eb))
            if (i + 1) % 10 == 0:
                print(f"[{i + 1}/{len(reqs)}] {time.time() - t0:.0f}s "
                      + " ".join(f"{k}:{mean_rows(v)['efficacy_acc']:.1f}" for k, v in rows.items()), flush=True)
        summary = {k: mean_rows(v) for k, v in rows.items()}
    else:
        summary = {"pre": quick_metrics(model, tok, reqs)}
        for name, net in nets.items():
            d = mend_deltas(model, tok, net, reqs, chunk_size=64, concurrent_loss=args.concurrent_loss,
                            lr_scale=scales[name])
            with deltas_applied(model, d):
                summary[name] = quick_metrics(model, tok, reqs)
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
