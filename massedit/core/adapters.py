"""Architecture adapters: the only place where model families differ.

Every editor, statistic and metric asks an :class:`ArchAdapter` where things live (rewrite module of
layer ``i``, block output, final norm, unembedding, ...). Adapters are chosen from the model's
*config class* through a registry (:func:`get_adapter`), never from string tests on model names.

Orientation convention: editing math is written for a map ``value = W @ key`` with ``W`` of shape
``[d, m]`` (out x in, the ``nn.Linear`` layout). GPT-2's ``Conv1D`` stores ``[in, out] = [m, d]``;
:meth:`ArchAdapter.to_param_layout` / :meth:`ArchAdapter.from_param_layout` convert.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn
from massedit.core.attention import GROUPED, attention_implementation
from massedit.core.errors import InputError
from massedit.core.placement import param_storage


class UnsupportedArchitectureError(InputError):
    """Raised when no adapter is registered for a model's config class."""


@dataclass
class ArchAdapter:
    """Where the pieces of one transformer family live. Subclasses fill in the module templates."""

    model: nn.Module

    # module path templates, ``{}`` = layer index
    block_tmp: ClassVar[str]
    mlp_tmp: ClassVar[str]
    rewrite_tmp: ClassVar[str]          # MLP down-projection ("rewrite module")
    mlp_in_tmp: ClassVar[str]           # MLP up-projection(s) (first entry used for MEND's default set)
    extra_mlp_in_tmps: ClassVar[tuple[str, ...]] = ()  # e.g. Llama gate_proj
    final_norm_name: ClassVar[str]
    layers_attr: ClassVar[str]          # config attribute with the layer count
    conv1d: ClassVar[bool] = False      # weights stored [in, out]
    family: ClassVar[str] = "base"

    # ---------------------------------------------------------------- sizes
    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return int(getattr(self.config, self.layers_attr))

    @property
    def hidden_size(self) -> int:
        """d: residual width."""
        return int(self.embedding.weight.shape[1])

    @property
    def mlp_inner_size(self) -> int:
        """m: width of the rewrite module's input (the key)."""
        w = self.rewrite_module(0).weight
        return int(w.shape[0] if self.conv1d else w.shape[1])

    @property
    def context_length(self) -> int:
        for attr in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
            v = getattr(self.config, attr, None)
            if isinstance(v, int) and v > 0:
                return v
        raise UnsupportedArchitectureError("model config declares no context length")

    # ---------------------------------------------------------------- names
    def block_name(self, i: int) -> str:
        return self.block_tmp.format(self._check_layer(i))

    def mlp_name(self, i: int) -> str:
        return self.mlp_tmp.format(self._check_layer(i))

    def rewrite_name(self, i: int) -> str:
        return self.rewrite_tmp.format(self._check_layer(i))

    def rewrite_weight_name(self, i: int) -> str:
        return self.rewrite_name(i) + ".weight"

    def mlp_in_names(self, i: int) -> list[str]:
        self._check_layer(i)
        return [t.format(i) for t in (self.mlp_in_tmp, *self.extra_mlp_in_tmps)]

    # ---------------------------------------------------------------- modules
    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def block(self, i: int) -> nn.Module:
        return self.module(self.block_name(i))

    def mlp(self, i: int) -> nn.Module:
        return self.module(self.mlp_name(i))

    def rewrite_module(self, i: int) -> nn.Module:
        return self.module(self.rewrite_name(i))

    def rewrite_weight(self, i: int) -> torch.Tensor:
        """The rewrite module's weight (in place writes change the model; offloaded: its in-memory copy)."""
        return param_storage(self.model, self.rewrite_weight_name(i))

    @property
    def final_norm(self) -> nn.Module:
        return self.module(self.final_norm_name)

    @property
    def embedding(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        """Output embedding (transformers' ``get_output_embeddings``; NeoX renamed it across versions)."""
        return self.model.get_output_embeddings()

    @property
    def embed_name(self) -> str:
        return self._name_of(self.embedding)

    @property
    def lm_head_name(self) -> str:
        return self._name_of(self.lm_head)

    def _name_of(self, module: nn.Module) -> str:
        for name, mod in self.model.named_modules():
            if mod is module:
                return name
        raise KeyError("module not found in model")

    @property
    def lm_head_tied(self) -> bool:
        return self.lm_head.weight is self.embedding.weight or (
            self.lm_head.weight.data_ptr() == self.embedding.weight.data_ptr()
        )

    def lm_head_weight(self) -> torch.Tensor:
        """Unembedding matrix ``[V, d]``."""
        return self.lm_head.weight

    def lm_head_bias(self) -> torch.Tensor | None:
        return getattr(self.lm_head, "bias", None)

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from a last-block hidden state: final norm, then the LM head (with its bias)."""
        return self.lm_head(self.final_norm(hidden))

    # ---------------------------------------------------------------- orientation
    def to_param_layout(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        """Convert a ``[d, m]`` (out x in) matrix to the rewrite weight's stored layout."""
        return delta_out_in.T if self.conv1d else delta_out_in

    def from_param_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """Convert a stored rewrite weight (or delta) to the ``[d, m]`` (out x in) layout."""
        return weight.T if self.conv1d else weight

    def weight_in_out(self, module_name: str) -> torch.Tensor:
        """Any projection's weight as ``[out, in]`` (Conv1D transposed)."""
        w = self.module(module_name).weight
        return w.T if self.conv1d else w

    # ---------------------------------------------------------------- running blocks directly
    def block_runner_unsupported(self) -> str | None:
        """Why :meth:`run_blocks` cannot run this model (None: it can). The runner builds its own 4D masks, which
        the ``sdpa`` and ``eager`` attention implementations take; sliding-window attention is not modelled."""
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        if impl not in ("sdpa", "eager"):
            return f"attention implementation {impl!r} (the block runner supports sdpa and eager)"
        window = getattr(self.config, "sliding_window", None)
        if window and getattr(self.config, "use_sliding_window", True):
            return f"sliding-window attention (sliding_window={window})"
        return None

    def attention_bias(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A ``[B, 1, Q, K]`` mask for the model's attention implementation from ``allowed`` ``[B, Q, K]`` (True = the
        query attends the key): boolean for sdpa, additive (0 / dtype min) for eager."""
        allowed = allowed[:, None]
        if (getattr(self.config, "_attn_implementation", None) or "eager") == "sdpa":
            return allowed
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)

    def rotary_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """Position embeddings of the model's shared rotary module (None where the blocks do their own, e.g. GPT-2)."""
        rot = getattr(self.model.base_model, "rotary_emb", None)
        return None if rot is None else rot(hidden, position_ids=position_ids)

    def run_blocks(self, hidden: torch.Tensor, start: int, stop: int, *, allowed: torch.Tensor,
                   position_ids: torch.Tensor, cache=None, keep=(), attention: str = "model") -> dict[int, torch.Tensor]:
        """Run blocks ``start..stop`` (inclusive) on ``hidden`` ``[B, Q, d]`` — the residual stream entering block
        ``start`` — with ``position_ids`` ``[B, Q]`` and the attention pattern ``allowed`` ``[B, Q, K]`` over the keys
        (``K`` = cached prefix + ``Q``). ``cache`` (e.g. :class:`PrefixKVCache`) receives every layer's keys/values.
        ``attention``: ``"model"`` (the model's own implementation) or ``"grouped"``
        (:func:`massedit.core.attention.grouped_attention`: the same softmax attention, faster for many short queries).
        Returns the hidden state after each block in ``keep`` and after ``stop``; key ``start - 1`` is the input."""
        out = {start - 1: hidden}
        if stop < start:
            return out
        if attention not in ("model", "grouped"):
            raise ValueError(f"attention must be 'model' or 'grouped', got {attention!r}")
        mask = self.attention_bias(allowed, hidden.dtype)
        pe = self.rotary_embeddings(hidden, position_ids)
        impl = GROUPED if attention == "grouped" and self.grouped_attention_unsupported() is None else None
        with attention_implementation(self.config, impl):
            self._run_blocks(hidden, start, stop, mask, position_ids, pe, cache, keep, out)
        return out

    def grouped_attention_unsupported(self) -> str | None:
        """Why :func:`~massedit.core.attention.grouped_attention` would not compute this model's attention (None:
        it does). It computes ``softmax(q kᵀ · scaling + mask) v`` with the module's ``scaling``, as transformers'
        ``sdpa``; configurations whose attention differs from that keep the model's own implementation."""
        if getattr(self.config, "reorder_and_upcast_attn", False):
            return "reorder_and_upcast_attn (eager GPT-2 computes the scores in float32)"
        return None

    def _run_blocks(self, hidden, start, stop, mask, position_ids, pe, cache, keep, out) -> None:
        for i in range(start, stop + 1):
            block = self.block(i)
            kw = _block_kwargs(type(block))
            args = {"attention_mask": mask}
            if kw["position_ids"]:
                args["position_ids"] = position_ids
            if kw["position_embeddings"] and pe is not None:
                args["position_embeddings"] = pe
            if cache is not None:
                if kw["cache"] is None:
                    raise UnsupportedArchitectureError(f"block {i} ({type(block).__name__}) takes no cache argument")
                args[kw["cache"]] = cache
                args["use_cache"] = True
            hidden = self.block_hidden(block(hidden, **args))
            if i in keep or i == stop:
                out[i] = hidden

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def block_hidden(output) -> torch.Tensor:
        """Hidden state from a block's forward output (tuple element 0 or the tensor itself)."""
        return output[0] if isinstance(output, (tuple, list)) else output

    def param_name(self, module_name: str, attr: str = "weight") -> str:
        return f"{module_name}.{attr}"

    def _check_layer(self, i: int) -> int:
        n = self.num_layers
        if not (0 <= int(i) < n):
            raise IndexError(f"layer {i} out of range for a {n}-layer {self.family} model")
        return int(i)


@functools.lru_cache(maxsize=None)
def _block_kwargs(block_cls: type) -> dict:
    """Which keyword arguments a block class's forward takes (the cache's name differs across families/versions)."""
    params = inspect.signature(block_cls.forward).parameters
    cache_kw = next((k for k in ("cache", "past_key_values", "past_key_value", "layer_past") if k in params), None)
    return {"cache": cache_kw, "position_ids": "position_ids" in params,
            "position_embeddings": "position_embeddings" in params}


class PrefixKVCache:
    """Keys/values of a frozen prefix, per layer, for :meth:`ArchAdapter.run_blocks` (the ``update`` interface of
    transformers' ``Cache``). While ``recording`` an ``update`` stores what it is given (detached) and returns it;
    afterwards it returns ``cat(prefix, new)`` along the sequence and stores nothing, so the one prefix serves every
    later forward of different suffixes (a ``DynamicCache`` would append each suffix)."""

    def __init__(self):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recording = True

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.recording:
            self.layers[layer_idx] = (key_states.detach(), value_states.detach())
            return key_states, value_states
        if layer_idx not in self.layers:  # an empty prefix
            return key_states, value_states
        pk, pv = self.layers[layer_idx]
        return torch.cat([pk, key_states], dim=-2), torch.cat([pv, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        kv = self.layers.get(layer_idx) or next(iter(self.layers.values()), None)
        return 0 if kv is None else int(kv[0].shape[-2])

    @classmethod
    def concat(cls, caches: "list[PrefixKVCache]") -> "PrefixKVCache":
        """The recorded keys/values of several caches (over disjoint batch rows, the same length) in one, their
        rows in order."""
        if len(caches) == 1:
            return caches[0]
        out = cls()
        for i in caches[0].layers:
            out.layers[i] = tuple(torch.cat([c.layers[i][j] for c in caches]) for j in (0, 1))
        return out

    def gather(self, rows: torch.Tensor, positions: torch.Tensor) -> "PrefixKVCache":
        """A replaying cache whose lane ``l`` holds at slot ``t`` the recorded keys/values of batch row
        ``rows[l, t]`` at position ``positions[l, t]`` (both ``[L, K]``): several rows' prefixes in one lane."""
        out = PrefixKVCache()
        out.recording = False
        for i, (k, v) in self.layers.items():
            r, p = rows.to(k.device), positions.to(k.device)
            out.layers[i] = (k[r, :, p].transpose(1, 2).contiguous(), v[r, :, p].transpose(1, 2).contiguous())
        return out


class GPT2Adapter(ArchAdapter):
    family = "gpt2"
    block_tmp = "transformer.h.{}"
    mlp_tmp = "transformer.h.{}.mlp"
    rewrite_tmp = "transformer.h.{}.mlp.c_proj"
    mlp_in_tmp = "transformer.h.{}.mlp.c_fc"
    final_norm_name = "transformer.ln_f"
    layers_attr = "n_layer"
    conv1d = True


class GPTJAdapter(ArchAdapter):
    family = "gptj"
    block_tmp = "transformer.h.{}"
    mlp_tmp = "transformer.h.{}.mlp"
    rewrite_tmp = "transformer.h.{}.mlp.fc_out"
    mlp_in_tmp = "transformer.h.{}.mlp.fc_in"
    final_norm_name = "transformer.ln_f"
    layers_attr = "n_layer"


class GPTNeoXAdapter(ArchAdapter):
    family = "gpt_neox"
    block_tmp = "gpt_neox.layers.{}"
    mlp_tmp = "gpt_neox.layers.{}.mlp"
    rewrite_tmp = "gpt_neox.layers.{}.mlp.dense_4h_to_h"
    mlp_in_tmp = "gpt_neox.layers.{}.mlp.dense_h_to_4h"
    final_norm_name = "gpt_neox.final_layer_norm"
    layers_attr = "num_hidden_layers"


class LlamaAdapter(ArchAdapter):
    """Llama and the Llama-shaped families (Mistral, Qwen2, ...)."""

    family = "llama"
    block_tmp = "model.layers.{}"
    mlp_tmp = "model.layers.{}.mlp"
    rewrite_tmp = "model.layers.{}.mlp.down_proj"
    mlp_in_tmp = "model.layers.{}.mlp.up_proj"
    extra_mlp_in_tmps = ("model.layers.{}.mlp.gate_proj",)
    final_norm_name = "model.norm"
    layers_attr = "num_hidden_layers"


# Registry keyed on the transformers *config* ``model_type`` (a property of the config class, one
# entry per family; add a family by registering an adapter here).
_REGISTRY: dict[str, type[ArchAdapter]] = {
    "gpt2": GPT2Adapter,
    "gptj": GPTJAdapter,
    "gpt_neox": GPTNeoXAdapter,
    "llama": LlamaAdapter,
    "mistral": LlamaAdapter,
    "qwen2": LlamaAdapter,
}


def register_adapter(model_type: str) -> Callable[[type[ArchAdapter]], type[ArchAdapter]]:
    def deco(cls: type[ArchAdapter]) -> type[ArchAdapter]:
        _REGISTRY[model_type] = cls
        return cls

    return deco


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_class(config, what: str = "") -> type[ArchAdapter]:
    """The adapter class for a transformers model *config* (no weights needed), from its ``model_type``."""
    model_type = getattr(type(config), "model_type", None) or getattr(config, "model_type", None)
    cls = _REGISTRY.get(model_type)
    if cls is None:
        raise UnsupportedArchitectureError(
            f"no architecture adapter for model_type={model_type!r}{f' ({what})' if what else ''}; "
            f"supported: {', '.join(supported_model_types())}. Register one with "
            "massedit.core.adapters.register_adapter."
        )
    return cls


def config_num_layers(config) -> int:
    """The block count of a transformers model config (through its adapter's ``layers_attr``)."""
    return int(getattr(config, adapter_class(config).layers_attr))


def get_adapter(model: nn.Module) -> ArchAdapter:
    """The adapter for ``model``, chosen from its config class's ``model_type``."""
    return adapter_class(getattr(model, "config", None), type(model).__name__)(model)
