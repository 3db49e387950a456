"""On-disk cache of target vectors (MEMIT's z, ROME's v*): the resume path of long edit jobs (REFERENCE_SPEC §2.6)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from massedit.core.io import atomic_torch_save, stable_hash
from massedit.editing.hparams import EditHparams
from massedit.editing.targets import TargetResult

log = logging.getLogger(__name__)


class TargetCache:
    """One file per request target: ``<dir>/<key>.pt`` holding the :class:`TargetResult` fields.

    The key hashes the model state (fingerprint), the module the target lives at, every hparam the
    optimisation reads, the templates and the request, so a changed input never hits a stale entry.
    Files are written atomically as soon as a request finishes: an interrupted job resumes.
    """

    def __init__(self, directory):
        self.dir = Path(directory)

    def key(self, *, model_fp: str, method: str, module: str, hp: EditHparams, templates, request) -> str:
        return stable_hash({
            "v": 1, "model": model_fp, "method": method, "module": module, "hp": hp.z_key(),
            "templates": list(templates), "subject": request.subject, "prompt": request.prompt,
            "target_new": request.target_new,
        }, n=24)

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.pt"

    def get(self, key: str) -> TargetResult | None:
        p = self.path(key)
        if not p.exists():
            return None
        try:
            d = torch.load(p, map_location="cpu", weights_only=True)
            return TargetResult(d["case_id"], d["init"], d["delta"], int(d["n_adam_steps"]), bool(d["early_stopped"]),
                                d["loss_trace"], from_cache=True)
        except Exception as e:  # corrupt / old entry: recompute
            log.warning("ignoring unreadable target cache entry %s (%s)", p, e)
            return None

    def put(self, key: str, r: TargetResult) -> None:
        atomic_torch_save(self.path(key), {
            "case_id": r.case_id if isinstance(r.case_id, (int, str)) else str(r.case_id), "init": r.init,
            "delta": r.delta, "n_adam_steps": r.n_adam_steps, "early_stopped": r.early_stopped,
            "loss_trace": r.loss_trace,
        })
