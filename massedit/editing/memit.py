"""MEMIT: mass-editing memory in a transformer (REFERENCE_SPEC §2).

For a batch of requests: target hidden states ``z_i`` at the output of block ``L = max(R)`` (§2.2,
optimised on the model as it is when the batch starts), then for each layer ``l`` of R in ascending
order, on the model carrying the lower layers' updates (§2.1):

    K_l = keys at layer l (two-level template mean)          [m, N]
    E   = Z - H_L   (H_L: block-L output, bare prompts)       [d, N]
    A   = solve(λ C_l + K_l K_l^T, K_l)        (float64)      [m, N]
    E_l = E / (|R| - i)
    ΔW_l = E_l A^T                                            [d, m] (out x in)

Requests are processed in batches of ``batch_size`` (None: all at once); each batch is edited on
top of the previous ones, and the returned deltas are the total change.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

from massedit.core.adapters import get_adapter
from massedit.core.collective import Collective, balanced_shards, gather_by_index, gather_columns, is_distributed
from massedit.core.deltas import Deltas
from massedit.core.placement import param_storage
from massedit.core.guards import EditGuardError, check_finite
from massedit.core.models import model_fingerprint
from massedit.core.profiling import stage
from massedit.core.progress import progress_bar
from massedit.editing.context_templates import as_groups, flatten
from massedit.editing.hparams import EditHparams
from massedit.editing.keys import MemitKeyReader
from massedit.editing.editor import RomeMemitEditor
from massedit.editing.target_cache import TargetCache
from massedit.editing.targets import TargetResult, build_target_problem, optimise_targets, summarize_results

log = logging.getLogger(__name__)

_Z_HINT = "the target optimisation diverged: lower method.v_lr, or check the model / cache"


def memit_solve(K: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """``A = (λ C + K K^T)^-1 K`` in float64 (``torch.linalg.solve``), ``[m, N]``."""
    K = K.double()
    return torch.linalg.solve(lam * C.double() + K @ K.T, K)


def spread_residual(E: torch.Tensor, i: int, n_layers: int) -> torch.Tensor:
    """``E_l = E / (|R| - i)``: the i-th layer (0-based, ascending) takes its share of what remains."""
    return E.double() / (n_layers - i)


def memit_layer_update(K: torch.Tensor, E: torch.Tensor, C: torch.Tensor, lam: float, i: int, n_layers: int):
    """``(A, E_l, ΔW = E_l A^T)`` for one layer; ΔW is ``[d, m]`` float64."""
    A = memit_solve(K, C.to(K.device), lam)
    E_l = spread_residual(E, i, n_layers)
    return A, E_l, E_l @ A.T


def request_weights(tok, requests, hp: EditHparams, templates: Sequence[str]) -> list[int]:
    """Work per request for splitting it across ranks: the tokens of its optimisation rows (templates + KL row)."""
    return [sum(len(x) for x in build_target_problem(tok, r, templates, hp.fact_token, hp.teacher_forcing,
                                                     hp.kl_prompt).input_ids) for r in requests]


def request_shards(tok, requests, hp: EditHparams, templates: Sequence[str], collective: Collective | None) -> list[list[int]]:
    """Which requests each rank works on: :func:`~massedit.core.collective.balanced_shards` of their token counts
    (the same split on every rank, computed without talking). One process: everything on rank 0."""
    if not is_distributed(collective):
        return [list(range(len(requests)))]
    return balanced_shards(request_weights(tok, requests, hp, templates), collective.world_size)


def compute_targets(model, tok, requests, hp: EditHparams, templates: Sequence[str], *, cache: TargetCache | None = None,
                    progress: bool = True, batched: bool | None = None, collective: Collective | None = None,
                    shards: list[list[int]] | None = None, timing: dict | None = None) -> list[TargetResult]:
    """z for every request at block ``L = max(layers)`` (cached per request when ``cache`` is given).

    With a ``collective`` of several ranks each rank optimises (or reads from the cache) only its share
    (``shards[rank]``, default :func:`request_shards`) and every rank returns all results, gathered in request order.
    Each rank reads and writes the cache entries of its own share only (entries are written atomically).
    ``timing``: gets this rank's own computing time (``z_s``) and share size (``z_requests``)."""
    if is_distributed(collective):
        shards = shards or request_shards(tok, requests, hp, templates, collective)
        mine = shards[collective.rank]
        t0, c0 = time.perf_counter(), time.process_time()
        local = _compute_targets_here(model, tok, [requests[i] for i in mine], hp, templates, cache=cache,
                                      progress=progress and collective.rank == 0, batched=batched) if mine else []
        if timing is not None:
            timing.update(z_s=round(time.perf_counter() - t0, 3), z_cpu_s=round(time.process_time() - c0, 3),
                          z_requests=len(mine))
        return gather_by_index(collective, mine, local, len(requests))
    t0, c0 = time.perf_counter(), time.process_time()
    out = _compute_targets_here(model, tok, requests, hp, templates, cache=cache, progress=progress, batched=batched)
    if timing is not None:
        timing.update(z_s=round(time.perf_counter() - t0, 3), z_cpu_s=round(time.process_time() - c0, 3),
                      z_requests=len(requests))
    return out


def _compute_targets_here(model, tok, requests, hp: EditHparams, templates: Sequence[str], *,
                          cache: TargetCache | None = None, progress: bool = True,
                          batched: bool | None = None) -> list[TargetResult]:
    adapter = get_adapter(model)
    L = hp.z_layer
    loss_layer = max(hp.v_loss_layer if hp.v_loss_layer is not None else adapter.num_layers - 1, L)
    nll_block = adapter.block_name(min(loss_layer, adapter.num_layers - 1))
    module = adapter.block_name(L)
    problems = [build_target_problem(tok, r, templates, hp.fact_token, hp.teacher_forcing, hp.kl_prompt) for r in requests]
    results: list[TargetResult | None] = [None] * len(requests)
    keys = None
    if cache is not None:
        fp = model_fingerprint(model)
        keys = [cache.key(model_fp=fp, method="memit", module=module, hp=hp, templates=templates, request=r) for r in requests]
        for i, k in enumerate(keys):
            results[i] = cache.get(k)
    todo = [i for i, r in enumerate(results) if r is None]
    if cache is not None:
        log.info("memit z: %d of %d request(s) from the target cache %s, %d to optimise", len(requests) - len(todo),
                 len(requests), cache.dir, len(todo))
    if todo:
        def on_result(j, res):
            if cache is not None:
                cache.put(keys[todo[j]], res)

        new = optimise_targets(model, tok, [problems[i] for i in todo], hp, edit_module=module, edit_is_block=True,
                               nll_block=nll_block, batched=batched, on_result=on_result, progress=progress, desc="memit z",
                               prefix_block=L, done_before=len(requests) - len(todo))
        for i, r in zip(todo, new):
            results[i] = r
    return results  # type: ignore[return-value]


def _add_times(timing: dict, what: str, t0: float, c0: float) -> None:
    timing[f"{what}_s"] = round(timing.get(f"{what}_s", 0.0) + time.perf_counter() - t0, 3)
    timing[f"{what}_cpu_s"] = round(timing.get(f"{what}_cpu_s", 0.0) + time.process_time() - c0, 3)


def keys_and_hidden(reader: MemitKeyReader, layer: int, n: int, collective: Collective | None = None,
                    shards: list[list[int]] | None = None, timing: dict | None = None):
    """``K [m, N]`` (keys at ``layer``, §2.3) and ``H [d, N]`` (block ``z_layer`` output at the bare prompts) on the
    current model; ``reader`` holds this rank's share of the ``n`` requests (all of them on one rank), whose columns
    are gathered across ranks. ``timing["keys_s"]`` (wall) and ``keys_cpu_s`` (this process's CPU) accumulate this
    rank's own computing time."""
    t0, c0 = time.perf_counter(), time.process_time()
    a = reader.adapter
    if reader.requests:
        K, H = reader.read(layer)
    else:  # nothing to read on this rank; it still takes part in the gathers
        device = next(reader.model.parameters()).device
        K, H = torch.zeros(a.mlp_inner_size, 0, device=device), torch.zeros(a.hidden_size, 0, device=device)
    if timing is not None:
        _add_times(timing, "keys", t0, c0)
    if not is_distributed(collective):
        return K, H
    mine = shards[collective.rank]
    return gather_columns(collective, mine, K.float(), n), gather_columns(collective, mine, H.float(), n)


def apply_memit_batch(model, tok, requests, hp: EditHparams, template_groups, C_by_layer: dict[int, torch.Tensor], *,
                      cache: TargetCache | None = None, progress: bool = True, keep_intermediates: bool = True,
                      targets: list[TargetResult] | None = None, collective: Collective | None = None):
    """One MEMIT batch, leaving the model **edited** (caller restores). Returns ``(deltas, intermediates)``.

    ``collective`` (several ranks): z, keys and bare-prompt outputs are computed on each rank for its share of the
    requests and gathered; every rank then solves the same float64 system per layer and writes the same weights."""
    adapter = get_adapter(model)
    groups = as_groups(template_groups)
    flat = flatten(groups)
    layers = sorted(hp.layers)
    L = hp.z_layer
    device = next(model.parameters()).device
    shards = request_shards(tok, requests, hp, flat, collective)
    timing: dict = {}
    if targets is None:
        with stage("z"):
            targets = compute_targets(model, tok, requests, hp, flat, cache=cache, progress=progress,
                                      collective=collective, shards=shards, timing=timing)
    for t in targets:  # before any weight is written
        check_finite(t.target, f"memit: target z of request case_id={t.case_id}", hint=_Z_HINT)
    solver = torch.device(hp.solver_device) if getattr(hp, "solver_device", None) else device
    Z = torch.stack([t.target for t in targets], dim=1).to(solver)  # [d, N]
    originals = {l: adapter.rewrite_weight(l).detach().clone() for l in layers}
    deltas: Deltas = {}
    per_layer = []
    mine = [requests[i] for i in shards[collective.rank]] if is_distributed(collective) else requests
    reader = MemitKeyReader(model, tok, adapter, mine, groups, L, hp.fact_token, layers[0], hp.keys_reuse_max_gib,
                            attention=hp.block_attention)
    with stage("keys_solve"), progress_bar(len(layers), "memit keys+solve", unit="layer", transient=True,
                                           enabled=progress and (collective is None or collective.rank == 0)) as bar:
        for i, l in enumerate(layers):
            K, H = keys_and_hidden(reader, l, len(requests), collective, shards, timing)
            K, H = K.to(solver), H.to(solver)  # [m, N], [d, N]
            E = Z - H
            check_finite(K, f"memit: keys K of layer {l}", hint="the model's weights or inputs hold NaN/Inf")
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                A, E_l, upd = memit_layer_update(K, E, C_by_layer[l], hp.mom2_update_weight, i, len(layers))
            except torch.linalg.LinAlgError as e:
                raise EditGuardError(f"memit: λC + KKᵀ of layer {l} is singular ({e}); check the statistics") from None
            _add_times(timing, "solve", t0, c0)
            check_finite(A, f"memit: solve (λC + KKᵀ)⁻¹K of layer {l} (λ=method.mom2_update_weight="
                         f"{hp.mom2_update_weight})", hint="C is singular or corrupt: check the statistics")
            check_finite(upd, f"memit: update ΔW of layer {l}")
            w = adapter.rewrite_weight(l)
            upd_param = adapter.to_param_layout(upd).float()
            with torch.no_grad():
                w.copy_((originals[l].float() + upd_param.to(w.device)).to(w.dtype))
            deltas[adapter.rewrite_weight_name(l)] = upd_param.cpu()
            if keep_intermediates:
                per_layer.append({"layer": l, "i": i, "weight_name": adapter.rewrite_weight_name(l), "K": K.cpu(), "H": H.cpu(),
                                  "E": E.cpu(), "A": A.cpu(), "E_l": E_l.cpu()})
            bar.update(1)
    per_rank = collective.all_gather_object(timing) if is_distributed(collective) else [timing]
    inter = {"Z": Z.cpu(), "z_layer": L, "layers": layers, "lambda": hp.mom2_update_weight, "per_layer": per_layer,
             "timing_per_rank": per_rank,
             "requests": [{"case_id": t.case_id, "z0": t.init, "delta": t.delta, "z": t.target,
                           "n_adam_steps": t.n_adam_steps, "early_stopped": t.early_stopped, "loss_trace": t.loss_trace,
                           "from_cache": t.from_cache} for t in targets]}
    return deltas, inter


def apply_memit(model, tok, requests, hp: EditHparams, template_groups, C_by_layer: dict[int, torch.Tensor], *,
                cache: TargetCache | None = None, progress: bool = True, keep_intermediates: bool = True,
                collective: Collective | None = None):
    """MEMIT over ``requests`` in batches of ``hp.batch_size``; model restored; returns ``(deltas, info)``."""
    adapter = get_adapter(model)
    layers = sorted(hp.layers)
    missing = [l for l in layers if l not in C_by_layer]
    if missing:
        raise ValueError(f"MEMIT needs C for layers {missing}")
    requests = list(requests)
    bs = int(hp.batch_size) if hp.batch_size else max(1, len(requests))
    originals = {adapter.rewrite_weight_name(l): adapter.rewrite_weight(l).detach().clone() for l in layers}
    batches = [requests[s : s + bs] for s in range(0, len(requests), bs)]
    inters = []
    try:
        for b, chunk in enumerate(batches):
            if len(batches) > 1:
                log.info("MEMIT batch %d/%d (%d requests)", b + 1, len(batches), len(chunk))
            _, inter = apply_memit_batch(model, tok, chunk, hp, template_groups, C_by_layer, cache=cache,
                                         progress=progress, keep_intermediates=keep_intermediates,
                                         collective=collective)
            inters.append(inter)
        with torch.no_grad():
            deltas = {n: (param_storage(adapter.model, n).detach().float() - w.float()).cpu() for n, w in originals.items()}
        if len(batches) == 1:  # exact float32 cast of E_l A^T (W + Δ reproduces the edited weight)
            deltas = {p["weight_name"]: adapter.to_param_layout(p["E_l"] @ p["A"].T).float() for p in inters[0]["per_layer"]} \
                if keep_intermediates else deltas
    finally:
        with torch.no_grad():
            for n, w in originals.items():
                param_storage(adapter.model, n).copy_(w)
    return deltas, {"batches": inters}


class MemitEditor(RomeMemitEditor):
    """``MemitEditor(hparams, stats).edit(model, tok, requests) -> deltas`` (model left as found)."""

    method = "memit"
    distributed = "shared"  # several ranks: z, keys and H split by request (ApplyEdit hands over the collective)

    def edit(self, model, tok, requests) -> Deltas:
        t0 = time.time()
        hp = self.hparams.validate(get_adapter(model).num_layers)
        groups = as_groups(self.get_context_templates(model, tok))
        C = self.get_stats(model, tok, hp.layers)
        deltas, inter = apply_memit(model, tok, list(requests), hp, groups, C, cache=self.cache, progress=self.progress,
                                    collective=self.collective)
        self.intermediates = inter
        from types import SimpleNamespace

        tr = [SimpleNamespace(n_adam_steps=r["n_adam_steps"], early_stopped=r["early_stopped"],
                              final_loss=float(r["loss_trace"][-1, 1]) if r["loss_trace"].numel() else float("nan"),
                              from_cache=r["from_cache"]) for b in inter["batches"] for r in b["requests"]]
        self.info.update({
            "method": "memit", "n_requests": len(requests), "layers": hp.layers, "lambda": hp.mom2_update_weight,
            "batch_size": hp.batch_size, "n_templates": len(flatten(groups)), "targets": summarize_results(tr),
            "seconds": round(time.time() - t0, 2), "delta_norms": {k: float(v.norm()) for k, v in deltas.items()},
            "world_size": self.collective.world_size if self.collective is not None else 1,
            "timing_per_rank": [b["timing_per_rank"] for b in inter["batches"]],  # own compute seconds of each rank
        })
        return deltas
