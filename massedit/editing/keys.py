"""Keys and representations at the subject's token (REFERENCE_SPEC §0.3, §0.4, §1.1, §2.3).

A key is the *input* of the rewrite module (the MLP down-projection, width m) at the subject token of
a context string; block outputs (width d) at the same token give MEMIT's current hidden states H.
Contexts are run in right-padded chunks; the forward stops right after the traced module.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from massedit.core.adapters import ArchAdapter
from massedit.core.nethook import Trace
from massedit.core.placement import execution_device, storage_version
from massedit.core.tokenization import resolve_index, subject_token_index, tokenize_batch
from massedit.editing.prefix_forest import build_forest, forest_forward

log = logging.getLogger(__name__)


def lookup_indices(tok, templates: Sequence[str], words: Sequence[str], rule: str = "subject_last") -> list[int]:
    """Subject-token index of each ``template.format(word)`` (``-1`` = last token for rule ``last``)."""
    return [subject_token_index(tok, t, w, rule) for t, w in zip(templates, words)]


@torch.no_grad()
def module_io_at_words(model, tok, module_name: str, templates: Sequence[str], words: Sequence[str],
                       rule: str = "subject_last", chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of ``module_name`` at the subject token of every ``template.format(word)``.

    Returns two float32 tensors ``[n, width_in]`` and ``[n, width_out]`` (block outputs: the hidden
    state, element 0 of the tuple). REFERENCE_SPEC §0.4 (chunks of 128, right padding).
    """
    idxs = lookup_indices(tok, templates, words, rule)
    texts = [t.format(w) for t, w in zip(templates, words)]
    device = next(model.parameters()).device
    ins, outs = [], []
    for s in range(0, len(texts), chunk):
        enc = tokenize_batch(tok, texts[s : s + chunk], device=device)
        with Trace(model, module_name, retain_input=True, retain_output=True, stop=True) as tr:
            model(**enc)  # the tokenizer's full encoding, as the reference (token_type_ids included if emitted)
        x_in = tr.input
        x_out = ArchAdapter.block_hidden(tr.output)
        rows = torch.arange(len(texts[s : s + chunk]), device=device)
        pos = torch.tensor([resolve_index(i, enc["attention_mask"][r]) for r, i in enumerate(idxs[s : s + chunk])],
                           device=device)
        if int(pos.max()) >= enc["input_ids"].shape[1]:
            bad = int(torch.argmax(pos))
            raise ValueError(f"subject index {int(pos[bad])} beyond the tokenised context {texts[s + bad]!r}")
        # with a model spread over devices the traced tensors live on their layer's device
        ins.append(x_in[rows.to(x_in.device), pos.to(x_in.device)].float())
        outs.append(x_out[rows.to(x_out.device), pos.to(x_out.device)].float())
    return torch.cat(ins), torch.cat(outs)


def rome_key(model, tok, adapter: ArchAdapter, layer: int, request, templates: Sequence[str],
             rule: str = "subject_last") -> torch.Tensor:
    """k* (ROME §1.1): flat mean over the templates of the rewrite-module input at the subject token."""
    ctx = [t.format(request.prompt) for t in templates]
    k, _ = module_io_at_words(model, tok, adapter.rewrite_name(layer), ctx, [request.subject] * len(ctx), rule)
    return k.mean(0)


def memit_key_contexts(requests, template_groups: Sequence[Sequence[str]]) -> tuple[list[str], list[str]]:
    """The contexts (template filled with the prompt; the subject still ``{}``) and subject words of MEMIT's keys:
    every template of every group for each request, request-major."""
    ctx, words = [], []
    for r in requests:
        for g in template_groups:
            for t in g:
                ctx.append(t.format(r.prompt))
                words.append(r.subject)
    return ctx, words


def mean_over_template_groups(k: torch.Tensor, n_requests: int, sizes: Sequence[int]) -> torch.Tensor:
    """``[m, N]`` from the request-major rows of :func:`memit_key_contexts`: per request, the mean within each
    template group, then the mean over the groups (MEMIT §2.3)."""
    per_req = sum(sizes)
    out = []
    for i in range(n_requests):
        block = k[i * per_req : (i + 1) * per_req]
        means, s = [], 0
        for n in sizes:
            means.append(block[s : s + n].mean(0))
            s += n
        out.append(torch.stack(means).mean(0))
    return torch.stack(out, dim=1)


def memit_keys(model, tok, adapter: ArchAdapter, layer: int, requests, template_groups: Sequence[Sequence[str]],
               rule: str = "subject_last") -> torch.Tensor:
    """K ``[m, N]`` (MEMIT §2.3): per request, mean within each template group, then over the groups."""
    ctx, words = memit_key_contexts(requests, template_groups)
    k, _ = module_io_at_words(model, tok, adapter.rewrite_name(layer), ctx, words, rule)
    return mean_over_template_groups(k, len(requests), [len(g) for g in template_groups])


def bare_prompt_io(model, tok, module_name: str, requests, rule: str = "subject_last"):
    """(input, output) of ``module_name`` at the subject token of each request's bare prompt."""
    return module_io_at_words(model, tok, module_name, [r.prompt for r in requests], [r.subject for r in requests], rule)


class LayerwiseReader:
    """Rewrite-module inputs and block outputs at the subject token of fixed contexts, read at ascending layers while
    the caller edits each layer after reading it (MEMIT's keys: layer l's keys see the writes of the layers below).

    Causal attention: the subject token's states depend only on the tokens up to it, so each context is cut after its
    subject token and the cut rows are laid out as a forest of their distinct prefixes (:func:`build_forest`: the
    context templates' tokens, repeated by every request, are computed once). The residual stream entering the
    lowest layer ``first`` is computed once by the model's own forward on the forest's lanes (blocks below ``first``
    are never edited); a read at layer l first runs only the blocks between the previous read and l, on the stored
    stream, with their current weights (:meth:`ArchAdapter.run_blocks`, each slot attending its own prefix). Reading
    layers ``l_1 < ... < l_k`` thus runs ``l_k + 1`` blocks in all instead of ``Σ (l_i + 1)``, on fewer positions;
    the arithmetic per position is the model's own, so the keys equal :func:`module_io_at_words` up to float
    rounding. A block below the last read must not change afterwards: a read checks it and raises ``RuntimeError``.
    Memory: the stream of every forest slot, ``slots x d`` in the model's dtype (at most the padded contexts')."""

    def __init__(self, model, tok, adapter: ArchAdapter, templates: Sequence[str], words: Sequence[str], first: int,
                 rule: str = "subject_last", chunk: int = 128, attention: str = "model", lane_width: int = 128):
        self.model, self.adapter, self.cur, self.attention = model, adapter, int(first), attention
        idxs = lookup_indices(tok, templates, words, rule)
        texts = [t.format(w) for t, w in zip(templates, words)]
        rows, cut = [], []
        for s in range(0, len(texts), chunk):
            enc = tokenize_batch(tok, texts[s : s + chunk])
            am = enc["attention_mask"]
            for r, i in enumerate(idxs[s : s + chunk]):
                pos = resolve_index(i, am[r])
                n = int(am[r].sum())
                if pos >= n:
                    raise ValueError(f"subject index {pos} beyond the tokenised context {texts[s + r]!r}")
                rows.append(enc["input_ids"][r, :n].tolist())
                cut.append(pos + 1)
        self.n_rows = len(rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        forest = build_forest(rows, cut, lane_width, pad)
        self.n_slots = forest.n_slots
        # per chunk of lanes: (hidden entering block cur [lanes, W, d], allowed, positions, rows read there, lane, slot)
        self.chunks = []
        block = adapter.block_name(self.cur)
        for c, td in forest_forward(model, adapter, tok, forest, [block], chunk * lane_width, retain_input=True):
            h = td[block].input.detach()
            lanes = slice(c, c + h.shape[0])
            mine = [r for r in range(len(rows)) if lanes.start <= forest.lane[r] < lanes.stop]
            lane = torch.tensor([forest.lane[r] - c for r in mine], dtype=torch.long)
            slot = torch.tensor([forest.slots[r][cut[r] - 1] for r in mine], dtype=torch.long)
            self.chunks.append((h, forest.allowed[lanes].to(h.device), forest.positions[lanes].to(h.device),
                                torch.tensor(mine), lane, slot))
        self._versions = self._block_versions(self.cur)

    def _gather(self, read) -> torch.Tensor:
        """``[n, width]`` float32 in the contexts' order from ``read(chunk) -> (tensor [lanes, W, width])``."""
        out = None
        for ch in self.chunks:
            x = read(ch)
            _, _, _, mine, lane, slot = ch
            v = x[lane.to(x.device), slot.to(x.device)].float()
            if out is None:
                out = torch.empty(self.n_rows, v.shape[-1], dtype=torch.float32, device=v.device)
            out[mine.to(v.device)] = v.to(out.device)
        return out

    def _block_versions(self, upto: int) -> list[int | None]:
        names = [self.adapter.block_name(i) for i in range(upto)]
        return [storage_version(self.model, f"{b}.{n}") for b in names
                for n, _ in self.model.get_submodule(b).named_parameters()]

    def _run(self, h, allowed, positions, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start..stop`` on ``h``, each on its own device (a model spread over devices)."""
        for i in range(start, stop + 1):
            dev = execution_device(self.model, self.adapter.block_name(i))
            h = self.adapter.run_blocks(h.to(dev), i, i, allowed=allowed.to(dev), position_ids=positions.to(dev),
                                        attention=self.attention)[i]
        return h

    def _advance(self, layer: int) -> None:
        if layer < self.cur:
            raise ValueError(f"LayerwiseReader reads ascending layers: layer {layer} after {self.cur}")
        if self._block_versions(self.cur) != self._versions:
            raise RuntimeError(f"a block below layer {self.cur} changed after its stream was stored: the reader only "
                               f"follows edits at or above the last layer read")
        if layer > self.cur:
            with torch.no_grad():
                self.chunks = [(self._run(h, a, p, self.cur, layer - 1), a, p, *rest) for h, a, p, *rest in self.chunks]
            self.cur = layer
            self._versions = self._block_versions(layer)

    @torch.no_grad()
    def module_inputs(self, layer: int, module_name: str) -> torch.Tensor:
        """``[n, width_in]`` float32: the input of ``module_name`` (inside block ``layer``) at every subject token."""
        self._advance(layer)

        def read(ch):
            h, allowed, positions, *_ = ch
            with Trace(self.model, module_name, retain_input=True, retain_output=False, stop=True) as tr:
                self._run(h, allowed, positions, layer, layer)
            return tr.input

        return self._gather(read)

    @torch.no_grad()
    def block_outputs(self, layer: int, block: int) -> torch.Tensor:
        """``[n, d]`` float32: the output of block ``block`` (>= ``layer``) at every subject token, after a read at
        ``layer`` (the stored stream moves to ``layer``; the blocks from there to ``block`` run but are not kept)."""
        if block < layer:
            raise ValueError(f"block_outputs: block {block} is below the read layer {layer}")
        self._advance(layer)
        return self._gather(lambda ch: self._run(ch[0], ch[1], ch[2], layer, block))

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h, *_ in self.chunks)


def layerwise_reader_bytes(tok, texts: Sequence[str], hidden_size: int, dtype: torch.dtype, chunk: int = 128) -> int:
    """Bytes of ``texts`` padded per chunk to its longest row: an upper bound of what a :class:`LayerwiseReader` holds
    (it keeps only the distinct prefixes up to each subject token)."""
    lens = [len(x) for x in tok(list(texts))["input_ids"]]
    item = torch.empty((), dtype=dtype).element_size()
    return sum(len(lens[s : s + chunk]) * max(lens[s : s + chunk]) for s in range(0, len(lens), chunk)) * hidden_size * item


class MemitKeyReader:
    """MEMIT's ``K [m, N]`` (keys at layer l, §2.3) and ``H [d, N]`` (block ``z_layer`` output at the bare prompts) of
    one batch's requests, read at each layer of the ascending layer loop, on the model as edited so far.

    Two :class:`LayerwiseReader` streams (the key contexts, the bare prompts) from the lowest layer, so each read runs
    only the blocks above the previous one, while their memory stays within ``max_gib`` (``hp.keys_reuse_max_gib``).
    Otherwise (``max_gib`` 0/None, a larger batch, or blocks that cannot run alone) every read is a full forward per
    layer (:func:`memit_keys`, :func:`bare_prompt_io`), the reference's arithmetic. They agree up to float rounding."""

    def __init__(self, model, tok, adapter: ArchAdapter, requests, template_groups, z_layer: int, rule: str,
                 first_layer: int, max_gib: float | None = 8.0, attention: str = "model"):
        self.model, self.tok, self.adapter, self.attention = model, tok, adapter, attention
        self.requests, self.groups, self.z_layer, self.rule = list(requests), template_groups, int(z_layer), rule
        self.first = int(first_layer)
        self.max_gib = max_gib
        self.reuse = bool(max_gib) and bool(self.requests) and adapter.block_runner_unsupported() is None
        self._ctx = self._bare = None

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K [m, N], H [d, N])`` at ``layer`` on the current weights."""
        a = self.adapter
        if not self.reuse:
            K = memit_keys(self.model, self.tok, a, layer, self.requests, self.groups, self.rule)
            _, H = bare_prompt_io(self.model, self.tok, a.block_name(self.z_layer), self.requests, self.rule)
            return K, H.T
        if self._ctx is None:
            ctx, words = memit_key_contexts(self.requests, self.groups)
            p = next(self.model.parameters())
            need = layerwise_reader_bytes(self.tok, [c.format(w) for c, w in zip(ctx, words)] +
                                          [r.prompt.format(r.subject) for r in self.requests], a.hidden_size, p.dtype)
            budget = float(self.max_gib) * 2**30
            dev = execution_device(self.model, a.block_name(self.first))
            if dev.type == "cuda":  # the streams live on the GPU: leave room for the model's own work
                budget = min(budget, 0.25 * torch.cuda.mem_get_info(dev)[0])
            if need > budget:
                log.info("memit keys: a full forward per layer (the reused streams would take %.1f GiB > %.1f GiB: "
                         "keys_reuse_max_gib=%s, on a GPU at most a quarter of its free memory)", need / 2**30,
                         budget / 2**30, self.max_gib)
                self.reuse = False
                return self.read(layer)
            self._ctx = LayerwiseReader(self.model, self.tok, a, ctx, words, self.first, self.rule,
                                        attention=self.attention)
            self._bare = LayerwiseReader(self.model, self.tok, a, [r.prompt for r in self.requests],
                                         [r.subject for r in self.requests], self.first, self.rule,
                                         attention=self.attention)
        k = self._ctx.module_inputs(layer, a.rewrite_name(layer))
        K = mean_over_template_groups(k, len(self.requests), [len(g) for g in self.groups])
        H = self._bare.block_outputs(layer, self.z_layer)
        return K, H.T
