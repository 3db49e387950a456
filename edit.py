#!/usr/bin/env python
"""massedit main job: edit a model's factual memory and evaluate it before and after.

    python edit.py                                  # MEMIT on SmolLM2 over the built-in request set
    python edit.py method=rome data=counterfact data.num_edits=100
    python edit.py mode=eval deltas=outputs/<run>/deltas.safetensors   # evaluate a saved edit
    python edit.py --help
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("massedit.edit")


def pick_device(cfg):
    import torch

    acc = str(cfg.trainer.get("accelerator", "auto"))
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def show_predictions(model, tok, requests, run, title: str, limit: int = 10) -> None:
    """A readable table of what the model predicts for the first requests' prompts."""
    from rich.console import Console
    from rich.table import Table

    from massedit.core.predict import next_token_topk, target_probability

    reqs = requests[:limit]
    top = next_token_topk(model, tok, [r.filled_prompt for r in reqs], k=1)
    table = Table(title=title)
    for col in ("case", "prompt", "top-1 next token", "P(target_true)", "P(target_new)"):
        table.add_column(col)
    rows = []
    for r, t in zip(reqs, top):
        pt = target_probability(model, tok, r.filled_prompt, r.target_true) if r.target_true else float("nan")
        pn = target_probability(model, tok, r.filled_prompt, r.target_new)
        row = {"case_id": r.case_id, "prompt": r.filled_prompt, "top1": t[0][0], "p_top1": t[0][1],
               "target_true": r.target_true, "p_true": pt, "target_new": r.target_new, "p_new": pn}
        rows.append(row)
        table.add_row(str(r.case_id), r.filled_prompt, f"{t[0][0]!r} ({t[0][1]:.2f})",
                      f"{r.target_true!r} {pt:.3f}", f"{r.target_new!r} {pn:.3f}")
    Console(stderr=False).print(table)
    run.save_json(f"predictions_{title.split()[0].lower()}.json", rows)


def _evaluation():
    try:
        from massedit.evaluation import evaluate, write_report  # noqa: F401
    except ImportError:
        return None
    return evaluate, write_report


def main(cfg) -> dict:
    from massedit.core.deltas import apply_deltas, delta_norms, load_deltas, save_deltas
    from massedit.core.models import load_model_and_tokenizer
    from massedit.data.requests import load_requests_from_config
    from massedit.methods import build_editor
    from massedit.runs import setup_run

    run = setup_run(cfg)
    try:
        if cfg.mode == "eval":
            from massedit.evaluation import run_eval_only

            return run_eval_only(cfg, run)
        if cfg.mode != "edit":
            raise ValueError(f"mode must be 'edit' or 'eval', got {cfg.mode!r}")
        requests = load_requests_from_config(cfg.data)
        log.info("%d edit requests from %s", len(requests), cfg.data.path)
        model, tok = load_model_and_tokenizer(cfg.model, device=pick_device(cfg))
        ev = _evaluation()
        pre = None
        if ev is not None and cfg.eval.get("pre", True):
            pre = ev[0](model, tok, requests, cfg.eval, stage="pre", trainer_kwargs=dict(cfg.trainer))
        elif ev is None:
            show_predictions(model, tok, requests, run, "Pre-edit predictions")
        t0 = time.time()
        if cfg.get("deltas"):
            deltas = load_deltas(cfg.deltas)
            log.info("re-applying saved deltas from %s", cfg.deltas)
        else:
            editor = build_editor(cfg, run)
            deltas = editor.edit(model, tok, requests)
        edit_s = time.time() - t0
        log.info("edit took %.1f s; delta norms: %s", edit_s, {k: round(v, 3) for k, v in delta_norms(deltas).items()})
        if cfg.get("save_deltas", True):
            path = save_deltas(run.dir / "deltas.safetensors", deltas,
                               {"method": cfg.method.name, "model": cfg.model.name_or_path, "num_requests": len(requests)})
            log.info("saved deltas to %s", path)
        apply_deltas(model, deltas)
        results = {"edit_seconds": edit_s, "num_requests": len(requests), "delta_norms": delta_norms(deltas)}
        if ev is not None and cfg.eval.get("post", True):
            post = ev[0](model, tok, requests, cfg.eval, stage="post", trainer_kwargs=dict(cfg.trainer))
            table = ev[1](pre, post, run.dir, logger=run.logger, title=f"{cfg.method.name} on {cfg.model.name}")
            results["table"] = table
            results["post"] = post.summary
            results["pre"] = pre.summary if pre is not None else None
        else:
            show_predictions(model, tok, requests, run, "Post-edit predictions")
        run.save_json("results.json", {k: v for k, v in results.items() if k != "table"})
        run.log_summary({"edit_seconds": edit_s})
        print(f"\nOutputs written to {run.dir}")
        return results
    finally:
        run.finish()


if __name__ == "__main__":
    from massedit.cli import run_cli

    sys.exit(run_cli("edit", "edit.py", main))
