"""Hyper-parameters of ROME and MEMIT (REFERENCE_SPEC §1.5, §2.5) and the ``method`` configs of the two editors.

:class:`EditHparams` holds what the equations read (one dataclass for both methods: the reference's two formats
overlap almost fully); :class:`RomeConfig` / :class:`MemitConfig` add the editor options (hparams file, context
templates, z cache) and are the typed schema of ``method=rome`` / ``method=memit``. Their defaults are the
reference's GPT-2 XL values; per-model values live in ``configs/hparams/<method>/<model>.yaml`` (or a reference
hparams JSON), which the config composer merges under the command-line overrides
(:func:`massedit.tasks.config.compose`). Fields that the reference does not have are massedit switches; each
documents the reference behaviour it keeps or changes (REFERENCE_SPEC §9).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from massedit.core.errors import InputError

log = logging.getLogger(__name__)

# Reference keys that name modules; massedit finds modules through the architecture adapter, so these are
# accepted when reading a reference file verbatim and not used.
REFERENCE_MODULE_KEYS = (
    "rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module",
)
# Reference keys that exist but have no effect in the reference either (REFERENCE_SPEC §2.1).
REFERENCE_UNUSED_KEYS = ("layer_selection",)
# Reference keys that configure the second-moment statistics: they belong to the ``stats`` group and are
# translated into it when a reference file is read (:func:`read_hparams_file`).
REFERENCE_STATS_KEYS = ("mom2_dataset", "mom2_n_samples", "mom2_dtype")


class HparamsError(InputError):
    pass


@dataclass
class EditHparams:
    """ROME / MEMIT hyper-parameters (reference names; massedit additions at the end)."""

    layers: list[int] = field(default_factory=list)
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
    # ---------------------------------------------------------------- massedit additions
    memit_template_prompts: list = field(default_factory=lambda: ["The", "Therefore", "Because", "I", "You"])
    memit_template_length_params: list = field(default_factory=lambda: [[10, 5]])  # [max_out_len, n_gen]
    early_stop_loss: float = 0.05        # reference: stop when loss < 5e-2 (checked before each step)
    kl_prompt: str = "{} is a"           # reference "essence" prompt
    batch_size: int | None = None        # MEMIT: requests per batch (None = all at once); later batches
    #                                      are edited on top of the earlier ones
    batched_targets: bool = True         # optimise the z / v* of a chunk together (False: one at a time)
    targets_max_tokens: int = 2048       # memory bound: padded whole-row tokens per batched sub-batch (suffix mode:
    #                                      tokens per chunk of its once-per-group forwards)
    targets_step_tokens: int = 2048      # targets_forward=suffix, memory bound: suffix tokens per sub-batch, i.e.
    #                                      per Adam step's forward/backward (requests are independent: only speed
    #                                      and memory depend on it)
    reuse_frozen_prefix: bool = True     # targets_forward=full: compute the blocks up to the edit point once per target optimisation
    #                                      (their output does not depend on δ) instead of at every step
    targets_forward: str = "suffix"      # "suffix": per step only the positions from each row's subject token on run
    #                                      through the blocks above the edit point, attending to the K/V of the
    #                                      unchanged prefix computed once; "full": whole rows every step (the
    #                                      reference's arithmetic; with reuse_frozen_prefix the blocks up to the edit
    #                                      point are still computed once). Same equations, equal up to float rounding
    targets_pack_rows: bool = True       # targets_forward=suffix: several rows' short suffixes side by side in one
    #                                      lane of the step's batch, each attending only its own row (false: one row
    #                                      per lane, padded); only speed depends on it
    targets_autocast: str | None = None  # null | bf16 | fp16: run the frozen model's forwards of the target
    #                                      optimisation under CUDA autocast (δ, logits and loss stay float32);
    #                                      ignored on CPU
    block_attention: str = "grouped"     # attention in the blocks massedit runs itself (target steps, prefix pass,
    #                                      keys between layers): "grouped" (softmax(q k^T s + mask) v with the query
    #                                      heads of one key/value head stacked, no repeated K/V; faster for short
    #                                      queries) or "model" (the model's attention implementation); equal up to
    #                                      float rounding
    keys_reuse_max_gib: float | None = 8.0  # MEMIT keys: the residual stream of the key contexts is kept between
    #                                      layers, so each layer's read runs only the blocks above the previous one,
    #                                      while it fits this many GiB (on a GPU also a quarter of its free
    #                                      memory; null/0: a full forward per layer, the
    #                                      reference's arithmetic; equal up to float rounding)
    teacher_forcing: str = "ids"         # "ids": prompt ids + target ids[:-1] (right for every tokenizer);
    #                                      "string": the reference's prompt + decode(target[:-1]) re-tokenized
    weight_decay_form: str = "norm"      # "norm": wd*|d|/|v0|^2 (reference); "squared": wd*|d|^2/|v0|^2
    rome_sequential: bool = True         # ROME: each request on the model carrying the previous edits

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        self.layers = [int(x) for x in self.layers]
        self.validate_values()

    def validate_values(self) -> None:
        """Range/choice checks (the layer list may still be empty here: see :meth:`validate`)."""
        if self.teacher_forcing not in ("ids", "string"):
            raise HparamsError(f"hparams field 'teacher_forcing' must be 'ids' or 'string', got {self.teacher_forcing!r}")
        if self.weight_decay_form not in ("norm", "squared"):
            raise HparamsError(f"hparams field 'weight_decay_form' must be 'norm' or 'squared', got {self.weight_decay_form!r}")
        if self.fact_token not in ("subject_last", "subject_first", "last", "subject_first_after_last"):
            raise HparamsError(f"hparams field 'fact_token'={self.fact_token!r}: choose subject_last, subject_first, "
                               f"subject_first_after_last or last")
        if int(self.v_num_grad_steps) < 1:
            raise HparamsError("hparams field 'v_num_grad_steps' must be >= 1")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise HparamsError("hparams field 'batch_size' must be >= 1 or null")
        if self.targets_forward not in ("suffix", "full"):
            raise HparamsError(f"hparams field 'targets_forward' must be 'suffix' or 'full', got {self.targets_forward!r}")
        if self.targets_autocast not in (None, "bf16", "fp16"):
            raise HparamsError(f"hparams field 'targets_autocast' must be null, 'bf16' or 'fp16', got {self.targets_autocast!r}")
        if self.block_attention not in ("grouped", "model"):
            raise HparamsError(f"hparams field 'block_attention' must be 'grouped' or 'model', got {self.block_attention!r}")
        if int(self.targets_max_tokens) < 1:
            raise HparamsError("hparams field 'targets_max_tokens' must be >= 1")
        if int(self.targets_step_tokens) < 1:
            raise HparamsError("hparams field 'targets_step_tokens' must be >= 1")
        for name in ("v_lr", "clamp_norm_factor", "mom2_update_weight"):
            if not float(getattr(self, name)) > 0:
                raise HparamsError(f"hparams field {name!r} must be > 0, got {getattr(self, name)}")
        for name in ("v_weight_decay", "kl_factor", "early_stop_loss"):
            if float(getattr(self, name)) < 0:
                raise HparamsError(f"hparams field {name!r} must be >= 0, got {getattr(self, name)}")
        if self.kl_prompt.count("{}") != 1:
            raise HparamsError(f"hparams field 'kl_prompt' must contain exactly one '{{}}', got {self.kl_prompt!r}")

    def validate(self, num_layers: int | None = None) -> "EditHparams":
        """Full check before editing: at least one layer, each inside the model (when ``num_layers`` is known)."""
        if not self.layers:
            raise HparamsError("hparams field 'layers': at least one layer is required")
        if num_layers is not None:
            bad = [l for l in self.layers if not 0 <= l < num_layers]
            if bad:
                raise HparamsError(f"hparams field 'layers': {bad} outside the model's {num_layers} layers (0..{num_layers - 1})")
            if self.v_loss_layer is not None and not 0 <= int(self.v_loss_layer) < num_layers:
                raise HparamsError(f"hparams field 'v_loss_layer'={self.v_loss_layer} outside the model's {num_layers} layers")
        return self

    @property
    def z_layer(self) -> int:
        return max(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(EditHparams)}

    def z_key(self) -> dict[str, Any]:
        """The fields a target vector depends on (for cache keys)."""
        keys = ("fact_token", "v_num_grad_steps", "v_lr", "v_loss_layer", "v_weight_decay", "clamp_norm_factor",
                "kl_factor", "early_stop_loss", "kl_prompt", "teacher_forcing", "weight_decay_form")
        d = {k: getattr(self, k) for k in keys}
        d["z_layer"] = self.z_layer
        return d

    def replace(self, **kw) -> "EditHparams":
        return dataclasses.replace(self, **kw)


@dataclass
class RomeMemitOptions:
    """Editor options shared by ROME and MEMIT (not read by the equations)."""

    hparams: str = "auto"                # auto (hparams/<method>/<model.name>.yaml) | a name there | a file path
    context_templates: str | None = None  # null: sampled once (seeded) from the unedited model; or a JSON file
    template_seed: int = 0               # torch seed for sampling the templates (the reference does not seed)
    z_cache: bool = True                 # cache every request's target vector on disk (resume without recomputing)
    z_cache_dir: str | None = None       # default: $MASSEDIT_CACHE/targets (~/.cache/massedit/targets)
    solver_device: str | None = None     # where MEMIT's float64 solve / ROME's C⁻¹ run: null = the model's (first)
                                         # device; e.g. cpu or cuda:1 for a model spread over GPUs (model.device_map)


@dataclass
class RomeConfig(EditHparams, RomeMemitOptions):
    """``method=rome`` (REFERENCE_SPEC §1): sequential rank-one edits of one MLP layer."""

    name: str = "rome"
    z_cache: bool = False                # ROME's v* depend on the previous edits (sequential): no cache by default


@dataclass
class MemitConfig(EditHparams, RomeMemitOptions):
    """``method=memit`` (REFERENCE_SPEC §2): one batched least-squares update spread over ``layers``."""

    name: str = "memit"
    v_num_grad_steps: int = 20
    clamp_norm_factor: float = 0.75
    mom2_update_weight: float = 20000.0


FIELD_NAMES = {f.name for f in dataclasses.fields(EditHparams)}


def hparams_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> EditHparams:
    """Build :class:`EditHparams` from a reference-format or massedit mapping; unknown keys are errors."""
    d = {k: v for k, v in dict(d).items()
         if k not in REFERENCE_MODULE_KEYS + REFERENCE_UNUSED_KEYS + REFERENCE_STATS_KEYS}
    unknown = sorted(set(d) - FIELD_NAMES)
    if unknown:
        raise HparamsError(f"{source}: unknown hparams key(s) {unknown}; valid keys: {sorted(FIELD_NAMES)}")
    try:
        return EditHparams(**d).validate()
    except TypeError as e:
        raise HparamsError(f"{source}: {e}") from None


def read_hparams_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(hparams values, stats values)`` of a reference hparams JSON (``hparams/MEMIT/gpt2-xl.json`` style) or a
    massedit YAML file. Module-name keys are dropped (the architecture adapter finds the modules); the
    reference's statistics keys become ``stats`` values: ``mom2_n_samples`` -> ``n_samples`` (documents, with
    ``n_tokens: null``), ``mom2_dtype`` -> ``dtype``; ``mom2_dataset`` names the reference's corpus, which
    ``stats.corpus`` replaces (logged)."""
    path = Path(path)
    if not path.is_file():
        raise HparamsError(f"hparams file not found: {path}")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            from omegaconf import OmegaConf

            data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:
        raise HparamsError(f"{path}: cannot parse ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise HparamsError(f"{path}: expected a mapping of hparams")
    stats: dict[str, Any] = {}
    if "mom2_n_samples" in data:
        stats.update(n_samples=int(data["mom2_n_samples"]), n_tokens=None)
    if "mom2_dtype" in data:
        stats["dtype"] = str(data["mom2_dtype"])
    if "mom2_dataset" in data:
        log.info("%s: the reference's statistics corpus %r is replaced by stats.corpus", path, data["mom2_dataset"])
    hp = {k: v for k, v in data.items() if k not in REFERENCE_MODULE_KEYS + REFERENCE_UNUSED_KEYS + REFERENCE_STATS_KEYS}
    unknown = sorted(set(hp) - FIELD_NAMES)
    if unknown:
        raise HparamsError(f"{path}: unknown hparams key(s) {unknown}; valid keys: {sorted(FIELD_NAMES)}")
    return hp, stats


def load_hparams_file(path: str | Path) -> EditHparams:
    """:class:`EditHparams` of a reference hparams JSON or a massedit YAML file (see :func:`read_hparams_file`)."""
    hp, _ = read_hparams_file(path)
    return hparams_from_dict(hp, source=str(path))


# ------------------------------------------------------------------------------------------ unknown models
# The paper's GPT-J-6B values (28 layers), the reference hparams/{ROME,MEMIT}/EleutherAI_gpt-j-6B.json; for a model
# without an hparams file the edited layers keep GPT-J's *relative depth* (MEMIT 3..8 of 28, ROME 5 of 28) and the
# loss is read at the last block.
PAPER_VALUES = {
    "memit": {"fact_token": "subject_last", "v_num_grad_steps": 25, "v_lr": 0.5, "v_weight_decay": 0.5,
              "clamp_norm_factor": 0.75, "kl_factor": 0.0625, "mom2_adjustment": True, "mom2_update_weight": 15000.0},
    "rome": {"fact_token": "subject_last", "v_num_grad_steps": 20, "v_lr": 0.5, "v_weight_decay": 0.5,
             "clamp_norm_factor": 4.0, "kl_factor": 0.0625, "mom2_adjustment": True,
             "context_template_length_params": [[5, 10], [10, 10]]},
}
PAPER_DEPTH = {"memit": (3, 8, 28), "rome": (5, 5, 28)}  # first layer, last layer, of the paper model's layers


def layers_by_relative_depth(method: str, num_layers: int) -> list[int]:
    """The paper model's edited layers mapped to a model of ``num_layers`` blocks at the same relative depth
    (MEMIT: GPT-J's 3..8 of 28 -> 3..9 of 30; ROME: 5 of 28 -> 5 of 30); at least one layer, all inside the model."""
    first, last, n = PAPER_DEPTH[method]
    if num_layers < 1:
        raise HparamsError(f"a model with {num_layers} layers cannot be edited")
    lo = min(num_layers - 1, int(round(first * num_layers / n)))
    hi = min(num_layers - 1, max(lo, int(round(last * num_layers / n))))
    return list(range(lo, hi + 1))


def hparams_for_depth(method: str, num_layers: int) -> dict[str, Any]:
    """ROME/MEMIT hyper-parameters for a model without an hparams file: layers by relative depth
    (:func:`layers_by_relative_depth`), the loss at the last block, the paper's GPT-J values for the rest."""
    if method not in PAPER_VALUES:
        raise HparamsError(f"no paper values for method {method!r}; choose one of {sorted(PAPER_VALUES)}")
    return {"layers": layers_by_relative_depth(method, num_layers), "v_loss_layer": int(num_layers) - 1,
            **PAPER_VALUES[method]}
