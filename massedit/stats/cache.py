"""Content-addressed on-disk cache of second-moment sums (REFERENCE_SPEC §0.6).

One file per (layer statistic): ``{cache_dir}/{model}/{ds_name}/{module}.{acc_dtype}.{key}.safetensors``
holding ``sum`` (Σ k kᵀ in the accumulation dtype) and ``count`` (N), with the full key as JSON metadata.

The key is a hash of everything that changes C:

* the model: its name/path, its config (minus bookkeeping fields), its forward dtype and a sha256
  fingerprint of every parameter/buffer that can influence the rewrite-module input of that layer (all
  weights except the blocks above it, the layer's own rewrite module, the final norm and an untied LM
  head, so editing layer 8 does not invalidate layer 4's statistics);
* the module name;
* the tokenizer (its serialised definition) and whether special tokens are added;
* the corpus identity (file names + sha256 or HF name/config/split/revision, format, packing, unescape);
* the sample: seed, n_samples, n_tokens, the effective max_length;
* the accumulation dtype.

The token-budget batching is *not* in the key: it changes only float rounding, not C.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from massedit.core.io import atomic_save_safetensors, content_checksum, stable_hash
from massedit.core.placement import read_tensor

log = logging.getLogger(__name__)

STATS_FORMAT_VERSION = 1
_CONFIG_SKIP = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "_commit_hash",
                "use_cache", "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
                "task_specific_params", "_attn_implementation_autoset"}

def default_stats_cache_dir() -> Path:
    return Path(os.environ.get("MASSEDIT_CACHE", Path.home() / ".cache" / "massedit")) / "stats"


def sanitize(name: str) -> str:
    """File-system-safe model name (the reference replaces ``/`` with ``_``)."""
    return str(name).replace("/", "_").replace("\\", "_").replace(":", "_").strip("._") or "model"


def _hash_tensor(t: torch.Tensor) -> str:
    """sha256 of (shape, dtype, raw bytes) without copying the bytes into a Python object."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:16]


def _tensor_fp(t: torch.Tensor) -> str:
    """sha256 fingerprint of a tensor's bytes, memoised on the tensor object itself (valid while its
    in-place version counter, storage pointer, shape, dtype and a cheap checksum of every 257th element are
    unchanged; the checksum catches dense writes through ``.data``, which bypass the version counter)."""
    with torch.no_grad():
        # strided sample (prime stride): cheap, and any dense edit (rank-one ROME/MEMIT updates) moves it
        check = float(t.detach().reshape(-1)[::257].double().sum()) if t.is_floating_point() and t.numel() else None
    stamp = (getattr(t, "_version", 0), t.data_ptr(), tuple(t.shape), str(t.dtype), str(t.device), check)
    memo = getattr(t, "_massedit_fp", None)
    if memo is not None and memo[0] == stamp:
        return memo[1]
    fp = _hash_tensor(t)
    try:
        t._massedit_fp = (stamp, fp)
    except (AttributeError, RuntimeError):  # tensors that refuse attributes: no memo
        pass
    return fp


def model_config_fingerprint(model) -> str:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return "none"
    d = {k: v for k, v in cfg.to_dict().items() if k not in _CONFIG_SKIP}
    return stable_hash(d)


def layer_input_weights_fingerprint(model, adapter, layer: int) -> str:
    """Fingerprint of every parameter/buffer that can influence the input of ``adapter.rewrite_module(layer)``:
    all of them except those of blocks ``> layer``, the layer's own rewrite module, the final norm and an
    untied LM head."""
    excl = [adapter.block_name(j) + "." for j in range(layer + 1, adapter.num_layers)]
    excl.append(adapter.rewrite_name(layer) + ".")
    excl.append(adapter.final_norm_name + ".")
    try:
        if not adapter.lm_head_tied:
            excl.append(adapter.lm_head_name + ".")
    except Exception:  # no output embedding
        pass
    items = []
    seen: set[int] = set()
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if any((name + ".").startswith(p) for p in excl):
            continue
        if id(t) in seen:
            continue
        seen.add(id(t))
        items.append([name, _tensor_fp(read_tensor(model, name, t))])  # offloaded (model.device_map): read back
    return stable_hash(sorted(items))


def tokenizer_fingerprint(tok) -> str:
    """Hash of the tokenizer's full definition (fast tokenizers) or its vocabulary + class (memoised on
    the tokenizer object together with its vocabulary size and special tokens)."""
    stamp = (len(tok), str(getattr(tok, "all_special_tokens", "")), getattr(tok, "padding_side", None))
    memo = getattr(tok, "_massedit_stats_fp", None)
    if memo is not None and memo[0] == stamp:
        return memo[1]
    fp = _tokenizer_fingerprint(tok)
    try:
        tok._massedit_stats_fp = (stamp, fp)
    except AttributeError:  # pragma: no cover
        pass
    return fp


def _tokenizer_fingerprint(tok) -> str:
    h = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # call-time state set by tok(..., truncation=True), not the tokenizer
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    for attr in ("bos_token", "eos_token", "pad_token", "padding_side", "truncation_side"):
        h.update(f"{attr}={getattr(tok, attr, None)}".encode())
    return h.hexdigest()[:16]


def stats_key(*, model_name: str, config_fp: str, weights_fp: str, model_dtype: str, module: str, tokenizer_fp: str,
              add_special_tokens: bool, corpus: dict, seed: int, n_samples: int | None, n_tokens: int | None,
              max_length: int, acc_dtype: str) -> tuple[str, dict]:
    """``(hash, key dict)`` for one layer's statistic (see the module docstring for what goes in)."""
    key = {
        "version": STATS_FORMAT_VERSION, "model_name": model_name, "config": config_fp, "weights": weights_fp,
        "model_dtype": model_dtype, "module": module, "tokenizer": tokenizer_fp,
        "add_special_tokens": bool(add_special_tokens), "corpus": corpus, "seed": int(seed),
        "n_samples": None if n_samples is None else int(n_samples),
        "n_tokens": None if n_tokens is None else int(n_tokens), "max_length": int(max_length), "acc_dtype": acc_dtype,
    }
    return stable_hash(key, n=20), key


def cache_path(cache_dir, model_name: str, ds_name: str, module: str, acc_dtype: str, key: str) -> Path:
    return Path(cache_dir) / sanitize(model_name) / sanitize(ds_name) / f"{module}.{acc_dtype}.{key}.safetensors"


def save_stats_file(path, total: torch.Tensor, count: int, meta: dict[str, Any]) -> Path:
    """Write ``sum`` and ``count`` (+ JSON metadata and the sha256 of both tensors) atomically."""
    tensors = {"sum": total.detach().cpu().contiguous(), "count": torch.tensor([int(count)], dtype=torch.int64)}
    return atomic_save_safetensors(
        path, tensors,
        metadata={"massedit_stats": json.dumps(meta, sort_keys=True, default=str), "sha256": content_checksum(tensors)},
    )


class CorruptStatsFile(ValueError):
    """A statistics cache file that fails verification (unreadable, checksum, shape, count or NaN/Inf)."""


def load_stats_file(path, expect_key: str | None = None, expect_size: int | None = None) -> tuple[torch.Tensor, int, dict]:
    """``(sum, count, metadata)`` from a file written by :func:`save_stats_file`, verified: readable, the stored
    sha256 matches (files written before checksums: skipped), ``count`` > 0, ``sum`` square (``expect_size``) and
    finite, and the metadata's cache key ``expect_key``. Raises :class:`CorruptStatsFile` otherwise."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            meta = json.loads(raw.get("massedit_stats", "{}"))
            total = f.get_tensor("sum")
            count_t = f.get_tensor("count")
    except Exception as e:  # SafetensorError (truncated / garbage), JSON, missing tensor
        raise CorruptStatsFile(f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    stored = raw.get("sha256")
    if stored is not None and stored != content_checksum({"sum": total, "count": count_t}):
        raise CorruptStatsFile("checksum mismatch (the file changed after it was written)")
    count = int(count_t.reshape(-1)[0].item()) if count_t.numel() == 1 else -1
    if count <= 0:
        raise CorruptStatsFile(f"count must be one positive integer, got {count_t.tolist()}")
    if total.dim() != 2 or total.shape[0] != total.shape[1] or (expect_size is not None and total.shape[0] != expect_size):
        raise CorruptStatsFile(f"sum has shape {tuple(total.shape)}, expected ({expect_size}, {expect_size})")
    if not bool(torch.isfinite(total).all()):
        raise CorruptStatsFile("sum holds NaN/Inf values")
    if expect_key is not None and meta.get("key") not in (None, expect_key):
        raise CorruptStatsFile(f"its key {meta.get('key')!r} is not the expected {expect_key!r}")
    return total, count, meta
