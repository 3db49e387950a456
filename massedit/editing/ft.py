"""FT / FT-L / FT-W: fine-tune chosen weights on the edit requests (REFERENCE_SPEC §3).

Plain torch: parameter selection (through the architecture adapter), the batch layout, the two losses,
the L∞ projection of FT-L, the weight-decay rules and the optimiser. The Lightning glue that runs the
loop (``Trainer.fit``) and the ``Editor`` of ``method=ft|ftl|ftw`` live in :mod:`massedit.lightning_modules.ftw`.

Decisions (see docs/readme/ftw.md):

* §3.1 loss **[QUIRK]**: ``loss: bag_last_position`` reproduces the reference (all target tokens scored
  at the last prompt position); ``loss: autoregressive`` is the proper teacher-forced loss
  (prompt + target, one token per position).
* §3.2 weight decay **[QUIRK]**: the reference's decay never ran. Here decay *is* applied, decoupled
  (AdamW) and only to the tuned weights. ``decay_to: init`` (default) shrinks the tuned weights towards
  their pre-edit values, ``W ← W − lr·wd·(W − W₀)``, i.e. it decays the *edit*; ``decay_to: zero`` is plain
  ``torch.optim.AdamW`` (decay towards 0, which also shrinks the pre-trained weights of the layer).
  ``optimizer: adam`` reproduces the reference optimiser (Adam with coupled L2). ``wd_power_law: [a, b]``
  sets ``wd = N^a·e^b`` for N edits (the reference's intended, never-executed rule).
* Parameter matching is exact (module-path prefix + "."), not the reference's substring match.
* The target mask comes from the target lengths, not from ``token != unk_token_id`` (the reference's
  mask also dropped real target tokens equal to EOS/unk on GPT-2/J; lengths are what was meant).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from massedit.core.adapters import ArchAdapter, get_adapter
from massedit.core.tokenization import encode, prepare_tokenizer, target_token_ids
from massedit.core.errors import InputError

log = logging.getLogger(__name__)

LOSSES = ("bag_last_position", "autoregressive")
PARAM_SETS = ("rewrite", "rewrite_all", "mlp", "mlp_in", "block")
IGNORE_INDEX = -100

class FTConfigError(InputError):
    pass


@dataclass
class FTConfig:
    """``method=ft|ftl|ftw`` (REFERENCE_SPEC §3): which weights to tune, the loss, the optimiser and the loop."""

    name: str = "ftw"
    layers: list[int] | None = None     # layer indices (negative = from the end); null -> [round(0.75 * num_layers)]
    params: str = "rewrite"             # rewrite (down-proj weight) | rewrite_all (+bias) | mlp | mlp_in | block
    param_names: list[str] = field(default_factory=list)  # regexes over parameter names (override layers/params)
    loss: str = "bag_last_position"     # bag_last_position (reference [QUIRK] §3.1) | autoregressive (teacher forced)
    lr: float = 5e-4
    weight_decay: float = 0.0           # decoupled (AdamW), on the tuned weights only
    wd_power_law: list[float] | None = None  # [a, b]: wd = N^a * e^b for N edits (reference: [-0.87028798, 0.15589562])
    decay_to: str = "init"              # init: W <- W - lr*wd*(W - W0) (decays the edit) | zero: plain AdamW
    optimizer: str = "adamw"            # adamw (decoupled decay) | adam (reference: Adam with coupled L2)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    epochs: int = 25                    # reference num_steps: passes over all requests
    max_steps: int = -1                 # optimiser-step cap (-1: none)
    batch_size: int = 64
    shuffle: bool = False               # the reference iterates the requests in order
    norm_constraint: float | None = None  # FT-L: clamp to [W0 - eps, W0 + eps] after every batch
    skip_loss_below: float = 1e-2       # reference: no step on a batch whose loss is below this
    stop_loss_below: float = 1e-2       # reference: stop when the epoch-mean loss is below this
    dropout: bool = False               # false: keep the model in eval mode while training (reference)
    grad_clip: float | None = None
    seed: int | None = None             # shuffle seed

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise FTConfigError(f"method.loss={self.loss!r}; choose one of {LOSSES}")
        if self.params not in PARAM_SETS:
            raise FTConfigError(f"method.params={self.params!r}; choose one of {PARAM_SETS}")
        if self.decay_to not in ("init", "zero"):
            raise FTConfigError(f"method.decay_to={self.decay_to!r}; choose init or zero")
        if self.optimizer not in ("adamw", "adam"):
            raise FTConfigError(f"method.optimizer={self.optimizer!r}; choose adamw or adam")
        if not float(self.lr) > 0 or float(self.weight_decay) < 0:
            raise FTConfigError(f"method.lr must be > 0 and method.weight_decay >= 0, got {self.lr} / {self.weight_decay}")
        if self.norm_constraint is not None and not float(self.norm_constraint) > 0:
            raise FTConfigError(f"method.norm_constraint must be a positive number or null, got {self.norm_constraint!r}")
        if int(self.batch_size) < 1 or int(self.epochs) < 1:
            raise FTConfigError("method.batch_size and method.epochs must be >= 1")
        if self.wd_power_law is not None and len(self.wd_power_law) != 2:
            raise FTConfigError(f"method.wd_power_law must be [a, b] or null, got {self.wd_power_law!r}")
        if isinstance(self.layers, int):
            self.layers = [self.layers]


# ------------------------------------------------------------------------------------------ parameters
def resolve_layers(adapter: ArchAdapter, layers) -> list[int]:
    """Layer indices to tune: ``None`` -> ``[round(0.75·L)]``; ints may be negative (from the end)."""
    n = adapter.num_layers
    if layers is None:
        return [min(n - 1, int(round(0.75 * n)))]
    if isinstance(layers, (int, str)):
        layers = [layers]
    out = []
    for x in layers:
        i = int(x)
        i = i + n if i < 0 else i
        if not 0 <= i < n:
            raise FTConfigError(f"method.layers: layer {x} out of range for a {n}-layer model")
        out.append(i)
    return sorted(set(out))


def select_ft_parameters(
    model: nn.Module, layers=None, params: str = "rewrite", param_names: Sequence[str] = ()
) -> dict[str, nn.Parameter]:
    """Parameters FT trains (REFERENCE_SPEC §3.1), by name.

    ``params``: ``rewrite`` = the MLP down-projection weight of each layer (FT / FT-L default),
    ``rewrite_all`` = its weight and bias, ``mlp`` = every MLP parameter, ``mlp_in`` = the up(/gate)
    projection(s), ``block`` = every parameter of the block (the shipped GPT-J FT-W config).
    ``param_names`` (regexes, ``re.search``) overrides the set. Matching is by exact module path, so
    layer 1 never matches layers 10-19 (the reference's substring match did).
    """
    adapter = get_adapter(model)
    all_params = dict(model.named_parameters())
    if param_names:
        pats = [re.compile(p) for p in param_names]
        chosen = {n: p for n, p in all_params.items() if any(pt.search(n) for pt in pats)}
        if not chosen:
            raise FTConfigError(f"method.param_names {list(param_names)} match no parameter of the model")
        return chosen
    idx = resolve_layers(adapter, layers)
    prefixes: list[str] = []
    weight_only = params == "rewrite"
    for i in idx:
        if params in ("rewrite", "rewrite_all"):
            prefixes.append(adapter.rewrite_name(i))
        elif params == "mlp":
            prefixes.append(adapter.mlp_name(i))
        elif params == "mlp_in":
            prefixes.extend(adapter.mlp_in_names(i))
        elif params == "block":
            prefixes.append(adapter.block_name(i))
    chosen = {}
    for name, p in all_params.items():
        for pre in prefixes:
            if name.startswith(pre + "."):
                if weight_only and name != pre + ".weight":
                    continue
                chosen[name] = p
    if not chosen:
        raise FTConfigError(f"no parameters selected for layers {idx} / params={params!r}")
    return chosen


# ------------------------------------------------------------------------------------------ batches
def _check_request(r, i: int) -> None:
    from massedit.data.requests import RequestValidationError

    for fld in ("prompt", "subject", "target_new"):
        v = getattr(r, fld, None)
        if not isinstance(v, str) or not v.strip():
            raise RequestValidationError("missing or empty", index=i, case_id=getattr(r, "case_id", None), field=fld)
    if r.prompt.count("{}") != 1:
        raise RequestValidationError("template must contain exactly one '{}'", index=i, case_id=r.case_id, field="prompt")


def make_ft_batch(tok, requests: Sequence, loss: str = "bag_last_position") -> dict[str, torch.Tensor]:
    """Tokenise requests for FT training (right padding, pad = eos; REFERENCE_SPEC §3.1, §6.3).

    ``bag_last_position``: ``input_ids``/``attention_mask`` of the filled prompts only (with the
    tokenizer's special tokens, e.g. BOS), plus ``target_ids``/``target_mask`` of the targets
    (leading-space convention, no special tokens), right-padded.
    ``autoregressive``: ``input_ids`` = prompt ids + target ids, ``labels`` = target ids at their own
    positions and ``-100`` elsewhere.
    """
    if loss not in LOSSES:
        raise FTConfigError(f"loss {loss!r}; choose one of {LOSSES}")
    prepare_tokenizer(tok)
    pad = tok.pad_token_id
    prompts, targets = [], []
    for i, r in enumerate(requests):
        _check_request(r, i)
        prompts.append(encode(tok, r.filled_prompt))
        targets.append(target_token_ids(tok, r.target_new))
    if loss == "bag_last_position":
        P, T = max(map(len, prompts)), max(map(len, targets))
        ids = torch.full((len(prompts), P), pad, dtype=torch.long)
        am = torch.zeros((len(prompts), P), dtype=torch.long)
        tids = torch.full((len(prompts), T), pad, dtype=torch.long)
        tmask = torch.zeros((len(prompts), T), dtype=torch.float32)
        for b, (p, t) in enumerate(zip(prompts, targets)):
            ids[b, : len(p)] = torch.tensor(p)
            am[b, : len(p)] = 1
            tids[b, : len(t)] = torch.tensor(t)
            tmask[b, : len(t)] = 1
        return {"input_ids": ids, "attention_mask": am, "target_ids": tids, "target_mask": tmask}
    seqs = [p + t for p, t in zip(prompts, targets)]
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    am = torch.zeros((len(seqs), L), dtype=torch.long)
    labels = torch.full((len(seqs), L), IGNORE_INDEX, dtype=torch.long)
    for b, (p, t) in enumerate(zip(prompts, targets)):
        s = p + t
        ids[b, : len(s)] = torch.tensor(s)
        am[b, : len(s)] = 1
        labels[b, len(p) : len(s)] = torch.tensor(t)
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


# ------------------------------------------------------------------------------------------ losses
def bag_of_tokens_last_position_nll(
    logits: torch.Tensor, attention_mask: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """Reference FT loss (REFERENCE_SPEC §3.1, [QUIRK]).

    With ``ℓ_b`` the last real prompt position of row b and ``p_b = softmax(logits[b, ℓ_b])``:
    ``loss = mean_b [ −(1/|t_b|) Σ_j log p_b(t_{b,j}) ]`` — every target token is scored at the *same*
    position (a bag of tokens), not autoregressively.
    """
    last = attention_mask.sum(1) - 1
    rows = torch.arange(logits.shape[0], device=logits.device)
    logp = torch.log_softmax(logits[rows, last].float(), dim=-1)
    tok_lp = torch.gather(logp, 1, target_ids.to(logits.device))
    mask = target_mask.to(logp)
    per_row = -(tok_lp * mask).sum(1) / mask.sum(1).clamp_min(1)
    return per_row.mean()


def autoregressive_target_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Teacher-forced target NLL: ``mean_b [ −(1/T_b) Σ_j log p(t_{b,j} | prompt_b, t_{b,<j}) ]``.

    ``labels`` holds the target token at its own position and ``-100`` elsewhere; the prediction
    for position ``i`` is read from ``logits[i − 1]``. Per-row token mean (as the CounterFact score
    §4.3), then mean over rows.
    """
    lg = logits[:, :-1].float()
    lb = labels[:, 1:].to(logits.device)
    mask = lb != IGNORE_INDEX
    logp = torch.log_softmax(lg, dim=-1)
    tok_lp = torch.gather(logp, 2, lb.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    m = mask.to(tok_lp)
    per_row = -(tok_lp * m).sum(1) / m.sum(1).clamp_min(1)
    return per_row.mean()


def ft_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], loss: str = "bag_last_position") -> torch.Tensor:
    """Forward ``model`` on an :func:`make_ft_batch` batch and return the chosen loss."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if loss == "bag_last_position":
        return bag_of_tokens_last_position_nll(logits, batch["attention_mask"], batch["target_ids"], batch["target_mask"])
    return autoregressive_target_nll(logits, batch["labels"])


# ------------------------------------------------------------------------------------------ constraints / decay
@torch.no_grad()
def project_to_linf_ball_(params: Mapping[str, torch.Tensor], originals: Mapping[str, torch.Tensor], eps: float) -> None:
    """FT-L (REFERENCE_SPEC §3.1): clamp each tuned tensor elementwise to ``[W₀ − ε, W₀ + ε]`` in place."""
    for name, p in params.items():
        w0 = originals[name].to(p)
        p.copy_(torch.clamp(p, min=w0 - eps, max=w0 + eps))


def power_law_weight_decay(num_edits: int, a: float = -0.87028798, b: float = 0.15589562) -> float:
    """Intended FT-W decay rule ``wd(N) = N^a · e^b`` (REFERENCE_SPEC §3.2; ≈3.9e-4 at N = 10,000)."""
    if num_edits < 1:
        raise ValueError("num_edits must be >= 1")
    return float(num_edits) ** a * math.exp(b)


def effective_weight_decay(cfg: FTConfig, num_edits: int) -> float:
    """``weight_decay``, or the power law of ``wd_power_law: [a, b]`` when given (§3.2)."""
    if cfg.wd_power_law:
        a, b = (float(x) for x in cfg.wd_power_law)
        return power_law_weight_decay(num_edits, a, b)
    return float(cfg.weight_decay)


class AnchoredAdamW(torch.optim.AdamW):
    """AdamW whose decoupled weight decay pulls each parameter towards an anchor (its pre-edit value).

    One step on a parameter with a gradient: ``W ← W − lr·wd·(W − W₀)``, then the Adam update (exactly
    ``torch.optim.AdamW`` with the decay term ``W`` replaced by ``W − W₀``). ``anchors=None`` is plain
    AdamW (decay towards zero). Parameters without a gradient (skipped batches) are not decayed,
    as in AdamW.
    """

    def __init__(self, params, anchors: Sequence[torch.Tensor] | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        params = list(params)
        self._anchor_wd = float(weight_decay) if anchors is not None else 0.0
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps,
                         weight_decay=0.0 if anchors is not None else float(weight_decay))
        self._anchors = None
        if anchors is not None:
            anchors = list(anchors)
            if len(anchors) != len(params):
                raise ValueError("one anchor per parameter")
            self._anchors = {id(p): a.detach() for p, a in zip(params, anchors)}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._anchors is not None and self._anchor_wd:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    a = self._anchors[id(p)]
                    p.sub_((p - a.to(p)) * (group["lr"] * self._anchor_wd))
        super().step()
        return loss


def make_optimizer(params: Mapping[str, nn.Parameter], originals: Mapping[str, torch.Tensor] | None,
                   cfg: FTConfig, weight_decay: float) -> torch.optim.Optimizer:
    """Optimiser over the tuned parameters only (REFERENCE_SPEC §3.1/§3.2 decisions, module docstring)."""
    plist = list(params.values())
    betas = tuple(float(b) for b in cfg.betas)
    eps, lr = float(cfg.eps), float(cfg.lr)
    if cfg.optimizer == "adam":  # reference: coupled L2 towards zero
        return torch.optim.Adam(plist, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    anchors = [originals[n] for n in params] if cfg.decay_to == "init" else None
    return AnchoredAdamW(plist, anchors=anchors, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
