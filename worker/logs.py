"""Logging for `lorabus worker` and the CLI: text or JSON lines, job context, payload redaction, and a
rate limit on aiokafka's connection errors.

- `JsonFormatter`: one JSON object per line: `ts`, `level`, `logger`, `message`, the job context fields
  (`job_id`, `tenant`, `adapter`) when the line is about a job, `exc` for a traceback.
- `TextFormatter`: the classic text line, job context appended as ` key=value`.
- `job_context(job_id, tenant, adapter, prompt=..., text=...)`: the `extra=` of a job-level log line.
- `bind_job(...)`: called in a job's own asyncio task, makes every line logged from then on in that task
  (by any module) carry the job context; `JobContextFilter` adds it to the records.
- `PayloadFilter`: drops the payload fields (`prompt`, `text`) from records unless payloads are enabled
  (`--log-payloads`), so no prompt or generated text reaches a log by default, whoever logged it.
- `LogRateLimit`: the one rate limit for repeating lines (one per key per interval, held-back lines
  counted), with an injectable interval and clock; used by `RateLimitFilter` and `producer.ResultProducer`.
- `RateLimitFilter`: for the `aiokafka` loggers, one line per kind of trouble per interval, without its
  traceback; the next line that gets through says how many were suppressed meanwhile (a broker outage
  otherwise logs about 100 ERROR lines per second). `limit_aiokafka_logs` puts one on each of aiokafka's
  loggers (a filter on a logger does not see its children's records), whoever handles the lines: the CLI
  through `setup_logging`, and every result producer when it starts (a worker embedded in another program).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

LOG_FORMATS = ("text", "json")
CONTEXT_FIELDS = ("job_id", "tenant", "adapter")  # every job-level line carries these
PAYLOAD_FIELDS = ("prompt", "text")  # logged only with --log-payloads
RATE_LIMIT_INTERVAL_S = 10.0
RATE_LIMITED_LOGGER = "aiokafka"  # and its children: their warnings and errors repeat while a broker is away
# aiokafka's loggers that write one line per failed attempt (client.py logs as plain "aiokafka").
AIOKAFKA_LOGGERS = (
    "aiokafka", "aiokafka.conn", "aiokafka.cluster", "aiokafka.producer.producer",
    "aiokafka.producer.sender", "aiokafka.consumer.consumer", "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
)
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "lorabus"  # the handler setup_logging installs (and replaces on a second call)


def job_context(job_id: str | None, tenant: str | None = None, adapter: str | None = None,
                **payload: str | None) -> dict:
    """`extra=` for a job-level line: id, tenant and adapter@version (or None for the base model); payload
    fields (prompt=..., text=...) are carried too, and dropped by PayloadFilter unless enabled."""
    extra = {"job_id": job_id, "tenant": tenant, "adapter": adapter}
    extra.update({k: v for k, v in payload.items() if k in PAYLOAD_FIELDS and v is not None})
    return extra


# The job the current asyncio task answers (each job runs in a task of its own: a set() here stays in it).
_current_job: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lorabus_job", default=None)


def bind_job(job_id: str | None, tenant: str | None = None, adapter: str | None = None, **payload: str | None) -> None:
    """Every line logged from now on in this task carries this job context (call it again as it is learnt)."""
    _current_job.set(job_context(job_id, tenant, adapter, **payload))


class JobContextFilter(logging.Filter):
    """Adds the bound job context (bind_job) to records that do not carry their own."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (_current_job.get() or {}).items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def _context(record: logging.LogRecord) -> dict:
    return {name: getattr(record, name) for name in CONTEXT_FIELDS + PAYLOAD_FIELDS if hasattr(record, name)}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; never raises on odd values (they are written with str())."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        entry.update(_context(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The usual text line with the job context appended as `key=value` (values with spaces quoted)."""

    def __init__(self):
        super().__init__(_TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        pairs = [f"{k}={_text_value(v)}" for k, v in _context(record).items()]
        return " ".join([line, *pairs])


def _text_value(value) -> str:
    text = "-" if value is None else str(value)
    return json.dumps(text, ensure_ascii=False) if (not text or any(c.isspace() or c in "\"=" for c in text)) else text


class PayloadFilter(logging.Filter):
    """Strips prompt and generated text from every record unless payload logging is on."""

    def __init__(self, payloads: bool = False):
        super().__init__()
        self.payloads = payloads

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.payloads:
            for name in PAYLOAD_FIELDS:
                record.__dict__.pop(name, None)
        return True


class LogRateLimit:
    """The one rate limit of the project's repeating log lines: lets one event per key through every
    `interval_s` (on `clock`, injectable for tests) and counts the ones it held back."""

    def __init__(self, interval_s: float = RATE_LIMIT_INTERVAL_S, clock=time.monotonic):
        self.interval_s, self.clock = interval_s, clock
        self._last: dict = {}
        self._held: dict = {}

    def allow(self, key=None) -> int | None:
        """None: stay quiet (counted); else how many were held back since the last one let through."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)

    def note(self, held: int) -> str:
        """What a line let through says about the ones held back before it ("" when none were)."""
        return f" [{held} similar lines suppressed in the last {self.interval_s:g} s]" if held else ""


class RateLimitFilter(logging.Filter):
    """For records of the `name` logger tree: one WARNING-or-worse line per (logger, message template) per
    `interval_s` (a `LogRateLimit`), without traceback; the next one that passes says how many were
    suppressed. Other records, and lower levels, pass untouched."""

    def __init__(self, name: str = RATE_LIMITED_LOGGER, interval_s: float = RATE_LIMIT_INTERVAL_S,
                 clock=time.monotonic):
        super().__init__(name)
        self.limit = LogRateLimit(interval_s, clock)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not super().filter(record):  # not ours to limit
            return True
        # The template: "Unable connect to %s" is one kind however many hosts.
        held = self.limit.allow((record.name, record.msg))
        if held is None:
            return False
        if held:
            record.msg, record.args = record.getMessage() + self.limit.note(held), None
        record.exc_info, record.exc_text = None, None  # the message says what failed; tracebacks would flood
        return True


_aiokafka_limit: RateLimitFilter | None = None


def limit_aiokafka_logs(interval_s: float | None = None) -> RateLimitFilter:
    """Rate-limit aiokafka's repeating lines process-wide: one shared RateLimitFilter on each of its loggers.
    With `interval_s`, a fresh filter replaces the installed one; without, an installed one is kept."""
    global _aiokafka_limit
    if _aiokafka_limit is not None and interval_s is None:
        return _aiokafka_limit
    old = _aiokafka_limit
    _aiokafka_limit = RateLimitFilter(RATE_LIMITED_LOGGER, RATE_LIMIT_INTERVAL_S if interval_s is None else interval_s)
    for name in AIOKAFKA_LOGGERS:
        logger = logging.getLogger(name)
        if old is not None:
            logger.removeFilter(old)
        logger.addFilter(_aiokafka_limit)
    return _aiokafka_limit


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged, never to a stream closed since (main()
    called in-process, e.g. by a test capturing stderr)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging(log_format: str = "text", level: str | int = "INFO", payloads: bool = False,
                  stream=None, rate_limit_s: float = RATE_LIMIT_INTERVAL_S) -> logging.Handler | None:
    """Route the root logger to a handler on stderr (or `stream`) in `log_format`, replacing the one an
    earlier call installed; aiokafka's repeating errors rate-limited to one line per kind per `rate_limit_s`
    (the worker's --log-rate-limit-ms). Like logging.basicConfig, it leaves
    a root logger that has other handlers as it is (returns None) unless `stream` is given. Raises
    ValueError for an unknown format or level (the CLI turns it into a one-line usage error)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r} (one of: {', '.join(LOG_FORMATS)})")
    if isinstance(level, str):
        level_no = logging.getLevelName(level.upper())
        if not isinstance(level_no, int):
            raise ValueError(f"unknown log level {level!r} (one of: DEBUG, INFO, WARNING, ERROR, CRITICAL)")
        level = level_no
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(JobContextFilter())
    handler.addFilter(PayloadFilter(payloads))  # after the context: a bound prompt is stripped as well
    limit_aiokafka_logs(rate_limit_s)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    if stream is None and root.handlers:  # configured by whoever runs us in-process (pytest, a host program)
        return None
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger(RATE_LIMITED_LOGGER).setLevel(max(level, logging.WARNING))  # its INFO is chatter
    return handler
