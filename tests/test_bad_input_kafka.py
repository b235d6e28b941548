"""Bad input through the real broker: every malformed or unservable record is answered with an error
result (when an id can be read) or dead-lettered with its original bytes, headers and the reason;
the worker stays up, and the group's committed offsets reach the end of the jobs topic."""

import asyncio
import json
import time

from lorabus.schemas import AdapterPublish
from lorabus.worker.client import publish_control, run_jobs
from helpers import committed_lag, make_peft_adapter, read_topic, running_worker, worker_config


def _job(job_id, **fields):
    return {"id": job_id, "tenant": "acme", "prompt_ids": [5, 6, 7], "max_new_tokens": 4, **fields}


async def test_bad_records_are_answered_or_dead_lettered(kafka, tiny_model, peft_adapters, tmp_path):
    dora = make_peft_adapter(tiny_model, tmp_path / "dora", seed=9, r=4, lora_alpha=8,
                             target_modules=["q_proj"], use_dora=True)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((peft_adapters["qv-r4"] / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not really a pickle")
    config = worker_config(kafka, tiny_model, reply_topic=["acme=no-such-topic"])  # allowed, but never created
    answered = {  # job id → (record value, expected error code or None for ok)
        "schema": (json.dumps(_job("schema", max_new_tokens="many")), "invalid_job"),
        "unknown-field": (json.dumps(_job("unknown-field", max_tokens=3)), "invalid_job"),
        "both": (json.dumps(_job("both", prompt="hi")), "invalid_job"),
        "neither": (json.dumps({"id": "neither", "tenant": "acme"}), "invalid_job"),
        "no-tenant": (json.dumps({"id": "no-tenant", "prompt_ids": [1]}), "invalid_job"),
        "bad-ref": (json.dumps(_job("bad-ref", adapter="a@b@c")), "invalid_job"),
        "big-token": (json.dumps(_job("big-token", prompt_ids=[10**6])), "invalid_job"),
        "unknown-adapter": (json.dumps(_job("unknown-adapter", adapter="nope")), "adapter_not_found"),
        "unknown-version": (json.dumps(_job("unknown-version", adapter="qv@v9")), "adapter_not_found"),
        "forbidden": (json.dumps(_job("forbidden", adapter="private")), "forbidden"),
        "dora": (json.dumps(_job("dora", adapter="dora")), "adapter_load_failed"),
        "pickled": (json.dumps(_job("pickled", adapter="pickled")), "adapter_load_failed"),
        "too-long": (json.dumps(_job("too-long", prompt_ids=[5] * 500, max_new_tokens=100)), "prompt_too_long"),
        "late": (json.dumps(_job("late", deadline_ms=int(time.time() * 1000) - 1000)), "deadline_exceeded"),
        "bad-reply": (json.dumps(_job("bad-reply", reply_to="no-such-topic")), "invalid_job"),
        "header-tenant": (json.dumps({"id": "header-tenant", "prompt_ids": [5], "max_new_tokens": 2}), None),
        "good": (json.dumps(_job("good", adapter="qv")), None),
    }
    dead = [b"\xff\xfe not json", b'{"tenant": "acme", "prompt": "no id"}', b"[1, 2, 3]"]
    async with running_worker(config) as worker:
        await publish_control(kafka, config.control_topic, [
            AdapterPublish("qv", "v1", str(peft_adapters["qv-r4"])),
            AdapterPublish("private", "v1", str(peft_adapters["qv-r4"]), tenants=["someone-else"]),
            AdapterPublish("dora", "v1", str(dora)),
            AdapterPublish("pickled", "v1", str(pickled)),
        ])
        records = [(job_id, value.encode()) for job_id, (value, _) in answered.items()]
        records += [(f"dead-{i}", value) for i, value in enumerate(dead)]
        headers = [[("x-tenant-id", b"acme")] if job_id == "header-tenant" else [("trace", b"t-1")]
                   for job_id, _ in records]
        results = await run_jobs(kafka, config.jobs_topic, config.results_topic, records[:len(answered)], 60,
                                 headers=headers[:len(answered)])
        # Dead letters have no id to wait for: send them, then a sentinel job proving the worker is still up.
        await run_jobs(kafka, config.jobs_topic, config.results_topic, records[len(answered):], 5,
                       headers=headers[len(answered):])
        after = await run_jobs(kafka, config.jobs_topic, config.results_topic,
                               [("after", json.dumps(_job("after")).encode())], 60)
        assert after["after"][0].status == "ok"
        deadline = time.monotonic() + 30
        while await committed_lag(kafka, config.group_id, config.jobs_topic) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert await committed_lag(kafka, config.group_id, config.jobs_topic) == 0
        assert not worker._stop.is_set()

    for job_id, (_, code) in answered.items():
        assert job_id in results, f"{job_id} was not answered"
        (result,) = results[job_id]
        if code is None:
            assert result.status == "ok" and result.token_ids, result
        else:
            assert result.status == "error" and result.error.code == code, (job_id, result)
            assert result.error.message
    assert "DoRA" in results["dora"][0].error.message or "use_dora" in results["dora"][0].error.message
    assert "adapter_model.bin" in results["pickled"][0].error.message

    letters = await read_topic(kafka, config.dlq_topic, 30, until=lambda r: len(r) >= len(dead))
    assert sorted(r.value for r in letters) == sorted(dead)
    for letter in letters:
        headers = dict(letter.headers)
        assert headers["trace"] == b"t-1"  # original headers kept
        assert headers["x-dlq-code"] == b"invalid_job"
        assert headers["x-dlq-topic"] == config.jobs_topic.encode()
        assert int(headers["x-dlq-offset"]) >= 0 and headers["x-dlq-reason"]
