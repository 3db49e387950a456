"""Public entry points: :func:`evaluate` (one model state, one Lightning validate pass) and :func:`run_eval_only`."""
from __future__ import annotations

from massedit.lightning_utils import keep_device, quiet_lightning

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from massedit.evaluation.aggregate import METRICS_VERSION, build_results

log = logging.getLogger(__name__)

EVAL_DEFAULTS: dict[str, Any] = {
    "dataset": "auto",            # counterfact | zsre | auto
    "batch_size": 256,            # prompt groups per forward (packed into prefix-tree rows)
    "row_tokens": 128,            # nodes per prefix-tree row (longer single sequences get their own row)
    "generation": True,           # fluency / consistency (CounterFact only)
    "generation_every_k": 10,     # reference generation_test_interval (1 = every case)
    "max_gen_len": 100,           # tokens, prompt included (reference max_out_len)
    "top_k": 5,
    "seed": 0,
    "consistency": {"attribute_snippets": None, "idf": None, "tfidf_vocab": None},
    "pre": True,
    "post": True,
    "teacher_forcing": "string",  # string (reference: tokenise f"{prompt} {target}") | tokens
    "scoring": "auto",            # auto | packed | plain
    "zsre_score": False,          # ROME-repo hmean of the zsRE accuracies
    "tfidf_backend": "auto",      # auto | sklearn | numpy
}


@dataclass
class EvalResult:
    """Metrics of one model state. ``summary``/``ci`` are in the reference's ×100 units (see aggregate.py);
    ``None`` = not computed. ``per_case``: one dict per request with its per-prompt NLLs/probabilities/flags."""

    stage: str
    kind: str
    summary: dict[str, float | None]
    ci: dict[str, float | None]
    n: dict[str, int]
    per_case: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_cases(self) -> int:
        return len(self.per_case)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "kind": self.kind, "summary": self.summary, "ci": self.ci, "n": self.n,
                "info": self.info, "n_cases": self.n_cases}


def eval_config(eval_cfg=None) -> dict[str, Any]:
    """Merge a (partial) ``eval`` config (DictConfig / dict / None) over :data:`EVAL_DEFAULTS`."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in EVAL_DEFAULTS.items()}
    if eval_cfg is None:
        return cfg
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(eval_cfg, DictConfig):
            eval_cfg = OmegaConf.to_container(eval_cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    for k, v in dict(eval_cfg).items():
        if k == "consistency" and isinstance(v, dict):
            cfg["consistency"].update(v)
        elif k == "generation_test_interval":
            cfg["generation_every_k"] = v
        else:
            cfg[k] = v
    return cfg


_SCORERS: dict[tuple, Any] = {}


def consistency_scorer(cfg: dict[str, Any]):
    """The TF-IDF consistency scorer when ``consistency.attribute_snippets`` is given, else ``None`` (not computed)."""
    c = cfg.get("consistency") or {}
    snippets = c.get("attribute_snippets")
    if not snippets:
        return None
    key = (str(snippets), str(c.get("idf")), str(c.get("tfidf_vocab")), cfg.get("tfidf_backend", "auto"))
    if key not in _SCORERS:
        from massedit.evaluation.text import ConsistencyScorer

        for name in ("attribute_snippets", "idf", "tfidf_vocab"):
            if c.get(name) and not Path(c[name]).expanduser().exists():
                raise FileNotFoundError(f"eval.consistency.{name}: file not found: {c[name]}")
        _SCORERS[key] = ConsistencyScorer(Path(snippets).expanduser(), c.get("idf"), c.get("tfidf_vocab"), key[3])
    return _SCORERS[key]




def default_trainer_kwargs(model) -> dict[str, Any]:
    device = next(model.parameters()).device
    kw: dict[str, Any] = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
                          "enable_progress_bar": True, "num_sanity_val_steps": 0}
    if device.type == "cuda":
        kw.update(accelerator="gpu", devices=[device.index or 0])
    elif device.type == "mps":
        kw.update(accelerator="mps", devices=1)
    else:
        kw.update(accelerator="cpu", devices=1)
    return kw


def evaluate(model, tok, requests: Sequence[Any], eval_cfg=None, *, stage: str = "post",
             trainer_kwargs: dict | None = None) -> EvalResult:
    """Evaluate ``model`` on ``requests`` (CounterFact or zsRE metrics, REFERENCE_SPEC §4) in one Lightning validate
    pass: every prompt of every request batched, torchmetrics states synced across DDP ranks.

    ``trainer_kwargs`` go to ``pytorch_lightning.Trainer`` (e.g. ``accelerator``, ``devices``, ``strategy``,
    ``precision`` from ``cfg.trainer``); by default the run uses the model's current device. The model's weights
    are not changed and it is left on the device it was on.
    """
    import pytorch_lightning as pl

    from massedit.core.tokenization import prepare_tokenizer
    from massedit.datamodules.evaluation import EvaluationDataModule, detect_kind
    from massedit.lightning_modules.evaluation import EvaluationModule

    cfg = eval_config(eval_cfg)
    requests = list(requests)
    if not requests:
        raise ValueError("evaluate: no requests to evaluate")
    prepare_tokenizer(tok)
    kind = detect_kind(requests, cfg["dataset"])
    scorer = consistency_scorer(cfg) if kind == "counterfact" and cfg["generation"] else None
    dm = EvaluationDataModule(tok, requests, kind, batch_size=cfg["batch_size"], generation=cfg["generation"],
                              generation_every_k=cfg["generation_every_k"], teacher_forcing=cfg["teacher_forcing"])
    module = EvaluationModule(model, tok, requests, kind=kind, seed=cfg["seed"], top_k=cfg["top_k"],
                              max_gen_len=cfg["max_gen_len"], consistency_scorer=scorer, scoring_mode=cfg["scoring"],
                              row_tokens=cfg["row_tokens"])
    kw = default_trainer_kwargs(model)
    kw.update(_normalise_trainer_kwargs(trainer_kwargs))
    was_training = model.training
    t0 = time.time()
    with quiet_lightning(), keep_device(model):
        trainer = pl.Trainer(**kw)
        trainer.validate(module, datamodule=dm, verbose=False)
    seconds = time.time() - t0
    model.train(was_training)
    res = module.results
    per_case, summary, ci, n = build_results(kind, requests, res["scores"], res["generation"], res["texts"],
                                             zsre_score=bool(cfg["zsre_score"]))
    from massedit.evaluation.text import word_tokenizer_name

    info = {
        "metrics_version": METRICS_VERSION,
        "seconds": round(seconds, 3),
        "n_groups": len(dm.groups or []),
        "n_branches": sum(len(g.branches) for g in dm.groups or []),
        "tokens_forwarded": module.tokens_forwarded,  # token slots incl. padding, after prefix sharing
        "tokens_unshared": sum(g.length for g in dm.groups or []),  # each prompt once + its continuations
        "n_generation_cases": len(dm.gen_items),
        "scoring": {"packed": module._mode[0], "head_only_selected": module._mode[1]} if module._mode else None,
        "teacher_forcing": cfg["teacher_forcing"],
        "word_tokenizer": word_tokenizer_name() if dm.gen_items else None,
        "consistency": "computed" if scorer is not None else "not computed (eval.consistency files not given)",
        "generation": {"on": bool(cfg["generation"]) and kind == "counterfact", "every_k": cfg["generation_every_k"],
                       "max_gen_len": cfg["max_gen_len"], "top_k": cfg["top_k"], "seed": cfg["seed"]},
        "world_size": trainer.world_size,
    }
    log.info("evaluation (%s, %s): %d cases in %.1f s", stage, kind, len(requests), seconds)
    return EvalResult(stage=stage, kind=kind, summary=summary, ci=ci, n=n, per_case=per_case, info=info)


_TRAINER_KEYS = ("accelerator", "devices", "strategy", "precision", "num_nodes", "enable_progress_bar", "logger",
                 "callbacks", "limit_val_batches", "deterministic", "plugins", "default_root_dir")


def _normalise_trainer_kwargs(trainer_kwargs) -> dict[str, Any]:
    """The ``cfg.trainer`` entries that matter for evaluation; ``auto``/1-device values keep the model's device
    (so a model placed by the caller is evaluated where it is); ``None`` values are dropped."""
    if not trainer_kwargs:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(trainer_kwargs, DictConfig):
            trainer_kwargs = OmegaConf.to_container(trainer_kwargs, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    out = {k: v for k, v in dict(trainer_kwargs).items() if k in _TRAINER_KEYS and v is not None}
    if out.get("accelerator") == "auto":
        out.pop("accelerator")
    if out.get("strategy") == "auto":
        out.pop("strategy")
    if out.get("devices") in (1, "1", "auto") and "accelerator" not in out:
        out.pop("devices")
    return out


def _trainer_kwargs_from_cfg(cfg) -> dict[str, Any]:
    t = cfg.get("trainer") if hasattr(cfg, "get") else None
    return _normalise_trainer_kwargs(t) if t else {}


def run_eval_only(cfg, run=None) -> dict[str, Any]:
    """Evaluation-only mode (``edit.py mode=eval [deltas=PATH]``): load the model and requests from ``cfg``;
    without deltas evaluate the model as loaded (stage ``pre``); with ``deltas`` evaluate before (if ``eval.pre``)
    and after applying the saved delta file. Writes the report to ``run.dir`` (or ``cfg.output_dir``)."""
    from massedit.core.deltas import apply_deltas, load_deltas
    from massedit.core.models import load_model_and_tokenizer
    from massedit.data.requests import load_requests_from_config

    model, tok = load_model_and_tokenizer(cfg.model)
    requests = load_requests_from_config(cfg.data)
    ecfg = cfg.get("eval")
    e = eval_config(ecfg)
    tkw = _trainer_kwargs_from_cfg(cfg)
    deltas_path = cfg.get("deltas")
    pre = post = None
    if deltas_path:
        deltas = load_deltas(Path(str(deltas_path)).expanduser())
        if e["pre"]:
            pre = evaluate(model, tok, requests, ecfg, stage="pre", trainer_kwargs=tkw)
        apply_deltas(model, deltas)
        if e["post"]:
            post = evaluate(model, tok, requests, ecfg, stage="post", trainer_kwargs=tkw)
    else:
        pre = evaluate(model, tok, requests, ecfg, stage="pre", trainer_kwargs=tkw)
    out_dir = Path(run.dir) if run is not None else Path(cfg.get("output_dir") or "outputs/eval")
    model_name = cfg.model.get("name_or_path", "") if cfg.get("model") else ""
    data_path = cfg.data.get("path", "") if cfg.get("data") else ""
    from massedit.evaluation.report import write_report

    title = f"{model_name} on {Path(str(data_path)).name} ({len(requests)} records)" + (f", deltas {Path(str(deltas_path)).name}" if deltas_path else "")
    table = write_report(pre, post, out_dir, logger=getattr(run, "logger", None), title=title)
    return {"pre": pre, "post": post, "table": table, "out_dir": out_dir}


def is_global_zero() -> bool:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except Exception:  # pragma: no cover
        pass
    return True
