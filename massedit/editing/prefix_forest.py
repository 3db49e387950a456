"""Rows of token ids laid out as a forest of their shared prefixes, packed into lanes.

Under causal attention a position's states depend only on the tokens up to it, so rows that begin with the same
tokens have the same states there: the target optimisation's rows repeat each context template for every request
(``"The-The-Future-Of-The-. {subject} ..."``), and a request's rows repeat its subject. :func:`build_forest` keeps one
slot per distinct prefix (a node of the rows' token trie), packs the nodes into lanes of a bounded width, each lane
closed under ancestors, and gives each slot the attention pattern of its row: it sees exactly its ancestors and
itself, at its true position (its depth). A forward of the lanes then computes every row's states at every position,
each distinct prefix once; on the SmolLM2 benchmark's 20 CounterFact records the 140 rows' 1,661 positions before the
subject token are 566 distinct prefixes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from massedit.core.nethook import TraceDict
from massedit.core.tokenization import token_type_ids_like


@dataclass
class PrefixForest:
    """Lanes of distinct prefixes: ``ids``/``positions`` ``[lanes, width]``, ``allowed`` ``[lanes, width, width]``
    (slot j sees slot i: i is j or one of its ancestors; an empty slot sees itself only), and where each row's
    positions are: row r's position p is slot ``slots[r][p]`` of lane ``lane[r]``. ``source[l][j]`` is one
    ``(row, position)`` of slot j of lane l (None for an empty slot)."""

    ids: torch.Tensor
    positions: torch.Tensor
    allowed: torch.Tensor
    lane: list[int]
    slots: list[list[int]]
    source: list[list[tuple[int, int] | None]]
    n_slots: int

    @property
    def n_lanes(self) -> int:
        return int(self.ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    def index(self, rows: Sequence[int], positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(lane, slot) tensors of the given (row, position) pairs."""
        lanes = [self.lane[r] for r in rows]
        slots = [self.slots[r][p] for r, p in zip(rows, positions)]
        return torch.tensor(lanes, dtype=torch.long), torch.tensor(slots, dtype=torch.long)


def build_forest(rows: Sequence[Sequence[int]], lengths: Sequence[int], width: int, pad_id: int) -> PrefixForest:
    """The first ``lengths[r]`` tokens of every row as a :class:`PrefixForest` of lanes of ``width`` slots (at least
    the longest row). Rows are placed in lexicographic order, so rows sharing a prefix share a lane where they fit;
    a row that does not fit the current lane opens a new one with its whole path (its ancestors are repeated there).
    Rows of length 0 have no slots."""
    if len(rows) != len(lengths):
        raise ValueError(f"{len(rows)} rows but {len(lengths)} lengths")
    for r, (row, n) in enumerate(zip(rows, lengths)):
        if not 0 <= n <= len(row):
            raise ValueError(f"row {r}: length {n} outside its {len(row)} tokens")
    width = max([int(width)] + [int(n) for n in lengths])
    trie: dict[tuple[int, int], int] = {}   # (parent node, token) -> node; the root is -1
    paths = []
    for row, n in zip(rows, lengths):
        node, path = -1, []
        for t in row[:n]:
            node = trie.setdefault((node, int(t)), len(trie))
            path.append(node)
        paths.append(path)
    order = sorted(range(len(rows)), key=lambda r: (list(rows[r][:lengths[r]]), r))
    lanes: list[dict[int, int]] = []      # node -> slot, per lane
    lane_nodes: list[list[tuple[int, int, int, int]]] = []  # per lane: (node, parent slot, row, position)
    lane_of, slots_of = [0] * len(rows), [[] for _ in rows]
    for r in order:
        path = paths[r]
        if not path:
            continue
        cur = lanes[-1] if lanes else None
        new = [p for p, node in enumerate(path) if cur is None or node not in cur]
        if cur is None or len(cur) + len(new) > width:
            lanes.append({})
            lane_nodes.append([])
            cur, new = lanes[-1], list(range(len(path)))
        for p in new:
            parent = cur[path[p - 1]] if p else -1
            cur[path[p]] = len(cur)
            lane_nodes[-1].append((path[p], parent, r, p))
        lane_of[r] = len(lanes) - 1
        slots_of[r] = [cur[node] for node in path]
    L = max(1, len(lanes))
    ids = torch.full((L, width), int(pad_id), dtype=torch.long)
    positions = torch.zeros((L, width), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool)[None].repeat(L, 1, 1)
    source: list[list[tuple[int, int] | None]] = [[None] * width for _ in range(L)]
    for li, nodes in enumerate(lane_nodes):
        for j, (_node, parent, r, p) in enumerate(nodes):
            ids[li, j] = int(rows[r][p])
            positions[li, j] = p
            if parent >= 0:
                allowed[li, j] |= allowed[li, parent]
            source[li][j] = (r, p)
    return PrefixForest(ids, positions, allowed, lane_of, slots_of, source, sum(len(n) for n in lane_nodes))


@torch.no_grad()
def forest_forward(model, adapter, tok, forest: PrefixForest, names: Sequence[str], max_slots: int, *,
                   retain_input: bool = False) -> Iterator[tuple[int, TraceDict]]:
    """The model's own forward on the forest's lanes, in chunks of at most ``max_slots`` slots (at least one lane),
    each lane's ancestor pattern passed as a 4D mask (:meth:`ArchAdapter.attention_bias`) and its depths as position
    ids; the forward stops after the last of ``names``. Yields ``(first lane of the chunk, traces of names)``."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    per = max(1, int(max_slots) // forest.width)
    for c in range(0, forest.n_lanes, per):
        ids = forest.ids[c : c + per].to(device)
        mask = adapter.attention_bias(forest.allowed[c : c + per].to(device), dtype)
        with TraceDict(model, names, retain_input=retain_input, retain_output=True, stop=True) as td:
            model(input_ids=ids, attention_mask=mask, position_ids=forest.positions[c : c + per].to(device),
                  use_cache=False, **token_type_ids_like(tok, ids))
        yield c, td
