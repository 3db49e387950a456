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
