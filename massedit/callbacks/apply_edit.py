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

from massedit.core.deltas import apply_deltas, check_deltas, revert_deltas, save_deltas
from massedit.core.guards import EditGuardConfig, check_update_norms
from massedit.editing.editor import Editor

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
        with torch.inference_mode(False), torch.enable_grad():
            deltas = self.editor.edit(model, tok, self.requests)
            check_deltas(model, deltas)  # names and shapes
            check_update_norms(deltas, dict(model.named_parameters(remove_duplicate=False)), self.max_relative_norm,
                               source=str(getattr(self.editor, "method", type(self.editor).__name__)))  # NaN/Inf, runaway
            self._backup = apply_deltas(model, deltas)
        self.deltas, self.seconds = deltas, time.time() - t0
        if self.save_path is not None and trainer.is_global_zero:
            meta = {"method": str(getattr(self.editor, "method", type(self.editor).__name__)),
                    "num_requests": str(len(self.requests)), **{k: str(v) for k, v in self.metadata.items()}}
            self.saved_to = save_deltas(self.save_path, deltas, meta)
        log.info("edited %d request(s) in %.1f s%s", len(self.requests), self.seconds,
                 f"; deltas saved to {self.saved_to}" if self.saved_to else "")
        self._done = True

    def _end_hook(self, trainer, pl_module, *args, **kwargs):
        if self.revert_at_end and self._backup is not None:
            with torch.inference_mode(False):
                revert_deltas(self.language_model(pl_module), self._backup)
            self._backup = None
            self._done = False
