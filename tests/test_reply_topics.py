"""Which topics a job's reply_to may name (worker/reply_topics.py), without a broker: the tenant's escaping never
lets one tenant's value spell another's topic, the worker's own and the conventional jobs, control, status and
dead-letter topics are refused whatever the pattern or pairs say, nothing configured allows only the results
topic, and settings that cannot work are refused at start-up naming the flag (exit 2)."""

from __future__ import annotations

import dataclasses

import pytest

from lorabus.worker.cli import main
from lorabus.worker.config import WorkerConfig
from lorabus.worker.reply_topics import ReplyRules, ReplyTopicConfigError, tenant_topic_text

TRICKY_TENANTS = ("acme", "Acme", "a.b", "a_b", "a_2eb", "a-b", "a", "b", "a.", ".a", "a..b", "a_", "_2e", "🙂",
                  "zürich-AG", "x" * 256, "lorabus.jobs", "=", "a=b", " ", "\u0000")


def _config(**overrides) -> WorkerConfig:
    return dataclasses.replace(WorkerConfig(results_topic="res", jobs_topic="jobs", control_topic="ctl",
                                            dlq_topic="dlq", status_topic="sts"), **overrides)


def test_tenant_text_is_one_to_one_and_never_holds_a_dot():
    texts = [tenant_topic_text(tenant) for tenant in TRICKY_TENANTS]
    assert len(set(texts)) == len(TRICKY_TENANTS), texts
    # Kafka takes names that differ only in '.' against '_' for one: with no '.', two tenants never collide so.
    assert len({text.replace(".", "_") for text in texts}) == len(texts)
    assert all("." not in text for text in texts)
    assert tenant_topic_text("acme") == "acme" and tenant_topic_text("eu.acme") == "eu_2eacme"
    assert tenant_topic_text("a_b") == "a_5fb" and tenant_topic_text("🙂") == "_f0_9f_99_82"


def test_nothing_configured_allows_only_the_results_topic():
    rules = ReplyRules.from_config(_config())
    assert rules.refusal("acme", "res") is None
    for topic in ("results.acme", "lorabus.results", "res.acme", "other"):
        refusal = rules.refusal("acme", topic)
        assert refusal is not None and topic in refusal and "'acme'" in refusal


def test_a_pattern_gives_each_tenant_its_own_topic_only():
    rules = ReplyRules.from_config(_config(reply_topic_pattern="lorabus.results.{tenant}"))
    assert rules.refusal("acme", "lorabus.results.acme") is None
    assert rules.refusal("eu.acme", "lorabus.results.eu_2eacme") is None
    assert rules.refusal("evil", "lorabus.results.acme") is not None  # another tenant's
    assert rules.refusal("a", "lorabus.results.a.b") is not None  # no prefix match
    assert rules.refusal("a.b", "lorabus.results.a.b") is not None  # the escaped form only
    for tenant in TRICKY_TENANTS:
        own = rules.tenant_topic(tenant)
        others = [other for other in TRICKY_TENANTS if other != tenant and rules.refusal(other, own) is None]
        assert not others, (tenant, own, others)


def test_pairs_allow_one_topic_to_one_tenant():
    rules = ReplyRules.from_config(_config(reply_topic=["acme=acme-replies", "a=b=shared", "t-1=shared"]))
    assert rules.refusal("acme", "acme-replies") is None
    assert rules.refusal("evil", "acme-replies") is not None
    assert rules.refusal("a=b", "shared") is None and rules.refusal("t-1", "shared") is None  # a tenant may hold '='
    assert rules.refusal("a", "shared") is not None


@pytest.mark.parametrize("topic", ["jobs", "ctl", "dlq", "sts", "jobs.acme", "lorabus.jobs", "lorabus.jobs.acme",
                                   "lorabus.control", "lorabus.status", "lorabus.dlq", "lorabus.dlq.x",
                                   "__consumer_offsets", "__transaction_state"])
def test_non_result_topics_are_refused_whatever_the_rules(topic):
    """The worker's own jobs, control, status and dead-letter topics, those of any group by the lorabus
    convention (and the tenant lanes below them), and Kafka's internal topics: a pattern that would spell one
    (lorabus.{tenant} for tenant `jobs`) does not make it a results topic."""
    tenant = topic[-1]  # a careless pattern that spells the topic for this tenant
    rules = ReplyRules.from_config(_config(reply_topic_pattern=topic[:-1] + "{tenant}"))
    assert rules.tenant_topic(tenant) == topic
    refusal = rules.refusal(tenant, topic)
    assert refusal is not None and topic in refusal and "results never go there" in refusal


@pytest.mark.parametrize("overrides,fragment", [
    (dict(reply_topic_pattern="lorabus.results"), "has no {tenant}"),
    (dict(reply_topic_pattern="results/{tenant}"), "not a topic name"),
    (dict(reply_topic=["acme"]), "use TENANT=TOPIC"),
    (dict(reply_topic=["=topic"]), "use TENANT=TOPIC"),
    (dict(reply_topic=["acme=bad topic"]), "use TENANT=TOPIC"),
    (dict(reply_topic=["acme=ctl"]), "never a results topic"),
    (dict(reply_topic=["acme=lorabus.jobs.acme"]), "never a results topic"),
])
def test_settings_that_cannot_work_are_refused(overrides, fragment):
    with pytest.raises(ReplyTopicConfigError, match=fragment.replace("{", r"\{").replace("}", r"\}")):
        ReplyRules.from_config(_config(**overrides))


def test_the_worker_command_refuses_them_with_one_line(capsys, monkeypatch):
    monkeypatch.setenv("LORABUS_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # refused before anything connects
    assert main(["worker", "--reply-topic-pattern", "lorabus.results"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorabus worker: --reply-topic-pattern 'lorabus.results': has no {tenant}"), err
    assert main(["worker", "--reply-topic", "acme=lorabus.status"]) == 2
    assert "--reply-topic 'acme=lorabus.status'" in capsys.readouterr().err
    monkeypatch.setenv("LORABUS_REPLY_TOPIC", "acme=ok-topic:evil")  # the environment's list, as os.pathsep splits it
    assert main(["worker"]) == 2
    assert "--reply-topic 'evil': use TENANT=TOPIC" in capsys.readouterr().err
