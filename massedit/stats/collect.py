"""Public entry point for second-moment statistics: ``get_second_moments`` (REFERENCE_SPEC §0.6).

Order of sources for each requested layer:

1. ``stats.reference_dir`` set: the reference implementation's npz file for that module (logged);
2. the content-addressed cache (``massedit.stats.cache``): a hit costs no forward pass;
3. otherwise collection — all missing layers in one forward pass per batch that stops after the highest
   of them, by an *engine*: the plain-torch loop here (:func:`run_torch_collection`, the default) or the job's
   Lightning Trainer (``massedit.lightning_modules.stats.LightningStatsEngine``: ``Trainer.predict``, every rank
   accumulates its shard and the sums are all-reduced). Partial sums are checkpointed atomically every
   ``stats.checkpoint_every`` batches and every ``stats.checkpoint_seconds`` seconds, so a killed collection
   resumes where its last checkpoint left off.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from massedit.core.adapters import get_adapter
from massedit.core.io import atomic_torch_save, clean_stale_tmp, content_checksum, stable_hash
from massedit.data.corpus import Corpus, CorpusSpec, TokenBatches, build_token_batches, load_corpus
from massedit.stats import cache as cache_mod
from massedit.stats.config import StatsConfig, StatsConfigError
from massedit.stats.moments import MomentState, Progress, collect_second_moments, second_moment
from massedit.stats.reference import ReferenceStatsError, find_reference_stats, load_reference_stats

log = logging.getLogger("massedit.stats")


SYMMETRY_BLOCKS = 3  # Kᵀ K accumulated as its upper block triangle: 2/3 of the multiply-adds


class SimulatedInterruption(RuntimeError):
    """Raised by the test hook ``CollectionJob.interrupt_after`` to mimic a killed collection."""


@dataclass
class LayerStats:
    """One layer's statistic: ``total`` = Σ k kᵀ, ``count`` = N, where it came from, and its cache key."""

    layer: int
    module: str
    total: torch.Tensor
    count: int
    source: str                      # "reference" | "cache" | "computed"
    path: str | None = None
    key: str | None = None
    key_dict: dict | None = None
    meta: dict = field(default_factory=dict)

    @property
    def C(self) -> torch.Tensor:
        return second_moment(self.total, self.count)


@dataclass
class CollectionJob:
    """Everything one collection needs (picklable, so it can travel to spawned DDP ranks)."""

    modules: list[str]
    token_batches: TokenBatches
    acc_dtype: str
    result_paths: dict[str, str]
    result_meta: dict[str, dict]
    runkey: str
    partial_dir: str | None
    checkpoint_every: int = 50
    checkpoint_seconds: float = 0.0
    blocks: int = 1                      # accumulate the upper block triangle of Kᵀ K only (moments.py)
    progress: bool = True
    interrupt_after: int | None = None   # testing hook: stop after this many batches of this run

    @property
    def torch_acc_dtype(self) -> torch.dtype:
        return getattr(torch, self.acc_dtype)

    def partial_path(self, rank: int, world: int) -> Path | None:
        if not self.partial_dir:
            return None
        return Path(self.partial_dir) / f"{self.runkey}.rank{rank}of{world}.pt"

    def load_partial(self, rank: int, world: int, device=None) -> MomentState | None:
        """The partial sums a previous (killed) run of this exact job checkpointed for this rank, if any."""
        path = self.partial_path(rank, world)
        if path is None or not path.exists():
            return None
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt / foreign file: start over
            log.warning("ignoring unreadable partial statistics %s (%s)", path, e)
            return None
        try:
            if (d.get("runkey") != self.runkey or sorted(d["state"]["sums"]) != sorted(self.modules)
                    or int(d["state"].get("extra", {}).get("blocks", 1)) != self.blocks):
                return None
            if "sha256" in d and d["sha256"] != content_checksum(d["state"]):
                raise ValueError("checksum mismatch")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            log.warning("discarding corrupt partial statistics %s (%s); starting over", path, e)
            return None
        state = MomentState.from_dict(d["state"], device)
        log.info("resuming statistics from %s: %d batches, %d tokens already done", path, state.batches_done, state.count)
        return state

    def save_partial(self, state: MomentState, rank: int, world: int) -> None:
        path = self.partial_path(rank, world)
        if path is not None:
            st = state.to_dict()
            atomic_torch_save(path, {"runkey": self.runkey, "state": st, "sha256": content_checksum(st)})

    def clear_partials(self, world: int) -> None:
        for r in range(world):
            p = self.partial_path(r, world)
            if p is not None and p.exists():
                p.unlink()

    def write_results(self, state: MomentState, **extra_meta) -> None:
        sums = state.full_sums()
        for name in self.modules:
            meta = dict(self.result_meta[name], count=int(state.count), **extra_meta)
            cache_mod.save_stats_file(self.result_paths[name], sums[name], state.count, meta)

    def interrupt_hook(self):
        if self.interrupt_after is None:
            return None
        seen = {"n": 0}

        def hook(_state):
            seen["n"] += 1
            if seen["n"] >= self.interrupt_after:
                raise SimulatedInterruption(f"simulated interruption after {seen['n']} batches")

        return hook


# --------------------------------------------------------------------------------------------- engines
def run_torch_collection(model: torch.nn.Module, job: CollectionJob) -> MomentState:
    """Plain-torch engine: single process, batches in order, periodic atomic checkpoints."""
    tb = job.token_batches
    state = job.load_partial(0, 1)
    indices = tb.shard(0, 1)[(state.batches_done if state else 0):]
    progress = Progress(tb.n_tokens, enabled=job.progress, initial=state.count if state else 0)
    try:
        state = collect_second_moments(
            model, (tb.tensors(j) for j in indices), job.modules, acc_dtype=job.torch_acc_dtype, state=state,
            checkpoint=lambda st: job.save_partial(st, 0, 1), checkpoint_every=job.checkpoint_every,
            checkpoint_seconds=job.checkpoint_seconds, progress=progress, on_batch=job.interrupt_hook(),
            blocks=job.blocks,
        )
    finally:
        progress.close()
    job.write_results(state, world_size=1, batches_per_rank=[state.batches_done])
    return state


class CollectionEngine(Protocol):
    """Runs a :class:`CollectionJob` over ``model`` and writes its results to ``job.result_paths``."""

    world_size: int

    def __call__(self, model: torch.nn.Module, job: CollectionJob) -> Any: ...


class TorchEngine:
    """The plain-torch engine (one process)."""

    world_size = 1

    def __call__(self, model: torch.nn.Module, job: CollectionJob) -> MomentState:
        return run_torch_collection(model, job)


# --------------------------------------------------------------------------------------------- API
def _reference_file_for(root, model_name: str, module: str) -> Path | None:
    root = Path(root)
    for base in (root / cache_mod.sanitize(model_name), root):
        hits = sorted(base.glob(f"*_stats/{module}_*mom2*.npz"))
        if hits:
            return hits[0]
    return find_reference_stats(root, module)


def _model_name(model, model_name: str | None) -> str:
    if model_name:
        return str(model_name)
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)


def prepare_corpus(s: StatsConfig) -> Corpus:
    return load_corpus(CorpusSpec.from_config(s))


def effective_max_length(model, s: StatsConfig) -> int:
    """``stats.max_length`` capped at the model's context length (never the full context by default)."""
    ctx = get_adapter(model).context_length
    return int(min(int(s.max_length), ctx))


def layer_stats_keys(model, tok, layers: Sequence[int], s: StatsConfig, corpus: Corpus, model_name: str) -> dict[int, tuple[str, dict]]:
    """Cache key (hash, dict) of every requested layer (see ``massedit.stats.cache``)."""
    a = get_adapter(model)
    config_fp = cache_mod.model_config_fingerprint(model)
    tok_fp = cache_mod.tokenizer_fingerprint(tok)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    out = {}
    for layer in layers:
        out[layer] = cache_mod.stats_key(
            model_name=model_name, config_fp=config_fp, weights_fp=cache_mod.layer_input_weights_fingerprint(model, a, layer),
            model_dtype=dtype, module=a.rewrite_name(layer), tokenizer_fp=tok_fp, add_special_tokens=s.add_special_tokens,
            corpus=corpus.identity, seed=s.seed, n_samples=s.n_samples, n_tokens=s.n_tokens,
            max_length=effective_max_length(model, s), acc_dtype=s.acc_dtype_name,
        )
    return out


def collect_layer_stats(
    model, tok, layers: Sequence[int], stats_cfg: Any = None, *, model_name: str | None = None, progress: bool = True,
    engine: CollectionEngine | None = None, _interrupt_after: int | None = None,
) -> dict[int, LayerStats]:
    """Σ k kᵀ and N for each layer in ``layers`` (reference files, cache, or one collection pass by ``engine``,
    default the plain-torch loop)."""
    s = StatsConfig.from_config(stats_cfg)
    engine = engine or TorchEngine()
    a = get_adapter(model)
    try:
        layers = sorted({int(x) for x in layers})
    except (TypeError, ValueError):
        raise StatsConfigError(f"layers must be a list of integers, got {layers!r}") from None
    for layer in layers:
        a.rewrite_name(layer)  # IndexError with the model's layer count when out of range
    name = _model_name(model, model_name)
    out: dict[int, LayerStats] = {}

    if s.reference_dir:
        for layer in layers:
            module = a.rewrite_name(layer)
            path = _reference_file_for(s.reference_dir, name, module)
            if path is None:
                msg = f"no reference statistics for {module} under {s.reference_dir}"
                if s.reference_missing == "error":
                    raise FileNotFoundError(msg)
                log.warning("%s: computing them instead", msg)
                continue
            total, count = load_reference_stats(path)
            m = a.mlp_inner_size
            if tuple(total.shape) != (m, m):
                raise ReferenceStatsError(f"{path}: mom2.mom2 has shape {tuple(total.shape)}, expected ({m}, {m}) for {module}")
            if not bool(torch.isfinite(total).all()):
                raise ReferenceStatsError(f"{path}: mom2.mom2 holds NaN/Inf values")
            log.info("layer %d (%s): using reference statistics %s (N=%d)", layer, module, path, count)
            out[layer] = LayerStats(layer, module, total, count, "reference", str(path))
        if len(out) == len(layers):
            return out

    todo = [layer for layer in layers if layer not in out]
    corpus = prepare_corpus(s)
    keys = layer_stats_keys(model, tok, todo, s, corpus, name)
    cache_dir = Path(s.cache_dir).expanduser() if s.cache_dir else cache_mod.default_stats_cache_dir()
    paths = {layer: cache_mod.cache_path(cache_dir, name, corpus.ds_name, a.rewrite_name(layer), s.acc_dtype_name,
                                         keys[layer][0]) for layer in todo}
    missing = []
    if s.cache:
        clean_stale_tmp(cache_dir / cache_mod.sanitize(name))  # writes a killed run left behind
        clean_stale_tmp(cache_dir / "partial")
    for layer in todo:
        hit = _load_cached(paths[layer], keys[layer][0], a.mlp_inner_size) if s.cache and paths[layer].exists() else None
        if hit is not None:
            total, count, meta = hit
            log.info("layer %d (%s): cache hit %s (N=%d)", layer, a.rewrite_name(layer), paths[layer], count)
            out[layer] = LayerStats(layer, a.rewrite_name(layer), total, count, "cache", str(paths[layer]),
                                    keys[layer][0], keys[layer][1], meta)
        else:
            missing.append(layer)
    if not missing:
        return out

    # ---- collect all missing layers in one pass
    t0 = time.time()
    max_length = effective_max_length(model, s)
    tb = build_token_batches(tok, corpus.docs, max_length=max_length, batch_tokens=int(s.batch_tokens), seed=s.seed,
                             n_samples=s.n_samples, n_tokens=s.n_tokens, sort_window=s.sort_window,
                             add_special_tokens=s.add_special_tokens)
    modules = [a.rewrite_name(layer) for layer in missing]
    tmp_dir = None
    if s.cache:
        result_paths = {a.rewrite_name(layer): str(paths[layer]) for layer in missing}
        partial_dir = str(cache_dir / "partial")
    else:
        tmp_dir = tempfile.mkdtemp(prefix="massedit-stats-")
        result_paths = {a.rewrite_name(layer): str(Path(tmp_dir) / paths[layer].name) for layer in missing}
        partial_dir = None
    world = int(engine.world_size)
    runkey = stable_hash({"keys": sorted(keys[layer][0] for layer in missing), "batches": tb.fingerprint(),
                          "world": world})
    meta = {a.rewrite_name(layer): {"key": keys[layer][0], "key_dict": keys[layer][1], "layer": layer,
                                    "ds_name": corpus.ds_name, "model_name": name, "n_docs": tb.n_docs,
                                    "n_samples": s.n_samples, "max_length": max_length} for layer in missing}
    job = CollectionJob(modules=modules, token_batches=tb, acc_dtype=s.acc_dtype_name, result_paths=result_paths,
                        result_meta=meta, runkey=runkey, partial_dir=partial_dir,
                        checkpoint_every=int(s.checkpoint_every or 0),
                        checkpoint_seconds=float(s.checkpoint_seconds or 0), progress=progress,
                        blocks=SYMMETRY_BLOCKS,
                        interrupt_after=_interrupt_after)
    log.info("collecting second moments of %s over %d tokens (%d documents, %d batches, max_length %d, %s sums, %d rank(s))",
             modules, tb.n_tokens, tb.n_docs, len(tb.batches), max_length, s.acc_dtype_name, world)
    log.warning("first-time statistics for %s: %d layer(s) x %s tokens of %s (one pass, ETA shown once it is measured); "
                "%s", name, len(modules), f"{tb.n_tokens:,}", corpus.ds_name,
                f"cached in {cache_dir} for every later run" if s.cache else "not cached (stats.cache=false)")
    try:
        state = engine(model, job)
        for layer in missing:
            module = a.rewrite_name(layer)
            total, count, fmeta = _collected(state, module, result_paths[module], meta[module])
            out[layer] = LayerStats(layer, module, total, count, "computed",
                                    str(paths[layer]) if s.cache else None, keys[layer][0], keys[layer][1], fmeta)
        job.clear_partials(world)
    finally:
        if tmp_dir:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    dt = time.time() - t0
    log.info("collected %d layers over %d tokens in %.1f s (%.0f tokens/s)", len(missing), tb.n_tokens, dt,
             tb.n_tokens / max(dt, 1e-9))
    return out


def _collected(state, module: str, path: str, meta: dict) -> tuple[torch.Tensor, int, dict]:
    """A freshly collected layer: the file rank 0 wrote, else (another node, or ``stats.cache=false`` with its
    per-process temporary folder) the all-reduced sums the engine returned, which are the same numbers."""
    if Path(path).exists() or not isinstance(state, MomentState):
        return cache_mod.load_stats_file(path)
    return state.full_sums()[module].cpu(), int(state.count), dict(meta, count=int(state.count))


def _load_cached(path: Path, key: str, m: int):
    """A verified cache entry ``(sum, count, meta)``, or None after discarding a corrupt one (logged: it is
    recomputed)."""
    try:
        return cache_mod.load_stats_file(path, expect_key=key, expect_size=m)
    except cache_mod.CorruptStatsFile as e:
        log.warning("discarding corrupt statistics cache entry %s (%s); recomputing it", path, e)
        try:
            path.unlink()
        except OSError:
            pass
        return None


def get_second_moments(model, tok, layers: list[int], stats_cfg: Any = None, *, model_name: str | None = None,
                       progress: bool = True, engine: CollectionEngine | None = None) -> dict[int, torch.Tensor]:
    """``{layer: C}`` with ``C = E[k kᵀ] = (Σ_t k_t k_tᵀ) / N`` of the rewrite-module input of each layer
    (REFERENCE_SPEC §0.6): float32, CPU, shape ``[m, m]``.

    Sources per layer: ``stats_cfg.reference_dir`` npz files when set (the file used is logged), else the
    content-addressed cache (a hit runs no forward pass), else one collection pass over the corpus for all
    missing layers that stops after the highest of them. ``stats_cfg`` is a ``stats`` config
    (``configs/stats/default.yaml``; any missing key takes its default)."""
    stats = collect_layer_stats(model, tok, layers, stats_cfg, model_name=model_name, progress=progress, engine=engine)
    return {layer: st.C.cpu() for layer, st in stats.items()}


def get_second_moment(model, tok, layer: int, stats_cfg: Any = None, *, model_name: str | None = None,
                      progress: bool = True, engine: CollectionEngine | None = None) -> torch.Tensor:
    """``C`` of one layer (see :func:`get_second_moments`)."""
    return get_second_moments(model, tok, [int(layer)], stats_cfg, model_name=model_name, progress=progress,
                              engine=engine)[int(layer)]
