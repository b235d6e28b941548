"""Hostile Kafka records for lorabus, drawn with hypothesis, and the harness that pushes them through a
real broker to one worker and accounts for every record.

Shared by tests/test_fuzz_kafka.py (a few hundred records a run) and benchmarks/fuzz.py (thousands).

Hypothesis draws *specs*: a job spec is a valid v1 job (README "Wire contract v1", `schemas/v1.py`)
plus mutations (wrong types, extreme numbers written as JSON text, NaN/Infinity literals, bad UTF-8,
lone-surrogate escapes, 100k-deep nesting, several-hundred-KB prompts, records near 1 MB, nulls,
unknown fields, duplicated keys, truncation, trailing bytes, a BOM), its Kafka headers (including
header keys and values that are not UTF-8) and its key; a control spec is the same for an
adapter.publish / adapter.activate event, plus tombstones, unknown and missing `type` tags.
`build_job` turns a spec into the record's bytes and into what the README lets a worker do with it:

  must "answer"  the record has a readable id: exactly one result, whose id is the record's id and
                 whose status ("ok") or error code is in `allowed`; never a dead letter.
  must "dead"    no readable id (value null, not a JSON object, no top-level "id", an id that is not a
                 string of 1..256 characters): exactly one dead letter carrying the original key,
                 value and headers; no result.
  must "either"  readability is arguable (an id behind bytes no parser gets through, two different
                 ids, an id that cannot be written as UTF-8): exactly one result (allowed codes) or one
                 dead letter.

A record's id is readable when Python's json module finds a string "id" of 1..256 characters at the
top level of a JSON object, or, for bytes no parser accepts, when the record starts with an intact
`{"id": "..."` member (the README answers every record whose id can be read). `allowed` follows the
README: anything that makes the body invalid (wrong type, unknown field, a number outside the bounds
the README's job table states, NaN/Infinity, bad UTF-8, lone surrogate escapes, nesting, a header key
that is not UTF-8, more than 16 stop strings) is "invalid_job"; an unknown adapter is
"adapter_not_found", a tenant outside the adapter's tenants "forbidden", a token id outside the
vocabulary "invalid_job", prompt + max_new_tokens beyond the context "prompt_too_long", a past
deadline "deadline_exceeded". Where the README leaves a choice (the length of a tenant, duplicate JSON
keys, a BOM, a non-UTF-8 value in an x-* header the body makes unused, the order in which several
faults of one job are noticed) every answer it allows is allowed. "internal" is never allowed: a
worker that answers hostile input "internal" let it past the edge. Every job spec is tagged with a
unique token `fzNNNNNx` carried in its id, so results are attributed to records by that token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import time
import traceback
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st

from lorabus.schemas import ERROR_CODES
from helpers import RawHeaderKey, raw_header_keys

# ---- what the generators know about the deployment ------------------------------------------------

PRIVATE_TENANTS = ("acme",)
REPLY_TENANTS = ("acme",)  # the only tenants the worker lets reply_to the Target's reply_topic (--reply-topic)


@dataclasses.dataclass(frozen=True)
class Target:
    jobs_topic: str
    results_topic: str
    control_topic: str
    dlq_topic: str
    reply_topic: str  # a second, existing results topic: a valid reply_to
    good_adapters: tuple[str, ...]  # published as v1 for every tenant
    private_adapter: str  # published as v1 for PRIVATE_TENANTS only
    fuzz_adapters: tuple[str, ...]  # the only names the control fuzz publishes or activates
    adapter_dirs: tuple[str, ...]  # real PEFT adapter directories
    junk_dirs: tuple[str, ...]  # existing paths that hold no usable adapter
    vocab_size: int
    max_model_len: int


# ---- records -------------------------------------------------------------------------------------


@dataclasses.dataclass
class FuzzRecord:
    topic: str  # "jobs" or "control"
    value: bytes | None
    key: bytes | None
    headers: list[tuple[bytes, bytes | None]]  # raw header keys: they may not be UTF-8
    spec: object  # what hypothesis drew (hashable; distinct inputs are counted on it)
    token: str = ""  # jobs: carried in every id this record has
    ids: tuple[str, ...] = ()  # jobs: the ids a result may carry
    must: str = "none"  # jobs: "answer", "dead" or "either" (see the module docstring)
    allowed: frozenset[str] = frozenset()  # jobs: "ok" and/or error codes a result may carry
    bad: bool = False  # not a plain valid job
    oracle: tuple | None = None  # jobs: (adapter key, prompt_ids or text, max_new_tokens, has_stop) for greedy ok results
    huge: bool = False

    def size(self) -> int:
        return len(self.value or b"") + len(self.key or b"") + sum(len(k) + len(v or b"") for k, v in self.headers)


def _dumps(value, ascii_only: bool = True) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=False).encode("utf-8")


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---- job specs -------------------------------------------------------------------------------------

TENANTS = ("acme", "t-1", "zürich-AG", "🙂", "x" * 256)
ADAPTER_FORMS = ("none", "good", "good@v1", "good@v9", "private", "private@v1", "fuzz", "fuzz@v2", "fuzz@v9",
                 "unknown", "malformed", "odd-charset")
REPLY_FORMS = ("absent", "results", "reply", "missing", "jobs", "control", "dlq", "bad-name", "empty")
ID_STYLES = ("plain", "plain", "plain", "plain", "unicode", "max-length", "escaped", "control-chars", "last", "middle",
             "escaped-key", "dup-same", "dup-different", "dup-invalid", "missing", "null", "number", "empty",
             "too-long", "object", "nested-only", "surrogate", "bad-utf8", "huge-number")
KEY_STYLES = ("token", "token", "none", "empty", "bad-utf8", "big")
# Numbers as JSON text: extremes of 64-bit integers and doubles, non-JSON literals, subnormals, zeros.
NUMBER_LITERALS = ("18446744073709551616", "-9223372036854775808", "9223372036854775807", "9223372036854775808",
                   "1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1e-320", "0", "-0", "-1", "0.0", "1.5",
                   "2147483648", "9007199254740993", "1E2", "400", "4")
NUMBER_FIELDS = ("max_new_tokens", "top_k", "seed", "deadline_ms", "temperature", "top_p", "prompt_ids")
WRONG_TYPES = {  # values of a JSON type the field does not take (null only where null is not allowed)
    "tenant": ("123", "1.5", "true", "[]", '["acme"]', "{}"),
    "adapter": ("7", "false", '["good"]', '{"name": "x"}'),
    "task": ("1", "[]", "{}"),
    "user": ("true", "[1]", "0"),
    "prompt": ("42", "true", '["hello"]', '{"text": "hi"}'),
    "prompt_ids": ('"1,2,3"', "5", '[1, "2"]', "[[1]]", "[1.5]", "{}", "[true]", "[]", "[null]"),
    "max_new_tokens": ('"4"', "true", "[4]", "{}", "4.5", "null"),
    "top_k": ('"1"', "false", "[]", "null", "2.5"),
    "seed": ('"7"', "true", "[7]", "7.25"),
    "deadline_ms": ('"soon"', "[]", "{}", "1.5"),
    "temperature": ('"0.5"', "true", "[]", "{}", "null"),
    "top_p": ('"0.9"', "false", "[1]", "null"),
    "stop": ('"x"', "[1]", "[null]", "{}", "null", '[["a"]]', "true"),
    "reply_to": ("1", "[]", "{}", "true"),
}
BAD_UTF8 = (b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xa0\xa1", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80",
            b"\x80", b"\xf4\x90\x80\x80", b"\xe2\x82")
SURROGATES = ("\\ud800", "\\udfff", "\\udc00\\ud800", "\\ud800\\u0041", "\\ud83d\\ude00")  # the last is a valid pair
UNKNOWN_KEYS = ("max_tokens", "ID", "Id", "prompt ", "__proto__", "", "\u0000", "adapter_id", "idd", "x" * 1000)
HEADER_MENU = (
    ("x-tenant-id", b"acme"), ("x-tenant-id", b"t-9"), ("x-tenant-id", b""), ("x-tenant-id", None),
    ("x-tenant-id", b"\xff\xfe"), ("x-adapter-id", b"<good>"), ("x-adapter-id", b"nope-unknown"),
    ("x-adapter-id", b"a@b@c"), ("x-adapter-id", b"\xc3\x28"), ("x-model-task", b"summarize"),
    ("x-model-task", b"\xff"), ("trace", b"t-1"), ("", b"empty key"), ("ключ", "значение".encode()),
    (b"\xff\xfe", b"v"), (b"x-\xc3\x28", b"v"), (b"\xed\xa0\x80", b"surrogate key"), (b"x-tenant-id\xff", b"acme"),
    ("big", b"v" * 20000), ("many", None), ("trace", None),
)
HUGE_KINDS = (("prompt", 300_000), ("prompt", 600_000), ("prompt-total", 1_000_000), ("prompt-total", 1_040_000),
              ("prompt_ids", 50_000), ("prompt_ids", 150_000), ("unknown", 500_000), ("stop", 2000),
              ("tenant", 100_000), ("id-total", 1_000_000))
DEEP_DEPTHS = (64, 1000, 100_000)
RECORD_LIMIT = 1_040_000  # value + key + headers of the largest record sent (the broker's default cap is 1 MiB)


JOB_MUTATIONS = {  # family → strategy of one mutation
    "wrong_type": st.tuples(st.just("wrong_type"), st.sampled_from(tuple(WRONG_TYPES)), st.integers(0, 8)),
    "number": st.tuples(st.just("number"), st.sampled_from(NUMBER_FIELDS), st.sampled_from(NUMBER_LITERALS)),
    "bad_utf8": st.tuples(st.just("bad_utf8"), st.sampled_from(("prompt", "tenant", "user", "key", "stop")),
                          st.sampled_from(BAD_UTF8)),
    "surrogate": st.tuples(st.just("surrogate"), st.sampled_from(("prompt", "tenant", "user", "stop")),
                           st.sampled_from(SURROGATES)),
    "deep": st.tuples(st.just("deep"), st.sampled_from(("field", "unknown", "before_id", "top")),
                      st.sampled_from(DEEP_DEPTHS), st.sampled_from(("array", "object"))),
    "huge": st.tuples(st.just("huge"), st.sampled_from(HUGE_KINDS)),
    "null": st.tuples(st.just("null"), st.sampled_from(("adapter", "task", "user", "seed", "reply_to", "deadline_ms", "tenant",
                                                        "prompt", "prompt_ids", "max_new_tokens", "temperature", "top_p",
                                                        "top_k", "stop"))),
    "unknown_field": st.tuples(st.just("unknown_field"), st.sampled_from(UNKNOWN_KEYS)),
    "duplicate": st.tuples(st.just("duplicate"), st.sampled_from(("tenant", "prompt", "max_new_tokens", "adapter"))),
    "truncate": st.tuples(st.just("truncate"), st.floats(0.0, 0.999)),
    "trailing": st.tuples(st.just("trailing"),
                          st.sampled_from((b"x", b"}", b"\x00", b'{"id": "<token>-second"}', b"\xff", b",", b" \n"))),
    "bom": st.tuples(st.just("bom")),
    "tombstone": st.tuples(st.just("tombstone")),
    "non_object": st.tuples(st.just("non_object"), st.sampled_from((b"[]", b'"fz"', b"42", b"null", b"", b"   ", b"true",
                                                                    b'[{"id": "x"}]'))),
}


def _mutation():
    return st.one_of(*JOB_MUTATIONS.values())


@st.composite
def job_specs(draw, first=None, id_style=None):
    """Everything one jobs-topic record is made of (symbolic: `build_job` resolves it against a Target).
    `first`: a strategy for a mutation every drawn spec carries; `id_style`: force that id style."""
    base = {"tenant": draw(st.one_of(st.sampled_from(TENANTS), st.text(min_size=1, max_size=12)))}
    if draw(st.booleans()):
        base["prompt_ids"] = draw(st.lists(st.integers(0, 511), min_size=1, max_size=16))
    else:
        base["prompt"] = draw(st.text(min_size=1, max_size=40))
    for name, strategy in (
        ("max_new_tokens", st.integers(1, 8)),
        ("temperature", st.one_of(st.just(0.0), st.just(0), st.floats(1e-3, 2.0))),
        ("top_p", st.floats(1e-3, 1.0)),
        ("top_k", st.integers(0, 50)),
        ("seed", st.one_of(st.none(), st.integers(0, 2**63 - 1))),
        ("stop", st.lists(st.text(min_size=1, max_size=3), max_size=2)),
        ("task", st.text(min_size=1, max_size=8)),
        ("user", st.text(min_size=1, max_size=8)),
    ):
        if draw(st.booleans()):
            base[name] = draw(strategy)
    return (
        tuple(sorted(base.items(), key=lambda kv: kv[0], reverse=False)).__repr__(),  # a hashable, printable base
        draw(st.sampled_from(ADAPTER_FORMS)),
        draw(st.integers(0, 2)),
        draw(st.sampled_from(REPLY_FORMS)),
        draw(st.sampled_from(("absent", "null", "future", "past"))),
        id_style or draw(st.sampled_from(ID_STYLES)),
        tuple(([draw(first)] if first is not None else []) + draw(st.lists(_mutation(), max_size=2 if first is not None else 3))),
        tuple(draw(st.lists(st.integers(0, len(HEADER_MENU) - 1), max_size=4))),
        draw(st.sampled_from(KEY_STYLES)),
        draw(st.booleans()),  # ensure_ascii for the JSON text
    ), base


def _parse_literal(literal: str):
    """A JSON number literal → its value (None for the non-JSON NaN/Infinity literals)."""
    if literal in ("NaN", "Infinity", "-Infinity"):
        return None
    return json.loads(literal)


def _int_literal(literal: str) -> bool:
    return not any(c in literal for c in ".eE") and literal not in ("NaN", "Infinity", "-Infinity")


@dataclasses.dataclass
class _Outcome:
    fail: bool = False  # the body is not a valid v1 job: invalid_job, whatever else is wrong
    codes: set = dataclasses.field(default_factory=set)  # error codes a worker may answer
    ok_blocked: bool = False  # ok is impossible


def _adapter_outcome(ref: str | None, tenant, t: Target, out: set, must: list) -> None:
    if ref is None:
        return
    name, _, version = ref.partition("@")
    if ref in ("", "a@b@c") or ref.startswith("@") or ref.endswith("@") or ref.count("@") > 1:
        out.add("invalid_job"), must.append(True)
    elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
        out.update({"invalid_job", "adapter_not_found"}), must.append(True)
    elif name in t.good_adapters:
        if version not in ("", "v1"):
            out.add("adapter_not_found"), must.append(True)
    elif name == t.private_adapter:
        if version not in ("", "v1"):
            out.add("adapter_not_found"), must.append(True)
        if tenant not in PRIVATE_TENANTS:
            out.add("forbidden"), must.append(True)
    elif name in t.fuzz_adapters:  # whatever the control fuzz made of it
        out.update({"adapter_not_found", "adapter_load_failed", "forbidden"})
        if version not in ("", "v1", "v2", "v3"):
            must.append(True)
    else:
        out.add("adapter_not_found"), must.append(True)


def _base_outcome(job: dict, t: Target, now_ms: int) -> tuple[set, bool]:
    """Error codes a worker may answer a decodable job with, and whether ok is possible (README rules)."""
    codes, must = set(), []
    tenant = job.get("tenant")
    if tenant is None or tenant == "<bad-header>":
        codes.add("invalid_job"), must.append(True)
    if job.get("task") == "<bad-header>":
        codes.add("invalid_job"), must.append(True)
    if job.get("adapter") == "<bad-header>":
        codes.add("invalid_job"), must.append(True)
    elif job.get("adapter") is None and job.get("task") not in (None, "<bad-header>"):
        codes.add("adapter_not_found"), must.append(True)  # README: a task with no route (the fuzz sets none)
    else:
        _adapter_outcome(job.get("adapter"), tenant, t, codes, must)
    prompt, ids = job.get("prompt"), job.get("prompt_ids")
    if (prompt is None) == (ids is None):
        codes.add("invalid_job"), must.append(True)
    reply = job.get("reply_to")
    if reply is not None and not (isinstance(reply, str) and re.fullmatch(r"[A-Za-z0-9._-]{1,249}", reply)):
        codes.add("invalid_job"), must.append(True)  # not a topic name
    elif reply is not None and reply != t.results_topic and not (reply == t.reply_topic and tenant in REPLY_TENANTS):
        codes.add("forbidden"), must.append(True)  # README "Trust boundaries": only topics allowed to the tenant
    mnt = job.get("max_new_tokens", 64)
    limit = t.max_model_len
    if ids is not None:
        if any(i >= t.vocab_size for i in ids):
            codes.add("invalid_job"), must.append(True)
        if len(ids) + mnt > limit:
            codes.add("prompt_too_long"), must.append(True)
        elif len(ids) + mnt >= limit - 1:
            codes.add("prompt_too_long")
    elif prompt is not None:
        size = len(prompt.encode("utf-8", "surrogatepass"))
        if size > 64 * limit:  # no token of the tiny model's tokenizer spans 64 bytes
            codes.update({"prompt_too_long", "invalid_job"}), must.append(True)
        elif size + 2 + mnt >= limit - 1:
            codes.add("prompt_too_long")
        if mnt + 1 > limit:
            codes.add("prompt_too_long"), must.append(True)
    deadline = job.get("deadline_ms")
    if deadline is not None and deadline < now_ms:
        codes.add("deadline_exceeded"), must.append(True)
    return codes, not must


# README bounds of every number a job carries (field → inclusive range); outside them: invalid_job.
INT_BOUNDS = {"max_new_tokens": (1, 2**20), "top_k": (0, 2**31 - 1), "seed": (0, 2**63 - 1), "deadline_ms": (0, 2**53),
              "prompt_ids": (0, 2**31 - 1)}


def _number_effect(field: str, literal: str, job: dict, out: _Outcome) -> None:
    """Apply `field: literal` to the logical job, or mark the body invalid (README types and bounds)."""
    value = _parse_literal(literal)
    if value is None or value in (float("inf"), float("-inf")):
        out.fail = True  # NaN/Infinity are not JSON; 1e400 overflows every double
        return
    if field in INT_BOUNDS:
        low, high = INT_BOUNDS[field]
        if not _int_literal(literal) or not low <= value <= high:
            out.fail = True
        elif field == "prompt_ids":  # the first prompt token (out of the vocabulary: invalid_job, see _base_outcome)
            ids = list(job.get("prompt_ids") or [1])
            ids[0] = value
            job["prompt_ids"] = ids
            job.pop("prompt", None)
        else:
            job[field] = value
    elif field == "temperature":  # 0 (greedy) or 0.001..100
        if value != 0 and not 1e-3 <= value <= 100:
            out.fail = True
        else:
            job["temperature"] = float(value)
    elif field == "top_p":  # 1e-6..1
        if not 1e-6 <= value <= 1:
            out.fail = True
        else:
            job["top_p"] = float(value)


def _deep(depth: int, shape: str) -> bytes:
    if shape == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def _readable(value: bytes | None, id_first_intact: bool) -> tuple[str, tuple[str, ...]]:
    """("answer" | "dead" | "either", the ids a result may carry) per the module docstring's rule."""
    if value is None:
        return "dead", ()
    try:
        pairs_seen: list[list] = []

        def hook(pairs):
            pairs_seen.append(pairs)
            return dict(pairs)

        doc = json.loads(value.decode("utf-8"), object_pairs_hook=hook)
    except (ValueError, RecursionError):
        if id_first_intact:
            return "answer", ()
        if b'"id"' not in value and b"\\u0069" not in value.lower():
            return "dead", ()
        return "either", ()
    if not isinstance(doc, dict):
        return "dead", ()
    top = pairs_seen[-1]  # the outermost object closes last
    ids = [v for k, v in top if k == "id"]
    if not ids:
        return "dead", ()
    good = [v for v in ids if isinstance(v, str) and 0 < len(v) <= 256]
    if len(good) < len(ids):
        return ("dead", ()) if not good else ("either", tuple(good))
    for v in good:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return "either", ()
    if len(set(good)) > 1:
        return "either", tuple(good)
    return "answer", (good[0],)


def build_job(spec, base: dict, token: str, t: Target, now_ms: int | None = None) -> FuzzRecord:
    """Turn a drawn job spec into a record and what the README allows as its answer."""
    (_, adapter_form, adapter_idx, reply_form, deadline_form, id_style, mutations, header_picks, key_style,
     ascii_only) = spec
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    job = dict(base)
    if "prompt_ids" in job:
        job["prompt_ids"] = [i % t.vocab_size for i in job["prompt_ids"]]
    good = t.good_adapters[adapter_idx % len(t.good_adapters)]
    fuzz = t.fuzz_adapters[adapter_idx % len(t.fuzz_adapters)]
    adapter = {"none": None, "good": good, "good@v1": f"{good}@v1", "good@v9": f"{good}@v9",
               "private": t.private_adapter, "private@v1": f"{t.private_adapter}@v1", "fuzz": fuzz,
               "fuzz@v2": f"{fuzz}@v2", "fuzz@v9": f"{fuzz}@v9", "unknown": f"nope-{adapter_idx}",
               "malformed": ("a@b@c", "", "@v1")[adapter_idx], "odd-charset": ("ünï", " qv", "../x")[adapter_idx]}[adapter_form]
    if adapter is not None:
        job["adapter"] = adapter
    reply = {"absent": None, "results": t.results_topic, "reply": t.reply_topic, "missing": f"no-such-topic-{token}",
             "jobs": t.jobs_topic, "control": t.control_topic, "dlq": t.dlq_topic, "bad-name": "bad topic/..",
             "empty": ""}[reply_form]
    if reply is not None:
        job["reply_to"] = reply
    if deadline_form == "null":
        job["deadline_ms"] = None
    elif deadline_form == "future":
        job["deadline_ms"] = now_ms + 3_600_000
    elif deadline_form == "past":
        job["deadline_ms"] = now_ms - 3_600_000

    out = _Outcome()
    raw: dict[str, bytes] = {}  # field → raw JSON value text overriding the logical value
    extra: list[tuple[bytes, bytes]] = []  # members appended after the fields
    before_id: list[tuple[bytes, bytes]] = []  # members placed before the id
    tail = b""
    whole = None  # the entire value replaced (top-level nesting)
    truncate_at = None
    bom = False
    huge = False
    surrogate_text = False  # a logical string holds a lone surrogate: no PEFT comparison
    pad_total = None  # pad the prompt (or the id member) so the record reaches this many bytes
    pad_field = "prompt"
    huge_done = False
    tombstone = False

    for mutation in mutations:
        kind = mutation[0]
        if kind == "wrong_type":
            field, pick = mutation[1], mutation[2]
            choices = WRONG_TYPES[field]
            raw[field] = choices[pick % len(choices)].encode()
            job.setdefault(field, "<raw>")
            out.fail = True
        elif kind == "number":
            field, literal = mutation[1], mutation[2]
            if field == "prompt_ids":
                ids = list(job.get("prompt_ids") or [1])
                job.pop("prompt", None)
                job["prompt_ids"] = ids
                raw["prompt_ids"] = b"[" + b",".join([literal.encode()] + [str(i).encode() for i in ids[1:]]) + b"]"
                raw.pop("prompt", None)
            else:
                raw[field] = literal.encode()
                job.setdefault(field, None)
            _number_effect(field, literal, job, out)
        elif kind == "bad_utf8":
            where, bad = mutation[1], mutation[2]
            out.fail = True
            if where == "key":
                extra.append((b'"x' + bad + b'"', b"1"))
            elif where == "stop":
                job["stop"] = ["<raw>"]
                raw["stop"] = b'["a' + bad + b'"]'
            else:
                if where == "prompt":
                    job.pop("prompt_ids", None)
                    raw.pop("prompt_ids", None)
                job[where] = "<raw>"
                raw[where] = b'"ab' + bad + b'cd"'
        elif kind == "surrogate":
            where, escape = mutation[1], mutation[2]
            text = json.loads(f'"ab{escape}cd"')
            lone = escape != "\\ud83d\\ude00"
            raw_text = b'"ab' + escape.encode() + b'cd"'
            if where == "prompt":
                job.pop("prompt_ids", None)
                raw.pop("prompt_ids", None)
            if where == "stop":
                job["stop"] = [text]
                raw["stop"] = b"[" + raw_text + b"]"
            else:
                job[where] = text
                raw[where] = raw_text
            if lone:
                out.fail = True  # README: lone surrogate escapes are invalid_job
                surrogate_text = True
        elif kind == "deep":
            where, depth, shape = mutation[1], mutation[2], mutation[3]
            nest = _deep(depth, shape)
            if where == "field":
                raw["prompt_ids" if "prompt_ids" in job else "prompt"] = nest
                out.fail = True
            elif where == "unknown":
                extra.append((b'"deep"', nest))
                out.fail = True
            elif where == "before_id":
                before_id.append((b'"deep"', nest))
                out.fail = True
            else:
                whole = nest
            huge = huge or depth >= 100_000
        elif kind == "huge":
            if huge_done:
                continue  # one huge part per record keeps it under the broker's limit
            huge_done = True
            what, size = mutation[1]
            huge = True
            if what in ("prompt", "prompt-total"):
                job.pop("prompt_ids", None)
                raw.pop("prompt_ids", None)
                raw.pop("prompt", None)
                if what == "prompt":
                    job["prompt"] = ("lorabus " * (size // 8 + 1))[:size]
                else:
                    job["prompt"] = ""
                    pad_total, pad_field = size, "prompt"
            elif what == "prompt_ids":
                job.pop("prompt", None)
                raw.pop("prompt", None)
                raw.pop("prompt_ids", None)
                job["prompt_ids"] = [(7 * i) % t.vocab_size for i in range(size)]
            elif what == "unknown":
                extra.append((b'"blob"', _dumps("z" * size)))
                out.fail = True
            elif what == "stop":
                raw.pop("stop", None)
                job["stop"] = [f"s{i}" for i in range(size)]
                out.fail = True  # README: up to 16 stop strings
            elif what == "tenant":
                raw.pop("tenant", None)
                job["tenant"] = "t" * size
                out.codes.add("invalid_job")  # README states no bound on tenants
            else:  # the id member is followed by padding up to the size (an unknown field)
                pad_total, pad_field = size, "blob"
                out.fail = True
        elif kind == "null":
            field = mutation[1]
            raw.pop(field, None)
            job[field] = None
            if field in ("max_new_tokens", "temperature", "top_p", "top_k", "stop"):
                out.fail = True
        elif kind == "unknown_field":
            extra.append((_dumps(mutation[1]), b"3"))
            out.fail = True
        elif kind == "duplicate":
            field = mutation[1]
            if field in job:
                value = raw.get(field) or _dumps(job[field], ascii_only)
                if len(value) > 10_000:
                    continue
                extra.append((_dumps(field), value))
                out.codes.add("invalid_job")  # RFC 8259: names SHOULD be unique; a parser may refuse
        elif kind == "truncate":
            truncate_at = mutation[1]
            out.fail = True
        elif kind == "trailing":
            if mutation[1].strip():
                out.fail = True
            tail += mutation[1].replace(b"<token>", token.encode())  # a second object's id still names this record
        elif kind == "bom":
            bom = True
            out.codes.add("invalid_job")  # RFC 8259: parsers MAY ignore a BOM
        elif kind == "tombstone":
            tombstone = True
        elif kind == "non_object":
            whole = mutation[1]

    # Headers and key.
    headers: list[tuple[bytes, bytes | None]] = []
    for pick in header_picks:
        key, value = HEADER_MENU[pick]
        key_raw = key if isinstance(key, bytes) else key.encode()
        if key == "many":
            headers.extend((f"h{i}".encode(), b"v") for i in range(100))
            continue
        if value == b"<good>":
            value = good.encode()
        headers.append((key_raw, value))
    if huge:  # keep the biggest records within the broker's limit: small headers only
        headers = [(k, v) for k, v in headers if len(v or b"") < 100][:8]
    key_bytes = {"token": token.encode(), "none": None, "empty": b"", "bad-utf8": b"\xff\xfe" + token.encode(),
                 "big": token.encode() + b"k" * 8000}[key_style]
    if huge and key_bytes is not None:
        key_bytes = key_bytes[:64]
    if any(not _is_utf8(k) for k, _ in headers):
        out.fail = True  # README: a header key that is not UTF-8 is invalid_job

    # Header fills (README: x-tenant-id, x-adapter-id, x-model-task fill fields the body leaves out).
    variants = [dict(job)]
    for header, field in ((b"x-tenant-id", "tenant"), (b"x-adapter-id", "adapter"), (b"x-model-task", "task")):
        values = [v for k, v in headers if k == header]
        if not values:
            continue
        if job.get(field) is not None:  # the header is not used; README: a value not UTF-8 is invalid_job
            if any(v is not None and not _is_utf8(v) for v in values):
                out.codes.add("invalid_job")  # lenient: a worker may ignore a header it does not use
            continue
        candidates = []
        for v in {values[0], values[-1]}:
            if v is None or v == b"":
                candidates.append(None)
            elif not _is_utf8(v):
                candidates.append("<bad-header>")
            else:
                candidates.append(v.decode())
        if len(set(candidates)) > 1:
            out.codes.add("invalid_job")
        variants = [dict(variant, **{field: c}) for variant in variants for c in candidates]

    # The id member.
    ids: tuple[str, ...] = ()
    plain = f"{token}"
    id_members: list[tuple[bytes, bytes]] = []
    position = "first"
    id_first_intact = True
    if id_style in ("plain", "last", "middle", "dup-same", "escaped-key"):
        ids = (plain,)
        key = b'"\\u0069d"' if id_style == "escaped-key" else b'"id"'
        id_members = [(key, _dumps(plain))] + ([(b'"id"', _dumps(plain))] if id_style == "dup-same" else [])
        position = {"last": "last", "middle": "middle"}.get(id_style, "first")
        id_first_intact = id_style in ("plain", "dup-same")
        if id_style == "dup-same":
            out.codes.add("invalid_job")
    elif id_style == "unicode":
        ids = (f"{token}-é中🙂",)
        id_members = [(b'"id"', _dumps(ids[0], ascii_only))]
    elif id_style == "max-length":
        ids = (token + "m" * (256 - len(token)),)
        id_members = [(b'"id"', _dumps(ids[0]))]
    elif id_style == "escaped":
        ids = (token,)
        id_members = [(b'"id"', b'"' + "".join(f"\\u{ord(c):04x}" for c in token[:2]).encode() + token[2:].encode() + b'"')]
    elif id_style == "control-chars":
        ids = (f"{token}\u0000\n\t",)
        id_members = [(b'"id"', _dumps(ids[0]))]
    elif id_style == "dup-different":
        ids = (token + "a", token + "b")
        id_members = [(b'"id"', _dumps(ids[0])), (b'"id"', _dumps(ids[1]))]
    elif id_style == "dup-invalid":
        ids = (token,)
        id_members = [(b'"id"', _dumps(token)), (b'"id"', b"5")]
        out.fail = True
    elif id_style == "missing":
        id_members, id_first_intact = [], False
    elif id_style == "null":
        id_members, id_first_intact = [(b'"id"', b"null")], False
    elif id_style == "number":
        id_members, id_first_intact = [(b'"id"', str(int(token[2:7]) + 1).encode())], False
    elif id_style == "huge-number":
        id_members, id_first_intact = [(b'"id"', b"18446744073709551616" * 3)], False
    elif id_style == "empty":
        id_members, id_first_intact = [(b'"id"', b'""')], False
    elif id_style == "too-long":
        id_members, id_first_intact = [(b'"id"', _dumps(token + "L" * (257 - len(token))))], False
    elif id_style == "object":
        id_members, id_first_intact = [(b'"id"', b'{"id": "' + token.encode() + b'"}')], False
    elif id_style == "nested-only":
        id_members, id_first_intact = [(b'"meta"', b'{"id": "' + token.encode() + b'"}')], False
    elif id_style == "surrogate":
        ids = ()
        id_members, id_first_intact = [(b'"id"', b'"' + token.encode() + b'\\ud800"')], False
    elif id_style == "bad-utf8":
        id_members, id_first_intact = [(b'"id"', b'"' + token.encode() + b'\xff"')], False
        out.fail = True
    if before_id:
        id_first_intact = False

    members = [(_dumps(k), raw[k] if k in raw else _dumps(v, ascii_only)) for k, v in job.items()]
    if position == "first":
        body = before_id + id_members + members + extra
    elif position == "last":
        body = before_id + members + extra + id_members
    else:
        half = len(members) // 2
        body = before_id + members[:half] + id_members + members[half:] + extra

    def assemble(parts):
        return b"{" + b",".join(k + b":" + v for k, v in parts) + b"}"

    value = assemble(body)
    if pad_total is not None:  # grow the prompt (or a blob member) so the whole record is pad_total bytes
        overhead = len(key_bytes or b"") + sum(len(k) + len(v or b"") for k, v in headers)
        room = max(0, pad_total - overhead - len(value) - len(tail) - (3 if bom else 0) - 16)
        filler = _dumps(("lorabus " * (room // 8 + 1))[:room])
        if pad_field == "prompt":
            at = next(i for i, (k, _) in enumerate(body) if k == b'"prompt"')
            body = body[:at] + [(b'"prompt"', filler)] + body[at + 1:]
            job["prompt"] = json.loads(filler)
            for variant in variants:
                variant["prompt"] = job["prompt"]
        else:
            body = body + [(b'"blob"', filler)]
        value = assemble(body)
    if whole is not None:
        value = whole
    if bom:
        value = b"\xef\xbb\xbf" + value
    value += tail
    if truncate_at is not None:
        start = len(b"\xef\xbb\xbf" if bom else b"")
        id_end = start + (len(b"{" + id_members[0][0] + b":" + id_members[0][1]) if id_members and position == "first"
                          and not before_id else 0)
        cut = id_end + int(truncate_at * max(0, len(value) - id_end - 1)) + (1 if id_end else 0)
        value = value[:max(1, min(cut, len(value) - 1))]
    # Readable in bytes no parser accepts: the record opens with an intact, plain `{"id": "..."` member.
    clean = id_style in ("plain", "unicode", "max-length", "escaped", "control-chars", "dup-same")
    if clean and id_first_intact and position == "first" and not before_id and whole is None:
        opening = b"{" + id_members[0][0] + b":" + id_members[0][1]
        id_first_intact = value[3 if bom else 0:].startswith(opening)
    else:
        id_first_intact = False

    if tombstone:
        value = None
        key_bytes = token.encode() if key_bytes is None else key_bytes  # aiokafka sends no record without both
    must, read_ids = _readable(value, id_first_intact)
    if must == "answer" and not read_ids:
        read_ids = ids
    if must == "either" and not read_ids:
        read_ids = ids
    if must == "either" and token.encode() + b"-second" in tail:
        read_ids = tuple(read_ids) + (f"{token}-second",)

    allowed: set[str] = set()
    if out.fail or must == "dead":
        allowed = {"invalid_job"}
    else:
        ok_possible = False
        for variant in variants:
            codes, ok = _base_outcome(variant, t, now_ms)
            allowed |= codes
            ok_possible = ok_possible or ok
        allowed |= out.codes
        if ok_possible and not out.ok_blocked:
            allowed.add("ok")
    if "ok" not in allowed and not allowed:
        allowed = {"invalid_job"}

    oracle = None
    if "ok" in allowed and not surrogate_text and len(variants) == 1:  # one reading of the headers
        variant = variants[0]
        temperature = variant.get("temperature", 0.0)
        ref = variant.get("adapter")
        name = ref.partition("@")[0] if isinstance(ref, str) else None
        if temperature in (0, 0.0) and (name is None or name in t.good_adapters or name == t.private_adapter):
            prompt = variant.get("prompt_ids") if variant.get("prompt_ids") is not None else variant.get("prompt")
            oracle = (name, prompt, variant.get("max_new_tokens", 64), bool(variant.get("stop")))

    bad = bool(mutations or header_picks or key_style not in ("token",) or id_style != "plain" or allowed != {"ok"})
    return FuzzRecord("jobs", value, key_bytes, headers, spec, token=token, ids=read_ids, must=must,
                      allowed=frozenset(allowed), bad=bad, oracle=oracle, huge=huge or len(value or b"") > 200_000)


# ---- control specs ----------------------------------------------------------------------------------

CONTROL_NAMES = ("fuzz0", "fuzz1", "fuzz2", "bad:empty", "bad:at", "bad:dots", "bad:unicode", "bad:long")
CONTROL_VERSIONS = ("v1", "v2", "v3", "bad:empty", "bad:slash", "bad:long")
CONTROL_PATHS = ("real0", "real1", "real2", "file-real", "junk0", "junk1", "junk2", "junk3", "missing", "relative",
                 "root", "empty", "huge")
CONTROL_SHAS = ("absent", "null", "zeros", "real", "short", "nonhex")
CONTROL_TENANTS = ("absent", "null", "acme", "empty-list", "empty-string", "many")
CONTROL_FIELDS = ("type", "name", "version", "path", "sha256", "tenants")


CONTROL_MUTATIONS = {
    "wrong_type": st.tuples(st.just("wrong_type"), st.sampled_from(CONTROL_FIELDS),
                            st.sampled_from(("1", "true", "[]", "{}", '["x"]', "2.5"))),
    "number": st.tuples(st.just("number"), st.sampled_from(CONTROL_FIELDS), st.sampled_from(NUMBER_LITERALS)),
    "bad_utf8": st.tuples(st.just("bad_utf8"), st.sampled_from(("name", "version", "path", "type")), st.sampled_from(BAD_UTF8)),
    "surrogate": st.tuples(st.just("surrogate"), st.sampled_from(("name", "version", "path")), st.sampled_from(SURROGATES)),
    "deep": st.tuples(st.just("deep"), st.sampled_from(("field", "unknown", "top")), st.sampled_from(DEEP_DEPTHS),
                      st.sampled_from(("array", "object"))),
    "huge": st.tuples(st.just("huge"), st.sampled_from(("path", "tenants", "unknown")), st.sampled_from((100_000, 500_000))),
    "null": st.tuples(st.just("null"), st.sampled_from(CONTROL_FIELDS)),
    "unknown_field": st.tuples(st.just("unknown_field"), st.sampled_from(UNKNOWN_KEYS)),
    "duplicate": st.tuples(st.just("duplicate"), st.sampled_from(("type", "name", "version", "path"))),
    "truncate": st.tuples(st.just("truncate"), st.floats(0.0, 0.999)),
    "trailing": st.tuples(st.just("trailing"), st.sampled_from((b"x", b"}", b"\x00", b"\xff"))),
    "bom": st.tuples(st.just("bom")),
    "type": st.tuples(st.just("type"), st.sampled_from(("adapter.delete", "", "ADAPTER.PUBLISH", "adapter.publish ",
                                                        "<missing>"))),
    "tombstone": st.tuples(st.just("tombstone")),
    "non_object": st.tuples(st.just("non_object"), st.sampled_from((b"[]", b'"adapter.publish"', b"42", b"null", b"", b"   ",
                                                                    b"[{}]"))),
}


@st.composite
def control_specs(draw, first=None):
    return (
        draw(st.sampled_from(("adapter.publish", "adapter.publish", "adapter.activate"))),
        draw(st.sampled_from(CONTROL_NAMES)),
        draw(st.sampled_from(CONTROL_VERSIONS)),
        draw(st.sampled_from(CONTROL_PATHS)),
        draw(st.sampled_from(CONTROL_SHAS)),
        draw(st.sampled_from(CONTROL_TENANTS)),
        tuple(([draw(first)] if first is not None else [])
              + draw(st.lists(st.one_of(*CONTROL_MUTATIONS.values()), max_size=2 if first is not None else 3))),
        tuple(draw(st.lists(st.integers(0, len(HEADER_MENU) - 1), max_size=3))),
        # No "none": a compacted topic (the control topic) refuses records without a key.
        draw(st.sampled_from(("canonical", "canonical", "name", "bad-utf8", "big"))),
    )


def build_control(spec, t: Target) -> FuzzRecord:
    kind, name_form, version_form, path_form, sha_form, tenants_form, mutations, header_picks, key_style = spec
    fuzz_names = {f"fuzz{i}": n for i, n in enumerate(t.fuzz_adapters)}
    name = fuzz_names.get(name_form) or {"bad:empty": "", "bad:at": "fz@x", "bad:dots": "..", "bad:unicode": "fz-ü",
                                         "bad:long": "f" * 300}[name_form]
    version = {"bad:empty": "", "bad:slash": "v1/../v2", "bad:long": "v" * 300}.get(version_form, version_form)
    real = t.adapter_dirs
    path = {"real0": real[0], "real1": real[1 % len(real)], "real2": real[2 % len(real)], "file-real": "file://" + real[0],
            "junk0": t.junk_dirs[0], "junk1": t.junk_dirs[1 % len(t.junk_dirs)], "junk2": t.junk_dirs[2 % len(t.junk_dirs)],
            "junk3": t.junk_dirs[3 % len(t.junk_dirs)], "missing": "/nonexistent/lorabus-fuzz/adapter",
            "relative": "adapters/qv", "root": "/", "empty": "", "huge": "/tmp/" + "p" * 200_000}[path_form]
    event: dict = {"type": kind, "name": name, "version": version}
    if kind == "adapter.publish":
        event["path"] = path
        if sha_form != "absent":
            weights = Path(real[0]) / "adapter_model.safetensors"
            real_sha = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.exists() else "f" * 64
            event["sha256"] = {"null": None, "zeros": "0" * 64, "real": real_sha, "short": "abc", "nonhex": "g" * 64}[sha_form]
        if tenants_form != "absent":
            event["tenants"] = {"null": None, "acme": ["acme"], "empty-list": [], "empty-string": [""],
                                "many": [f"t{i}" for i in range(50)]}[tenants_form]
    raw: dict[str, bytes] = {}
    extra: list[tuple[bytes, bytes]] = []
    whole = None
    tail = b""
    truncate_at = None
    bom = False
    huge = path_form == "huge"
    for mutation in mutations:
        what = mutation[0]
        if what in ("wrong_type", "number"):
            raw[mutation[1]] = mutation[2].encode()
            event.setdefault(mutation[1], None)
        elif what == "bad_utf8":
            raw[mutation[1]] = b'"fz' + mutation[2] + b'"'
            event.setdefault(mutation[1], None)
        elif what == "surrogate":
            raw[mutation[1]] = b'"fz' + mutation[2].encode() + b'"'
            event.setdefault(mutation[1], None)
        elif what == "deep":
            nest = _deep(mutation[2], mutation[3])
            huge = huge or mutation[2] >= 100_000
            if mutation[1] == "field":
                raw["path"] = nest
                event.setdefault("path", None)
            elif mutation[1] == "unknown":
                extra.append((b'"deep"', nest))
            else:
                whole = nest
        elif what == "huge":
            huge = True
            field, size = mutation[1], mutation[2]
            if field == "path":
                event["path"] = "/tmp/" + "p" * size
                raw.pop("path", None)
            elif field == "tenants":
                event["tenants"] = [f"t{i}" for i in range(size // 8)]
                raw.pop("tenants", None)
            else:
                extra.append((b'"blob"', _dumps("z" * size)))
        elif what == "null":
            raw.pop(mutation[1], None)
            event[mutation[1]] = None
        elif what == "unknown_field":
            extra.append((_dumps(mutation[1]), b"1"))
        elif what == "duplicate":
            field = mutation[1]
            if field in event:
                other = {"type": "adapter.activate", "name": t.fuzz_adapters[-1], "version": "v2",
                         "path": t.junk_dirs[0]}[field]
                extra.append((_dumps(field), _dumps(other)))
        elif what == "truncate":
            truncate_at = mutation[1]
        elif what == "trailing":
            tail += mutation[1]
        elif what == "bom":
            bom = True
        elif what == "type":
            if mutation[1] == "<missing>":
                event.pop("type", None)
                raw.pop("type", None)
            else:
                event["type"] = mutation[1]
                raw.pop("type", None)
        elif what == "tombstone":
            whole = None
            event = None
            break
        elif what == "non_object":
            whole = mutation[1]
    headers: list[tuple[bytes, bytes | None]] = []
    for pick in header_picks:
        key, value = HEADER_MENU[pick]
        if key == "many":
            headers.extend((f"h{i}".encode(), b"v") for i in range(100))
            continue
        headers.append((key if isinstance(key, bytes) else key.encode(), b"fuzz" if value == b"<good>" else value))
    if huge:
        headers = [(k, v) for k, v in headers if len(v or b"") < 100][:8]
    canonical = f"{'activate' if kind == 'adapter.activate' else 'adapter'}:{name}@{version}"
    key = {"canonical": canonical.encode("utf-8", "replace")[:8000], "name": (name or "x").encode("utf-8", "replace")[:200],
           "bad-utf8": b"\xff\xfe", "big": b"k" * 8000}[key_style]
    if event is None:
        value = None
        key = b"tombstone" if key is None else key  # aiokafka sends no record without both
    elif whole is not None:
        value = whole
    else:
        members = [(_dumps(k), raw[k] if k in raw else _dumps(v)) for k, v in event.items()] + extra
        value = b"{" + b",".join(k + b":" + v for k, v in members) + b"}"
        if bom:
            value = b"\xef\xbb\xbf" + value
        value += tail
        if truncate_at is not None:
            value = value[:max(1, min(int(truncate_at * len(value)), len(value) - 1))]
    return FuzzRecord("control", value, key, headers, spec, bad=True, huge=huge)


# ---- drawing with hypothesis -------------------------------------------------------------------------


def draw_specs(strategy, count: int, huge_cap: int, seed: int | None = None, is_huge=None, fits=None) -> list:
    """`count` specs drawn by hypothesis: derandomized (the same list every run) unless a seed is given,
    no example database, no deadline; at most `huge_cap` of them huge (`is_huge(spec)`)."""
    drawn: list = []
    huge = [0]

    @settings(max_examples=count, derandomize=seed is None, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(strategy)
    def collect(spec):
        if fits is not None and not fits(spec):
            reject()
        if is_huge is not None and is_huge(spec):
            if huge[0] >= huge_cap:
                reject()
            huge[0] += 1
        drawn.append(spec)

    if seed is not None:
        from hypothesis import seed as with_seed

        collect = with_seed(seed)(collect)
    collect()
    return drawn


def _deep_bytes(mutation) -> int:
    return mutation[2] * (2 if mutation[3] == "array" else 6)


def _job_spec_is_huge(drawn) -> bool:
    spec, _ = drawn
    return any(m[0] == "huge" or (m[0] == "deep" and m[2] >= 100_000) for m in spec[6])


def _job_spec_fits(drawn) -> bool:
    """Whether the record stays under the broker's limit (padded records are sized to fit by build_job)."""
    spec, _ = drawn
    total, huge_seen = 0, False
    for m in spec[6]:
        if m[0] == "deep":
            total += _deep_bytes(m)
        elif m[0] == "huge" and not huge_seen:
            huge_seen = True
            what, size = m[1]
            total += {"prompt": size, "prompt_ids": 4 * size, "unknown": size, "stop": 8 * size, "tenant": size}.get(what, 0)
    return total <= 900_000


def _control_spec_is_huge(spec) -> bool:
    return spec[3] == "huge" or any(m[0] == "huge" or (m[0] == "deep" and m[2] >= 100_000) for m in spec[6])


def _control_spec_fits(spec) -> bool:
    total = 200_000 if spec[3] == "huge" else 0
    for m in spec[6]:
        if m[0] == "deep":
            total += _deep_bytes(m)
        elif m[0] == "huge":
            total += m[2]
    return total <= 900_000


def job_quotas() -> list:
    """(strategy, count) pairs every batch draws first, so each family the issue lists is there whatever
    hypothesis's version does with the rest: every mutation family twice, every number literal, every huge
    kind, every id style, then a 100k-deep nesting."""
    quotas = [(job_specs(first=strategy), 2) for strategy in JOB_MUTATIONS.values() if strategy is not JOB_MUTATIONS["huge"]]
    quotas += [(job_specs(first=st.tuples(st.just("number"), st.sampled_from(NUMBER_FIELDS), st.just(literal))), 1)
               for literal in NUMBER_LITERALS]
    quotas += [(job_specs(first=st.just(("huge", kind))), 1) for kind in HUGE_KINDS]
    quotas += [(job_specs(id_style=style), 1) for style in dict.fromkeys(ID_STYLES)]
    # A readable id in a body that fails validation: the id must still be found (README), wherever it is.
    quotas += [(job_specs(first=JOB_MUTATIONS["wrong_type"], id_style=style), 1)
               for style in ("last", "middle", "escaped-key", "unicode", "max-length", "escaped", "control-chars", "dup-same")]
    quotas += [(job_specs(first=st.tuples(st.just("deep"), st.sampled_from(("field", "unknown", "before_id")),
                                          st.just(100_000), st.sampled_from(("array", "object")))), 1)]
    return quotas


def control_quotas() -> list:
    quotas = [(control_specs(first=strategy), 2) for strategy in CONTROL_MUTATIONS.values()]
    quotas += [(control_specs(first=st.tuples(st.just("deep"), st.sampled_from(("field", "unknown", "top")),
                                              st.just(100_000), st.just("array"))), 1)]
    return quotas


def _draw_with_quotas(quotas: list, strategy, count: int, huge_cap: int, seed, is_huge, fits) -> list:
    drawn = []
    for quota_strategy, n in quotas:
        if len(drawn) + n > count:
            break
        drawn += draw_specs(quota_strategy, n, n, seed, None, fits)
    forced_huge = sum(1 for spec in drawn if is_huge(spec))
    drawn += draw_specs(strategy, count - len(drawn), max(0, huge_cap - forced_huge), seed, is_huge, fits)
    return drawn


def draw_records(t: Target, jobs: int, control: int, huge_cap: int,
                 seed: int | None = None) -> tuple[list[FuzzRecord], list[FuzzRecord]]:
    """Job and control records built from hypothesis-drawn specs; each job record gets a unique token.
    The quotas come first (when `jobs`/`control` leave room for them), free draws fill the rest."""
    job_drawn = _draw_with_quotas(job_quotas(), job_specs(), jobs, huge_cap, seed, _job_spec_is_huge, _job_spec_fits)
    control_drawn = _draw_with_quotas(control_quotas(), control_specs(), control, max(2, huge_cap // 3), seed,
                                      _control_spec_is_huge, _control_spec_fits)
    now_ms = int(time.time() * 1000)
    job_records = [build_job(spec, base, f"fz{i:05d}x", t, now_ms) for i, (spec, base) in enumerate(job_drawn)]
    control_records = [build_control(spec, t) for spec in control_drawn]
    for record in job_records + control_records:  # the producer refuses records over 1 MiB
        assert record.size() <= RECORD_LIMIT + 4096, (record.spec, record.size())
    return job_records, control_records


# ---- sending records whose header keys are not UTF-8 ---------------------------------------------


def kafka_headers(headers: list[tuple[bytes, bytes | None]]) -> list[tuple[str, bytes | None]]:
    return [(k.decode() if _is_utf8(k) else RawHeaderKey(k), v) for k, v in headers]


# ---- the harness ------------------------------------------------------------------------------------

TOKEN = re.compile(r"fz\d{5}x")
PROMPTS = ("the quick brown fox", "hello world", "summarize: the meeting moved to thursday",
           "classify sentiment: i loved this film", "jobs arrive on kafka", "translate english to french: hello")


@dataclasses.dataclass
class FuzzReport:
    target: Target
    jobs: list[FuzzRecord]
    control: list[FuzzRecord]
    good: dict  # good job id → (adapter name or None, prompt_ids, max_new_tokens)
    placed: dict = dataclasses.field(default_factory=dict)  # job record index → (partition, offset)
    results: dict = dataclasses.field(default_factory=dict)  # result id → [JobResult]
    undecodable: list = dataclasses.field(default_factory=list)  # raw values on results topics that are no JobResult
    reader_errors: list = dataclasses.field(default_factory=list)  # our own reader's fetch failures
    letters: list = dataclasses.field(default_factory=list)  # dead letters (ConsumerRecord)
    alive: bool = False  # the first worker's run task was running when the traffic had settled
    crash: str = ""
    settled: bool = False
    lag: int | None = None
    jobs_topic_end: int = 0
    jobs_sent: int = 0
    control_topic_end: int = 0
    control_sent: int = 0
    restart: dict = dataclasses.field(default_factory=dict)
    seconds: dict = dataclasses.field(default_factory=dict)
    problems: list = dataclasses.field(default_factory=list)
    by_token: dict = dataclasses.field(default_factory=dict)  # fz token → [JobResult]
    by_origin: dict = dataclasses.field(default_factory=dict)  # (topic, partition, offset) → [dead letter]

    def add_result(self, result) -> None:
        self.results.setdefault(result.id, []).append(result)
        match = TOKEN.search(result.id)
        if match:
            self.by_token.setdefault(match.group(), []).append(result)

    def add_letter(self, letter) -> None:
        self.letters.append(letter)
        self.by_origin.setdefault(_dlq_origin(letter), []).append(letter)

    # -- attribution --
    def results_for(self, record: FuzzRecord) -> list:
        return list(self.by_token.get(record.token, ()))

    def letters_for(self, index: int) -> list:
        partition, offset = self.placed[index]
        return list(self.by_origin.get((self.target.jobs_topic, partition, offset), ()))

    def distinct_bad(self) -> tuple[int, int]:
        jobs = {repr(r.spec) for r in self.jobs if r.bad}
        control = {repr(r.spec) for r in self.control}
        return len(jobs), len(control)


def _dlq_origin(letter) -> tuple[str, int, int] | None:
    headers = {}
    for key, value in letter.headers or ():
        headers.setdefault(key, value)
    try:
        return headers["x-dlq-topic"].decode(), int(headers["x-dlq-partition"]), int(headers["x-dlq-offset"])
    except (KeyError, ValueError, AttributeError):
        return None


async def _end_offsets(bootstrap: str, topic: str) -> int:
    from aiokafka import AIOKafkaConsumer

    from lorabus.worker.client import topic_partitions

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        parts = await topic_partitions(bootstrap, topic)
        return sum((await consumer.end_offsets(parts)).values())
    finally:
        await consumer.stop()


class Collector:
    """Reads results (results and reply topics) and dead letters from the beginning, in the background."""

    def __init__(self, bootstrap: str, report: FuzzReport):
        self.bootstrap, self.report = bootstrap, report
        self.task = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        from lorabus.worker.client import topic_partitions

        t = self.report.target
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                         auto_offset_reset="earliest", max_partition_fetch_bytes=2 << 20)
        await self.consumer.start()
        parts = []
        for topic in (t.results_topic, t.reply_topic, t.dlq_topic):
            parts += await topic_partitions(self.bootstrap, topic)
        self.consumer.assign(parts)
        await self.consumer.seek_to_beginning(*parts)
        self.task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        from lorabus.schemas import decode_result

        dlq = self.report.target.dlq_topic
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=200)
            except Exception as exc:  # noqa: BLE001 - e.g. a record aiokafka cannot parse: report it, keep reading
                self.report.reader_errors.append(f"{type(exc).__name__}: {exc}"[:300])
                await asyncio.sleep(0.5)
                continue
            for tp, records in batches.items():
                for record in records:
                    if tp.topic == dlq:
                        self.report.add_letter(record)
                        continue
                    try:
                        result = decode_result(record.value)
                    except Exception:  # noqa: BLE001 - anything on a results topic that is no JobResult
                        self.report.undecodable.append(record.value[:200] if record.value else record.value)
                        continue
                    self.report.add_result(result)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.consumer.stop()


def run_task_of(worker) -> asyncio.Task | None:
    """The asyncio task running `worker.run()` (tests.helpers.running_worker keeps it to itself)."""
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        frame = getattr(coro, "cr_frame", None)
        if getattr(coro, "__qualname__", "") == "Worker.run" and frame is not None and frame.f_locals.get("self") is worker:
            return task
    return None


def make_junk_dirs(root: Path, adapter_dir: Path) -> tuple[str, ...]:
    """Existing paths that are no usable adapter: garbage config, config without weights, garbage weights, a file."""
    root.mkdir(parents=True, exist_ok=True)
    garbage = root / "garbage-config"
    garbage.mkdir(exist_ok=True)
    (garbage / "adapter_config.json").write_bytes(b"\xff{not json")
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    no_weights = root / "no-weights"
    no_weights.mkdir(exist_ok=True)
    (no_weights / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    bad_weights = root / "bad-weights"
    bad_weights.mkdir(exist_ok=True)
    (bad_weights / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    (bad_weights / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": [1, 2, 3]}")
    plain_file = root / "a-file"
    plain_file.write_bytes(b"not a directory")
    return str(garbage), str(no_weights), str(bad_weights), str(plain_file)


async def run_fuzz(kafka: str, model_dir: Path, adapters: dict[str, Path], workdir: Path, *, jobs: int, control: int,
                   good: int, huge_cap: int, seed: int | None = None, restart: bool = True, settle_s: float = 240,
                   quiet_s: float = 45, oracle=None, control_log: int = 0, say=print) -> FuzzReport:
    """Publish the good adapters, send the fuzz stream (job and control records interleaved with good
    greedy jobs, then a sentinel adapter and its jobs) to one in-process worker, wait until every record
    is accounted for (or nothing new arrived for `quiet_s`, or `settle_s` passed), then restart a worker on the
    same group and watch that nothing is answered again. `control_log` names published before the worker
    starts make it start (and restart) on a control log of that size."""
    from aiokafka import AIOKafkaProducer
    from transformers import AutoConfig

    from lorabus.schemas import AdapterPublish
    from helpers import committed_lag, publish_control_bulk, running_worker, worker_config
    from lorabus.worker.client import publish_control
    from lorabus.worker.topics import ensure_topics, ensure_worker_topics

    config = worker_config(kafka, model_dir, worker_id="fuzz-1")
    reply_topic = config.results_topic.replace("results-", "replies-")
    config = dataclasses.replace(config, reply_topic=[f"{tenant}={reply_topic}" for tenant in REPLY_TENANTS])
    await ensure_topics(kafka, {reply_topic: 1})
    model_config = AutoConfig.from_pretrained(model_dir)
    names = sorted(adapters)
    tag = config.jobs_topic.split("-")[-1]
    target = Target(
        jobs_topic=config.jobs_topic, results_topic=config.results_topic, control_topic=config.control_topic,
        dlq_topic=config.dlq_topic, reply_topic=reply_topic, good_adapters=tuple(names), private_adapter=f"priv-{tag}",
        fuzz_adapters=tuple(f"fz{i}-{tag}" for i in range(3)), adapter_dirs=tuple(str(adapters[n]) for n in names),
        junk_dirs=make_junk_dirs(workdir / "junk", adapters[names[0]]), vocab_size=model_config.vocab_size,
        max_model_len=model_config.max_position_embeddings,
    )
    t0 = time.monotonic()
    job_records, control_records = draw_records(target, jobs, control, huge_cap, seed)
    sentinel = f"sentinel-{tag}"
    private_dir = adapters[names[0]]
    adapter_dir = {None: None, **adapters, target.private_adapter: private_dir, sentinel: private_dir}
    report = FuzzReport(target, job_records, control_records, {})
    report.seconds["generate"] = time.monotonic() - t0

    def good_job(job_id: str, adapter: str | None, i: int) -> bytes:
        prompt = PROMPTS[i % len(PROMPTS)]
        ids = oracle.prompt_ids(prompt)
        job = {"id": job_id, "tenant": "acme", "max_new_tokens": 4 + i % 5}
        if adapter is not None:
            job["adapter"] = adapter if i % 2 else f"{adapter}@v1"
        if i % 3:
            job["prompt"] = prompt
        else:
            job["prompt_ids"] = ids
        report.good[job_id] = (adapter, ids, job["max_new_tokens"])
        return json.dumps(job).encode()

    # The stream: fuzz jobs with a good job every `every` records and the control records spread evenly.
    stream: list[tuple[str, object]] = []
    every = max(1, len(job_records) // max(1, good))
    control_every = max(1, len(job_records) // max(1, len(control_records)))
    ci = gi = 0
    for i, record in enumerate(job_records):
        stream.append(("job", i))
        if i % every == every - 1 and gi < good:
            stream.append(("good", gi))
            gi += 1
        if i % control_every == 0 and ci < len(control_records):
            stream.append(("control", ci))
            ci += 1
    stream += [("control", j) for j in range(ci, len(control_records))] + [("good", j) for j in range(gi, good)]
    good_names = [None, *names]

    if control_log:
        t2 = time.monotonic()
        await ensure_worker_topics(config)  # as the worker would create them, before it exists
        await publish_control_bulk(kafka, config.control_topic, [AdapterPublish(f"bulk{i}-{tag}", "v1", str(private_dir))
                                                                 for i in range(control_log)])
        report.control_sent += control_log
        report.seconds["control log"] = time.monotonic() - t2
        say(f"published {control_log} adapter names before the worker starts")

    with raw_header_keys():
        collector = None
        try:
            async with running_worker(config) as worker:
                await asyncio.sleep(0)
                task = run_task_of(worker)
                await publish_control(kafka, config.control_topic,
                                      [AdapterPublish(n, "v1", str(adapters[n])) for n in names]
                                      + [AdapterPublish(target.private_adapter, "v1", str(private_dir),
                                                        tenants=list(PRIVATE_TENANTS))])
                report.control_sent += len(names) + 1
                collector = Collector(kafka, report)
                await collector.start()
                producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all", enable_idempotence=True, linger_ms=5)
                await producer.start()
                try:
                    t1 = time.monotonic()
                    futures = []
                    for what, i in stream:
                        if what == "job":
                            r = job_records[i]
                            futures.append((i, await producer.send(config.jobs_topic, r.value, key=r.key,
                                                                   headers=kafka_headers(r.headers))))
                        elif what == "control":
                            r = control_records[i]
                            await producer.send(config.control_topic, r.value, key=r.key, headers=kafka_headers(r.headers))
                            report.control_sent += 1
                        else:
                            adapter = good_names[i % len(good_names)]
                            await producer.send(config.jobs_topic, good_job(f"good-{i}", adapter, i), key=f"good-{i}".encode())
                        report.jobs_sent += what != "control"
                    await producer.flush()
                    for i, future in futures:
                        metadata = await future
                        report.placed[i] = (metadata.partition, metadata.offset)
                    # After every control record: a new adapter, and jobs for it (the control reader is still applying events).
                    await publish_control(kafka, config.control_topic, [AdapterPublish(sentinel, "v1", str(private_dir))])
                    report.control_sent += 1
                    for i in range(4):
                        await producer.send(config.jobs_topic, good_job(f"sentinel-{i}", sentinel, i), key=b"sentinel")
                        report.jobs_sent += 1
                    await producer.flush()
                    report.seconds["send"] = time.monotonic() - t1
                    say(f"sent {len(job_records)} fuzz job records, {len(control_records)} control records and "
                        f"{len(report.good)} good jobs in {report.seconds['send']:.1f} s")

                    deadline = time.monotonic() + settle_s
                    seen, quiet_since = -1, time.monotonic()
                    while time.monotonic() < deadline and not (task is not None and task.done()):
                        if _accounted(report):
                            report.settled = True
                            break
                        arrived = sum(len(v) for v in report.results.values()) + len(report.letters)
                        if arrived != seen:
                            seen, quiet_since = arrived, time.monotonic()
                        elif time.monotonic() - quiet_since > quiet_s:
                            say(f"nothing new for {quiet_s:g} s: not waiting longer")
                            break
                        await asyncio.sleep(0.5)
                    report.seconds["settle"] = time.monotonic() - t1
                    lag_deadline = time.monotonic() + 30
                    while True:
                        report.lag = await committed_lag(kafka, config.group_id, config.jobs_topic)
                        if report.lag == 0 or time.monotonic() > lag_deadline:
                            break
                        await asyncio.sleep(0.3)
                    report.alive = task is not None and not task.done()
                    if task is not None and task.done():
                        report.crash = repr(task.exception()) if not task.cancelled() else "cancelled"
                finally:
                    await producer.stop()
        except Exception as exc:  # noqa: BLE001 - running_worker re-raises what ended the run task
            report.alive = False
            report.crash = report.crash or "".join(traceback.format_exception_only(exc)).strip()[:2000]
        before = (sum(len(v) for v in report.results.values()), len(report.letters))

        if restart and report.alive:  # a second worker on the same group: nothing may be answered or dead-lettered again
            second = dataclasses.replace(config, worker_id="fuzz-2")
            try:
                async with running_worker(second) as worker2:
                    await asyncio.sleep(0)
                    task2 = run_task_of(worker2)
                    t2 = time.monotonic()
                    while time.monotonic() - t2 < 60 and not (task2 and task2.done()):
                        consumer = getattr(worker2, "jobs", None)
                        if consumer is not None and consumer.assignment():
                            break
                        await asyncio.sleep(0.1)
                    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
                    await producer.start()
                    await producer.send_and_wait(config.jobs_topic, good_job("after-restart", sentinel, 1), key=b"after")
                    await producer.stop()
                    report.jobs_sent += 1
                    while "after-restart" not in report.results and time.monotonic() - t2 < 60 and not (task2 and task2.done()):
                        await asyncio.sleep(0.2)
                    await asyncio.sleep(3)  # room for any re-delivery to show
                    report.restart["alive"] = task2 is not None and not task2.done()
                    report.restart["crash"] = repr(task2.exception()) if task2 is not None and task2.done() else ""
                    report.restart["answered_sentinel"] = "after-restart" in report.results
                    report.restart["seconds"] = time.monotonic() - t2
            except Exception as exc:  # noqa: BLE001 - what ended the second worker's run task
                report.restart["alive"] = False
                report.restart["crash"] = "".join(traceback.format_exception_only(exc)).strip()[:2000]
            await asyncio.sleep(1)
            after = (sum(len(v) for v in report.results.values()) - len(report.results.get("after-restart", [])),
                     len(report.letters))
            report.restart["new_results"] = after[0] - before[0]
            report.restart["new_letters"] = after[1] - before[1]
        if collector is not None:
            await collector.stop()
    report.jobs_topic_end = await _end_offsets(kafka, config.jobs_topic)
    report.control_topic_end = await _end_offsets(kafka, config.control_topic)
    report.seconds["total"] = time.monotonic() - t0
    audit(report, oracle, adapter_dir)
    return report


def _accounted(report: FuzzReport) -> bool:
    if not all(job_id in report.results for job_id in report.good):
        return False
    jobs_topic = report.target.jobs_topic
    for i, record in enumerate(report.jobs):
        answered = record.token in report.by_token if record.must != "dead" else False
        lettered = (jobs_topic, *report.placed[i]) in report.by_origin
        if record.must == "answer" and not answered:
            return False
        if record.must == "dead" and not lettered:
            return False
        if record.must == "either" and not (answered or lettered):
            return False
    return True


def audit(report: FuzzReport, oracle, adapter_dir: dict) -> None:
    """Every invariant, as a list of readable problems (empty = all hold)."""
    p = report.problems
    t = report.target
    if not report.alive:
        p.append(f"the worker's run task ended: {report.crash or 'not found'}")
    if not report.settled:
        p.append("the wait ended before every record was answered or dead-lettered as required (see below)")
    if report.lag != 0:
        p.append(f"the group's committed offsets are {report.lag} records short of the end of the jobs topic")
    if report.jobs_topic_end != report.jobs_sent:
        p.append(f"the jobs topic holds {report.jobs_topic_end} records, {report.jobs_sent} were sent: the worker wrote to it")
    if report.control_topic_end != report.control_sent:
        p.append(f"the control topic holds {report.control_topic_end} records, {report.control_sent} were sent")
    for error in report.reader_errors[:3]:
        p.append(f"reading the results and dead-letter topics failed: {error}")
    for value in report.undecodable[:5]:
        p.append(f"a results topic holds a record that is no JobResult: {value!r:.120}")
    if report.restart:
        if not report.restart.get("alive"):
            p.append(f"the restarted worker's run task ended: {report.restart.get('crash')}")
        if not report.restart.get("answered_sentinel"):
            p.append("the restarted worker did not answer a job sent to it")
        if report.restart.get("new_results") or report.restart.get("new_letters"):
            p.append(f"the restarted worker answered {report.restart['new_results']} results and "
                     f"{report.restart['new_letters']} dead letters again")
    known_letters = set()
    for i, record in enumerate(report.jobs):
        label = f"{record.token} {record.must} {_describe(record)}"
        results = report.results_for(record)
        letters = report.letters_for(i)
        known_letters.update(id(r) for r in letters)
        if record.must == "answer":
            if len(results) != 1:
                p.append(f"{label}: {len(results)} results (want 1)")
            if letters:
                p.append(f"{label}: dead-lettered ({_letter_code(letters[0])}) although its id is readable")
        elif record.must == "dead":
            if results:
                p.append(f"{label}: answered {[r.id for r in results]} although it has no readable id")
            if len(letters) != 1:
                p.append(f"{label}: {len(letters)} dead letters (want 1)")
        else:
            if len(results) + len(letters) != 1:
                p.append(f"{label}: {len(results)} results and {len(letters)} dead letters (want one of them)")
        for result in results:
            _check_result(p, label, record, result, oracle, adapter_dir, t)
        for letter in letters:
            _check_letter(p, label, record, letter, t)
    for letter in report.letters:
        if id(letter) not in known_letters:
            p.append(f"a dead letter that belongs to no fuzz record: origin {_dlq_origin(letter)}, key {letter.key!r:.60}, "
                     f"code {_letter_code(letter)}")
    for job_id, (adapter, ids, max_new) in report.good.items():
        results = report.results.get(job_id, [])
        if len(results) != 1:
            p.append(f"good job {job_id}: {len(results)} results (want 1)")
        for result in results:
            if result.status != "ok":
                p.append(f"good job {job_id}: {result.status} {result.error}")
                continue
            try:
                oracle.assert_matches(adapter_dir[adapter], ids, result.token_ids, max_new, label=job_id)
            except AssertionError as exc:
                p.append(str(exc))
    tokens = {r.token for r in report.jobs}
    for result_id in report.results:
        match = TOKEN.search(result_id)
        if result_id not in report.good and result_id != "after-restart" and not (match and match.group() in tokens):
            p.append(f"a result for an id nobody sent: {result_id!r:.80}")


def _describe(record: FuzzRecord) -> str:
    spec = record.spec
    return (f"[adapter={spec[1]} reply={spec[3]} deadline={spec[4]} id={spec[5]} mutations={list(spec[6])!r:.300} "
            f"headers={[HEADER_MENU[i][0] for i in spec[7]]!r} key={spec[8]} allowed={sorted(record.allowed)} "
            f"value[:120]={(record.value or b'')[:120]!r}]")


def _letter_code(letter) -> str:
    return dict((k, v) for k, v in (letter.headers or ())).get("x-dlq-code", b"?").decode("utf-8", "replace")


def _check_result(p: list, label: str, record: FuzzRecord, result, oracle, adapter_dir: dict, t: Target) -> None:
    if record.ids and result.id not in record.ids:
        p.append(f"{label}: answered with id {result.id!r:.80}, want one of {record.ids!r:.120}")
    if result.status == "ok":
        if "ok" not in record.allowed:
            p.append(f"{label}: answered ok")
            return
        if result.error is not None or any(not 0 <= i < t.vocab_size for i in result.token_ids):
            p.append(f"{label}: malformed ok result {result!r:.300}")
        if result.usage.completion_tokens != len(result.token_ids) or result.finish_reason not in ("stop", "length"):
            p.append(f"{label}: inconsistent ok result {result!r:.300}")
        if record.oracle is not None:
            name, prompt, max_new, has_stop = record.oracle
            if (result.adapter, result.adapter_version) != ((name, "v1") if name else (None, None)):
                p.append(f"{label}: served by {result.adapter}@{result.adapter_version}, asked for {name}")
            ids = prompt if isinstance(prompt, list) else oracle.prompt_ids(prompt)
            if result.usage.prompt_tokens != len(ids):
                p.append(f"{label}: prompt_tokens {result.usage.prompt_tokens}, the tokenizer gives {len(ids)}")
            if len(result.token_ids) > max_new or (not result.token_ids and max_new):
                p.append(f"{label}: {len(result.token_ids)} tokens for max_new_tokens {max_new}")
            try:
                oracle.assert_matches(adapter_dir.get(name), ids, result.token_ids,
                                      len(result.token_ids) if has_stop else max_new, label=record.token)
            except AssertionError as exc:
                p.append(f"{label}: {exc}")
        return
    if result.status != "error" or result.error is None:
        p.append(f"{label}: status {result.status!r} without an error")
        return
    if result.error.code not in ERROR_CODES:
        p.append(f"{label}: undocumented error code {result.error.code!r}")
    elif result.error.code not in record.allowed:
        p.append(f"{label}: answered {result.error.code} ({result.error.message[:160]!r})")
    if not result.error.message:
        p.append(f"{label}: error {result.error.code} without a message")


def _check_letter(p: list, label: str, record: FuzzRecord, letter, t: Target) -> None:
    truncated = dict((k, v) for k, v in (letter.headers or ())).get("x-dlq-truncated")
    if truncated is not None:  # a copy cut down to fit the broker: a prefix, and the original length
        if record.size() < 900_000 or truncated != str(len(record.value or b"")).encode() \
                or not (record.value or b"").startswith(letter.value or b""):
            p.append(f"{label}: truncated dead letter (x-dlq-truncated={truncated!r}) of a {record.size()}-byte record")
        return
    if letter.value != record.value:
        p.append(f"{label}: the dead letter's value differs from the record's ({len(letter.value or b'')} vs "
                 f"{len(record.value or b'')} bytes)")
    if letter.key != record.key:
        p.append(f"{label}: the dead letter's key {letter.key!r:.60} differs from the record's {record.key!r:.60}")
    headers = list(letter.headers or ())
    original = [(k, v) for k, v in headers if not k.startswith("x-dlq-")]
    if len(original) != len(record.headers) or [v for _, v in original] != [v for _, v in record.headers]:
        p.append(f"{label}: the dead letter's original headers differ: {original!r:.200} vs {record.headers!r:.200}")
    else:
        for (key, _), (raw, _) in zip(original, record.headers):
            if _is_utf8(raw) and key != raw.decode():
                p.append(f"{label}: header key {raw!r} became {key!r} on the dead letter")
    dlq = dict((k, v) for k, v in headers if k.startswith("x-dlq-"))
    for name in ("x-dlq-code", "x-dlq-reason", "x-dlq-topic", "x-dlq-partition", "x-dlq-offset", "x-dlq-timestamp",
                 "x-dlq-worker"):
        if not dlq.get(name):
            p.append(f"{label}: the dead letter lacks {name}")
    code = dlq.get("x-dlq-code", b"").decode("utf-8", "replace")
    if code not in ERROR_CODES or code == "internal":
        p.append(f"{label}: dead letter code {code!r}")


def summary(report: FuzzReport) -> str:
    """A table of what was sent and what came back."""
    codes = Counter()
    for record in report.jobs:
        for result in report.results_for(record):
            codes["ok" if result.status == "ok" else result.error.code] += 1
    musts = Counter(r.must for r in report.jobs)
    letters = len(report.letters)
    arguable = Counter("answered" if report.results_for(r) else "dead-lettered" if report.letters_for(i) else "neither"
                       for i, r in enumerate(report.jobs) if r.must == "either" and i in report.placed)
    bad_jobs, bad_control = report.distinct_bad()
    rows = [
        ("job records sent (fuzz)", len(report.jobs)),
        ("  readable id / none / arguable", f"{musts['answer']} / {musts['dead']} / {musts['either']}"),
        ("control records sent (fuzz)", len(report.control)),
        ("good greedy jobs sent", len(report.good)),
        ("distinct bad job inputs", bad_jobs),
        ("distinct bad control inputs", bad_control),
        ("bytes sent (fuzz)", sum(r.size() for r in report.jobs + report.control)),
        ("largest record (bytes)", max((r.size() for r in report.jobs + report.control), default=0)),
        *[(f"answered {code}", n) for code, n in sorted(codes.items())],
        ("dead-lettered", letters),
        ("  arguable ones answered / dead-lettered", f"{arguable['answered']} / {arguable['dead-lettered']}"),
        ("good jobs answered ok", sum(1 for j in report.good if any(r.status == "ok" for r in report.results.get(j, [])))),
        ("committed lag at the end", report.lag),
        ("re-answered after restart", report.restart.get("new_results", "-")),
        ("invariant violations", len(report.problems)),
        *[(f"wall time {k} (s)", f"{v:.1f}") for k, v in report.seconds.items()],
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{width}} | {v!s:>12} |" for k, v in rows)
