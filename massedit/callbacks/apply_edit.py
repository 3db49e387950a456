"""``ApplyEdit``: the one Lightning callback that edits a model, for every editor (ROME, MEMIT, MEND, FT-W).

    trainer = build_trainer(cfg.trainer, callbacks=[ApplyEdit(editor, requests)])
    trainer.validate(eval_module, datamodule=dm)   # the unedited model
    trainer.test(eval_module, datamodule=dm)       # edited at on_test_start, then evaluated

At ``hook`` (default ``on_test_start``) the callback runs ``editor.edit(model, tok, requests)`` on the
LightningModule's language model (``pl_module.model``, or the module itself when it is a transformers model),
checks the deltas (names, shapes, finiteness and ``‖ΔW‖ ≤ max_relative_norm·‖W‖``, :mod:`massedit.core.guards`;
nothing is applied or saved otherwise), applies them, and saves them (rank 0) to ``save_path``; with ``revert_at_end`` the weights are
restored bit-identically when that stage ends. Any ``Trainer`` can take it: a user's own LightningModule only needs
a ``model`` and a ``tok``/``tokenizer`` attribute (or ``tokenizer=``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch

from massedit.core.collective import agree_on_tensors, broadcast_tensors
from massedit.core.deltas import apply_deltas, check_deltas, revert_deltas, save_deltas
from massedit.core.guards import EditGuardConfig, check_update_norms
from massedit.core.placement import param_storage
from massedit.core.profiling import stage
from massedit.editing.editor import Editor
from massedit.trainer import collective_for

log = logging.getLogger(__name__)

HOOKS = ("on_fit_start", "on_validation_start", "on_test_start", "on_predict_start")
_END = {"on_fit_start": "on_fit_end", "on_validation_start": "on_validation_end", "on_test_start": "on_test_end",
        "on_predict_start": "on_predict_end"}


def _find(module, names):
    for n in names:
        obj = getattr(module, n, None)
        if obj is not None:
            return obj
    return None


class ApplyEdit(pl.Callback):
    """Edit ``pl_module``'s language model with ``editor`` once, at ``hook`` (see the module docstring)."""

    def __init__(self, editor: Editor, requests: Sequence, *, hook: str = "on_test_start", tokenizer=None,
                 save_path: str | Path | None = None, metadata: Mapping[str, Any] | None = None,
                 revert_at_end: bool = False, max_relative_norm: float | None = EditGuardConfig.max_relative_norm):
        if hook not in HOOKS:
            raise ValueError(f"hook must be one of {HOOKS}, got {hook!r}")
        self.editor = editor
        self.requests = list(requests)
        self.hook, self.tokenizer = hook, tokenizer
        self.save_path = Path(save_path) if save_path else None
        self.metadata = dict(metadata or {})
        self.revert_at_end = revert_at_end
        self.max_relative_norm = max_relative_norm
        self.deltas: dict[str, torch.Tensor] | None = None
        self.seconds: float | None = None
        self.saved_to: Path | None = None
        self._backup = None
        self._done = False
        setattr(self, hook, self._edit_hook)
        setattr(self, _END[hook], self._end_hook)

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def language_model(pl_module):
        if hasattr(pl_module, "config") and hasattr(pl_module, "forward") and not isinstance(pl_module, pl.LightningModule):
            return pl_module
        lm = _find(pl_module, ("model", "lm", "language_model"))
        if lm is None:
            raise AttributeError(f"{type(pl_module).__name__} has no language model attribute (model / lm)")
        return lm

    def _tok(self, pl_module):
        tok = self.tokenizer or _find(pl_module, ("tok", "tokenizer"))
        if tok is None:
            raise AttributeError("no tokenizer: pass tokenizer= or give the LightningModule a `tok` attribute")
        return tok

    def apply(self, trainer, pl_module) -> None:
        """Edit now (what the hook does); for a run without the stage the hook belongs to."""
        self._edit_hook(trainer, pl_module)

    def _edit_hook(self, trainer, pl_module, *args, **kwargs):
        if self._done:
            return
        model, tok = self.language_model(pl_module), self._tok(pl_module)
        t0 = time.time()
        with stage("edit"), torch.inference_mode(False), torch.enable_grad():  # stages: core/profiling.py
            deltas = self._distributed_edit(trainer, model, tok)
            with stage("apply"):
                check_deltas(model, deltas)  # names and shapes
                check_update_norms(deltas, {n: param_storage(model, n) for n in deltas}, self.max_relative_norm,
                                   source=str(getattr(self.editor, "method", type(self.editor).__name__)))  # NaN/Inf
                self._backup = apply_deltas(model, deltas)
                self.deltas, self.seconds = deltas, time.time() - t0
                if self.save_path is not None and trainer.is_global_zero:
                    meta = {"method": str(getattr(self.editor, "method", type(self.editor).__name__)),
                            "num_requests": str(len(self.requests)), **{k: str(v) for k, v in self.metadata.items()}}
                    self.saved_to = save_deltas(self.save_path, deltas, meta)
        log.info("edited %d request(s) in %.1f s%s", len(self.requests), self.seconds,
                 f"; deltas saved to {self.saved_to}" if self.saved_to else "")
        self._done = True
        if trainer.is_global_zero and getattr(trainer, "logger", None) is not None:
            log_edit(trainer.logger, deltas, self.seconds, target_records(self.editor))

    def _distributed_edit(self, trainer, model, tok):
        """``editor.edit`` on this rank's share of the work; every rank returns the same deltas.

        One process: the editor as it is. Several ranks (``trainer.world_size > 1``): an editor with
        ``distributed = "shared"`` (MEMIT, MEND, FT-W) runs on every rank and splits its work itself through the
        ``collective`` it is handed; any other editor (ROME, which is sequential, saved deltas, a user's editor)
        runs on rank 0 only and its deltas are broadcast. Afterwards every rank holds bit-identical deltas (checked
        by hash; on a mismatch rank 0's are broadcast and a warning logged)."""
        col = collective_for(trainer)
        if col is None:
            return self.editor.edit(model, tok, self.requests)
        if getattr(self.editor, "distributed", None) == "shared":
            self.editor.collective = col
            try:
                deltas = self.editor.edit(model, tok, self.requests)
            finally:
                self.editor.collective = None
            return agree_on_tensors(col, deltas)
        if col.rank == 0:
            deltas = self.editor.edit(model, tok, self.requests)
        else:
            deltas = None
            log.info("rank %d waits for rank 0's %s edit", col.rank, getattr(self.editor, "method", "editor"))
        return broadcast_tensors(col, deltas, src=0)

    def _end_hook(self, trainer, pl_module, *args, **kwargs):
        if self.revert_at_end and self._backup is not None:
            with torch.inference_mode(False):
                revert_deltas(self.language_model(pl_module), self._backup)
            self._backup = None
            self._done = False


def target_records(editor) -> list[dict[str, Any]]:
    """Per-request target optimisation (z of MEMIT, v* of ROME) of the editor's last edit: case id, Adam steps,
    final loss, early stop, from the z cache. Empty for editors without one (FT, MEND)."""
    inter = getattr(editor, "intermediates", None) or {}
    reqs = [r for b in inter.get("batches", []) for r in b.get("requests", [])] if "batches" in inter \
        else list(inter.get("requests", []))
    out = []
    for r in reqs:
        trace = r.get("loss_trace")
        final = r.get("final_loss")
        if final is None and trace is not None and getattr(trace, "numel", lambda: 0)():
            final = float(trace[-1, 1])
        out.append({"case_id": str(r.get("case_id")), "layer": r.get("layer"), "steps": int(r.get("n_adam_steps", 0)),
                    "final_loss": None if final is None else float(final), "early_stopped": bool(r.get("early_stopped")),
                    "from_cache": bool(r.get("from_cache", False))})
    return out


def log_edit(logger, deltas: Mapping[str, torch.Tensor], seconds: float, targets: Sequence[dict]) -> None:
    """Log an edit to a Lightning logger: ``edit/seconds``, ``edit/delta_norm`` (total) and
    ``edit/delta_norm/<param>``, and per request ``edit/z_loss`` / ``edit/z_steps`` (step = request index); with
    W&B also the ``edit/targets`` table. Never fails the edit."""
    norms = {k: float(v.float().norm()) for k, v in deltas.items()}
    metrics = {"edit/seconds": float(seconds), "edit/delta_norm": float(sum(v * v for v in norms.values()) ** 0.5),
               **{f"edit/delta_norm/{k}": v for k, v in norms.items()}}
    try:
        logger.log_metrics(metrics)
        for i, t in enumerate(targets):
            if t["final_loss"] is not None:
                logger.log_metrics({"edit/z_loss": t["final_loss"], "edit/z_steps": float(t["steps"])}, step=i)
        if targets and hasattr(logger, "log_table") and type(logger).__name__ == "WandbLogger":
            cols = list(targets[0])
            logger.log_table("edit/targets", columns=cols, data=[[t[c] for c in cols] for t in targets])
    except Exception as e:  # pragma: no cover - logger back-ends fail in many ways
        log.warning("could not log the edit to %s: %s", type(logger).__name__, e)
