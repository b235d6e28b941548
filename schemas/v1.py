"""Wire contract v1: JSON messages, one per Kafka record (see README "Wire contract").

Jobs arrive on the jobs topic, results leave on the reply topic, adapter lifecycle events travel on
the control topic. Decoding is strict (types are not coerced, unknown fields are refused so a typo
such as `max_tokens` is an error rather than a silently ignored field) and every failure becomes a
`JobError` carrying the wire error code.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

import msgspec

SCHEMA_VERSION = 1

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
TokenId = Annotated[int, msgspec.Meta(ge=0)]

# Kafka headers that fill a job's field when the body leaves it out.
HEADER_FIELDS = {"x-tenant-id": "tenant", "x-adapter-id": "adapter", "x-model-task": "task"}


class JobError(Exception):
    """A job that must be answered with an error result (or dead-lettered when it has no id)."""

    def __init__(self, code: str, message: str, job_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.job_id = job_id


class Job(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: NonEmpty
    tenant: NonEmpty | None = None  # required, but a header may supply it
    adapter: NonEmpty | None = None  # "name" (active version) or "name@version"; None = base model
    task: NonEmpty | None = None  # routing key (reserved in v1)
    user: NonEmpty | None = None  # stickiness key (reserved in v1)
    prompt: str | None = None
    prompt_ids: list[TokenId] | None = None
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1)] = 64
    temperature: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0
    seed: int | None = None
    stop: list[Annotated[str, msgspec.Meta(min_length=1)]] = []
    reply_to: NonEmpty | None = None
    deadline_ms: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("exactly one of `prompt` and `prompt_ids` is required")
        if self.prompt_ids is not None and not self.prompt_ids:
            raise ValueError("`prompt_ids` must not be empty")
        if self.prompt is not None and not self.prompt:
            raise ValueError("`prompt` must not be empty")


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int


class ErrorInfo(msgspec.Struct):
    code: ErrorCode
    message: str


class JobResult(msgspec.Struct, kw_only=True):
    id: str
    status: Literal["ok", "error"]
    adapter: str | None = None
    adapter_version: str | None = None
    text: str = ""
    token_ids: list[int] = []
    finish_reason: Literal["stop", "length"] | None = None
    usage: Usage = msgspec.field(default_factory=lambda: Usage(0, 0))
    error: ErrorInfo | None = None
    worker: str = ""


class AdapterPublish(msgspec.Struct, tag="adapter.publish", tag_field="type", forbid_unknown_fields=True):
    name: Name
    version: Name
    path: NonEmpty  # local directory or file:// URI
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    tenants: list[NonEmpty] | None = None  # None = every tenant


class AdapterActivate(msgspec.Struct, tag="adapter.activate", tag_field="type", forbid_unknown_fields=True):
    name: Name
    version: Name


ControlEvent = Union[AdapterPublish, AdapterActivate]


class AdapterRef(msgspec.Struct, frozen=True):
    name: str
    version: str | None  # None = the name's active version


_job_decoder = msgspec.json.Decoder(Job)
_result_decoder = msgspec.json.Decoder(JobResult)
_control_decoder = msgspec.json.Decoder(ControlEvent)
_encoder = msgspec.json.Encoder()


class _JobId(msgspec.Struct):
    id: str


def _readable_id(value: bytes) -> str | None:
    """The job id of a record that failed validation, if one can be read, so it can still be answered."""
    try:
        job_id = msgspec.json.decode(value, type=_JobId).id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return job_id if 0 < len(job_id) <= 256 else None


def _header_text(raw: bytes | str | None) -> str | None:
    if raw is None:
        return None
    text = raw.decode("utf-8", errors="strict") if isinstance(raw, bytes) else raw
    return text or None


def decode_job(value: bytes | None, headers: list[tuple[str, bytes]] | None = None) -> Job:
    """Decode and validate one jobs-topic record; raise `JobError("invalid_job")` on bad input."""
    if value is None:
        raise JobError("invalid_job", "record has no value")
    try:
        job = _job_decoder.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise JobError("invalid_job", str(exc), _readable_id(value)) from None
    for key, raw in headers or ():
        field = HEADER_FIELDS.get(key.lower())
        if field is not None and getattr(job, field) is None:
            try:
                setattr(job, field, _header_text(raw))
            except UnicodeDecodeError:
                raise JobError("invalid_job", f"header {key} is not UTF-8", job.id) from None
    if job.tenant is None:
        raise JobError("invalid_job", "`tenant` is required (body or x-tenant-id header)", job.id)
    if job.adapter is not None:
        try:
            parse_adapter_ref(job.adapter)
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
    """Decode one control-topic record; raises msgspec errors on bad input."""
    return _control_decoder.decode(value)


def decode_result(value: bytes) -> JobResult:
    return _result_decoder.decode(value)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def error_result(job_id: str, code: str, message: str, worker: str, **fields) -> JobResult:
    return JobResult(id=job_id, status="error", error=ErrorInfo(code, message), worker=worker, **fields)
