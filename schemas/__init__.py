"""The lorabus wire contract: typed messages for the jobs, results, control and dead-letter topics.

Only `v1` exists today. Everything here is plain msgspec Structs and pure functions; this package
imports nothing else of lorabus.
"""

from lorabus.schemas.v1 import (
    ERROR_CODES,
    DECODE_ERRORS,
    AdapterActivate,
    AdapterPublish,
    AdapterRetire,
    AdapterWarm,
    AdapterRef,
    ControlEvent,
    ErrorInfo,
    Job,
    JobError,
    JobResult,
    RouteDelete,
    RouteSet,
    RouteTarget,
    Usage,
    decode_control,
    decode_job,
    decode_result,
    encode,
    error_result,
    parse_adapter_ref,
)

__all__ = [
    "ERROR_CODES",
    "DECODE_ERRORS",
    "AdapterActivate",
    "AdapterPublish",
    "AdapterRetire",
    "AdapterWarm",
    "AdapterRef",
    "ControlEvent",
    "ErrorInfo",
    "Job",
    "JobError",
    "JobResult",
    "RouteDelete",
    "RouteSet",
    "RouteTarget",
    "Usage",
    "decode_control",
    "decode_job",
    "decode_result",
    "encode",
    "error_result",
    "parse_adapter_ref",
]
