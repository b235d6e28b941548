"""Prometheus metrics of the worker and the HTTP server of its metrics port.

Every metric is listed in docs/metrics.md. Series stay bounded and true: consumer lag only for the
partitions this worker owns now, per-adapter completions only for the busiest adapters (the rest under
adapter="other"), routed jobs capped at MAX_ROUTED_SERIES label sets, and no `_created` series (one
more per counter and histogram, which no query of ours reads). The port serves `/metrics` and the JSON
pages it is given (`/healthz`, `/readyz`); any other path is 404.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from lorabus.worker import package_version

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Tasks × versions grow with every rollout: past this many (task, adapter, version) label sets, the
# routed-jobs counter adds to one "other" series, so a scrape stays small whatever the fleet publishes.
MAX_ROUTED_SERIES = 500
# Adapter traffic is ranked on counts that halve every HALF_LIFE_S, so an adapter that went quiet
# gives its series up to a busy newcomer; a newcomer takes over only once its count is SWAP_FACTOR
# times the weakest's, so two adapters of equal traffic do not trade a series back and forth.
HALF_LIFE_S = 600.0
SWAP_FACTOR = 2.0
FORGET_BELOW = 0.01  # a decayed count this small is dropped (with its adapter's series total)


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
        self.consumer_lag = Gauge("lorabus_consumer_lag", "Records behind the end of each jobs partition this worker "
                                  "owns now (from its committed offset)", ["topic", "partition"], registry=r)
        self._lag_series: set[tuple[str, str]] = set()
        self._lag_lock = threading.Lock()
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

    def serve(self, host: str, port: int, pages: dict[str, Callable[[], tuple[int, bytes]]]) -> ThreadingHTTPServer:
        """Serve `/metrics` and the JSON `pages` (path → () -> (status, body)) on a daemon thread; the caller
        shuts the server down. Port 0 takes a free port (`server.server_address[1]`)."""
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        status, content_type, body = 200, CONTENT_TYPE_LATEST, generate_latest(registry)
                    elif path in pages:
                        status, body = pages[path]()
                        content_type = "application/json"
                    else:
                        status, content_type = 404, "text/plain; charset=utf-8"
                        body = f"not found; paths: /metrics {' '.join(sorted(pages))}\n".encode()
                except Exception as exc:  # a failing collector or check must answer, not drop the connection
                    log.exception("serving %s failed", path)
                    status, content_type = 500, "text/plain; charset=utf-8"
                    body = f"{type(exc).__name__}: {exc}\n".encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):  # a scrape every few seconds is not worth a log line
                pass

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET  # "::" binds IPv6 (dual stack)
            daemon_threads = True

        server = Server((host, port), Handler)
        threading.Thread(target=server.serve_forever, name="lorabus-metrics", daemon=True).start()
        return server
