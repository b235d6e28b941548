"""The status plane through the real broker (issue 20, R5, R6, R9).

- R6: a worker whose control log holds 100 route.set of 64 long-named targets (a 1.5 MB status) keeps
  publishing a status record under --status-max-bytes that readers decode, marked as cut, with the
  newest routes and the engine's measured plans in it; `lorabus status` shows the cut and the plans.
- R5: a gzip-compressed status record of ~400 KB holding ~100 MB of JSON, on a status topic created as
  before (compaction only): `lorabus status` lists it as skipped, shows the real worker live, and stays
  within a time and memory bound. On the topic as workers now create it, the broker refuses that record.
- R9: forged records (ts_ms 2**53, a short interval, a name with a newline and ANSI escapes; a record
  stamped half an hour ahead on a CreateTime topic) do not make `lorabus status` show them live or print
  their escapes, and `--wait` does not wait for them.
"""

import asyncio
import json
import re
import sys
import time
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from lorabus.schemas import AdapterPublish, RouteSet, RouteTarget, VersionStatus, WorkerStatus, decode_status, encode
from lorabus.worker.client import publish_control, read_statuses
from lorabus.worker.status import MAX_STATUS_PLANS
from lorabus.worker.topics import CONTROL_TOPIC_CONFIGS, STATUS_TOPIC_CONFIGS, ensure_topics
from helpers import read_topic, running_worker, worker_config

pytestmark = pytest.mark.kafka

LONG = "n" * 125  # with 3 digits: names and versions of 128 characters, the schema's limit
VERSION = "v" * 128

# The CLI in a child Python that reports its own wall time and peak RSS (KiB) on its last stderr line.
_MEASURED_CLI = """
import sys, time
def peak_kib():  # VmHWM: this process image's peak (ru_maxrss would include the forking parent's)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
from lorabus.worker.cli import main
started = time.monotonic()
rc = main(sys.argv[1:])
sys.stdout.flush()
print(f"measured {time.monotonic() - started:.2f} {peak_kib()}", file=sys.stderr)
sys.exit(rc)
"""


async def _cli(*args, timeout: float = 120) -> tuple[int, str, str, float, int]:
    """rc, stdout, stderr (without the measurement), seconds, peak RSS in MiB."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-P", "-c", _MEASURED_CLI, *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    *rest, measured = err.decode().rstrip("\n").split("\n")
    _, seconds, rss_kib = measured.split()
    return proc.returncode, out.decode(), "\n".join(rest), float(seconds), int(rss_kib) // 1024


async def _topics(kafka: str, status_configs: dict[str, str]) -> tuple[str, str, list[str]]:
    tag = uuid.uuid4().hex[:8]
    control, status = f"control-{tag}", f"status-{tag}"
    await ensure_topics(kafka, {control: 1, status: 1}, {control: CONTROL_TOPIC_CONFIGS, status: status_configs})
    return control, status, ["--bootstrap-servers", kafka, "--control-topic", control, "--status-topic", status]


async def _write(kafka: str, topic: str, records, **producer_options) -> None:
    """(key, value) or (key, value, record timestamp in ms) records, in order."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all", **producer_options)
    await producer.start()
    try:
        for key, value, *timestamp in records:
            await producer.send_and_wait(topic, value, key=key.encode(), timestamp_ms=timestamp[0] if timestamp else None)
    finally:
        await producer.stop()


def _status(worker: str, **fields) -> WorkerStatus:
    now = int(time.time() * 1000)
    return WorkerStatus(**{"worker": worker, "ts_ms": now, "started_ms": now - 5000, "control_offset": 0,
                           "serving": {}, "activated": {}, "versions": [], "resident": [], "host_cached": 0,
                           "routes": [], **fields})


def _worker_rows(out: str) -> list[str]:
    """The rows of the WORKER table of `lorabus status`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  WORKER"))
    rows = []
    for line in lines[start + 1:]:
        if not line.startswith("  ") or line.startswith("    "):
            break
        rows.append(line)
    return rows


# ---- R6: the worker's own record stays under the bound --------------------------------------------------

async def test_a_worker_with_many_wide_routes_keeps_reporting_under_the_bound(kafka, tiny_model, tmp_path, caplog):
    config = worker_config(kafka, tiny_model, status_interval_ms=500)
    limit = config.status_max_bytes
    names = [f"{LONG}{i:03d}" for i in range(64)]
    events = [AdapterPublish(n, VERSION, str(tmp_path / "missing" / n)) for n in names]  # each fails to load
    events += [RouteSet(task=f"task{r:03d}", event_id=f"e-{r}",
                        targets=[RouteTarget(adapter=f"{n}@{VERSION}", weight=1) for n in names]) for r in range(100)]
    caplog.set_level("WARNING", logger="lorabus.worker.status")
    async with running_worker(config) as worker:
        offsets = await publish_control(kafka, config.control_topic, events)
        deadline, status = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            status = (await read_statuses(kafka, config.status_topic)).get(worker.worker_id)
            if status is not None and status.control_offset > offsets[-1] and status.truncated:
                break
            await asyncio.sleep(0.5)
        assert status is not None and status.control_offset > offsets[-1], f"no status after the events: {status}"
        rc, out, err, _, _ = await _cli("status", "--bootstrap-servers", kafka, "--control-topic",
                                        config.control_topic, "--status-topic", config.status_topic)
    records = [r for r in await read_topic(kafka, config.status_topic, 3.0)
               if r.key == worker.worker_id.encode() and r.value is not None]
    sizes = [len(r.value) for r in records]
    assert max(sizes) <= limit, sizes
    last = decode_status(records[-1].value)
    assert last.truncated and last.routes_omitted > 0 and len(last.routes) + last.routes_omitted == 100
    assert [r.task for r in last.routes] == [f"task{i:03d}" for i in range(100 - len(last.routes), 100)]
    assert last.versions_omitted == 0 and {v.state for v in last.versions} == {"failed"}  # why routes are pending
    assert not [r for r in caplog.records if "status not sent" in r.getMessage()], "a status was refused"
    assert rc == 0, err
    (row,) = _worker_rows(out)
    assert re.search(r"  live \(truncated: \d+ routes, ", row), row
    # A cut record still carries the engine's measured plans: every group's (the LoRA groups and the attention
    # probe), at most MAX_STATUS_PLANS of a cache file that may hold hundreds; `lorabus status` lists them.
    engine_plans = {f"{p['group']} {p['shape']}": p["plan"] for p in worker.engine.plans()}
    assert len(last.plans) == min(MAX_STATUS_PLANS, len(engine_plans)) and last.plans.items() <= engine_plans.items()
    assert {key.split()[0] for key in last.plans} == {key.split()[0] for key in engine_plans} >= {"attention", "qkv"}
    shown = [line.split() for line in out.splitlines() if line.startswith(f"  {worker.worker_id} ")]
    assert sorted(row[1:] for row in shown if len(row) == 4) == sorted([*k.split(), v] for k, v in last.plans.items())
    print(f"{len(records)} status records, {min(sizes)}..{max(sizes)} bytes (limit {limit}); last keeps "
          f"{len(last.routes)} routes, leaves out {last.routes_omitted} routes, {last.versions_omitted} versions")


# ---- R5: a decompression bomb is not state ---------------------------------------------------------------

def _bomb(worker: str, json_mb: int) -> bytes:
    """A valid status whose JSON is `json_mb` MB of small identical versions (millions of objects to
    decode): gzip makes it some 500x smaller."""
    entry = VersionStatus("a@v1", "ready")
    return encode(_status(worker, versions=[entry] * (json_mb * 1_000_000 // len(encode(entry)))))


async def test_a_huge_compressed_status_is_skipped_within_a_time_and_memory_bound(kafka):
    control, status, flags = await _topics(kafka, {"cleanup.policy": "compact"})  # a status topic made before
    await _write(kafka, status, [("w1", encode(_status("w1", interval_ms=60_000)))])
    rc, out, err, _, baseline_mb = await _cli("status", *flags)
    assert rc == 0, err
    bomb = _bomb("w-bomb", 100)
    await _write(kafka, status, [("w-bomb", bomb)], compression_type="gzip", max_request_size=len(bomb) + 1_000_000)
    (record,) = [r for r in await read_topic(kafka, status, 2.0) if r.key == b"w-bomb"]  # this reader inflates it
    assert len(record.value) == len(bomb)

    rc, out, err, seconds, rss_mb = await _cli("status", *flags)
    assert rc == 0, err
    assert "workers: 1 reporting, 1 live" in out, out
    assert [row.split()[:2] for row in _worker_rows(out)] == [["w1", "live"]]
    assert re.search(r"key w-bomb  @1  a gzip batch that inflates past \d+ bytes: over the 262144-byte limit", out), out
    assert "(set compression.type=uncompressed)" in err and "(set message.timestamp.type=LogAppendTime)" in err, err
    rc, js, err, _, _ = await _cli("status", "--json", *flags)
    view = json.loads(js)
    assert list(view["workers"]) == ["w1"] and view["skipped_status_records"][0]["key"] == "w-bomb"
    print(f"{len(bomb) / 1e6:.0f} MB of JSON: lorabus status {seconds:.1f} s, peak RSS {rss_mb} MiB "
          f"(reading one small status: {baseline_mb} MiB)")
    # Neither decoded nor inflated past the limit: the reader's memory does not grow with the bomb (inflating
    # it whole cost ~3 copies of it, 300 MB; decoding it ~5x the JSON's size and 3x the time).
    assert seconds < 10 and rss_mb - baseline_mb < 32, (seconds, rss_mb, baseline_mb)

    # On the status topic as workers create it (uncompressed), the broker inflates and refuses it.
    _, uncompressed, _ = await _topics(kafka, STATUS_TOPIC_CONFIGS)
    with pytest.raises(KafkaError):
        await _write(kafka, uncompressed, [("w-bomb", bomb)], compression_type="gzip",
                     max_request_size=len(bomb) + 1_000_000)


# ---- R9: forged times and names --------------------------------------------------------------------------

FORGED = "w9\n  w8      live   99  0 (up to date)\x1b[2J\x1b[31m"


async def test_forged_times_and_names_do_not_make_status_lie(kafka):
    control, status, flags = await _topics(kafka, STATUS_TOPIC_CONFIGS)
    await _write(kafka, status, [
        ("w1", encode(_status("w1", interval_ms=60_000))),
        # ts_ms far ahead with a short interval: by the broker's clock it is silent within 300 ms.
        (FORGED, encode(_status(FORGED, ts_ms=2**53, interval_ms=100, serving={"fin": "v1\x1b]0;pwned\x07"}))),
    ])
    await asyncio.sleep(1.0)
    rc, out, err, _, _ = await _cli("status", *flags)
    assert rc == 0 and "warning" not in err, err  # the topic as workers create it
    assert "\x1b" not in out and "\x07" not in out, repr(out)
    assert "workers: 2 reporting, 1 live" in out, out
    rows = _worker_rows(out)
    assert len(rows) == 2 and rows[0].split()[:2] == ["w1", "live"], rows
    assert rows[1].startswith("  w9\\x0a  w8") and "silent for" in rows[1], rows

    # --wait: only the forged worker on this status topic, so no live worker (exit 4), not a wait for it.
    _, forged_only, forged_flags = await _topics(kafka, STATUS_TOPIC_CONFIGS)
    await _write(kafka, forged_only, [(FORGED, encode(_status(FORGED, ts_ms=2**53, interval_ms=100)))])
    await publish_control(kafka, control, [AdapterPublish("fin", "v1", "/a/fin")])
    await asyncio.sleep(1.0)
    rc, out, err, _, _ = await _cli("rollout", "warm", "fin", "v1", "--wait", "--timeout", "3",
                                    *flags[:4], *forged_flags[4:])
    assert rc == 4 and "no live worker reported" in err, (rc, out, err)
    assert "\x1b" not in out + err


async def test_a_record_stamped_in_the_future_is_not_live(kafka):
    # A topic that keeps the producer's timestamps (CreateTime, Kafka's default): the writer picks it,
    # the broker takes up to an hour ahead (Kafka 4), the reader believes at most 30 s of it.
    _, status, flags = await _topics(kafka, {"cleanup.policy": "compact"})
    ahead_ms = 30 * 60_000
    await _write(kafka, status, [("w1", encode(_status("w1", interval_ms=60_000))),
                                 ("w-future", encode(_status("w-future", ts_ms=2**53)), int(time.time() * 1000) + ahead_ms)])
    rc, out, err, _, _ = await _cli("status", *flags)
    assert rc == 0, err
    assert "workers: 2 reporting, 1 live" in out, out
    (future,) = [row for row in _worker_rows(out) if row.startswith("  w-future ")]
    assert "not live: status time 17" in future or "not live: status time 18" in future, future
