"""Wire contract v1: JSON messages, one per Kafka record (see README "Wire contract").

Jobs arrive on the jobs topic, results leave on the reply topic, adapter lifecycle events travel on
the control topic. Decoding is strict (types are not coerced, unknown fields are refused so a typo
such as `max_tokens` is an error rather than a silently ignored field) and every failure becomes a
`JobError` carrying the wire error code.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

import msgspec

ErrorCode = Literal[
    "invalid_job",
    "adapter_not_found",
    "adapter_load_failed",
    "forbidden",
    "prompt_too_long",
    "deadline_exceeded",
    "internal",
]
ERROR_CODES: tuple[str, ...] = ErrorCode.__args__

# Names and versions end up in metric labels, file paths and the "name@version" syntax.
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
Name = Annotated[str, msgspec.Meta(pattern=_NAME)]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
# Bounds on every number a producer sends: values past them are answered invalid_job at the edge,
# so nothing downstream (torch generators, int64 tensors, the KV cache) ever sees them.
MAX_TOKEN_ID = 2**31 - 1
MAX_NEW_TOKENS = 1 << 20
MAX_PROMPT_IDS = 1 << 20
MAX_SEED = 2**63 - 1  # torch generators take a signed 64-bit seed
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0  # 0 means greedy; below MIN, float32 logits overflow
MIN_TOP_P = 1e-6  # smaller values round to 0 in float32
MAX_TOP_K = 2**31 - 1
MAX_DEADLINE_MS = 2**53  # the largest integer a JSON producer can write exactly
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 1024
MAX_MESSAGES = 256  # chat turns per job; their total text is bounded by the worker's max_prompt_bytes
# Generation controls (README "Jobs"): the engines users compare us with (vLLM, OpenAI) use these bounds.
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty, as OpenAI's API
MAX_REPETITION_PENALTY = 100.0  # Hugging Face's repetition_penalty divides by it: > 0
MAX_LOGIT_BIAS, MAX_BIAS_ENTRIES = 100.0, 1024
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20
MAX_CHOICES = 16
MAX_PATTERN_CHARS = 4096
MAX_CHOICE_ENTRIES, MAX_CHOICE_CHARS = 256, 1024
TokenId = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKEN_ID)]
# Kafka's own rule for topic names.
Topic = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,249}$")]

# Kafka headers that fill a job's field when the body leaves it out.
HEADER_FIELDS = {"x-tenant-id": "tenant", "x-adapter-id": "adapter", "x-model-task": "task"}


class JobError(Exception):
    """A job that must be answered with an error result (or dead-lettered when it has no id)."""

    def __init__(self, code: str, message: str, job_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.job_id = job_id


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One turn of a chat job, rendered with the model's chat template (the generation prompt added)."""

    role: Literal["system", "user", "assistant"]
    content: str


# A job's weighted adapter mix: at most MAX_MIX_MEMBERS members, each weight finite, nonzero and within
# ±MAX_MIX_WEIGHT (negative subtracts a task vector). The worker serves the exact sum of the weighted deltas.
MAX_MIX_MEMBERS = 8
MAX_MIX_WEIGHT = 100.0


class MixMember(msgspec.Struct, forbid_unknown_fields=True):
    adapter: NonEmpty  # "name" (its serving version) or "name@version"
    weight: Annotated[float, msgspec.Meta(ge=-MAX_MIX_WEIGHT, le=MAX_MIX_WEIGHT)]

    def __post_init__(self) -> None:
        if self.weight == 0.0:  # it would change nothing and still take rank in the pool; NaN/inf fail the bounds
            raise ValueError("a mix member's `weight` must not be 0")


class JsonSchemaFormat(msgspec.Struct, tag="json_schema", tag_field="type", forbid_unknown_fields=True):
    """Output that validates against a JSON schema (the grammar engine's subset of JSON Schema)."""

    schema: dict[str, Any]


class JsonObjectFormat(msgspec.Struct, tag="json_object", tag_field="type", forbid_unknown_fields=True):
    """Any JSON object."""


class RegexFormat(msgspec.Struct, tag="regex", tag_field="type", forbid_unknown_fields=True):
    """Output that matches a regular expression, whole."""

    pattern: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PATTERN_CHARS)]


class ChoiceFormat(msgspec.Struct, tag="choice", tag_field="type", forbid_unknown_fields=True):
    """Output that is exactly one of `choices`."""

    choices: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CHOICE_CHARS)]],
                       msgspec.Meta(min_length=1, max_length=MAX_CHOICE_ENTRIES)]


ResponseFormat = Union[JsonSchemaFormat, JsonObjectFormat, RegexFormat, ChoiceFormat]


class Job(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: NonEmpty
    tenant: NonEmpty | None = None  # required, but a header may supply it
    adapter: NonEmpty | None = None  # "name" (active version) or "name@version"; None = base model
    mix: Annotated[list[MixMember], msgspec.Meta(min_length=1, max_length=MAX_MIX_MEMBERS)] | None = None
    task: NonEmpty | None = None  # routing key (reserved in v1)
    user: NonEmpty | None = None  # stickiness key (reserved in v1)
    prompt: str | None = None
    prompt_ids: Annotated[list[TokenId], msgspec.Meta(max_length=MAX_PROMPT_IDS)] | None = None
    messages: Annotated[list[ChatMessage], msgspec.Meta(max_length=MAX_MESSAGES)] | None = None
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_NEW_TOKENS)] = 64
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_TEMPERATURE)] = 0.0
    top_p: Annotated[float, msgspec.Meta(ge=MIN_TOP_P, le=1.0)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_K)] = 0
    seed: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)] | None = None
    stop: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_STOP_CHARS)]],
                    msgspec.Meta(max_length=MAX_STOP_STRINGS)] = []
    reply_to: Topic | None = None
    deadline_ms: Annotated[int, msgspec.Meta(ge=0, le=MAX_DEADLINE_MS)] | None = None
    # A chat only: true reads special-token text inside `content` as special tokens (it can then forge turns),
    # false as plain text; None = the worker's --content-special-tokens (off by default).
    content_special_tokens: bool | None = None
    # Generation controls (README "Generation controls"); every one applies to this job alone.
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=MAX_REPETITION_PENALTY)] = 1.0
    presence_penalty: Annotated[float, msgspec.Meta(ge=-MAX_PENALTY, le=MAX_PENALTY)] = 0.0
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-MAX_PENALTY, le=MAX_PENALTY)] = 0.0
    # Token id (a JSON object's keys are text: "42") → bias added to its logit.
    logit_bias: Annotated[dict[TokenId, Annotated[float, msgspec.Meta(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]],
                          msgspec.Meta(max_length=MAX_BIAS_ENTRIES)] | None = None
    min_new_tokens: Annotated[int, msgspec.Meta(ge=0, le=MAX_NEW_TOKENS)] = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], msgspec.Meta(max_length=MAX_STOP_TOKEN_IDS)] = []
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    prompt_logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_every_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_NEW_TOKENS)] = 1

    def __post_init__(self) -> None:
        given = [name for name in ("prompt", "prompt_ids", "messages") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("exactly one of `prompt`, `prompt_ids` and `messages` is required"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.adapter is not None and self.mix is not None:
            raise ValueError("a job names either `adapter` or `mix`, not both")
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"`temperature` must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        if self.prompt_ids is not None and not self.prompt_ids:
            raise ValueError("`prompt_ids` must not be empty")
        if self.prompt is not None and not self.prompt:
            raise ValueError("`prompt` must not be empty")
        if self.messages is not None and not self.messages:
            raise ValueError("`messages` must not be empty")
        if self.content_special_tokens is not None and self.messages is None:
            raise ValueError("`content_special_tokens` applies only to a chat (`messages`)")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("`min_new_tokens` must not exceed `max_new_tokens`")

    def prompt_bytes(self) -> int:
        """UTF-8 bytes of the job's prompt text: `prompt`, or every message's `content` together (0 for
        `prompt_ids`). What the worker holds against max_prompt_bytes before anything is tokenized."""
        if self.prompt is not None:
            return len(self.prompt.encode())
        if self.messages is not None:
            return sum(len(m.content.encode()) for m in self.messages)
        return 0


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int


class ErrorInfo(msgspec.Struct):
    code: ErrorCode
    message: str


class MixUsed(msgspec.Struct):
    """One member of the mix that served a job: the version it resolved to and its weight."""

    adapter: str
    version: str
    weight: float


class TopLogprob(msgspec.Struct):
    id: int
    text: str
    logprob: float


class TokenLogprob(msgspec.Struct):
    """A token's log-probability, and the `top` most likely tokens at its position (most likely first)."""

    id: int
    text: str
    logprob: float
    top: list[TopLogprob] = []


class Choice(msgspec.Struct, kw_only=True):
    """One of a job's `n` samples."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"] | None
    logprobs: list[TokenLogprob] | None = None


class JobResult(msgspec.Struct, kw_only=True):
    id: str
    # "partial": a streamed piece (best-effort; docs/wire-contract.md "Streaming"), then the job's one "ok" or "error" result.
    status: Literal["ok", "error", "partial"]
    adapter: str | None = None
    adapter_version: str | None = None
    mix: list[MixUsed] | None = None  # a mix job: every member's resolved version, in the job's order
    task: str | None = None  # set when a route chose the adapter: the job's task ...
    route_event_id: str | None = None  # ... and the route.set event that was in force
    text: str = ""
    token_ids: list[int] = []
    finish_reason: Literal["stop", "length"] | None = None
    usage: Usage = msgspec.field(default_factory=lambda: Usage(0, 0))
    error: ErrorInfo | None = None
    worker: str = ""
    # Generation controls: choice 0's logprobs, the prompt's (the first token has none: null), every choice
    # when n > 1 (the fields above are then choice 0's), and which choice a partial record continues.
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    choices: list[Choice] | None = None
    index: int | None = None


# Every control event may carry an id (the CLI sets one) and its creation time, for provenance.
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
TimestampMs = Annotated[int, msgspec.Meta(ge=0, le=MAX_DEADLINE_MS)]
AdapterVersionRef = Annotated[str, msgspec.Meta(pattern=_NAME[:-1] + "@" + _NAME[1:])]  # "name@version"
MAX_ROUTE_TARGETS = 64
MAX_ROUTE_WEIGHT = 1_000_000


class _ControlEventFields(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True):
    """What every control event may carry besides its own fields (given by keyword)."""

    event_id: EventId | None = None
    ts_ms: TimestampMs | None = None


class AdapterPublish(_ControlEventFields, tag="adapter.publish"):
    name: Name
    version: Name
    path: NonEmpty  # local directory or file:// URI
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    tenants: list[NonEmpty] | None = None  # None = every tenant


class AdapterActivate(_ControlEventFields, tag="adapter.activate"):
    name: Name
    version: Name


class AdapterRetire(_ControlEventFields, tag="adapter.retire"):
    """New jobs naming this version get adapter_not_found; sequences already running on it finish."""

    name: Name
    version: Name


class AdapterWarm(_ControlEventFields, tag="adapter.warm"):
    """Load a published version and run one dummy step on every worker, without sending it traffic."""

    name: Name
    version: Name


_VERSION_REF = re.compile(_NAME[:-1] + "@" + _NAME[1:])


# omit_defaults keeps a plain target's JSON `{"adapter": ..., "weight": ...}` as before: old records still
# decode and route.set keys (a digest over the targets' JSON, worker/control_log.py) do not move.
class RouteTarget(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Where a route sends its share of a task's jobs: one exact adapter version, or a weighted mix of exact
    versions (served like a job's `mix`). A route pins versions, so a mix member must be "name@version"."""

    adapter: AdapterVersionRef | None = None
    weight: Annotated[int, msgspec.Meta(ge=0, le=MAX_ROUTE_WEIGHT)]
    mix: Annotated[list[MixMember], msgspec.Meta(min_length=1, max_length=MAX_MIX_MEMBERS)] | None = None

    def __post_init__(self) -> None:
        if (self.adapter is None) == (self.mix is None):
            raise ValueError("a route target names exactly one of `adapter` and `mix`")
        for member in self.mix or ():
            if not _VERSION_REF.match(member.adapter):
                raise ValueError("a route's mix member names an exact version ('name@version'), "
                                 f"not {member.adapter!r}")

    def versions(self) -> list[str]:
        """Every "name@version" the target serves from (a mix: its members, in its order)."""
        return [self.adapter] if self.adapter is not None else [member.adapter for member in self.mix]

    def label(self) -> str:
        """The target as text: "name@version", or "mix:a@v1*0.7+b@v2*0.3" (the CLI's syntax, README "Control")."""
        if self.adapter is not None:
            return self.adapter
        return "mix:" + "+".join(f"{member.adapter}*{member.weight!r}" for member in self.mix)

    def identity(self) -> tuple:
        """What makes two targets the same: the version, or the mix's members in any order."""
        return (self.adapter,) if self.adapter is not None else tuple(sorted((m.adapter, m.weight) for m in self.mix))


class RouteSet(_ControlEventFields, tag="route.set"):
    """Jobs of `task` (of `tenant`, or of every tenant) without an explicit adapter go to one of the
    targets, chosen by a stable hash of the sticky key in proportion to the weights."""

    task: Name
    targets: Annotated[list[RouteTarget], msgspec.Meta(min_length=1, max_length=MAX_ROUTE_TARGETS)]
    tenant: NonEmpty | None = None
    sticky: Literal["user", "id"] = "user"

    def __post_init__(self) -> None:
        if sum(t.weight for t in self.targets) <= 0:
            raise ValueError("the weights of a route's targets must sum to more than 0")
        if len({t.identity() for t in self.targets}) != len(self.targets):
            raise ValueError("a route names each adapter version (and each mix) at most once")


class RouteDelete(_ControlEventFields, tag="route.delete"):
    task: Name
    tenant: NonEmpty | None = None


ControlEvent = Union[AdapterPublish, AdapterActivate, AdapterRetire, AdapterWarm, RouteSet, RouteDelete]



# ---- the status topic: each worker's view, compacted by worker id ----------------------------------

LoadState = Literal["loading", "ready", "failed"]


class VersionStatus(msgspec.Struct, forbid_unknown_fields=False):
    """One adapter version as a worker sees it: loaded (ready), loading, or failed with the reason."""

    adapter: str  # "name@version"
    state: LoadState
    reason: str | None = None
    # Where its last load here came from: "store" (downloaded from the object store), "disk" (its files, or the
    # disk tier's copy), "host" (the host-memory tier); None until it loads.
    source: str | None = None


class RouteStatus(msgspec.Struct, forbid_unknown_fields=False):
    """The route serving (task, tenant) on a worker: `event_id` is in force; `pending_event_id` is the
    newest route, still loading (or failed) when it differs."""

    task: str
    tenant: str | None
    event_id: str | None
    targets: list[RouteTarget]
    pending_event_id: str | None = None


class WorkerStatus(msgspec.Struct, tag="worker.status", tag_field="type", forbid_unknown_fields=False):
    """What a worker publishes to the status topic (key = worker id) on every change and every few
    seconds. Readers ignore fields they do not know, so later versions may add some."""

    worker: str
    ts_ms: int
    started_ms: int
    control_offset: int  # control records applied: every offset below this one
    serving: dict[str, str]  # adapter name → the version its name-only jobs get here
    activated: dict[str, str]  # adapter name → the version the control log activates (differs while loading or failed)
    versions: list[VersionStatus]  # every version this worker has loaded, is loading or failed to load
    resident: list[str]  # "name@version" in device slots
    host_cached: int  # adapters in the host-memory tier
    routes: list[RouteStatus]
    jobs_inflight: int = 0
    interval_ms: int = 2000  # the next status comes within this (readers call a worker silent after 3x)
    truncated: bool = False  # some lists were cut to keep the record under the worker's --status-max-bytes
    # How many were left out when `truncated` (the least recent by control offset; the newest are kept).
    routes_omitted: int = 0  # (task, tenant) routes not in `routes`
    versions_omitted: int = 0  # versions not in `versions`
    names_omitted: int = 0  # adapter names in neither `serving` nor `activated`
    # The CPU LoRA path's measured plan per "group shape class" (docs/kernels.md, "Plans by measurement"), at
    # most MAX_STATUS_PLANS of them; empty on the Triton path and from workers before this field.
    plans: dict[str, str] = {}


class AdapterRef(msgspec.Struct, frozen=True):
    name: str
    version: str | None  # None = the name's active version


_MAX_REASON = 1024  # error messages quote the parser, which may quote the input
_job_decoder = msgspec.json.Decoder(Job)
_result_decoder = msgspec.json.Decoder(JobResult)
_control_decoder = msgspec.json.Decoder(ControlEvent)
_status_decoder = msgspec.json.Decoder(WorkerStatus)
_encoder = msgspec.json.Encoder()


# What msgspec raises on hostile JSON: malformed or out-of-range input, invalid UTF-8, deep nesting.
DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError, ValueError)

# JSON tokens that matter for finding a top-level key: strings (escapes included) and structure.
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\],:]', re.S)


def _readable_id(value: bytes) -> str | None:
    """The top-level `"id"` string of a record that failed validation, so it can still be answered.

    Scans tokens rather than parsing, so the rest of the record may be malformed, invalid UTF-8,
    nested beyond any parser's limit or carry numbers out of range."""
    depth, expect_key, key = 0, False, None
    for match in _JSON_TOKEN.finditer(value):
        token = match.group()
        if token in (b"{", b"["):
            depth += 1
            expect_key = depth == 1 and token == b"{"
        elif token in (b"}", b"]"):
            depth -= 1
            if depth <= 0:
                return None
        elif depth != 1:
            continue
        elif token == b",":
            expect_key = True
        elif token == b":":
            expect_key = False
        elif expect_key:
            key = token
        elif key is not None and (key == b'"id"' or _json_text(key) == "id"):  # "\u0069d" spells id too
            job_id = _json_text(token)
            return job_id if job_id is not None and 0 < len(job_id) <= 256 else None
        else:
            key = None
    return None


def _json_text(token: bytes) -> str | None:
    try:
        return msgspec.json.decode(token, type=str)
    except DECODE_ERRORS:
        return None


def _header_text(raw: bytes | str | None) -> str | None:
    if raw is None:
        return None
    text = raw.decode("utf-8", errors="strict") if isinstance(raw, bytes) else raw
    return text or None


def _is_utf8(text: str) -> bool:
    # A header key that was not UTF-8 on the wire arrives with surrogate escapes.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_job(value: bytes | None, headers: list[tuple[str, bytes]] | None = None) -> Job:
    """Decode and validate one jobs-topic record; raise `JobError("invalid_job")` on bad input."""
    if value is None:
        raise JobError("invalid_job", "record has no value")
    try:
        job = _job_decoder.decode(value)
    except DECODE_ERRORS as exc:
        raise JobError("invalid_job", f"{type(exc).__name__}: {exc}"[:_MAX_REASON], _readable_id(value)) from None
    for key, raw in headers or ():
        if not _is_utf8(key):
            raise JobError("invalid_job", "a header key is not UTF-8", job.id)
        field = HEADER_FIELDS.get(key.lower())
        if field == "adapter" and job.mix is not None:
            continue  # the body chose a mix: an adapter header does not add a second choice
        if field is not None and getattr(job, field) is None:
            try:
                setattr(job, field, _header_text(raw))
            except UnicodeDecodeError:
                raise JobError("invalid_job", f"header {key} is not UTF-8", job.id) from None
    if job.tenant is None:
        raise JobError("invalid_job", "`tenant` is required (body or x-tenant-id header)", job.id)
    refs = [job.adapter] if job.adapter is not None else [m.adapter for m in job.mix or ()]
    for ref in refs:
        try:
            parse_adapter_ref(ref)
        except ValueError as exc:
            raise JobError("invalid_job", str(exc), job.id) from None
    return job


def parse_adapter_ref(text: str) -> AdapterRef:
    """`"name"` or `"name@version"` → AdapterRef."""
    name, _, version = text.partition("@")
    if not re.match(_NAME, name) or ("@" in text and not re.match(_NAME, version)):
        raise ValueError(f"bad adapter reference {text!r}: expected 'name' or 'name@version'")
    return AdapterRef(name, version or None)


def decode_control(value: bytes) -> ControlEvent:
    """Decode one control-topic record; raises one of DECODE_ERRORS on bad input."""
    return _control_decoder.decode(value)


def decode_status(value: bytes) -> WorkerStatus:
    """Decode one status-topic record; raises one of DECODE_ERRORS on bad input."""
    return _status_decoder.decode(value)


def decode_result(value: bytes) -> JobResult:
    return _result_decoder.decode(value)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def error_result(job_id: str, code: str, message: str, worker: str, **fields) -> JobResult:
    return JobResult(id=job_id, status="error", error=ErrorInfo(code, message), worker=worker, **fields)
