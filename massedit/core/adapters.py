"""Architecture adapters: the only place where model families differ.

Every editor, statistic and metric asks an :class:`ArchAdapter` where things live (rewrite module of
layer ``i``, block output, final norm, unembedding, ...). Adapters are chosen from the model's
*config class* through a registry (:func:`get_adapter`), never from string tests on model names.

Orientation convention: editing math is written for a map ``value = W @ key`` with ``W`` of shape
``[d, m]`` (out x in, the ``nn.Linear`` layout). GPT-2's ``Conv1D`` stores ``[in, out] = [m, d]``;
:meth:`ArchAdapter.to_param_layout` / :meth:`ArchAdapter.from_param_layout` convert.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn
from massedit.core.errors import InputError


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

    def rewrite_weight(self, i: int) -> nn.Parameter:
        return self.rewrite_module(i).weight

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
