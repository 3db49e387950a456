"""Edit requests: one typed record, loaders for every supported file format, and validation.

Formats (``format="auto"`` detects them from the records):

* ``counterfact``   original ROME format (``case_id, requested_rewrite{prompt, subject, target_new{str,id},
  target_true{str,id}, relation_id}, paraphrase_prompts, neighborhood_prompts, attribute_prompts,
  generation_prompts``)
* ``counterfact_reduced``   EasyEdit style (``case_id?, prompt, target_new, subject, ground_truth,
  rephrase_prompt, locality_prompt, locality_ground_truth``), prompt with the subject written out
* ``zsre``          MEND zsRE (``src, subject, alt, rephrase, loc, loc_ans, answers``)
* ``user``          JSONL/CSV/JSON rows of ``subject, prompt, target`` (+ optional ``target_true``,
  ``case_id``, ``paraphrase_prompts``, ``neighborhood_prompts``)

Every problem raises :class:`RequestValidationError` naming file, record index, case id and field.
With ``skip_invalid=True`` bad records are skipped and counted instead (never silently).
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence
from massedit.core.errors import InputError

log = logging.getLogger(__name__)

FORMATS = ("counterfact", "counterfact_reduced", "zsre", "user")
BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_SETS = {"smollm2_facts": BUILTIN_DIR / "smollm2_facts.json"}


@dataclass
class DataConfig:
    """``data`` config group: which edit requests to read."""

    path: str = "builtin:smollm2_facts"   # builtin:NAME or a request file (JSON, JSONL, CSV)
    format: str = "auto"                  # auto | counterfact | counterfact_reduced | zsre | user
    num_edits: int | None = None          # the first N records after `offset` (null = all)
    offset: int = 0
    skip_invalid: bool = False            # true: skip bad records (counted and logged) instead of failing
    zsre_target: str = "answers"          # zsRE: answers (reference evaluation) | alt (MEND training)
    max_input_tokens: int | None = None   # refuse a request whose longest prompt + target exceeds this many tokens
    #                                       (checked before the run starts); null: the model's context length

    def __post_init__(self) -> None:
        if self.format != "auto" and self.format not in FORMATS:
            raise DataConfigError(f"data.format={self.format!r}: choose auto or one of {FORMATS}")
        if self.num_edits is not None and int(self.num_edits) < 1:
            raise DataConfigError(f"data.num_edits must be >= 1 or null (all records), got {self.num_edits}")
        if int(self.offset) < 0:
            raise DataConfigError(f"data.offset must be >= 0, got {self.offset}")
        if self.zsre_target not in ("answers", "alt"):
            raise DataConfigError(f"data.zsre_target={self.zsre_target!r}: choose answers or alt")
        if self.max_input_tokens is not None and int(self.max_input_tokens) < 1:
            raise DataConfigError(f"data.max_input_tokens must be >= 1 or null (the model's context), "
                                  f"got {self.max_input_tokens}")


class DataConfigError(InputError):
    """A ``data.*`` value that cannot work (named in the message)."""


class RequestValidationError(InputError):
    """A bad edit-request record: says which file, record, case and field."""

    def __init__(self, message: str, *, file=None, index=None, case_id=None, field=None):
        self.file, self.index, self.case_id, self.field, self.reason = file, index, case_id, field, message
        where = []
        if file is not None:
            where.append(str(file))
        if index is not None:
            where.append(f"record {index}")
        if case_id is not None:
            where.append(f"case_id={case_id}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


@dataclass
class EditRequest:
    """One requested rewrite plus the prompts used to evaluate it."""

    case_id: int | str
    subject: str
    prompt: str                      # template with exactly one "{}" where the subject goes
    target_new: str
    target_true: str | None = None
    relation_id: str | None = None
    target_new_id: str | None = None
    target_true_id: str | None = None
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    neighborhood_targets: list[str] = field(default_factory=list)  # expected answer per neighbourhood prompt
    attribute_prompts: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    loc: str | None = None           # zsRE locality question ("nq question: ...")
    loc_ans: str | None = None       # its answer
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def filled_prompt(self) -> str:
        return self.prompt.format(self.subject)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditRequest":
        return cls(**d)


# --------------------------------------------------------------------------------------- validation
def _fail(msg, ctx, fld):
    raise RequestValidationError(msg, file=ctx.get("file"), index=ctx.get("index"), case_id=ctx.get("case_id"), field=fld)


def _req_str(rec: dict, key: str, ctx, *, allow_empty=False, path: str | None = None) -> str:
    fld = path or key
    if key not in rec:
        _fail("missing", ctx, fld)
    v = rec[key]
    if not isinstance(v, str):
        _fail(f"expected a string, got {type(v).__name__}", ctx, fld)
    if not allow_empty and not v.strip():
        _fail("empty", ctx, fld)
    return v


def _opt_str(rec: dict, key: str, ctx, path: str | None = None) -> str | None:
    if rec.get(key) is None:
        return None
    return _req_str(rec, key, ctx, allow_empty=True, path=path)


def _str_list(rec: dict, key: str, ctx) -> list[str]:
    v = rec.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        _fail("expected a list of strings", ctx, key)
    return list(v)


def _check_template(prompt: str, subject: str, ctx, fld="prompt") -> str:
    """Return a template with exactly one ``{}``; accept a filled prompt containing the subject."""
    if "{}" not in prompt:
        if subject and subject in prompt:
            prompt = prompt.replace(subject, "{}", 1)
        else:
            _fail(f"prompt has no '{{}}' placeholder and does not contain the subject {subject!r}: {prompt!r}", ctx, fld)
    if prompt.count("{}") != 1:
        _fail(f"prompt must contain exactly one '{{}}' placeholder: {prompt!r}", ctx, fld)
    probe = prompt.replace("{}", "")
    if "{" in probe or "}" in probe:
        _fail(f"prompt contains a stray brace besides '{{}}': {prompt!r}", ctx, fld)
    before = prompt.split("{}")[0]
    if before and not before.endswith(" "):
        _fail(f"the text before '{{}}' must be empty or end in a space: {prompt!r}", ctx, fld)
    return prompt


def validate_request(req: EditRequest, ctx: dict | None = None) -> EditRequest:
    ctx = dict(ctx or {})
    ctx.setdefault("case_id", req.case_id)
    if not isinstance(req.case_id, (int, str)) or isinstance(req.case_id, bool):
        _fail(f"case_id must be an int or string, got {type(req.case_id).__name__}", ctx, "case_id")
    for fld in ("subject", "target_new"):
        v = getattr(req, fld)
        if not isinstance(v, str):
            _fail(f"expected a string, got {type(v).__name__}", ctx, fld)
        if not v.strip():
            _fail("empty", ctx, fld)
    if req.target_true is not None and not isinstance(req.target_true, str):
        _fail("expected a string", ctx, "target_true")
    req.prompt = _check_template(req.prompt, req.subject, ctx)
    for fld in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_targets", "attribute_prompts", "generation_prompts"):
        v = getattr(req, fld)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            _fail("expected a list of strings", ctx, fld)
    if req.neighborhood_targets and len(req.neighborhood_targets) != len(req.neighborhood_prompts):
        _fail("needs one expected answer per neighbourhood prompt", ctx, "neighborhood_targets")
    return req


# --------------------------------------------------------------------------------------- converters
def _case_id(rec: dict, index: int, ctx, key="case_id"):
    cid = rec.get(key, index)
    if isinstance(cid, bool) or not isinstance(cid, (int, str)):
        _fail(f"case_id must be an int or string, got {type(cid).__name__}", ctx, key)
    if isinstance(cid, str) and cid.strip().lstrip("-").isdigit():
        cid = int(cid)
    return cid


def from_counterfact(rec: dict, index: int, ctx: dict) -> EditRequest:
    rr = rec.get("requested_rewrite")
    if not isinstance(rr, dict):
        _fail("missing or not an object", ctx, "requested_rewrite")
    subject = _req_str(rr, "subject", ctx, path="requested_rewrite.subject")

    def target(key):
        t = rr.get(key)
        if t is None:
            return None, None
        if isinstance(t, str):
            return t, None
        if not isinstance(t, dict):
            _fail("expected an object {str, id}", ctx, f"requested_rewrite.{key}")
        return _req_str(t, "str", ctx, path=f"requested_rewrite.{key}.str"), t.get("id")

    tn, tn_id = target("target_new")
    if tn is None:
        _fail("missing", ctx, "requested_rewrite.target_new")
    tt, tt_id = target("target_true")
    prompt = _req_str(rr, "prompt", ctx, path="requested_rewrite.prompt")
    prompt = _check_template(prompt, subject, ctx, "requested_rewrite.prompt")
    nb = _str_list(rec, "neighborhood_prompts", ctx)
    req = EditRequest(
        case_id=ctx["case_id"],
        subject=subject,
        prompt=prompt,
        target_new=tn,
        target_true=tt,
        relation_id=rr.get("relation_id"),
        target_new_id=tn_id,
        target_true_id=tt_id,
        paraphrase_prompts=_str_list(rec, "paraphrase_prompts", ctx),
        neighborhood_prompts=nb,
        neighborhood_targets=[tt] * len(nb) if tt is not None else [],
        attribute_prompts=_str_list(rec, "attribute_prompts", ctx),
        generation_prompts=_str_list(rec, "generation_prompts", ctx),
        extra={k: rec[k] for k in ("pararel_idx",) if k in rec},
    )
    return req


def from_counterfact_reduced(rec: dict, index: int, ctx: dict) -> EditRequest:
    subject = _req_str(rec, "subject", ctx)
    prompt = _check_template(_req_str(rec, "prompt", ctx), subject, ctx)
    tn = _req_str(rec, "target_new", ctx)
    tt = _opt_str(rec, "ground_truth", ctx)
    reph = _str_list(rec, "rephrase_prompt", ctx)
    loc = _str_list(rec, "locality_prompt", ctx)
    loc_gt = _str_list(rec, "locality_ground_truth", ctx)
    if len(loc_gt) == 1 and len(loc) > 1:
        loc_gt = loc_gt * len(loc)
    if loc and len(loc_gt) != len(loc):
        _fail("needs one answer per locality prompt", ctx, "locality_ground_truth")
    return EditRequest(
        case_id=ctx["case_id"], subject=subject, prompt=prompt, target_new=tn, target_true=tt,
        paraphrase_prompts=reph, neighborhood_prompts=loc, neighborhood_targets=loc_gt,
    )


def from_zsre(rec: dict, index: int, ctx: dict, target_field: str = "answers") -> EditRequest:
    subject = _req_str(rec, "subject", ctx)
    src = _req_str(rec, "src", ctx)
    if subject not in src:
        _fail(f"subject {subject!r} does not occur in the question {src!r}", ctx, "src")
    prompt = src.replace(subject, "{}", 1)
    # the reference replaces every occurrence; keep exactly one placeholder
    prompt = _check_template(prompt, subject, ctx, "src")
    if target_field == "answers":
        ans = rec.get("answers")
        if not isinstance(ans, list) or not ans or not isinstance(ans[0], str) or not ans[0].strip():
            _fail("expected a non-empty list of strings", ctx, "answers")
        tn = ans[0]
    else:
        tn = _req_str(rec, target_field, ctx)
    loc = _opt_str(rec, "loc", ctx)
    loc_ans = _opt_str(rec, "loc_ans", ctx)
    return EditRequest(
        case_id=ctx["case_id"], subject=subject, prompt=prompt, target_new=tn,
        target_true=rec.get("pred") if isinstance(rec.get("pred"), str) else None,
        paraphrase_prompts=_str_list(rec, "rephrase", ctx),
        loc=loc, loc_ans=loc_ans,
        extra={k: rec[k] for k in ("alt", "answers", "pred") if k in rec},
    )


def from_user(rec: dict, index: int, ctx: dict) -> EditRequest:
    subject = _req_str(rec, "subject", ctx)
    prompt = _check_template(_req_str(rec, "prompt", ctx), subject, ctx)
    key = "target" if "target" in rec else "target_new"
    tn = _req_str(rec, key, ctx)
    tt = _opt_str(rec, "target_true", ctx)
    nb = _str_list(rec, "neighborhood_prompts", ctx)
    nt = _str_list(rec, "neighborhood_targets", ctx)
    return EditRequest(
        case_id=ctx["case_id"], subject=subject, prompt=prompt, target_new=tn, target_true=tt,
        paraphrase_prompts=_str_list(rec, "paraphrase_prompts", ctx), neighborhood_prompts=nb,
        neighborhood_targets=nt or ([tt] * len(nb) if tt else []),
    )


CONVERTERS = {
    "counterfact": from_counterfact,
    "counterfact_reduced": from_counterfact_reduced,
    "zsre": from_zsre,
    "user": from_user,
}


def detect_format(rec: dict) -> str:
    if "requested_rewrite" in rec:
        return "counterfact"
    if "src" in rec and ("answers" in rec or "alt" in rec):
        return "zsre"
    if "ground_truth" in rec or "rephrase_prompt" in rec or "locality_prompt" in rec:
        return "counterfact_reduced"
    if "subject" in rec and "prompt" in rec and ("target" in rec or "target_new" in rec):
        return "user"
    raise ValueError("unrecognised record layout (keys: " + ", ".join(sorted(rec)) + ")")


# --------------------------------------------------------------------------------------- reading
def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a leading byte-order mark is dropped); unreadable files name the problem."""
    if path.is_dir():
        raise RequestValidationError("is a directory, not a request file (JSON, JSONL or CSV)", file=path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RequestValidationError(f"cannot read: {e.strerror or e}", file=path) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RequestValidationError(f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, line {line}); "
                                     f"save the file as UTF-8", file=path) from None


def _read_csv(text: str, path: Path) -> list[dict]:
    reader = csv.DictReader(text.splitlines())
    try:
        rows = list(reader)
    except csv.Error as e:
        raise RequestValidationError(f"malformed CSV: {e}", file=path) from None
    header = reader.fieldnames or []
    if not header:
        raise RequestValidationError("empty CSV file (no header row)", file=path)
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise RequestValidationError(f"the CSV header repeats column(s) {dup}", file=path)
    for i, row in enumerate(rows):
        if None in row:  # more cells than header columns
            raise RequestValidationError(f"row has {len(header) + len(row[None])} cells, the header {len(header)} "
                                         f"columns", file=path, index=i)
        missing = [k for k, v in row.items() if v is None]
        if missing:
            raise RequestValidationError(f"row has fewer cells than the header (no value for {missing})",
                                         file=path, index=i, field=missing[0])
    return rows


def _read_records(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    text = _read_text(path)
    if suffix == ".csv":
        return _read_csv(text, path)
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for ln, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RequestValidationError(f"malformed JSON on line {ln}: {e.msg} (column {e.colno})", file=path, index=len(rows)) from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestValidationError(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}", file=path) from None
    if isinstance(data, dict):
        for key in ("requests", "data", "records"):
            if isinstance(data.get(key), list):
                return data[key]
        return [data]
    if not isinstance(data, list):
        raise RequestValidationError("expected a JSON list of records", file=path)
    return data


def resolve_path(path: str | Path) -> Path:
    """``builtin:NAME`` or a filesystem path."""
    s = str(path)
    if s.startswith("builtin:"):
        name = s.split(":", 1)[1]
        if name not in BUILTIN_SETS:
            raise FileNotFoundError(f"unknown built-in request set {name!r}; have {sorted(BUILTIN_SETS)}")
        return BUILTIN_SETS[name]
    p = Path(s).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"request file not found: {p}")
    return p


def parse_records(
    records: Iterable[Any],
    *,
    fmt: str = "auto",
    file: Any = None,
    skip_invalid: bool = False,
    zsre_target: str = "answers",
    start_index: int = 0,
) -> tuple[list[EditRequest], list[RequestValidationError]]:
    out: list[EditRequest] = []
    errors: list[RequestValidationError] = []
    seen: dict[Any, int] = {}
    for index, rec in enumerate(records, start_index):
        ctx = {"file": file, "index": index, "case_id": None}
        try:
            if not isinstance(rec, dict):
                _fail(f"expected an object, got {type(rec).__name__}", ctx, None)
            ctx["case_id"] = _case_id(rec, index, ctx)
            f = fmt
            if f == "auto":
                try:
                    f = detect_format(rec)
                except ValueError as e:
                    _fail(str(e), ctx, None)
            if f not in CONVERTERS:
                raise ValueError(f"unknown request format {f!r}; choose one of {FORMATS} or 'auto'")
            conv = CONVERTERS[f]
            req = conv(rec, index, ctx, zsre_target) if f == "zsre" else conv(rec, index, ctx)
            validate_request(req, ctx)
            if req.case_id in seen:
                _fail(f"duplicate case_id (first seen at record {seen[req.case_id]})", ctx, "case_id")
            seen[req.case_id] = index
            out.append(req)
        except RequestValidationError as e:
            if not skip_invalid:
                raise
            errors.append(e)
    return out, errors


def load_requests(
    path: str | Path,
    *,
    fmt: str = "auto",
    num_edits: int | None = None,
    offset: int = 0,
    skip_invalid: bool = False,
    zsre_target: str = "answers",
) -> list[EditRequest]:
    """Load, convert and validate edit requests; ``num_edits``/``offset`` select a slice of records."""
    p = resolve_path(path)
    records = _read_records(p)
    n_total = len(records)
    if offset:
        records = records[offset:]
    if num_edits is not None and num_edits >= 0:
        records = records[:num_edits]
    reqs, errors = parse_records(
        records, fmt=fmt, file=p, skip_invalid=skip_invalid, zsre_target=zsre_target, start_index=offset
    )
    if errors:
        log.warning("skipped %d invalid record(s) of %s; first: %s", len(errors), p, errors[0])
    if not reqs:
        why = (f"all {len(errors)} selected record(s) are invalid (skip_invalid)" if errors else
               "no records" + (f" after offset {offset}" if offset else "") + f" (the file holds {n_total})")
        raise RequestValidationError(f"no edit requests: {why}", file=p)
    return reqs


def check_request_lengths(requests: Sequence[EditRequest], tok, limit: int, *, reserve: int = 0, file=None,
                          limit_name: str = "data.max_input_tokens", start_index: int | None = 0) -> None:
    """Refuse a request whose longest model input (a prompt filled with the subject, plus the longest target)
    would exceed ``limit`` tokens, ``reserve`` tokens kept free (e.g. for an editor's context-template prefix).

    Texts whose UTF-8 length alone keeps them under the limit are not tokenised (a token is >= 1 byte), so
    checking a large request file costs little. ``start_index``: the record index of ``requests[0]`` in the file
    (None: unknown, e.g. after skipped records)."""
    budget = int(limit) - int(reserve)
    specials = 4  # BOS / a dummy prefix, generously
    for pos, req in enumerate(requests):
        targets = [t for t in (req.target_new, req.target_true, req.loc_ans, *req.neighborhood_targets) if t]
        fields: list[tuple[str, str]] = [("prompt", req.filled_prompt)]
        fields += [(f"paraphrase_prompts[{i}]", p) for i, p in enumerate(req.paraphrase_prompts)]
        fields += [(f"neighborhood_prompts[{i}]", p) for i, p in enumerate(req.neighborhood_prompts)]
        fields += [(f"attribute_prompts[{i}]", p) for i, p in enumerate(req.attribute_prompts)]
        fields += [(f"generation_prompts[{i}]", p) for i, p in enumerate(req.generation_prompts)]
        if req.loc:
            fields.append(("loc", req.loc))
        t_bytes = max((len(t.encode("utf-8")) for t in targets), default=0) + 1
        t_tokens = None
        for name, text in fields:
            if len(text.encode("utf-8")) + t_bytes + specials <= budget:
                continue
            if t_tokens is None:
                t_tokens = max((len(tok(" " + t, add_special_tokens=False)["input_ids"]) for t in targets), default=0)
            n = len(tok(text)["input_ids"]) + t_tokens
            if n > budget:
                fld = "subject" if name == "prompt" and len(req.subject) > len(req.prompt) else name
                extra = f" + {reserve} reserved for the editor's context prefix" if reserve else ""
                raise RequestValidationError(
                    f"input of {n} tokens (text + longest target){extra} exceeds the limit of {limit} tokens "
                    f"({limit_name}); shorten it or raise the limit", file=file,
                    index=None if start_index is None else start_index + pos, case_id=req.case_id, field=fld)


def load_requests_from_config(cfg: DataConfig) -> list[EditRequest]:
    """Load requests as the ``data`` config group says (path, format, num_edits, offset, skip_invalid)."""
    return load_requests(cfg.path, fmt=cfg.format, num_edits=cfg.num_edits, offset=cfg.offset,
                         skip_invalid=cfg.skip_invalid, zsre_target=cfg.zsre_target)
