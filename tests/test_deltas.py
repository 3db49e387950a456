"""Delta files: save/load round trip, apply/revert bit-identical, shape checks, low precision."""
import pytest
import torch

from massedit.core.adapters import get_adapter
from massedit.core.deltas import (DeltaShapeError, apply_deltas, deltas_applied, load_deltas, revert_deltas,
                                  save_deltas)
from massedit.testing import tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_revert_bit_identical(tmp_path, dtype):
    model, _ = tiny_model("gpt2", dtype=dtype)
    a = get_adapter(model)
    name = a.rewrite_weight_name(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deltas = {name: torch.randn_like(a.rewrite_weight(1), dtype=torch.float32) * 1e-2}
    path = save_deltas(tmp_path / "d.safetensors", deltas, {"method": "test"})
    loaded = load_deltas(path)
    torch.testing.assert_close(loaded[name], deltas[name])
    backup = apply_deltas(model, loaded)
    after = model.state_dict()
    assert not torch.equal(after[name], before[name])
    expected = (before[name].float() + deltas[name]).to(dtype)
    assert torch.equal(after[name], expected)
    for k in before:
        if k != name:
            assert torch.equal(after[k], before[k]), k
    revert_deltas(model, backup)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_context_manager_and_errors(tmp_path):
    model, _ = tiny_model("llama")
    a = get_adapter(model)
    name = a.rewrite_weight_name(0)
    w0 = a.rewrite_weight(0).clone()
    with deltas_applied(model, {name: torch.ones_like(w0)}):
        assert torch.equal(a.rewrite_weight(0), w0 + 1)
    assert torch.equal(a.rewrite_weight(0), w0)
    with pytest.raises(DeltaShapeError, match="shape"):
        apply_deltas(model, {name: torch.ones(3, 3)})
    with pytest.raises(DeltaShapeError, match="unknown parameter"):
        apply_deltas(model, {"nope.weight": torch.ones(3)})
    with pytest.raises(FileNotFoundError):
        load_deltas(tmp_path / "missing.safetensors")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    from massedit.core.io import atomic_path, atomic_write_json

    target = tmp_path / "x.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash")
    assert target.read_text().strip().startswith("{") and '"a": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
