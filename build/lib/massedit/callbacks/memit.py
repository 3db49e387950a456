"""``MEMIT(requests, hparams, stats)``: :class:`~massedit.callbacks.apply_edit.ApplyEdit` with a MEMIT editor
(REFERENCE_SPEC §2), for use in any Lightning ``Trainer``."""
from __future__ import annotations

from typing import Sequence

from massedit.callbacks.apply_edit import ApplyEdit
from massedit.editing.editor import StatsProvider
from massedit.editing.hparams import EditHparams
from massedit.editing.memit import MemitEditor
from massedit.editing.target_cache import TargetCache


class MEMIT(ApplyEdit):
    """Edit with MEMIT (batched z optimisation, multi-layer update) at ``hook``; options as :class:`MemitEditor`."""

    def __init__(self, requests: Sequence, hparams: EditHparams, stats: StatsProvider, *, context_templates=None,
                 template_seed: int = 0, cache: TargetCache | None = None, progress: bool = True, **callback_kwargs):
        editor = MemitEditor(hparams, stats, context_templates=context_templates, template_seed=template_seed,
                             cache=cache, progress=progress)
        super().__init__(editor, requests, **callback_kwargs)
