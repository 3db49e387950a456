"""Teacher-forced target scoring for CounterFact (§4.3) and zsRE (§4.5), batched and prefix-shared.

Each "branch" is one (prompt, target) pair: the prompt's token ids ``P`` (as the model sees them, BOS included),
the target tokens fed after it ``B`` and the target ids ``y`` to score (``len(B) = len(y) - 1``): token ``y_j`` is
predicted from the logits at position ``len(P) - 1 + j``. Branches with the same prompt ids form a *group*; a
group is packed into ONE sequence ``P + B_1 + B_2 + ...`` whose branch tokens get the position ids
``len(P), len(P)+1, ...`` and a 4-D attention mask letting each branch see the prompt and itself only — exactly
the logits of separate sequences ``P + B_i``, with the prompt computed once (the new and the true target of a
CounterFact prompt share it). Only the positions that predict a target go through the output head.
A one-off self-check per model compares this against a plain forward; if it disagrees (a model that ignores
custom 4-D masks or position ids), scoring falls back to one padded row per branch.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch

from massedit.core.tokenization import encode, target_token_ids, uses_dummy_prefix

log = logging.getLogger(__name__)

KINDS = ("rewrite", "paraphrase", "neighborhood")
WHICH = ("new", "true")


@dataclass
class Branch:
    """One scored continuation. ``owners``: ``(case_idx, kind, prompt_idx, which)`` keys that need its scores."""

    inputs: tuple[int, ...]
    targets: tuple[int, ...]
    owners: list[tuple[int, int, int, int]] = field(default_factory=list)


@dataclass
class Group:
    prompt: tuple[int, ...]
    branches: list[Branch] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prompt) + sum(len(b.inputs) for b in self.branches)


class GroupBuilder:
    """Collects branches, merging identical prompts (groups) and identical continuations (branches)."""

    def __init__(self):
        self.groups: dict[tuple[int, ...], Group] = {}
        self._branch_index: dict[tuple, Branch] = {}

    def add(self, prompt: Sequence[int], inputs: Sequence[int], targets: Sequence[int], owner: tuple[int, int, int, int]):
        prompt, inputs, targets = tuple(prompt), tuple(inputs), tuple(targets)
        if not prompt:
            raise ValueError("empty prompt")
        if not targets or len(inputs) != len(targets) - 1:
            raise ValueError("a branch needs len(inputs) == len(targets) - 1 >= 0")
        key = (prompt, inputs, targets)
        br = self._branch_index.get(key)
        if br is None:
            br = Branch(inputs, targets)
            self._branch_index[key] = br
            self.groups.setdefault(prompt, Group(prompt)).branches.append(br)
        br.owners.append(owner)

    def build(self) -> list[Group]:
        """Groups sorted by packed length (little padding per batch), deterministic order."""
        return sorted(self.groups.values(), key=lambda g: (g.length, g.prompt))


# ------------------------------------------------------------------------------------------ branch builders
def counterfact_branch(tok, prompt: str, target: str, mode: str = "string") -> tuple[list[int], list[int], list[int]]:
    """``(P, B, y)`` for the CounterFact probability test of ``target`` after ``prompt`` (§4.3, §6.3).

    ``mode="string"`` (reference): the model input is ``f"{prompt} {target}"`` tokenised as one string; ``ℓ_x`` =
    length of ``prompt`` tokenised alone (special tokens counted once), ``y`` = ids of ``" " + target``
    (``target_token_ids``: no BOS, SentencePiece dummy prefix handled); the scored logits are at
    ``ℓ_x - 1 + j`` of the joint tokenisation. ``mode="tokens"``: input = ``tok(prompt) + y`` (token concatenation).
    """
    y = target_token_ids(tok, target)
    p_ids = encode(tok, prompt)
    if mode == "tokens":
        return p_ids, y[:-1], y
    if mode != "string":
        raise ValueError(f"unknown teacher_forcing mode {mode!r}; choose string or tokens")
    joint = encode(tok, f"{prompt} {target.lstrip(' ')}")
    ell = len(p_ids)
    t = len(y)
    if len(joint) < ell + t - 1:  # tokenisation merged across the boundary into fewer tokens: feed y instead
        return p_ids, y[:-1], y
    # the reference feeds the joint ids; the prompt part may differ from p_ids when tokens merge at the boundary
    return joint[:ell], joint[ell : ell + t - 1], y


def zsre_branch(tok, prompt: str, target: str) -> tuple[list[int], list[int], list[int]]:
    """``(P, B, y_expected)`` for zsRE token accuracy (§4.5): target ids ``y = tok(" " + target)``; position i is fed
    ``prompt + y[:i]`` and must predict ``y[i]``.

    Expected token: the reference's "first id of ``tok(decode(y[i]))``" (for multi-byte pieces) on byte-level
    tokenizers; the id ``y[i]`` itself on SentencePiece tokenizers, where decoding one piece drops its ``▁`` and
    re-encoding would add a dummy prefix (and BOS). Inputs are concatenated as tokens (``tok(prompt) + y[:i]``),
    which equals the reference's string concatenation whenever the tokenizer splits at the space before the
    target (byte-level BPE always does).
    """
    y = target_token_ids(tok, target)
    if uses_dummy_prefix(tok):
        expected = list(y)
    else:
        expected = []
        for t in y:
            ids = tok(tok.decode([t]), add_special_tokens=False)["input_ids"]
            expected.append(ids[0] if ids else t)
    return encode(tok, prompt), y[:-1], expected


# ------------------------------------------------------------------------------------------ packing
@dataclass
class PackedBatch:
    input_ids: torch.Tensor        # [R, L]
    position_ids: torch.Tensor     # [R, L]
    attention_mask: torch.Tensor   # [R, 1, L, L] additive (0 / min) or [R, L] plain mask when unpacked
    row: torch.Tensor              # [N] row of each scored position
    pos: torch.Tensor              # [N] its index in the row
    target: torch.Tensor           # [N] expected token
    branch: torch.Tensor           # [N] branch index (into ``owners``) of each scored position
    owners: list[list[tuple[int, int, int, int]]]  # per branch
    packed: bool

    def to(self, device):
        for k in ("input_ids", "position_ids", "attention_mask", "row", "pos", "target", "branch"):
            setattr(self, k, getattr(self, k).to(device))
        return self


def pack_groups(groups: Sequence[Group], pad_id: int, packed: bool = True) -> PackedBatch:
    """Collate groups into one right-padded batch (packed: one row per group; else one row per branch)."""
    rows: list[list[int]] = []
    positions: list[list[int]] = []
    segs: list[list[tuple[int, int]]] = []  # per row: (start, end) of each branch segment
    row_idx, pos_idx, tgt, br_idx, owners = [], [], [], [], []
    for g in groups:
        units = [g.branches] if packed else [[b] for b in g.branches]
        for branches in units:
            r = len(rows)
            ids = list(g.prompt)
            pids = list(range(len(g.prompt)))
            seg = []
            lp = len(g.prompt)
            for b in branches:
                start = len(ids)
                ids.extend(b.inputs)
                pids.extend(range(lp, lp + len(b.inputs)))
                seg.append((start, len(ids)))
                bi = len(owners)
                owners.append(b.owners)
                for j, t in enumerate(b.targets):
                    row_idx.append(r)
                    pos_idx.append(lp - 1 if j == 0 else start + j - 1)
                    tgt.append(t)
                    br_idx.append(bi)
            rows.append(ids)
            positions.append(pids)
            segs.append(seg)
    L = max(len(r) for r in rows)
    R = len(rows)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    if packed:
        allow = torch.zeros((R, L, L), dtype=torch.bool)
    else:
        mask2d = torch.zeros((R, L), dtype=torch.long)
    for r, (ids, pids) in enumerate(zip(rows, positions)):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids)
        position_ids[r, :n] = torch.tensor(pids)
        position_ids[r, n:] = torch.arange(pids[-1] + 1, pids[-1] + 1 + L - n) if L > n else position_ids[r, n:]
        if packed:
            lp = n - sum(e - s for s, e in segs[r])
            causal = torch.ones((L, L), dtype=torch.bool).tril()
            allow[r, :lp, :lp] = causal[:lp, :lp]
            for s, e in segs[r]:
                allow[r, s:e, :lp] = True
                allow[r, s:e, s:e] = causal[: e - s, : e - s]
            idx = torch.arange(n, L)
            allow[r, idx, idx] = True  # padding attends to itself only (never attended to)
        else:
            mask2d[r, :n] = 1
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=allow.unsqueeze(1) if packed else mask2d,
        row=torch.tensor(row_idx),
        pos=torch.tensor(pos_idx),
        target=torch.tensor(tgt),
        branch=torch.tensor(br_idx),
        owners=owners,
        packed=packed,
    )


def _head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.get_output_embeddings()(hidden)


def selected_logits(model, batch: PackedBatch, head_only_selected: bool = True) -> torch.Tensor:
    """Logits [N, V] at the scored positions of a packed (or plain) batch."""
    mask = batch.attention_mask
    if batch.packed:
        dtype = next(model.parameters()).dtype
        add = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        add.masked_fill_(~mask, torch.finfo(dtype).min)
        mask = add
    kw = dict(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids)
    if head_only_selected:
        hidden = model.base_model(**kw, use_cache=False)[0]
        return _head_logits(model, hidden[batch.row, batch.pos])
    logits = model(**kw, use_cache=False).logits
    return logits[batch.row, batch.pos]


def branch_scores(logits: torch.Tensor, batch: PackedBatch) -> dict[str, torch.Tensor]:
    """Per branch: mean per-token NLL (§4.3), all-tokens-argmax-correct flag, #correct tokens and #tokens (§4.5)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok_nll = -logp.gather(1, batch.target.view(-1, 1)).squeeze(1).double()
    tok_ok = (logits.argmax(-1) == batch.target).double()
    nb = len(batch.owners)
    n_tok = torch.zeros(nb, dtype=torch.float64, device=logits.device).index_add_(0, batch.branch, torch.ones_like(tok_nll))
    nll_sum = torch.zeros_like(n_tok).index_add_(0, batch.branch, tok_nll)
    ok_sum = torch.zeros_like(n_tok).index_add_(0, batch.branch, tok_ok)
    return {"nll": nll_sum / n_tok, "all_correct": (ok_sum == n_tok).double(), "n_correct": ok_sum, "n_tok": n_tok}


_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (packed, head_only_selected)


@torch.no_grad()
def choose_scoring_mode(model, groups: Sequence[Group], pad_id: int, atol: float = 1e-3) -> tuple[bool, bool]:
    """Self-check ``(packed, head_only_selected)`` on a few real groups against a plain full forward per branch."""
    key = model
    if key in _CHECKED:
        return _CHECKED[key]
    sample = [g for g in groups if len(g.branches) > 1][:2] or list(groups[:2])
    device = next(model.parameters()).device
    ref_b = pack_groups(sample, pad_id, packed=False).to(device)
    ref = selected_logits(model, ref_b, head_only_selected=False)
    ref_map = {}
    for i, b in enumerate(ref_b.branch.tolist()):
        ref_map.setdefault(b, []).append(ref[i])
    result = (False, False)
    for packed, head in ((True, True), (False, True)):
        try:
            b = pack_groups(sample, pad_id, packed=packed).to(device)
            got = selected_logits(model, b, head_only_selected=head)
        except Exception as e:  # a model without position_ids / 4-D mask support
            log.info("scoring mode packed=%s head_only=%s unavailable: %s", packed, head, e)
            continue
        ok = got.shape == ref.shape and torch.allclose(got.float(), ref.float(), atol=atol, rtol=1e-3)
        if ok:
            result = (packed, head)
            break
        log.info("scoring mode packed=%s head_only=%s disagrees with a plain forward (max diff %.3g)",
                 packed, head, (got.float() - ref.float()).abs().max().item() if got.shape == ref.shape else float("inf"))
    if result != (True, True):
        log.warning("evaluation: prefix-shared scoring unavailable for this model; using packed=%s head_only=%s", *result)
    _CHECKED[key] = result
    return result
