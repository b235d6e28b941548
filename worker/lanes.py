"""Lanes: the jobs topics a worker reads (one per tenant or class of work) and the share of its in-flight
window each gets, so a backlog in one lane never holds another lane's records unread.

A lane is a jobs topic with:
  - `tenant`: the tenant its jobs are (tenant-from-topic). A job there whose tenant field or header says
    otherwise is answered `forbidden`; with ACLs that let each tenant write only its own lane, the broker,
    not the job, then says who the tenant is (docs/trust.md).
  - `weight`: its share of the in-flight window against the other busy lanes.
  - `max_inflight`: its own bound on the jobs it holds (0: only its share).
  - `rate`: jobs a second it may be taken at, with a one-second burst (0: unbounded).
  - `results`: where its results go (None: the worker's results topic); a job's `reply_to` may then name
    only that topic.

Without lanes a worker reads its one jobs topic as before: a lane of weight 1 that fixes nothing.

Share of the window. A lane is busy while it holds a job; each lane's share is `max_inflight` split by
weight among the busy lanes and itself. Lanes that stay busy also share the work by weight: each lane's
served tokens over its weight (its virtual service, as the engine's fairness counts tenants) may run at
most a share's worth of jobs ahead of the least-served busy lane, else it waits; a lane that wakes up
starts level with the busy ones, so an idle spell earns no credit. A lane holding its share or more is paused (its partitions stay
assigned, nothing is fetched), so when a quiet lane's first record arrives, the flooding lane's share
shrinks at once and the quiet lane's records are fetched at the next poll instead of after the backlog.
All lanes together hold at most twice `--max-inflight` (`hard_bound`) while shares shift: the flood's
jobs held before the quiet lane woke are answered, not dropped, and a lane may take past its share what
one poll brings. Which held job runs first is then the engine's
fair admission across tenants.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from lorabus.worker.reply_topics import TENANT_FIELD, tenant_topic_text

_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
# With lanes, a fetch often asks only for the partitions of idle lanes (the busy ones paused), and the
# broker holds such a fetch up to fetch.max.wait.ms for data; a busy lane resumed meanwhile waits for it.
# aiokafka's 500 ms default made a flood drain 1.5x slower with one idle lane beside it; 50 ms costs
# 20 empty fetches a second when all is idle.
LANES_FETCH_MAX_WAIT_MS = 50
# With --lane-pattern, a tenant's topic created after the worker started is found at the consumer's next
# metadata refresh: every 30 s instead of aiokafka's 5 minutes.
PATTERN_METADATA_MAX_AGE_MS = 30_000
# The running mean of an answered job's tokens, which sizes how far a lane may run ahead of the others in
# served work (a share's worth of jobs): a prior, then a mean over about the last JOB_TOKENS_WINDOW jobs.
JOB_TOKENS_PRIOR = 64.0
JOB_TOKENS_WINDOW = 64
_OPTIONS = {"tenant", "weight", "max-inflight", "rate", "results"}


class LaneConfigError(ValueError):
    """A --lane / --lane-pattern value the worker cannot run with; the message names the flag."""


@dataclass(frozen=True)
class Lane:
    topic: str
    tenant: str | None = None
    weight: float = 1.0
    max_inflight: int = 0
    rate: float = 0.0
    results: str | None = None


def parse_lane(spec: str) -> Lane:
    """`TOPIC[,tenant=T][,weight=W][,max-inflight=N][,rate=R][,results=TOPIC]` → Lane."""
    topic, *options = spec.split(",")
    if not _TOPIC.fullmatch(topic):
        raise LaneConfigError(f"--lane {spec}: {topic!r} is not a topic name")
    lane = Lane(topic)
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or key not in _OPTIONS or not value:
            raise LaneConfigError(f"--lane {spec}: {option!r}: use KEY=VALUE with KEY one of {sorted(_OPTIONS)}")
        try:
            match key:
                case "tenant":
                    lane = replace(lane, tenant=value)
                case "weight":
                    lane = replace(lane, weight=float(value))
                case "max-inflight":
                    lane = replace(lane, max_inflight=int(value))
                case "rate":
                    lane = replace(lane, rate=float(value))
                case "results":
                    lane = replace(lane, results=value)
        except ValueError:
            raise LaneConfigError(f"--lane {spec}: {key}={value!r} is not a number") from None
    if not (0 < lane.weight < float("inf")) or lane.max_inflight < 0 or not (0 <= lane.rate < float("inf")):
        raise LaneConfigError(f"--lane {spec}: weight must be > 0, max-inflight and rate >= 0")
    if lane.results is not None and not _TOPIC.fullmatch(lane.results):
        raise LaneConfigError(f"--lane {spec}: results {lane.results!r} is not a topic name")
    return lane


def tenant_of_topic_text(text: str) -> str | None:
    """The tenant whose topic text (`tenant_topic_text`) is `text`; None if no tenant's text is that."""
    raw, i = bytearray(), 0
    while i < len(text):
        if text[i] == "_":
            digits = text[i + 1:i + 3]
            if len(digits) != 2 or any(c not in "0123456789abcdef" for c in digits):
                return None
            raw.append(int(digits, 16))
            i += 3
        else:
            raw += text[i].encode()
            i += 1
    try:
        tenant = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return tenant if tenant and tenant_topic_text(tenant) == text else None


@dataclass
class LaneTable:
    """The lanes of a worker: explicit ones (`--lane`), and those a pattern (`--lane-pattern`) finds."""

    lanes: dict[str, Lane]  # topic → lane, the explicit ones
    pattern: str = ""  # with TENANT_FIELD in it; "" = none
    results_pattern: str = ""  # where a pattern lane's results go; "" = the worker's results topic
    default: str = ""  # the worker's jobs topic when no lane is configured
    _found: dict[str, Lane] = field(default_factory=dict)

    @classmethod
    def from_config(cls, specs: list[str], pattern: str, results_pattern: str, jobs_topic: str) -> "LaneTable":
        lanes = {}
        for spec in specs:
            lane = parse_lane(spec)
            if lane.topic in lanes:
                raise LaneConfigError(f"--lane {spec}: {lane.topic} is given twice")
            lanes[lane.topic] = lane
        for flag, value in (("--lane-pattern", pattern), ("--lane-results-pattern", results_pattern)):
            if value and (value.count(TENANT_FIELD) != 1 or not _TOPIC.fullmatch(value.replace(TENANT_FIELD, "x"))):
                raise LaneConfigError(f"{flag} {value}: a topic name with {TENANT_FIELD} in it once")
        if results_pattern and not pattern:
            raise LaneConfigError("--lane-results-pattern needs --lane-pattern")
        table = cls(lanes, pattern, results_pattern, "" if lanes or pattern else jobs_topic)
        for topic in lanes:
            if pattern and table._pattern_tenant(topic) is None:
                raise LaneConfigError(f"--lane {topic}: with --lane-pattern {pattern}, every lane must match it "
                                      "(the worker subscribes by the pattern)")
        return table

    @property
    def configured(self) -> bool:
        return not self.default

    def topics(self) -> list[str]:
        """The topics to subscribe to by name (with a pattern: `subscription_pattern` instead)."""
        return [self.default] if self.default else list(self.lanes)

    def named_topics(self) -> list[str]:
        """Every jobs and results topic the configured lanes name (for the worker to create if missing)."""
        named = self.topics() + [lane.results for lane in self.lanes.values() if lane.results is not None]
        return list(dict.fromkeys(named))

    def consumer_options(self) -> dict:
        """What the jobs consumer needs set for these lanes (nothing without lanes: as it always ran)."""
        if not self.configured:
            return {}
        options = {"fetch_max_wait_ms": LANES_FETCH_MAX_WAIT_MS}
        if self.pattern:
            options["metadata_max_age_ms"] = PATTERN_METADATA_MAX_AGE_MS
        return options

    def subscription_pattern(self) -> str | None:
        """The regular expression to subscribe by, when lanes come from a pattern."""
        if not self.pattern:
            return None
        head, _, tail = self.pattern.partition(TENANT_FIELD)
        return f"^{re.escape(head)}[A-Za-z0-9_-]+{re.escape(tail)}$"

    def lane(self, topic: str) -> Lane:
        """The lane of a topic the worker reads (a topic it does not know: a lane that fixes nothing)."""
        lane = self.lanes.get(topic) or self._found.get(topic)
        if lane is None:
            tenant = self._pattern_tenant(topic)
            results = (self.results_pattern.replace(TENANT_FIELD, tenant_topic_text(tenant))
                       if tenant is not None and self.results_pattern else None)
            lane = self._found[topic] = Lane(topic, tenant=tenant, results=results)
        return lane

    def _pattern_tenant(self, topic: str) -> str | None:
        if not self.pattern:
            return None
        head, _, tail = self.pattern.partition(TENANT_FIELD)
        if not (topic.startswith(head) and topic.endswith(tail) and len(topic) > len(head) + len(tail)):
            return None
        return tenant_of_topic_text(topic[len(head):len(topic) - len(tail)])


class LaneShares:
    """How many jobs each lane holds, and which lanes must pause: over their share of the window, ahead of
    the other busy lanes in the work they were served, over their own bound, or over their rate."""

    def __init__(self, table: LaneTable, max_inflight: int, clock: Callable[[], float] = time.monotonic):
        self.table, self.max_inflight, self.clock = table, max_inflight, clock
        # What all lanes together may hold: one jobs topic holds at most max_inflight, as it always has;
        # lanes hold up to their shares plus what one poll brought while shares shifted.
        self.hard_bound = 2 * max_inflight if table.configured else max_inflight
        self.held: dict[str, int] = {}  # topic → jobs held
        # topic → virtual service: the tokens of its answered jobs over its weight (the engine's fairness,
        # per lane). A lane that wakes up starts level with the busy lanes, not behind them.
        self.served: dict[str, float] = {}
        self.job_tokens = JOB_TOKENS_PRIOR  # tokens of an answered job, a running mean: the unit of the slack
        self._bucket: dict[str, tuple[float, float]] = {}  # topic → (rate allowance, clock() when counted)
        self._freed = asyncio.Event()  # a held job was answered since `freed` began waiting

    def took(self, topic: str) -> None:
        if not self.held.get(topic):
            busy = [self.served.get(t, 0.0) for t, n in self.held.items() if n > 0]
            if busy:
                self.served[topic] = max(self.served.get(topic, 0.0), min(busy))
        self.held[topic] = self.held.get(topic, 0) + 1
        lane = self.table.lane(topic)
        if lane.rate:
            self._bucket[topic] = (self._refill(lane) - 1, self.clock())

    def done(self, topic: str, tokens: int = 0) -> None:
        """A job of `topic`'s lane was answered, with `tokens` of work (prompt and generated; 0: none done)."""
        self._freed.set()
        left = self.held.get(topic, 0) - 1
        if left > 0:
            self.held[topic] = left
        else:
            self.held.pop(topic, None)
        if tokens > 0:
            self.served[topic] = self.served.get(topic, 0.0) + tokens / self.table.lane(topic).weight
            self.job_tokens += (tokens - self.job_tokens) / JOB_TOKENS_WINDOW

    async def freed(self, timeout_s: float) -> bool:
        """Wait until a held job is answered (True: a lane may have room again) or `timeout_s` passes (False)."""
        self._freed.clear()
        try:
            await asyncio.wait_for(self._freed.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def share(self, topic: str) -> int:
        """The jobs `topic`'s lane may hold now: the window split by weight among the busy lanes and it."""
        busy = {t for t, n in self.held.items() if n > 0} | {topic}
        total = sum(self.table.lane(t).weight for t in busy)
        share = max(1, int(self.max_inflight * self.table.lane(topic).weight / total))
        lane_max = self.table.lane(topic).max_inflight
        return min(share, lane_max) if lane_max else share

    def ahead(self, topic: str, share: int | None = None) -> bool:
        """Whether `topic`'s lane was served more than its share's worth of tokens beyond the least-served
        other busy lane: then it waits for that lane (the least-served lane is never ahead)."""
        others = [self.served.get(t, 0.0) for t, n in self.held.items() if n > 0 and t != topic]
        if not others:
            return False
        share = self.share(topic) if share is None else share
        return self.served.get(topic, 0.0) - min(others) > self.job_tokens * share

    def room(self, topic: str) -> int:
        """How many more jobs `topic`'s lane may take now (0: it is paused)."""
        lane, share = self.table.lane(topic), self.share(topic)
        if self.ahead(topic, share):
            return 0
        room = share - self.held.get(topic, 0)
        if lane.rate:
            room = min(room, int(self._refill(lane)))
        return max(0, room)

    def _refill(self, lane: Lane) -> float:
        burst = max(1.0, lane.rate)  # a second's worth, and at least one job
        allowance, at = self._bucket.get(lane.topic, (burst, self.clock()))
        return min(burst, allowance + (self.clock() - at) * lane.rate)
