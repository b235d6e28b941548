"""The `lorabus` command through the real broker: publish + produce against a worker (the demo: test_demo.py)."""

import asyncio
import json
import os
import sys

from helpers import running_worker, worker_config


async def _lorabus(*args, stdin: bytes | None = None, env=None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lorabus.worker.cli", *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(stdin), 300)
    return proc.returncode, out.decode(), err.decode()


async def test_publish_and_produce_commands(kafka, tiny_model, peft_adapters, tmp_path):
    config = worker_config(kafka, tiny_model)
    env = {"LORABUS_BOOTSTRAP_SERVERS": kafka, "LORABUS_CONTROL_TOPIC": config.control_topic}
    async with running_worker(config):
        rc, _, err = await _lorabus("publish", "ner", "v1", str(peft_adapters["qv-r4"]), "--tenants", "acme", env=env)
        assert rc == 0, err
        jobs = [{"id": "p-0", "tenant": "acme", "adapter": "ner", "prompt": "hello world", "max_new_tokens": 3},
                {"id": "p-1", "tenant": "acme", "prompt_ids": [5, 6], "max_new_tokens": 2},
                {"id": "p-2", "tenant": "other", "adapter": "ner", "prompt": "hi"}]
        source = tmp_path / "jobs.jsonl"
        source.write_text("".join(json.dumps(j) + "\n" for j in jobs))
        rc, out, err = await _lorabus("produce", "--jobs-topic", config.jobs_topic, "--results-topic",
                                      config.results_topic, str(source), env=env)
    assert rc == 1, err  # p-2's answer is an error: produce says so in its exit code and one summary line
    assert err.strip().splitlines()[-1] == "lorabus produce: 1 of 3 jobs answered with errors: forbidden ×1", err
    results = {r["id"]: r for r in map(json.loads, out.splitlines())}
    assert results["p-0"]["status"] == "ok" and results["p-0"]["adapter_version"] == "v1"
    assert len(results["p-0"]["token_ids"]) == 3
    assert results["p-1"]["status"] == "ok" and results["p-1"]["adapter"] is None
    assert results["p-2"]["error"]["code"] == "forbidden"

