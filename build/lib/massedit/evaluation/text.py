"""Generation-text metrics: fluency (n-gram entropy) and consistency (TF-IDF cosine) — REFERENCE_SPEC §4.4.

Word tokenisation: ``nltk.word_tokenize`` (the reference's) when nltk and its ``punkt``/``punkt_tab`` data are
installed. Without the data (offline machines) the fallback is what ``word_tokenize`` does internally with a
simple sentence splitter instead of Punkt: split sentences at ``[.!?]`` followed by whitespace, then NLTK's
Treebank word tokenizer (``NLTKWordTokenizer``) per sentence; without nltk at all a regex approximation of it.
:func:`word_tokenizer_name` says which one is active (it is recorded in ``summary.json``).
"""
from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

NGRAM_NS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")
_REGEX_WORD = re.compile(r"\w+(?:'\w+)?|n't|'\w+|[^\w\s]")


@functools.lru_cache(maxsize=1)
def _tokenizer() -> tuple[str, Callable[[str], list[str]]]:
    try:
        import nltk
    except ImportError:
        return "regex", lambda s: [t for sent in _SENT_SPLIT.split(s) for t in _REGEX_WORD.findall(sent)]
    try:
        nltk.word_tokenize("Probe. Sentence two.")
        return "nltk.word_tokenize", nltk.word_tokenize
    except LookupError:
        from nltk.tokenize import NLTKWordTokenizer

        tb = NLTKWordTokenizer()
        return "nltk-treebank+regex-sentences", lambda s: [t for sent in _SENT_SPLIT.split(s) if sent for t in tb.tokenize(sent)]


def word_tokenizer_name() -> str:
    return _tokenizer()[0]


def word_tokenize(text: str) -> list[str]:
    return _tokenizer()[1](text)


def ngram_freqs(tokens: Sequence[str], n: int) -> np.ndarray:
    """Relative frequencies of the distinct n-grams of ``tokens`` (``nltk.FreqDist(nltk.ngrams(...))``)."""
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    f = np.array(list(counts.values()), dtype=np.float64)
    return f / f.sum() if f.size else f


def entropy_bits(freqs: np.ndarray) -> float:
    """``H = -Σ f log2 f`` (0 for an empty distribution)."""
    return float(np.sum(-freqs * np.log(freqs) / np.log(2))) if freqs.size else 0.0


def ngram_entropy(text: str, ns: Sequence[int] = NGRAM_NS, weights: Sequence[float] = NGRAM_WEIGHTS) -> float:
    """Weighted n-gram entropy of one text: arithmetic mean of ``w_n·H_n``, i.e. ``H2/3 + 2·H3/3`` (§4.4)."""
    tokens = word_tokenize(text)
    return float(np.mean([w * entropy_bits(ngram_freqs(tokens, n)) for n, w in zip(ns, weights)]))


def fluency(texts: Sequence[str]) -> float:
    """Per-case fluency: arithmetic mean of :func:`ngram_entropy` over the case's generated texts (§4.4)."""
    return float(np.mean([ngram_entropy(t) for t in texts])) if texts else float("nan")


# ------------------------------------------------------------------------------------------ consistency
_TOKEN_PATTERN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn TfidfVectorizer default


class NumpyTfidf:
    """scikit-learn ``TfidfVectorizer()`` defaults in numpy: lowercase, ``\\b\\w\\w+\\b`` tokens, raw term
    counts × idf, rows L2-normalised. Used only when scikit-learn is not installed."""

    def __init__(self, vocabulary: dict[str, int], idf: np.ndarray):
        self.vocabulary_ = dict(vocabulary)
        self.idf_ = np.asarray(idf, dtype=np.float64)

    @classmethod
    def fit(cls, texts: Sequence[str]) -> "NumpyTfidf":
        docs = [set(_TOKEN_PATTERN.findall(t.lower())) for t in texts]
        vocab = {w: i for i, w in enumerate(sorted(set().union(*docs)))}
        df = np.zeros(len(vocab))
        for d in docs:
            for w in d:
                df[vocab[w]] += 1
        idf = np.log((1 + len(docs)) / (1 + df)) + 1  # smooth_idf=True
        return cls(vocab, idf)

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(self.vocabulary_)))
        for r, t in enumerate(texts):
            for w in _TOKEN_PATTERN.findall(t.lower()):
                j = self.vocabulary_.get(w)
                if j is not None:
                    out[r, j] += 1
        out *= self.idf_
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


def make_tfidf_vectorizer(vocab: dict[str, int] | None, idf: np.ndarray | None, fit_texts: Sequence[str] = (), backend: str = "auto"):
    """A TF-IDF vectorizer with the reference's vocabulary/IDF (``tfidf_vocab.json``, ``idf.npy``), or — when those
    are not given — fitted with default settings on ``fit_texts`` (all snippet texts), as the reference does (§4.4)."""
    use_sklearn = backend in ("auto", "sklearn")
    if use_sklearn:
        try:
            from sklearn.feature_extraction.text import TfidfVectorizer
        except ImportError:
            if backend == "sklearn":
                raise
            use_sklearn = False
    if use_sklearn:
        if vocab is not None and idf is not None:
            vec = TfidfVectorizer()
            vec.vocabulary_ = dict(vocab)
            vec.idf_ = np.asarray(idf, dtype=np.float64)
            return vec
        return TfidfVectorizer().fit(list(fit_texts))
    if vocab is not None and idf is not None:
        return NumpyTfidf(vocab, idf)
    return NumpyTfidf.fit(list(fit_texts))


def tfidf_similarity(text_a: str, text_b: str, vec) -> float:
    """Cosine similarity of the TF-IDF vectors of two texts (§4.4 ``reference_score``)."""
    enc = vec.transform([text_a, text_b])
    enc = enc.toarray() if hasattr(enc, "toarray") else np.asarray(enc)
    na, nb = np.linalg.norm(enc[0]), np.linalg.norm(enc[1])
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(enc[0], enc[1]) / na / nb)


class ConsistencyScorer:
    """Consistency (RS) of a case: TF-IDF cosine between its generated texts (joined by spaces) and the attribute
    snippets of ``(relation_id, target_new_id)`` (joined by spaces) (§4.4)."""

    def __init__(self, snippets_path, idf_path=None, vocab_path=None, backend: str = "auto"):
        data = json.loads(Path(snippets_path).read_text(encoding="utf-8"))
        self.snippets: dict[tuple[str, str], list[str]] = {}
        for i, rec in enumerate(data):
            try:
                key = (str(rec["relation_id"]), str(rec["target_id"]))
                self.snippets.setdefault(key, []).extend(s["text"] for s in rec["samples"])
            except (KeyError, TypeError) as e:
                raise ValueError(f"{snippets_path}, record {i}: expected {{relation_id, target_id, samples:[{{name, text}}]}} ({e})") from None
        vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8")) if vocab_path else None
        idf = np.load(idf_path, allow_pickle=False) if idf_path else None
        if (vocab is None) != (idf is None):
            raise ValueError("eval.consistency: give both idf and tfidf_vocab, or neither (then the vectorizer is refit on the snippets)")
        all_texts = [t for ts in self.snippets.values() for t in ts]
        self.vec = make_tfidf_vectorizer(vocab, idf, all_texts, backend)

    def __call__(self, texts: Sequence[str], relation_id, target_new_id) -> float:
        ref = self.snippets.get((str(relation_id), str(target_new_id)))
        if not ref:
            return math.nan
        return tfidf_similarity(" ".join(texts), " ".join(ref), self.vec)


_SCORERS: dict[tuple, ConsistencyScorer] = {}


def consistency_scorer(files, backend: str = "auto") -> ConsistencyScorer | None:
    """The scorer for ``eval.consistency`` files (loaded once per process), or ``None`` (consistency not computed)."""
    if not files.attribute_snippets:
        return None
    key = (str(files.attribute_snippets), str(files.idf), str(files.tfidf_vocab), backend)
    if key not in _SCORERS:
        for name in ("attribute_snippets", "idf", "tfidf_vocab"):
            value = getattr(files, name)
            if value and not Path(value).expanduser().is_file():
                raise FileNotFoundError(f"eval.consistency.{name}: file not found: {value}")
        _SCORERS[key] = ConsistencyScorer(Path(files.attribute_snippets).expanduser(),
                                          Path(files.idf).expanduser() if files.idf else None,
                                          Path(files.tfidf_vocab).expanduser() if files.tfidf_vocab else None, backend)
    return _SCORERS[key]
