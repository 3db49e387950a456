"""Target-vector optimisation: ROME's v* (REFERENCE_SPEC §1.2) and MEMIT's z (§2.2), batched.

For each request a vector δ (width d) is added at the subject's last token of every row (the
rewriting rows ``template.format(prompt) + target[:-1]`` and the KL row ``"{subject} is a"``) to the
output of one module (ROME: the MLP of layer l; MEMIT: the block L). δ minimises

    loss = NLL(target | rewriting rows) + kl_factor * KL(p_cur || p_init)[KL row, subject token]
           + v_weight_decay * ||δ|| / ||v0||^2

with Adam (lr ``v_lr``); the loop checks ``loss < early_stop_loss`` before each step and never steps
after the last forward (so at most ``v_num_grad_steps - 1`` steps); after every step δ is clamped to
``clamp_norm_factor * ||v0||``. v0 is the module output at the subject token of row 0 (the bare
template) at δ = 0. Result: the target ``v0 + δ``.

**Batching.** :func:`optimise_targets` puts the rows of many requests into one right-padded batch:
one forward/backward per step for the whole sub-batch, each request with its own δ and its own Adam
state, early stop and clamp (finished requests leave the batch). Rows of different requests do not
interact, so the result equals one-at-a-time optimisation up to float rounding. Sub-batches are
bounded by ``hp.targets_step_tokens`` suffix tokens (suffix mode) or ``hp.targets_max_tokens`` padded whole-row
tokens (full mode). Logits are formed only at the positions the loss reads
(final norm + unembedding of the gathered hidden states), which is the same arithmetic per position.

**What runs per step** (``hp.targets_forward``). ``"suffix"`` (default, :class:`_SuffixForward`): the blocks up
to the edit point and, above it, every position before the subject token are independent of δ (causal attention),
so they run once at δ = 0 and their keys/values are cached; each step runs only the positions from the subject
token on through the blocks above the edit point (a KL row: the subject token alone), the short suffixes of several
rows packed side by side into one lane (``hp.targets_pack_rows``) so hardly any padding is computed. ``"full"`` (:class:`_FullForward`): whole rows every step, as the
reference; with ``hp.reuse_frozen_prefix`` from the block above ``prefix_block`` on. The equations are the same;
the results agree up to float rounding (exactly in float64). ``hp.targets_autocast`` runs the frozen model's
forwards under CUDA autocast; δ, logits and the loss stay float32.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from massedit.core.adapters import ArchAdapter, PrefixKVCache
from massedit.core.nethook import TraceDict
from massedit.core.tokenization import (encode, subject_token_index, target_token_ids, token_type_ids_like,
                                        with_leading_space)
from massedit.editing.prefix_forest import build_forest, forest_forward

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- problem
@dataclass
class TargetProblem:
    """Tokenised optimisation inputs of one request."""

    case_id: object
    prompts: list[str]            # rewriting prompts + the KL prompt (text, subject filled in)
    input_ids: list[list[int]]    # unpadded ids per row
    lookup_idxs: list[int]        # subject token per row
    target_ids: list[int]
    n_rewrite: int

    @property
    def n_rows(self) -> int:
        return len(self.input_ids)

    @property
    def max_len(self) -> int:
        return max(len(x) for x in self.input_ids)


@dataclass
class TargetResult:
    """Outcome of one request's optimisation (the fixture's intermediates use the same names)."""

    case_id: object
    init: torch.Tensor            # v0 / z0 [d]
    delta: torch.Tensor           # δ [d]
    n_adam_steps: int
    early_stopped: bool
    loss_trace: torch.Tensor      # [n_forward, 7]: it, loss, nll, kl, wd, |δ|, mean target prob
    from_cache: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def target(self) -> torch.Tensor:
        return self.init + self.delta

    @property
    def n_forward(self) -> int:
        return int(self.loss_trace.shape[0])

    @property
    def final_loss(self) -> float:
        return float(self.loss_trace[-1, 1]) if self.loss_trace.numel() else float("nan")


class TargetInputError(ValueError):
    pass


def build_target_problem(tok, request, templates: Sequence[str], fact_token: str = "subject_last",
                         teacher_forcing: str = "ids", kl_prompt: str = "{} is a") -> TargetProblem:
    """Rows, subject indices and target ids of one request (REFERENCE_SPEC §1.2 "Inputs built once").

    ``teacher_forcing="string"`` reproduces the reference exactly (prompt text + ``decode(y[:-1])``,
    re-tokenised; wrong for SentencePiece, whose decode drops the leading space); ``"ids"`` appends the
    target ids to the prompt's ids (identical for byte-level BPE when tokenisation does not merge
    across the boundary, correct for every tokenizer).
    """
    where = f"request case_id={request.case_id}"
    try:
        y = target_token_ids(tok, with_leading_space(request.target_new))
    except ValueError:
        raise TargetInputError(f"{where}, field 'target_new': empty target") from None
    if not y:
        raise TargetInputError(f"{where}, field 'target_new': tokenises to nothing")
    prompts, ids, idxs = [], [], []
    for t in templates:
        ctx = t.format(request.prompt)
        if ctx.count("{}") != 1:
            raise TargetInputError(f"{where}, field 'prompt': template+prompt must hold exactly one '{{}}': {ctx!r}")
        try:
            idx = subject_token_index(tok, ctx, request.subject, fact_token)
        except ValueError as e:
            raise TargetInputError(f"{where}, field 'prompt': {e}") from None
        if teacher_forcing == "string":
            text = (ctx + tok.decode(y[:-1])).format(request.subject)
            row = encode(tok, text)
        else:
            text = ctx.format(request.subject)
            p = encode(tok, text)
            row = p + y[:-1]
            text = text + tok.decode(y[:-1])
        if idx < 0:  # rule "last": the prompt's last token (the reference would point into the target)
            idx = len(row) - len(y)
        prompts.append(text)
        ids.append(row)
        idxs.append(idx)
    kl_text = kl_prompt.format(request.subject)
    kl_idx = subject_token_index(tok, kl_prompt, request.subject, fact_token)
    kl_ids = encode(tok, kl_text)
    if kl_idx < 0:
        kl_idx = len(kl_ids) - 1
    prompts.append(kl_text)
    ids.append(kl_ids)
    idxs.append(kl_idx)
    for r, (row, i) in enumerate(zip(ids, idxs)):
        if not (0 <= i < len(row)):
            raise TargetInputError(f"{where}: subject index {i} outside row {r} ({prompts[r]!r})")
    for r in range(len(templates)):
        if len(ids[r]) < len(y):
            raise TargetInputError(f"{where}: row {r} shorter than the target")
    return TargetProblem(request.case_id, prompts, ids, idxs, list(y), len(templates))


# ------------------------------------------------------------------------------------- batch
class _Batch:
    """Padded tensors and gather indices for a set of (active) problems."""

    def __init__(self, problems: Sequence[TargetProblem], pad_id: int, device):
        rows = [r for p in problems for r in p.input_ids]
        width = max(len(r) for r in rows)
        self.input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        self.attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        edit_rows, edit_pos, edit_req = [], [], []
        nll_rows, nll_pos, nll_tok = [], [], []
        kl_rows, kl_pos = [], []
        row0 = []
        r0 = 0
        for j, p in enumerate(problems):
            T = len(p.target_ids)
            row0.append(r0)
            for k, (ids, idx) in enumerate(zip(p.input_ids, p.lookup_idxs)):
                r = r0 + k
                self.input_ids[r, : len(ids)] = torch.tensor(ids)
                self.attention_mask[r, : len(ids)] = 1
                edit_rows.append(r)
                edit_pos.append(idx)
                edit_req.append(j)
                if k < p.n_rewrite:
                    L = len(ids)
                    for t, y in enumerate(p.target_ids):
                        nll_rows.append(r)
                        nll_pos.append(L - T + t)
                        nll_tok.append(y)
                else:
                    kl_rows.append(r)
                    kl_pos.append(idx)
            r0 += p.n_rows
        t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        self.input_ids = self.input_ids.to(device)
        self.attention_mask = self.attention_mask.to(device)
        self.edit_rows, self.edit_pos, self.edit_req = t(edit_rows), t(edit_pos), t(edit_req)
        self.nll_rows, self.nll_pos, self.nll_tok = t(nll_rows), t(nll_pos), t(nll_tok)
        self.kl_rows, self.kl_pos = t(kl_rows), t(kl_pos)
        self.row0 = t(row0)
        self.row0_pos = t([p.lookup_idxs[0] for p in problems])
        self.n_rows = len(rows)
        # row -> request, per-row target length, rewriting-row count per request
        row_req = []
        for j, p in enumerate(problems):
            row_req += [j] * p.n_rows
        self.row_req = t(row_req)
        self.T = torch.tensor([float(len(p.target_ids)) for p in problems], device=device)
        self.n_rewrite = torch.tensor([float(p.n_rewrite) for p in problems], device=device)
        self.n_req = len(problems)
        self.tokens = self.input_ids.numel()


def _replace_hidden(output, h):
    if isinstance(output, tuple):
        return (h,) + tuple(output[1:])
    if isinstance(output, list):
        return [h] + list(output[1:])
    return h


def _group_problems(problems: Sequence[TargetProblem], order: Sequence[int], max_tokens: int, max_requests: int | None):
    """Greedy sub-batches (in ``order``) with padded whole-row tokens <= ``max_tokens`` (at least one request each):
    the whole-row forward (``targets_forward="full"``) is bounded by it."""
    groups, cur, cur_rows, cur_w = [], [], 0, 0
    for i in order:
        p = problems[i]
        rows, w = cur_rows + p.n_rows, max(cur_w, p.max_len)
        if cur and (rows * w > max_tokens or (max_requests and len(cur) >= max_requests)):
            groups.append(cur)
            cur, rows, w = [], p.n_rows, p.max_len
        cur.append(i)
        cur_rows, cur_w = rows, w
    if cur:
        groups.append(cur)
    return groups


def _group_by_step_tokens(problems: Sequence[TargetProblem], order: Sequence[int], step_tokens: int):
    """Greedy sub-batches (in ``order``) with at most ``step_tokens`` suffix tokens (:func:`suffix_spans`; at least one
    request each): what a step of ``targets_forward="suffix"`` runs forward and backward. Its once-per-group forwards
    run in chunks (``targets_max_tokens``), so they do not bound the group."""
    groups, cur, tokens = [], [], 0
    for i in order:
        t = sum(e - s for s, e in suffix_spans(problems[i]))
        if cur and tokens + t > step_tokens:
            groups.append(cur)
            cur, tokens = [], 0
        cur.append(i)
        tokens += t
    if cur:
        groups.append(cur)
    return groups


# ------------------------------------------------------------------------------------- losses
def nll_per_request(logprobs_at_targets: torch.Tensor, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per request: mean over rewriting rows of the per-row token-mean NLL, and mean exp(-row NLL)."""
    dev = logprobs_at_targets.device
    row_sum = torch.zeros(batch.n_rows, device=dev).index_add(0, batch.nll_rows, -logprobs_at_targets)
    row_T = batch.T[batch.row_req]
    row_nll = row_sum / row_T
    is_rw = torch.zeros(batch.n_rows, device=dev).index_fill(0, batch.nll_rows, 1.0)
    nll = torch.zeros(batch.n_req, device=dev).index_add(0, batch.row_req, row_nll * is_rw) / batch.n_rewrite
    prob = torch.zeros(batch.n_req, device=dev).index_add(0, batch.row_req, torch.exp(-row_nll) * is_rw) / batch.n_rewrite
    return nll, prob


class _LossHeadLogProbs(torch.autograd.Function):
    """``log_softmax(logits)`` read at ``(row, token)`` for the first ``n`` rows (the NLL positions) and whole for the
    remaining rows (the KL positions), with the gradient formed in one ``[rows, V]`` tensor: ``g_i - softmax_i · Σ g``
    per row. Autograd's gather and slices of the log-probabilities would each zero-fill a ``[rows, V]`` gradient
    first (measured: about a tenth of a SmolLM2 step on 2 cores). Same values and gradients."""

    @staticmethod
    def forward(ctx, logits, n: int, tokens):
        lp = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(lp, tokens)
        ctx.n = n
        rows = torch.arange(n, device=lp.device)
        return lp[rows, tokens], lp[n:].clone()

    @staticmethod
    def backward(ctx, g_tok, g_rest):
        lp, tokens = ctx.saved_tensors
        n = ctx.n
        if g_tok is None:
            g_tok = torch.zeros(n, dtype=lp.dtype, device=lp.device)
        if g_rest is None:
            g_rest = torch.zeros(lp.shape[0] - n, lp.shape[1], dtype=lp.dtype, device=lp.device)
        grad = lp.exp()
        grad.mul_(-torch.cat([g_tok, g_rest.sum(-1)])[:, None])
        rows = torch.arange(n, device=lp.device)
        grad[rows, tokens] += g_tok
        grad[n:] += g_rest
        return grad, None, None


def head_log_probs(logits: torch.Tensor, n: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(tokens[i] | row i) for i < n, log p(· | row) of the rows from n on)`` from ``logits`` ``[rows, V]``."""
    return _LossHeadLogProbs.apply(logits, n, tokens)


def kl_per_request(kl_logprobs: torch.Tensor, kl_init: torch.Tensor) -> torch.Tensor:
    """``KL(p_cur || p_init) = Σ_v p_cur (log p_cur - log p_init)`` per request (one KL row each)."""
    return (kl_logprobs.exp() * (kl_logprobs - kl_init)).sum(-1)


def weight_decay_term(delta_norm: torch.Tensor, init_norm: torch.Tensor, wd: float, form: str = "norm") -> torch.Tensor:
    """``wd * ||δ|| / ||v0||^2`` (reference, norm not squared) or ``wd * ||δ||^2 / ||v0||^2``."""
    num = delta_norm if form == "norm" else delta_norm ** 2
    return wd * num / init_norm ** 2


def clamp_delta_(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    """Project δ onto the ball of radius ``max_norm`` (in place)."""
    with torch.no_grad():
        n = delta.norm()
        if n > max_norm:
            delta.mul_(max_norm / n)


# ------------------------------------------------------------------------------------- forwards
def _autocast(hp, device: torch.device):
    """CUDA autocast for the frozen model's forwards (``hp.targets_autocast``); a no-op elsewhere."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(getattr(hp, "targets_autocast", None) or "")
    if dtype is None or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def _layer_of(adapter: ArchAdapter, name: str) -> int:
    """Index of the block that is, or contains, module ``name``."""
    for i in range(adapter.num_layers):
        b = adapter.block_name(i)
        if name == b or name.startswith(b + "."):
            return i
    raise KeyError(f"module {name!r} is not inside a block")


def _add_at(h: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``h`` with ``values`` added at ``(rows, pos)`` (out of place, so gradients reach ``values``)."""
    return h.index_put((rows.to(h.device), pos.to(h.device)), values.to(h.device, h.dtype), accumulate=True)


def _row_starts(problems: Sequence[TargetProblem]) -> list[int]:
    starts, r0 = [], 0
    for p in problems:
        starts.append(r0)
        r0 += p.n_rows
    return starts


class _FullForward:
    """Every step runs whole rows: the model's own forward with δ added by a hook at the edit module (REFERENCE_SPEC
    §1.2 / §2.2 as written). With ``reuse`` the output of block ``prefix_block`` (which does not depend on δ) is kept
    from the first forward and later steps run only the blocks above it (:meth:`ArchAdapter.run_blocks`)."""

    def __init__(self, model, adapter: ArchAdapter, problems, *, edit_module, edit_is_block, nll_layer, prefix_block,
                 reuse, tok, device, attention="model"):
        self.model, self.adapter, self.tok, self.device, self.attention = model, adapter, tok, device, attention
        self.edit_module, self.edit_is_block = edit_module, edit_is_block
        self.final = adapter.num_layers - 1
        self.nll_layer = nll_layer
        self.prefix_block = prefix_block if reuse else None
        self.starts = _row_starts(problems)
        self.base = None  # block prefix_block's output of every row of the group, from the first forward
        self.rows = None

    def select(self, active: Sequence[int], problems, batch: _Batch) -> None:
        self.rows = torch.cat([torch.arange(self.starts[i], self.starts[i] + problems[i].n_rows) for i in active])

    def _edit_fn(self, batch: _Batch, D: torch.Tensor, captured: dict | None):
        def edit(output, name):
            if name != self.edit_module:
                return output
            h = ArchAdapter.block_hidden(output) if self.edit_is_block else output
            if captured is not None:
                captured["init"] = h[batch.row0.to(h.device), batch.row0_pos.to(h.device)].detach().float().clone()
            h = _add_at(h, batch.edit_rows, batch.edit_pos, D[batch.edit_req.to(D.device)])
            return _replace_hidden(output, h) if self.edit_is_block else h
        return edit

    def forward(self, batch: _Batch, D: torch.Tensor, first: bool):
        a = self.adapter
        captured = {} if first else None
        if self.base is None:
            names = [self.edit_module, a.block_name(self.final), a.block_name(self.nll_layer)]
            if self.prefix_block is not None:
                names.append(a.block_name(self.prefix_block))
            with TraceDict(self.model, names, retain_output=True, edit_output=self._edit_fn(batch, D, captured),
                           stop=True) as td:
                self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                           **token_type_ids_like(self.tok, batch.input_ids))  # as model(**tok(rows)) in the reference
            hs = {i: ArchAdapter.block_hidden(td[a.block_name(i)].output) for i in (self.final, self.nll_layer)}
            if self.prefix_block is not None:
                out = td[a.block_name(self.prefix_block)].output
                self.base = ArchAdapter.block_hidden(out).detach()  # (if it is the edit module: δ = 0 at the first step)
        else:
            W = batch.input_ids.shape[1]
            h = self.base[self.rows.to(self.base.device), :W]
            if a.block_name(self.prefix_block) == self.edit_module:
                h = _add_at(h, batch.edit_rows, batch.edit_pos, D[batch.edit_req.to(D.device)])
            am = batch.attention_mask.bool().to(h.device)
            allowed = torch.ones(W, W, dtype=torch.bool, device=h.device).tril()[None] & am[:, None, :]
            pos = torch.arange(W, device=h.device)[None].expand(len(am), W)
            with TraceDict(self.model, [self.edit_module], retain_output=False, edit_output=self._edit_fn(batch, D, None)):
                hs = a.run_blocks(h, self.prefix_block + 1, self.final, allowed=allowed, position_ids=pos,
                                  keep=(self.nll_layer,), attention=self.attention)
        h_nll, h_fin = hs[self.nll_layer], hs[self.final]
        return (h_nll[batch.nll_rows.to(h_nll.device), batch.nll_pos.to(h_nll.device)],
                h_fin[batch.kl_rows.to(h_fin.device), batch.kl_pos.to(h_fin.device)],
                captured["init"] if first else None)


def suffix_spans(p: TargetProblem) -> list[tuple[int, int]]:
    """Per row of ``p``, the positions ``[s, e)`` that δ changes and the loss needs: from the subject token (or an
    earlier loss position, never for the built rows) to the row's end; a KL row is read at its subject token only,
    so its span is that one position."""
    T = len(p.target_ids)
    return [(min(idx, len(ids) - T), len(ids)) if k < p.n_rewrite else (idx, idx + 1)
            for k, (ids, idx) in enumerate(zip(p.input_ids, p.lookup_idxs))]


class _SuffixForward:
    """Only what δ changes is recomputed. δ enters the residual stream at block E (MEMIT: added to block L's output;
    ROME: to the MLP output of layer l, which the block adds to its residual unchanged, so the block output gains the
    same δ) at the row's subject token ``i``. Positions before ``i`` do not attend to it, so above E their states,
    keys and values are those at δ = 0. Once per group (at δ = 0): the model up to block E on the rows' positions
    ``[0, end)``, then the blocks above E on each row's prefix ``[0, s)`` with ``s = min(i, first loss position)``,
    keeping their K/V (:class:`PrefixKVCache`); both over the rows' distinct prefixes only (:func:`build_forest`). Every step: the suffix ``[s, len)`` through blocks E+1..N with δ added at ``i``,
    attending to the cached prefix K/V plus itself (causally), at its true positions."""

    def __init__(self, model, adapter: ArchAdapter, problems, *, edit_module, edit_is_block, nll_layer, tok, device,
                 pad_id, pack: bool = True, attention: str = "model", max_tokens: int = 2048,
                 lane_width: int = 128):
        self.adapter, self.device, self.attention = adapter, device, attention
        self.E = _layer_of(adapter, edit_module)
        self.final = adapter.num_layers - 1
        self.nll_layer = nll_layer
        if nll_layer < self.E:
            raise ValueError(f"targets_forward=suffix reads the loss at or above the edit point (block {self.E}), "
                             f"not at block {nll_layer}")
        self.starts = _row_starts(problems)
        self.pack = pack
        rows = [r for p in problems for r in p.input_ids]
        spans = [span for p in problems for span in suffix_spans(p)]
        starts, ends = [a for a, _ in spans], [b for _, b in spans]
        R, S, P = len(rows), max(e - a for a, e in spans), max(starts)
        # 1. the model up to block E (its own forward) on every distinct prefix of the rows' positions [0, end)
        f1 = build_forest(rows, ends, lane_width, pad_id)
        h1, init = self._frozen_forward(model, tok, f1, edit_module, edit_is_block, max_tokens,
                                        *f1.index(self.starts, [p.lookup_idxs[0] for p in problems]))
        self.init = init.float().clone()
        dev = h1.device
        lane1 = torch.tensor(f1.lane, dtype=torch.long, device=dev)[:, None].expand(R, S)
        slot1 = torch.tensor([[f1.slots[r][min(a + t, e - 1)] for t in range(S)] for r, (a, e) in enumerate(spans)],
                             dtype=torch.long, device=dev)
        self.base = h1[lane1, slot1]                                              # [R, S, d] at δ = 0
        self.s = torch.tensor(starts, dtype=torch.long, device=dev)
        self.n = torch.tensor(ends, dtype=torch.long, device=dev)
        self.pos = (self.s[:, None] + torch.arange(S, device=dev)).clamp(max=adapter.context_length - 1)
        # 2. blocks E+1..N on every distinct prefix [0, s) (never changed by δ), keeping their keys/values
        self.cache = PrefixKVCache()
        self.kv_lane = torch.zeros(R, dtype=torch.long, device=dev)
        self.kv_slot = torch.zeros(R, max(1, P), dtype=torch.long, device=dev)
        if P > 0 and self.E < self.final:
            f2 = build_forest(rows, starts, lane_width, pad_id)
            src = [sr or (0, 0) for lane in f2.source for sr in lane]  # empty slots: any state, never attended
            src_lane, src_slot = f1.index([r for r, _ in src], [q for _, q in src])
            h2 = h1[src_lane.to(dev), src_slot.to(dev)].view(f2.n_lanes, f2.width, -1)
            per = max(1, int(max_tokens) // f2.width)
            caches = []
            with torch.no_grad():
                for c in range(0, f2.n_lanes, per):
                    cache = PrefixKVCache()
                    adapter.run_blocks(h2[c:c + per], self.E + 1, self.final, allowed=f2.allowed[c:c + per].to(dev),
                                       position_ids=f2.positions[c:c + per].to(dev), cache=cache, attention=attention)
                    caches.append(cache)
            self.cache = PrefixKVCache.concat(caches)
            self.kv_lane = torch.tensor(f2.lane, dtype=torch.long, device=dev)
            for r, sl in enumerate(f2.slots):
                if sl:
                    self.kv_slot[r, :len(sl)] = torch.tensor(sl, dtype=torch.long)
        self.cache.recording = False
        self.sel = None

    def _frozen_forward(self, model, tok, forest, edit_module, edit_is_block, max_tokens, init_lane, init_slot):
        """The model's own forward up to block E on the forest's lanes (:func:`forest_forward`, chunks of at most
        ``max_tokens`` slots): block E's output ``[lanes, width, d]`` and the edit module's output at
        ``(init_lane, init_slot)``."""
        block = self.adapter.block_name(self.E)
        hs, inits = [], []
        for c, td in forest_forward(model, self.adapter, tok, forest, [edit_module, block], max_tokens):
            h = ArchAdapter.block_hidden(td[block].output).detach()
            hs.append(h)
            out = ArchAdapter.block_hidden(td[edit_module].output) if edit_is_block else td[edit_module].output
            mine = (init_lane >= c) & (init_lane < c + h.shape[0])
            inits.append((torch.nonzero(mine)[:, 0], out[(init_lane[mine] - c).to(out.device),
                                                           init_slot[mine].to(out.device)].detach()))
            del td, out
        h = torch.cat(hs) if len(hs) > 1 else hs[0]
        init = torch.empty(len(init_lane), h.shape[-1], dtype=h.dtype, device=h.device)
        for where, v in inits:
            init[where.to(h.device)] = v.to(h.device, h.dtype)
        return h, init

    def select(self, active: Sequence[int], problems, batch: _Batch) -> None:
        """Lay the active rows' suffixes out in lanes (:func:`pack_rows`: several short suffixes side by side in one
        lane, or one per lane without ``pack``) and prepare the lanes' inputs, true positions, attention pattern
        (a token sees its own row's cached prefix and its own row's earlier suffix tokens: exactly the keys it has
        in the whole row) and cached prefix K/V, and the (lane, slot) of every edit / loss entry."""
        dev = self.base.device
        rows = torch.cat([torch.arange(self.starts[i], self.starts[i] + problems[i].n_rows) for i in active]).to(dev)
        s_l, n_l = self.s[rows].tolist(), self.n[rows].tolist()
        lengths = [n - s for s, n in zip(s_l, n_l)]
        width = max(lengths)
        lanes = pack_rows(lengths, width) if self.pack else [[r] for r in range(len(rows))]
        lane_of, off = [0] * len(rows), [0] * len(rows)
        toks = ([], [], [], [])   # every suffix token: (lane, slot, row, index in the row's suffix)
        kvs = ([], [], [], [])    # every cached prefix position of a lane: (lane, slot, row, position)
        seg = torch.full((len(lanes), width), -1, dtype=torch.long)
        kv_len = [sum(s_l[r] for r in lane) for lane in lanes] if self.cache.layers else [0] * len(lanes)
        K = max(kv_len)
        kv_seg = torch.full((len(lanes), K), -2, dtype=torch.long)
        for lane_i, lane in enumerate(lanes):
            o = t = 0
            for r in lane:
                lane_of[r], off[r] = lane_i, o
                o = _lay_out(toks, seg, lane_i, o, lengths[r], r)
                if K:
                    t = _lay_out(kvs, kv_seg, lane_i, t, s_l[r], r)
        (tok_lane, tok_slot, tok_row, tok_j), (kv_lane, kv_slot, kv_row, kv_pos) = toks, kvs
        T = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        tl, ts, tr, tj = T(tok_lane), T(tok_slot), T(tok_row), T(tok_j)
        d = self.base.shape[-1]
        base = torch.zeros(len(lanes), width, d, dtype=self.base.dtype, device=dev)
        base[tl, ts] = self.base[rows[tr], tj]
        pos = torch.zeros(len(lanes), width, dtype=torch.long, device=dev)
        pos[tl, ts] = self.pos[rows[tr], tj]
        seg, kv_seg = seg.to(dev), kv_seg.to(dev)
        q = torch.arange(width, device=dev)
        # pad slots (seg -1) see the lane's other pad slots only, so no query is left without a key
        allowed = torch.cat([kv_seg[:, None, :] == seg[:, :, None],
                             (seg[:, None, :] == seg[:, :, None]) & (q[None, None, :] <= q[None, :, None])], dim=2)
        # the lane's prefix K/V: slot t holds the cache's (row, position) (pad slots: any entry, never attended)
        src_row = torch.zeros(len(lanes), K, dtype=torch.long, device=dev)
        src_pos = torch.zeros(len(lanes), K, dtype=torch.long, device=dev)
        if kv_lane:
            src = rows[T(kv_row)]
            src_row[T(kv_lane), T(kv_slot)] = self.kv_lane[src]
            src_pos[T(kv_lane), T(kv_slot)] = self.kv_slot[src, T(kv_pos)]
        lane_t, off_t, s_t = T(lane_of), T(off), T(s_l)

        def where(r, p):  # batch-local row r, position p in the row -> (lane, slot)
            r = r.to(dev)
            return lane_t[r], off_t[r] + p.to(dev) - s_t[r]

        self.sel = dict(base=base, pos=pos, allowed=allowed, cache=self.cache.gather(src_row, src_pos),
                        edit=(*where(batch.edit_rows, batch.edit_pos), batch.edit_req.to(dev)),
                        nll=where(batch.nll_rows, batch.nll_pos), kl=where(batch.kl_rows, batch.kl_pos),
                        lanes=len(lanes), width=width, tokens=sum(lengths))
        self.init_sel = self.init[torch.tensor(list(active), device=self.init.device)]

    def forward(self, batch: _Batch, D: torch.Tensor, first: bool):
        z = self.sel
        el, es, eq = z["edit"]
        x = _add_at(z["base"], el, es, D[eq.to(D.device)])
        hs = self.adapter.run_blocks(x, self.E + 1, self.final, allowed=z["allowed"], position_ids=z["pos"],
                                     cache=z["cache"], keep=(self.nll_layer,), attention=self.attention)
        h_nll, h_fin = hs[self.nll_layer], hs[self.final]
        (nl, ns), (kl, ks) = z["nll"], z["kl"]
        return (h_nll[nl.to(h_nll.device), ns.to(h_nll.device)], h_fin[kl.to(h_fin.device), ks.to(h_fin.device)],
                self.init_sel if first else None)


def _lay_out(lists, seg: torch.Tensor, lane: int, start: int, count: int, row: int) -> int:
    """Append ``count`` consecutive slots of ``row`` from ``start`` in ``lane`` to ``lists`` (lane, slot, row,
    index), mark them as ``row``'s in ``seg``; returns the next free slot."""
    lanes, slots, rows, idx = lists
    lanes += [lane] * count
    slots += range(start, start + count)
    rows += [row] * count
    idx += range(count)
    seg[lane, start:start + count] = row
    return start + count


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Rows (by index) in lanes of ``width`` tokens, first fit by decreasing length: the suffixes of several short
    rows share a lane, so a step computes their tokens and hardly any padding, in one dense batch."""
    lanes: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > width:
            raise ValueError(f"row {i}: {lengths[i]} tokens do not fit a lane of {width}")
        for k, f in enumerate(free):
            if f >= lengths[i]:
                lanes[k].append(i)
                free[k] -= lengths[i]
                break
        else:
            lanes.append([i])
            free.append(width - lengths[i])
    return lanes


# ------------------------------------------------------------------------------------- optimiser
def _optimise_group(model, adapter: ArchAdapter, problems: list[TargetProblem], *, edit_module: str, edit_is_block: bool,
                    nll_block: str | None, hp, pad_id: int, pbar=None, prefix_block: int | None = None,
                    tok=None, max_tokens: int | None = None) -> list[TargetResult]:
    device = next(model.parameters()).device
    final = adapter.num_layers - 1
    nll_layer = _layer_of(adapter, nll_block) if nll_block else final
    mode = getattr(hp, "targets_forward", "full")
    why_not = adapter.block_runner_unsupported()
    if why_not and mode == "suffix":
        log.warning("targets_forward=suffix is not available for this model (%s): running whole rows", why_not)
    reuse = (getattr(hp, "reuse_frozen_prefix", True) and prefix_block is not None and prefix_block >= 0
             and why_not is None)
    attention = getattr(hp, "block_attention", "model")
    with _autocast(hp, device):
        if mode == "suffix" and why_not is None:
            fwd = _SuffixForward(model, adapter, problems, edit_module=edit_module, edit_is_block=edit_is_block,
                                 nll_layer=nll_layer, tok=tok, device=device, pad_id=pad_id,
                                 pack=bool(getattr(hp, "targets_pack_rows", True)), attention=attention,
                                 max_tokens=hp.targets_max_tokens if max_tokens is None else max_tokens)
        else:
            fwd = _FullForward(model, adapter, problems, edit_module=edit_module, edit_is_block=edit_is_block,
                               nll_layer=nll_layer, prefix_block=prefix_block, reuse=reuse, tok=tok, device=device,
                               attention=attention)
    n = len(problems)
    d = adapter.hidden_size
    deltas = [torch.zeros(d, device=device, dtype=torch.float32, requires_grad=True) for _ in range(n)]
    opts = [torch.optim.Adam([x], lr=hp.v_lr) for x in deltas]
    init = [None] * n
    init_norm = [None] * n
    kl_init = [None] * n
    steps = [0] * n
    early = [False] * n
    traces: list[list[list[float]]] = [[] for _ in range(n)]
    active = list(range(n))
    batch = None
    batch_members = None
    for it in range(hp.v_num_grad_steps):
        if batch_members != active:
            batch = _Batch([problems[i] for i in active], pad_id, device)
            batch_members = list(active)
            fwd.select(active, problems, batch)
        first = it == 0
        D = torch.stack([deltas[i] for i in active])
        with _autocast(hp, device):
            h_nll, h_kl, init_now = fwd.forward(batch, D, first)
        # logits only where the loss reads them, in float32 (outside autocast); the NLL and KL positions in one
        # unembedding (one pass over the [V, d] head instead of two)
        logits = adapter.unembed(torch.cat([h_nll, h_kl.to(h_nll.device)])).float()
        lp_t, kl_lp = head_log_probs(logits, h_nll.shape[0], batch.nll_tok.to(logits.device))
        lp_t, kl_lp = lp_t.to(device), kl_lp.to(device)
        nll, prob = nll_per_request(lp_t, batch)
        if first:
            for j, i in enumerate(active):
                init[i] = init_now[j].to(device)
                init_norm[i] = init[i].norm()
                kl_init[i] = kl_lp[j].detach().clone()
        kl = hp.kl_factor * kl_per_request(kl_lp, torch.stack([kl_init[i] for i in active]))
        dn = torch.stack([deltas[i].norm() for i in active])
        inorm = torch.stack([init_norm[i] for i in active])
        wd = weight_decay_term(dn, inorm, hp.v_weight_decay, hp.weight_decay_form)
        loss = nll + kl + wd
        lv = loss.detach().cpu().tolist()
        rows = torch.stack([loss, nll, kl, wd, dn, prob], 1).detach().double().cpu().tolist()
        still, stepping = [], []
        for j, i in enumerate(active):
            traces[i].append([float(it)] + rows[j])
            if lv[j] < hp.early_stop_loss:
                early[i] = True
            elif it == hp.v_num_grad_steps - 1:
                pass
            else:
                still.append(i)
                stepping.append(j)
        done_now = len(active) - len(still)
        if pbar is not None:  # per step: requests done, mean loss of the active ones
            pbar.update(done_now, step=f"{it + 1}/{hp.v_num_grad_steps}", loss=sum(lv) / len(lv))
        if stepping:
            total = loss[torch.tensor(stepping, device=loss.device)].sum()
            for i in still:
                opts[i].zero_grad(set_to_none=True)
            total.backward()
            for i in still:
                opts[i].step()
                steps[i] += 1
                clamp_delta_(deltas[i], hp.clamp_norm_factor * init_norm[i])
        del h_nll, h_kl, logits, lp_t, kl_lp, loss
        active = still
        if not active:
            break
    out = []
    for i, p in enumerate(problems):
        out.append(TargetResult(p.case_id, init[i].detach().cpu(), deltas[i].detach().cpu().clone(), steps[i], early[i],
                                torch.tensor(traces[i], dtype=torch.float64)))
    return out


def optimise_targets(model, tok, problems: Sequence[TargetProblem], hp, *, edit_module: str, edit_is_block: bool,
                     nll_block: str | None = None, batched: bool | None = None, max_tokens: int | None = None,
                     step_tokens: int | None = None, prefix_block: int | None = None,
                     on_result: Callable[[int, TargetResult], None] | None = None, progress: bool = True,
                     desc: str = "targets", done_before: int = 0) -> list[TargetResult]:
    """Optimise the target vector of every problem; ``batched`` (default ``hp.batched_targets``) groups
    them into memory-bounded sub-batches, else one request at a time. ``on_result(i, result)`` is called
    as soon as problem ``i`` is finished (used for the on-disk z cache). ``prefix_block``: the highest
    block whose output does not depend on δ (MEMIT: L; ROME: l - 1); in ``targets_forward="full"`` mode with
    ``hp.reuse_frozen_prefix`` its output is computed at the first step only and later steps run the blocks above
    it. The ``"suffix"`` mode finds the edit point from ``edit_module`` itself. ``done_before``: requests of the same
    job finished earlier (e.g. found in the z cache); the progress bar counts them (``done_before + n`` in all) and
    its rate and ETA are over this call's work."""
    from massedit.core.adapters import get_adapter

    adapter = get_adapter(model)
    batched = hp.batched_targets if batched is None else batched
    max_tokens = hp.targets_max_tokens if max_tokens is None else max_tokens
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n = len(problems)
    if batched:
        order = sorted(range(n), key=lambda i: (problems[i].max_len, i))
        if getattr(hp, "targets_forward", "full") == "suffix" and adapter.block_runner_unsupported() is None:
            step_tokens = getattr(hp, "targets_step_tokens", 2048) if step_tokens is None else step_tokens
            groups = _group_by_step_tokens(problems, order, step_tokens)
        else:
            groups = _group_problems(problems, order, max_tokens, None)
    else:
        groups = [[i] for i in range(n)]
    results: list[TargetResult | None] = [None] * n
    pbar = None
    if progress and n:
        from massedit.core.progress import progress_bar

        pbar = progress_bar(n + done_before, desc, unit="req", transient=True, initial=done_before)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for g in groups:
                res = _optimise_group(model, adapter, [problems[i] for i in g], edit_module=edit_module,
                                      edit_is_block=edit_is_block, nll_block=nll_block, hp=hp, pad_id=pad_id, pbar=pbar,
                                      prefix_block=prefix_block, tok=tok, max_tokens=max_tokens)
                for i, r in zip(g, res):
                    results[i] = r
                    if on_result is not None:
                        on_result(i, r)
    finally:
        if pbar is not None:
            pbar.close()
        model.train(was_training)
    return results  # type: ignore[return-value]


def summarize_results(results: Sequence[TargetResult]) -> dict:
    steps = [r.n_adam_steps for r in results]
    return {
        "n": len(results),
        "mean_adam_steps": sum(steps) / max(1, len(steps)),
        "early_stopped": sum(r.early_stopped for r in results),
        "mean_final_loss": sum(r.final_loss for r in results if not math.isnan(r.final_loss)) / max(1, len(results)),
        "from_cache": sum(r.from_cache for r in results),
    }
