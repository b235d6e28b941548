"""Prometheus metrics of the worker (names documented in README "Metrics")."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Tasks × versions grow with every rollout: past this many (task, adapter, version) label sets, the
# routed-jobs counter adds to one "other" series, so a scrape stays small whatever the fleet publishes.
MAX_ROUTED_SERIES = 500


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_consumed = Counter("lorabus_jobs_consumed", "Job records taken from the jobs topic", registry=r)
        self.jobs_completed = Counter("lorabus_jobs_completed", "Jobs answered ok", ["adapter"], registry=r)
        self.jobs_failed = Counter("lorabus_jobs_failed", "Jobs answered with an error", ["code"], registry=r)
        self.dead_letters = Counter("lorabus_dead_letters", "Records sent to the dead-letter topic", registry=r)
        self.tokens_generated = Counter("lorabus_tokens_generated", "Completion tokens generated", registry=r)
        self.batch_size = Histogram("lorabus_batch_size", "Sequences per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.step_tokens = Histogram("lorabus_step_tokens", "Tokens per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.step_adapters = Histogram("lorabus_step_adapters", "Distinct adapters per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.latency = Histogram("lorabus_job_latency_seconds", "Job consumed → result acknowledged",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("lorabus_queue_seconds", "Job arrival at the engine → admitted into the batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("lorabus_time_to_first_token_seconds", "Arrival at the engine → first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.cold_start = Histogram("lorabus_adapter_cold_start_seconds",
                                    "Job for a non-resident adapter arrives → its first token", buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_load = Histogram("lorabus_adapter_load_seconds", "Adapter load (disk or host cache → device slot)",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_load_failures = Counter("lorabus_adapter_load_failures", "Adapter versions that failed to load here",
                                             registry=r)
        self.routed_jobs = Counter("lorabus_routed_jobs", "Jobs routed by task, by the version that served them "
                                   f"(at most {MAX_ROUTED_SERIES} label sets; later ones are counted as 'other')",
                                   ["task", "adapter", "version", "status"], registry=r)
        self._routed_series: set[tuple[str, str, str]] = set()
        self.control_ignored = Counter("lorabus_control_records_ignored", "Control records skipped, by reason",
                                       ["reason"], registry=r)
        self.inflight = Gauge("lorabus_jobs_inflight", "Job records taken from Kafka and not yet answered", registry=r)
        self.consumer_lag = Gauge("lorabus_consumer_lag", "Records behind the end of each assigned jobs partition",
                                  ["partition"], registry=r)
        self._engine_stats = None
        self._output_counts = None
        r.register(self)

    def count_routed(self, task: str, adapter: str, version: str, status: str) -> None:
        series = (task, adapter, version)
        if series not in self._routed_series:
            if len(self._routed_series) >= MAX_ROUTED_SERIES:
                series = ("other", "other", "other")
            else:
                self._routed_series.add(series)
        self.routed_jobs.labels(*series, status).inc()

    def watch_engine(self, stats_fn) -> None:
        self._engine_stats = stats_fn

    def watch_output(self, counts_fn) -> None:
        """`counts_fn() -> {name: count}`: the output path's own counters (retries, recreations, ...)."""
        self._output_counts = counts_fn

    def collect(self):
        """Engine gauges (adapter residency, queue depth, KV use) and output counters, read at scrape time."""
        if self._engine_stats is not None:
            for name, value in self._engine_stats().items():
                yield GaugeMetricFamily(f"lorabus_engine_{name}", f"Engine {name.replace('_', ' ')}", value=value)
        if self._output_counts is not None:
            for name, value in self._output_counts().items():
                yield CounterMetricFamily(f"lorabus_output_{name}", f"Output {name.replace('_', ' ')}", value=value)

    def describe(self):
        return []

    def serve(self, port: int) -> int:
        server, _ = start_http_server(port, addr="127.0.0.1" if port == 0 else "0.0.0.0", registry=self.registry)
        return server.server_address[1]
