"""`lorabus rollout ...` and `lorabus status` through the real broker, without workers: the test writes
the control log itself (publish_control) and plays the workers by writing hand-made WorkerStatus
records to the status topic. Refused events send nothing; `status` shows what the statuses say;
`--wait` exits 1 on a failure, 0 when ok and 4 when no live worker reports."""

import asyncio
import json
import sys
import time
import uuid

import msgspec
from aiokafka import AIOKafkaProducer

from lorabus.schemas import AdapterActivate, AdapterPublish, RouteStatus, RouteTarget, VersionStatus, WorkerStatus, encode
from lorabus.worker.client import publish_control, read_control_log, read_statuses
from lorabus.worker.control_log import control_key
from lorabus.worker.topics import CONTROL_TOPIC_CONFIGS, STATUS_TOPIC_CONFIGS, ensure_topics
from helpers import end_offset


async def _cli(*args, timeout: float = 120) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "lorabus.worker.cli", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def _topics(kafka: str) -> tuple[str, str, list[str]]:
    tag = uuid.uuid4().hex[:8]
    control, status = f"control-{tag}", f"status-{tag}"
    await ensure_topics(kafka, {control: 1, status: 1}, {control: CONTROL_TOPIC_CONFIGS, status: STATUS_TOPIC_CONFIGS})
    return control, status, ["--bootstrap-servers", kafka, "--control-topic", control, "--status-topic", status]


async def _write(kafka: str, topic: str, records: list[tuple[str | None, bytes | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key.encode() if key is not None else None)
    finally:
        await producer.stop()


def _status(worker: str, control_offset: int, *, ts_ms: int | None = None, serving=None, versions=(), routes=()):
    """A worker's status, live for a minute after it is written (however slowly a loaded machine starts the CLI)."""
    now = int(time.time() * 1000)
    return WorkerStatus(worker=worker, ts_ms=now if ts_ms is None else ts_ms, started_ms=now - 5000,
                        control_offset=control_offset, serving=serving or {}, activated={},
                        versions=[VersionStatus(*v) for v in versions], resident=[], host_cached=0, routes=list(routes),
                        interval_ms=20_000)


def _adapter(tmp_path, name: str):
    root = tmp_path / name
    root.mkdir()
    (root / "adapter_config.json").write_text("{}")
    (root / "adapter_model.safetensors").write_bytes(name.encode())
    return root


async def test_refused_events_send_nothing(kafka, tmp_path):
    control, _, flags = await _topics(kafka)
    v1 = _adapter(tmp_path, "fin-v1")
    await publish_control(kafka, control, [AdapterPublish("fin", "v1", str(v1))])
    before = await end_offset(kafka, control)

    rc, out, err = await _cli("rollout", "activate", "fin", "v2", *flags)
    assert rc == 2 and out == "", err
    assert "fin@v2 is not published (published versions of fin: v1)" in err
    rc, out, err = await _cli("activate", "fin", "v2", *flags)  # the top-level command checks the same
    assert rc == 2 and "fin@v2 is not published" in err
    rc, out, err = await _cli("publish", "fin", "v2", str(tmp_path / "missing"), *flags)
    assert rc == 2 and out == "" and "no such directory" in err, err
    rc, out, err = await _cli("rollout", "publish", "fin", "v2", str(v1), "--sha256", "0" * 64, *flags)
    assert rc == 2 and "does not match" in err, err
    assert await end_offset(kafka, control) == before, "a refused event reached the control topic"

    rc, out, err = await _cli("rollout", "activate", "fin", "v1", *flags)
    assert rc == 0, err
    log = await read_control_log(kafka, control)
    assert log.activated("fin") == "v1" and log.end_offset == before + 1
    (entry,) = [e for e in log.entries.values() if e.offset == before]
    assert out == f"sent adapter.activate {entry.event.event_id}\n"
    print(f"refused: activate of an unpublished version, a missing path, a wrong sha256 (rc 2, control topic "
          f"still at {before}); activate fin@v1 sent at offset {before}")


async def test_read_control_log_folds_like_a_worker(kafka, tmp_path):
    control, _, _ = await _topics(kafka)
    v1, v2 = AdapterPublish("fin", "v1", "/a/v1"), AdapterPublish("fin", "v2", "/a/v2")
    offsets = await publish_control(kafka, control, [v1, v2, AdapterActivate("fin", "v2")])
    assert offsets == [0, 1, 2]
    await _write(kafka, control, [("fin", encode(AdapterPublish("fin", "v3", "/a/v3"))),  # not its canonical key
                                  (control_key(v1), b"{not json"),  # undecodable: skipped, v1 stays
                                  (control_key(v2), None)])  # tombstone: v2 forgotten
    log = await read_control_log(kafka, control)
    assert log.end_offset == 6
    assert log.candidates("fin") == ["v1"] and log.activated("fin") is None


async def test_status_command_shows_each_worker_and_failures(kafka, tmp_path):
    control, status, flags = await _topics(kafka)
    await publish_control(kafka, control, [AdapterPublish("fin", "v1", "/a/v1"), AdapterPublish("fin", "v2", "/a/v2"),
                                           AdapterActivate("fin", "v2")])
    reason = "fin@v2: sha256 of adapter_model.safetensors does not match the published one"
    route = RouteStatus("ner", None, None, [RouteTarget(adapter="fin@v1", weight=1)])
    await _write(kafka, status, [
        ("w-gone", encode(_status("w-gone", 1))), ("w-gone", None),  # stopped cleanly: its tombstone
        ("w1", encode(_status("w1", 3, serving={"fin": "v2"}, versions=[("fin@v2", "ready", None)]))),
        ("w2", encode(_status("w2", 3, serving={"fin": "v1"}, routes=[route],
                              versions=[("fin@v1", "ready", None), ("fin@v2", "failed", reason)]))),
        ("w3", b"not a status"),
    ])
    assert sorted(await read_statuses(kafka, status)) == ["w1", "w2"]
    rc, out, err = await _cli("status", *flags)
    assert rc == 0, err
    lines = out.splitlines()
    assert any(line.split()[:2] == ["w1", "live"] for line in lines), out
    assert any(line.split()[:2] == ["w2", "live"] for line in lines), out
    assert f"    FAILED fin@v2 on w2: {reason}" in lines, out
    assert "w-gone" not in out and not any(line.split()[:1] == ["w3"] for line in lines)  # not a worker ...
    assert "status records skipped as invalid: 1" in lines and "  key w3  @4  not a status: DecodeError" in out  # ... apart
    rc, out, err = await _cli("status", "--json", *flags)
    assert rc == 0, err
    view = json.loads(out)
    assert sorted(view["workers"]) == ["w1", "w2"] and view["control_log"]["end_offset"] == 3
    assert view["workers"]["w2"]["versions"][1]["reason"] == reason


async def _wait_run(kafka, control, status, flags, command, status_after):
    """Run `command --wait` in the background; once its event is on the control topic, write the
    worker's status (made by `status_after(offset)`) and return the CLI's result."""
    before = await end_offset(kafka, control)
    await _write(kafka, status, [("w1", encode(_status("w1", before, serving={"fin": "v1"})))])  # not read yet
    proc = asyncio.create_task(_cli(*command, "--wait", "--timeout", "30", *flags))
    deadline = time.monotonic() + 60
    while await end_offset(kafka, control) == before:
        assert time.monotonic() < deadline and not proc.done(), proc.done() and proc.result()
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # the CLI sees w1 still pending for a few polls
    await _write(kafka, status, [("w1", encode(status_after(before)))])
    return await proc


async def test_wait_reports_failure_success_and_silence(kafka, tmp_path):
    control, status, flags = await _topics(kafka)
    v1, v2, v3 = (_adapter(tmp_path, f"fin-{v}") for v in ("v1", "v2", "v3"))
    await publish_control(kafka, control, [AdapterPublish("fin", "v1", str(v1)), AdapterPublish("fin", "v2", str(v2)),
                                           AdapterPublish("fin", "v3", str(v3))])

    reason = "fin@v2: rank 64 is above --max-lora-rank 16"
    rc, out, err = await _wait_run(kafka, control, status, flags, ["rollout", "activate", "fin", "v2"],
                                   lambda offset: _status("w1", offset + 1, serving={"fin": "v1"},
                                                          versions=[("fin@v1", "ready", None), ("fin@v2", "failed", reason)]))
    assert rc == 1, (out, err)
    assert out.splitlines()[1:] == [f"w1: failed: {reason}"], out

    rc, out, err = await _wait_run(kafka, control, status, flags, ["activate", "fin", "v3"],
                                   lambda offset: _status("w1", offset + 1, serving={"fin": "v3"},
                                                          versions=[("fin@v3", "ready", None)]))
    assert rc == 0, (out, err)
    assert out.splitlines()[0].startswith("sent adapter.activate ") and out.splitlines()[1:] == ["w1: ok"], out

    # Only a silent worker (and a fresh topic with no status at all): no live worker. Liveness is the
    # record's broker timestamp, so silence is a short interval that has passed, not an old ts_ms.
    await _write(kafka, status, [("w1", encode(msgspec.structs.replace(_status("w1", 99), interval_ms=100)))])
    await asyncio.sleep(0.5)
    rc, out, err = await _cli("rollout", "warm", "fin", "v1", "--wait", "--timeout", "2", *flags)
    assert rc == 4, (out, err)
    assert "no live worker reported" in err and out.startswith("sent adapter.warm ")
    empty = flags[:-1] + [f"status-none-{uuid.uuid4().hex[:8]}"]
    rc, out, err = await _cli("rollout", "warm", "fin", "v1", "--wait", "--timeout", "1", *empty)
    assert rc == 4, (out, err)
    print("--wait: failed -> 1 with the reason, ok -> 0, no live worker -> 4")
