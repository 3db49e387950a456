"""``massedit stats`` / ``stats.py``: precompute second-moment statistics C = E[k kᵀ] (REFERENCE_SPEC §0.6).

    massedit stats stats.layers=[4,5,6,7,8]
    massedit stats stats=wikitext2_fixture stats.layers=[4,5,6,7,8] stats.export_dir=out/ref_stats
    massedit stats stats.layers=[6] trainer.devices=2                   # 2-process DDP (gloo on CPU)
    massedit stats stats.layers=[4,5] stats.reference_dir=DIR           # reuse reference-format npz files

Composes the ``edit`` config (groups model/stats/trainer/...), loads the model, fills the cache
(``stats.cache_dir``) through the job's Trainer and prints one JSON line per layer. With ``stats.export_dir`` it also
writes the statistics in the reference implementation's npz layout (``<model>/<ds>_stats/<module>_<dtype>_mom2_<n>.npz``).
Layers default to the method's ``layers``.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

from massedit.core.models import load_model_and_tokenizer
from massedit.lightning_modules.stats import LightningStatsEngine
from massedit.stats.collect import collect_layer_stats
from massedit.stats.config import StatsConfigError
from massedit.stats.reference import export_layer_stats
from massedit.tasks.runs import configure_logging
from massedit.tasks.validate import validate_stats_job
from massedit.trainer import build_trainer, finish_ranks, launch_rank, place_model, start_ranks

log = logging.getLogger("massedit.stats")


def stats_layers(job) -> list[int]:
    layers = job.stats.layers
    if layers is None:
        layers = getattr(job.method, "layers", None)
    if not layers:
        raise StatsConfigError("no layers given; pass stats.layers=[4,5,6,7,8] (or pick a method with `layers`)")
    return [int(x) for x in layers]


def stats_job(job) -> dict[str, Any]:
    """Compute/load the statistics of ``job.stats`` for ``job.model``; returns a summary (also printed as JSON lines)."""
    configure_logging(job.log_level, rank=launch_rank(job.trainer))
    layers = stats_layers(job)
    validate_stats_job(job, layers)  # layers, reference files and corpus against the model config, before loading
    t0 = time.time()
    trainer = build_trainer(job.trainer, model_dtype=job.model.torch_dtype)
    failed = True
    try:
        summary = _collect(job, trainer, layers, t0)
        failed = False
        return summary
    finally:
        finish_ranks(trainer, failed)  # rank 0: a failure on any other rank fails the job


def _collect(job, trainer, layers, t0) -> dict[str, Any]:
    s = job.stats
    start_ranks(trainer)  # several devices: the ranks start now, before the model is loaded
    model, tok = load_model_and_tokenizer(job.model)
    place_model(model, trainer)
    t_load = time.time() - t0
    t1 = time.time()
    stats = collect_layer_stats(model, tok, layers, s, model_name=job.model.name_or_path, progress=True,
                                engine=LightningStatsEngine(trainer))
    t_stats = time.time() - t1
    summary: dict[str, Any] = {"model": job.model.name_or_path, "layers": layers, "load_s": round(t_load, 2),
                               "stats_s": round(t_stats, 2), "per_layer": []}
    for layer in layers:
        st = stats[layer]
        C = st.C
        row = {"layer": layer, "module": st.module, "source": st.source, "count": st.count, "path": st.path,
               "trace_C": float(C.trace()), "m": int(C.shape[0])}
        if s.export_dir and trainer.is_global_zero:
            n = s.n_samples or (st.meta or {}).get("n_docs") or 0
            ds = s.ds_name or (st.meta or {}).get("ds_name") or "corpus"
            row["exported"] = str(export_layer_stats(s.export_dir, job.model.name_or_path, ds, st.module, st.total,
                                                     st.count, int(n), precision=s.acc_dtype_name))
        summary["per_layer"].append(row)
        if trainer.is_global_zero:
            print(json.dumps(row))
    computed = [st for st in stats.values() if st.source == "computed"]
    if computed:
        summary["tokens"] = computed[0].count
        summary["tokens_per_s"] = round(computed[0].count / max(t_stats, 1e-9), 1)
    if trainer.is_global_zero:
        print(json.dumps({k: v for k, v in summary.items() if k != "per_layer"}))
    return summary
