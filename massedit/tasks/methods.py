"""Editing methods by name: the ``Editor`` of a job's ``method`` config and where its statistics come from.

``build_editor(job)`` is the only place that turns a ``method`` config into an editor (every editor follows the
:class:`~massedit.editing.editor.Editor` protocol: ``edit(model, tok, requests) -> deltas``).
"""
from __future__ import annotations

from pathlib import Path

from massedit.core.models import default_cache_dir
from massedit.editing.context_templates import load_context_templates
from massedit.editing.editor import Editor, StatsProvider
from massedit.editing.ft import FTConfig
from massedit.editing.hparams import MemitConfig, RomeConfig
from massedit.editing.mend.config import MendConfig
from massedit.editing.memit import MemitEditor
from massedit.editing.mend.editor import MendEditor
from massedit.editing.rome import RomeEditor
from massedit.editing.target_cache import TargetCache
from massedit.lightning_modules.ftw import FTEditor
from massedit.stats.collect import CollectionEngine, collect_layer_stats
from massedit.core.errors import InputError

EDITORS = ("rome", "memit", "ft", "ftl", "ftw", "mend")
TRAINABLE = ("ft", "ftl", "ftw", "mend")


class UnknownMethodError(InputError):
    pass


def stats_provider(job, engine: CollectionEngine | None = None) -> StatsProvider:
    """C per layer from ``job.stats`` (reference npz files, the cache, or one collection pass by ``engine``:
    the job's Trainer, or plain torch when ``None``)."""

    def provide(model, tok, layers):
        if getattr(job.stats, "artifact", None) and not provide.fetched:
            fetch_stats_artifact(job.stats)
            provide.fetched = True
        stats = collect_layer_stats(model, tok, list(layers), job.stats, model_name=job.model.name_or_path,
                                    engine=engine)
        provide.used.update(stats)
        return {layer: st.C.cpu() for layer, st in stats.items()}

    provide.used = {}      # {layer: LayerStats} of every layer handed out (for the statistics artifact)
    provide.fetched = False
    return provide


def stats_cache_root(stats_cfg) -> Path:
    from massedit.stats.cache import default_stats_cache_dir

    return Path(stats_cfg.cache_dir).expanduser() if stats_cfg.cache_dir else default_stats_cache_dir()


def fetch_stats_artifact(stats_cfg) -> Path:
    """``stats.artifact=entity/project/name:version``: download a statistics artifact of an earlier run into the
    statistics cache (its files keep their cache paths, so the collection below is a cache hit)."""
    root = stats_cache_root(stats_cfg)
    root.mkdir(parents=True, exist_ok=True)
    return _download_artifact(str(stats_cfg.artifact), root)


def _download_artifact(ref: str, root: Path) -> Path:
    import wandb

    try:
        art = wandb.run.use_artifact(ref) if wandb.run is not None else wandb.Api().artifact(ref)
        return Path(art.download(root=str(root)))
    except Exception as e:
        raise InputError(f"stats.artifact={ref!r}: cannot download it from W&B ({type(e).__name__}: {e}); "
                         f"needs an API key and network access, or drop stats.artifact") from None


def target_cache(method_cfg) -> TargetCache | None:
    if not method_cfg.z_cache:
        return None
    return TargetCache(Path(method_cfg.z_cache_dir).expanduser() if method_cfg.z_cache_dir
                       else default_cache_dir() / "targets")


def build_editor(job, *, stats: StatsProvider | None = None, logger=None, progress: bool = True) -> Editor:
    """The editor of ``job.method`` (``stats``: where ROME/MEMIT get C; default: :func:`stats_provider`)."""
    m = job.method
    if isinstance(m, (RomeConfig, MemitConfig)):
        templates = load_context_templates(m.context_templates) if m.context_templates else None
        cls = RomeEditor if isinstance(m, RomeConfig) else MemitEditor
        return cls(m, stats or stats_provider(job), context_templates=templates, template_seed=m.template_seed,
                   cache=target_cache(m), progress=progress)
    if isinstance(m, FTConfig):
        return FTEditor(m, job.trainer, logger=logger)
    if isinstance(m, MendConfig):
        return MendEditor(m, progress=progress)
    raise UnknownMethodError(f"no editor for method config {type(m).__name__}; editing methods: {EDITORS}")


# ------------------------------------------------------------------------------------------------ memory estimate
GiB = 1024 ** 3


def memory_estimate(job) -> dict:
    """A rough figure of the memory the job's large items take, from the model's config alone (nothing is loaded):
    the weights (parameter count × ``model.dtype``) and the method's own tensors — ROME/MEMIT: the statistics C
    (float32 ``m×m`` per layer) and the float64 solve (MEMIT: ``λC + KKᵀ`` and its factorisation, ``m×m`` each);
    FT: gradients + two Adam moments of the tuned weights (float32); MEND: the editor network. Activations are
    not counted (they grow with ``eval.batch_size`` / ``targets_max_tokens``). Values in bytes."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from massedit.core.adapters import get_adapter
    from massedit.core.models import resolve_model_path

    cfg = job.model
    config = AutoConfig.from_pretrained(resolve_model_path(cfg), **({"revision": cfg.revision} if cfg.revision else {}))
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in skeleton.parameters())
    weights = n_params * cfg.torch_dtype.itemsize
    a = get_adapter(skeleton)
    m, d = a.mlp_inner_size, a.hidden_size
    meth = job.method
    extra, what = 0, ""
    if isinstance(meth, (RomeConfig, MemitConfig)):
        n_layers = len(meth.layers or [])
        C = m * m * 4 * n_layers if (isinstance(meth, MemitConfig) or meth.mom2_adjustment) else 0
        solve = 2 * m * m * 8 if isinstance(meth, MemitConfig) else m * m * 4
        extra, what = C + solve, f"statistics {n_layers} × {m}×{m} fp32 + {'float64 solve' if solve > m * m * 4 else 'C⁻¹'}"
    elif isinstance(meth, FTConfig):
        layers = len(meth.layers) if meth.layers else 1
        tuned = layers * m * d * (1 if meth.params == "rewrite" else 3)
        extra, what = tuned * 4 * 3, f"~{tuned / 1e6:.0f}M tuned weights × (grad + 2 Adam moments) fp32"
    elif isinstance(meth, MendConfig):
        n_inner = len(meth.layers) if meth.layers is not None else int(meth.num_layers)
        per = 2 * (m + d) * min(int(meth.rank), m + d) * (int(meth.n_hidden) + 1)
        extra, what = 2 * per * 4 * (1 if meth.shared else n_inner * len(meth.projections)), "editor network fp32"
    return {"params": n_params, "dtype": str(cfg.torch_dtype).replace("torch.", ""), "weights": weights,
            "method": extra, "method_what": what, "total": weights + extra}


def available_memory() -> dict[str, int]:
    """Free bytes per visible device (``cuda:i``) and the machine's memory (``cpu``)."""
    import os

    import torch

    out = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out[f"cuda:{i}"] = int(torch.cuda.mem_get_info(i)[0])
    try:
        out["cpu"] = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not on every platform
        pass
    return out


def log_memory_estimate(job, logger=None) -> dict | None:
    """Log :func:`memory_estimate` and what is free, before the job loads the model (never fails the job)."""
    import logging

    lg = logger or logging.getLogger("massedit.edit")
    try:
        est = memory_estimate(job)
    except Exception as e:  # an estimate must not stop a job (unknown architecture, no hub access, ...)
        lg.debug("no memory estimate: %s", e)
        return None
    free = available_memory()
    where = job.model.device_map or "one device per rank"
    what = getattr(job.method, "name", None) or "evaluation"
    lg.info("memory estimate: weights %.1f GiB (%.2fB params, %s) + %s %.1f GiB = %.1f GiB; placement: %s; free: %s",
            est["weights"] / GiB, est["params"] / 1e9, est["dtype"], what, est["method"] / GiB,
            est["total"] / GiB, where, ", ".join(f"{k} {v / GiB:.0f} GiB" for k, v in free.items()) or "unknown")
    gpus = [v for k, v in free.items() if k.startswith("cuda")]
    if gpus and not job.model.device_map and est["total"] > max(gpus):
        lg.warning("the model and the %s tensors (~%.0f GiB) exceed the free memory of one GPU (%.0f GiB): use a "
                   "smaller model.dtype (bfloat16) or model.device_map=auto", what, est["total"] / GiB,
                   max(gpus) / GiB)
    return est
