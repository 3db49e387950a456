"""The prefix forest (:func:`build_forest`): each distinct prefix of the rows gets one slot, every slot sees exactly
its ancestors and itself at its depth, and the model's own forward over the forest's lanes gives every row the
states of its own whole-row forward (float64, every family)."""
import pytest
import torch

from massedit.core.adapters import get_adapter
from massedit.core.nethook import Trace
from massedit.editing.prefix_forest import build_forest
from massedit.testing import FAMILIES, tiny_model

ROWS = [[5, 6, 7, 8], [5, 6, 9], [5, 6, 7, 10, 11], [12, 13], [5, 6, 7, 8], [14]]


def test_distinct_prefixes_get_one_slot_and_see_their_ancestors():
    f = build_forest(ROWS, [len(r) for r in ROWS], width=16, pad_id=0)
    distinct = {tuple(r[:p + 1]) for r in ROWS for p in range(len(r))}
    assert f.n_slots == len(distinct) == 10 and f.n_lanes == 1
    for r, row in enumerate(ROWS):
        lane, slots = f.lane[r], f.slots[r]
        assert f.ids[lane, slots].tolist() == row
        assert f.positions[lane, slots].tolist() == list(range(len(row)))
        for p, j in enumerate(slots):  # sees its own row's slots up to p, nothing else
            assert torch.nonzero(f.allowed[lane, j])[:, 0].tolist() == sorted(slots[:p + 1])
    assert f.slots[0] == f.slots[4]  # identical rows share every slot
    for lane in range(f.n_lanes):
        for j in range(f.width):
            src = f.source[lane][j]
            if src is None:  # an empty slot sees itself only
                assert f.allowed[lane, j].nonzero()[:, 0].tolist() == [j]
            else:
                assert f.slots[src[0]][src[1]] == j and f.lane[src[0]] == lane


def test_lanes_bounded_lengths_and_empty_rows():
    f = build_forest(ROWS, [2, 2, 3, 0, 4, 1], width=4, pad_id=0)
    assert f.width == 4 and f.n_lanes >= 2
    assert f.slots[3] == []
    for r, n in enumerate([2, 2, 3, 0, 4, 1]):
        if n:
            assert f.ids[f.lane[r], f.slots[r]].tolist() == ROWS[r][:n]
    wide = build_forest(ROWS, [len(r) for r in ROWS], width=2, pad_id=0)
    assert wide.width == 5  # a row longer than the lane widens it
    with pytest.raises(ValueError, match="row 1: length 4"):
        build_forest(ROWS, [1, 4, 1, 1, 1, 1], width=8, pad_id=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_forward_on_the_forest_equals_each_row(family):
    model, tok = tiny_model(family, dtype=torch.float64)
    a = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    stem = torch.randint(3, 300, (6,), generator=g).tolist()
    rows = [stem + torch.randint(3, 300, (k,), generator=g).tolist() for k in (1, 3, 4, 2)] + [stem[:3]]
    f = build_forest(rows, [len(r) for r in rows], width=12, pad_id=0)  # two lanes: the stem is repeated
    assert f.n_lanes == 2
    block = a.block_name(2)
    with torch.no_grad(), Trace(model, block, retain_output=True, stop=True) as tr:
        model(input_ids=f.ids, attention_mask=a.attention_bias(f.allowed, torch.float64), position_ids=f.positions)
    h = a.block_hidden(tr.output)
    for r, row in enumerate(rows):
        with torch.no_grad(), Trace(model, block, retain_output=True, stop=True) as tr:
            model(input_ids=torch.tensor([row]))
        ref = a.block_hidden(tr.output)[0]
        assert torch.allclose(h[f.lane[r], f.slots[r]], ref, rtol=0, atol=1e-12), (family, r)
