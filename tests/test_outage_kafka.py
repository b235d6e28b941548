"""A broker outage, through a real broker of the test's own: `lorabus worker --log-format json` keeps its
log readable (aiokafka's reconnect errors rate-limited to one line per kind per interval, every line a
JSON object, job lines with their context and no prompt) and a SIGTERM during the outage ends in exit 0
within the drain timeout plus a few seconds, with no traceback and every Kafka client closed. The worker
runs with a short rate-limit window (--log-rate-limit-ms), so a short outage spans several windows."""

import json
import os
import re
import signal
import time

import pytest

from lorabus.worker.client import run_jobs
from lorabus.worker.topics import ensure_topics
from helpers import PrivateBroker, start_worker_process, unique

SECRET = "my card number is 4111-1111-1111-1111"
DRAIN_TIMEOUT_MS = 5000
EXIT_BOUND_S = DRAIN_TIMEOUT_MS / 1000 + 15  # drain + closing the clients (each bounded) + engine stop
LOG_RATE_LIMIT_MS = 1000  # injected (production: 10 s): the outage spans several windows
OUTAGE_S = 2.5 * LOG_RATE_LIMIT_MS / 1000  # longer than the rate-limit window: each kind of line may show again
SUPPRESSED = re.compile(r"\[(\d+) similar lines suppressed")
# Unlimited, aiokafka logs about 100 lines a second while the broker is away; limited, each kind of line
# shows about once per window, from the broker's stop to the worker's exit.
AIOKAFKA_LINES_PER_WINDOW = 10  # as the old bound: 30 lines in the ~3 windows of a 12 s outage and the exit


@pytest.mark.kafka
@pytest.mark.parametrize("lanes", [False, True], ids=["one jobs topic", "lanes"])
async def test_sigterm_during_broker_outage_exits_0_with_a_quiet_log(tiny_model, tmp_path, lanes):
    broker = PrivateBroker(tmp_path / "broker")
    broker.start()
    worker = None
    log_path = tmp_path / "worker.log"
    try:
        tag = unique("outage")
        topics = {t: f"{t}-{tag}" for t in ("jobs", "results", "control", "dlq")}
        await ensure_topics(broker.bootstrap, {topics["jobs"]: 1, topics["results"]: 1, topics["control"]: 1,
                                               topics["dlq"]: 1})
        worker = start_worker_process(broker.bootstrap, tiny_model, topics, f"g-{tag}", log_path,
                                      drain_timeout_ms=DRAIN_TIMEOUT_MS, status_interval_ms=500,
                                      control_wait_ms=500, log_format="json", log_rate_limit_ms=LOG_RATE_LIMIT_MS,
                                      # the jobs topic as one of two lanes (a list flag: os.pathsep-separated)
                                      **({"lane": f"{topics['jobs']}{os.pathsep}{topics['jobs']}-idle"} if lanes else {}))
        jobs = [("ready", {"id": "ready", "tenant": "t", "prompt_ids": [5, 6], "max_new_tokens": 2}),
                ("lost", {"id": "lost", "tenant": "acme", "adapter": "nope@v9", "prompt": SECRET})]
        answers = await run_jobs(broker.bootstrap, topics["jobs"], topics["results"],
                                 [(job_id, json.dumps(job).encode()) for job_id, job in jobs], 120)
        assert answers["ready"][0].status == "ok" and answers["lost"][0].error.code == "adapter_not_found"
        stopped = time.monotonic()
        broker.stop()
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped)))
        outage_s = time.monotonic() - stopped
        worker.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = worker.wait(EXIT_BOUND_S)
        took = time.monotonic() - started
        windows = (time.monotonic() - stopped) / (LOG_RATE_LIMIT_MS / 1000) + 1
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        broker.stop(check=False)
    text = log_path.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "CancelledError" not in text, text[-3000:]
    assert "Unclosed" not in text, text[-3000:]  # every Kafka client closed
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]  # nothing but JSON lines
    aiokafka_lines = [e for e in entries if e["logger"].startswith("aiokafka")]
    assert len(aiokafka_lines) <= AIOKAFKA_LINES_PER_WINDOW * windows, "\n".join(map(str, aiokafka_lines[-40:]))
    (lost,) = [e for e in entries if e.get("job_id") == "lost"]
    assert (lost["tenant"], lost["adapter"], lost["level"]) == ("acme", "nope@v9", "INFO")
    assert "adapter_not_found" in lost["message"] and SECRET not in text  # no prompt without --log-payloads
    suppressed = sum(int(n) for n in SUPPRESSED.findall(text))
    print(f"\nbroker outage of {outage_s:.1f} s, then SIGTERM: exit 0 in {took:.1f} s; "
          f"{len(aiokafka_lines)} aiokafka log lines in {windows:.0f} rate-limit windows ({suppressed} more suppressed), "
          f"{len(entries)} log lines in all")
