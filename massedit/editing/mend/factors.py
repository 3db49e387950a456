"""Gradient factors, edit batches, losses and the functionally edited model for MEND.

* :func:`inner_params` picks the edited weights through the architecture adapter (REFERENCE_SPEC §5.1).
* :func:`capture_factors` records, for every inner weight, the module input ``x`` and the gradient of
  the loss w.r.t. the module output ``δ`` per token (§5.2) with forward hooks: each hooked output gets a
  zero tensor added whose gradient *is* ``δ``, so the model's own parameters never need gradients.
* :func:`edited_forward` runs the model as if ``W + ΔW`` were its weights by adding ``x ΔWᵀ`` to each
  edited module's output (exact for linear layers, differentiable w.r.t. ``ΔW``; works for
  ``nn.Linear`` and GPT-2 ``Conv1D`` alike and leaves the weights untouched).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from massedit.core.adapters import ArchAdapter, get_adapter
from massedit.core.tokenization import prepare_tokenizer, target_token_ids

from .network import InnerParam

PROJECTIONS = ("up", "down", "gate", "mlp_in_all")


# ----------------------------------------------------------------------------------- inner params
def default_layers(adapter: ArchAdapter, num_layers: int = 3) -> list[int]:
    """The last ``num_layers`` layers (the paper's choice: last 3 MLP layers, §5.1)."""
    n = adapter.num_layers
    return list(range(max(0, n - num_layers), n))


def inner_module_names(adapter: ArchAdapter, layers: Sequence[int], projections: Sequence[str]) -> list[str]:
    """Module names of the edited projections: ``up`` = first MLP input projection, ``down`` = the
    rewrite module, ``gate`` = the remaining MLP input projections (Llama ``gate_proj``),
    ``mlp_in_all`` = every MLP input projection."""
    names: list[str] = []
    for i in layers:
        ins = adapter.mlp_in_names(i)
        for proj in projections:
            if proj == "up":
                names.append(ins[0])
            elif proj == "down":
                names.append(adapter.rewrite_name(i))
            elif proj == "gate":
                if len(ins) < 2:
                    raise ValueError(f"the {adapter.family} adapter lists no gate projection for layer {i}")
                names.extend(ins[1:])
            elif proj == "mlp_in_all":
                names.extend(ins)
            else:
                raise ValueError(f"unknown MEND projection {proj!r}; choose from {PROJECTIONS}")
    return list(dict.fromkeys(names))


def inner_params(model: nn.Module, layers: Sequence[int] | None = None, projections: Sequence[str] = ("up", "down"),
                 num_layers: int = 3) -> list[InnerParam]:
    """Inner parameters (weights only, never biases) for ``model`` via its adapter."""
    a = get_adapter(model)
    layers = list(layers) if layers is not None else default_layers(a, num_layers)
    out = []
    for name in inner_module_names(a, layers, projections):
        w = a.module(name).weight
        if w.dim() != 2:
            raise ValueError(f"MEND edits 2-D weights; {name}.weight has shape {tuple(w.shape)}")
        in_dim, out_dim = (w.shape[0], w.shape[1]) if a.conv1d else (w.shape[1], w.shape[0])
        out.append(InnerParam(param=f"{name}.weight", module=name, in_dim=int(in_dim), out_dim=int(out_dim),
                              conv1d=bool(a.conv1d)))
    return out


# ----------------------------------------------------------------------------------- batches
@dataclass
class EditBatch:
    """Right-padded token batch; ``labels`` is -100 outside the supervised tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> "EditBatch":
        return EditBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def prompt_target_ids(tok, prompt: str, target: str, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Ids of ``prompt`` as the model sees it (with the tokenizer's special prefix) and of the target
    continuation (leading-space convention, REFERENCE_SPEC §6.3)."""
    p = tok(prompt)["input_ids"]
    t = target_token_ids(tok, target)
    if max_length is not None and len(p) + len(t) > max_length:
        p = p[: max(1, max_length - len(t))]
    return p, t


def build_edit_batch(tok, prompts: Sequence[str], targets: Sequence[str], max_length: int | None = None) -> EditBatch:
    """``prompt + target`` sequences with labels on the target tokens only (§5.7 edit input)."""
    prepare_tokenizer(tok)
    ids, labels = [], []
    for prompt, target in zip(prompts, targets):
        p, t = prompt_target_ids(tok, prompt, target, max_length)
        ids.append(p + t)
        labels.append([-100] * len(p) + t)
    input_ids = _pad(ids, tok.pad_token_id)
    mask = _pad([[1] * len(r) for r in ids], 0)
    return EditBatch(input_ids, mask, _pad(labels, -100))


def build_text_batch(tok, texts: Sequence[str], max_length: int | None = None) -> EditBatch:
    """Plain texts (locality inputs): every real token after the first is a label."""
    prepare_tokenizer(tok)
    ids = [tok(t)["input_ids"][: max_length or None] for t in texts]
    input_ids = _pad(ids, tok.pad_token_id)
    mask = _pad([[1] * len(r) for r in ids], 0)
    labels = input_ids.masked_fill(mask == 0, -100)
    return EditBatch(input_ids, mask, labels)


# ----------------------------------------------------------------------------------- losses
def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL ``[B, T-1]`` (fp32) of next-token prediction and its mask (labels != -100)."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return nll * mask, mask


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over all labelled tokens of the batch (REFERENCE_SPEC §5.4 step 2/3)."""
    nll, mask = token_nll(logits, labels)
    return nll.sum() / mask.sum().clamp_min(1)


def group_mean_nll(logits: torch.Tensor, labels: torch.Tensor, row_group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``[n_groups]`` mean NLL over the labelled tokens of each group's sequences."""
    nll, mask = token_nll(logits, labels)
    g = row_group.to(nll.device)
    num = torch.zeros(n_groups, device=nll.device, dtype=nll.dtype).index_add(0, g, nll.sum(-1))
    den = torch.zeros(n_groups, device=nll.device, dtype=nll.dtype).index_add(0, g, mask.sum(-1).to(nll.dtype))
    return num / den.clamp_min(1)


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean argmax accuracy over labelled tokens, per-row exact-match of all labelled tokens)."""
    pred = logits[:, :-1].argmax(-1)
    targets = labels[:, 1:]
    mask = targets != -100
    correct = (pred == targets) & mask
    acc = correct.sum().float() / mask.sum().clamp_min(1)
    exact = (correct | ~mask).all(-1).float()
    return acc, exact


def kl_loc_loss(base_logits: torch.Tensor, edited_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-masked mean of ``KL(p_base ‖ p_edited)`` over the vocabulary, fp32 (REFERENCE_SPEC §5.4 step 4)."""
    base = torch.log_softmax(base_logits.float(), -1)
    post = torch.log_softmax(edited_logits.float(), -1)
    kl = (base.exp() * (base - post)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


# ----------------------------------------------------------------------------------- factors
def _first_arg(args, kwargs):
    if args:
        return args[0]
    return next(iter(kwargs.values()))


@contextlib.contextmanager
def factor_hooks(model: nn.Module, modules: Sequence[str]) -> Iterator[dict]:
    """Hooks that keep each module's input ``x`` (detached) and add a zero leaf ``z`` to its output, so
    that ``∂loss/∂z`` is the output gradient ``δ``. Yields ``{module: {"x": ..., "z": ...}}``."""
    store: dict[str, dict] = {}
    handles = []
    for name in modules:
        def hook(mod, args, kwargs, output, name=name):
            x = _first_arg(args, kwargs)
            z = torch.zeros_like(output, requires_grad=True)
            store[name] = {"x": x.detach(), "z": z}
            return output + z
        handles.append(model.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def flatten_factor_rows(x: torch.Tensor, delta: torch.Tensor, row_mask: torch.Tensor | None = None,
                        row_group: torch.Tensor | None = None):
    """Rows ``[B·T, ·]`` in fp32, dropping rows whose ``x`` or ``δ`` is all zero (§5.2) and rows outside
    ``row_mask`` (padding). With ``row_group [B]`` (group id of each sequence) also returns each kept
    row's group id."""
    B, T = x.shape[0], x.shape[1]
    x = x.reshape(-1, x.shape[-1]).float()
    d = delta.reshape(-1, delta.shape[-1]).float()
    keep = (x != 0).any(-1) & (d != 0).any(-1)
    if row_mask is not None:
        keep &= row_mask.reshape(-1).to(keep.device).bool()
    if row_group is None:
        return x[keep], d[keep]
    g = row_group.to(keep.device).view(B, 1).expand(B, T).reshape(-1)
    return x[keep], d[keep], g[keep]


def capture_factors(model: nn.Module, inner: Sequence[InnerParam], loss_fn: Callable[[], torch.Tensor],
                    row_mask: torch.Tensor | None = None, row_group: torch.Tensor | None = None):
    """Run ``loss_fn()`` (a forward pass of ``model`` returning a scalar) and return
    ``(loss, {param -> (x rows, δ rows)})`` with detached fp32 factors (first-order, §5.4 step 2);
    with ``row_group`` each value also carries the rows' group ids (independent edit problems in one
    batch: sequences do not interact, so a summed loss gives each group its own factors).

    ``Σ_rows δ xᵀ`` equals the gradient of the loss w.r.t. the weight (``[out, in]``).
    """
    by_module = {p.module: p for p in inner}
    with torch.enable_grad(), factor_hooks(model, list(by_module)) as store:
        loss = loss_fn()
        missing = [m for m in by_module if m not in store]
        if missing:
            raise RuntimeError(f"MEND: the forward pass never ran the inner modules {missing}")
        names = list(store)
        grads = torch.autograd.grad(loss, [store[m]["z"] for m in names], allow_unused=True)
    out = {}
    for m, g in zip(names, grads):
        x = store[m]["x"]
        g = torch.zeros_like(store[m]["z"]) if g is None else g
        out[by_module[m].param] = flatten_factor_rows(x, g.detach(), row_mask, row_group)
    return loss.detach(), out


@contextlib.contextmanager
def edited_forward(model: nn.Module, inner: Sequence[InnerParam], updates: dict[str, torch.Tensor],
                   row_group: torch.Tensor | None = None) -> Iterator[nn.Module]:
    """Within the context ``model`` behaves as if ``W + ΔW`` were its weights (``ΔW [out, in]``),
    differentiably in ``ΔW``: each edited module's output gets ``x ΔWᵀ`` added. A ``[G, out, in]``
    update applies ``ΔW[row_group[b]]`` to sequence ``b`` (independent edits in one batch)."""
    handles = []
    for p in inner:
        if p.param not in updates:
            continue
        dw = updates[p.param]
        if dw.dim() == 3 and row_group is None:
            raise ValueError("per-group updates need row_group")

        def hook(mod, args, kwargs, output, dw=dw):
            x = _first_arg(args, kwargs).to(dw.dtype)
            if dw.dim() == 3:
                add = torch.einsum("bti,boi->bto", x, dw[row_group.to(dw.device)])
            else:
                add = x @ dw.T
            return output + add.to(output.dtype)

        handles.append(model.get_submodule(p.module).register_forward_hook(hook, with_kwargs=True))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
