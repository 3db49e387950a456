"""On-disk cache of target vectors (MEMIT's z, ROME's v*): the resume path of long edit jobs (REFERENCE_SPEC §2.6)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from massedit.core.io import atomic_torch_save, clean_stale_tmp, content_checksum, stable_hash
from massedit.editing.hparams import EditHparams
from massedit.editing.targets import TargetResult

log = logging.getLogger(__name__)


class TargetCache:
    """One file per request target: ``<dir>/<key>.pt`` holding the :class:`TargetResult` fields.

    The key hashes the model state (fingerprint), the module the target lives at, every hparam the
    optimisation reads, the templates and the request, so a changed input never hits a stale entry.
    Files are written atomically as soon as a request finishes: an interrupted job resumes. Entries are read
    with ``weights_only=True`` (no pickled objects) and verified (their sha256 checksum, shapes, finiteness); a
    bad entry is discarded with a warning and recomputed. Temporary files a killed run left are removed when the
    cache is opened.
    """

    def __init__(self, directory):
        self.dir = Path(directory)
        clean_stale_tmp(self.dir)

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
            _verify(d)
            return TargetResult(d["case_id"], d["init"], d["delta"], int(d["n_adam_steps"]), bool(d["early_stopped"]),
                                d["loss_trace"], from_cache=True)
        except Exception as e:  # corrupt / old / refused entry: recompute
            log.warning("discarding unreadable target cache entry %s (%s: %s); recomputing it", p, type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "")
            try:
                p.unlink()
            except OSError:
                pass
            return None

    def put(self, key: str, r: TargetResult) -> None:
        d = {"case_id": r.case_id if isinstance(r.case_id, (int, str)) else str(r.case_id), "init": r.init,
             "delta": r.delta, "n_adam_steps": r.n_adam_steps, "early_stopped": r.early_stopped,
             "loss_trace": r.loss_trace}
        d["sha256"] = content_checksum(d)
        atomic_torch_save(self.path(key), d)


def _verify(d) -> None:
    """An entry's fields, its checksum (entries written before checksums: skipped) and finite vectors."""
    if not isinstance(d, dict):
        raise ValueError(f"not a cache entry ({type(d).__name__})")
    missing = [k for k in ("case_id", "init", "delta", "n_adam_steps", "early_stopped", "loss_trace") if k not in d]
    if missing:
        raise ValueError(f"missing fields {missing}")
    stored = d.get("sha256")
    if stored is not None and stored != content_checksum({k: v for k, v in d.items() if k != "sha256"}):
        raise ValueError("checksum mismatch")
    init, delta = d["init"], d["delta"]
    if not (isinstance(init, torch.Tensor) and isinstance(delta, torch.Tensor)) or init.shape != delta.shape \
            or init.dim() != 1:
        raise ValueError("init / delta are not two vectors of one size")
    if not (bool(torch.isfinite(init).all()) and bool(torch.isfinite(delta).all())):
        raise ValueError("NaN/Inf in the target")
