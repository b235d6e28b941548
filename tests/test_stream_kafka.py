"""Streamed partial results through the real broker and a real worker: a job with `stream: true` gets
`status: "partial"` records on its results topic, keyed by its id, before its one final result, and
their tokens and texts add up to the final's (per choice: an n=2 job streams index 0 and 1); a job that
does not stream gets none. Under exactly-once the partials are outside the transaction, yet a
read_committed reader sees them, and the final result exactly once. A partial that fails to send is
counted and dropped, and the final result is delivered as ever; one that is slow delays the final result,
which never overtakes it. `lorabus produce --stream` prints each
partial as it arrives; without it, partial records are ignored."""

import asyncio
import json
from collections import defaultdict

import pytest
from aiokafka.errors import KafkaConnectionError

from lorabus.schemas import decode_result
from lorabus.worker import cli, streaming
from lorabus.worker.client import run_jobs
from helpers import read_topic, running_worker, worker_config

PROMPT = "the quick brown fox"
JOBS = [
    {"id": "streamed", "tenant": "t", "prompt": PROMPT, "max_new_tokens": 7, "ignore_eos": True,
     "stream": True, "stream_every_tokens": 2},
    {"id": "streamed-n2", "tenant": "t", "prompt": PROMPT, "max_new_tokens": 5, "ignore_eos": True, "n": 2,
     "temperature": 1.0, "seed": 7, "stream": True, "stream_every_tokens": 2},
    {"id": "plain", "tenant": "t", "prompt": PROMPT, "max_new_tokens": 5, "ignore_eos": True},
]


def _partials_sent(worker, outcome: str) -> float:
    return worker.metrics.registry.get_sample_value("lorabus_partials_total", {"outcome": outcome})


def _by_key(records) -> dict[str, list]:
    """Each job's records on the results topic, in offset order (one key: one partition)."""
    keyed = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        keyed[record.key.decode()].append(decode_result(record.value))
    return keyed


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
async def test_streamed_jobs_get_partials_before_their_result(kafka, tiny_model, exactly_once):
    isolation = "read_committed" if exactly_once else "read_uncommitted"
    config = worker_config(kafka, tiny_model, exactly_once=exactly_once)
    seen = []  # what run_jobs hands on_partial, as it arrives
    async with running_worker(config) as worker:
        results = await run_jobs(kafka, config.jobs_topic, config.results_topic,
                                 [(job["id"], json.dumps(job).encode()) for job in JOBS], timeout_s=120,
                                 isolation_level=isolation, on_partial=seen.append)
        sent, failed = _partials_sent(worker, "sent"), _partials_sent(worker, "failed")
    assert worker.pipeline.partials.closed  # the worker closed the partials producer as it stopped
    records = _by_key(await read_topic(kafka, config.results_topic, 30, to_end=True, isolation_level=isolation))

    assert {job_id: [r.status for r in rs] for job_id, rs in results.items()} == {j["id"]: ["ok"] for j in JOBS}
    for job_id in ("streamed", "streamed-n2"):
        *partials, final = records[job_id]
        assert final == results[job_id][0]  # one final, after every partial (exactly once under exactly-once)
        assert len(partials) >= 2 and {p.status for p in partials} == {"partial"}, partials
        assert all(p.worker == final.worker and p.adapter is None and p.adapter_version is None for p in partials)
        choices = final.choices or [final]
        assert sorted({p.index for p in partials}) == list(range(len(choices)))
        for index, choice in enumerate(choices):
            pieces = [p for p in partials if p.index == index]
            assert all(len(p.token_ids) == 2 for p in pieces[:-1]), pieces  # every stream_every_tokens
            assert [t for p in pieces for t in p.token_ids] == choice.token_ids
            assert "".join(p.text for p in pieces) == choice.text
    assert len(records["streamed-n2"]) - 1 == 2 * 3  # 5 tokens per choice, every 2: 2 + 2 + 1
    assert [r.status for r in records["plain"]] == ["ok"]
    partial_records = [r for job_id in sorted(records) for r in records[job_id] if r.status == "partial"]
    assert sorted(seen, key=lambda p: p.id) == partial_records  # each job's in order, as they arrived
    assert (sent, failed) == (len(partial_records), 0)


async def test_a_partial_that_fails_leaves_the_result_as_it_was(kafka, tiny_model, monkeypatch):
    class Refusing(streaming.AIOKafkaProducer):
        async def send(self, *args, **kwargs):
            raise KafkaConnectionError("refused by the test")

    monkeypatch.setattr(streaming, "AIOKafkaProducer", Refusing)
    config = worker_config(kafka, tiny_model)
    job = JOBS[0]
    async with running_worker(config) as worker:
        results = await run_jobs(kafka, config.jobs_topic, config.results_topic,
                                 [(job["id"], json.dumps(job).encode())], timeout_s=120)
        sent, failed = _partials_sent(worker, "sent"), _partials_sent(worker, "failed")
    (result,) = results[job["id"]]
    assert result.status == "ok" and len(result.token_ids) == job["max_new_tokens"]
    assert (sent, failed) == (0, 4)  # 7 tokens every 2: 4 partials, none retried
    records = await read_topic(kafka, config.results_topic, 30, to_end=True)
    assert [decode_result(r.value).status for r in records] == ["ok"]


async def test_the_result_waits_for_slow_partials(kafka, tiny_model, monkeypatch):
    class Slow(streaming.AIOKafkaProducer):
        async def send(self, *args, **kwargs):  # each partial reaches the broker 0.3 s late
            await asyncio.sleep(0.3)
            return await super().send(*args, **kwargs)

    monkeypatch.setattr(streaming, "AIOKafkaProducer", Slow)
    config = worker_config(kafka, tiny_model)
    job = JOBS[0]
    async with running_worker(config):
        await run_jobs(kafka, config.jobs_topic, config.results_topic, [(job["id"], json.dumps(job).encode())],
                       timeout_s=120)
    records = _by_key(await read_topic(kafka, config.results_topic, 30, to_end=True))
    assert [r.status for r in records[job["id"]]] == ["partial"] * 4 + ["ok"]


async def test_produce_stream_prints_partials_then_results(kafka, tiny_model, tmp_path, capsys):
    config = worker_config(kafka, tiny_model)
    jobs = [{k: v for k, v in JOBS[0].items() if k != "stream"} | {"id": "cli-streamed"},  # --stream adds it
            JOBS[2] | {"id": "cli-plain", "stream": False}]
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    quiet = tmp_path / "quiet.jsonl"  # a streamed job, read by a produce that does not stream
    quiet.write_text(json.dumps(JOBS[0] | {"id": "cli-quiet"}) + "\n")
    flags = ["--bootstrap-servers", kafka, "--jobs-topic", config.jobs_topic, "--results-topic",
             config.results_topic, "--timeout", "120"]
    async with running_worker(config):
        streamed_code = await asyncio.to_thread(cli.main, ["produce", str(path), "--stream", *flags])
        streamed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        quiet_code = await asyncio.to_thread(cli.main, ["produce", str(quiet), *flags])
        quiet_lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (streamed_code, quiet_code) == (0, 0)

    lines = [line for line in streamed if line["id"] == "cli-streamed"]
    *partials, final = lines
    assert len(partials) == 4 and final["status"] == "ok"
    assert all(set(p) == {"id", "status", "index", "text"} and p["status"] == "partial" and p["index"] == 0
               for p in partials), partials
    assert "".join(p["text"] for p in partials) == final["text"]
    assert [line["status"] for line in streamed if line["id"] == "cli-plain"] == ["ok"]
    assert [line["status"] for line in quiet_lines] == ["ok"]  # its partials are on the topic, not printed
    records = _by_key(await read_topic(kafka, config.results_topic, 30, to_end=True))
    assert [r.status for r in records["cli-quiet"]] == ["partial"] * 4 + ["ok"]
