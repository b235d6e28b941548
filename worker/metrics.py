"""Prometheus metrics of the worker (served on its metrics port by worker/health.py's HTTP server).

Every metric is listed in docs/metrics.md. Series stay bounded and true: consumer lag only for the
partitions this worker owns now, per-adapter completions only for the busiest adapters (the rest under
adapter="other"), routed jobs capped at MAX_ROUTED_SERIES label sets, and no `_created` series (one
more per counter and histogram, which no query of ours reads).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from lorabus.worker import package_version
from lorabus.worker.adapter_store import KINDS as STORE_FAILURE_KINDS

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Tasks × versions grow with every rollout: past this many (task, adapter, version) label sets, the
# routed-jobs counter adds to one "other" series, so a scrape stays small whatever the fleet publishes.
MAX_ROUTED_SERIES = 500
MAX_LANE_SERIES = 200  # lanes (jobs topics) with series of their own; the rest count under lane="other"
MAX_PLAN_SERIES = 128  # lorabus_lora_plan_info series, taken from each group in turn (the cache may hold hundreds)
# Adapter traffic is ranked on counts that halve every HALF_LIFE_S, so an adapter that went quiet
# gives its series up to a busy newcomer; a newcomer takes over only once its count is SWAP_FACTOR
# times the weakest's, so two adapters of equal traffic do not trade a series back and forth.
HALF_LIFE_S = 600.0
SWAP_FACTOR = 2.0
FORGET_BELOW = 0.01  # a decayed count this small is dropped (with its adapter's series total)
# Engine stats that only rise: exported as counters lorabus_<name>_total, the rest as lorabus_engine_<name> gauges.
ENGINE_COUNTERS = {
    "prefix_cache_queried_tokens": "Prompt tokens of admitted jobs looked up in the prefix cache (full blocks "
                                   "before each job's last prompt token)",
    "prefix_cache_hit_tokens": "Prompt tokens found in the prefix cache (their prefill skipped)",
}


class TopAdapterCounter:
    """A counter by (adapter, version) that exports at most `max_adapters` label sets.

    The busiest adapters by recent traffic own a series; a job of any other adapter is counted under
    adapter="other", version="other" when it is answered; base-model jobs always under adapter="base",
    version="". Each series only ever rises and every job is counted in exactly one of them, so
    `sum(rate(...))` is the true rate. An adapter that drops out of the top keeps its total here (its
    series pauses and resumes from that total if it comes back); jobs answered meanwhile go to "other".
    """

    def __init__(self, name: str, documentation: str, max_adapters: int, clock: Callable[[], float] = time.monotonic):
        self.name, self.documentation, self.max_adapters, self.clock = name, documentation, max(0, max_adapters), clock
        self._lock = threading.Lock()  # counted on the event loop, collected on the HTTP thread
        self._traffic: dict[tuple[str, str], float] = {}  # decayed job counts: the ranking
        self._totals: dict[tuple[str, str], float] = {}  # what each adapter's series shows (tracked or paused)
        self._tracked: set[tuple[str, str]] = set()
        self._base = 0.0
        self._other = 0.0
        self._decayed_at = clock()

    def inc(self, adapter: str | None, version: str | None, amount: float = 1.0) -> None:
        """Count `amount` jobs of `adapter`@`version` (adapter None: the base model)."""
        with self._lock:
            if adapter is None:
                self._base += amount
                return
            key = (adapter, version or "")
            self._decay()
            self._traffic[key] = self._traffic.get(key, 0.0) + amount
            if key not in self._tracked:
                self._consider(key)
            if key in self._tracked:
                self._totals[key] = self._totals.get(key, 0.0) + amount
            else:
                self._other += amount

    def _consider(self, key: tuple[str, str]) -> None:
        if len(self._tracked) < self.max_adapters:
            self._tracked.add(key)
            return
        if not self._tracked:
            return
        weakest = min(self._tracked, key=lambda k: (self._traffic.get(k, 0.0), k))
        if self._traffic[key] > SWAP_FACTOR * self._traffic.get(weakest, 0.0):
            self._tracked.discard(weakest)
            self._tracked.add(key)

    def _decay(self) -> None:
        now = self.clock()
        elapsed = now - self._decayed_at
        if elapsed < HALF_LIFE_S:
            return
        factor = 0.5 ** (elapsed / HALF_LIFE_S)
        self._decayed_at = now
        for key, count in list(self._traffic.items()):
            if count * factor >= FORGET_BELOW or key in self._tracked:
                self._traffic[key] = count * factor
            else:  # quiet for hours: forget it (were it to come back, its series restarts from 0)
                del self._traffic[key]
                self._totals.pop(key, None)

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=["adapter", "version"])
        with self._lock:
            family.add_metric(["base", ""], self._base)
            for adapter, version in sorted(self._tracked):
                family.add_metric([adapter, version], self._totals[(adapter, version)])
            family.add_metric(["other", "other"], self._other)
        yield family

    def describe(self):
        yield CounterMetricFamily(self.name, self.documentation, labels=["adapter", "version"])


class Metrics:
    def __init__(self, max_adapters: int = 50):
        disable_created_metrics()  # process-wide in prometheus_client; this process exports only the worker's
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Gauge("lorabus_build_info", "The lorabus version this worker runs (value 1)", ["version"],
              registry=r).labels(package_version()).set(1)
        self.jobs_consumed = Counter("lorabus_jobs_consumed", "Job records taken from the jobs topic", registry=r)
        self.jobs_completed = TopAdapterCounter(
            "lorabus_jobs_completed", f"Jobs answered ok, by adapter and version (the {max(0, max_adapters)} busiest "
            "adapters; the rest under adapter=\"other\"; base model under adapter=\"base\")", max_adapters)
        r.register(self.jobs_completed)
        self.job_results = Counter("lorabus_job_results", "Jobs answered with a result, by status: ok or the "
                                   "error code", ["status"], registry=r)
        self.jobs_failed = Counter("lorabus_jobs_failed", "Jobs answered with an error", ["code"], registry=r)
        self.dead_letters = Counter("lorabus_dead_letters", "Records sent to the dead-letter topic", registry=r)
        self.partials = Counter("lorabus_partials", "Streamed partial results, by outcome: sent (acknowledged) or "
                                "failed (dropped: partials are best-effort, never retried)", ["outcome"], registry=r)
        for outcome in ("sent", "failed"):  # both series from the start, so a rate of failures reads 0, not absent
            self.partials.labels(outcome)
        self.tokens_generated = Counter("lorabus_tokens_generated", "Completion tokens generated", registry=r)
        self.prompt_tokens = Counter("lorabus_prompt_tokens", "Prompt tokens of the jobs answered ok", registry=r)
        self.batch_size = Histogram("lorabus_batch_size", "Sequences per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.step_tokens = Histogram("lorabus_step_tokens", "Tokens per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.step_adapters = Histogram("lorabus_step_adapters", "Distinct adapters per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.latency = Histogram("lorabus_job_latency_seconds", "Job consumed → result acknowledged",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("lorabus_queue_seconds", "Job arrival at the engine → admitted into the batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("lorabus_time_to_first_token_seconds", "Arrival at the engine → first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("lorabus_time_per_output_token_seconds",
                              "Per job: (finish - first token) / (completion tokens - 1), jobs of 2 tokens or more",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.cold_start = Histogram("lorabus_adapter_cold_start_seconds",
                                    "Job for a non-resident adapter arrives → its first token", buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_load = Histogram("lorabus_adapter_load_seconds", "Adapter load (disk or host cache → device slot), "
                                      "by the tier it read: source=disk|host", ["source"], buckets=LATENCY_BUCKETS,
                                      registry=r)
        for source in ("disk", "host"):  # every series exists from the start (a dashboard's rate finds them)
            self.adapter_load.labels(source)
        self.adapter_load_failures = Counter("lorabus_adapter_load_failures", "Adapter versions that failed to load here",
                                             registry=r)
        self.store_download = Histogram("lorabus_adapter_store_download_seconds", "Adapter downloads from the object "
                                        "store into the disk tier (list, get, verify); store downloads only",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.store_fetches = Counter("lorabus_adapter_store_fetches", "Fetches of s3:// adapter versions, by outcome: ok "
                                     "(downloaded), cached (in the disk tier already), or the store's failure kind",
                                     ["outcome"], registry=r)
        for outcome in ("ok", "cached", *STORE_FAILURE_KINDS):  # every series from the start: a rate reads 0, not absent
            self.store_fetches.labels(outcome)
        self.routed_jobs = Counter("lorabus_routed_jobs", "Jobs routed by task, by the version that served them "
                                   f"(at most {MAX_ROUTED_SERIES} label sets; later ones are counted as 'other')",
                                   ["task", "adapter", "version", "status"], registry=r)
        self._routed_series: set[tuple[str, str, str]] = set()
        self.control_ignored = Counter("lorabus_control_records_ignored", "Control records skipped, by reason",
                                       ["reason"], registry=r)
        self.inflight = Gauge("lorabus_jobs_inflight", "Job records taken from Kafka and not yet answered", registry=r)
        self.consumer_lag = Gauge("lorabus_consumer_lag", "Records behind the end of each jobs partition this worker "
                                  "owns now (from its committed offset)", ["topic", "partition"], registry=r)
        self._lag_series: set[tuple[str, str]] = set()
        self._lag_lock = threading.Lock()
        self.lane_wait = Histogram("lorabus_lane_wait_seconds", "A job record's timestamp → the worker taking it, "
                                   "by lane (jobs topic)", ["lane"], buckets=LATENCY_BUCKETS, registry=r)
        self.lane_tokens = Counter("lorabus_lane_tokens", "Prompt and generated tokens of the jobs answered ok, "
                                   "by lane (jobs topic)", ["lane"], registry=r)
        self._lane_series: set[str] = set()
        self._engine_stats = self._engine_plans = None
        self._output_counts = None
        self._lane_holds = None
        r.register(self)

    def page(self) -> tuple[str, bytes]:
        """The `/metrics` page: its content type and the exposition text."""
        return CONTENT_TYPE_LATEST, generate_latest(self.registry)

    def observe_completion(self, c) -> None:
        """A generation's timings (a `scheduler.Completion` that finished ok)."""
        self.queue_time.observe(c.queue_s)
        if c.ttft_s is not None:
            self.ttft.observe(c.ttft_s)
            if c.cold:
                self.cold_start.observe(c.ttft_s)
            if len(c.token_ids) >= 2:  # the first token's time is TTFT's; the rest share what followed it
                self.tpot.observe((c.total_s - c.ttft_s) / (len(c.token_ids) - 1))

    def lane_taken(self, lane: str, timestamp_ms: int) -> None:
        """A job record taken from `lane`'s topic, appended at `timestamp_ms` (a producer's clock may say
        anything: a time ahead counts as no wait)."""
        if timestamp_ms >= 0:
            self.lane_wait.labels(self._lane_label(lane)).observe(max(0.0, time.time() - timestamp_ms / 1000))

    def _lane_label(self, lane: str) -> str:
        if lane not in self._lane_series:
            if len(self._lane_series) >= MAX_LANE_SERIES:
                return "other"
            self._lane_series.add(lane)
        return lane

    def count_answer(self, result, seconds: float, lane: str | None = None) -> None:
        """One delivered answer: its `JobResult`, or None for a dead letter, how long it took, and the
        lane (jobs topic) it came from."""
        if lane is not None and result is not None and result.status == "ok":
            self.lane_tokens.labels(self._lane_label(lane)).inc(result.usage.prompt_tokens
                                                                + result.usage.completion_tokens)
        if result is not None and result.task is not None:
            if result.mix:  # a route's mix target: counted like a mix job's completion
                self.count_routed(result.task, "mix", "", result.status)
            else:
                self.count_routed(result.task, result.adapter, result.adapter_version, result.status)
        if result is None:
            self.dead_letters.inc()
        elif result.status == "ok":
            self.job_results.labels("ok").inc()
            # adapter None: the base model
            self.jobs_completed.inc(result.adapter or ("mix" if result.mix else None), result.adapter_version)
            self.tokens_generated.inc(result.usage.completion_tokens)
            self.prompt_tokens.inc(result.usage.prompt_tokens)
        else:
            self.job_results.labels(result.error.code).inc()
            self.jobs_failed.labels(result.error.code).inc()
        self.latency.observe(seconds)

    def count_routed(self, task: str, adapter: str, version: str, status: str) -> None:
        series = (task, adapter, version)
        if series not in self._routed_series:
            if len(self._routed_series) >= MAX_ROUTED_SERIES:
                series = ("other", "other", "other")
            else:
                self._routed_series.add(series)
        self.routed_jobs.labels(*series, status).inc()

    def set_lag(self, lags: dict[tuple[str, int], int]) -> None:
        """The lag of every partition owned now; series of partitions not in `lags` are removed."""
        with self._lag_lock:
            keep = {(topic, str(partition)) for topic, partition in lags}
            for series in self._lag_series - keep:
                self.consumer_lag.remove(*series)
            for (topic, partition), lag in lags.items():
                self.consumer_lag.labels(topic, str(partition)).set(lag)
            self._lag_series = keep

    def drop_lag(self, topic: str, partition: int) -> None:
        """A partition moved to another consumer: its lag is that consumer's to report."""
        with self._lag_lock:
            series = (topic, str(partition))
            if series in self._lag_series:
                self._lag_series.discard(series)
                self.consumer_lag.remove(*series)

    def watch_engine(self, stats_fn, plans_fn=None) -> None:
        """`stats_fn() -> {name: value}` (lorabus_engine_*) and `plans_fn() -> [{group, shape, plan, ...}]`
        (lorabus_lora_plan_info), read at scrape time."""
        self._engine_stats, self._engine_plans = stats_fn, plans_fn

    def watch_lanes(self, holds_fn) -> None:
        """`holds_fn() -> {lane: jobs held}`: read at scrape time as lorabus_lane_inflight."""
        self._lane_holds = holds_fn

    def watch_output(self, counts_fn) -> None:
        """`counts_fn() -> {name: count}`: the output path's own counters (retries, recreations, ...)."""
        self._output_counts = counts_fn

    def collect(self):
        """Engine gauges (adapter residency, queue depth, KV use) and output counters, read at scrape time."""
        if self._engine_stats is not None:
            for name, value in self._engine_stats().items():
                if name in ENGINE_COUNTERS:
                    yield CounterMetricFamily(f"lorabus_{name}", ENGINE_COUNTERS[name], value=value)
                else:
                    yield GaugeMetricFamily(f"lorabus_engine_{name}", f"Engine {name.replace('_', ' ')}", value=value)
        if self._engine_plans is not None:
            plans = GaugeMetricFamily("lorabus_lora_plan_info", "The CPU path's plan per LoRA projection group and "
                                      "step shape class, and the attention backend per start-up probe point (group "
                                      "attention), chosen by measurement (value 1)", labels=["group", "shape", "plan"])
            for row in self._engine_plans(MAX_PLAN_SERIES):
                plans.add_metric([row["group"], row["shape"], row["plan"]], 1)
            yield plans
        if self._lane_holds is not None:
            held = GaugeMetricFamily("lorabus_lane_inflight", "Job records held (taken, not yet answered), by lane "
                                     "(jobs topic)", labels=["lane"])
            totals: dict[str, float] = dict.fromkeys(self._lane_series, 0)  # a lane taken from once: always shown
            for lane, count in self._lane_holds().items():
                label = lane if lane in self._lane_series else "other"
                totals[label] = totals.get(label, 0) + count
            for label, count in totals.items():
                held.add_metric([label], count)
            yield held
        if self._output_counts is not None:
            for name, value in self._output_counts().items():
                yield CounterMetricFamily(f"lorabus_output_{name}", f"Output {name.replace('_', ' ')}", value=value)

    def describe(self):
        return []
