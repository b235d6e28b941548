"""Results go only where the job's tenant may write, through the real broker (issue 20, R3): a job of tenant
`evil` naming another tenant's reply topic, any of the worker's own jobs, control, status and dead-letter
topics, another group's topics (its results topic included) or a tenant lane by the lorabus convention is
answered `forbidden` on the default results topic, naming the topic, and nothing reaches those topics; the
topics the operator allows (a pattern per tenant, a TENANT=TOPIC pair, the results topic) get their results;
an allowed topic that does not exist is `invalid_job`."""

from __future__ import annotations

import json

from lorabus.schemas import decode_result
from lorabus.worker.client import run_jobs
from lorabus.worker.topics import ensure_topics, ensure_worker_topics
from helpers import read_topic, running_worker, unique, worker_config


def _job(job_id: str, tenant: str, reply_to: str) -> bytes:
    return json.dumps({"id": job_id, "tenant": tenant, "prompt_ids": [5, 6, 7], "max_new_tokens": 3,
                       "reply_to": reply_to}).encode()


async def _all_records(kafka: str, topics: list[str]) -> dict[str, list]:
    """Every record of each topic, from its beginning to its end offsets as of now."""
    return {topic: await read_topic(kafka, topic, 30, to_end=True) for topic in topics}


async def test_reply_to_only_where_the_tenant_may_write(kafka, tiny_model):
    tag = unique("r")
    acme_topic, evil_topic, eu_topic = f"rep-{tag}.acme", f"rep-{tag}.evil", f"rep-{tag}.eu_2eacme"
    pair_topic, lane = f"extra-{tag}", f"lorabus.jobs.{tag}"
    config = worker_config(kafka, tiny_model, reply_topic_pattern=f"rep-{tag}.{{tenant}}",
                           reply_topic=[f"acme={pair_topic}"])
    other = worker_config(kafka, tiny_model)  # another group's topics, all existing
    await ensure_worker_topics(other)
    await ensure_topics(kafka, {acme_topic: 1, evil_topic: 1, eu_topic: 1, pair_topic: 1, lane: 1})
    refused = {  # job id → (reply_to of a job of tenant evil); each answered forbidden on the results topic
        "cross-tenant-pattern": acme_topic, "cross-tenant-pair": pair_topic,
        "own-status": config.status_topic, "own-jobs": config.jobs_topic, "own-control": config.control_topic,
        "own-dlq": config.dlq_topic, "other-results": other.results_topic, "other-jobs": other.jobs_topic,
        "other-control": other.control_topic, "other-status": other.status_topic, "other-dlq": other.dlq_topic,
        "lane": lane, "internal": "__consumer_offsets",
    }
    allowed = {  # job id → (tenant, reply_to): answered ok there
        "acme-pattern": ("acme", acme_topic), "acme-pair": ("acme", pair_topic), "evil-pattern": ("evil", evil_topic),
        "escaped-tenant": ("eu.acme", eu_topic),
    }
    async with running_worker(config):
        answers = await run_jobs(kafka, config.jobs_topic, config.results_topic, [
            *((job_id, _job(job_id, "evil", topic)) for job_id, topic in refused.items()),
            ("results-topic", _job("results-topic", "evil", config.results_topic)),
            ("missing", _job("missing", "ghost", f"rep-{tag}.ghost")),  # allowed, never created
        ], 60)
        replies = {job_id: await run_jobs(kafka, config.jobs_topic, topic, [(job_id, _job(job_id, tenant, topic))], 60)
                   for job_id, (tenant, topic) in allowed.items()}

    for job_id, topic in refused.items():
        assert job_id in answers, f"{job_id} not answered on the results topic (its result went to {topic}?)"
        (result,) = answers[job_id]
        assert (result.status, result.error.code) == ("error", "forbidden"), (job_id, result)
        assert topic in result.error.message, result.error.message
    assert answers["results-topic"][0].status == "ok"
    (missing,) = answers["missing"]
    assert missing.error.code == "invalid_job" and "does not exist" in missing.error.message
    for job_id in allowed:
        (result,) = replies[job_id][job_id]
        assert result.status == "ok", (job_id, result)

    # Nothing but their own results reached the reply topics, and no result any other topic.
    written = await _all_records(kafka, [acme_topic, evil_topic, eu_topic, pair_topic, lane, config.status_topic,
                                         config.jobs_topic, config.control_topic, config.dlq_topic,
                                         other.results_topic, other.jobs_topic, other.control_topic,
                                         other.status_topic, other.dlq_topic])
    assert [decode_result(r.value).id for r in written[acme_topic]] == ["acme-pattern"]
    assert [decode_result(r.value).id for r in written[pair_topic]] == ["acme-pair"]
    assert [decode_result(r.value).id for r in written[evil_topic]] == ["evil-pattern"]
    assert [decode_result(r.value).id for r in written[eu_topic]] == ["escaped-tenant"]
    sent = len(refused) + 2 + len(allowed)
    assert len(written[config.jobs_topic]) == sent  # the jobs themselves, no result among them
    assert all(b'"status"' not in (r.value or b"") for r in written[config.jobs_topic])
    for topic in (lane, config.control_topic, config.dlq_topic, other.results_topic, other.jobs_topic,
                  other.control_topic, other.status_topic, other.dlq_topic):
        assert written[topic] == [], (topic, written[topic][:1])
    job_ids = {*refused, *allowed, "results-topic", "missing"}
    assert not [r for r in written[config.status_topic] if (r.key or b"").decode(errors="replace") in job_ids]
