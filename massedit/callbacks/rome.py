"""Lightning callbacks that edit a model with ROME at a chosen hook (REFERENCE_SPEC §1).

Editing composes with any Lightning run: e.g. evaluate an edited model by adding
``ROME(requests, hparams=...)`` to a ``Trainer(callbacks=[...]).validate(module)`` call; the edit happens in
``on_validation_start`` (or ``on_fit_start`` / ``on_test_start`` / ``on_predict_start``, see ``hook``),
the deltas are saved to ``save_path`` (default ``<trainer.log_dir or default_root_dir>/deltas.safetensors``)
and, with ``revert_at_end=True``, removed again when that stage ends (bit-identical restore).

The same editing is available without Lightning: ``massedit.editing.rome.RomeEditor(...).edit(model, tok, requests)``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl

from massedit.core.deltas import apply_deltas, revert_deltas, save_deltas

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


class EditCallback(pl.Callback):
    """Base: edit ``pl_module``'s language model once, at ``hook``. Subclasses set ``editor_cls``.

    The language model is ``pl_module.model`` (or ``pl_module`` itself if it has a ``config``); the tokenizer
    is ``tokenizer=`` or ``pl_module.tok`` / ``pl_module.tokenizer``. Editor options (``cfg``, ``hparams``,
    ``stats_provider``, ``context_templates``, ``z_cache_dir``) are passed to the editor class.
    """

    editor_cls: Any = None
    method = "edit"

    def __init__(self, requests: Sequence, *, cfg=None, hook: str = "on_validation_start", tokenizer=None,
                 save_path: str | Path | None = None, revert_at_end: bool = False, run=None, **editor_kwargs):
        if hook not in HOOKS:
            raise ValueError(f"hook must be one of {HOOKS}, got {hook!r}")
        self.requests = list(requests)
        self.cfg, self.hook, self.tokenizer, self.run = cfg, hook, tokenizer, run
        self.save_path = Path(save_path) if save_path else None
        self.revert_at_end = revert_at_end
        self.editor_kwargs = editor_kwargs
        self.deltas = None
        self.editor = None
        self._backup = None
        self._done = False
        setattr(self, hook, self._edit_hook)
        setattr(self, _END[hook], self._end_hook)

    # ------------------------------------------------------------------------------------------
    def _lm(self, pl_module):
        if hasattr(pl_module, "config") and hasattr(pl_module, "forward"):
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

    def _edit_hook(self, trainer, pl_module, *args, **kwargs):
        if self._done:
            return
        import torch

        model, tok = self._lm(pl_module), self._tok(pl_module)
        self.editor = self.editor_cls(self.cfg, self.run, **self.editor_kwargs)
        with torch.inference_mode(False):
            self.deltas = self.editor.edit(model, tok, self.requests)
            self._backup = apply_deltas(model, self.deltas)
        path = self.save_path
        if path is None:
            root = getattr(trainer, "log_dir", None) or getattr(trainer, "default_root_dir", None) or "."
            path = Path(root) / "deltas.safetensors"
        save_deltas(path, self.deltas, {"method": self.method, "num_requests": len(self.requests)})
        self.saved_to = path
        log.info("%s edited %d requests; deltas saved to %s", self.method, len(self.requests), path)
        self._done = True

    def _end_hook(self, trainer, pl_module, *args, **kwargs):
        if self.revert_at_end and self._backup is not None:
            import torch

            with torch.inference_mode(False):
                revert_deltas(self._lm(pl_module), self._backup)
            self._backup = None
            self._done = False


class ROME(EditCallback):
    """Edit with ROME (sequential rank-one updates) at ``hook``; see :class:`EditCallback`."""

    method = "rome"

    @property
    def editor_cls(self):  # lazy import keeps the callback module light
        from massedit.editing.rome import RomeEditor

        return RomeEditor
