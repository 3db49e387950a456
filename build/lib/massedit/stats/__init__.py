"""Second-moment statistics ``C = E[k kᵀ]`` of the rewrite-module input (REFERENCE_SPEC §0.6).

Public API (used by the ROME/MEMIT editors)::

    from massedit.stats import get_second_moments, get_second_moment
    C = get_second_moments(model, tok, [4, 5, 6, 7, 8], cfg.stats, model_name=cfg.model.name_or_path)

Imports are lazy so that ``massedit.stats.reference`` stays light.
"""
from __future__ import annotations

__all__ = ["get_second_moments", "get_second_moment", "collect_layer_stats", "LayerStats", "StatsConfig",
           "export_layer_stats"]


def __getattr__(name):
    if name in ("get_second_moments", "get_second_moment", "collect_layer_stats", "LayerStats"):
        from massedit.stats import collect

        return getattr(collect, name)
    if name == "StatsConfig":
        from massedit.stats.config import StatsConfig

        return StatsConfig
    if name == "export_layer_stats":
        from massedit.stats.reference import export_layer_stats

        return export_layer_stats
    raise AttributeError(name)
