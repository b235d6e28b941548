"""Where a job's result may go: the topics a job's `reply_to` may name, per tenant (docs/trust.md).

A job's tenant and its `reply_to` are both written by its producer: without a rule, any producer could put
results into another tenant's results topic, or into a jobs, control, status or dead-letter topic. The
operator says which topics each tenant may reply to: a pattern in which `{tenant}` stands for the job's
tenant (escaped, so no tenant's value spells another tenant's topic), and/or explicit `TENANT=TOPIC` pairs.
Nothing configured: `reply_to` may name only the worker's own results topic, where the result goes anyway.
The topics that carry anything but results are refused whatever the pattern or pairs say.
"""

from __future__ import annotations

import asyncio
import re
import string
import time
from dataclasses import dataclass

from lorabus.worker.config import WorkerConfig

TENANT_FIELD = "{tenant}"
# Kafka's own rule for topic names (the wire contract's `Topic`).
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
# Never results topics, of any group: the lorabus naming convention's defaults (docs/wire-contract.md) and
# the per-tenant lanes under them ("Trust boundaries": lorabus.jobs.acme), besides the worker's own topics.
CONVENTIONAL_NON_RESULT_TOPICS = ("lorabus.jobs", "lorabus.control", "lorabus.dlq", "lorabus.status")
INTERNAL_TOPIC_PREFIX = "__"  # Kafka's own (__consumer_offsets, __transaction_state)
# Kept as they are in a tenant's topic name; every other UTF-8 byte is written _hh.
_KEPT = frozenset(string.ascii_letters + string.digits + "-")


class ReplyTopicConfigError(ValueError):
    """A --reply-topic-pattern or --reply-topic value the worker cannot run with; the message names the flag."""


def tenant_topic_text(tenant: str) -> str:
    """The tenant as topic-name text: letters, digits and `-` kept, every other UTF-8 byte as `_hh` (lowercase
    hex). One-to-one, since `_` only ever starts an escape, and free of `.`, so two tenants' topics never
    differ only in `.` against `_` (which Kafka treats as the same name)."""
    return "".join(ch if ch in _KEPT else "".join(f"_{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))
                   for ch in tenant)


def is_non_result_topic(topic: str, own: frozenset[str] = frozenset()) -> bool:
    """A jobs, control, status, dead-letter or internal topic: the worker's own (`own`), any group's under the
    naming convention, or a topic below one of those (`lorabus.jobs.acme`)."""
    if topic.startswith(INTERNAL_TOPIC_PREFIX):
        return True
    return any(topic == name or topic.startswith(name + ".") for name in (*own, *CONVENTIONAL_NON_RESULT_TOPICS))


@dataclass(frozen=True)
class ReplyRules:
    """The operator's rules for `reply_to`, checked against each job's tenant."""

    results_topic: str  # the worker's default results topic: always allowed
    pattern: str  # with TENANT_FIELD in it; "" = no pattern
    pairs: frozenset[tuple[str, str]]  # (tenant, topic)
    non_result_topics: frozenset[str]  # the worker's own jobs, control, dead-letter and status topics

    @classmethod
    def from_config(cls, config: WorkerConfig) -> "ReplyRules":
        own = frozenset((config.jobs_topic, config.control_topic, config.dlq_topic, config.status_topic))
        pattern = config.reply_topic_pattern
        if pattern:
            if TENANT_FIELD not in pattern:
                raise ReplyTopicConfigError(f"--reply-topic-pattern {pattern!r}: has no {TENANT_FIELD} (each tenant "
                                            f"needs a topic of its own; name shared topics with --reply-topic)")
            if not _TOPIC.fullmatch(pattern.replace(TENANT_FIELD, "t")):
                raise ReplyTopicConfigError(f"--reply-topic-pattern {pattern!r}: not a topic name once {TENANT_FIELD} "
                                            "is filled in (letters, digits, '.', '_', '-')")
        pairs = set()
        for entry in config.reply_topic:
            tenant, equals, topic = entry.rpartition("=")  # a topic name holds no '=', a tenant may
            if not equals or not tenant or not _TOPIC.fullmatch(topic):
                raise ReplyTopicConfigError(f"--reply-topic {entry!r}: use TENANT=TOPIC (a topic name: letters, "
                                            "digits, '.', '_', '-')")
            if is_non_result_topic(topic, own):
                raise ReplyTopicConfigError(f"--reply-topic {entry!r}: {topic} is a jobs, control, status, "
                                            "dead-letter or internal topic, never a results topic")
            pairs.add((tenant, topic))
        return cls(config.results_topic, pattern, frozenset(pairs), own)

    def tenant_topic(self, tenant: str) -> str | None:
        """The topic the pattern gives `tenant` (None without a pattern)."""
        return self.pattern.replace(TENANT_FIELD, tenant_topic_text(tenant)) if self.pattern else None

    def refusal(self, tenant: str, topic: str) -> str | None:
        """Why a job of `tenant` may not reply to `topic` (None when it may): the `forbidden` answer's message."""
        if is_non_result_topic(topic, self.non_result_topics):
            return (f"reply_to {topic}: a jobs, control, status, dead-letter or internal topic; results never "
                    "go there")
        if topic == self.results_topic or topic == self.tenant_topic(tenant) or (tenant, topic) in self.pairs:
            return None
        return f"reply_to {topic}: not a topic tenant {tenant!r} may reply to (--reply-topic-pattern, --reply-topic)"


# A reply_to topic missing from the cluster's topic list is looked for again every TOPICS_RECHECK_S
# (a just-created topic takes a moment to appear in metadata) until REPLY_TOPIC_WAIT_S have passed.
TOPICS_RECHECK_S = 0.25
REPLY_TOPIC_WAIT_S = 2.0


class ReplyTopics:
    """The rules, and whether an allowed topic exists: the cluster's topic list, fetched once for all the
    jobs that asked while a fetch was running (`list_topics`: an async callable, the admin client's)."""

    def __init__(self, rules: ReplyRules, list_topics):
        self.rules, self._list_topics = rules, list_topics
        self._known: set[str] = set()
        self._checked_at = float("-inf")
        self._lock = asyncio.Lock()

    async def problem(self, tenant: str, topic: str) -> tuple[str, str] | None:
        """Why a job of `tenant` may not have its result written to `topic`, as (error code, message); None
        when it may. The operator's rules first, so a tenant learns nothing of topics it may not use, not
        even whether they exist."""
        refusal = self.rules.refusal(tenant, topic)
        if refusal is not None:
            return "forbidden", refusal
        deadline = time.monotonic() + REPLY_TOPIC_WAIT_S
        while topic not in self._known:
            await self._refresh()
            if topic in self._known:
                break
            if time.monotonic() >= deadline:
                return "invalid_job", f"reply_to topic {topic} does not exist"
            await asyncio.sleep(TOPICS_RECHECK_S)
        return None

    async def _refresh(self) -> None:
        asked = time.monotonic()
        async with self._lock:
            if self._checked_at >= asked:
                return
            self._known = set(await self._list_topics())
            self._checked_at = time.monotonic()
