"""The ``Editor`` protocol every method implements, and the shared base of the ROME and MEMIT editors.

An editor turns requests into weight deltas and leaves the model exactly as it found it::

    deltas = editor.edit(model, tok, requests)     # {param name: ΔW in the parameter's shape}
    editor.info                                    # a JSON-able summary of the last edit (timings, steps, norms)

Editors do no file I/O of their own apart from caches they were given; where the statistics come from is
injected as a :data:`StatsProvider`, so the same editor runs in plain torch, in a Lightning callback or in a
benchmark.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from massedit.core.collective import Collective, is_distributed
from massedit.core.deltas import Deltas
from massedit.core.guards import check_second_moment
from massedit.core.profiling import stage
from massedit.editing.context_templates import sample_memit_templates, sample_rome_templates
from massedit.editing.hparams import EditHparams
from massedit.editing.target_cache import TargetCache

log = logging.getLogger(__name__)

StatsProvider = Callable[[Any, Any, Sequence[int]], dict[int, torch.Tensor]]
"""``provider(model, tok, layers) -> {layer: C}``: the second moment ``C = E[k kᵀ]`` of each layer's rewrite-module
input (float32 ``[m, m]``), computed on the unedited model."""


@runtime_checkable
class Editor(Protocol):
    """``edit(model, tok, requests) -> deltas``; the model is left as found. ``info``: summary of the last edit."""

    info: dict[str, Any]

    def edit(self, model, tok, requests) -> Deltas: ...


class SavedDeltasEditor:
    """An ``Editor`` that re-applies a saved delta file (``deltas=PATH``) instead of computing an edit."""

    method = "saved"

    def __init__(self, path):
        self.path = path
        self.info: dict[str, Any] = {}

    def edit(self, model, tok, requests) -> Deltas:
        from massedit.core.deltas import load_deltas

        deltas = load_deltas(self.path)
        self.info = {"method": "saved", "path": str(self.path), "n_requests": len(requests)}
        return deltas


class RomeMemitEditor:
    """Shared by :class:`~massedit.editing.rome.RomeEditor` and :class:`~massedit.editing.memit.MemitEditor`.

    ``hparams``: an :class:`EditHparams` (a ``RomeConfig``/``MemitConfig`` is one); ``stats``: where C comes from
    (``None`` only for ROME without ``mom2_adjustment``); ``context_templates``: fixed templates, else sampled
    once from the unedited model with ``template_seed``; ``cache``: the on-disk z / v* cache (MEMIT).
    """

    method = "base"

    def __init__(self, hparams: EditHparams, stats: StatsProvider | None = None, *, context_templates=None,
                 template_seed: int = 0, cache: TargetCache | None = None, progress: bool = True):
        self.hparams = hparams
        self.stats_provider = stats
        self.context_templates = context_templates
        self.template_seed = int(template_seed)
        self.cache = cache
        self.progress = progress
        self.info: dict[str, Any] = {}
        self.intermediates: dict[str, Any] = {}
        self.collective: Collective | None = None  # several ranks: set by the caller (ApplyEdit) for one edit

    def get_context_templates(self, model, tok):
        """The configured templates, else sampled once from the (unedited) model with the seed (several ranks:
        sampled on rank 0 and broadcast, so that every rank uses the same ones)."""
        if self.context_templates is None and is_distributed(self.collective):
            mine = self._sample_templates(model, tok) if self.collective.rank == 0 else None
            self.context_templates = self.collective.broadcast_object(mine, src=0)
        return self._sample_templates(model, tok)

    def _sample_templates(self, model, tok):
        if self.context_templates is None:
            t0 = time.time()
            hp = self.hparams
            with stage("templates"):
                if self.method == "rome":
                    self.context_templates = sample_rome_templates(model, tok, hp.context_template_length_params,
                                                                   seed=self.template_seed)
                else:
                    self.context_templates = sample_memit_templates(model, tok, hp.memit_template_prompts,
                                                                    hp.memit_template_length_params,
                                                                    seed=self.template_seed)
            log.info("sampled %s context templates in %.1f s", self.method, time.time() - t0)
        return self.context_templates

    def required_layers(self) -> list[int]:
        """Layers whose statistics :meth:`edit` will ask for (none for ROME without ``mom2_adjustment``)."""
        return list(self.hparams.layers) if (self.method == "memit" or self.hparams.mom2_adjustment) else []

    def prefetch_stats(self, model, tok) -> None:
        """Compute C now (e.g. with a Trainer that must not run inside another stage) and keep it for :meth:`edit`."""
        layers = self.required_layers()
        if layers and self.stats_provider is not None:
            C = self.get_stats(model, tok, layers)
            self.stats_provider = lambda m, t, ls: {int(l): C[int(l)] for l in ls}

    def get_stats(self, model, tok, layers) -> dict[int, torch.Tensor]:
        if self.stats_provider is None:
            raise ValueError(f"{self.method} needs second-moment statistics: give the editor a stats provider")
        t0 = time.time()
        with stage("stats"):
            C = self.stats_provider(model, tok, list(layers))
        missing = [l for l in layers if int(l) not in C]
        if missing:
            raise RuntimeError(f"statistics provider returned no C for layers {missing}")
        self.info["stats_seconds"] = round(time.time() - t0, 2)
        from massedit.core.adapters import get_adapter

        m = get_adapter(model).mlp_inner_size
        for l in layers:  # square (m x m) and finite before any solve reads it
            check_second_moment(C[int(l)], f"{self.method}: statistics C of layer {int(l)}", size=m)
        return {int(l): C[int(l)] for l in layers}
