"""Lightning callback that edits a model with MEMIT at a chosen hook (REFERENCE_SPEC §2).

    trainer = pl.Trainer(callbacks=[MEMIT(requests, cfg=cfg, hook="on_validation_start")])
    trainer.validate(module)          # module.model is edited before the first validation batch

Without Lightning: ``massedit.editing.memit.MemitEditor(cfg, run).edit(model, tok, requests)``.
"""
from __future__ import annotations

from massedit.callbacks.rome import EditCallback


class MEMIT(EditCallback):
    """Edit with MEMIT (batched z optimisation, multi-layer update) at ``hook``; see :class:`EditCallback`."""

    method = "memit"

    @property
    def editor_cls(self):
        from massedit.editing.memit import MemitEditor

        return MemitEditor
