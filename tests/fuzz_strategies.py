"""Hostile Kafka records for lorabus, drawn with hypothesis: the strategies that draw *specs*, and the
builders that turn a spec into a record's bytes (with tests/fuzz_expected.py saying what a worker may
answer it with).

A job spec is a valid v1 job (docs/wire-contract.md, `schemas/v1.py`) plus mutations (wrong types,
extreme numbers written as JSON text, NaN/Infinity literals, bad UTF-8, lone-surrogate escapes, 100k-deep
nesting, several-hundred-KB prompts, records near 1 MB, nulls, unknown fields, duplicated keys,
truncation, trailing bytes, a BOM; the generation controls at and past their bounds, logit_bias and
stop_token_ids outside the vocabulary, response formats valid, malformed, uncompilable and hostile), its Kafka headers (including header keys and values that are not
UTF-8) and its key; a control spec is the same for an adapter.publish / adapter.activate event, plus
tombstones, unknown and missing `type` tags. Every job spec is tagged with a unique token `fzNNNNNx`
carried in its id, so results are attributed to records by that token (tests/fuzz_harness.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st

from fuzz_expected import (FLOAT_BOUNDS, ID_LENGTH, INT_BOUNDS, MAX_BIAS_ENTRIES, MAX_CHOICE_CHARS, MAX_CHOICE_ENTRIES,
                           MAX_PATTERN_CHARS, MAX_STOP_TOKEN_IDS, Faults, FuzzRecord, Target, allowed_answers,
                           greedy_oracle, is_utf8, null_fault, number_fault, parse_number, readable, stop_fault)

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
    "content_special_tokens": ("1", "0", '"true"', '"false"', "[]", "{}", "1.5"),
    "min_p": ('"0.1"', "true", "[0.1]"),
    "repetition_penalty": ('"1.2"', "false", "{}"),
    "n": ('"2"', "1.5", "true", "[2]"),
    "logprobs": ('"1"', "true", "1.5"),
    "ignore_eos": ("1", '"true"', "[]"),
    "stream": ("0", '"yes"', "{}"),
    "logit_bias": ("[1]", '"0:1"', "5", '{"1": "a"}', '{"x": 1}', '{"1.5": 1}'),
    "stop_token_ids": ('"1"', "[1.5]", "{}", '["1"]'),
    "response_format": ('"json"', "[]", "{}", '{"type": "xml"}', '{"type": "regex"}', '{"type": "json_schema", "schema": []}',
                        '{"type": "json_object", "extra": 1}', '{"type": "choice", "choices": "yes"}'),
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
# The generation controls' numbers at and just past their bounds (read from the schema by fuzz_expected).
CONTROL_NUMBERS = ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_new_tokens", "logprobs",
                   "prompt_logprobs", "n", "stream_every_tokens")


def _bound_literals(field: str) -> tuple[str, ...]:
    if field in INT_BOUNDS:
        low, high = INT_BOUNDS[field]
        return str(low), str(high), str(low - 1), str(high + 1)
    low, high, _ = FLOAT_BOUNDS[field]  # low itself is past an exclusive bound (repetition_penalty's 0)
    return repr(low), repr(high), repr(math.nextafter(low, -math.inf)), repr(math.nextafter(low, math.inf)), \
        repr(math.nextafter(high, math.inf))


BOUND_NUMBERS = tuple((field, literal) for field in CONTROL_NUMBERS for literal in _bound_literals(field))
# Structured generation controls: (field, raw JSON value, what a worker reads, the fault it makes or None).
# A token id of 512 or more is outside the tiny model's vocabulary (fuzz_expected.job_codes: invalid_job).
GENERATION_MENU = (
    ("logit_bias", b"{}", {}, None),
    ("logit_bias", b'{"0": 100, "511": -100.0}', {0: 100, 511: -100.0}, None),
    ("logit_bias", b'{"7": 100.5}', {7: 0}, "out_of_bounds"),
    ("logit_bias", b'{"-1": 1}', {0: 1}, "out_of_bounds"),
    ("logit_bias", b'{"2147483648": 1}', {0: 1}, "out_of_bounds"),
    ("logit_bias", b'{"512": 1}', {512: 1}, None),
    ("logit_bias", b'{"3": NaN}', {3: 0}, "not_json_number"),
    ("logit_bias", json.dumps({str(i): 1 for i in range(MAX_BIAS_ENTRIES)}).encode(),
     {i: 1 for i in range(MAX_BIAS_ENTRIES)}, None),
    ("logit_bias", json.dumps({str(i): 1 for i in range(MAX_BIAS_ENTRIES + 1)}).encode(), {}, "too_many_entries"),
    ("stop_token_ids", b"[0, 511]", [0, 511], None),
    ("stop_token_ids", b"[512]", [512], None),
    ("stop_token_ids", b"[-1]", [0], "out_of_bounds"),
    ("stop_token_ids", json.dumps(list(range(MAX_STOP_TOKEN_IDS))).encode(), list(range(MAX_STOP_TOKEN_IDS)), None),
    ("stop_token_ids", json.dumps(list(range(MAX_STOP_TOKEN_IDS + 1))).encode(), [], "too_many_entries"),
    ("ignore_eos", b"true", True, None),
    ("stream", b"true", True, None),
    ("response_format", b'{"type": "json_object"}', {"type": "json_object"}, None),
    ("response_format", b'{"type": "json_schema", "schema": {"type": "array", "items": {"type": "string"}}}',
     {"type": "json_schema"}, None),
    ("response_format", b'{"type": "regex", "pattern": "[a-z]{1,5}"}', {"type": "regex"}, None),
    ("response_format", b'{"type": "choice", "choices": ["yes", "no"]}', {"type": "choice"}, None),
    ("response_format", b'{"type": "regex", "pattern": ""}', {}, "out_of_bounds"),
    ("response_format", json.dumps({"type": "regex", "pattern": "a" * (MAX_PATTERN_CHARS + 1)}).encode(), {}, "out_of_bounds"),
    ("response_format", json.dumps({"type": "regex", "pattern": "a" * MAX_PATTERN_CHARS}).encode(), {"type": "regex"}, None),
    ("response_format", b'{"type": "choice", "choices": []}', {}, "out_of_bounds"),
    ("response_format", json.dumps({"type": "choice", "choices": ["c"] * (MAX_CHOICE_ENTRIES + 1)}).encode(), {},
     "too_many_entries"),
    ("response_format", json.dumps({"type": "choice", "choices": ["c" * (MAX_CHOICE_CHARS + 1)]}).encode(), {},
     "out_of_bounds"),
    ("response_format", b'{"type": "json_schema", "schema": {"type": "nope"}}', {"type": "json_schema"}, "bad_grammar"),
    ("response_format", b'{"type": "regex", "pattern": "(unclosed"}', {"type": "regex"}, "bad_grammar"),
    ("response_format", b'{"type": "regex", "pattern": "(a|b)*a(a|b){30}"}', {"type": "regex"}, "hostile_grammar"),
    ("response_format", b'{"type": "regex", "pattern": "((a{1,100}){1,100}){1,100}"}', {"type": "regex"}, "hostile_grammar"),
)
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
    "bound": st.tuples(st.just("bound"), st.sampled_from(BOUND_NUMBERS)),
    "generation": st.tuples(st.just("generation"), st.integers(0, len(GENERATION_MENU) - 1)),
}


def _mutation():
    return st.one_of(*JOB_MUTATIONS.values())


@st.composite
def job_specs(draw, first=None, id_style=None, adapter_form=None):
    """Everything one jobs-topic record is made of (symbolic: `build_job` resolves it against a Target).
    `first`: a strategy for a mutation every drawn spec carries; `id_style`, `adapter_form`: force that one."""
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
        adapter_form or draw(st.sampled_from(ADAPTER_FORMS)),
        draw(st.integers(0, 2)),
        draw(st.sampled_from(REPLY_FORMS)),
        draw(st.sampled_from(("absent", "null", "future", "past"))),
        id_style or draw(st.sampled_from(ID_STYLES)),
        tuple(([draw(first)] if first is not None else []) + draw(st.lists(_mutation(), max_size=2 if first is not None else 3))),
        tuple(draw(st.lists(st.integers(0, len(HEADER_MENU) - 1), max_size=4))),
        draw(st.sampled_from(KEY_STYLES)),
        draw(st.booleans()),  # ensure_ascii for the JSON text
    ), base


def _dumps(value, ascii_only: bool = True) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=False).encode("utf-8")


def _deep(depth: int, shape: str) -> bytes:
    if shape == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


# ---- building a job record from its spec -------------------------------------------------------------


@dataclasses.dataclass
class _JobDraft:
    """A job record on its way to bytes: the logical job, the raw JSON text that overrides it, the faults."""

    job: dict  # field → logical value (what a worker reads, when the body decodes)
    token: str
    ascii_only: bool
    t: Target
    faults: Faults = dataclasses.field(default_factory=Faults)
    raw: dict = dataclasses.field(default_factory=dict)  # field → raw JSON value text overriding the logical value
    extra: list = dataclasses.field(default_factory=list)  # members appended after the fields
    before_id: list = dataclasses.field(default_factory=list)  # members placed before the id
    tail: bytes = b""
    whole: bytes | None = None  # the entire value replaced (top-level nesting, not an object)
    truncate_at: float | None = None
    bom: bool = False
    huge: bool = False
    surrogate_text: bool = False  # a logical string holds a lone surrogate: no PEFT comparison
    pad_total: int | None = None  # pad the prompt (or a blob member) so the record reaches this many bytes
    pad_field: str = "prompt"
    huge_done: bool = False
    tombstone: bool = False

    def prompt_text(self) -> None:
        """The job sends `prompt`, not `prompt_ids`."""
        self.job.pop("prompt_ids", None)
        self.raw.pop("prompt_ids", None)


def _logical_job(spec, base: dict, token: str, t: Target, now_ms: int) -> tuple[dict, str]:
    """The drawn base with its adapter, reply_to and deadline resolved against the Target; and the good
    adapter an `x-adapter-id: <good>` header names."""
    _, adapter_form, adapter_idx, reply_form, deadline_form = spec[:5]
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
    return job, good


# One function per mutation family: each changes the draft's bytes and records the faults it makes.

def _wrong_type(d: _JobDraft, field: str, pick: int) -> None:
    choices = WRONG_TYPES[field]
    d.raw[field] = choices[pick % len(choices)].encode()
    d.job.setdefault(field, "<raw>")
    d.faults.add("wrong_type")


def _number(d: _JobDraft, field: str, literal: str) -> None:
    if field == "prompt_ids":  # the first token id
        ids = list(d.job.get("prompt_ids") or [1])
        d.job.pop("prompt", None)
        d.job["prompt_ids"] = ids
        d.raw["prompt_ids"] = b"[" + b",".join([literal.encode()] + [str(i).encode() for i in ids[1:]]) + b"]"
        d.raw.pop("prompt", None)
    else:
        d.raw[field] = literal.encode()
        d.job.setdefault(field, None)
    fault = number_fault(field, literal)
    if fault is not None:
        d.faults.add(fault)
        return
    value = parse_number(literal)
    if field == "prompt_ids":  # out of the vocabulary: invalid_job (fuzz_expected.job_codes)
        ids = list(d.job.get("prompt_ids") or [1])
        ids[0] = value
        d.job["prompt_ids"] = ids
        d.job.pop("prompt", None)
    elif field in FLOAT_BOUNDS:
        d.job[field] = float(value)
    else:
        d.job[field] = value


def _bound(d: _JobDraft, field_literal: tuple[str, str]) -> None:
    _number(d, *field_literal)


def _generation(d: _JobDraft, pick: int) -> None:
    field, raw, logical, fault = GENERATION_MENU[pick]
    d.raw[field], d.job[field] = raw, logical
    if fault is not None:
        d.faults.add(fault)


def _bad_utf8(d: _JobDraft, where: str, bad: bytes) -> None:
    d.faults.add("bad_utf8")
    if where == "key":
        d.extra.append((b'"x' + bad + b'"', b"1"))
    elif where == "stop":
        d.job["stop"] = ["<raw>"]
        d.raw["stop"] = b'["a' + bad + b'"]'
    else:
        if where == "prompt":
            d.prompt_text()
        d.job[where] = "<raw>"
        d.raw[where] = b'"ab' + bad + b'cd"'


def _surrogate(d: _JobDraft, where: str, escape: str) -> None:
    text = json.loads(f'"ab{escape}cd"')
    raw_text = b'"ab' + escape.encode() + b'cd"'
    if where == "prompt":
        d.prompt_text()
    if where == "stop":
        d.job["stop"] = [text]
        d.raw["stop"] = b"[" + raw_text + b"]"
    else:
        d.job[where] = text
        d.raw[where] = raw_text
    if escape != "\\ud83d\\ude00":  # the one valid pair
        d.faults.add("lone_surrogate")
        d.surrogate_text = True


def _deep_mutation(d: _JobDraft, where: str, depth: int, shape: str) -> None:
    nest = _deep(depth, shape)
    if where == "field":
        d.raw["prompt_ids" if "prompt_ids" in d.job else "prompt"] = nest
        d.faults.add("nesting")
    elif where == "unknown":
        d.extra.append((b'"deep"', nest))
        d.faults.add("nesting")
    elif where == "before_id":
        d.before_id.append((b'"deep"', nest))
        d.faults.add("nesting")
    else:
        d.whole = nest
    d.huge = d.huge or depth >= 100_000


def _huge(d: _JobDraft, kind: tuple[str, int]) -> None:
    if d.huge_done:
        return  # one huge part per record keeps it under the broker's limit
    d.huge_done = True
    what, size = kind
    d.huge = True
    if what in ("prompt", "prompt-total"):
        d.prompt_text()
        d.raw.pop("prompt", None)
        if what == "prompt":
            d.job["prompt"] = ("lorabus " * (size // 8 + 1))[:size]
        else:
            d.job["prompt"] = ""
            d.pad_total, d.pad_field = size, "prompt"
    elif what == "prompt_ids":
        d.job.pop("prompt", None)
        d.raw.pop("prompt", None)
        d.raw.pop("prompt_ids", None)
        d.job["prompt_ids"] = [(7 * i) % d.t.vocab_size for i in range(size)]
    elif what == "unknown":
        d.extra.append((b'"blob"', _dumps("z" * size)))
        d.faults.add("unknown_field")
    elif what == "stop":
        d.raw.pop("stop", None)
        d.job["stop"] = [f"s{i}" for i in range(size)]
        if stop_fault(size):
            d.faults.add(stop_fault(size))
    elif what == "tenant":
        d.raw.pop("tenant", None)
        d.job["tenant"] = "t" * size
        d.faults.add("long_tenant")
    else:  # the id member is followed by padding up to the size (an unknown field)
        d.pad_total, d.pad_field = size, "blob"
        d.faults.add("unknown_field")


def _null(d: _JobDraft, field: str) -> None:
    d.raw.pop(field, None)
    d.job[field] = None
    if null_fault(field):
        d.faults.add(null_fault(field))


def _unknown_field(d: _JobDraft, name: str) -> None:
    d.extra.append((_dumps(name), b"3"))
    d.faults.add("unknown_field")


def _duplicate(d: _JobDraft, field: str) -> None:
    if field in d.job:
        value = d.raw.get(field) or _dumps(d.job[field], d.ascii_only)
        if len(value) > 10_000:
            return
        d.extra.append((_dumps(field), value))
        d.faults.add("duplicate_key")


def _truncate(d: _JobDraft, at: float) -> None:
    d.truncate_at = at
    d.faults.add("truncated")


def _trailing(d: _JobDraft, tail: bytes) -> None:
    if tail.strip():
        d.faults.add("trailing_bytes")
    d.tail += tail.replace(b"<token>", d.token.encode())  # a second object's id still names this record


def _bom(d: _JobDraft) -> None:
    d.bom = True
    d.faults.add("bom")


def _tombstone(d: _JobDraft) -> None:
    d.tombstone = True


def _non_object(d: _JobDraft, value: bytes) -> None:
    d.whole = value


_JOB_MUTATORS = {"wrong_type": _wrong_type, "number": _number, "bad_utf8": _bad_utf8, "surrogate": _surrogate,
                 "deep": _deep_mutation, "huge": _huge, "null": _null, "unknown_field": _unknown_field,
                 "duplicate": _duplicate, "truncate": _truncate, "trailing": _trailing, "bom": _bom,
                 "tombstone": _tombstone, "non_object": _non_object, "bound": _bound, "generation": _generation}
assert set(_JOB_MUTATORS) == set(JOB_MUTATIONS)


def _headers(header_picks, good_value: bytes, huge: bool) -> list[tuple[bytes, bytes | None]]:
    """The picked HEADER_MENU entries as raw (key, value) pairs; `<good>` stands for `good_value`."""
    headers: list[tuple[bytes, bytes | None]] = []
    for pick in header_picks:
        key, value = HEADER_MENU[pick]
        if key == "many":
            headers.extend((f"h{i}".encode(), b"v") for i in range(100))
            continue
        headers.append((key if isinstance(key, bytes) else key.encode(), good_value if value == b"<good>" else value))
    if huge:  # keep the biggest records within the broker's limit: small headers only
        headers = [(k, v) for k, v in headers if len(v or b"") < 100][:8]
    return headers


def _job_key(key_style: str, token: str, huge: bool) -> bytes | None:
    key = {"token": token.encode(), "none": None, "empty": b"", "bad-utf8": b"\xff\xfe" + token.encode(),
           "big": token.encode() + b"k" * 8000}[key_style]
    return key[:64] if huge and key is not None else key


def _header_variants(job: dict, headers: list, faults: Faults) -> list[dict]:
    """Every logical job the record may read as once x-tenant-id, x-adapter-id and x-model-task fill the fields
    the body leaves out (the wire contract); "<bad-header>" stands for a value that is not UTF-8."""
    if any(not is_utf8(k) for k, _ in headers):
        faults.add("header_key_not_utf8")
    variants = [dict(job)]
    for header, field in ((b"x-tenant-id", "tenant"), (b"x-adapter-id", "adapter"), (b"x-model-task", "task")):
        values = [v for k, v in headers if k == header]
        if not values:
            continue
        if job.get(field) is not None:  # the header is not used; the contract: a value not UTF-8 is invalid_job
            if any(v is not None and not is_utf8(v) for v in values):
                faults.add("unused_header_not_utf8")
            continue
        candidates = []
        for v in {values[0], values[-1]}:
            if v is None or v == b"":
                candidates.append(None)
            elif not is_utf8(v):
                candidates.append("<bad-header>")
            else:
                candidates.append(v.decode())
        if len(set(candidates)) > 1:
            faults.add("headers_disagree")
        variants = [dict(variant, **{field: c}) for variant in variants for c in candidates]
    return variants


@dataclasses.dataclass
class _IdMembers:
    ids: tuple[str, ...]  # the ids a result may carry
    members: list  # the (name, value) members that carry them
    position: str = "first"  # "first", "middle" or "last" among the body's members
    intact: bool = True  # a plain `"id": "..."` member a reader of broken bytes may find


# Id styles with nothing a reader may answer: id style → (member name, the member's value from the token).
_UNREADABLE_IDS = {
    "null": (b'"id"', lambda token: b"null"),
    "number": (b'"id"', lambda token: str(int(token[2:7]) + 1).encode()),
    "huge-number": (b'"id"', lambda token: b"18446744073709551616" * 3),
    "empty": (b'"id"', lambda token: b'""'),
    "too-long": (b'"id"', lambda token: _dumps(token + "L" * (ID_LENGTH[1] + 1 - len(token)))),
    "object": (b'"id"', lambda token: b'{"id": "' + token.encode() + b'"}'),
    "nested-only": (b'"meta"', lambda token: b'{"id": "' + token.encode() + b'"}'),
    "surrogate": (b'"id"', lambda token: b'"' + token.encode() + b'\\ud800"'),
    "bad-utf8": (b'"id"', lambda token: b'"' + token.encode() + b'\xff"'),
}


def _id_members(id_style: str, token: str, ascii_only: bool, faults: Faults) -> _IdMembers:
    """The id member(s) of an id style (ID_STYLES)."""
    if id_style in ("plain", "last", "middle", "dup-same", "escaped-key"):
        key = b'"\\u0069d"' if id_style == "escaped-key" else b'"id"'
        members = [(key, _dumps(token))] + ([(b'"id"', _dumps(token))] if id_style == "dup-same" else [])
        if id_style == "dup-same":
            faults.add("duplicate_key")
        return _IdMembers((token,), members, {"last": "last", "middle": "middle"}.get(id_style, "first"),
                          id_style in ("plain", "dup-same"))
    if id_style == "unicode":
        ids = (f"{token}-é中🙂",)
        return _IdMembers(ids, [(b'"id"', _dumps(ids[0], ascii_only))])
    if id_style == "max-length":
        ids = (token + "m" * (ID_LENGTH[1] - len(token)),)
        return _IdMembers(ids, [(b'"id"', _dumps(ids[0]))])
    if id_style == "escaped":
        escaped = "".join(f"\\u{ord(c):04x}" for c in token[:2]).encode()
        return _IdMembers((token,), [(b'"id"', b'"' + escaped + token[2:].encode() + b'"')])
    if id_style == "control-chars":
        ids = (f"{token}\u0000\n\t",)
        return _IdMembers(ids, [(b'"id"', _dumps(ids[0]))])
    if id_style == "dup-different":
        ids = (token + "a", token + "b")
        return _IdMembers(ids, [(b'"id"', _dumps(ids[0])), (b'"id"', _dumps(ids[1]))])
    if id_style == "dup-invalid":
        faults.add("wrong_type")
        return _IdMembers((token,), [(b'"id"', _dumps(token)), (b'"id"', b"5")])
    if id_style == "missing":
        return _IdMembers((), [], intact=False)
    name, value = _UNREADABLE_IDS[id_style]
    if id_style == "bad-utf8":
        faults.add("bad_utf8")
    return _IdMembers((), [(name, value(token))], intact=False)


def _assemble(parts) -> bytes:
    return b"{" + b",".join(k + b":" + v for k, v in parts) + b"}"


def _job_value(d: _JobDraft, idm: _IdMembers, key: bytes | None, headers: list, variants: list[dict]) -> bytes:
    """The record's value: members in order, padded to size, then replaced, BOM-prefixed, tailed, cut."""
    members = [(_dumps(k), d.raw[k] if k in d.raw else _dumps(v, d.ascii_only)) for k, v in d.job.items()]
    if idm.position == "first":
        body = d.before_id + idm.members + members + d.extra
    elif idm.position == "last":
        body = d.before_id + members + d.extra + idm.members
    else:
        half = len(members) // 2
        body = d.before_id + members[:half] + idm.members + members[half:] + d.extra
    value = _assemble(body)
    if d.pad_total is not None:  # grow the prompt (or a blob member) so the whole record is pad_total bytes
        overhead = len(key or b"") + sum(len(k) + len(v or b"") for k, v in headers)
        room = max(0, d.pad_total - overhead - len(value) - len(d.tail) - (3 if d.bom else 0) - 16)
        filler = _dumps(("lorabus " * (room // 8 + 1))[:room])
        if d.pad_field == "prompt":
            at = next(i for i, (k, _) in enumerate(body) if k == b'"prompt"')
            body = body[:at] + [(b'"prompt"', filler)] + body[at + 1:]
            d.job["prompt"] = json.loads(filler)
            for variant in variants:
                variant["prompt"] = d.job["prompt"]
        else:
            body = body + [(b'"blob"', filler)]
        value = _assemble(body)
    if d.whole is not None:
        value = d.whole
    if d.bom:
        value = b"\xef\xbb\xbf" + value
    value += d.tail
    if d.truncate_at is not None:  # cut after the id member when it opens the record
        start = len(b"\xef\xbb\xbf" if d.bom else b"")
        id_end = start + (len(b"{" + idm.members[0][0] + b":" + idm.members[0][1])
                          if idm.members and idm.position == "first" and not d.before_id else 0)
        cut = id_end + int(d.truncate_at * max(0, len(value) - id_end - 1)) + (1 if id_end else 0)
        value = value[:max(1, min(cut, len(value) - 1))]
    return value


def _opens_with_id(d: _JobDraft, idm: _IdMembers, id_style: str, value: bytes) -> bool:
    """Readable in bytes no parser accepts: the record opens with an intact, plain `{"id": "..."` member."""
    clean = id_style in ("plain", "unicode", "max-length", "escaped", "control-chars", "dup-same")
    if clean and idm.intact and idm.position == "first" and not d.before_id and d.whole is None:
        opening = b"{" + idm.members[0][0] + b":" + idm.members[0][1]
        return value[3 if d.bom else 0:].startswith(opening)
    return False


def build_job(spec, base: dict, token: str, t: Target, now_ms: int | None = None) -> FuzzRecord:
    """Turn a drawn job spec into a record and what the wire contract allows as its answer (fuzz_expected)."""
    id_style, mutations, header_picks, key_style, ascii_only = spec[5:]
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    job, good = _logical_job(spec, base, token, t, now_ms)
    d = _JobDraft(job, token, ascii_only, t)
    for mutation in mutations:
        _JOB_MUTATORS[mutation[0]](d, *mutation[1:])
    headers = _headers(header_picks, good.encode(), d.huge)
    key = _job_key(key_style, token, d.huge)
    variants = _header_variants(job, headers, d.faults)
    idm = _id_members(id_style, token, ascii_only, d.faults)
    value = _job_value(d, idm, key, headers, variants)
    id_first_intact = _opens_with_id(d, idm, id_style, value)
    if d.tombstone:
        value = None
        key = token.encode() if key is None else key  # aiokafka sends no record without both
    must, read_ids = readable(value, id_first_intact)
    if must in ("answer", "either") and not read_ids:
        read_ids = idm.ids
    if must == "either" and token.encode() + b"-second" in d.tail:
        read_ids = tuple(read_ids) + (f"{token}-second",)
    allowed = allowed_answers(d.faults, must, variants, t, now_ms)
    oracle = greedy_oracle(allowed, variants, d.surrogate_text, t)
    bad = bool(mutations or header_picks or key_style not in ("token",) or id_style != "plain" or allowed != {"ok"})
    n = job.get("n", 1)
    return FuzzRecord("jobs", value, key, headers, spec, token=token, ids=read_ids, must=must, allowed=allowed,
                      bad=bad, oracle=oracle, huge=d.huge or len(value or b"") > 200_000,
                      choices=n if isinstance(n, int) and not isinstance(n, bool) else 1)

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
    headers = _headers(header_picks, b"fuzz", huge)
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
    kind, every id style, a 100k-deep nesting, a wrong type in every field, then every adapter form."""
    quotas = [(job_specs(first=strategy), 2) for strategy in JOB_MUTATIONS.values() if strategy is not JOB_MUTATIONS["huge"]]
    quotas += [(job_specs(first=st.tuples(st.just("number"), st.sampled_from(NUMBER_FIELDS), st.just(literal))), 1)
               for literal in NUMBER_LITERALS]
    quotas += [(job_specs(first=st.just(("huge", kind))), 1) for kind in HUGE_KINDS]
    quotas += [(job_specs(id_style=style), 1) for style in dict.fromkeys(ID_STYLES)]
    # A readable id in a body that fails validation: the id must still be found (the contract), wherever it is.
    quotas += [(job_specs(first=JOB_MUTATIONS["wrong_type"], id_style=style), 1)
               for style in ("last", "middle", "escaped-key", "unicode", "max-length", "escaped", "control-chars", "dup-same")]
    quotas += [(job_specs(first=st.tuples(st.just("deep"), st.sampled_from(("field", "unknown", "before_id")),
                                          st.just(100_000), st.sampled_from(("array", "object")))), 1)]
    # A wrong type in every field of the table (each is invalid_job, content_special_tokens included).
    quotas += [(job_specs(first=st.tuples(st.just("wrong_type"), st.just(field), st.integers(0, 8))), 1)
               for field in WRONG_TYPES]
    quotas += [(job_specs(adapter_form=form), 1) for form in ADAPTER_FORMS]
    # Every generation control at and past its bounds, every structured control of the menu.
    quotas += [(job_specs(first=st.just(("bound", case))), 1) for case in BOUND_NUMBERS]
    quotas += [(job_specs(first=st.just(("generation", pick))), 1) for pick in range(len(GENERATION_MENU))]
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
    if len(drawn) < count:  # (hypothesis draws at least one example)
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
