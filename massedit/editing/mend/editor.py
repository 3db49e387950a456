"""Applying a (trained) MEND editor to many requests at once (REFERENCE_SPEC §5.6, §5.7).

Concurrent edits combine through one loss = mean NLL over all target tokens of all k requests, one
backward, and one transformed pseudo-gradient ``Σ_rows x̂ δ̂ᵀ`` per weight. Because the editor runs in
eval mode (fixed normalisation statistics) it acts on each factor row independently, so the sum over
rows can be accumulated chunk by chunk: each chunk's loss is its *summed* NLL divided by the token
count of the whole request set, which gives exactly the rows of the single big batch. Memory is bounded
by the chunk size, and every request contributes.

Deviation from the MEMIT repo's ``MendRewriteExecutor`` (§5.7, [QUIRK]): the reference keeps only the
last chunk's factors (≤128 requests), runs the editor in training mode (re-estimating the
normalisation from the edit rows) and swaps GPT-2's learned LRs. None of these is replicated: all
chunks count, the checkpoint's statistics are used, and LRs are indexed by inner parameter.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from massedit.core.collective import Collective, balanced_shards, is_distributed
from massedit.core.deltas import Deltas
from massedit.core.placement import param_storage
from massedit.data.requests import EditRequest

from .config import MendConfig, MendConfigError
from .factors import (build_edit_batch, capture_factors, inner_params, model_device, token_nll)
from .network import InnerParam, MendNet, MendNetConfig, to_param_layout

log = logging.getLogger(__name__)


class MendCheckpointError(MendConfigError):
    """``method.checkpoint`` cannot be used (unreadable, not a MEND editor, or made for another model)."""


def inner_params_from_cfg(model: nn.Module, method_cfg: MendConfig) -> list[InnerParam]:
    """Inner parameters from ``method.layers`` (null: last ``method.num_layers``) and ``method.projections``."""
    layers = method_cfg.layers
    return inner_params(model, list(layers) if layers is not None else None,
                        projections=list(method_cfg.projections), num_layers=int(method_cfg.num_layers))


def build_mend_net(model: nn.Module, method_cfg: MendConfig) -> MendNet:
    """A fresh (identity-initialised) editor for ``model`` from the method config."""
    net = MendNet(inner_params_from_cfg(model, method_cfg), MendNetConfig.from_cfg(method_cfg))
    p = next(model.parameters())
    return net.to(p.device)


def request_texts(requests: Sequence[EditRequest]) -> tuple[list[str], list[str]]:
    """Edit inputs: ``prompt.format(subject)`` and ``target_new`` per request (§5.7)."""
    return [r.filled_prompt for r in requests], [r.target_new for r in requests]


def total_target_tokens(tok, requests: Sequence[EditRequest]) -> int:
    from massedit.core.tokenization import target_token_ids

    return sum(len(target_token_ids(tok, r.target_new)) for r in requests)


CONCURRENT_LOSSES = ("request_sum", "tokens_mean")


def accumulate_pseudo_gradients(model: nn.Module, tok, net: MendNet, requests: Sequence[EditRequest], *,
                                chunk_size: int = 64, max_length: int | None = None,
                                progress: bool = False, concurrent_loss: str = "request_sum",
                                n_total: int | None = None) -> dict[str, torch.Tensor]:
    """``{param -> Σ over all requests' rows of x̂ δ̂ᵀ}`` (``[out, in]``, fp32), computed in chunks.

    ``concurrent_loss``:

    * ``tokens_mean`` (reference §5.6): one loss = mean target NLL over all tokens of all requests; a
      chunk's loss is its summed NLL divided by the token count of *all* requests, so the factor rows are
      those of one batch holding every request.
    ``n_total`` (``tokens_mean``): the target-token count of the whole request set when ``requests`` is one rank's
    share of it (default: the tokens of ``requests``).

    * ``request_sum`` (default): the sum over requests of each request's own token-mean NLL, so every
      request's ``δ`` rows have the scale the editor was trained on, and (the editor acting row-wise in
      eval mode) the result is exactly the sum of the N single-request MEND edits. With ``tokens_mean``
      each ``δ`` shrinks by ~1/N and, after the editor's mean-subtracting normalisation, the edits vanish
      (measured in docs/readme/mend.md).
    """
    if concurrent_loss not in CONCURRENT_LOSSES:
        raise ValueError(f"method.concurrent_loss must be one of {CONCURRENT_LOSSES}, got {concurrent_loss!r}")
    if not requests:
        return {}
    dev = model_device(model)
    n_total = total_target_tokens(tok, requests) if n_total is None else int(n_total)
    g_sum: dict[str, torch.Tensor] = {}
    chunks = [requests[i: i + chunk_size] for i in range(0, len(requests), chunk_size)]
    from massedit.core.progress import progress_bar

    bar = progress_bar(len(chunks), "MEND factors", unit="chunk", enabled=progress and len(chunks) > 1)
    for chunk in chunks:
        prompts, targets = request_texts(chunk)
        batch = build_edit_batch(tok, prompts, targets, max_length).to(dev)

        def loss_fn():
            logits = model(**batch.model_inputs()).logits
            nll, mask = token_nll(logits, batch.labels)
            if concurrent_loss == "tokens_mean":
                return nll.sum() / n_total
            return (nll.sum(-1) / mask.sum(-1).clamp_min(1)).sum()

        _, factors = capture_factors(model, net.inner, loss_fn, row_mask=batch.attention_mask)
        net_dev = next(net.parameters()).device
        with torch.no_grad():
            for k, p in enumerate(net.inner):
                x, d = factors[p.param]  # on the device the module ran on (model.device_map: any of them)
                g = net.transformed_gradient(k, x.to(net_dev), d.to(net_dev))
                g_sum[p.param] = g_sum[p.param] + g if p.param in g_sum else g
        bar.update(1)
    bar.close()
    return g_sum


def request_token_counts(tok, requests: Sequence[EditRequest]) -> list[int]:
    """Prompt + target tokens per request: the work of one request, for splitting requests across ranks."""
    from massedit.core.tokenization import encode, target_token_ids

    return [len(encode(tok, r.filled_prompt)) + len(target_token_ids(tok, r.target_new)) for r in requests]


def shared_pseudo_gradients(model: nn.Module, tok, net: MendNet, requests: Sequence[EditRequest],
                            collective: Collective, **kwargs) -> dict[str, torch.Tensor]:
    """:func:`accumulate_pseudo_gradients` with the requests split across ranks (balanced by tokens): each rank
    sums the pseudo-gradients of its share and the sums are all-reduced, so every rank holds the total."""
    requests = list(requests)
    mine = balanced_shards(request_token_counts(tok, requests), collective.world_size)[collective.rank]
    share = [requests[i] for i in mine]
    g = accumulate_pseudo_gradients(model, tok, net, share, n_total=total_target_tokens(tok, requests), **kwargs)
    dt = next(net.parameters()).dtype
    dev = model_device(model)
    return {p.param: collective.all_reduce_sum(g[p.param] if p.param in g else
                                               torch.zeros(p.out_dim, p.in_dim, dtype=dt, device=dev))
            for p in net.inner} if requests else {}


def mend_deltas(model: nn.Module, tok, net: MendNet, requests: Sequence[EditRequest], *, chunk_size: int = 64,
                lr_scale: float = 1.0, max_length: int | None = None, progress: bool = False,
                concurrent_loss: str = "request_sum", collective: Collective | None = None) -> Deltas:
    """One deltas dict (param name -> ΔW in the parameter's layout) for all ``requests`` together
    (see :func:`accumulate_pseudo_gradients` for ``concurrent_loss``). ``collective`` (several ranks): the
    pseudo-gradients are accumulated per rank over its share of the requests and all-reduced
    (:func:`shared_pseudo_gradients`); every rank returns the same deltas."""
    was_training = net.training
    net.eval()
    try:
        kw = dict(chunk_size=chunk_size, max_length=max_length, concurrent_loss=concurrent_loss)
        if is_distributed(collective):
            g = shared_pseudo_gradients(model, tok, net, requests, collective,
                                        progress=progress and collective.rank == 0, **kw)
        else:
            g = accumulate_pseudo_gradients(model, tok, net, requests, progress=progress, **kw)
        out: Deltas = {}
        with torch.no_grad():
            for k, p in enumerate(net.inner):
                if p.param not in g:
                    continue
                dw = lr_scale * net.scale_update(k, g[p.param])
                dw = to_param_layout(p, dw).contiguous()
                w = param_storage(model, p.param)  # where the weight lives (offloaded: its in-memory copy)
                if tuple(dw.shape) != tuple(w.shape):
                    raise RuntimeError(f"MEND delta for {p.param} has shape {tuple(dw.shape)}, weight {tuple(w.shape)}")
                out[p.param] = dw.to(device=w.device)
        return out
    finally:
        net.train(was_training)


def deltas_from_factors(net: MendNet, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                        lr_scale: float = 1.0) -> Deltas:
    """Deltas (parameter layout) of one edit problem from already captured raw factors (no grad)."""
    out: Deltas = {}
    with torch.no_grad():
        for k, p in enumerate(net.inner):
            if p.param in factors:
                x, d = factors[p.param][:2]
                out[p.param] = to_param_layout(p, lr_scale * net.scale_update(k, net.transformed_gradient(k, x, d))).contiguous()
    return out


# ----------------------------------------------------------------------------------- checkpoints
def save_editor(path, net: MendNet, meta: dict | None = None) -> Path:
    """Plain editor file: ``{"state_dict", "describe", "meta"}`` (atomic)."""
    from massedit.core.io import atomic_torch_save

    sd = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return atomic_torch_save(path, {"format": "massedit-mend-v1", "state_dict": sd, "describe": net.describe(),
                                    "meta": meta or {}})


def load_editor(path, model: nn.Module | None = None, method_cfg=None) -> MendNet:
    """Load an editor from :func:`save_editor`'s file or a Lightning checkpoint of the MEND module.

    Read with ``torch.load(weights_only=True)``: tensors and plain containers only, a pickled object is refused
    (never run). The stored inner parameters must exist in ``model`` with matching shapes; a clear error
    (:class:`MendCheckpointError`, naming the file and the parameter) otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"MEND checkpoint not found: {path}")
    if path.is_dir():
        raise MendCheckpointError(f"method.checkpoint={path}: is a directory, expected mend_editor.pt or a .ckpt file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers only
    except Exception as e:
        raise MendCheckpointError(f"{path} is not a loadable MEND editor file or checkpoint ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]})") from None
    if isinstance(obj, dict) and obj.get("format") == "massedit-mend-v1":
        desc, sd = obj.get("describe"), obj.get("state_dict")
    elif isinstance(obj, dict) and "state_dict" in obj and "mend_describe" in obj:  # Lightning checkpoint
        desc = obj["mend_describe"]
        sd = {k[len("net."):]: v for k, v in obj["state_dict"].items() if k.startswith("net.")}
    else:
        raise MendCheckpointError(f"{path} is neither a massedit MEND editor file nor a MEND Lightning checkpoint")
    try:
        net = MendNet.from_description(desc)
        net.load_state_dict(sd)
    except Exception as e:
        raise MendCheckpointError(f"{path}: the editor's description / weights do not fit together ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]})") from None
    for name, t in sd.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise MendCheckpointError(f"{path}: editor weight {name!r} has non-finite values (NaN/Inf)")
    if model is not None:
        params = dict(model.named_parameters())
        for p in net.inner:
            if p.param not in params:
                raise MendCheckpointError(f"MEND checkpoint {path} edits {p.param!r}, which this model does not have "
                                          f"(trained for another architecture?)")
            if tuple(params[p.param].shape) != p.param_shape:
                raise MendCheckpointError(f"MEND checkpoint {path}: {p.param} has shape {p.param_shape}, "
                                          f"the model's weight {tuple(params[p.param].shape)}")
        net.to(next(model.parameters()).device)
    return net


class MendEditor:
    """``Editor`` of ``method=mend``: all requests are edited concurrently (§5.6) in chunks of
    ``method.edit_chunk_size``; the model is left exactly as found (no weight is written; hooks removed).
    Without a checkpoint the identity-initialised editor is used (with ``norm`` its statistics are unset,
    so the edit is the plain gradient step scaled by the initial ``edit_lr``) and a warning is logged.
    """

    method = "mend"
    distributed = "shared"  # several ranks: requests split, pseudo-gradients all-reduced (collective from ApplyEdit)

    def __init__(self, cfg: MendConfig, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.net: MendNet | None = None
        self.info: dict[str, Any] = {}
        self.collective: Collective | None = None

    def load(self, model: nn.Module) -> MendNet:
        if self.cfg.checkpoint:
            return load_editor(self.cfg.checkpoint, model)
        log.warning("method.checkpoint is not set: using an UNTRAINED (identity-initialised) MEND editor")
        return build_mend_net(model, self.cfg)

    def edit(self, model: nn.Module, tok, requests: Sequence[EditRequest]) -> Deltas:
        if self.net is None:
            self.net = self.load(model)
        t0 = time.perf_counter()
        c = self.cfg
        deltas = mend_deltas(model, tok, self.net, list(requests), chunk_size=int(c.edit_chunk_size),
                             lr_scale=float(c.lr_scale), max_length=c.max_length, progress=self.progress,
                             concurrent_loss=c.concurrent_loss, collective=self.collective)
        seconds = time.perf_counter() - t0
        self.info = {"method": "mend", "n_requests": len(requests), "seconds": round(seconds, 2),
                     "checkpoint": c.checkpoint, "delta_norms": {k: float(v.norm()) for k, v in deltas.items()}}
        log.info("MEND edited %d requests in %.1f s", len(requests), seconds)
        return deltas
