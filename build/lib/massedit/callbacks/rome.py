"""``ROME(requests, hparams, stats)``: :class:`~massedit.callbacks.apply_edit.ApplyEdit` with a ROME editor
(REFERENCE_SPEC §1), for use in any Lightning ``Trainer``."""
from __future__ import annotations

from typing import Sequence

from massedit.callbacks.apply_edit import ApplyEdit
from massedit.editing.editor import StatsProvider
from massedit.editing.hparams import EditHparams
from massedit.editing.rome import RomeEditor


class ROME(ApplyEdit):
    """Edit with ROME (sequential rank-one updates) at ``hook``; editor options as :class:`RomeEditor`."""

    def __init__(self, requests: Sequence, hparams: EditHparams, stats: StatsProvider | None = None, *,
                 context_templates=None, template_seed: int = 0, progress: bool = True, **callback_kwargs):
        editor = RomeEditor(hparams, stats, context_templates=context_templates, template_seed=template_seed,
                            progress=progress)
        super().__init__(editor, requests, **callback_kwargs)
