"""Poison records through the real broker: each hostile record travels among good greedy jobs of every
adapter. The worker stays up, every good job equals PEFT's tokens, each bad record is answered with its
error code or dead-lettered, committed offsets reach the end of the jobs topic, and a worker restarted
on the same group neither crashes nor answers anything again."""

import asyncio
import collections
import itertools
import json
import math
import time

import pytest
from aiokafka import AIOKafkaProducer
from safetensors.torch import load_file, save_file

from lorabus.schemas import AdapterPublish, decode_result
from lorabus.worker.client import publish_control, run_jobs
from lorabus.worker.topics import ensure_topics
from helpers import (PeftOracle, committed_lag, raw_header_keys, read_topic, running_worker, unique,
                           worker_config)

pytestmark = pytest.mark.kafka

DEEP = b"[" * 100_000 + b"]" * 100_000
NEW_TOKENS = 6


def _job(job_id, **fields):
    body = {"id": job_id, "tenant": "acme", "prompt_ids": [5, 6, 7], "max_new_tokens": NEW_TOKENS, **fields}
    return json.dumps(body).encode()


def _poisoned_copy(src, dst, weights=None, config=None):
    """A copy of a PEFT adapter with some weights or config values replaced."""
    dst.mkdir()
    tensors = load_file(str(src / "adapter_model.safetensors"))
    for name in list(tensors)[:1]:
        if weights is not None:
            tensors[name] = tensors[name].clone().fill_(weights)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg, allow_nan=True))
    return dst


async def test_poison_records_fail_only_themselves(kafka, tiny_model, peft_adapters, tmp_path):
    fresh_topic = unique("fresh-replies")
    # reply_to names only a topic the operator allows the job's tenant (worker/reply_topics.py).
    config = worker_config(kafka, tiny_model, max_prompt_bytes=64 << 10, reply_topic=[f"acme={fresh_topic}"])
    oracle = PeftOracle(tiny_model)
    nan_weights = _poisoned_copy(peft_adapters["qv-r4"], tmp_path / "nan-weights", weights=math.nan)
    inf_weights = _poisoned_copy(peft_adapters["qv-r4"], tmp_path / "inf-weights", weights=math.inf)
    nan_alpha = _poisoned_copy(peft_adapters["qv-r4"], tmp_path / "nan-alpha", config={"lora_alpha": math.nan})

    names = [None, *peft_adapters]
    good = {f"good-{i}": (names[i % len(names)], [3 + i % 5, 9, 11 + i]) for i in range(12)}
    poison = {  # job id → (record value, expected error code)
        "seed-2^64": (_job("seed-2^64", temperature=0.7, seed=2**64), "invalid_job"),
        "tiny-temperature": (_job("tiny-temperature", temperature=1e-320), "invalid_job"),
        "tiny-top-p": (_job("tiny-top-p", temperature=0.7, top_p=1e-300), "invalid_job"),
        "reply-to-control": (_job("reply-to-control", reply_to=config.control_topic), "forbidden"),
        "reply-to-internal": (_job("reply-to-internal", reply_to="__consumer_offsets"), "forbidden"),
        "big-prompt": (json.dumps({"id": "big-prompt", "tenant": "acme", "prompt": "word " * 40_000}).encode(),
                       "invalid_job"),
        "big-messages": (json.dumps({"id": "big-messages", "tenant": "acme", "messages": [
            {"role": "user", "content": "word " * 8_000} for _ in range(3)]}).encode(), "invalid_job"),
        "surrogate": (b'{"id": "surrogate", "tenant": "acme", "prompt": "\\ud800"}', "invalid_job"),
        "raw-utf8": (b'{"id": "raw-utf8", "tenant": "acme", "prompt": "\xff\xfe"}', "invalid_job"),
        "deadline-1e400": (b'{"id": "deadline-1e400", "tenant": "acme", "prompt": "x", "deadline_ms": 1e400}',
                           "invalid_job"),
        "deep": (b'{"id": "deep", "tenant": "acme", "x": ' + DEEP + b"}", "invalid_job"),
        "nan-weights": (_job("nan-weights", adapter="nan-weights"), "adapter_load_failed"),
        "inf-weights": (_job("inf-weights", adapter="inf-weights"), "adapter_load_failed"),
        "nan-alpha": (_job("nan-alpha", adapter="nan-alpha"), "adapter_load_failed"),
        "header-key": (_job("header-key"), "invalid_job"),
    }
    dead = {  # records without a readable id: dead-lettered (the big one as a truncated copy)
        "no-id-huge": b'{"tenant": "acme", "prompt": "' + b"x" * 1_048_400 + b'"}',
        "no-id-bad-key": b"\xff not json",
    }
    control_poison = [None, DEEP, b"\xff\xfe", b'{"type": "adapter.publish", "name": "x"}',
                      b'{"type": "adapter.activate", "name": "qv", "version": "never-published"}',
                      b'{"type": "adapter.publish", "name": "x", "version": "v", "path": "/p", "sha256": ' + DEEP + b"}"]

    await ensure_topics(kafka, {config.control_topic: 1, fresh_topic: 1})
    producer = AIOKafkaProducer(bootstrap_servers=kafka, max_request_size=2 << 20)
    await producer.start()
    try:
        for value in control_poison:  # read by the worker at start, before any good event
            key = b"activate:qv@never-published" if b"never-published" in (value or b"") else b"poison"
            await producer.send_and_wait(config.control_topic, value, key=key)
    finally:
        await producer.stop()

    async with running_worker(config) as worker:
        await publish_control(kafka, config.control_topic, [
            *(AdapterPublish(name, "v1", str(path)) for name, path in peft_adapters.items()),
            AdapterPublish("nan-weights", "v1", str(nan_weights)),
            AdapterPublish("inf-weights", "v1", str(inf_weights)),
            AdapterPublish("nan-alpha", "v1", str(nan_alpha)),
        ])
        producer = AIOKafkaProducer(bootstrap_servers=kafka, max_request_size=2 << 20)
        await producer.start()
        try:
            with raw_header_keys() as RawKey:
                for job_id, value in dead.items():
                    headers = [(RawKey(b"x-\xff\xfe"), b"v")] if job_id == "no-id-bad-key" else []
                    await producer.send_and_wait(config.jobs_topic, value, headers=headers)
                await producer.send_and_wait(config.jobs_topic, poison["header-key"][0],
                                             headers=[(RawKey(b"x-\xff\xfe"), b"v")])
        finally:
            await producer.stop()
        bad = [(job_id, value) for job_id, (value, _) in poison.items() if job_id != "header-key"]
        fine = [(job_id, _job(job_id, adapter=adapter, prompt_ids=ids)) for job_id, (adapter, ids) in good.items()]
        # Interleaved, so poison and good jobs share batches.
        mixed = [r for pair in itertools.zip_longest(bad, fine) for r in pair if r is not None]
        results = await run_jobs(kafka, config.jobs_topic, config.results_topic, mixed, 120)
        fresh = await run_jobs(kafka, config.jobs_topic, fresh_topic,
                               [("fresh", _job("fresh", reply_to=fresh_topic))], 60)
        letters = await read_topic(kafka, config.dlq_topic, 30, until=lambda r: len(r) >= len(dead))
        deadline = time.monotonic() + 30
        while await committed_lag(kafka, config.group_id, config.jobs_topic) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert await committed_lag(kafka, config.group_id, config.jobs_topic) == 0
        assert not worker._stop.is_set()
        ignored = {s.labels["reason"]: s.value for m in worker.metrics.control_ignored.collect() for s in m.samples
                   if s.name.endswith("_total")}

    # The header-key job was sent before the others: its result is on the results topic already.
    all_results = [decode_result(r.value) for r in await read_topic(kafka, config.results_topic, 10)]
    by_id = {}
    for result in all_results:
        by_id.setdefault(result.id, []).append(result)
    for job_id, (_, code) in poison.items():
        assert job_id in by_id, f"{job_id} was not answered"
        (result,) = by_id[job_id]
        assert result.status == "error" and result.error.code == code, (job_id, result)
    for job_id, (adapter, ids) in good.items():
        (result,) = results[job_id]
        assert result.status == "ok", result
        oracle.assert_matches(peft_adapters.get(adapter), ids, result.token_ids, NEW_TOKENS, job_id)
    assert fresh["fresh"][0].status == "ok"

    assert len(letters) == len(dead), [r.value[:40] for r in letters]
    huge = next(r for r in letters if dict(r.headers).get("x-dlq-truncated"))
    assert int(dict(huge.headers)["x-dlq-original-size"]) == len(dead["no-id-huge"])
    assert dead["no-id-huge"].startswith(huge.value) and len(huge.value) < len(dead["no-id-huge"])
    bad_key = next(r for r in letters if r.value == dead["no-id-bad-key"])
    assert dict(bad_key.headers)["x-dlq-code"] == b"invalid_job"
    # The activation of a version never published is a valid record (it counts once the version is): not skipped.
    assert ignored == {"tombstone": 1, "invalid": 4}, ignored

    # A worker started after all of this reads the same control topic and group: no crash, no replay.
    before = collections.Counter(r.id for r in all_results)
    async with running_worker(config) as again:
        after = await run_jobs(kafka, config.jobs_topic, config.results_topic,
                               [("after-restart", _job("after-restart", adapter="qv-r4"))], 60)
        assert after["after-restart"][0].status == "ok"
        assert not again._stop.is_set()
    now = collections.Counter(decode_result(r.value).id for r in await read_topic(kafka, config.results_topic, 5))
    assert now - before == collections.Counter(["after-restart"]), now - before
    print(f"poison jobs answered: {len(poison)}, dead letters: {len(letters)}, control records ignored: {ignored}, "
          f"good jobs equal to PEFT: {len(good)}")
