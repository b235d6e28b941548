"""worker/logs.py: JSON and text lines with the job context, payload redaction, and the rate limit on
aiokafka's repeating errors."""

import asyncio
import io
import json
import logging
import time

import pytest

from lorabus.worker.logs import JsonFormatter, LogRateLimit, RateLimitFilter, bind_job, job_context, setup_logging


@pytest.fixture
def capture():
    """setup_logging into a buffer; the root logger's handlers and levels restored afterwards."""
    root, aiokafka = logging.getLogger(), logging.getLogger("aiokafka")
    saved = (list(root.handlers), root.level, aiokafka.level)
    stream = io.StringIO()

    def install(log_format="text", payloads=False, level="DEBUG", rate_limit_s=10.0):
        setup_logging(log_format, level, payloads, stream=stream, rate_limit_s=rate_limit_s)
        return stream

    yield install
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    aiokafka.setLevel(saved[2])


def test_json_lines_carry_the_job_context_as_fields(capture):
    stream = capture("json")
    logging.getLogger("lorabus.test").info("answered %s", "invalid_job",
                                           extra=job_context("j-1", "acme", "ner@v2"))
    logging.getLogger("lorabus.test").warning("no job here")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "answered invalid_job" and first["level"] == "INFO"
    assert (first["job_id"], first["tenant"], first["adapter"]) == ("j-1", "acme", "ner@v2")
    assert first["logger"] == "lorabus.test" and first["ts"].endswith("Z")
    assert "job_id" not in second and second["level"] == "WARNING"


def test_text_lines_carry_the_job_context_as_key_value(capture):
    stream = capture("text")
    logging.getLogger("lorabus.test").info("answered", extra=job_context("j 2", "acme", None))
    line = stream.getvalue().strip()
    assert line.endswith('answered job_id="j 2" tenant=acme adapter=-'), line


def test_exceptions_stay_one_json_object(capture):
    stream = capture("json")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("lorabus.test").exception("failed")
    (entry,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert "RuntimeError: boom" in entry["exc"]


async def test_bound_job_context_reaches_every_line_of_that_task_only(capture):
    stream = capture("json")
    log = logging.getLogger("lorabus.deep.module")

    async def answer(job_id: str, tenant: str) -> None:
        bind_job(job_id, tenant, "ner@v1")
        await asyncio.sleep(0)
        log.warning("control topic not caught up")

    await asyncio.gather(asyncio.create_task(answer("a", "t1")), asyncio.create_task(answer("b", "t2")))
    log.warning("outside any job")
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert sorted((e["job_id"], e["tenant"]) for e in entries if "job_id" in e) == [("a", "t1"), ("b", "t2")]
    assert "job_id" not in entries[-1]


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_prompt_and_generated_text_only_with_payloads_on(capture, log_format):
    secret_prompt, secret_text = "my card is 4111-1111", "the answer is 42"
    stream = capture(log_format, payloads=False)
    logging.getLogger("lorabus.test").info("answered", extra=job_context("j-3", "acme", None, prompt=secret_prompt,
                                                                         text=secret_text))
    quiet = stream.getvalue()
    assert "j-3" in quiet and secret_prompt not in quiet and secret_text not in quiet
    stream = capture(log_format, payloads=True)
    logging.getLogger("lorabus.test").info("answered", extra=job_context("j-4", "acme", None, prompt=secret_prompt,
                                                                         text=secret_text))
    loud = stream.getvalue()[len(quiet):]
    assert secret_prompt in loud and secret_text in loud


def test_aiokafka_errors_are_rate_limited_with_a_suppressed_count(capture):
    stream = capture("text", rate_limit_s=0.2)
    conn, ours = logging.getLogger("aiokafka.conn"), logging.getLogger("lorabus.worker.service")
    for _ in range(100):
        conn.error("Unable connect to %s: [Errno 111]", "127.0.0.1:9092", exc_info=(OSError, OSError(111), None))
        ours.warning("not rate-limited")
    logging.getLogger("aiokafka").error("Unable to update metadata from %s", 1)  # another kind: its own budget
    first = stream.getvalue().splitlines()
    kafka = [line for line in first if "aiokafka" in line]
    assert len(kafka) == 2 and "Traceback" not in stream.getvalue()
    assert sum("not rate-limited" in line for line in first) == 100  # other loggers untouched
    time.sleep(0.25)
    conn.error("Unable connect to %s: [Errno 111]", "127.0.0.1:9092")
    last = stream.getvalue().splitlines()[-1]
    assert "Unable connect to 127.0.0.1:9092" in last and "[99 similar lines suppressed in the last 0.2 s]" in last


def test_rate_limit_lets_lower_levels_and_other_loggers_through():
    clock = [0.0]
    limit = RateLimitFilter("aiokafka", 10.0, clock=lambda: clock[0])

    def record(name, level, msg="x"):
        return logging.LogRecord(name, level, __file__, 1, msg, None, None)

    assert limit.filter(record("aiokafka.conn", logging.ERROR))
    assert not limit.filter(record("aiokafka.conn", logging.ERROR))
    assert limit.filter(record("aiokafka.conn", logging.INFO))
    assert limit.filter(record("aiokafkax", logging.ERROR)) and limit.filter(record("aiokafkax", logging.ERROR))
    clock[0] = 10.0
    passed = record("aiokafka.conn", logging.ERROR)
    assert limit.filter(passed) and "1 similar lines suppressed" in passed.getMessage()


def test_one_rate_limit_per_key_on_an_injected_clock():
    """LogRateLimit, which the aiokafka filter and the result producer share: one event per key per window,
    the next one through told how many were held back."""
    clock = [100.0]
    limit = LogRateLimit(2.5, clock=lambda: clock[0])
    assert limit.allow("down") == 0 and limit.allow("stalled") == 0  # keys have budgets of their own
    assert [limit.allow("down") for _ in range(3)] == [None] * 3
    clock[0] = 102.4
    assert limit.allow("down") is None
    clock[0] = 102.5
    held = limit.allow("down")
    assert held == 4 and limit.note(held) == " [4 similar lines suppressed in the last 2.5 s]"
    assert limit.allow("stalled") == 0 and limit.note(0) == ""
    assert all(LogRateLimit(0, clock=lambda: 0.0).allow("k") == 0 for _ in range(3))  # 0: every line


def test_unknown_format_or_level_is_a_value_error():
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        setup_logging("xml")
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        setup_logging("text", "LOUD")


def test_json_formatter_never_fails_on_odd_values():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.job_id, record.tenant = b"\xff", object()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["job_id"] == str(b"\xff")
