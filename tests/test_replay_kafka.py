"""Signed control means what operators think it means, through the real broker (issue 20, R7 and R8):

- R8: a captured, correctly signed old `adapter.activate` sent again after a newer activation is refused
  by a running worker (its event_id was applied under its key; later, its ts_ms is stale against the
  broker's time on the record), and still refused by a worker restarted after the broker compacted the
  original away, when the replay is the only record under its key.
- R7: `lorabus status` and the pre-send check of `lorabus rollout`, given the workers' --control-key,
  fold only what the workers apply and list the ignored records apart; a correctly signed activation is
  no longer refused because of an unsigned retire nobody applies.
"""

import asyncio
import json
import time
from dataclasses import replace

import pytest
from aiokafka import AIOKafkaProducer

from lorabus.schemas import AdapterActivate, AdapterPublish, AdapterRetire, encode
from lorabus.worker import cli
from lorabus.worker.client import publish_control, run_jobs
from lorabus.worker.control_log import control_key
from lorabus.worker.signing import ControlKeys
from lorabus.worker.topics import CONTROL_TOPIC_CONFIGS, ensure_topics
from helpers import end_offset, record_offsets, running_worker, worker_config

pytestmark = pytest.mark.kafka

SKEW_MS = 5000  # the workers' replay window here: short, so a test can wait past it
KEY_LINE = "k1:" + "K" * 40
FAST_COMPACTION = {"segment.ms": "100", "min.cleanable.dirty.ratio": "0.001", "delete.retention.ms": "100",
                   "min.compaction.lag.ms": "0"}
COMPACTION_WAIT_S = 60  # the broker's log cleaner looks for work every log.cleaner.backoff.ms (15 s by default)
PROMPT = [5, 6, 7]


async def _send_raw(kafka: str, topic: str, key: bytes, value: bytes, headers) -> int:
    """Send one record exactly as given (a captured record re-sent); returns its offset."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        return (await producer.send_and_wait(topic, value, key=key, headers=headers)).offset
    finally:
        await producer.stop()


async def _caught_up(kafka: str, worker, topic: str, timeout_s: float = 30) -> None:
    end = await end_offset(kafka, topic)
    deadline = time.monotonic() + timeout_s
    while worker.control_offset < end:
        assert time.monotonic() < deadline, f"worker read {worker.control_offset} of {end} control records"
        await asyncio.sleep(0.05)


def _ignored(worker) -> dict[str, float]:
    return {s.labels["reason"]: s.value for m in worker.metrics.control_ignored.collect() for s in m.samples
            if s.name.endswith("_total")}


async def _served_version(kafka: str, config, tag: str) -> str:
    job_id = f"{tag}-{time.monotonic_ns()}"
    job = json.dumps({"id": job_id, "tenant": "acme", "adapter": "a0", "prompt_ids": PROMPT, "max_new_tokens": 2})
    results = await run_jobs(kafka, config.jobs_topic, config.results_topic, [(job_id, job.encode())], 90)
    (result,) = results[job_id]
    assert result.status == "ok", result
    return result.adapter_version


def _cli(capsys, *argv) -> tuple[int, str, str]:
    """`lorabus ...` in this process (called in a thread: it runs its own event loop)."""
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


async def test_a_replayed_signed_activation_is_refused_before_and_after_compaction(kafka, tiny_model, peft_adapters,
                                                                                   tmp_path, capsys):
    key_file = tmp_path / "control.keys"
    key_file.write_text(KEY_LINE + "\n")
    keys = ControlKeys.load(str(key_file))
    config = worker_config(kafka, tiny_model, control_key=str(key_file), control_max_skew_ms=SKEW_MS)
    control = config.control_topic
    await ensure_topics(kafka, {control: 1}, {control: {**CONTROL_TOPIC_CONFIGS, **FAST_COMPACTION}})

    await publish_control(kafka, control, [AdapterPublish("a0", "v1", str(peft_adapters["qv-r4"])),
                                           AdapterPublish("a0", "v2", str(peft_adapters["all-r8-rslora"]))],
                          signer=keys.sign)

    async with running_worker(replace(config, worker_id="w-a")) as worker:
        await _caught_up(kafka, worker, control)
        # The operator activates v1, then v2; an attacker captured v1's activation record as it went by
        # and sends it again at once, within the skew window: refused, its event_id was applied under its key.
        activate_v1 = AdapterActivate("a0", "v1", event_id="activate-v1", ts_ms=int(time.time() * 1000))
        captured_key, captured_value = control_key(activate_v1).encode(), encode(activate_v1)
        captured_headers = [keys.sign(captured_value)]
        original = await _send_raw(kafka, control, captured_key, captured_value, captured_headers)
        await publish_control(kafka, control, [AdapterActivate("a0", "v2")], signer=keys.sign)
        soon = await _send_raw(kafka, control, captured_key, captured_value, captured_headers)
        assert time.time() * 1000 - activate_v1.ts_ms < SKEW_MS, "the machine is too slow for this window"
        await _caught_up(kafka, worker, control)
        assert await _served_version(kafka, config, "replay-soon") == "v2"
        # Past the window: refused by the record alone (signed ts_ms far from the broker's time on it).
        await asyncio.sleep(SKEW_MS / 1000 + 1)
        late = await _send_raw(kafka, control, captured_key, captured_value, captured_headers)
        await _caught_up(kafka, worker, control)
        assert await _served_version(kafka, config, "replay-late") == "v2"
        ignored_a = _ignored(worker)
    assert ignored_a == {"replay": 1, "stale": 1}, ignored_a

    # Roll the segment (segment.ms=100) with records that change nothing (v2 published again as it is, not
    # a newer activation that would outrank the replay anyway), and let the cleaner compact it: the
    # original activation and the first replay go, the late replay is the last record of its key.
    compact_started = time.monotonic()
    for _ in range(3):
        await asyncio.sleep(0.2)
        await publish_control(kafka, control, [AdapterPublish("a0", "v2", str(peft_adapters["all-r8-rslora"]))],
                              signer=keys.sign)
    kept, _ = await record_offsets(kafka, control)
    while {original, soon} & set(kept) and time.monotonic() - compact_started < COMPACTION_WAIT_S:
        await asyncio.sleep(1.0)
        kept, _ = await record_offsets(kafka, control)
    assert not {original, soon} & set(kept), f"the broker did not compact {control} in {COMPACTION_WAIT_S} s: {kept}"
    assert late in kept

    async with running_worker(replace(config, worker_id="w-b", group_id=config.group_id + "-b")) as worker:
        await _caught_up(kafka, worker, control)
        assert await _served_version(kafka, config, "restarted") == "v2"
        assert _ignored(worker) == {"stale": 1}, _ignored(worker)

        # R7: an unsigned retire of v1, which no worker applies, and the CLI given the workers' key.
        await publish_control(kafka, control, [AdapterRetire("a0", "v1")])
        await _caught_up(kafka, worker, control)
        common = ["--bootstrap-servers", kafka, "--control-topic", control, "--status-topic", config.status_topic,
                  "--control-key", str(key_file), "--control-max-skew-ms", str(SKEW_MS)]
        rc, out, err = await asyncio.to_thread(_cli, capsys, "status", *common, "--json")
        assert rc == 0, err
        view = json.loads(out)["control_log"]
        assert view["adapters"]["a0"] == {"activated": "v2", "live_versions": ["v2", "v1"]}, view["adapters"]
        assert view["ignored_count"] == 2, view
        assert sorted(r["reason"] for r in view["ignored"]) == ["stale", "unsigned"], view["ignored"]
        assert {r["key"] for r in view["ignored"]} == {"activate:a0@v1", "adapter:a0@v1"}, view["ignored"]
        rc, out, err = await asyncio.to_thread(_cli, capsys, "status", *common)
        assert rc == 0, err
        assert "ignored control records (workers skip them): 2" in out, out
        rows = [line.split() for line in out.splitlines()]
        assert any(row[1:3] == ["activate:a0@v1", "stale"] for row in rows if len(row) > 2), out
        assert any(row[1:3] == ["adapter:a0@v1", "unsigned"] for row in rows if len(row) > 2), out

        # The signed rollback the operator means: not refused as "not published", and applied.
        rc, out, err = await asyncio.to_thread(_cli, capsys, "rollout", "activate", "a0", "v1", *common,
                                               "--wait", "--timeout", "60")
        assert rc == 0, (out, err)
        assert await _served_version(kafka, config, "rolled-back") == "v1"
