"""Pieces shared by the ROME and MEMIT editors: second-moment providers, the on-disk target (z / v*)
cache, context-template resolution and the config-driven editor base class."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from massedit.core.adapters import get_adapter
from massedit.core.io import atomic_torch_save, stable_hash
from massedit.editing.context_templates import (
    load_context_templates, sample_memit_templates, sample_rome_templates, save_context_templates,
)
from massedit.editing.hparams import EditHparams, hparams_from_config
from massedit.editing.targets import TargetResult

log = logging.getLogger(__name__)

StatsProvider = Callable[[Any, Any, Sequence[int]], dict[int, torch.Tensor]]


def _get(cfg, key, default=None):
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        v = cfg.get(key, default)
        return default if v is None else v
    return getattr(cfg, key, default)


# ------------------------------------------------------------------------------------- statistics
def reference_stats_provider(root) -> StatsProvider:
    """C per layer from reference-layout npz files below ``root`` (``C = mom2.mom2 / mom2.count``, float32)."""
    from massedit.stats.reference import find_reference_stats, load_reference_second_moment

    root = Path(root)

    def provide(model, tok, layers):
        adapter = get_adapter(model)
        out = {}
        for l in layers:
            module = adapter.rewrite_name(l)
            path = find_reference_stats(root, module)
            if path is None:
                raise FileNotFoundError(f"no reference statistics for {module} below {root} (expected "
                                        f"<model>/<ds>_stats/{module}_float32_mom2_<n>.npz)")
            out[int(l)] = load_reference_second_moment(path)
        return out

    return provide


def default_stats_provider(cfg) -> StatsProvider:
    """``method.stats_dir`` (reference npz layout) if set, else ``massedit.stats.get_second_moments``
    with ``cfg.stats`` (computed once on the unedited model and cached)."""
    stats_dir = _get(_get(cfg, "method"), "stats_dir")
    if stats_dir:
        return reference_stats_provider(stats_dir)

    def provide(model, tok, layers):
        try:
            from massedit.stats import get_second_moments
        except ImportError:
            raise RuntimeError(
                "second-moment statistics are needed: massedit.stats.get_second_moments is not available; "
                "give reference-layout files with method.stats_dir=DIR"
            ) from None
        model_cfg = _get(cfg, "model")
        name = _get(model_cfg, "name") or _get(model_cfg, "name_or_path")
        return {int(k): v for k, v in get_second_moments(model, tok, list(layers), _get(cfg, "stats"), model_name=name).items()}

    return provide


# ------------------------------------------------------------------------------------- z cache
class TargetCache:
    """One file per request target: ``<dir>/<key>.pt`` holding the :class:`TargetResult` fields.

    The key hashes the model state (fingerprint), the module the target lives at, every hparam the
    optimisation reads, the templates and the request, so a changed input never hits a stale entry.
    Files are written atomically as soon as a request finishes: an interrupted job resumes.
    """

    def __init__(self, directory):
        self.dir = Path(directory)

    def key(self, *, model_fp: str, method: str, module: str, hp: EditHparams, templates, request) -> str:
        return stable_hash({
            "v": 1, "model": model_fp, "method": method, "module": module, "hp": hp.z_key(),
            "templates": list(templates), "subject": request.subject, "prompt": request.prompt,
            "target_new": request.target_new,
        }, n=24)

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.pt"

    def get(self, key: str) -> TargetResult | None:
        p = self.path(key)
        if not p.exists():
            return None
        try:
            d = torch.load(p, map_location="cpu", weights_only=True)
            return TargetResult(d["case_id"], d["init"], d["delta"], int(d["n_adam_steps"]), bool(d["early_stopped"]),
                                d["loss_trace"], from_cache=True)
        except Exception as e:  # corrupt / old entry: recompute
            log.warning("ignoring unreadable target cache entry %s (%s)", p, e)
            return None

    def put(self, key: str, r: TargetResult) -> None:
        atomic_torch_save(self.path(key), {
            "case_id": r.case_id if isinstance(r.case_id, (int, str)) else str(r.case_id), "init": r.init,
            "delta": r.delta, "n_adam_steps": r.n_adam_steps, "early_stopped": r.early_stopped,
            "loss_trace": r.loss_trace,
        })


# ------------------------------------------------------------------------------------- editor base
class RomeMemitEditorBase:
    """Config glue shared by :class:`~massedit.editing.rome.RomeEditor` and
    :class:`~massedit.editing.memit.MemitEditor`.

    ``Editor(cfg, run)`` reads ``cfg.method`` (hparams file + overrides, ``context_templates``,
    ``z_cache``/``z_cache_dir``, ``stats_dir``), ``cfg.model`` and ``cfg.stats``. Tests and library users
    can inject ``hparams=``, ``stats_provider=``, ``context_templates=`` and ``z_cache_dir=`` directly.
    """

    method = "base"

    def __init__(self, cfg=None, run=None, *, hparams: EditHparams | None = None,
                 stats_provider: StatsProvider | None = None, context_templates=None,
                 z_cache_dir: str | Path | None | bool = None, template_seed: int | None = None,
                 progress: bool = True):
        self.cfg = cfg
        self.run = run
        mcfg = _get(cfg, "method")
        self.hparams = hparams if hparams is not None else hparams_from_config(mcfg, _get(cfg, "model"))
        self.stats_provider = stats_provider or default_stats_provider(cfg)
        tmpl = context_templates if context_templates is not None else _get(mcfg, "context_templates")
        if isinstance(tmpl, (str, Path)):
            tmpl = load_context_templates(tmpl)
        self.context_templates = tmpl
        if z_cache_dir is None:
            use = _get(mcfg, "z_cache", False)
            z_cache_dir = _get(mcfg, "z_cache_dir") if use else False
            if use and not z_cache_dir:
                from massedit.core.models import default_cache_dir

                z_cache_dir = default_cache_dir() / "targets"
        self.cache = TargetCache(z_cache_dir) if z_cache_dir else None
        self.template_seed = template_seed if template_seed is not None else int(_get(mcfg, "template_seed", 0))
        self.progress = progress
        self.info: dict[str, Any] = {}
        self.intermediates: dict[str, Any] = {}

    # -------------------------------------------------------------------------------------------
    def get_context_templates(self, model, tok):
        """The configured templates, else sampled once from the (unedited) model with the seed."""
        if self.context_templates is None:
            t0 = time.time()
            if self.method == "rome":
                self.context_templates = sample_rome_templates(
                    model, tok, self.hparams.context_template_length_params, seed=self.template_seed)
            else:
                self.context_templates = sample_memit_templates(
                    model, tok, self.hparams.memit_template_prompts, self.hparams.memit_template_length_params,
                    seed=self.template_seed)
            log.info("sampled %s context templates in %.1f s", self.method, time.time() - t0)
        if self.run is not None and getattr(self.run, "dir", None) is not None:
            save_context_templates(Path(self.run.dir) / "context_templates.json", self.context_templates)
        return self.context_templates

    def get_stats(self, model, tok, layers) -> dict[int, torch.Tensor]:
        t0 = time.time()
        C = self.stats_provider(model, tok, layers)
        missing = [l for l in layers if int(l) not in C]
        if missing:
            raise RuntimeError(f"statistics provider returned no C for layers {missing}")
        self.info["stats_seconds"] = round(time.time() - t0, 2)
        return {int(l): C[int(l)] for l in layers}

    def save_info(self) -> None:
        if self.run is not None and hasattr(self.run, "save_json"):
            self.run.save_json(f"{self.method}_info.json", self.info)


@torch.no_grad()
def corpus_second_moments(model, tok, layers: Sequence[int], texts: Sequence[str], max_length: int = 256,
                          batch_size: int = 8) -> dict[int, torch.Tensor]:
    """``C_l = (1/N) Σ_t k_t k_tᵀ`` over every non-padding token of ``texts`` (REFERENCE_SPEC §0.6), float32.

    A small in-memory version of the statistics for tests and tiny models; real runs use
    :mod:`massedit.stats` (cached, large corpora).
    """
    from massedit.core.nethook import TraceDict
    from massedit.core.tokenization import tokenize_batch

    adapter = get_adapter(model)
    names = {adapter.rewrite_name(l): int(l) for l in layers}
    device = next(model.parameters()).device
    m = adapter.mlp_inner_size
    acc = {l: torch.zeros(m, m, dtype=torch.float64, device=device) for l in names.values()}
    n = 0
    for s in range(0, len(texts), batch_size):
        enc = tokenize_batch(tok, texts[s : s + batch_size], device=device, max_length=max_length)
        mask = enc["attention_mask"].bool()
        with TraceDict(model, list(names), retain_input=True, retain_output=False, stop=True) as td:
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])  # as layer_stats: no token types
        for name, l in names.items():
            k = td[name].input[mask].double()
            acc[l] += k.T @ k
        n += int(mask.sum())
    return {l: (a / n).float().cpu() for l, a in acc.items()}


def corpus_stats_provider(texts: Sequence[str], max_length: int = 256) -> StatsProvider:
    """A provider computing C from ``texts`` on the model it is given (unedited at call time)."""
    return lambda model, tok, layers: corpus_second_moments(model, tok, layers, texts, max_length)
