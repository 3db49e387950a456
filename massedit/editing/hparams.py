"""Hyper-parameters of ROME and MEMIT (REFERENCE_SPEC §1.5, §2.5), readable from the reference's own
hparams JSON files and from massedit YAML files under ``configs/hparams/{rome,memit}/``.

One dataclass serves both methods (the reference's two formats overlap almost fully). Fields that the
reference does not have are massedit switches; each documents the reference behaviour it keeps or
changes (REFERENCE_SPEC §9).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

# Reference keys that name modules; massedit finds modules through the architecture adapter, so these
# are accepted (for loading reference files verbatim) and kept for information only.
REFERENCE_MODULE_KEYS = (
    "rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module",
    "lm_head_module",
)
# Reference keys that exist but have no effect in the reference either (REFERENCE_SPEC §2.1).
REFERENCE_UNUSED_KEYS = ("layer_selection",)


class HparamsError(ValueError):
    pass


@dataclass
class EditHparams:
    """ROME / MEMIT hyper-parameters (reference names; massedit additions at the end)."""

    layers: list[int]
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 20           # forwards per target optimisation; at most n-1 Adam steps
    v_lr: float = 0.5
    v_loss_layer: int | None = None      # MEMIT: NLL read at block max(v_loss_layer, L); None = last block
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0       # ROME 4, MEMIT 0.75
    kl_factor: float = 0.0625
    mom2_adjustment: bool = True         # ROME: use C^-1 in the key direction
    mom2_update_weight: float = 15000.0  # MEMIT lambda
    context_template_length_params: list = field(default_factory=lambda: [[5, 10], [10, 10]])  # ROME
    mom2_dataset: str = "wikipedia"      # informational: the statistics provider uses cfg.stats
    mom2_n_samples: int = 100000
    mom2_dtype: str = "float32"
    # ---------------------------------------------------------------- massedit additions
    memit_template_prompts: list = field(default_factory=lambda: ["The", "Therefore", "Because", "I", "You"])
    memit_template_length_params: list = field(default_factory=lambda: [[10, 5]])  # [max_out_len, n_gen]
    early_stop_loss: float = 0.05        # reference: stop when loss < 5e-2 (checked before each step)
    kl_prompt: str = "{} is a"           # reference "essence" prompt
    batch_size: int | None = None        # MEMIT: requests per batch (None = all at once); later batches
    #                                      are edited on top of the earlier ones
    batched_targets: bool = True         # optimise the z / v* of a chunk together (False: one at a time)
    targets_max_tokens: int = 2048       # memory bound: padded tokens per batched forward/backward
    reuse_frozen_prefix: bool = True     # compute the blocks below the edit point once per target optimisation
    #                                      (their output does not depend on δ) instead of at every step
    teacher_forcing: str = "ids"         # "ids": prompt ids + target ids[:-1] (right for every tokenizer);
    #                                      "string": the reference's prompt + decode(target[:-1]) re-tokenized
    weight_decay_form: str = "norm"      # "norm": wd*|d|/|v0|^2 (reference); "squared": wd*|d|^2/|v0|^2
    rome_sequential: bool = True         # ROME: each request on the model carrying the previous edits
    module_templates: dict = field(default_factory=dict)  # reference *_tmp keys, informational

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        self.layers = [int(x) for x in self.layers]
        if not self.layers:
            raise HparamsError("hparams field 'layers': at least one layer is required")
        if self.teacher_forcing not in ("ids", "string"):
            raise HparamsError(f"hparams field 'teacher_forcing' must be 'ids' or 'string', got {self.teacher_forcing!r}")
        if self.weight_decay_form not in ("norm", "squared"):
            raise HparamsError(f"hparams field 'weight_decay_form' must be 'norm' or 'squared', got {self.weight_decay_form!r}")
        if self.v_num_grad_steps < 1:
            raise HparamsError("hparams field 'v_num_grad_steps' must be >= 1")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise HparamsError("hparams field 'batch_size' must be >= 1 or null")

    @property
    def z_layer(self) -> int:
        return max(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def z_key(self) -> dict[str, Any]:
        """The fields a target vector depends on (for cache keys)."""
        keys = ("fact_token", "v_num_grad_steps", "v_lr", "v_loss_layer", "v_weight_decay", "clamp_norm_factor",
                "kl_factor", "early_stop_loss", "kl_prompt", "teacher_forcing", "weight_decay_form")
        d = {k: getattr(self, k) for k in keys}
        d["z_layer"] = self.z_layer
        return d

    def replace(self, **kw) -> "EditHparams":
        return dataclasses.replace(self, **kw)


FIELD_NAMES = {f.name for f in dataclasses.fields(EditHparams)}


def hparams_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> EditHparams:
    """Build :class:`EditHparams` from a reference-format or massedit mapping; unknown keys are errors."""
    d = dict(d)
    module_templates = dict(d.pop("module_templates", {}) or {})
    for k in REFERENCE_MODULE_KEYS:
        if k in d:
            module_templates[k] = d.pop(k)
    for k in REFERENCE_UNUSED_KEYS:
        d.pop(k, None)
    unknown = sorted(set(d) - FIELD_NAMES)
    if unknown:
        raise HparamsError(f"{source}: unknown hparams key(s) {unknown}; valid keys: {sorted(FIELD_NAMES)}")
    if "layers" not in d:
        raise HparamsError(f"{source}: missing hparams key 'layers'")
    try:
        return EditHparams(module_templates=module_templates, **d)
    except TypeError as e:
        raise HparamsError(f"{source}: {e}") from None


def load_hparams_file(path: str | Path) -> EditHparams:
    """Read a reference hparams JSON (``hparams/MEMIT/gpt2-xl.json`` style) or a massedit YAML file."""
    path = Path(path)
    if not path.exists():
        raise HparamsError(f"hparams file not found: {path}")
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    else:
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict):
        raise HparamsError(f"{path}: expected a mapping of hparams")
    return hparams_from_dict(data, source=str(path))


def hparams_dir() -> Path:
    from massedit.config import CONFIG_DIR

    return Path(CONFIG_DIR) / "hparams"


def resolve_hparams_path(spec: str, method: str, model_name: str | None) -> Path:
    """``auto`` -> ``configs/hparams/<method>/<model name>.yaml``; a bare name -> that file; else a path."""
    base = hparams_dir() / method
    if spec in (None, "", "auto"):
        if not model_name:
            raise HparamsError(f"method.hparams=auto needs cfg.model.name; choose one of {available_hparams(method)}")
        name = str(model_name).rstrip("/").split("/")[-1].lower()
        cand = base / f"{name}.yaml"
        if not cand.exists():
            raise HparamsError(
                f"no {method} hparams for model {model_name!r} (looked for {cand}); pass method.hparams=NAME "
                f"(one of {available_hparams(method)}) or a path to a reference JSON / YAML file"
            )
        return cand
    p = Path(spec)
    if p.exists():
        return p
    for ext in (".yaml", ".json"):
        cand = base / f"{spec}{ext}"
        if cand.exists():
            return cand
    raise HparamsError(f"hparams {spec!r} not found (not a file, not one of {available_hparams(method)})")


def available_hparams(method: str) -> list[str]:
    base = hparams_dir() / method
    return sorted(p.stem for p in base.glob("*.yaml")) if base.exists() else []


def hparams_from_config(method_cfg: Any, model_cfg: Any = None) -> EditHparams:
    """Hparams for ``cfg.method``: the file named by ``method.hparams`` then every non-null hparams key
    set directly on ``method`` (so ``method.layers=[3,4,5]`` overrides the file)."""
    from omegaconf import DictConfig, OmegaConf

    mc = OmegaConf.to_container(method_cfg, resolve=True) if isinstance(method_cfg, DictConfig) else dict(method_cfg)
    method = str(mc.get("name", "memit"))
    model_name = None
    if model_cfg is not None:
        get = model_cfg.get if hasattr(model_cfg, "get") else (lambda k, d=None: getattr(model_cfg, k, d))
        model_name = get("name") or get("name_or_path")
    path = resolve_hparams_path(mc.get("hparams", "auto"), method, model_name)
    hp = load_hparams_file(path)
    over = {k: v for k, v in mc.items() if k in FIELD_NAMES and v is not None}
    if over:
        hp = hparams_from_dict({**hp.to_dict(), **over}, source=f"{path} + method overrides")
    log.info("%s hparams from %s%s", method, path, f" with overrides {over}" if over else "")
    return hp
