"""Lightning callbacks that edit a model: :class:`ApplyEdit` (any editor), :class:`ROME`, :class:`MEMIT`."""
from massedit.callbacks.apply_edit import ApplyEdit
from massedit.callbacks.memit import MEMIT
from massedit.callbacks.rome import ROME

__all__ = ["ApplyEdit", "MEMIT", "ROME"]
