"""FT / FT-L / FT-W as a LightningModule trained with ``Trainer.fit`` (REFERENCE_SPEC §3), and the
``train.py method=ftw`` entry point (:func:`train_main`).

Thin glue: the loss, parameter selection, L∞ projection and optimiser are plain-torch functions in
:mod:`massedit.editing.ft`. The module reproduces the reference loop: ``epochs`` passes over the
requests in batches, no step on a batch whose loss is below ``skip_loss_below``, FT-L projection after
every batch, stop when an epoch's mean loss is below ``stop_loss_below``.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from massedit.core.deltas import apply_deltas, delta_norms, diff_from, revert_deltas, save_deltas
from massedit.editing.ft import (
    FTConfigError,
    effective_weight_decay,
    ft_loss,
    make_optimizer,
    method_options,
    project_to_linf_ball_,
    select_ft_parameters,
)
from massedit.lightning_utils import keep_device, quiet_lightning

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("efficacy_success", "paraphrase_success", "neighborhood_success", "score")


class FTWModule(pl.LightningModule):
    """Fine-tunes ``param_names`` of ``model`` on edit-request batches (see module docstring)."""

    def __init__(self, model: nn.Module, param_names: Sequence[str], originals: Mapping[str, torch.Tensor],
                 opts: Mapping[str, Any], weight_decay: float):
        super().__init__()
        self.model = model
        self.param_names = list(param_names)
        self.originals = dict(originals)
        self.opts = dict(opts)
        self.weight_decay = float(weight_decay)
        self._epoch_losses: list[torch.Tensor] = []
        self.epoch_mean_losses: list[float] = []
        self.optimizer_steps = 0
        self.skipped_batches = 0

    def _tuned(self) -> dict[str, nn.Parameter]:
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.param_names}

    def on_train_batch_start(self, batch, batch_idx):
        if not self.opts.get("dropout", False):
            self.model.eval()  # reference: the model stays in eval mode (no dropout)

    def training_step(self, batch, batch_idx):
        loss = ft_loss(self.model, batch, self.opts["loss"])
        bs = int(batch["input_ids"].shape[0])
        self._epoch_losses.append(loss.detach())
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"FT loss is {loss.item()} at batch {batch_idx}; lower method.lr or use fp32")
        if loss.item() < float(self.opts.get("skip_loss_below") or 0.0):
            self.skipped_batches += 1
            return None  # reference: no backward/step on an already-fitted batch
        self.optimizer_steps += 1
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        eps = self.opts.get("norm_constraint")
        if eps:
            project_to_linf_ball_(self._tuned(), self.originals, float(eps))

    def on_train_epoch_end(self):
        if not self._epoch_losses:
            return
        mean = float(torch.stack(self._epoch_losses).float().mean())
        self._epoch_losses.clear()
        self.epoch_mean_losses.append(mean)
        self.log("train/epoch_loss", mean, on_epoch=True)
        if mean < float(self.opts.get("stop_loss_below") or 0.0):
            self.trainer.should_stop = True

    def configure_optimizers(self):
        return make_optimizer(self._tuned(), self.originals, self.opts, self.weight_decay)


@dataclass
class FTResult:
    deltas: dict[str, torch.Tensor]
    param_names: list[str]
    weight_decay: float
    epoch_losses: list[float] = field(default_factory=list)
    optimizer_steps: int = 0
    skipped_batches: int = 0
    seconds: float = 0.0

    @property
    def delta_norm(self) -> float:
        return float(math.sqrt(sum(float(d.float().pow(2).sum()) for d in self.deltas.values())))

    def summary(self) -> dict[str, Any]:
        return {"param_names": self.param_names, "weight_decay": self.weight_decay,
                "epoch_losses": self.epoch_losses, "final_loss": self.epoch_losses[-1] if self.epoch_losses else None,
                "optimizer_steps": self.optimizer_steps, "skipped_batches": self.skipped_batches,
                "train_seconds": self.seconds, "delta_norm": self.delta_norm, "delta_norms": delta_norms(self.deltas)}


def trainer_options(cfg) -> dict[str, Any]:
    """Lightning Trainer settings from ``cfg.trainer`` (precision may be overridden by ``method.precision``)."""
    tcfg = cfg.get("trainer") if hasattr(cfg, "get") else None
    out = dict(tcfg or {})
    m = cfg.get("method") if hasattr(cfg, "get") else None
    if m is not None and m.get("precision"):
        out["precision"] = m.get("precision")
    return out


_TRUE_PRECISION_DTYPE = {"16-true": torch.float16, "16": torch.float16, "bf16-true": torch.bfloat16,
                         "bf16": torch.bfloat16, "64-true": torch.float64, "64": torch.float64}


def _precision_for(model: nn.Module, requested) -> str:
    """Trainer precision for ``model``: ``*-mixed`` as requested; ``*-true`` only if it equals the model's dtype
    (Lightning would otherwise convert the user's model in place)."""
    dtype = next(model.parameters()).dtype
    natural = {torch.float32: "32-true", torch.float16: "16-true", torch.bfloat16: "bf16-true",
               torch.float64: "64-true"}.get(dtype, "32-true")
    if requested in (None, "", "auto"):
        return natural
    req = str(requested)
    want = _TRUE_PRECISION_DTYPE.get(req)
    if want is not None and want != dtype:
        raise FTConfigError(
            f"precision {req} would convert the {dtype} model in place; load the model in that dtype "
            f"(model.dtype=...) or use a mixed precision (16-mixed / bf16-mixed)")
    if req in ("32-true", "32") and dtype != torch.float32:
        return natural
    return req


def fit_ft(model: nn.Module, tok, requests: Sequence, opts: Mapping[str, Any] | None,
           trainer_cfg: Mapping[str, Any] | None = None, logger=None, callbacks=None) -> FTResult:
    """Fine-tune on ``requests`` with ``Trainer.fit`` and return the deltas ``W − W₀`` (float32).

    Runs on the model's own device; afterwards the model is restored exactly (weights bit-identical,
    ``requires_grad`` flags, train/eval mode, device).
    """
    from massedit.datamodules.requests import EditRequestsDataModule

    opts = method_options(opts)
    trainer_cfg = dict(trainer_cfg or {})
    params = select_ft_parameters(model, opts["layers"], opts["params"], opts["param_names"])
    wd = effective_weight_decay(opts, len(requests))
    first = next(model.parameters())
    device = first.device
    precision = _precision_for(model, opts.get("precision") or trainer_cfg.get("precision"))
    dm = EditRequestsDataModule(requests, tok, batch_size=int(opts["batch_size"]), loss=opts["loss"],
                                shuffle=bool(opts["shuffle"]), seed=opts.get("seed"))
    originals = {n: p.detach().clone() for n, p in params.items()}
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    log.info("FT: tuning %s (%d values), wd=%.3g (%s, decay_to=%s), loss=%s, lr=%g, epochs=%s, batch=%s, precision=%s",
             list(params), sum(p.numel() for p in params.values()), wd, opts["optimizer"], opts["decay_to"],
             opts["loss"], opts["lr"], opts["epochs"], opts["batch_size"], precision)
    module = FTWModule(model, list(params), originals, opts, wd)
    t0 = time.time()
    try:
        with quiet_lightning(), keep_device(model):  # Lightning's teardown would move the module to the CPU
            trainer = pl.Trainer(
                accelerator="cpu" if device.type == "cpu" else "gpu",
                devices=[device.index or 0] if device.type == "cuda" else 1,
                precision=precision,
                max_epochs=int(opts["epochs"]),
                max_steps=int(opts.get("max_steps") or -1),
                logger=logger if logger is not None else False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=bool(trainer_cfg.get("enable_progress_bar", True)),
                num_sanity_val_steps=0,
                log_every_n_steps=1,
                gradient_clip_val=opts.get("grad_clip"),
                callbacks=list(callbacks or []),
            )
            model.requires_grad_(False)
            for p in params.values():
                p.requires_grad_(True)
            trainer.fit(module, datamodule=dm)
        deltas = diff_from(model, originals)
    finally:
        revert_deltas(model, originals)
        for n, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(n, False))
        model.train(was_training)
    return FTResult(deltas=deltas, param_names=list(params), weight_decay=wd,
                    epoch_losses=list(module.epoch_mean_losses), optimizer_steps=module.optimizer_steps,
                    skipped_batches=module.skipped_batches, seconds=time.time() - t0)


# ------------------------------------------------------------------------------------------ evaluation
def _shared_evaluation():
    try:
        from massedit.evaluation import evaluate, write_report
    except ImportError:
        return None
    return evaluate, write_report


@torch.no_grad()
def counterfact_success_metrics(model: nn.Module, tok, requests: Sequence, batch_size: int = 32) -> dict[str, float]:
    """Fallback ES/PS/NS and Score (REFERENCE_SPEC §4.3), in percent, until ``massedit.evaluation`` exists.

    ``s(x, t)`` = mean per-token NLL of target ``t`` after prompt ``x`` (ids of ``x`` + ids of ``" "+t``).
    ES = mean over cases of ``1[s_true > s_new]`` on the rewrite prompt, PS the same on paraphrases
    (per-case mean first), NS ``1[s_true < s_new]`` on neighbourhood prompts (expected answer =
    ``neighborhood_targets``), Score = harmonic mean of the three. Prompts' logits are shared between the
    two targets (causal masking: positions before the target do not depend on it), so a prompt costs one
    forward pass plus one more only when ``target_true`` has several tokens.
    """
    from massedit.core.tokenization import encode, target_token_ids

    device = next(model.parameters()).device
    items = []  # (case_idx, kind, prompt_ids, new_ids, true_ids)
    for ci, r in enumerate(requests):
        new_ids = target_token_ids(tok, r.target_new)
        groups = [("efficacy", [r.filled_prompt], r.target_true),
                  ("paraphrase", list(r.paraphrase_prompts), r.target_true)]
        nts = r.neighborhood_targets or [r.target_true] * len(r.neighborhood_prompts)
        for p, t in zip(r.neighborhood_prompts, nts):
            groups.append(("neighborhood", [p], t))
        for kind, prompts, true in groups:
            if not true:
                continue
            true_ids = target_token_ids(tok, true)
            for p in prompts:
                items.append((ci, kind, encode(tok, p), new_ids, true_ids))
    # sequences to score: prompt+new (scores new fully and the first token of true); prompt+true if |true|>1
    seqs = []
    for k, (_, _, p, n, t) in enumerate(items):
        seqs.append((k, "new", p, n))
        if len(t) > 1:
            seqs.append((k, "true", p, t))
    nll: dict[tuple[int, str], float] = {}
    first_true: dict[int, float] = {}
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][2]) + len(seqs[i][3]))
    pad = tok.pad_token_id
    head = model.get_output_embeddings()
    for s in range(0, len(order), batch_size):
        chunk = [seqs[i] for i in order[s : s + batch_size]]
        L = max(len(p) + len(t) for _, _, p, t in chunk)
        ids = torch.full((len(chunk), L), pad, dtype=torch.long)
        am = torch.zeros((len(chunk), L), dtype=torch.long)
        for b, (_, _, p, t) in enumerate(chunk):
            ids[b, : len(p) + len(t)] = torch.tensor(p + t)
            am[b, : len(p) + len(t)] = 1
        hidden = model.base_model(input_ids=ids.to(device), attention_mask=am.to(device))[0]
        for b, (k, which, p, t) in enumerate(chunk):
            pos = torch.arange(len(p) - 1, len(p) + len(t) - 1, device=device)
            logp = torch.log_softmax(head(hidden[b, pos]).float(), dim=-1)
            tok_lp = logp[torch.arange(len(t), device=device), torch.tensor(t, device=device)]
            nll[(k, which)] = float(-tok_lp.mean())
            if which == "new":
                first_true[k] = float(-logp[0, items[k][4][0]])
    per_case: dict[int, dict[str, list[float]]] = {}
    for k, (ci, kind, _, _, t) in enumerate(items):
        s_new = nll[(k, "new")]
        s_true = nll[(k, "true")] if len(t) > 1 else first_true[k]
        ok = (s_true > s_new) if kind in ("efficacy", "paraphrase") else (s_true < s_new)
        per_case.setdefault(ci, {}).setdefault(kind, []).append(float(ok))
    out = {}
    for kind in ("efficacy", "paraphrase", "neighborhood"):
        vals = [sum(v[kind]) / len(v[kind]) for v in per_case.values() if v.get(kind)]
        out[f"{kind}_success"] = 100.0 * sum(vals) / len(vals) if vals else float("nan")
    trio = [out["efficacy_success"], out["paraphrase_success"], out["neighborhood_success"]]
    trio = [x for x in trio if not math.isnan(x)]
    out["score"] = (len(trio) / sum(1.0 / max(x, 1e-12) for x in trio)) if trio and min(trio) > 0 else 0.0
    return out


def evaluate_model(model, tok, requests, cfg, stage: str):
    """``(summary dict, EvalResult | None)``: the shared evaluation when installed, else the fallback."""
    ev = _shared_evaluation()
    eval_cfg = cfg.get("eval") if hasattr(cfg, "get") else None
    if ev is not None:
        res = ev[0](model, tok, requests, eval_cfg, stage=stage, trainer_kwargs=dict(cfg.get("trainer") or {}))
        return dict(res.summary), res
    return counterfact_success_metrics(model, tok, requests), None


def _pre_eval_cache_path(cfg, model, requests) -> Path | None:
    from omegaconf import OmegaConf

    from massedit.core.io import stable_hash
    from massedit.core.models import model_fingerprint

    mcfg = cfg.get("method") or {}
    if not mcfg.get("cache_pre_eval", True):
        return None
    root = mcfg.get("pre_eval_cache_dir") or os.path.join(str(cfg.get("output_root") or "outputs"), ".cache", "pre_eval")
    key = stable_hash({
        "model": model_fingerprint(model),
        "dtype": str(next(model.parameters()).dtype),
        "requests": [r.to_dict() for r in requests],
        "eval": OmegaConf.to_container(cfg.eval, resolve=True) if cfg.get("eval") is not None else None,
        "backend": "shared" if _shared_evaluation() is not None else "fallback",
    })
    return Path(root) / f"{key}.json"


def _save_cached_eval(path: Path, summary: Mapping[str, Any], res) -> None:
    import dataclasses

    from massedit.core.io import atomic_write_json

    atomic_write_json(path, {"summary": dict(summary), "result": dataclasses.asdict(res) if res is not None else None})


def _load_cached_eval(path: Path):
    from massedit.core.io import load_json

    d = load_json(path)
    res = None
    if d.get("result") is not None:
        try:
            from massedit.evaluation import EvalResult

            res = EvalResult(**d["result"])
        except Exception:  # an older/newer EvalResult layout: the summary is still valid
            res = None
    return d["summary"], res


def _pick_device(cfg) -> torch.device:
    acc = str((cfg.get("trainer") or {}).get("accelerator", "auto"))
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _numeric(d: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def train_main(cfg, run) -> dict:
    """``train.py method=ftw|ft|ftl``: evaluate, fine-tune (Trainer.fit), save deltas, evaluate again.

    Logs ``pre/*``, ``post/*`` and the top-level sweep metrics (``score``, ``efficacy_success``, ...)
    to the run's logger (W&B), writes ``results.json`` and ``deltas.safetensors`` to ``run.dir``, and, when
    the environment variable ``MASSEDIT_TRIAL_RESULT`` names a file, the results there too (sweep runner).
    """
    from massedit.core.io import atomic_write_json
    from massedit.core.models import load_model_and_tokenizer
    from massedit.data.requests import load_requests_from_config

    opts = method_options(cfg.method)
    requests = load_requests_from_config(cfg.data)
    log.info("%d edit requests from %s", len(requests), cfg.data.path)
    model, tok = load_model_and_tokenizer(cfg.model, device=_pick_device(cfg))

    do_pre = bool((cfg.get("eval") or {}).get("pre", True))
    cache = _pre_eval_cache_path(cfg, model, requests) if do_pre else None
    pre: dict[str, Any] = {}
    pre_res = None
    if cache is not None and cache.exists():
        pre, pre_res = _load_cached_eval(cache)
        log.info("pre-edit metrics from cache %s", cache)
    elif do_pre:
        pre, pre_res = evaluate_model(model, tok, requests, cfg, stage="pre")
        if cache is not None:
            _save_cached_eval(cache, pre, pre_res)
    run.log_metrics({f"pre/{k}": v for k, v in _numeric(pre).items()})

    result = fit_ft(model, tok, requests, opts, trainer_cfg=trainer_options(cfg), logger=run.logger)
    deltas_path = None
    if cfg.get("save_deltas", True):
        deltas_path = save_deltas(run.dir / "deltas.safetensors", result.deltas,
                                  {"method": cfg.method.name, "model": str(cfg.model.name_or_path),
                                   "num_requests": len(requests), "weight_decay": result.weight_decay})
    apply_deltas(model, result.deltas)
    post, post_res = evaluate_model(model, tok, requests, cfg, stage="post")
    ev = _shared_evaluation()
    if ev is not None and post_res is not None:
        try:
            ev[1](pre_res, post_res, run.dir, logger=run.logger, title=f"{cfg.method.name} on {cfg.model.name}")
        except Exception as e:  # the report is a nicety; the numbers are saved below
            log.warning("write_report failed: %s", e)

    results: dict[str, Any] = {
        "method": str(cfg.method.name), "num_edits": len(requests),
        "weight_decay": result.weight_decay, "lr": opts["lr"], "epochs": opts["epochs"], "loss": opts["loss"],
        "pre": pre, "post": post, "train": result.summary(),
        "deltas_path": str(deltas_path) if deltas_path else None,
        "eval_backend": "shared" if ev is not None else "fallback",
    }
    for k in SUMMARY_KEYS:  # top-level = post-edit numbers: what a sweep's `metric.name` refers to
        if k in post:
            results[k] = post[k]
    results["delta_norm"] = result.delta_norm
    run.save_json("results.json", results)
    flat = {f"post/{k}": v for k, v in _numeric(post).items()}
    flat.update({f"pre/{k}": v for k, v in _numeric(pre).items()})
    flat.update({k: results[k] for k in SUMMARY_KEYS if k in results})
    flat.update({"delta_norm": result.delta_norm, "weight_decay": result.weight_decay,
                 "train_seconds": result.seconds, "final_loss": results["train"]["final_loss"] or float("nan")})
    run.log_metrics(flat)
    run.log_summary(flat)
    log.info("FT-W done: pre %s | post %s | ‖Δ‖=%.4g", {k: round(v, 2) for k, v in _numeric(pre).items()},
             {k: round(v, 2) for k, v in _numeric(post).items()}, result.delta_norm)
    trial_file = os.environ.get("MASSEDIT_TRIAL_RESULT")
    if trial_file:
        atomic_write_json(trial_file, {**results, "run_dir": str(run.dir)})
    return results
