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

from collections import Counter

import pytest

from fuzz_expected import Target, is_utf8
from fuzz_harness import run_fuzz, summary
from fuzz_strategies import ADAPTER_FORMS, ID_STYLES, WRONG_TYPES, build_job, draw_records
from helpers import PeftOracle

JOBS, CONTROL, GOOD, HUGE_CAP = 240, 60, 40, 12
CONTROL_LOG = 1000  # adapter names already published when the worker starts (and restarts)

# Mutation families the issue names; the drawn batch must contain every one of them.
JOB_FAMILIES = {"wrong_type", "number", "bad_utf8", "surrogate", "deep", "huge", "null", "unknown_field", "duplicate",
                "truncate", "trailing", "bom", "tombstone", "non_object"}
CONTROL_FAMILIES = JOB_FAMILIES | {"type"}
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
