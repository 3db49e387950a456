"""Evaluation formulas pinned on hand-computed examples (REFERENCE_SPEC §4.3–4.6)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from massedit.evaluation import formulas as F
from massedit.evaluation import text as T
from massedit.evaluation.aggregate import counterfact_case_metrics, summarize, zsre_case_metrics
from massedit.evaluation.metrics import GenerationMetric, PromptScoreMetric
from massedit.evaluation.scoring import Branch, Group, branch_scores, pack_groups


def test_harmonic_mean():
    assert F.harmonic_mean([50.0, 100.0, 100.0]) == pytest.approx(75.0)  # 3 / (1/50 + 1/100 + 1/100)
    assert F.harmonic_mean([98.9, 88.6, 73.7]) == pytest.approx(85.8, abs=0.05)  # MEMIT GPT-J row, §7.1
    assert F.harmonic_mean([0.0, 100.0, 90.0]) == 0.0
    assert F.harmonic_mean([10.0, None, 20.0]) is None


def test_success_and_magnitude():
    nll_new = np.array([-math.log(0.6), -math.log(0.1)])
    nll_true = np.array([-math.log(0.2), -math.log(0.3)])
    assert F.success_new(nll_new, nll_true).tolist() == [1.0, 0.0]
    assert F.success_true(nll_new, nll_true).tolist() == [0.0, 1.0]
    assert F.magnitude_new(nll_new, nll_true) == pytest.approx([0.4, -0.2])
    assert F.magnitude_true(nll_new, nll_true) == pytest.approx([-0.4, 0.2])
    # ties are neither success
    assert F.success_new([1.0], [1.0]).tolist() == [0.0] and F.success_true([1.0], [1.0]).tolist() == [0.0]


def test_mean_and_ci95_population_std():
    m, ci, n = F.mean_and_ci95([1.0, 0.0, 1.0, 1.0, float("nan")])
    assert n == 4 and m == pytest.approx(0.75)
    assert ci == pytest.approx(1.96 * math.sqrt(0.1875) / 2)  # population std sqrt(.75*.25)
    assert F.mean_and_ci95([float("nan")]) == (None, None, 0)


def test_mean_token_nll_multi_token():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    # target tokens 0 then 1: -(log .5 + log .8)/2
    assert F.mean_token_nll(logp, torch.tensor([0, 1])).item() == pytest.approx(-(math.log(0.5) + math.log(0.8)) / 2)
    assert bool(F.all_tokens_correct(logp, torch.tensor([0, 1])))
    assert not bool(F.all_tokens_correct(logp, torch.tensor([0, 2])))


def test_pack_groups_positions_and_branch_scores():
    # prompt of 3 tokens; branch A: target (7, 8) fed input (7,); branch B: single-token target (9,)
    g = Group(prompt=(1, 2, 3), branches=[Branch((7,), (7, 8), [(0, 0, 0, 0)]), Branch((), (9,), [(0, 0, 0, 1)])])
    b = pack_groups([g], pad_id=0, packed=True)
    assert b.input_ids.tolist() == [[1, 2, 3, 7]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3]]
    # scored tokens A0, A1, B0 -> distinct positions 2, 3 (A0 and B0 are both predicted from the prompt's end)
    assert b.pos.tolist() == [2, 3] and b.sel.tolist() == [0, 1, 0]
    assert b.target.tolist() == [7, 8, 9] and b.branch.tolist() == [0, 0, 1]
    m = b.attention_mask[0, 0]
    assert m[3].tolist() == [True, True, True, True]  # branch token sees prompt + itself
    # a second branch with inputs must not see the first branch
    g2 = Group(prompt=(1, 2), branches=[Branch((5,), (5, 6), []), Branch((7,), (7, 8), [])])
    m2 = pack_groups([g2], 0).attention_mask[0, 0]
    assert m2[3].tolist() == [True, True, False, True]
    assert pack_groups([g2], 0).position_ids.tolist() == [[0, 1, 2, 2]]
    # plain mode: one row per branch
    assert pack_groups([g], 0, packed=False).input_ids.tolist() == [[1, 2, 3, 7], [1, 2, 3, 0]]
    # scores: logits at the 2 distinct positions, vocab 10
    probs = torch.full((2, 10), 0.05)
    probs[0, 7], probs[0, 9] = 0.4, 0.3   # position 2: predicts A's first token (7) and B's only token (9)
    probs[1, 8] = 0.2                      # position 3: A's second token (8)
    probs = probs / probs.sum(1, keepdim=True)
    s = branch_scores(torch.log(probs), b)
    expect_a = -(math.log(probs[0, 7]) + math.log(probs[1, 8])) / 2
    assert s["nll"][0].item() == pytest.approx(expect_a, rel=1e-6)
    assert s["nll"][1].item() == pytest.approx(-math.log(probs[0, 9]), rel=1e-6)
    # argmax: position 2 -> 7 (A ok, B wrong), position 3 -> 8 (ok)
    assert s["all_correct"].tolist() == [1.0, 0.0] and s["n_correct"].tolist() == [2.0, 0.0] and s["n_tok"].tolist() == [2.0, 1.0]


def test_prefix_tree_shares_prefixes_across_prompts_and_splits_rows():
    ga = Group(prompt=(1, 2, 3), branches=[Branch((), (9,), [(0, 0, 0, 0)])])
    gb = Group(prompt=(1, 2, 4, 5), branches=[Branch((6,), (6, 7), [(1, 0, 0, 0)])])
    b = pack_groups([ga, gb], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]]          # "1 2" computed once for both prompts
    assert b.position_ids.tolist() == [[0, 1, 2, 2, 3, 4]]
    m = b.attention_mask[0, 0].int().tolist()
    assert m[3] == [1, 1, 0, 1, 0, 0] and m[5] == [1, 1, 0, 1, 1, 1]  # node "4" never sees the other prompt's "3"
    assert [(r, p) for r, p in zip(b.row.tolist(), b.pos.tolist(), strict=True)] == [(0, 2), (0, 4), (0, 5)]
    # a row budget of 4 tokens: the second sequence starts a new row (its prefix is recomputed there)
    b4 = pack_groups([ga, gb], pad_id=0, row_tokens=4)
    assert b4.input_ids.tolist() == [[1, 2, 3, 0, 0], [1, 2, 4, 5, 6]]
    assert b4.attention_mask[0, 0, 3].int().tolist() == [0, 0, 0, 1, 0]  # padding sees itself only
    assert [(r, p) for r, p in zip(b4.row.tolist(), b4.pos.tolist(), strict=True)] == [(0, 2), (1, 3), (1, 4)]


def test_counterfact_case_metrics_hand_example():
    p = lambda new, true, cn=False, ct=False: {"nll_new": -math.log(new), "nll_true": -math.log(true), "correct_new": cn, "correct_true": ct}
    prompts = {
        0: {0: p(0.5, 0.1, cn=True)},
        1: {0: p(0.2, 0.3), 1: p(0.4, 0.1, cn=True)},
        2: {0: p(0.1, 0.6, ct=True), 1: p(0.3, 0.2), 2: p(0.05, 0.5, ct=True)},
    }
    m = counterfact_case_metrics(prompts)
    assert m["efficacy_success"] == 1.0 and m["efficacy_magnitude"] == pytest.approx(0.4)
    assert m["paraphrase_success"] == 0.5 and m["paraphrase_magnitude"] == pytest.approx(((0.2 - 0.3) + (0.4 - 0.1)) / 2)
    assert m["neighborhood_success"] == pytest.approx(2 / 3)
    assert m["neighborhood_magnitude"] == pytest.approx(((0.6 - 0.1) + (0.2 - 0.3) + (0.5 - 0.05)) / 3)
    assert m["efficacy_acc"] == 1.0 and m["paraphrase_acc"] == 0.5 and m["neighborhood_acc"] == pytest.approx(2 / 3)


def test_summarize_units_score_and_ci():
    cases = [
        {"efficacy_success": 1.0, "paraphrase_success": 0.5, "neighborhood_success": 1.0},
        {"efficacy_success": 1.0, "paraphrase_success": 1.0, "neighborhood_success": 0.0},
    ]
    names = ("score", "efficacy_success", "paraphrase_success", "neighborhood_success", "consistency")
    s, ci, n = summarize(cases, names, "counterfact")
    assert s["efficacy_success"] == 100.0 and s["paraphrase_success"] == 75.0 and s["neighborhood_success"] == 50.0
    assert s["score"] == pytest.approx(3 / (1 / 100 + 1 / 75 + 1 / 50))
    assert ci["paraphrase_success"] == pytest.approx(100 * 1.96 * 0.25 / math.sqrt(2))
    assert s["consistency"] is None and n["consistency"] == 0 and ci["score"] is None


def test_zsre_token_accuracy():
    # rewrite: 3 tokens, 2 correct; paraphrase: 3 tokens, 0 correct; neighbourhood: two answer tokens, 1 correct
    prompts = {0: {0: {"n_correct_new": 2, "n_tok_new": 3}}, 1: {0: {"n_correct_new": 0, "n_tok_new": 3}},
               2: {0: {"n_correct_new": 1, "n_tok_new": 2}}}
    m = zsre_case_metrics(prompts)
    assert m["efficacy_acc"] == pytest.approx(2 / 3) and m["paraphrase_acc"] == 0.0 and m["neighborhood_acc"] == 0.5
    s, _, _ = summarize([m, {"efficacy_acc": 1.0, "paraphrase_acc": 1.0, "neighborhood_acc": 0.5}],
                        ("score", "efficacy_acc", "paraphrase_acc", "neighborhood_acc"), "zsre")
    assert s["efficacy_acc"] == pytest.approx(100 * (2 / 3 + 1) / 2) and s["score"] is None
    s2, _, _ = summarize([m], ("score", "efficacy_acc", "paraphrase_acc", "neighborhood_acc"), "zsre", zsre_score=True)
    assert s2["score"] == 0.0  # paraphrase 0 -> harmonic mean 0


def test_ngram_entropy_hand_example():
    # tokens a b a b: bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert T.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert T.fluency(["a b a b", "a b c"]) == pytest.approx(((2 / 3 * h2 + 4 / 3) / 2 + (2 / 3 * 1.0 + 0) / 2) / 2)
    assert T.ngram_entropy("word") == 0.0  # no bigrams


def test_word_tokenizer_splits_punctuation():
    toks = T.word_tokenize("Paris is big. It's nice, isn't it?")
    assert toks[:4] == ["Paris", "is", "big", "."]
    assert "," in toks and "?" in toks and "Paris" in toks


def test_tfidf_similarity_hand_example_and_backends():
    vocab, idf = {"paris": 0, "rome": 1}, np.array([1.0, 2.0])
    # a: counts [2, 1] * idf = [2, 2]; b: [0, 1] * idf = [0, 2]; cosine = 4 / (sqrt(8) * 2)
    for backend in ("numpy", "sklearn"):
        if backend == "sklearn":
            pytest.importorskip("sklearn")
        vec = T.make_tfidf_vectorizer(vocab, idf, backend=backend)
        assert T.tfidf_similarity("Paris paris Rome!", "rome", vec) == pytest.approx(1 / math.sqrt(2))
        assert T.tfidf_similarity("London", "rome", vec) == 0.0
    pytest.importorskip("sklearn")
    texts = ["the cat sat on the mat", "dogs and cats", "a mat of cats and dogs sat"]
    a = T.make_tfidf_vectorizer(None, None, texts, backend="numpy")
    b = T.make_tfidf_vectorizer(None, None, texts, backend="sklearn")
    assert T.tfidf_similarity(texts[0], texts[2], a) == pytest.approx(T.tfidf_similarity(texts[0], texts[2], b))


def test_consistency_scorer_files(tmp_path):
    snippets = [{"relation_id": "P1", "target_id": "Q1", "samples": [{"name": "x", "text": "rome rome"}, {"name": "y", "text": "paris"}]}]
    (tmp_path / "s.json").write_text(json.dumps(snippets))
    (tmp_path / "v.json").write_text(json.dumps({"paris": 0, "rome": 1}))
    np.save(tmp_path / "idf.npy", np.array([1.0, 2.0]))
    sc = T.ConsistencyScorer(tmp_path / "s.json", tmp_path / "idf.npy", tmp_path / "v.json", backend="numpy")
    # generated "paris" vs snippets "rome rome paris": [1,0] vs [1,4] -> 1/sqrt(17)
    assert sc(["paris"], "P1", "Q1") == pytest.approx(1 / math.sqrt(17))
    assert math.isnan(sc(["paris"], "P1", "Q2"))  # no snippets for that object
    with pytest.raises(ValueError, match="record 0"):
        (tmp_path / "bad.json").write_text(json.dumps([{"relation_id": "P1"}]))
        T.ConsistencyScorer(tmp_path / "bad.json")


def test_metrics_dedupe_duplicated_rows():
    m = PromptScoreMetric()
    keys = torch.tensor([[1, 0, 0, 0], [0, 2, 1, 1], [1, 0, 0, 0]])
    vals = torch.tensor([[1.5, 1, 2, 2], [0.5, 0, 0, 1], [1.5, 1, 2, 2]], dtype=torch.float64)
    m.update(keys, vals)
    m.update(torch.full((1, 4), -1), torch.zeros(1, 4, dtype=torch.float64))  # placeholder row
    out = m.compute()
    assert out["case"].tolist() == [0, 1] and out["nll"].tolist() == [0.5, 1.5] and out["which"].tolist() == [1, 0]
    g = GenerationMetric()
    g.update(torch.tensor([3, 3, 1]), torch.tensor([5.0, 5.0, 4.0]), torch.tensor([0.1, 0.1, float("nan")]))
    out = g.compute()
    assert out["case"].tolist() == [1, 3] and out["fluency"].tolist() == [4.0, 5.0]
