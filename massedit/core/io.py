"""Atomic file writes and content hashing. Every file massedit writes goes through here.

A write goes to a temporary file in the destination folder (``.<name>.<host>.<pid>.<random>.tmp``), is flushed
and fsynced, then renamed over the destination (atomic on POSIX), so a crash never leaves a half-written cache or
result. Final files get the mode the umask allows (``0o666 & ~umask``, like ``open()``), not ``mkstemp``'s 0600, so
a group can share a cache or read results. A temporary file left by a killed process (``kill -9`` during a
checkpoint write) is removed by :func:`clean_stale_tmp`, which every cache and run directory calls on the next run:
a temporary file is stale when the process that wrote it (same host) is gone, or, from another host, after a day.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
_LEGACY_TMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")   # tempfile.mkstemp names of massedit <= 0.1
FOREIGN_TMP_AGE_S = 24 * 3600.0   # a temporary file of another host counts as stale after this long


def tmp_name(name: str) -> str:
    """The temporary name of a write to ``name``: ``.<name>.<host>.<pid>.<random>.tmp`` (see :func:`clean_stale_tmp`)."""
    return f".{name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _create_tmp(parent: Path, name: str) -> Path:
    """Create an empty temporary file next to the destination with the umask's mode (``os.open`` 0o666)."""
    while True:
        tmp = parent / tmp_name(name)
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
        os.close(fd)
        return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_tmp(path.parent, path.name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, umask_mode(0o666))  # whatever the writer did (safetensors creates 0600): the umask's mode
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:  # pragma: no cover
        return True
    return True


def is_stale_tmp(path: Path, now: float | None = None) -> bool:
    """True for a temporary file of :func:`atomic_path` whose writer is gone (see the module docstring)."""
    m = _TMP_RE.match(path.name)
    if m is None and not _LEGACY_TMP_RE.match(path.name):
        return False
    if m is not None and m["host"] == _HOST:
        return not _pid_alive(int(m["pid"]))
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except OSError:
        return False
    return age > FOREIGN_TMP_AGE_S


def clean_stale_tmp(directory: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Remove stale temporary files of interrupted atomic writes below ``directory``; returns what was removed.

    Only names of :func:`tmp_name`'s pattern are considered; a live writer's file is never touched."""
    root = Path(directory)
    if not root.is_dir():
        return []
    removed: list[Path] = []
    now = time.time()
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    if recursive:
                        stack.append(Path(e.path))
                elif e.name.endswith(".tmp") and e.name.startswith(".") and is_stale_tmp(Path(e.path), now):
                    os.unlink(e.path)
                    removed.append(Path(e.path))
            except OSError:  # raced with another cleaner / the writer
                continue
    if removed:
        log.warning("removed %d stale temporary file(s) of interrupted writes below %s (e.g. %s)", len(removed), root,
                    removed[0].name)
    return removed


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would briefly set it for every thread)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def umask_mode(mode: int = 0o777) -> int:
    """``mode & ~umask`` (what ``mkdir``/``open`` would create)."""
    return mode & ~_umask()


@contextlib.contextmanager
def cache_lock(path: str | os.PathLike, what: str = "this cache entry") -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (``fcntl.flock``) while one process computes a cache entry
    that others may want at the same time (parallel points of a reproduction or sweep): the second waits,
    then finds the entry written. The kernel drops the lock when its holder dies (``kill -9`` included), so
    a crash never leaves it stuck. No-op where ``fcntl`` is missing (Windows). One process only: ranks of one
    DDP job share their work through collectives, not through this lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    lock = Path(str(path) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is computing %s (%s): waiting for it", what, lock)
            t0 = time.time()
            fcntl.flock(fh, fcntl.LOCK_EX)
            log.info("lock %s released after %.0f s", lock, time.time() - t0)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def atomic_write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o: Any):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_json(path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def atomic_write_jsonl(path, rows) -> Path:
    text = "".join(json.dumps(r, default=_json_default) + "\n" for r in rows)
    return atomic_write_text(path, text)


def atomic_torch_save(path, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_save_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def atomic_save_npz(path, **arrays) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return Path(path)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any, n: int = 16) -> str:
    """Short sha256 of a JSON-serialisable object (sorted keys): content-addressed cache keys."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def content_checksum(obj: Any) -> str:
    """sha256 of a nested structure of tensors, arrays and JSON values (dict keys sorted): the integrity
    checksum cache entries carry, verified on load."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().contiguous().cpu()
            h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
            if t.numel():
                h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        elif isinstance(o, np.ndarray):
            walk(torch.from_numpy(np.ascontiguousarray(o)))
        elif isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=str):
                h.update(json.dumps(str(k)).encode())
                walk(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for x in o:
                walk(x)
            h.update(b"]")
        else:
            h.update(json.dumps(o, default=_json_default).encode())

    walk(obj)
    return h.hexdigest()


def load_json(path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
