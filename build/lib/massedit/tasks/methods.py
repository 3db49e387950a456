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
from massedit.stats.collect import CollectionEngine, get_second_moments
from massedit.core.errors import InputError

EDITORS = ("rome", "memit", "ft", "ftl", "ftw", "mend")
TRAINABLE = ("ft", "ftl", "ftw", "mend")


class UnknownMethodError(InputError):
    pass


def stats_provider(job, engine: CollectionEngine | None = None) -> StatsProvider:
    """C per layer from ``job.stats`` (reference npz files, the cache, or one collection pass by ``engine``:
    the job's Trainer, or plain torch when ``None``)."""

    def provide(model, tok, layers):
        return get_second_moments(model, tok, list(layers), job.stats, model_name=job.model.name_or_path,
                                  engine=engine)

    return provide


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
