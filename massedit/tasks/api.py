"""The Python API: ``massedit.load_model``, ``massedit.edit``, ``massedit.evaluate`` (re-exported lazily by the root
package)::

    import massedit
    model, tok = massedit.load_model("smollm2-135m")          # or any HF name/path, dtype=..., device_map=...
    result = massedit.edit(model, tok, [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                                         "target": "Rome"}], method="memit")
    result.apply(model); result.revert(model); result.save("edit.safetensors"); result.save_pretrained(model, tok, "out/")
    metrics = massedit.evaluate(model, tok, requests)          # the paper's metrics

Every keyword of :func:`edit` / :func:`evaluate` is a config key, composed by
:func:`massedit.tasks.config.compose` exactly as on the command line (one source of defaults and checks):
``stats={"n_tokens": 20000}`` = ``stats.n_tokens=20000``, ``layers=[4, 5]`` = ``method.layers=[4,5]`` (keys of the
method), ``seed=1``, or dotted names as ``**{"method.v_lr": 0.1}``. Hyper-parameters come from the model:
``hparams/<method>/<model name>.yaml`` when one exists, else the architecture adapter's choice
(:func:`massedit.tasks.config.architecture_hparams`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from massedit.core.deltas import Deltas, apply_deltas, delta_norms, revert_deltas, save_deltas
from massedit.core.errors import InputError
from massedit.data.requests import EditRequest, RequestValidationError, parse_records, validate_request

log = logging.getLogger("massedit")

GROUPS = ("model", "data", "eval", "stats", "trainer", "logger", "export")


class ApiError(InputError):
    """A bad argument of the Python API (named in the message)."""


# ------------------------------------------------------------------------------------------------ models
def load_model(name_or_path: str = "smollm2-135m", *, dtype: str | torch.dtype = "float32", device=None,
               device_map: Any = None, revision: str | None = None, cache_dir: str | None = None):
    """``(model, tokenizer)``: the built-in SmolLM2-135M (``"smollm2-135m"``) or any Hugging Face causal LM by hub
    id or local path. ``device``: move the model there; ``device_map`` (e.g. ``"auto"``) is passed to
    ``from_pretrained`` to dispatch the model over several devices. The model is in eval mode with gradients off;
    it remembers where it came from (for the ``edits.json`` manifest of an export)."""
    from massedit.core.models import ModelConfig, load_model_and_tokenizer, parse_dtype, resolve_model_path

    dtype_name = str(parse_dtype(dtype)).replace("torch.", "")
    name = str(name_or_path).rstrip("/").split("/")[-1].lower()
    fields_ = {f.name for f in dataclasses.fields(ModelConfig)}
    kw: dict[str, Any] = {"name": name, "name_or_path": str(name_or_path), "dtype": dtype_name, "revision": revision,
                          "cache_dir": cache_dir}
    if device_map is not None and "device_map" in fields_:
        kw["device_map"] = device_map
    cfg = ModelConfig(**kw)
    if device_map is not None and "device_map" not in fields_:
        model, tok = _load_dispatched(cfg, resolve_model_path(cfg), device_map)
    else:
        model, tok = load_model_and_tokenizer(cfg, device=device)
    model._massedit_name_or_path = str(name_or_path)
    model._massedit_revision = revision
    return model, tok


def _load_dispatched(cfg, path: str, device_map):
    """``from_pretrained(..., device_map=...)`` (accelerate's dispatch over the visible devices)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from massedit.core.models import ModelNotAvailableError
    from massedit.core.tokenization import prepare_tokenizer

    rev = {"revision": cfg.revision} if cfg.revision else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=cfg.torch_dtype, device_map=device_map, **rev)
        tok = AutoTokenizer.from_pretrained(path, **rev)
    except OSError as e:
        raise ModelNotAvailableError(f"could not load model {path!r}: {e}") from None
    prepare_tokenizer(tok)
    model.eval().requires_grad_(False)
    return model, tok


def model_identity(model) -> tuple[str, str]:
    """``(model.name, model.name_or_path)`` for the config of an already loaded model."""
    nop = getattr(model, "_massedit_name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    nop = str(nop or "in-memory-model")
    return nop.rstrip("/").split("/")[-1].lower(), nop


# ------------------------------------------------------------------------------------------------ requests
def as_requests(requests: Any) -> list[EditRequest]:
    """Edit requests from dicts (the request-file formats: ``prompt`` with ``{}``, ``subject``, ``target`` /
    ``target_new``, optional ``target_true``, ``paraphrase_prompts``, ``neighborhood_prompts``, ...; CounterFact
    and zsRE records too) or :class:`EditRequest` objects, validated with the same rules and messages as a file."""
    if isinstance(requests, (dict, EditRequest)):
        requests = [requests]
    if isinstance(requests, (str, Path)):
        raise ApiError(f"requests: got a {type(requests).__name__}; pass a list of dicts or EditRequest objects "
                       f"(a request file: massedit.data.requests.load_requests({str(requests)!r}))")
    try:
        items = list(requests)
    except TypeError:
        raise ApiError(f"requests: expected a list of dicts or EditRequest objects, got {type(requests).__name__}") from None
    if not items:
        raise ApiError("requests: the list is empty")
    out: list[EditRequest] = []
    for i, item in enumerate(items):
        if isinstance(item, EditRequest):
            out.append(validate_request(dataclasses.replace(item), {"file": "requests", "index": i}))
        elif isinstance(item, Mapping):
            reqs, _ = parse_records([dict(item)], file="requests", start_index=i)
            out.extend(reqs)
        else:
            raise RequestValidationError(f"expected a dict or an EditRequest, got {type(item).__name__}",
                                         file="requests", index=i)
    seen: dict[Any, int] = {}
    for i, r in enumerate(out):
        if r.case_id in seen:
            raise RequestValidationError(f"duplicate case_id (first seen at record {seen[r.case_id]})", file="requests",
                                         index=i, case_id=r.case_id, field="case_id")
        seen[r.case_id] = i
    return out


# ------------------------------------------------------------------------------------------------ overrides
def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, Path):
        return str(v)
    try:
        return json.dumps(v)  # JSON is YAML: lists, dicts, numbers, true/false/null
    except TypeError:
        raise ApiError(f"cannot pass a {type(v).__name__} as a config value: {v!r}") from None


def _flatten(prefix: str, v: Any) -> list[str]:
    if isinstance(v, Mapping):
        out = []
        for k, x in v.items():
            out += _flatten(f"{prefix}.{k}", x)
        return out
    return [f"{prefix}={_fmt(v)}"]


def overrides_to_args(method: str, overrides: Mapping[str, Any]) -> list[str]:
    """Keyword overrides as command-line ``key=value`` strings: groups (``stats={...}``), keys of the method
    (``layers=[...]`` -> ``method.layers``), top-level job keys (``seed=1``) and dotted names."""
    from massedit.tasks.config import METHOD_SCHEMAS, EditJobConfig

    method_fields = {f.name for f in dataclasses.fields(METHOD_SCHEMAS[method])} if method in METHOD_SCHEMAS else set()
    top = {f.name for f in dataclasses.fields(EditJobConfig)} - {"method", "choices", "overrides"}
    args: list[str] = []
    for k, v in overrides.items():
        if "." in k:
            args += _flatten(k, v) if isinstance(v, Mapping) else [f"{k}={_fmt(v)}"]
        elif k in GROUPS:
            args += _flatten(k, v) if isinstance(v, Mapping) else [f"{k}={_fmt(v)}"]  # a mapping, or an option name
        elif k in method_fields:
            args += _flatten(f"method.{k}", v)
        elif k in top:
            args.append(f"{k}={_fmt(v)}")
        else:
            raise ApiError(f"unknown keyword {k!r}: not a key of method {method!r} ({sorted(method_fields)}), a config "
                           f"group ({list(GROUPS)}) or a job key ({sorted(top)})")
    return args


def compose_for_model(model, method: str | None, overrides: Mapping[str, Any], config_dir: Sequence[str] = ()):
    """The ``edit`` job config for ``model`` (its name picks the hparams file) with keyword overrides."""
    from massedit.tasks.config import compose

    name, nop = model_identity(model)
    args = ([f"method={method}"] if method else []) + [f"model.name={name}", f"model.name_or_path={nop}"]
    args += overrides_to_args(method or "memit", overrides)
    return compose("edit", args, config_dir, hf_config=getattr(model, "config", None))


def _ensure_logging() -> None:
    """Show massedit's INFO messages (statistics announcements, ETAs) in a plain script with no logging set up."""
    if not logging.getLogger().handlers:
        from massedit.tasks.runs import configure_logging

        configure_logging("INFO")


# ------------------------------------------------------------------------------------------------ result
@dataclass
class EditResult:
    """What :func:`edit` returns: the weight deltas and how they were made.

    ``deltas``: ``{parameter name: ΔW}`` (``W + ΔW`` is the edited weight); ``info``: the editor's summary;
    ``requests``, ``method``, ``hparams`` (the composed method config) and ``base_model`` (for the manifest)."""

    deltas: Deltas
    info: dict[str, Any]
    requests: list[EditRequest]
    method: str
    hparams: dict[str, Any]
    base_model: dict[str, Any]
    job: Any = field(default=None, repr=False)
    _backups: dict[int, Deltas] = field(default_factory=dict, repr=False)

    @property
    def delta_norms(self) -> dict[str, float]:
        return delta_norms(self.deltas)

    def is_applied(self, model) -> bool:
        return id(model) in self._backups

    def apply(self, model):
        """Add the deltas to ``model`` in place (once; :meth:`revert` restores the weights bit-identically)."""
        if id(model) in self._backups:
            raise ApiError("these deltas are already applied to this model; revert(model) first")
        self._backups[id(model)] = apply_deltas(model, self.deltas)
        return model

    def revert(self, model):
        """Restore the weights :meth:`apply` changed (bit-identical)."""
        backup = self._backups.pop(id(model), None)
        if backup is None:
            raise ApiError("these deltas are not applied to this model (apply(model) first)")
        revert_deltas(model, backup)
        return model

    def manifest(self) -> dict[str, Any]:
        from massedit.tasks.export import edit_manifest

        return edit_manifest(requests=self.requests, method=self.method, hparams=self.hparams, deltas=self.deltas,
                             base_model=self.base_model, info=self.info)

    def save(self, path: str | Path) -> Path:
        """The deltas as one safetensors file (``massedit edit deltas=PATH`` / ``massedit eval deltas=PATH`` read it)."""
        meta = {"method": self.method, "num_requests": str(len(self.requests)),
                "model": self.base_model.get("name_or_path", "")}
        return save_deltas(path, self.deltas, meta)

    def save_pretrained(self, model, tok, out_dir: str | Path) -> Path:
        """``model`` with the edit as a standard Hugging Face checkpoint in ``out_dir`` (safetensors + tokenizer +
        ``edits.json``); ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it. The model is left as it was
        (edited or not)."""
        from massedit.tasks.export import export_with_deltas

        return export_with_deltas(model, tok, out_dir, self.deltas, self.manifest(), applied=self.is_applied(model))

    def __repr__(self) -> str:
        total = sum(v * v for v in self.delta_norms.values()) ** 0.5
        return (f"EditResult(method={self.method!r}, requests={len(self.requests)}, params={len(self.deltas)}, "
                f"|ΔW|={total:.4g})")


# ------------------------------------------------------------------------------------------------ edit / evaluate
def edit(model, tok, requests: Any, method: str = "memit", *, config_dir: Sequence[str] = (), progress: bool = True,
         **overrides) -> EditResult:
    """Edit ``model`` with ``method`` (rome, memit, ft, ftl, ftw, mend) on ``requests``; returns an :class:`EditResult`.

    The model is left exactly as found: ``result.apply(model)`` edits it. ROME/MEMIT collect second-moment
    statistics the first time (size and ETA announced; cached for every later call)."""
    from massedit.tasks.config import as_dict
    from massedit.tasks.export import base_model_info
    from massedit.tasks.methods import build_editor

    _ensure_logging()
    reqs = as_requests(requests)
    job = compose_for_model(model, method, overrides, config_dir)
    editor = build_editor(job, progress=progress)
    deltas = editor.edit(model, tok, reqs)
    from massedit.core.deltas import check_deltas
    from massedit.core.guards import check_update_norms

    check_deltas(model, deltas)  # names/shapes, NaN/Inf and edit_guard.max_relative_norm: a broken edit is an error,
    check_update_norms(deltas, dict(model.named_parameters(remove_duplicate=False)),  # never a result to apply
                       job.edit_guard.max_relative_norm, source=job.method.name)
    hp = as_dict(job)["method"]
    return EditResult(deltas=deltas, info=dict(getattr(editor, "info", {}) or {}), requests=reqs, method=job.method.name,
                      hparams=hp, base_model=base_model_info(model, revision=job.model.revision), job=job)


def evaluate(model, tok, requests: Any, *, stage: str = "post", config_dir: Sequence[str] = (), **eval_overrides):
    """The paper's metrics (CounterFact / zsRE, REFERENCE_SPEC §4) of ``model`` as it is now on ``requests``:
    an :class:`~massedit.evaluation.config.EvalResult` (``.summary``: ES/PS/NS/Score ×100, ``.ci``, ``.per_case``).
    Keywords are ``eval`` keys (``generation=False``, ``batch_size=16``) or ``trainer={...}``."""
    from massedit.tasks.config import compose
    from massedit.tasks.evaluate import evaluate as evaluate_on_trainer

    _ensure_logging()
    reqs = as_requests(requests)
    args = []
    for k, v in eval_overrides.items():
        if k == "trainer" or k.startswith("trainer."):
            args += _flatten(k, v) if isinstance(v, Mapping) else [f"{k}={_fmt(v)}"]
        else:
            args += _flatten(k if k.startswith("eval.") else f"eval.{k}", v)
    job = compose("edit", args, config_dir)
    trainer_cfg = job.trainer if any(a.startswith("trainer.") for a in args) else None
    return evaluate_on_trainer(model, tok, reqs, job.eval, stage=stage, trainer_cfg=trainer_cfg)

