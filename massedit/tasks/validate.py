"""Validate a whole run before anything is written (``edit_job``, ``train_job``, ``stats_job`` call it first).

The config was type- and range-checked by :func:`massedit.tasks.config.compose`. :func:`validate_job` then checks
everything else a run reads, in order of cost, and only then may the run directory be created:

1. the run directory (``output_dir``): not a file, writable, not an earlier run unless ``resume=true`` /
   ``overwrite=true`` (:func:`massedit.tasks.runs.check_run_dir`);
2. the other files the config names exist: context templates (parsed), ``method.train.val_path``, ``ckpt_path``,
   ``deltas``, the consistency files (loaded), cache directories that are not files (hparams files: at compose);
3. the request file (every record, :mod:`massedit.data.requests`), and at least one request;
4. the model *without its weights*: its ``config.json`` (``AutoConfig``) and tokenizer, and a parameter skeleton
   on the ``meta`` device (names and shapes, no memory); for the built-in model the one-off GGUF conversion into
   massedit's model cache happens here (it writes that cache, never the run directory);
5. against the model: the method's layers (``method.layers``, ``v_loss_layer``, ``stats.layers``, FT's parameter
   selection, MEND's inner parameters), a MEND editor / Lightning checkpoint (``weights_only``), a delta file's
   names, shapes and finiteness, ``stats.reference_dir`` files (plain npz, shape, count, finiteness),
   ``stats.corpus`` files, and the length of every request's model input (``data.max_input_tokens``, default
   the model's context length).

Every problem raises an :class:`~massedit.core.errors.InputError` that names the file / option / record / field;
the command line prints ``error: ...`` and exits 2 with nothing written.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from massedit.core.errors import InputError

log = logging.getLogger("massedit.validate")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class ValidationError(InputError):
    """A run that cannot work, found before anything was written (the message names what to change)."""


@dataclass
class ModelInfo:
    """What is known about the model before its weights are loaded."""

    path: str                       # the loadable path (the built-in model's cached checkpoint, a dir or a hub id)
    config: Any                     # transformers PretrainedConfig
    skeleton: torch.nn.Module       # parameter names and shapes on the meta device
    tokenizer: Any

    @property
    def adapter(self):
        from massedit.core.adapters import get_adapter

        return get_adapter(self.skeleton)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return dict(self.skeleton.named_parameters(remove_duplicate=False))


@dataclass
class Validated:
    """The result of :func:`validate_job`: what the job goes on with."""

    run_dir: Path | None
    requests: list = field(default_factory=list)
    model: ModelInfo | None = None


# ------------------------------------------------------------------------------------------------ model
def inspect_model(cfg) -> ModelInfo:
    """Config, tokenizer and a meta-device skeleton of the model of ``cfg`` (a ModelConfig); no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from massedit.core.adapters import get_adapter
    from massedit.core.models import ModelNotAvailableError, resolve_model_path
    from massedit.core.tokenization import prepare_tokenizer

    path = resolve_model_path(cfg)  # the built-in model: converted once into the model cache (not the run dir)
    p = Path(path).expanduser()
    looks_local = p.exists() or str(cfg.name_or_path).startswith(("/", "./", "../", "~")) or str(path).count("/") > 1
    if looks_local:
        if not p.exists():
            raise ModelNotAvailableError(f"model.name_or_path={cfg.name_or_path}: {p} does not exist")
        if not p.is_dir():
            raise ModelNotAvailableError(f"model.name_or_path={cfg.name_or_path}: {p} is a file; give the model's "
                                         f"directory (config.json + weights)")
        if not (p / "config.json").is_file():
            raise ModelNotAvailableError(f"model.name_or_path={cfg.name_or_path}: {p} has no config.json "
                                         f"(not a Hugging Face model directory)")
        if not any((p / f).exists() for f in WEIGHT_FILES) and not any(p.glob("*.safetensors")):
            raise ModelNotAvailableError(f"model.name_or_path={cfg.name_or_path}: {p} holds no weights "
                                         f"({', '.join(WEIGHT_FILES)})")
        _check_pickled_weights(p, cfg.name_or_path)
    kw = {"revision": cfg.revision} if cfg.revision else {}
    try:
        config = AutoConfig.from_pretrained(path, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise ModelNotAvailableError(f"model.name_or_path={cfg.name_or_path}: cannot read the model config "
                                     f"({type(e).__name__}: {str(e).splitlines()[0][:300]})\n(no hub access here? use a "
                                     f"local path, or model=smollm2-135m)") from None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as e:
        raise ModelNotAvailableError(f"model.name_or_path={cfg.name_or_path}: not a causal language model "
                                     f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    get_adapter(skeleton)  # UnsupportedArchitectureError (an InputError) names the supported families
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelNotAvailableError(f"model.name_or_path={cfg.name_or_path}: cannot load the tokenizer "
                                     f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    prepare_tokenizer(tok)
    return ModelInfo(path=str(path), config=config, skeleton=skeleton, tokenizer=tok)


def _check_pickled_weights(p: Path, name) -> None:
    """A model directory with only pickle (``.bin``) weights: read their structure with ``weights_only=True``
    and ``mmap`` (no tensor data) so a crafted pickle is refused here, not halfway through the run."""
    if any(p.glob("*.safetensors")):
        return  # transformers prefers safetensors
    import pickle

    for f in sorted(p.glob("pytorch_model*.bin")):
        try:
            torch.load(f, map_location="meta", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
            from massedit.core.models import ModelNotAvailableError

            raise ModelNotAvailableError(f"model.name_or_path={name}: {f.name} is not a loadable weights file "
                                         f"(refused by the safe loader: {str(e).splitlines()[0][:200]}); use "
                                         f"safetensors weights") from None


# ------------------------------------------------------------------------------------------------ pieces
def _needs_stats(job) -> list[int]:
    """Layers whose second moments the job's editor will read (empty: none)."""
    from massedit.editing.hparams import MemitConfig, RomeConfig

    m = job.method
    if getattr(job, "deltas", None) or getattr(job, "mode", "edit") == "eval":
        return []
    if isinstance(m, MemitConfig) or (isinstance(m, RomeConfig) and m.mom2_adjustment):
        return sorted(int(x) for x in m.layers)
    return []


def check_layers(job, info: ModelInfo) -> None:
    """The method's layers and parameters exist in the model (``method.layers`` & co, by name)."""
    from massedit.editing.ft import FTConfig, select_ft_parameters
    from massedit.editing.hparams import HparamsError, MemitConfig, RomeConfig
    from massedit.editing.mend.config import MendConfig

    m = job.method
    n = info.adapter.num_layers
    if isinstance(m, (RomeConfig, MemitConfig)):
        if not m.layers:
            raise ValidationError("method.layers is empty: give at least one layer")
        bad = [x for x in m.layers if not 0 <= int(x) < n]
        if bad:
            raise ValidationError(f"method.layers={list(m.layers)}: {bad} outside the model's {n} layers (0..{n - 1})")
        if m.v_loss_layer is not None and not 0 <= int(m.v_loss_layer) < n:
            raise ValidationError(f"method.v_loss_layer={m.v_loss_layer} outside the model's {n} layers (0..{n - 1})")
        try:
            m.validate(n)
        except HparamsError as e:
            raise ValidationError(f"method: {e}") from None
    elif isinstance(m, FTConfig):
        select_ft_parameters(info.skeleton, m.layers, m.params, m.param_names)  # FTConfigError names the key
    elif isinstance(m, MendConfig):
        from massedit.editing.mend.editor import inner_params_from_cfg

        if m.layers is not None:
            bad = [x for x in m.layers if not 0 <= int(x) < n]
            if bad:
                raise ValidationError(f"method.layers={list(m.layers)}: {bad} outside the model's {n} layers "
                                      f"(0..{n - 1})")
        elif int(m.num_layers) > n:
            raise ValidationError(f"method.num_layers={m.num_layers}: the model has {n} layers")
        try:
            inner_params_from_cfg(info.skeleton, m)
        except (IndexError, ValueError, AttributeError) as e:
            raise ValidationError(f"method.projections={list(m.projections)} / method.layers: {e}") from None


def check_stats_layers(layers, info: ModelInfo, key: str = "stats.layers") -> None:
    n = info.adapter.num_layers
    bad = [x for x in layers if not 0 <= int(x) < n]
    if bad:
        raise ValidationError(f"{key}={list(layers)}: {bad} outside the model's {n} layers (0..{n - 1})")


def check_reference_stats(job, layers, info: ModelInfo) -> list[int]:
    """Every reference statistics file under ``stats.reference_dir`` the job will read: present (or
    ``stats.reference_missing=compute``), a plain npz (no pickles), ``mom2.mom2`` of shape (m, m) and finite,
    ``mom2.count`` > 0. Returns the layers left to compute."""
    from massedit.core.guards import EditGuardError, check_second_moment
    from massedit.stats.collect import _reference_file_for
    from massedit.stats.reference import load_reference_stats

    s = job.stats
    if not s.reference_dir:
        return list(layers)
    root = Path(s.reference_dir).expanduser()
    if not root.is_dir():
        raise ValidationError(f"stats.reference_dir={s.reference_dir}: not a directory")
    a = info.adapter
    m = a.mlp_inner_size
    todo = []
    for layer in layers:
        module = a.rewrite_name(layer)
        path = _reference_file_for(root, job.model.name_or_path, module)
        if path is None:
            if s.reference_missing == "error":
                raise ValidationError(f"stats.reference_dir={s.reference_dir}: no reference statistics for {module} "
                                      f"(*_stats/{module}_*mom2*.npz); stats.reference_missing=error")
            todo.append(layer)
            continue
        total, count = load_reference_stats(path)  # ReferenceStatsError (InputError) names the file
        try:
            check_second_moment(total, f"stats.reference_dir: {path} (mom2.mom2)", size=m)
        except EditGuardError as e:
            raise ValidationError(str(e)) from None
    return todo


def check_corpus(job) -> None:
    """``stats.corpus`` files / folders exist (hub corpora are checked when they are read)."""
    from massedit.data.corpus import CorpusSpec, corpus_files

    spec = CorpusSpec.from_config(job.stats)
    if not spec.is_hf:
        corpus_files(spec)


def check_deltas_file(path, info: ModelInfo) -> None:
    from massedit.core.deltas import check_delta_file

    check_delta_file(path, {n: tuple(p.shape) for n, p in info.params.items()})


def check_files(job) -> None:
    """Files named by the config (other than the request file, the model and statistics)."""
    from massedit.editing.hparams import MemitConfig, RomeConfig
    from massedit.editing.mend.config import MendConfig

    m = job.method
    if isinstance(m, (RomeConfig, MemitConfig)):
        if m.context_templates:
            from massedit.editing.context_templates import load_context_templates

            load_context_templates(m.context_templates)  # TemplateError names the file
        if m.z_cache and m.z_cache_dir:
            _check_dir_option("method.z_cache_dir", m.z_cache_dir)
    if isinstance(m, MendConfig) and m.train.val_path:
        _check_file_option("method.train.val_path", m.train.val_path)
    if job.stats.cache and job.stats.cache_dir:
        _check_dir_option("stats.cache_dir", job.stats.cache_dir)
    deltas = getattr(job, "deltas", None)
    if deltas:
        _check_file_option("deltas", deltas)
    cons = job.eval.consistency
    for k in ("attribute_snippets", "idf", "tfidf_vocab"):
        v = getattr(cons, k)
        if v:
            _check_file_option(f"eval.consistency.{k}", v)
    if cons.attribute_snippets and job.eval.generation:
        from massedit.evaluation.text import consistency_scorer

        try:  # loaded once per process: the evaluation reuses it
            consistency_scorer(cons, job.eval.tfidf_backend)
        except InputError:
            raise
        except (ValueError, OSError, KeyError, TypeError) as e:  # JSON, npy (pickles refused), layout
            raise ValidationError(f"eval.consistency: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    ckpt = getattr(job, "ckpt_path", None)
    if ckpt and ckpt != "last":
        _check_file_option("ckpt_path", ckpt)
    export = getattr(job, "export", None)
    if export is not None and export.hf_dir:
        p = Path(export.hf_dir).expanduser()
        if p.exists() and not p.is_dir():
            raise ValidationError(f"export.hf_dir={export.hf_dir}: exists and is not a directory")


def _check_file_option(key: str, value) -> Path:
    p = Path(str(value)).expanduser()
    if not p.exists():
        raise ValidationError(f"{key}={value}: file not found")
    if p.is_dir():
        raise ValidationError(f"{key}={value}: is a directory, expected a file")
    return p


def _check_dir_option(key: str, value) -> Path:
    p = Path(str(value)).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise ValidationError(f"{key}={value}: {q} exists and is not a directory")
            break
    return p


def check_mend_checkpoint(job, info: ModelInfo) -> None:
    from massedit.editing.mend.config import MendConfig
    from massedit.editing.mend.editor import load_editor

    m = job.method
    if isinstance(m, MendConfig) and m.checkpoint:
        _check_file_option("method.checkpoint", m.checkpoint)
        load_editor(m.checkpoint, info.skeleton)  # weights_only; MendCheckpointError names the file and parameter


def context_reserve(job) -> int:
    """Tokens an editor puts in front of a request's prompt (ROME/MEMIT context templates), generously."""
    from massedit.editing.hparams import MemitConfig, RomeConfig

    m = job.method
    if getattr(job, "deltas", None) or getattr(job, "mode", "edit") == "eval":
        return 0
    if isinstance(m, RomeConfig):
        return max([int(p[0]) for p in m.context_template_length_params] + [0]) + 4
    if isinstance(m, MemitConfig):
        return max([int(p[0]) for p in m.memit_template_length_params] + [0]) + 4
    return 0


def check_lengths(job, requests, info: ModelInfo) -> None:
    from massedit.data.requests import check_request_lengths, resolve_path

    limit = job.data.max_input_tokens
    name = "data.max_input_tokens"
    if limit is None:
        try:
            limit = info.adapter.context_length
        except InputError:
            return  # the config declares no context length: nothing to check against
        name = "the model's context length; data.max_input_tokens sets a lower limit"
    check_request_lengths(requests, info.tokenizer, int(limit), reserve=context_reserve(job),
                          file=resolve_path(job.data.path), limit_name=name,
                          start_index=None if job.data.skip_invalid else int(job.data.offset))


# ------------------------------------------------------------------------------------------------ jobs
def load_job_requests(job) -> list:
    """The job's requests (MEND training: train + validation requests, as its data module splits them)."""
    from massedit.data.requests import load_requests_from_config
    from massedit.editing.mend.config import MendConfig
    from massedit.tasks.config import TrainJobConfig

    if isinstance(job.method, MendConfig) and isinstance(job, TrainJobConfig):
        from massedit.datamodules.mend import load_training_requests, make_examples

        train, val = load_training_requests(job.data, job.method.train)
        make_examples(train)  # every record gets a locality partner (RequestValidationError otherwise)
        make_examples(val)
        return list(train) + list(val)
    return load_requests_from_config(job.data)


def _edits(job) -> bool:
    """The job runs its method's editor (not ``mode=eval``, not a saved delta file)."""
    return getattr(job, "mode", "edit") != "eval" and not getattr(job, "deltas", None)


def validate_job(job, *, run_dir: bool = True, requests: bool = True, method: bool = True) -> Validated:
    """Check everything the run ``job`` will read (module docstring) and return what it goes on with:
    the accepted run directory, the requests and the model's config/tokenizer/skeleton. ``method=False``: skip
    the editing method's checks (``massedit stats``)."""
    from massedit.tasks.runs import check_run_dir, resolve_run_dir

    out = Validated(run_dir=None)
    if run_dir:
        out.run_dir = resolve_run_dir(job)
        check_run_dir(job, out.run_dir)
    check_files(job)
    if requests:
        out.requests = load_job_requests(job)
    method = method and _edits(job)
    stats_layers = _needs_stats(job) if method else []
    if stats_layers and not job.stats.reference_dir:
        check_corpus(job)
    info = inspect_model(job.model)
    out.model = info
    if method:
        check_layers(job, info)
        check_mend_checkpoint(job, info)
    if stats_layers:
        todo = check_reference_stats(job, stats_layers, info)
        if todo and job.stats.reference_dir:
            check_corpus(job)
    if getattr(job, "deltas", None):
        check_deltas_file(job.deltas, info)
    if requests:
        check_lengths(job, out.requests, info)
    log.debug("validated the run: %d requests, model %s", len(out.requests), info.path)
    return out


def validate_stats_job(job, layers) -> Validated:
    """``massedit stats``: the layers, reference files and corpus (no run directory, no requests)."""
    out = validate_job(job, run_dir=False, requests=False, method=False)
    check_stats_layers(layers, out.model)
    todo = check_reference_stats(job, layers, out.model)
    if todo:
        check_corpus(job)
    return out
