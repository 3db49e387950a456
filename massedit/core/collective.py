"""Collective operations for editors that split their work across processes (ranks), without Lightning.

An editor that can share its work (MEMIT's z optimisation and keys, MEND's pseudo-gradients) takes a
:class:`Collective`: ``rank``/``world_size`` plus a handful of operations. The plain-torch default is
:class:`SingleProcess` (every operation is the identity), so the math runs unchanged in one process; the Lightning
glue (:class:`massedit.lightning_modules.distributed.StrategyCollective`) implements the same interface with the
running Trainer's strategy (``trainer.strategy.all_gather`` / ``reduce`` / ``broadcast`` / ``barrier``).

Every rank must call the same operations in the same order (they are collectives); a rank with nothing to
contribute still calls them (with an empty share).
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class Collective(Protocol):
    """What an editor may ask of the group of processes it runs in."""

    rank: int
    world_size: int

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects; tensors keep their bits)."""
        ...

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a new tensor on ``tensor``'s device; the input is not modified)."""
        ...

    def barrier(self, name: str = "") -> None:
        ...


class SingleProcess:
    """The one-process :class:`Collective`: rank 0 of 1, every operation returns its input."""

    rank = 0
    world_size = 1

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone()

    def barrier(self, name: str = "") -> None:
        return None


def as_collective(collective: Collective | None) -> Collective:
    return collective if collective is not None else SingleProcess()


def is_distributed(collective: Collective | None) -> bool:
    return collective is not None and int(collective.world_size) > 1


def balanced_shards(weights: Sequence[float], world_size: int) -> list[list[int]]:
    """Split item indices ``0..n-1`` into ``world_size`` shards of near-equal total weight.

    Greedy longest-processing-time: items in decreasing weight (ties: lower index first) go to the currently
    lightest shard (ties: lower rank). Deterministic, so every rank computes the same split without talking;
    each shard is returned in increasing index order. Shards may be empty when there are fewer items than ranks.
    """
    world_size = max(1, int(world_size))
    shards: list[list[int]] = [[] for _ in range(world_size)]
    load = [0.0] * world_size
    for i in sorted(range(len(weights)), key=lambda j: (-float(weights[j]), j)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        shards[r].append(i)
        load[r] += float(weights[i])
    return [sorted(s) for s in shards]


def gather_by_index(collective: Collective, mine: Sequence[int], values: Sequence[Any], n: int) -> list[Any]:
    """Every rank's ``values`` (one per index in its ``mine``) put back in index order: a list of length ``n``."""
    parts = collective.all_gather_object([(int(i), v) for i, v in zip(mine, values)])
    out: list[Any] = [None] * n
    seen = 0
    for part in parts:
        for i, v in part:
            out[i] = v
            seen += 1
    if seen != n or any(v is None for v in out):
        raise RuntimeError(f"gather_by_index: {seen} values for {n} items (shards do not cover the items once each)")
    return out


def broadcast_tensors(collective: Collective, tensors: dict[str, torch.Tensor] | None, src: int = 0,
                      device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Rank ``src``'s ``{name: tensor}`` on every rank, bit for bit (names/shapes/dtypes travel as one object, the
    values as sums with zeros from the other ranks: ``x + 0 = x`` exactly). Tensors land on ``device``
    (default: where they were on ``src``, else the CPU)."""
    if not is_distributed(collective):
        return dict(tensors or {})
    meta = collective.broadcast_object(
        [(k, tuple(v.shape), str(v.dtype), str(v.device)) for k, v in (tensors or {}).items()]
        if collective.rank == src else None, src=src)
    out = {}
    for name, shape, dtype, dev in meta:
        dt = getattr(torch, dtype.replace("torch.", ""))
        target = torch.device(device) if device is not None else (torch.device(dev) if collective.rank == src
                                                                  else torch.device("cpu"))
        if collective.rank == src:
            t = tensors[name].detach().to(target)
        else:
            t = torch.zeros(shape, dtype=dt, device=target)
        out[name] = collective.all_reduce_sum(t)
    return out


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of names, shapes, dtypes and exact values (bit for bit)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def agree_on_tensors(collective: Collective | None, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` when every rank holds bit-identical ones (compared by :func:`tensors_digest`), else rank 0's on
    every rank (with a warning): ranks that solved the same system must write the same weights."""
    if not is_distributed(collective):
        return tensors
    digests = collective.all_gather_object(tensors_digest(tensors))
    if len(set(digests)) == 1:
        return tensors
    import logging

    logging.getLogger(__name__).warning("ranks computed different deltas (digests %s); using rank 0's everywhere",
                                        [d[:8] for d in digests])
    return broadcast_tensors(collective, tensors, src=0)


def gather_columns(collective: Collective | None, mine: Sequence[int], block: torch.Tensor, n: int) -> torch.Tensor:
    """``[rows, n]`` from every rank's ``block [rows, len(mine)]`` (column ``j`` of a rank's block is item
    ``mine[j]``): each rank fills its columns of a zero matrix and the matrices are summed, which is exact (every
    column is non-zero on one rank only). A rank with no items passes ``[rows, 0]`` of the same dtype. One process:
    ``block`` itself (``mine`` must be ``0..n-1``)."""
    if not is_distributed(collective):
        return block
    full = torch.zeros(block.shape[0], n, dtype=block.dtype, device=block.device)
    if len(mine):
        full[:, torch.as_tensor(list(mine), dtype=torch.long, device=block.device)] = block
    return collective.all_reduce_sum(full)
