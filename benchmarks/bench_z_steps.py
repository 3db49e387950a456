#!/usr/bin/env python
"""Where MEMIT's z time goes on SmolLM2: the once-per-group setup against the cost of one Adam step.

    python benchmarks/bench_z_steps.py --data ../shared/data/counterfact/counterfact_dev.json --n 20
    python benchmarks/bench_z_steps.py --data ... --n 80 --step-tokens 2048 600    # also: groups of <= 600 tokens

The z optimisation of the first ``--n`` CounterFact records runs with 1, 2 and ``--steps`` Adam steps (early stop
off, so every request takes every step). The 1-step run is the setup (the forwards over the distinct prefixes up to
the edit point and above it, the lane layout) plus one forward; the cost of a further step (forward + backward + Adam) is
``(t(steps) - t(2)) / (steps - 2)``. Also printed: the suffix tokens of each group and the loss positions, from
which a step's FLOPs follow. Hyper-parameters: the SmolLM2 fixture's ``hparams_memit.json`` (as
``bench_edit_speed.py``); context templates sampled once (seed 0); no cache. Also printed: the rows, their positions
before the suffix and how many distinct prefixes those are (the prefix pass runs each once).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv=None):
    from bench_edit_speed import _default_fixtures

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CounterFact JSON (e.g. counterfact_dev.json)")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--step-tokens", type=int, nargs="+", default=[2048],
                    help="hp.targets_step_tokens values (suffix tokens per group)")
    ap.add_argument("--fixtures", default=str(_default_fixtures()))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.steps < 3:
        ap.error("--steps must be >= 3")
    torch.set_num_threads(args.threads)

    from massedit.core.models import load_model_and_tokenizer
    from massedit.data.requests import load_requests
    from massedit.editing.context_templates import flatten, sample_memit_templates
    from massedit.editing.hparams import load_hparams_file
    from massedit.editing.memit import compute_targets
    from massedit.editing.prefix_forest import build_forest
    from massedit.editing.targets import _group_by_step_tokens, build_target_problem, suffix_spans

    model, tok = load_model_and_tokenizer({"name_or_path": "smollm2-135m"}, device="cpu")
    hp = load_hparams_file(Path(args.fixtures) / "hparams_memit.json")
    reqs = load_requests(args.data, fmt="counterfact", num_edits=args.n)
    templates = flatten(sample_memit_templates(model, tok, hp.memit_template_prompts, hp.memit_template_length_params,
                                               seed=0))
    problems = [build_target_problem(tok, r, templates, hp.fact_token, hp.teacher_forcing, hp.kl_prompt) for r in reqs]
    compute_targets(model, tok, reqs[:1], hp.replace(v_num_grad_steps=2), templates, progress=False)  # warm-up
    rows = []
    for mt in args.step_tokens:
        order = sorted(range(len(problems)), key=lambda i: (problems[i].max_len, i))
        groups = _group_by_step_tokens(problems, order, mt)
        tokens = [sum(e - s for i in g for s, e in suffix_spans(problems[i])) for g in groups]
        n_rows = sum(p.n_rows for p in problems)
        starts = [a for p in problems for a, _ in suffix_spans(p)]
        distinct = 0  # the prefix pass's slots, group by group
        for grp in groups:
            distinct += build_forest([r for i in grp for r in problems[i].input_ids],
                                     [a for i in grp for a, _ in suffix_spans(problems[i])], 128, 0).n_slots
        loss_positions = sum(p.n_rewrite * len(p.target_ids) + p.n_rows - p.n_rewrite for p in problems)
        t = {}
        for steps in (1, 2, args.steps):
            h = hp.replace(v_num_grad_steps=steps, early_stop_loss=0.0, targets_step_tokens=mt)
            t0 = time.perf_counter()
            compute_targets(model, tok, reqs, h, templates, progress=False)
            t[steps] = time.perf_counter() - t0
        per_step = (t[args.steps] - t[2]) / (args.steps - 2)
        row = {"n": args.n, "step_tokens": mt, "groups": len(groups), "suffix_tokens_per_group": tokens,
               "loss_positions": loss_positions, "rows": n_rows, "prefix_positions": sum(starts),
               "distinct_prefixes": distinct, "t_1_step_s": round(t[1], 2), "t_2_steps_s": round(t[2], 2),
               f"t_{args.steps}_steps_s": round(t[args.steps], 2), "per_step_s": round(per_step, 3),
               "setup_plus_first_forward_s": round(t[1], 2)}
        rows.append(row)
        print(f"n={args.n} step_tokens={mt}: {len(groups)} group(s), suffix tokens {tokens}, "
              f"{loss_positions} loss positions; {n_rows} rows, {sum(starts)} prefix positions, {distinct} distinct "
              f"prefixes | 1 step {t[1]:.2f} s (setup + one forward), 2 steps {t[2]:.2f} s, "
              f"{args.steps} steps {t[args.steps]:.2f} s -> {per_step:.3f} s a further step", flush=True)
    if args.json:
        from massedit.core.io import atomic_write_json

        atomic_write_json(args.json, {"threads": args.threads, "torch": torch.__version__, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
