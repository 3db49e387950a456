"""Teacher-forced target scoring for CounterFact (§4.3) and zsRE (§4.5), batched and prefix-shared.

Each "branch" is one (prompt, target) pair: the prompt's token ids ``P`` (as the model sees them, BOS included),
the target tokens fed after it ``B`` and the target ids ``y`` to score (``len(B) = len(y) - 1``): token ``y_j`` is
predicted from the logits at position ``len(P) - 1 + j``. Branches with the same prompt ids form a *group*. A batch
of groups is laid out as token prefix trees (:func:`pack_prefix_tree`): every sequence ``P + B`` is a root-to-node
path, nodes get their depth as position id, and a 4-D attention mask lets each node see its ancestors only —
exactly the logits of separate sequences, with every shared prefix computed once (the prompt shared by the new and
the true target of a CounterFact prompt, and common starts across prompts). Only the distinct scored positions go
through the output head. A one-off self-check per model compares this against a plain forward; if it disagrees (a
model that ignores custom 4-D masks or position ids), scoring falls back to one padded row per branch.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from massedit.core.tokenization import encode, target_token_ids, uses_dummy_prefix

log = logging.getLogger(__name__)

KINDS = ("rewrite", "paraphrase", "neighborhood")


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
        """Groups in lexicographic order of their prompt ids: prompts sharing a prefix land in the same batch,
        where :func:`pack_prefix_tree` computes the shared prefix once. Deterministic."""
        return sorted(self.groups.values(), key=lambda g: g.prompt)


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
    """A batch ready for one forward. Scored positions are de-duplicated (``row``/``pos``, ``[U]``: the new and
    the true target of a prompt are both predicted first from the prompt's last token); each scored token
    (``[N]``) points at its position through ``sel`` and carries its expected id and branch."""

    input_ids: torch.Tensor        # [R, L]
    position_ids: torch.Tensor     # [R, L]
    attention_mask: torch.Tensor   # [R, 1, L, L] bool (packed: prefix tree) or [R, L] plain padding mask
    row: torch.Tensor              # [U] row of each distinct scored position
    pos: torch.Tensor              # [U] its index in the row
    sel: torch.Tensor              # [N] scored token -> distinct position
    target: torch.Tensor           # [N] expected token
    branch: torch.Tensor           # [N] branch index (into ``owners``) of each scored token
    owners: list[list[tuple[int, int, int, int]]]  # per branch
    packed: bool

    def to(self, device):
        for k in ("input_ids", "position_ids", "attention_mask", "row", "pos", "sel", "target", "branch"):
            setattr(self, k, getattr(self, k).to(device))
        return self

    @property
    def n_tokens(self) -> int:
        """Token slots forwarded (padding included)."""
        return int(self.input_ids.numel())


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pack_prefix_tree(groups: Sequence[Group], row_tokens: int = 128):
    """Lay out every branch sequence ``P + B`` of ``groups`` as root-to-node paths of token prefix trees, one
    tree per row of at most ``row_tokens`` nodes (longer single sequences get a row of their own).

    Sequences are visited in lexicographic order, so each one shares its longest common prefix with the previous
    sequence of the same row — across prompts too (a shared BOS and template start, "The mother tongue of ...").
    Returns per row ``(tokens, depths, parents)`` in depth-first order and, per branch (in group order),
    ``(row, node indices of its scored positions)``: the last ``len(targets)`` nodes of its path.
    """
    seqs = []
    for g in groups:
        for b in g.branches:
            seqs.append((tuple(g.prompt) + tuple(b.inputs), len(seqs), len(b.targets)))
    rows: list[tuple[list[int], list[int], list[int]]] = []
    scored: list[tuple[int, list[int]]] = [None] * len(seqs)  # type: ignore[list-item]
    prev: tuple[int, ...] = ()
    stack: list[int] = []
    for seq, bi, n_targets in sorted(seqs):
        shared = _common_prefix(prev, seq) if rows else 0
        if not rows or len(rows[-1][0]) + len(seq) - shared > row_tokens:
            rows.append(([], [], []))
            stack, shared = [], 0
        tokens, depths, parents = rows[-1]
        del stack[shared:]
        for d in range(shared, len(seq)):
            stack.append(len(tokens))
            tokens.append(seq[d])
            depths.append(d)
            parents.append(stack[d - 1] if d > 0 else -1)
        scored[bi] = (len(rows) - 1, stack[len(seq) - n_targets : len(seq)])
        prev = seq
    return rows, scored


def pack_groups(groups: Sequence[Group], pad_id: int, packed: bool = True, row_tokens: int = 128) -> PackedBatch:
    """Collate groups into one right-padded batch.

    ``packed``: prefix-tree rows (:func:`pack_prefix_tree`) with a 4-D mask letting every node attend to its
    ancestors and itself, and position ids = depth — exactly the logits of each sequence forwarded alone, with
    every shared prefix computed once. Else one padded row per branch (the plain fallback).
    """
    owners = [b.owners for g in groups for b in g.branches]
    targets = [b.targets for g in groups for b in g.branches]
    if packed:
        rows, scored = pack_prefix_tree(groups, row_tokens)
    else:
        rows, scored = [], []
        for g in groups:
            for b in g.branches:
                seq = tuple(g.prompt) + tuple(b.inputs)
                rows.append((list(seq), list(range(len(seq))), [i - 1 for i in range(len(seq))]))
                scored.append((len(rows) - 1, list(range(len(seq) - len(b.targets), len(seq)))))
    R, L = len(rows), max(len(r[0]) for r in rows)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    if packed:
        allow = np.zeros((R, L, L), dtype=bool)
        idx = np.arange(L)
        allow[:, idx, idx] = True  # every node (and padding) sees itself
    else:
        mask2d = torch.zeros((R, L), dtype=torch.long)
    for r, (tokens, depths, parents) in enumerate(rows):
        n = len(tokens)
        input_ids[r, :n] = torch.tensor(tokens)
        position_ids[r, :n] = torch.tensor(depths)
        if packed:
            a = allow[r]
            for i, p in enumerate(parents):
                if p >= 0:
                    a[i, :i] = a[p, :i]  # ancestors of the parent (depth-first order: all before i)
        else:
            mask2d[r, :n] = 1
    uniq: dict[tuple[int, int], int] = {}
    sel, tgt, br = [], [], []
    for bi, ((r, nodes), ys) in enumerate(zip(scored, targets)):
        for node, y in zip(nodes, ys):
            sel.append(uniq.setdefault((r, node), len(uniq)))
            tgt.append(y)
            br.append(bi)
    rp = torch.tensor(list(uniq), dtype=torch.long).view(-1, 2)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=torch.from_numpy(allow).unsqueeze(1) if packed else mask2d,
        row=rp[:, 0], pos=rp[:, 1], sel=torch.tensor(sel), target=torch.tensor(tgt), branch=torch.tensor(br),
        owners=owners, packed=packed,
    )


def _head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.get_output_embeddings()(hidden)


def selected_logits(model, batch: PackedBatch, head_only_selected: bool = True) -> torch.Tensor:
    """Logits ``[U, V]`` at the distinct scored positions of a packed (or plain) batch."""
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
    """Per branch: mean per-token NLL (§4.3), all-tokens-argmax-correct flag, #correct tokens and #tokens (§4.5).
    ``logits``: ``[U, V]`` at the batch's distinct scored positions."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok_nll = -logp[batch.sel, batch.target].double()
    tok_ok = (logits.argmax(-1)[batch.sel] == batch.target).double()
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
    sample = list(groups[:6])  # neighbours in lexicographic order: they share prefixes across prompts
    device = next(model.parameters()).device
    ref_b = pack_groups(sample, pad_id, packed=False).to(device)
    ref = selected_logits(model, ref_b, head_only_selected=False)[ref_b.sel]  # per scored token
    result = (False, False)
    for packed, head in ((True, True), (False, True)):
        try:
            b = pack_groups(sample, pad_id, packed=packed).to(device)
            got = selected_logits(model, b, head_only_selected=head)[b.sel]
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
