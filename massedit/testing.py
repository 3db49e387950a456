"""Tiny random-weight models and tokenizers of every supported family, built offline from configs.

Used by the test-suite and benchmarks; no downloads. Also small in-memory statistics providers for tests
(:func:`corpus_second_moments`, :func:`reference_stats_provider`). ``tiny_model(family)`` returns ``(model, tok)``
with a byte-level BPE tokenizer (GPT-2 style) or, for ``llama`` with ``sentencepiece=True``, a
SentencePiece-style (Metaspace, BOS-adding) tokenizer like Llama-2's.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import torch

FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama")

_CORPUS = """
The Eiffel Tower is located in the city of Paris. The Colosseum is located in Rome.
Danielle Darrieux, a native French speaker, was born in Bordeaux. Toko Yasuda plays the guitar.
The mother tongue of Thomas Joannes Stieltjes is Dutch. Apple A5 was created by Apple.
Windows Server 2003 is a product of Microsoft. The Swiss Football Association is affiliated with FIFA.
In Saint Pierre and Miquelon, the language spoken is French. The native language of Claude Rich is French.
Michael Jordan plays basketball. Lionel Messi plays soccer. The capital of Japan is Tokyo.
BMW, NATO, Chinese, Indonesian, piano, guitar, English, German, Italian, Spanish, London, Berlin.
What is the product made by UniFirst? uniform. nq question: who sang nice day for a white wedding? Billy Idol.
""" * 3


@functools.lru_cache(maxsize=4)
def _tokenizer_json(kind: str, vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "bpe":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:  # sentencepiece-like: Metaspace with a dummy prefix, BOS added by the post-processor
        tk = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        alphabet = sorted(set(_CORPUS.replace(" ", "▁")) | set("▁?.,'0123456789"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet)
    tk.train_from_iterator([_CORPUS], trainer=trainer)
    return tk.to_str()


def tiny_tokenizer(kind: str = "bpe", vocab_size: int = 400):
    """A small trained tokenizer: ``bpe`` (GPT-2 byte-level, no BOS) or ``sentencepiece`` (Llama-like, BOS)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer.from_str(_tokenizer_json(kind, vocab_size))
    if kind == "bpe":
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    else:
        bos = tk.token_to_id("<s>")
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def tiny_config(family: str, vocab_size: int, *, n_layer: int = 4, d: int = 32, m: int = 64, n_pos: int = 128):
    from transformers import GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig

    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=n_pos, n_embd=d, n_layer=n_layer, n_head=4, n_inner=m,
                          bos_token_id=0, eos_token_id=0)
    if family == "gptj":
        return GPTJConfig(vocab_size=vocab_size, n_positions=n_pos, n_embd=d, n_layer=n_layer, n_head=4, n_inner=m,
                          rotary_dim=4, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, max_position_embeddings=n_pos, hidden_size=d, num_hidden_layers=n_layer,
                             num_attention_heads=4, intermediate_size=m, bos_token_id=0, eos_token_id=0,
                             tie_word_embeddings=False)
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=n_pos, hidden_size=d, num_hidden_layers=n_layer,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=m, tie_word_embeddings=True,
                           bos_token_id=1, eos_token_id=2)
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def tiny_model(family: str = "gpt2", *, seed: int = 0, tokenizer: str | None = None, dtype=torch.float32, **cfg_kwargs):
    """``(model, tokenizer)``: a random-weight model of ``family`` (eval mode, grads off) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    kind = tokenizer or ("sentencepiece" if family == "llama" else "bpe")
    tok = tiny_tokenizer(kind)
    torch.manual_seed(seed)
    config = tiny_config(family, len(tok), **cfg_kwargs)
    if kind == "sentencepiece":
        config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    else:
        config.bos_token_id = config.eos_token_id = tok.eos_token_id
    model = AutoModelForCausalLM.from_config(config)
    model.to(dtype).eval().requires_grad_(False)
    return model, tok


# ------------------------------------------------------------------------------------- statistics for tests
@torch.no_grad()
def corpus_second_moments(model, tok, layers: Sequence[int], texts: Sequence[str], max_length: int = 256,
                          batch_size: int = 8) -> dict[int, torch.Tensor]:
    """``C_l = (1/N) Σ_t k_t k_tᵀ`` over every non-padding token of ``texts`` (REFERENCE_SPEC §0.6), float32.

    A small in-memory version of the statistics for tests and tiny models; real runs use
    :mod:`massedit.stats` (cached, large corpora).
    """
    from massedit.core.adapters import get_adapter
    from massedit.core.nethook import TraceDict
    from massedit.core.tokenization import tokenize_batch

    adapter = get_adapter(model)
    names = {adapter.rewrite_name(l): int(l) for l in layers}
    device = next(model.parameters()).device
    m = adapter.mlp_inner_size
    acc = {l: torch.zeros(m, m, dtype=torch.float64, device=device) for l in names.values()}
    n = 0
    for s in range(0, len(texts), batch_size):
        enc = tokenize_batch(tok, texts[s : s + batch_size], device=device, max_length=max_length)
        mask = enc["attention_mask"].bool()
        with TraceDict(model, list(names), retain_input=True, retain_output=False, stop=True) as td:
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])  # as layer_stats: no token types
        for name, l in names.items():
            k = td[name].input[mask].double()
            acc[l] += k.T @ k
        n += int(mask.sum())
    return {l: (a / n).float().cpu() for l, a in acc.items()}


def reference_stats_provider(root):
    """A stats provider reading C from reference-layout npz files below ``root`` (the shared fixtures)."""
    from massedit.core.adapters import get_adapter
    from massedit.stats.reference import find_reference_stats, load_reference_second_moment

    root = Path(root)

    def provide(model, tok, layers):
        adapter = get_adapter(model)
        out = {}
        for layer in layers:
            path = find_reference_stats(root, adapter.rewrite_name(layer))
            if path is None:
                raise FileNotFoundError(f"no reference statistics for {adapter.rewrite_name(layer)} below {root}")
            out[int(layer)] = load_reference_second_moment(path)
        return out

    return provide


# ------------------------------------------------------------------------------- closed-form checks for tests
def rome_direction_error(delta_out_in: torch.Tensor, k_star: torch.Tensor, C: torch.Tensor) -> float:
    """How far a ROME update ``ΔW [d, m]`` is from ``r uᵀ`` with ``u ∝ C⁻¹k*`` (REFERENCE_SPEC §1.1, §1.3).

    Returns ``‖ΔW (I − ûûᵀ)‖ / ‖ΔW‖`` with ``û = C⁻¹k*/‖C⁻¹k*‖`` solved here in float64: ~0 for a correct
    update, and of order ``sin∠(k*, C⁻¹k*)`` when the editor used ``u = k*`` (or any other direction).
    """
    dW = delta_out_in.double()
    u = torch.linalg.solve(C.double(), k_star.double().reshape(-1))
    u = u / u.norm()
    return float((dW - torch.outer(dW @ u, u)).norm() / dW.norm())


def memit_normal_equation_error(delta_out_in: torch.Tensor, K: torch.Tensor, E: torch.Tensor, C: torch.Tensor,
                                lam: float, i: int, n_layers: int) -> float:
    """How far a MEMIT layer update ``ΔW [d, m]`` is from solving ``ΔW (λC + KKᵀ) = E_l Kᵀ``, ``E_l = E/(|R| − i)``
    (REFERENCE_SPEC §2.1): the relative residual, from the layer's keys ``K [m, N]`` and residual ``E [d, N]`` only
    (not from the editor's own ``A`` or ``E_l``), so a wrong λC term or a missing ``1/(|R| − i)`` shows."""
    dW, K = delta_out_in.double(), K.double()
    E_l = E.double() / (n_layers - i)
    rhs = E_l @ K.T
    return float((dW @ (lam * C.double() + K @ K.T) - rhs).norm() / rhs.norm())
