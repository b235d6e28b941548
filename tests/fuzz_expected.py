"""What a worker may answer a fuzzed jobs-topic record with: the wire contract's rules (docs/wire-contract.md)
for the fuzz harness, every bound read from the schema (`schemas/v1.py`, through msgspec's type info), so
the contract is stated once.

A record is built (tests/fuzz_strategies.py) into its bytes plus the *faults* it carries (names from
FAULTS) and the logical job(s) it reads as; this module turns those into a `FuzzRecord`'s expectations:

  must "answer"  the record has a readable id: exactly one result, whose id is the record's id and
                 whose status ("ok") or error code is in `allowed`; never a dead letter.
  must "dead"    no readable id (value null, not a JSON object, no top-level "id", an id that is not a
                 string of the schema's id length): exactly one dead letter carrying the original key,
                 value and headers; no result.
  must "either"  readability is arguable (an id behind bytes no parser gets through, two different
                 ids, an id that cannot be written as UTF-8): exactly one result (allowed codes) or one
                 dead letter.

A record's id is readable when Python's json module finds a string "id" of the schema's length at the
top level of a JSON object, or, for bytes no parser accepts, when the record starts with an intact
`{"id": "..."` member (the contract answers every record whose id can be read). `allowed` follows the
contract: anything that makes the body invalid (wrong type, unknown field, a number outside the schema's
bounds, NaN/Infinity, bad UTF-8, lone surrogate escapes, nesting, a header key that is not UTF-8, more
stop strings than the schema takes) is "invalid_job"; an unknown adapter is "adapter_not_found", a
tenant outside the adapter's tenants "forbidden", a token id outside the vocabulary "invalid_job",
prompt + max_new_tokens beyond the context "prompt_too_long", a past deadline "deadline_exceeded". The
generation controls add: min_new_tokens above max_new_tokens, and a logit_bias or stop_token_ids id outside
the vocabulary, "invalid_job"; n samples beyond the KV cache "prompt_too_long"; a response_format the grammar
engine refuses "invalid_job" (beside whatever else the job earns); a hostile one (a regex that explodes, a
schema near 1 MB) "invalid_job" or served.
Where the contract leaves a choice (the length of a tenant, duplicate JSON keys, a BOM, a non-UTF-8 value
in an x-* header the body makes unused, the order in which several faults of one job are noticed) every
answer it allows is allowed. "internal" is never allowed: a worker that answers hostile input
"internal" let it past the edge.
"""

from __future__ import annotations

import dataclasses
import json
import re

import msgspec

from lorabus.schemas import AdapterPublish, Job
from lorabus.schemas.v1 import MIN_TEMPERATURE

# ---- the deployment the expectations are computed against ------------------------------------------

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
    kv_tokens: int | None = None  # what the worker's KV cache holds (None: more than any fuzzed job needs)


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
    choices: int = 1  # jobs: the `n` an ok result must carry

    def size(self) -> int:
        return len(self.value or b"") + len(self.key or b"") + sum(len(k) + len(v or b"") for k, v in self.headers)


def is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---- the schema's bounds (schemas/v1.py), read from the Job struct's type info ---------------------

def _field_types(struct) -> dict:
    """Field name → its msgspec.inspect type, with an optional field's None taken out (see NULLABLE)."""
    types = {}
    for field in msgspec.inspect.type_info(struct).fields:
        kind = field.type
        if isinstance(kind, msgspec.inspect.UnionType):
            kind = next(t for t in kind.types if not isinstance(t, msgspec.inspect.NoneType))
        types[field.name] = kind
    return types


_JOB = _field_types(Job)
# Fields that take null: a null anywhere else is invalid_job.
NULLABLE = frozenset(f.name for f in msgspec.inspect.type_info(Job).fields
                     if isinstance(f.type, msgspec.inspect.UnionType)
                     and any(isinstance(t, msgspec.inspect.NoneType) for t in f.type.types))
# Inclusive bounds of every integer a job carries (prompt_ids and stop_token_ids: of each token id; logit_bias:
# of each key); outside them: invalid_job.
INT_BOUNDS = {name: (kind.ge, kind.le) for name, kind in
              [*((n, k) for n, k in _JOB.items() if isinstance(k, msgspec.inspect.IntType)),
               ("prompt_ids", _JOB["prompt_ids"].item_type), ("stop_token_ids", _JOB["stop_token_ids"].item_type),
               ("logit_bias", _JOB["logit_bias"].key_type)]}


def _float_bounds(kind) -> tuple[float, float, bool]:
    """(low, high, whether low itself is allowed): repetition_penalty's low bound is exclusive (> 0)."""
    return (kind.ge, kind.le, True) if kind.ge is not None else (kind.gt, kind.le, False)


# Bounds of every float (and of each logit_bias value); temperature also refuses (0, MIN_TEMPERATURE): 0 is greedy.
FLOAT_BOUNDS = {name: _float_bounds(kind) for name, kind in
                [*((n, k) for n, k in _JOB.items() if isinstance(k, msgspec.inspect.FloatType)),
                 ("logit_bias_value", _JOB["logit_bias"].value_type)]}
MAX_BIAS_ENTRIES = _JOB["logit_bias"].max_length
MAX_STOP_TOKEN_IDS = _JOB["stop_token_ids"].max_length
# response_format: its tags (the union's structs), the regex's and the choices' bounds.
FORMATS = {kind.tag: kind for f in msgspec.inspect.type_info(Job).fields if f.name == "response_format"
           for kind in f.type.types if isinstance(kind, msgspec.inspect.StructType)}
MAX_PATTERN_CHARS = _field_types(FORMATS["regex"].cls)["pattern"].max_length
_CHOICES = _field_types(FORMATS["choice"].cls)["choices"]
MAX_CHOICE_ENTRIES, MAX_CHOICE_CHARS = _CHOICES.max_length, _CHOICES.item_type.max_length
DEFAULTS = {f.name: f.default for f in msgspec.inspect.type_info(Job).fields}
# Generation controls that leave a greedy job's tokens as PEFT's greedy ones (min_p: greedy ignores it; every
# choice of a greedy n-sample job is the greedy one); any other control set off its default changes them.
GREEDY_NEUTRAL = frozenset({"min_p", "logprobs", "prompt_logprobs", "n", "stream", "stream_every_tokens"})
CONTROLS = frozenset(DEFAULTS) - {"id", "tenant", "adapter", "mix", "task", "user", "prompt", "prompt_ids", "messages",
                                  "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "reply_to",
                                  "deadline_ms", "content_special_tokens"}
ID_LENGTH = (_JOB["id"].min_length, _JOB["id"].max_length)
MAX_STOP_STRINGS = _JOB["stop"].max_length
TOPIC = re.compile(_JOB["reply_to"].pattern)  # Kafka's rule for a topic name
NAME = re.compile(_field_types(AdapterPublish)["name"].pattern)  # an adapter's name (and version)

# ---- faults a record carries, and what the contract makes of each ---------------------------------

INVALID = "invalid_job"  # the body is not a valid v1 job: invalid_job, whatever else is wrong
MAY_REFUSE = "may_refuse"  # the contract leaves it open: invalid_job is allowed beside every other answer
REFUSED = "refused"  # a decodable job that cannot be served: invalid_job, or whatever else the job earns first
FAULTS = {
    "wrong_type": INVALID,  # a value of a JSON type the field does not take
    "not_json_number": INVALID,  # NaN/Infinity are not JSON; 1e400 overflows every double
    "out_of_bounds": INVALID,  # a number outside the schema's bounds, or a float where an integer goes
    "null": INVALID,  # null in a field that does not take it (NULLABLE)
    "bad_utf8": INVALID,  # in a string or a member's name
    "lone_surrogate": INVALID,  # the contract: lone surrogate escapes are invalid_job
    "nesting": INVALID,  # nested arrays or objects where the schema has none
    "unknown_field": INVALID,
    "too_many_stops": INVALID,  # more than MAX_STOP_STRINGS
    "truncated": INVALID,
    "trailing_bytes": INVALID,  # anything but whitespace after the object
    "header_key_not_utf8": INVALID,  # the contract: a header key that is not UTF-8 is invalid_job
    "long_tenant": MAY_REFUSE,  # the contract states none for a tenant (the schema: 256 characters)
    "duplicate_key": MAY_REFUSE,  # RFC 8259: names SHOULD be unique; a parser may refuse
    "bom": MAY_REFUSE,  # RFC 8259: parsers MAY ignore a BOM
    "unused_header_not_utf8": MAY_REFUSE,  # a worker may ignore a header it does not use
    "headers_disagree": MAY_REFUSE,  # several x-* headers of one name, different values: either may be read
    "too_many_entries": INVALID,  # logit_bias, stop_token_ids, choices past the schema's length
    "hostile_grammar": MAY_REFUSE,  # a regex that explodes, a schema near 1 MB: the grammar engine's fuel decides
    "bad_grammar": REFUSED,  # a response_format the grammar engine cannot compile: invalid_job once the job decodes
}


@dataclasses.dataclass
class Faults:
    """The faults one record carries (names from FAULTS)."""

    found: set = dataclasses.field(default_factory=set)

    def add(self, name: str) -> None:
        assert name in FAULTS, name
        self.found.add(name)

    @property
    def invalid(self) -> bool:
        return any(FAULTS[name] == INVALID for name in self.found)

    @property
    def may_refuse(self) -> bool:
        return any(FAULTS[name] == MAY_REFUSE for name in self.found)

    @property
    def refused(self) -> bool:
        return any(FAULTS[name] == REFUSED for name in self.found)


def parse_number(literal: str):
    """A JSON number literal → its value (None for the non-JSON NaN/Infinity literals)."""
    if literal in ("NaN", "Infinity", "-Infinity"):
        return None
    return json.loads(literal)


def _int_literal(literal: str) -> bool:
    return not any(c in literal for c in ".eE") and literal not in ("NaN", "Infinity", "-Infinity")


def number_fault(field: str, literal: str) -> str | None:
    """The fault `field: literal` makes of a job, or None when the value is within the schema's bounds."""
    value = parse_number(literal)
    if value is None or value in (float("inf"), float("-inf")):
        return "not_json_number"
    if field in INT_BOUNDS:
        low, high = INT_BOUNDS[field]
        return None if _int_literal(literal) and low <= value <= high else "out_of_bounds"
    low, high, low_allowed = FLOAT_BOUNDS[field]
    if not (low <= value if low_allowed else low < value) or not value <= high \
            or (field == "temperature" and 0 < value < MIN_TEMPERATURE):
        return "out_of_bounds"
    return None


def null_fault(field: str) -> str | None:
    return None if field in NULLABLE else "null"


def stop_fault(count: int) -> str | None:
    return "too_many_stops" if count > MAX_STOP_STRINGS else None


def id_fits(value) -> bool:
    """Whether a top-level "id" value is one the contract answers: a string of the schema's length."""
    return isinstance(value, str) and ID_LENGTH[0] <= len(value) <= ID_LENGTH[1]


# ---- readability of the id ---------------------------------------------------------------------------

def readable(value: bytes | None, id_first_intact: bool) -> tuple[str, tuple[str, ...]]:
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
    good = [v for v in ids if id_fits(v)]
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


# ---- what a decodable job may be answered with -----------------------------------------------------

def _adapter_codes(ref: str | None, tenant, t: Target, out: set, must: list) -> None:
    if ref is None:
        return
    name, at, version = ref.partition("@")
    if not ref or not name or (at and not NAME.fullmatch(version)):
        out.add("invalid_job"), must.append(True)  # "", "@v1", "name@", "a@b@c"
    elif not NAME.fullmatch(name):
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


def job_codes(job: dict, t: Target, now_ms: int) -> tuple[set, bool]:
    """Error codes a worker may answer a decodable job with, and whether ok is possible (the contract).
    `job` is the logical job once its headers filled it ("<bad-header>": a header value not UTF-8)."""
    codes, must = set(), []
    tenant = job.get("tenant")
    if tenant is None or tenant == "<bad-header>":
        codes.add("invalid_job"), must.append(True)
    if job.get("task") == "<bad-header>":
        codes.add("invalid_job"), must.append(True)
    if job.get("adapter") == "<bad-header>":
        codes.add("invalid_job"), must.append(True)
    elif job.get("adapter") is None and job.get("task") not in (None, "<bad-header>"):
        codes.add("adapter_not_found"), must.append(True)  # the contract: a task with no route (the fuzz sets none)
    else:
        _adapter_codes(job.get("adapter"), tenant, t, codes, must)
    prompt, ids = job.get("prompt"), job.get("prompt_ids")
    if (prompt is None) == (ids is None):
        codes.add("invalid_job"), must.append(True)
    reply = job.get("reply_to")
    if reply is not None and not (isinstance(reply, str) and TOPIC.fullmatch(reply)):
        codes.add("invalid_job"), must.append(True)  # not a topic name
    elif reply is not None and reply != t.results_topic and not (reply == t.reply_topic and tenant in REPLY_TENANTS):
        codes.add("forbidden"), must.append(True)  # docs/trust.md: only topics allowed to the tenant
    mnt = job.get("max_new_tokens", 64)
    limit = t.max_model_len
    _control_codes(job, mnt, t, codes, must)
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


def _control_codes(job: dict, mnt, t: Target, codes: set, must: list) -> None:
    """What the generation controls add: bounds between fields, token ids in the vocabulary, n in the KV cache."""
    if isinstance(job.get("min_new_tokens"), int) and isinstance(mnt, int) and job["min_new_tokens"] > mnt:
        codes.add("invalid_job"), must.append(True)
    bias, stop_ids = job.get("logit_bias") or {}, job.get("stop_token_ids") or []
    if isinstance(bias, dict) and any(isinstance(i, int) and i >= t.vocab_size for i in bias) \
            or isinstance(stop_ids, list) and any(isinstance(i, int) and i >= t.vocab_size for i in stop_ids):
        codes.add("invalid_job"), must.append(True)
    n = job.get("n", 1)
    if t.kv_tokens is not None and isinstance(n, int) and isinstance(mnt, int):
        prompt = len(job.get("prompt_ids") or ()) or 1
        if prompt + n * mnt > t.kv_tokens:
            codes.add("prompt_too_long"), must.append(True)
        elif n > 1 and prompt + n * (mnt + 16) > t.kv_tokens:  # each choice rounds up to whole KV blocks
            codes.add("prompt_too_long")


def allowed_answers(faults: Faults, must: str, variants: list[dict], t: Target, now_ms: int) -> frozenset[str]:
    """"ok" and the error codes a result may carry. `variants`: every logical job the record may read as
    (one per way its x-* headers can fill it)."""
    if faults.invalid or must == "dead":
        return frozenset({"invalid_job"})
    allowed: set[str] = set()
    ok_possible = False
    for variant in variants:
        codes, ok = job_codes(variant, t, now_ms)
        allowed |= codes
        ok_possible = ok_possible or ok
    if faults.may_refuse or faults.refused:
        allowed.add("invalid_job")
    if ok_possible and not faults.refused:
        allowed.add("ok")
    return frozenset(allowed or {"invalid_job"})


def greedy_oracle(allowed: frozenset[str], variants: list[dict], surrogate_text: bool, t: Target) -> tuple | None:
    """(adapter name, prompt_ids or text, max_new_tokens, has_stop) when an ok result must hold PEFT's greedy
    tokens: ok allowed, one reading of the headers, greedy, an adapter published as v1, text with no lone
    surrogate."""
    if "ok" not in allowed or surrogate_text or len(variants) != 1:
        return None
    variant = variants[0]
    if any(variant.get(name, DEFAULTS[name]) not in (DEFAULTS[name], [], {}) for name in CONTROLS - GREEDY_NEUTRAL):
        return None  # a control that changes which tokens are drawn
    temperature = variant.get("temperature", 0.0)
    ref = variant.get("adapter")
    name = ref.partition("@")[0] if isinstance(ref, str) else None
    if temperature in (0, 0.0) and (name is None or name in t.good_adapters or name == t.private_adapter):
        prompt = variant.get("prompt_ids") if variant.get("prompt_ids") is not None else variant.get("prompt")
        return name, prompt, variant.get("max_new_tokens", 64), bool(variant.get("stop"))
    return None
