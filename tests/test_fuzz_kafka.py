"""Fuzzing through the real broker ("Nothing lost, nothing poisoned"): a few hundred hostile job and
control records, drawn by hypothesis from the v1 schema plus mutations (tests/fuzz_strategies.py; what a
worker may answer each: tests/fuzz_expected.py), interleaved with good greedy jobs, go to one in-process
worker (tests/fuzz_harness.py). Invariants:

* the worker stays up (its run task is running when the traffic has settled);
* every good job is answered ok with PEFT's greedy tokens, including jobs for an adapter published
  after every fuzzed control record (the control reader survived them and kept going);
* every fuzzed job record with a readable id is answered exactly once, with status ok only where the
  README allows it and otherwise an error code the README documents for that fault ("internal" never);
  ok results for greedy jobs equal PEFT's tokens;
* every record without a readable id is on the dead-letter topic once, with its key, value and
  headers, and no result; records whose readability is arguable get one or the other;
* the group's committed offsets reach the end of the jobs topic, the worker wrote nothing to the jobs
  or control topics, and a worker restarted on the same group crashes on nothing (it replays every
  fuzzed control record) and answers nothing again.

Hypothesis draws the specs derandomized (the same records every run), with no example database and
no deadline; the broker run is checked as one batch, and a failure lists the offending records.
"""

import asyncio
import json
import time
from collections import Counter

import pytest

from fuzz_expected import Target, is_utf8
from fuzz_harness import run_fuzz, summary
from fuzz_strategies import (ADAPTER_FORMS, BOUND_NUMBERS, GENERATION_MENU, ID_STYLES, WRONG_TYPES, build_job,
                             draw_records)
from helpers import PeftOracle

JOBS, CONTROL, GOOD, HUGE_CAP = 240, 60, 40, 12
CONTROL_LOG = 1000  # adapter names already published when the worker starts (and restarts)

# Mutation families the issue names; the drawn batch must contain every one of them.
JOB_FAMILIES = {"wrong_type", "number", "bad_utf8", "surrogate", "deep", "huge", "null", "unknown_field", "duplicate",
                "truncate", "trailing", "bom", "tombstone", "non_object", "bound", "generation"}
CONTROL_FAMILIES = JOB_FAMILIES - {"bound", "generation"} | {"type"}
EXTREME_LITERALS = {"18446744073709551616", "-9223372036854775808", "1e400", "NaN", "Infinity", "1e-320", "0", "-1"}


def _offline_target() -> Target:
    return Target("jobs-t", "results-t", "control-t", "dlq-t", "replies-t", ("a1", "a2", "a3"), "priv-t",
                  ("fz0-t", "fz1-t", "fz2-t"), ("/nonexistent/a",) * 3, ("/nonexistent/j",) * 4, 512, 512)


def test_fuzz_batch_covers_every_fault_family():
    """The batch the broker test sends (same draw, derandomized) holds every family the issue lists."""
    jobs, control = draw_records(_offline_target(), JOBS, CONTROL, HUGE_CAP)
    job_families = {m[0] for r in jobs for m in r.spec[6]}
    control_families = {m[0] for r in control for m in r.spec[6]}
    literals = {m[2] for r in jobs + control for m in r.spec[6] if m[0] == "number"}
    assert JOB_FAMILIES <= job_families, JOB_FAMILIES - job_families
    assert CONTROL_FAMILIES <= control_families, CONTROL_FAMILIES - control_families
    assert EXTREME_LITERALS <= literals, EXTREME_LITERALS - literals
    musts = Counter(r.must for r in jobs)
    assert musts["answer"] and musts["dead"] and musts["either"], musts
    assert any(r.value is None for r in jobs) and any(r.value is None for r in control)  # tombstones
    assert any(any(not is_utf8(k) for k, _ in r.headers) for r in jobs)  # header keys that are not UTF-8
    assert any(any(v is not None and not is_utf8(v) for _, v in r.headers) for r in jobs)
    assert any(r.size() > 900_000 for r in jobs) and any(b"[" * 100_000 in (r.value or b"") for r in jobs + control)
    assert {r.spec[1] for r in jobs} >= set(ADAPTER_FORMS) - {"odd-charset"}
    assert len({r.spec[5] for r in jobs}) >= len(set(ID_STYLES)) - 4
    print(f"\n{len(jobs)} job and {len(control)} control records; job families {sorted(job_families)}; "
          f"readable id / none / arguable: {musts['answer']} / {musts['dead']} / {musts['either']}")


def test_wrong_type_of_content_special_tokens_is_invalid_job():
    """A job whose `content_special_tokens` is no boolean is expected invalid_job, as the decoder answers it."""
    from lorabus.schemas import JobError, decode_job

    base = (("max_new_tokens", 4), ("prompt", "hello"), ("tenant", "acme"))
    for pick, text in enumerate(WRONG_TYPES["content_special_tokens"]):
        spec = (repr(base), "none", 0, "absent", "absent", "plain", (("wrong_type", "content_special_tokens", pick),),
                (), "token", True)
        record = build_job(spec, dict(base), "fz00000x", _offline_target())
        assert (record.must, record.allowed) == ("answer", {"invalid_job"}), (text, record)
        with pytest.raises(JobError) as caught:
            decode_job(record.value)
        assert caught.value.code == "invalid_job" and caught.value.job_id == "fz00000x", text


def test_generation_controls_expectations_match_the_decoder():
    """Each generation control at and past its bounds, and each structured one of the menu, is expected invalid_job
    alone exactly when the schema's decoder refuses it (the bounds come from msgspec's type info, not restated),
    or when the engine does: a token id outside the vocabulary, a format the grammar engine cannot compile."""
    from lorabus.schemas import JobError, decode_job

    t = _offline_target()
    base = (("max_new_tokens", 4), ("prompt_ids", [1, 2]), ("tenant", "acme"))
    cases = [("bound", case) for case in BOUND_NUMBERS] + [("generation", pick) for pick in range(len(GENERATION_MENU))]
    for mutation in cases:
        spec = (repr(base), "none", 0, "absent", "absent", "plain", (mutation,), (), "token", True)
        record = build_job(spec, dict(base), "fz00000x", t)
        try:
            decode_job(record.value)
            refused = False
        except JobError as caught:
            assert caught.code == "invalid_job" and caught.job_id == "fz00000x", (mutation, caught)
            refused = True
        field, _, logical, fault = GENERATION_MENU[mutation[1]] if mutation[0] == "generation" else (None,) * 4
        by_engine = fault == "bad_grammar" or (not refused and field in ("logit_bias", "stop_token_ids")
                                                and any(i >= t.vocab_size for i in logical))
        assert (refused or by_engine) == (record.allowed == {"invalid_job"}), (mutation, refused, record.allowed)
        assert not (refused and by_engine), mutation


@pytest.mark.kafka
async def test_fuzzed_records_are_answered_or_dead_lettered(kafka, tiny_model, peft_adapters, tmp_path):
    oracle = PeftOracle(tiny_model)
    report = await run_fuzz(kafka, tiny_model, peft_adapters, tmp_path, jobs=JOBS, control=CONTROL, good=GOOD,
                            huge_cap=HUGE_CAP, oracle=oracle, settle_s=240, control_log=CONTROL_LOG)
    bad_jobs, bad_control = report.distinct_bad()
    print(f"\ndistinct bad inputs tried: {bad_jobs + bad_control} ({bad_jobs} job records, {bad_control} control records)")
    print(summary(report))
    for problem in report.problems[:60]:
        print("PROBLEM", problem)

    assert report.alive, f"the worker's run task ended: {report.crash}"
    assert not report.problems, f"{len(report.problems)} invariant violations; first: " + "\n".join(report.problems[:20])
    assert report.settled and report.lag == 0
    assert report.restart.get("alive") and report.restart.get("answered_sentinel"), report.restart
    assert report.restart.get("new_results") == 0 and report.restart.get("new_letters") == 0, report.restart
    # Not vacuous: the batch held bad inputs of every kind, and each outcome happened.
    assert bad_jobs >= JOBS // 2 and bad_control >= CONTROL // 2
    assert report.letters and any(r.status == "ok" for rs in report.by_token.values() for r in rs)
    assert any(r.status == "error" for rs in report.by_token.values() for r in rs)


# ---- the named hostile generation records (the engine-level twin: tests/test_hostile_generation.py) -----------

ANSWER_S = 10.0  # every record answered (or dead-lettered) within this of being sent: no hostile one stalls the worker
BIG_RECORD = 16 << 20  # the jobs topic here takes records this large, so a million logit_bias entries reach the worker
HOSTILE_PROMPT = "the quick brown fox"


def _hostile_records(oracle: PeftOracle, kv_tokens: int, max_model_len: int, block: int) -> dict[str, tuple[bytes, set]]:
    """id → (the record's value, what it may be answered with: "ok", error codes, "dead" for a dead letter)."""
    ids = oracle.prompt_ids(HOSTILE_PROMPT)

    def job(job_id: str, raw: dict[str, str] | None = None, **fields) -> bytes:
        body = {"id": job_id, "tenant": "acme", "prompt_ids": ids, "max_new_tokens": 8, **fields}
        text = json.dumps(body)[:-1]
        return (text + "".join(f', "{k}": {v}' for k, v in (raw or {}).items()) + "}").encode()

    deep = '{"properties":{"a":' * 10_000 + '{"type":"string"}' + '},"required":["a"],"type":"object"}' * 10_000
    wide = json.dumps({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(30_000)}})
    bias = "{" + ",".join(f'"{i}":1' for i in range(1_000_000)) + "}"
    filling = (kv_tokens // 16) // block * block - len(ids)  # 16 choices, the cache full (no full prompt block shared)
    return {
        "h-deep-schema": (job("h-deep-schema", {"response_format": f'{{"type": "json_schema", "schema": {deep}}}'}),
                          {"invalid_job"}),
        "h-wide-schema": (job("h-wide-schema", {"response_format": f'{{"type": "json_schema", "schema": {wide}}}'}),
                          {"invalid_job", "ok"}),
        "h-regex-alt": (job("h-regex-alt", response_format={"type": "regex", "pattern": "(a|b)*a(a|b){30}"}),
                        {"invalid_job", "ok"}),
        "h-regex-nested": (job("h-regex-nested", response_format={"type": "regex", "pattern": "((a{1,100}){1,100}){1,100}"}),
                           {"invalid_job", "ok"}),
        "h-bias-million": (job("h-bias-million", {"logit_bias": bias}), {"invalid_job", "dead"}),
        "h-n16-at-limit": (job("h-n16-at-limit", n=16, max_new_tokens=min(kv_tokens, max_model_len) - len(ids)),
                           {"prompt_too_long"}),
        "h-n16-filling": (job("h-n16-filling", n=16, max_new_tokens=filling, ignore_eos=True), {"ok"}),
    }


@pytest.mark.kafka
async def test_hostile_generation_records_are_answered_in_time(kafka, tiny_model):
    """Each named hostile record is refused or served within ANSWER_S, the worker stays up, and the ordinary greedy
    jobs sent between them (sharing their batches) carry PEFT's tokens."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from lorabus.scheduler import EngineConfig
    from lorabus.schemas import decode_result
    from lorabus.worker.client import topic_partitions
    from lorabus.worker.topics import ensure_topics
    from fuzz_harness import PROMPTS, run_task_of
    from helpers import running_worker, worker_config

    oracle = PeftOracle(tiny_model)
    engine = EngineConfig(kv_cache_mb=1)  # 2048 tokens: 16 choices at the model's limit do not fit
    config = worker_config(kafka, tiny_model, engine=engine)
    await ensure_topics(kafka, {config.jobs_topic: config.topic_partitions},
                        {config.jobs_topic: {"max.message.bytes": str(BIG_RECORD)}})
    kv_tokens = 1 * 2**20 // (2 * 16 * 2 * 16 * 2 * 4) * 16  # blocks of the tiny model (fp32) x 16 tokens
    hostile = _hostile_records(oracle, kv_tokens, 512, engine.kv_block_size)
    normal = {f"n-{i}": oracle.prompt_ids(PROMPTS[i % len(PROMPTS)]) for i in range(len(hostile) + 1)}
    stream = [(f"n-{i}", json.dumps({"id": f"n-{i}", "tenant": "acme", "prompt_ids": normal[f"n-{i}"],
                                     "max_new_tokens": 6}).encode()) for i in range(len(normal))]
    for at, (job_id, (value, _)) in enumerate(hostile.items()):
        stream.insert(2 * at + 1, (job_id, value))
    arrived: dict[str, tuple[float, object]] = {}  # id → (seconds after the first send, result or "dead")

    async with running_worker(config) as worker:
        await asyncio.sleep(0)
        task = run_task_of(worker)
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka, enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        consumer.assign([*await topic_partitions(kafka, config.results_topic),
                         *await topic_partitions(kafka, config.dlq_topic)])
        producer = AIOKafkaProducer(bootstrap_servers=kafka, max_request_size=BIG_RECORD, linger_ms=5)
        await producer.start()
        try:
            started = time.monotonic()
            for job_id, value in stream:
                await producer.send(config.jobs_topic, value, key=job_id.encode())
            await producer.flush()
            while len(arrived) < len(stream) and time.monotonic() - started < ANSWER_S * 3 and not task.done():
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    for record in records:
                        if tp.topic == config.dlq_topic:
                            arrived[record.key.decode()] = (time.monotonic() - started, "dead")
                        else:
                            result = decode_result(record.value)
                            if result.status != "partial":
                                arrived.setdefault(result.id, (time.monotonic() - started, result))
        finally:
            await producer.stop()
            await consumer.stop()
        alive = not task.done()

    def outcome(job_id):
        what = arrived[job_id][1]
        return what if what == "dead" else "ok" if what.status == "ok" else what.error.code

    print("\n" + "\n".join(f"{job_id:>16}: {outcome(job_id) if job_id in arrived else 'NO ANSWER':<16} "
                           f"{arrived[job_id][0] if job_id in arrived else float('nan'):6.2f} s" for job_id, _ in stream))
    assert alive, "the worker's run task ended"
    assert set(arrived) == {job_id for job_id, _ in stream}, sorted({job_id for job_id, _ in stream} - set(arrived))
    late = {job_id: round(at, 2) for job_id, (at, _) in arrived.items() if at > ANSWER_S}
    assert not late, late
    for job_id, (_, allowed) in hostile.items():
        assert outcome(job_id) in allowed, (job_id, outcome(job_id), arrived[job_id][1])
    filling = arrived["h-n16-filling"][1]
    assert len(filling.choices) == 16 and len({tuple(c.token_ids) for c in filling.choices}) == 1, filling
    for job_id, ids in normal.items():
        result = arrived[job_id][1]
        assert result.status == "ok", result
        oracle.assert_matches(None, ids, result.token_ids, 6, label=job_id)
