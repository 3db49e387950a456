"""Precompute second-moment statistics C = E[k kᵀ] (REFERENCE_SPEC §0.6) for a model and a layer set.

    python stats.py model=smollm2-135m stats.layers=[4,5,6,7,8]
    python stats.py stats=wikitext2_fixture stats.layers=[4,5,6,7,8] stats.export_dir=out/ref_stats
    python stats.py stats.layers=[6] stats.devices=2                      # 2-process DDP (CPU: ddp_fork)
    python stats.py stats.layers=[4,5] stats.reference_dir=../shared/fixtures/smollm2/stats   # reuse npz files

Composes ``configs/edit.yaml`` (groups model/stats/...; ``group=option`` and ``a.b=value`` overrides),
loads the model, fills the cache (``stats.cache_dir``) and prints one line per layer. With
``stats.export_dir`` it also writes the statistics in the reference implementation's npz layout
(``<model>/<ds>_stats/<module>_<dtype>_mom2_<n>.npz``). Layers default to the method's ``layers``/``layer``.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

log = logging.getLogger("massedit.stats")


def _layers_from(cfg) -> list[int]:
    stats = cfg.get("stats") or {}
    layers = stats.get("layers")
    if layers is None:
        method = cfg.get("method") or {}
        layers = method.get("layers")
        if layers is None and method.get("layer") is not None:
            layers = [method.get("layer")]
    if layers is None:
        from massedit.stats.config import StatsConfigError

        raise StatsConfigError("no layers given; pass stats.layers=[4,5,6,7,8] (or pick a method with `layers`/`layer`)")
    if isinstance(layers, (int, str)):
        layers = [layers]
    return [int(x) for x in layers]


def main(cfg) -> dict[str, Any]:
    """Compute/load the statistics described by ``cfg`` (a DictConfig with ``model`` and ``stats``);
    returns a summary dict (also printed as JSON lines)."""
    from massedit.core.models import load_model_and_tokenizer
    from massedit.stats.collect import collect_layer_stats
    from massedit.stats.config import StatsConfig
    from massedit.stats.reference import export_layer_stats

    layers = _layers_from(cfg)
    s = StatsConfig.from_config(cfg.stats)
    model_name = str(cfg.model.get("name_or_path") or cfg.model.get("name"))
    t0 = time.time()
    model, tok = load_model_and_tokenizer(cfg.model)
    t_load = time.time() - t0
    t1 = time.time()
    stats = collect_layer_stats(model, tok, layers, s, model_name=model_name, progress=True)
    t_stats = time.time() - t1
    summary = {"model": model_name, "layers": layers, "load_s": round(t_load, 2), "stats_s": round(t_stats, 2),
               "per_layer": []}
    for layer in layers:
        st = stats[layer]
        C = st.C
        row = {"layer": layer, "module": st.module, "source": st.source, "count": st.count, "path": st.path,
               "trace_C": float(C.trace()), "m": int(C.shape[0])}
        if s.export_dir:
            n = s.n_samples or (st.meta or {}).get("n_docs") or 0
            ds = s.ds_name or (st.meta or {}).get("ds_name") or "corpus"
            row["exported"] = str(export_layer_stats(s.export_dir, model_name, ds, st.module, st.total, st.count, int(n),
                                                     precision=s.acc_dtype_name))
        summary["per_layer"].append(row)
        print(json.dumps(row))
    computed = [st for st in stats.values() if st.source == "computed"]
    if computed:
        n_tok = computed[0].count
        summary["tokens"] = n_tok
        summary["tokens_per_s"] = round(n_tok / max(t_stats, 1e-9), 1)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_layer"}))
    return summary


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from massedit.config import ConfigError, compose
    from massedit.datamodules.corpus import CorpusError, CorpusNotAvailableError
    from massedit.stats.config import StatsConfigError

    try:
        cfg = compose("edit", argv)
        main(cfg)
    except (ConfigError, CorpusError, CorpusNotAvailableError, StatsConfigError, FileNotFoundError, IndexError) as e:
        print(f"stats.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
