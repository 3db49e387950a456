"""Text corpora for second-moment statistics (REFERENCE_SPEC §0.6): loading, document packing, sampling,
tokenisation and token-budget batching, plus a thin LightningDataModule.

Pipeline (every step deterministic given the config):

1. **Read** the corpus: ``builtin:NAME`` (shipped with massedit: ``builtin:wikitext-2``, the default), local
   file(s)/folder (``format``: ``text`` plain text, ``wikitext`` the tokenised WikiText release, ``jsonl`` one JSON
   record per line with a text field, ``auto``; ``.xz``/``.gz`` files are read decompressed) or a Hugging Face
   ``datasets`` corpus by name (``corpus: hf:NAME[:CONFIG]``; only when ``datasets`` is installed and the
   hub is reachable, otherwise :class:`CorpusNotAvailableError` names the local alternative).
2. **Pack** lines into documents (``packing``): ``chars`` is the reference fixtures' packing — every line
   stripped, empty lines dropped, consecutive lines joined with ``"\\n"`` until the running sum of
   ``len(line) + 1`` reaches ``chunk_chars`` (2,500), continuing across file boundaries; ``articles`` starts
   a document at every WikiText top-level heading ``= Title =``; ``paragraphs`` splits at blank lines;
   ``lines`` makes every non-empty line a document; ``file`` one document per file. WikiText's ``@-@``,
   ``@,@``, ``@.@`` escapes are undone when ``unescape`` is true; headings (``= = Section = =``) stay as text.
3. **Sample** like the reference's ``FixedRandomSubsetSampler``: ``random.Random(seed).shuffle`` of the
   document indices, first ``n_samples`` documents (all if null); then, if ``n_tokens`` is set, documents
   are taken in that order until ``n_tokens`` tokens are reached (the last one cut to hit it exactly).
4. **Tokenise** each document with ``truncation=True, max_length=max_length`` (the tokenizer's own special
   tokens, e.g. Llama's BOS, as the reference does; ``add_special_tokens`` switches that).
5. **Batch** by a token budget with the reference's rule: windows of ``sort_window`` (100) documents are
   sorted by length (descending, stable) and split into right-padded sub-batches whose padded size
   ``width × rows`` stays within ``batch_tokens``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from massedit.core.io import sha256_file
from massedit.core.errors import InputError

log = logging.getLogger(__name__)

FORMATS = ("auto", "text", "wikitext", "jsonl")
PACKINGS = ("auto", "chars", "articles", "paragraphs", "lines", "file")
BUILTIN_CORPORA_DIR = Path(__file__).parent / "corpora"
_COMPRESSED = (".xz", ".gz")
_TEXT_SUFFIXES = (".txt", ".jsonl", ".raw", ".tokens")
_WIKITEXT_ESCAPES = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_TOP_HEADING = re.compile(r"^= [^=].*[^=] =$|^= [^=] =$")


class CorpusError(InputError):
    """Bad corpus configuration or content (names the file/field)."""


class CorpusNotAvailableError(InputError):
    """A requested corpus cannot be read here (missing file, no ``datasets`` package, no hub access)."""


# ----------------------------------------------------------------------------------------- text helpers
def unescape_wikitext(text: str) -> str:
    """Undo WikiText's tokenisation escapes: ``" @-@ "`` -> ``"-"``, ``" @,@ "`` -> ``","``, ``" @.@ "`` -> ``"."``."""
    for a, b in _WIKITEXT_ESCAPES:
        text = text.replace(a, b)
    return text


def is_wikitext_top_heading(line: str) -> bool:
    """True for a WikiText article title line ``= Title =`` (not ``= = Section = =``)."""
    return bool(_TOP_HEADING.match(line.strip()))


def pack_lines_by_chars(lines: Iterable[str], chunk_chars: int = 2500) -> list[str]:
    """Reference fixture packing: stripped non-empty lines joined with ``"\\n"`` into texts whose running
    length ``Σ (len(line) + 1)`` reaches ``chunk_chars``; the remainder forms a last, shorter text."""
    texts, cur, n = [], [], 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        cur.append(line)
        n += len(line) + 1
        if n >= chunk_chars:
            texts.append("\n".join(cur))
            cur, n = [], 0
    if cur:
        texts.append("\n".join(cur))
    return texts


def pack_lines_by_articles(lines: Iterable[str]) -> list[str]:
    """One document per WikiText article: a new document starts at each top-level ``= Title =`` line
    (headings kept as the document's first line); stripped non-empty lines joined with ``"\\n"``."""
    docs, cur = [], []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if is_wikitext_top_heading(line) and cur:
            docs.append("\n".join(cur))
            cur = []
        cur.append(line)
    if cur:
        docs.append("\n".join(cur))
    return docs


def pack_lines_by_paragraphs(lines: Iterable[str]) -> list[str]:
    """Documents separated by blank lines (lines inside a paragraph joined with ``"\\n"``)."""
    docs, cur = [], []
    for line in lines:
        s = line.strip()
        if not s:
            if cur:
                docs.append("\n".join(cur))
                cur = []
            continue
        cur.append(s)
    if cur:
        docs.append("\n".join(cur))
    return docs


# ----------------------------------------------------------------------------------------- config
def _get(cfg: Any, key: str, default=None):
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        try:
            v = cfg.get(key, default)
        except Exception:  # omegaconf struct mode on missing keys
            v = default
        return default if v is None and default is not None else v
    return getattr(cfg, key, default)


@dataclass
class CorpusSpec:
    """What to read and how to turn it into documents (see the module docstring)."""

    corpus: list[str]
    format: str = "auto"
    packing: str = "auto"
    chunk_chars: int = 2500
    unescape: bool = True
    text_field: str = "text"
    hf_split: str = "train"
    revision: str | None = None
    ds_name: str | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> "CorpusSpec":
        corpus = _get(cfg, "corpus")
        if corpus is None or corpus == "" or corpus == []:
            raise CorpusError("stats.corpus is empty: give builtin:wikitext-2, a local file/folder or hf:NAME[:CONFIG]")
        if isinstance(corpus, (str, Path)):
            corpus = [str(corpus)]
        else:
            corpus = [str(c) for c in corpus]
        fmt = str(_get(cfg, "format", "auto"))
        packing = str(_get(cfg, "packing", "auto"))
        if fmt not in FORMATS:
            raise CorpusError(f"stats.format={fmt!r}: choose one of {FORMATS}")
        if packing not in PACKINGS:
            raise CorpusError(f"stats.packing={packing!r}: choose one of {PACKINGS}")
        return cls(
            corpus=corpus, format=fmt, packing=packing, chunk_chars=int(_get(cfg, "chunk_chars", 2500)),
            unescape=bool(_get(cfg, "unescape", True)), text_field=str(_get(cfg, "text_field", "text")),
            hf_split=str(_get(cfg, "hf_split", "train")), revision=_get(cfg, "revision"), ds_name=_get(cfg, "ds_name"),
        )

    @property
    def is_hf(self) -> bool:
        return len(self.corpus) == 1 and self.corpus[0].startswith("hf:")


@dataclass
class Corpus:
    """Documents of a corpus plus an identity dict (content hashes, no absolute paths) for cache keys."""

    docs: list[str]
    identity: dict
    ds_name: str
    files: list[Path] = field(default_factory=list)


def builtin_corpora() -> list[str]:
    """Names of the corpora shipped with massedit (``stats.corpus=builtin:NAME``)."""
    return sorted(p.name for p in BUILTIN_CORPORA_DIR.iterdir() if p.is_dir()) if BUILTIN_CORPORA_DIR.exists() else []


def resolve_corpus_path(p: str) -> Path:
    """``builtin:NAME[/FILE]`` -> the shipped folder (or one file of it); anything else -> the (user-expanded) path."""
    if p.startswith("builtin:"):
        name = p.split(":", 1)[1]
        path = BUILTIN_CORPORA_DIR / name
        for cand in (path, *(path.with_name(path.name + ext) for ext in _COMPRESSED)):
            if cand.exists() and ".." not in Path(name).parts:
                return cand
        raise CorpusNotAvailableError(f"stats.corpus={p!r}: no built-in corpus {name!r}; have {builtin_corpora()}")
    return Path(p).expanduser()


def _plain_name(path: Path) -> str:
    """File name without a compression suffix (``test.txt.xz`` -> ``test.txt``)."""
    return path.name[: -len(path.suffix)] if path.suffix in _COMPRESSED else path.name


def _expand_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        path = resolve_corpus_path(str(p))
        if path.is_dir():
            found = sorted((x for x in path.iterdir() if x.is_file() and Path(_plain_name(x)).suffix in _TEXT_SUFFIXES),
                           key=_plain_name)
            if not found:
                raise CorpusNotAvailableError(f"corpus folder {path} holds no .txt/.jsonl/.raw/.tokens files "
                                              f"(optionally .xz/.gz compressed)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CorpusNotAvailableError(
                f"stats.corpus: path {str(path)!r} does not exist. Use the built-in corpus (stats.corpus=builtin:wikitext-2), "
                f"a local file or folder of text, or hf:NAME[:CONFIG] with the `datasets` package installed.")
    return files


def corpus_files(spec: "CorpusSpec") -> list[Path]:
    """The local files a (non-hub) corpus spec reads; :class:`CorpusNotAvailableError` naming a missing one."""
    return _expand_files(spec.corpus)


def read_text(path: Path) -> str:
    """A corpus file's text (UTF-8; ``.xz``/``.gz`` decompressed)."""
    if path.suffix == ".xz":
        import lzma

        raw = lzma.open(path).read()
    elif path.suffix == ".gz":
        import gzip

        raw = gzip.open(path).read()
    else:
        raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


_SHA_CACHE: dict[tuple, str] = {}


def _file_sha256(path: Path) -> str:
    """sha256 of the file's (decompressed) content: a compressed copy of a corpus has the same identity."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        if path.suffix in _COMPRESSED:
            _SHA_CACHE[key] = hashlib.sha256(read_text(path).encode("utf-8")).hexdigest()
        else:
            _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def _detect_format(files: Sequence[Path]) -> str:
    if all(Path(_plain_name(f)).suffix == ".jsonl" for f in files):
        return "jsonl"
    for f in files:
        if "wikitext" in str(f).lower():
            return "wikitext"
        head = read_text(f)[:200_000]
        if " @-@ " in head or " @,@ " in head or re.search(r"^ = [^=].* = $", head, re.M):
            return "wikitext"
    return "text"


def _read_jsonl_docs(path: Path, field_name: str) -> list[str]:
    docs = []
    for i, line in enumerate(read_text(path).split("\n")):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}: line {i + 1} is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or field_name not in rec or not isinstance(rec[field_name], str):
            raise CorpusError(f"{path}: record {i} has no string field {field_name!r} (set stats.text_field)")
        if rec[field_name].strip():
            docs.append(rec[field_name])
    return docs


def _pack(lines: list[str], packing: str, chunk_chars: int) -> list[str]:
    if packing == "chars":
        return pack_lines_by_chars(lines, chunk_chars)
    if packing == "articles":
        return pack_lines_by_articles(lines)
    if packing == "paragraphs":
        return pack_lines_by_paragraphs(lines)
    if packing == "lines":
        return [s.strip() for s in lines if s.strip()]
    raise CorpusError(f"packing {packing!r} not applicable here")


def load_corpus(spec: CorpusSpec) -> Corpus:
    """Read and pack the corpus of ``spec`` into documents (module docstring, steps 1-2)."""
    if spec.is_hf:
        return _load_hf_corpus(spec)
    files = _expand_files(spec.corpus)
    fmt = spec.format if spec.format != "auto" else _detect_format(files)
    packing = spec.packing
    if packing == "auto":
        packing = {"wikitext": "chars", "text": "paragraphs", "jsonl": "file"}[fmt]
    docs: list[str] = []
    if fmt == "jsonl":
        for f in files:
            docs.extend(_read_jsonl_docs(f, spec.text_field))
        if spec.unescape and spec.format == "wikitext":
            docs = [unescape_wikitext(d) for d in docs]
    elif packing == "file":
        for f in files:
            text = read_text(f)
            if fmt == "wikitext" and spec.unescape:
                text = unescape_wikitext(text)
            if text.strip():
                docs.append(text.strip())
    else:
        lines: list[str] = []
        for f in files:  # packing continues across file boundaries (reference fixtures)
            text = read_text(f)
            if fmt == "wikitext" and spec.unescape:
                text = unescape_wikitext(text)
            lines.extend(text.split("\n"))
        docs = _pack(lines, packing, spec.chunk_chars)
    if not docs:
        raise CorpusError(f"corpus {spec.corpus} produced no documents (format={fmt}, packing={packing})")
    identity = {
        "files": [[_plain_name(f), _file_sha256(f)] for f in files],
        "format": fmt, "packing": packing,
        "chunk_chars": spec.chunk_chars if packing == "chars" else None,
        "unescape": bool(spec.unescape) if fmt == "wikitext" else None,
        "text_field": spec.text_field if fmt == "jsonl" else None,
    }
    ds_name = spec.ds_name or ("wikitext" if fmt == "wikitext" else Path(_plain_name(files[0])).stem)
    return Corpus(docs=docs, identity=identity, ds_name=ds_name, files=files)


def _load_hf_corpus(spec: CorpusSpec) -> Corpus:
    """A Hugging Face ``datasets`` corpus ``hf:NAME[:CONFIG]`` (e.g. ``hf:wikitext:wikitext-103-raw-v1``,
    ``hf:wikimedia/wikipedia:20231101.en``). Needs the optional ``datasets`` package and hub access."""
    name = spec.corpus[0][3:]
    ds_id, _, config = name.partition(":")
    local_hint = ("use the built-in corpus instead (stats.corpus=builtin:wikitext-2: WikiText-2 test+valid, ~0.6 M "
                  "tokens), or any local folder of .txt/.jsonl files")
    try:
        import datasets  # noqa: F401  (optional dependency)
    except ImportError:
        raise CorpusNotAvailableError(f"corpus {spec.corpus[0]!r} needs the `datasets` package (pip install datasets); "
                                      f"{local_hint}") from None
    try:
        ds = datasets.load_dataset(ds_id, config or None, split=spec.hf_split, revision=spec.revision)
    except Exception as e:  # offline, unknown name, ...
        raise CorpusNotAvailableError(f"could not load {spec.corpus[0]!r} from the Hugging Face hub "
                                      f"({type(e).__name__}: {str(e)[:200]}); {local_hint}") from None
    if spec.text_field not in ds.column_names:
        raise CorpusError(f"{spec.corpus[0]}: no column {spec.text_field!r} (columns: {ds.column_names}); set stats.text_field")
    fmt = spec.format if spec.format != "auto" else ("wikitext" if ds_id.endswith("wikitext") else "text")
    texts = ds[spec.text_field]
    if fmt == "wikitext":  # records are lines of the WikiText files
        if spec.unescape:
            texts = [unescape_wikitext(t) for t in texts]
        packing = "chars" if spec.packing in ("auto", "file") else spec.packing
        docs = _pack(texts, packing, spec.chunk_chars)
    else:  # records are documents (articles)
        packing = "records"
        docs = [t for t in texts if t and t.strip()]
    identity = {"hf": ds_id, "config": config or None, "split": spec.hf_split, "revision": spec.revision,
                "fingerprint": getattr(ds, "_fingerprint", None), "format": fmt, "packing": packing,
                "chunk_chars": spec.chunk_chars if packing == "chars" else None,
                "unescape": bool(spec.unescape) if fmt == "wikitext" else None}
    ds_name = spec.ds_name or ds_id.split("/")[-1]
    return Corpus(docs=docs, identity=identity, ds_name=ds_name)


# ----------------------------------------------------------------------------------------- sampling / tokens
def sample_order(n_docs: int, seed: int) -> list[int]:
    """The reference's fixed random subset order: ``random.Random(seed).shuffle(list(range(n_docs)))``."""
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    return order


def _encode_truncated(tok, texts: Sequence[str], max_length: int, add_special_tokens: bool,
                      char_cap: int = 16) -> list[list[int]]:
    """Exactly ``tok(texts, truncation=True, max_length=max_length)["input_ids"]``, without tokenising whole
    long documents: a text longer than ``char_cap × max_length`` characters is cut first, and used in full
    only when the cut version has fewer than ``max_length + 16`` tokens (the kept prefix then never depends
    on the cut: byte-level BPE / Metaspace merges do not reach back 16 tokens)."""
    limit = int(char_cap) * int(max_length)
    cut = [t if len(t) <= limit else t[:limit] for t in texts]
    long_idx = [k for k, t in enumerate(texts) if len(t) > limit]
    if long_idx:
        lengths = tok([cut[k] for k in long_idx], add_special_tokens=add_special_tokens, return_length=True)["length"]
        for k, n in zip(long_idx, lengths):
            if n < max_length + 16:
                cut[k] = texts[k]
    enc = tok(cut, truncation=True, max_length=int(max_length), add_special_tokens=add_special_tokens)["input_ids"]
    return [list(ids) for ids in enc]


def tokenize_documents(
    tok, docs: Sequence[str], order: Sequence[int], *, max_length: int, n_samples: int | None = None,
    n_tokens: int | None = None, add_special_tokens: bool = True, chunk: int = 256,
) -> tuple[list[list[int]], list[int]]:
    """Token ids of the sampled documents (module docstring, steps 3-4), each truncated to ``max_length``
    like ``tok(text, truncation=True, max_length=max_length)``.

    Returns ``(ids per document, document indices)``; total length == ``n_tokens`` when the corpus is large
    enough (the last document cut), else everything available. Documents are tokenised in growing chunks, so
    only about as many as needed are read.
    """
    order = list(order)
    if n_samples is not None:
        if n_samples > len(order):
            log.warning("n_samples=%d > %d documents in the corpus: using all of them", n_samples, len(order))
        order = order[: int(n_samples)]
    out: list[list[int]] = []
    used: list[int] = []
    total = 0
    start = 0
    while start < len(order):
        size = chunk
        if n_tokens is not None:  # about as many documents as still needed (at least 8), at most `chunk`
            size = min(chunk, max(8, 2 * ((int(n_tokens) - total) // max(1, int(max_length)) + 1)))
        idx = order[start : start + size]
        start += size
        enc = _encode_truncated(tok, [docs[i] for i in idx], int(max_length), add_special_tokens)
        for i, ids in zip(idx, enc):
            if not ids:
                continue
            if n_tokens is not None and total + len(ids) >= n_tokens:
                ids = ids[: int(n_tokens) - total]
                out.append(list(ids))
                used.append(i)
                return out, used
            out.append(list(ids))
            used.append(i)
            total += len(ids)
    if n_tokens is not None:
        log.warning("corpus has only %d tokens (after truncation to %d) < n_tokens=%d: using all of them",
                    total, max_length, n_tokens)
    return out, used


def token_budget_batches(lengths: Sequence[int], batch_tokens: int, sort_window: int = 100) -> list[list[int]]:
    """Reference sub-batching: windows of ``sort_window`` items (in sample order), each sorted by length
    (descending, stable) and split so that ``width × rows ≤ batch_tokens`` (a sub-batch is closed when
    ``width × (rows + 1) > batch_tokens``; an item longer than the budget gets a batch of its own)."""
    if batch_tokens <= 0:
        raise CorpusError(f"stats.batch_tokens must be positive, got {batch_tokens}")
    batches: list[list[int]] = []
    n = len(lengths)
    window = max(1, int(sort_window)) if sort_window else n or 1
    for start in range(0, n, window):
        items = sorted(range(start, min(n, start + window)), key=lambda i: -lengths[i])
        cur: list[int] = []
        width = 0
        for i in items:
            if cur and width * (len(cur) + 1) > batch_tokens:
                batches.append(cur)
                cur = []
            if not cur:
                width = lengths[i]
            cur.append(i)
        if cur:
            batches.append(cur)
    return batches


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (long tensors) for a list of token-id lists."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[r, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@dataclass
class TokenBatches:
    """The packed, tokenised sample: ``batches[j]`` is a list of token-id lists (one right-padded batch)."""

    batches: list[list[list[int]]]
    n_tokens: int
    n_docs: int
    pad_id: int
    doc_indices: list[int]

    def tensors(self, j: int) -> dict[str, torch.Tensor]:
        return pad_batch(self.batches[j], self.pad_id)

    def batch_token_counts(self) -> list[int]:
        return [sum(len(s) for s in b) for b in self.batches]

    def shard(self, rank: int, world: int) -> list[int]:
        """Batch indices of one rank (round-robin; every batch on exactly one rank)."""
        return list(range(rank, len(self.batches), world))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for b in self.batches:
            h.update(json.dumps(b).encode())
        return h.hexdigest()[:16]


def build_token_batches(tok, docs: Sequence[str], *, max_length: int, batch_tokens: int, seed: int = 1,
                        n_samples: int | None = None, n_tokens: int | None = None, sort_window: int = 100,
                        add_special_tokens: bool = True) -> TokenBatches:
    """Sample, tokenise and batch ``docs`` (module docstring, steps 3-5)."""
    order = sample_order(len(docs), seed)
    seqs, used = tokenize_documents(tok, docs, order, max_length=max_length, n_samples=n_samples,
                                    n_tokens=n_tokens, add_special_tokens=add_special_tokens)
    if not seqs:
        raise CorpusError("the corpus sample is empty after tokenisation")
    groups = token_budget_batches([len(s) for s in seqs], batch_tokens, sort_window)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return TokenBatches(batches=[[seqs[i] for i in g] for g in groups], n_tokens=sum(len(s) for s in seqs),
                        n_docs=len(seqs), pad_id=int(pad_id), doc_indices=used)
