"""Multi-rank editing math without processes: N threads, each a "rank" with its own model copy, talking through an
in-process Collective (same contract as the Lightning one). Fast checks of the sharded MEMIT / MEND math, the
normalisation merge and the samplers; the real 2-process jobs are in tests/test_ddp_jobs.py."""
from __future__ import annotations

import copy
import threading

import pytest
import torch

from massedit.core.collective import (SingleProcess, agree_on_tensors, balanced_shards, broadcast_tensors,
                                      gather_by_index, gather_columns)
from massedit.testing import corpus_second_moments, tiny_model

torch.set_num_threads(1)


class ThreadGroup:
    """``world`` ranks as threads; every collective is a rendezvous on a barrier."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list = [None] * world

    def rank(self, r: int) -> "ThreadCollective":
        return ThreadCollective(self, r)

    def exchange(self, r: int, obj):
        self.barrier.wait()
        self.slots[r] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class ThreadCollective:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world

    def all_gather_object(self, obj):
        return copy.deepcopy(self.group.exchange(self.rank, obj))

    def broadcast_object(self, obj, src=0):
        return copy.deepcopy(self.group.exchange(self.rank, obj)[src])

    def all_reduce_sum(self, tensor):
        parts = self.group.exchange(self.rank, tensor.detach().clone())
        out = parts[0].clone()
        for p in parts[1:]:
            out = out + p.to(out.device)
        return out.to(tensor.device)

    def barrier(self, name=""):
        self.group.barrier.wait()


def run_ranks(world: int, fn):
    """``[fn(collective) of rank 0, ...]`` with every rank in its own thread (exceptions re-raised)."""
    group = ThreadGroup(world)
    out, errors = [None] * world, []

    def work(r):
        try:
            out[r] = fn(group.rank(r))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


# ------------------------------------------------------------------------------------------ primitives
def test_balanced_shards_cover_every_item_once_and_balance_weight():
    w = [5, 1, 1, 1, 1, 1, 4, 2]
    shards = balanced_shards(w, 3)
    assert sorted(i for s in shards for i in s) == list(range(len(w)))
    loads = [sum(w[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(w)
    assert shards == balanced_shards(w, 3)  # deterministic: every rank computes the same split
    assert balanced_shards([1], 2) == [[0], []]  # fewer items than ranks: an empty share
    assert balanced_shards(w, 1) == [list(range(len(w)))]


def test_gathers_and_broadcast_are_exact():
    n = 7
    data = torch.randn(5, n, dtype=torch.float64)

    def fn(c):
        mine = balanced_shards([1] * n, c.world_size)[c.rank]
        full = gather_columns(c, mine, data[:, mine], n)
        objs = gather_by_index(c, mine, [f"item{i}" for i in mine], n)
        got = broadcast_tensors(c, {"a": data * 3} if c.rank == 0 else None)
        return full, objs, got

    for full, objs, got in run_ranks(3, fn):
        assert torch.equal(full, data)
        assert objs == [f"item{i}" for i in range(n)]
        assert torch.equal(got["a"], data * 3)


def test_agree_on_tensors_replaces_a_diverging_rank_by_rank_0():
    def fn(c):
        t = {"w": torch.ones(3) * (1.0 if c.rank == 0 else 1.0 + 1e-7)}
        return agree_on_tensors(c, t)

    a, b = run_ranks(2, fn)
    assert torch.equal(a["w"], b["w"]) and torch.equal(a["w"], torch.ones(3))
    assert agree_on_tensors(SingleProcess(), {"w": torch.zeros(1)})["w"].item() == 0


# ------------------------------------------------------------------------------------------ MEMIT / MEND math
def _memit_setup():
    from massedit.data.requests import EditRequest
    from massedit.editing.hparams import MemitConfig

    model, tok = tiny_model("gpt2", seed=3, dtype=torch.float64)
    reqs = [EditRequest(case_id=i, subject=s, prompt=p, target_new=t) for i, (s, p, t) in enumerate([
        ("Japan", "The capital of {} is", "Rome"), ("Michael Jordan", "{} plays", "soccer"),
        ("Paris", "{} is in", "Italy"), ("The Beatles", "{} came from", "Ohio"),
        ("Mars", "{} is a", "fruit")])]
    hp = MemitConfig(layers=[1, 2], v_loss_layer=3, v_num_grad_steps=5, mom2_update_weight=100.0)
    texts = ["the cat sat on the mat and looked at the dog", "a quick brown fox jumps over the lazy dog today"] * 4
    C = corpus_second_moments(model, tok, hp.layers, texts)
    return model, tok, reqs, hp, C


def test_memit_split_over_ranks_equals_one_process():
    """z, keys and H computed per rank on its share and gathered: the deltas of 1 process (float64: to rounding)."""
    from massedit.editing.memit import apply_memit

    model, tok, reqs, hp, C = _memit_setup()
    groups = [["{}"], ["The weather is nice. {}", "Hello there. {}"]]
    one, _ = apply_memit(model, tok, reqs, hp, groups, C, progress=False)
    copies = [copy.deepcopy(model) for _ in range(2)]
    outs = run_ranks(2, lambda c: apply_memit(copies[c.rank], tok, reqs, hp, groups, C, progress=False,
                                              collective=c)[0])
    for k in one:
        for d in outs:
            assert float((d[k] - one[k]).norm() / one[k].norm()) <= 1e-9
        assert torch.equal(outs[0][k], outs[1][k])  # every rank solved the same system
    for m in copies:  # the models are left as found
        for (n, p), q in zip(m.named_parameters(), model.parameters()):
            assert torch.equal(p, q), n


def test_memit_more_ranks_than_requests():
    from massedit.editing.memit import apply_memit

    model, tok, reqs, hp, C = _memit_setup()
    groups = [["{}"]]
    one, _ = apply_memit(model, tok, reqs[:1], hp, groups, C, progress=False)
    copies = [copy.deepcopy(model) for _ in range(3)]
    outs = run_ranks(3, lambda c: apply_memit(copies[c.rank], tok, reqs[:1], hp, groups, C, progress=False,
                                              collective=c)[0])
    for k in one:
        assert all(float((d[k] - one[k]).norm() / one[k].norm()) <= 1e-9 for d in outs)


def test_mend_pseudo_gradients_all_reduced_equal_one_process():
    from massedit.editing.mend.editor import build_mend_net, mend_deltas
    from massedit.editing.mend.config import MendConfig

    model, tok, reqs, _, _ = _memit_setup()
    torch.manual_seed(0)
    net = build_mend_net(model, MendConfig(rank=8))
    for loss in ("request_sum", "tokens_mean"):
        one = mend_deltas(model, tok, net, reqs, chunk_size=2, concurrent_loss=loss)
        nets, models = [copy.deepcopy(net) for _ in range(2)], [copy.deepcopy(model) for _ in range(2)]
        outs = run_ranks(2, lambda c: mend_deltas(models[c.rank], tok, nets[c.rank], reqs, chunk_size=2,
                                                  concurrent_loss=loss, collective=c))
        for k in one:
            for d in outs:
                assert float((d[k] - one[k]).norm() / one[k].norm()) <= 1e-6, (loss, k)  # fp32 factors and net


def test_running_norm_merged_over_ranks_equals_all_rows():
    from massedit.editing.mend.network import RunningNorm

    torch.manual_seed(1)
    rows = [torch.randn(n, 6) * 3 + 1 for n in (5, 0, 7, 2)]  # step 0: ranks 0/1 get 5/0 rows; step 1: 7/2
    one = RunningNorm(6)
    one.update(torch.cat(rows))

    def fn(c):
        rn = RunningNorm(6)
        rn.collective = c
        rn.update(rows[c.rank])
        rn.update(rows[2 + c.rank])
        return rn

    for rn in run_ranks(2, fn):
        assert float(rn.count) == float(one.count) == 14
        assert torch.allclose(rn.mean, one.mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(rn.std, one.std, rtol=1e-5)


# ------------------------------------------------------------------------------------------ samplers
@pytest.mark.parametrize("shuffle", [False, True])
def test_request_batch_sampler_one_rank_is_a_dataloader_and_ranks_split_batches(shuffle):
    from torch.utils.data import DataLoader

    from massedit.datamodules.requests import RequestBatchSampler, RequestDataset

    n, bs = 11, 4
    dl = DataLoader(list(range(n)), batch_size=bs, shuffle=shuffle, generator=torch.Generator().manual_seed(5))
    plain = [b.tolist() for _ in range(2) for b in dl]  # two epochs
    def loader(rank, world):  # as EditRequestsDataModule builds it
        g = torch.Generator().manual_seed(5)
        s = RequestBatchSampler(n, bs, shuffle=shuffle, generator=g, rank=rank, world_size=world)
        return DataLoader(RequestDataset(list(range(n))), batch_sampler=s, generator=g, collate_fn=lambda b: b)

    one = [[i for i, _ in b] for dl1 in [loader(0, 1)] for _ in range(2) for b in dl1]  # (request, counts) items
    assert one == plain
    per_rank = [[b for dl_r in [loader(r, 3)] for _ in range(2) for b in dl_r] for r in range(3)]
    assert len({len(p) for p in per_rank}) == 1  # the same number of steps on every rank
    for step, batch in enumerate(plain):
        parts = [per_rank[r][step] for r in range(3)]
        real = sorted(i for p in parts for i, (w, _) in p if w)
        assert real == sorted(batch)  # every request of the batch once, over the ranks
        assert all(g == len(batch) for p in parts for _, (_, g) in p)


def test_replacement_sampler_shares_the_draws():
    from torch.utils.data import DataLoader, RandomSampler

    from massedit.datamodules.mend import ReplacementBatchSampler

    n_items, bs, num = 9, 2, 12
    g = torch.Generator().manual_seed(3)
    plain = [b.tolist() for b in DataLoader(list(range(n_items)), batch_size=bs,
                                            sampler=RandomSampler(range(n_items), True, num, generator=g))]
    assert list(ReplacementBatchSampler(n_items, bs, num, seed=3)) == plain
    r0 = list(ReplacementBatchSampler(n_items, bs, num, seed=3, rank=0, world_size=2))
    r1 = list(ReplacementBatchSampler(n_items, bs, num, seed=3, rank=1, world_size=2))
    assert len(r0) == len(r1) == 3 and [b for pair in zip(r0, r1) for b in pair] == plain
    # 5 batches for 2 ranks: rounded up to 3 each
    assert len(ReplacementBatchSampler(n_items, bs, 10, seed=3, rank=1, world_size=2)) == 3


# ------------------------------------------------------------------------------------------ model.device_map
def test_device_map_with_disk_offload_memit_and_rome(tmp_path):
    """A model dispatched by accelerate with the edited layer offloaded to disk (its parameters on ``meta``): MEMIT
    and ROME give the deltas of the plain model, leave it as found, and the applied deltas change what the offloaded
    layer computes exactly as on the plain model."""
    from massedit.core.deltas import apply_deltas, revert_deltas
    from massedit.core.models import ModelConfig, load_model_and_tokenizer
    from massedit.core.placement import is_dispatched, param_storage
    from massedit.editing.hparams import RomeConfig
    from massedit.editing.memit import apply_memit
    from massedit.editing.rome import apply_rome

    model, tok, reqs, hp, _ = _memit_setup()
    model = model.float()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    dmap = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu", "transformer.h.1": "cpu",
            "transformer.h.2": "disk", "transformer.h.3": "disk", "transformer.ln_f": "cpu", "lm_head": "cpu"}
    disp, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path / "m"), device_map=dmap,
                                                   offload_folder=str(tmp_path / "off")))
    plain, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path / "m")))
    name = "transformer.h.2.mlp.c_proj.weight"
    assert is_dispatched(disp) and disp.get_parameter(name).device.type == "meta"
    before = param_storage(disp, name).clone()
    texts = ["the cat sat on the mat and looked at the dog", "a quick brown fox jumps over the lazy dog today"] * 4
    C = corpus_second_moments(plain, tok, [1, 2], texts)
    groups = [["{}"], ["The weather is nice. {}"]]
    d_plain, _ = apply_memit(plain, tok, reqs, hp, groups, C, progress=False)
    d_disp, _ = apply_memit(disp, tok, reqs, hp, groups, C, progress=False)
    rome_hp = RomeConfig(layers=[2], v_loss_layer=3, v_num_grad_steps=4, mom2_adjustment=True)
    r_plain, _ = apply_rome(plain, tok, reqs[:2], rome_hp, ["{}"], C, progress=False)
    r_disp, _ = apply_rome(disp, tok, reqs[:2], rome_hp, ["{}"], C, progress=False)
    for a, b in ((d_plain, d_disp), (r_plain, r_disp)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k
    assert torch.equal(param_storage(disp, name), before)  # left as found
    ids = tok(["The capital of Japan is"], return_tensors="pt")["input_ids"]
    backup_p, backup_d = apply_deltas(plain, d_plain), apply_deltas(disp, d_disp)
    with torch.no_grad():
        assert torch.allclose(disp(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-6)
    revert_deltas(plain, backup_p)
    revert_deltas(disp, backup_d)
    assert torch.equal(param_storage(disp, name), before)
