"""Trust boundaries through the real broker: a worker with a control key and an adapter root ignores
unsigned, forged and hostile-header control records, refuses adapter paths that escape the root, and
serves what is correctly signed and inside it, including what `lorabus publish/activate --control-key`
sends with a rotated-out (but still listed) key."""

import asyncio
import json
import os
import shutil
import sys

import pytest
from aiokafka import AIOKafkaProducer

from lorabus.schemas import AdapterActivate, AdapterPublish, encode
from helpers import PeftOracle, raw_header_keys, running_worker, worker_config
from lorabus.worker.client import publish_control, run_jobs
from lorabus.worker.signing import SIGNATURE_HEADER, ControlKeys

pytestmark = pytest.mark.kafka

NEW_KEY = "k-new:" + "N" * 40
OLD_KEY = "k-old:" + "O" * 40
MAX_NEW_TOKENS = 4


async def _lorabus(*args, env=None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lorabus.worker.cli", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    return proc.returncode, out.decode(), err.decode()


async def _send_raw(kafka: str, topic: str, value: bytes, headers) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        # The control topic is compacted: the broker refuses a record without a key.
        await producer.send_and_wait(topic, value, key=b"adapter:hostile@v1", headers=headers)
    finally:
        await producer.stop()


def _write_keys(path, *lines: str) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


async def test_signed_control_and_adapter_roots(kafka, tiny_model, peft_adapters, tmp_path):
    oracle = PeftOracle(tiny_model)
    prompt = oracle.prompt_ids("the quick brown fox")
    root = tmp_path / "root"
    good_v1 = shutil.copytree(peft_adapters["qv-r4"], root / "fin-v1")
    good_v2 = shutil.copytree(peft_adapters["all-r8-rslora"], root / "fin-v2")
    outside = peft_adapters["mlp-r16-patterns"]  # a valid adapter, but not under the root
    (root / "link").symlink_to(outside, target_is_directory=True)
    sneaky = root / "sneaky"
    sneaky.mkdir()
    shutil.copy(outside / "adapter_config.json", sneaky)
    (sneaky / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")

    worker_keys = _write_keys(tmp_path / "worker.keys", NEW_KEY, OLD_KEY)
    publisher = ControlKeys.load(_write_keys(tmp_path / "publisher.keys", NEW_KEY))
    forger = ControlKeys.load(_write_keys(tmp_path / "forger.keys", "k-new:" + "F" * 40))
    # A publisher not yet rotated: signs with the old key, and lists the new one, so its pre-send check reads
    # what is signed with either as the workers do (a key it lacks, it cannot verify: those records are skipped).
    old_key_file = _write_keys(tmp_path / "old.keys", OLD_KEY, NEW_KEY)
    config = worker_config(kafka, tiny_model, control_key=worker_keys, adapter_root=[str(root)])
    topic = config.control_topic

    async def serve(tag: str, refs: list[str]) -> dict:
        jobs = [(f"{tag}-{ref}", json.dumps({"id": f"{tag}-{ref}", "tenant": "acme", "adapter": ref,
                                             "prompt_ids": prompt, "max_new_tokens": MAX_NEW_TOKENS}).encode())
                for ref in refs]
        results = await run_jobs(kafka, config.jobs_topic, config.results_topic, jobs, 90)
        assert results.keys() == {job_id for job_id, _ in jobs}
        return {job_id.removeprefix(f"{tag}-"): rs[0] for job_id, rs in results.items()}

    def assert_error(result, code: str, *words: str):
        assert result.status == "error" and result.error.code == code, result
        for word in words:
            assert word in result.error.message, result.error.message

    def assert_served(result, version: str, weights):
        assert result.status == "ok" and (result.adapter, result.adapter_version) == ("fin", version), result
        oracle.assert_matches(weights, prompt, result.token_ids, MAX_NEW_TOKENS, result.id)

    async with running_worker(config):
        signed = publisher.sign
        # Ignored: unsigned, signed with the right key id but the wrong secret, and hostile headers.
        await publish_control(kafka, topic, [AdapterPublish("unsigned", "v1", str(good_v1))])
        await publish_control(kafka, topic, [AdapterPublish("forged", "v1", str(good_v1))], signer=forger.sign)
        hostile = encode(AdapterPublish("hostile", "v1", str(good_v1)))
        await _send_raw(kafka, topic, hostile, [(SIGNATURE_HEADER, b"\xff\xfe" * 5000), ("\u00e9", None)])
        with raw_header_keys() as raw_key:  # a header key that is not UTF-8 on the wire
            await _send_raw(kafka, topic, hostile, [(raw_key(b"x-lorabus-signature\xff"), publisher.sign(hostile)[1])])
        await _send_raw(kafka, topic, hostile, [publisher.sign(hostile), publisher.sign(hostile)])  # duplicates
        # Signed, but the path leaves the root: by `..`, outright, through a symlinked dir or weights file.
        await publish_control(kafka, topic, [
            AdapterPublish("dotdot", "v1", f"{root}/{os.path.relpath(outside, root)}"),
            AdapterPublish("outside", "v1", str(outside)),
            AdapterPublish("link", "v1", str(root / "link")),
            AdapterPublish("sneaky", "v1", str(sneaky)),
        ], signer=signed)
        # Signed and inside: served. v2 (a file:// URI) is published but not active, and an unsigned
        # activate of it must not move traffic.
        await publish_control(kafka, topic, [AdapterPublish("fin", "v1", str(good_v1)),
                                             AdapterPublish("fin", "v2", f"file://{good_v2}")], signer=signed)
        await publish_control(kafka, topic, [AdapterActivate("fin", "v2")])
        await publish_control(kafka, topic, [AdapterActivate("fin", "v2")], signer=forger.sign)

        first = await serve("a", ["unsigned", "forged", "hostile", "dotdot", "outside", "link", "sneaky",
                                  "fin", "fin@v2"])
        for ref in ("unsigned", "forged", "hostile"):
            assert_error(first[ref], "adapter_not_found", ref)
        for ref in ("dotdot", "outside", "link", "sneaky"):
            assert_error(first[ref], "adapter_load_failed", "outside the adapter roots")
        assert_error(first["sneaky"], "adapter_load_failed", "adapter_model.safetensors")
        assert_served(first["fin"], "v1", good_v1)
        assert_served(first["fin@v2"], "v2", good_v2)

        # The CLI signs with its --control-key (here the old key, still listed on the worker: rotation).
        env = {"LORABUS_BOOTSTRAP_SERVERS": kafka, "LORABUS_CONTROL_TOPIC": topic}
        rc, _, err = await _lorabus("publish", "cli", "v1", str(good_v1), "--control-key", old_key_file, env=env)
        assert rc == 0, err
        rc, _, err = await _lorabus("activate", "fin", "v2", env={**env, "LORABUS_CONTROL_KEY": old_key_file})
        assert rc == 0, err
        rc, _, err = await _lorabus("publish", "cli-unsigned", "v1", str(good_v1), env=env)
        assert rc == 0, err

        second = await serve("b", ["cli", "fin", "cli-unsigned"])
        assert second["cli"].status == "ok" and second["cli"].adapter_version == "v1", second["cli"]
        oracle.assert_matches(good_v1, prompt, second["cli"].token_ids, MAX_NEW_TOKENS, "cli")
        assert_served(second["fin"], "v2", good_v2)
        assert_error(second["cli-unsigned"], "adapter_not_found", "cli-unsigned")
