"""Read an offline W&B run (``wandb/offline-run-*/run-*.wandb``) in tests: the transaction log is a LevelDB-style
log of ``wandb_internal_pb2.Record`` protobufs (32 KiB blocks, 7-byte record headers: crc32, length, type)."""
from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

_BLOCK = 32 * 1024
_HEADER = 7  # file header: b":W&B", magic 0xBEE1, version 0


def records(run_dir: str | Path):
    """Every Record of the offline run below ``run_dir`` (the run directory or its offline-run-* folder)."""
    from wandb.proto import wandb_internal_pb2 as pb

    hits = sorted(glob.glob(str(Path(run_dir) / "**" / "run-*.wandb"), recursive=True))
    assert hits, f"no offline W&B run below {run_dir}"
    data = Path(hits[-1]).read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, buf = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunk = data[pos:pos + length]
        pos += length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def artifacts(run_dir) -> list[dict]:
    out = []
    for rec in records(run_dir):
        if rec.WhichOneof("record_type") == "artifact":
            a = rec.artifact
            out.append({"name": a.name, "type": a.type, "files": [c.path for c in a.manifest.contents]})
    return out


def config(run_dir) -> dict:
    """The run config as the W&B server would see it (the last value of every key)."""
    cfg = {}
    for rec in records(run_dir):
        kind = rec.WhichOneof("record_type")
        updates = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else []
        for u in updates:
            cfg[u.key] = json.loads(u.value_json)
    cfg.pop("_wandb", None)
    return {k: (v["value"] if isinstance(v, dict) and set(v) == {"value"} else v) for k, v in cfg.items()}


def tables(run_dir, key: str) -> list[dict]:
    """The logged wandb.Table files of ``key`` (e.g. ``eval/per_case``) as ``{"columns": ..., "data": ...}``."""
    media = glob.glob(str(Path(run_dir) / "**" / "files" / "media" / "table" / (key + "_*.table.json")), recursive=True)
    return [json.loads(Path(p).read_text()) for p in sorted({str(Path(m).resolve()) for m in media})]
