#!/usr/bin/env python
"""Tune MEMIT for SmolLM2 on CounterFact records: z vectors once (cached on disk), then a sweep over the
layer set R (same z layer L) and lambda, measuring efficacy / paraphrase / neighbourhood success directly
(mean-token NLL of target_new vs target_true, REFERENCE_SPEC §4.3).

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
from massedit.core.tokenization import encode, target_token_ids, with_leading_space  # noqa: E402


@torch.no_grad()
def mean_nll(model, tok, pairs, batch=64):
    """Mean per-token NLL of ``" " + target`` after each prompt."""
    out = []
    pad = tok.pad_token_id
    for s in range(0, len(pairs), batch):
        rows, spans = [], []
        for p, t in pairs[s : s + batch]:
            a, y = encode(tok, p), target_token_ids(tok, with_leading_space(t))
            rows.append(a + y)
            spans.append((len(a), y))
        w = max(map(len, rows))
        ids = torch.full((len(rows), w), pad)
        mask = torch.zeros((len(rows), w), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        from massedit.core.adapters import get_adapter
        from massedit.core.nethook import Trace

        ad = get_adapter(model)
        with Trace(model, ad.block_name(ad.num_layers - 1), stop=True) as tr:  # logits only where they are read
            model(input_ids=ids, attention_mask=mask)
        h = ad.block_hidden(tr.output)
        for i, (n, y) in enumerate(spans):
            lp = torch.log_softmax(ad.unembed(h[i, n - 1 : n - 1 + len(y)]).float(), -1)
            out.append(-float(sum(lp[j, t] for j, t in enumerate(y))) / len(y))
    return out


def success_rates(model, tok, reqs):
    """ES, PS, NS (%) as in the reference: per record mean of [NLL(new) < NLL(true)] (NS: the reverse)."""
    def rate(prompts_of, invert):
        pairs, owners = [], []
        for k, r in enumerate(reqs):
            for p in prompts_of(r):
                pairs += [(p, r.target_new), (p, r.target_true)]
                owners.append(k)
        nll = mean_nll(model, tok, pairs)
        per = {}
        for j, k in enumerate(owners):
            new, true = nll[2 * j], nll[2 * j + 1]
            ok = (true < new) if invert else (new < true)
            per.setdefault(k, []).append(float(ok))
        return 100 * sum(sum(v) / len(v) for v in per.values()) / len(per)

    return {"ES": rate(lambda r: [r.filled_prompt], False),
            "PS": rate(lambda r: r.paraphrase_prompts, False),
            "NS": rate(lambda r: r.neighborhood_prompts, True)}


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

    from massedit.config import compose
    from massedit.core.models import load_model_and_tokenizer
    from massedit.data.requests import load_requests
    from massedit.editing.context_templates import sample_memit_templates
    from massedit.editing.hparams import load_hparams_file, resolve_hparams_path
    from massedit.editing.memit import apply_memit_batch, compute_targets
    from massedit.editing.romemit_common import TargetCache
    from massedit.stats import get_second_moments

    hp = load_hparams_file(resolve_hparams_path(args.hparams, "memit", "smollm2-135m"))
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
        from massedit.editing.context_templates import flatten

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
