"""The worker's `/healthz` and `/readyz` pages, and the HTTP server of its metrics port (`serve_http`:
`/metrics` and these pages; any other path is 404).

`/healthz` (liveness: restart me if this fails): the event loop answers and the engine's step thread
runs. `/readyz` (readiness: count me as serving): the model is loaded and its engine started, the
broker answered a metadata request lately, the control log was caught up at start, the jobs
consumer is subscribed and not stopping, and the event loop runs on time: a probe task sleeps
LOOP_PROBE_S at a time and measures how late it wakes; a lag over `--ready-max-loop-lag-ms` within the
last LOOP_LAG_WINDOW_S (or a loop stuck right now) means jobs would not be served in their normal
time, so the worker is not ready, however far it got. Both answer 200 or 503 with the same JSON body:
`{"status": "ok"|"fail", "checks": {name: {"ok": bool, "detail": str}}}`, so a failing probe says
which check failed and why.

The pages are computed on the HTTP server's thread: they read the worker's plain fields, and reach
the event loop only through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from lorabus.worker.service import Worker

log = logging.getLogger(__name__)

LOOP_TIMEOUT_S = 2.0  # an event loop that runs no callback for this long is stuck (liveness fails)
BROKER_PROBE_S = 2.0  # how often the broker is asked for its metadata
BROKER_TIMEOUT_S = 5.0  # one probe's limit
BROKER_STALE_S = 3 * BROKER_PROBE_S + BROKER_TIMEOUT_S  # no answer for this long: the broker is unreachable
LOOP_PROBE_S = 0.1  # the loop-lag probe's sleep
LOOP_LAG_WINDOW_S = 3.0  # readiness looks at the worst lag over this long: one late wake-up is no state


@dataclass
class Check:
    ok: bool
    detail: str


def page(checks: dict[str, Check]) -> tuple[int, bytes]:
    """The HTTP status (200 or 503) and JSON body of a set of checks."""
    ok = all(check.ok for check in checks.values())
    body = {"status": "ok" if ok else "fail",
            "checks": {name: {"ok": check.ok, "detail": check.detail} for name, check in checks.items()}}
    return (200 if ok else 503), json.dumps(body).encode()


class HealthChecks:
    def __init__(self, worker: "Worker", clock: Callable[[], float] = time.monotonic):
        self.worker, self.clock = worker, clock
        self.broker_seen_at: float | None = None  # clock() of the broker's last answer
        self.broker_error = "no broker contact yet"
        # Written by the loop probe (plain floats: the HTTP thread reads them without a lock).
        self.loop_woke_at: float | None = None  # clock() of the probe's last wake-up
        self.loop_lag_s = 0.0  # the worst lateness over the last LOOP_LAG_WINDOW_S

    def pages(self) -> dict[str, Callable[[], tuple[int, bytes]]]:
        return {"/healthz": lambda: page(self.live()), "/readyz": lambda: page(self.ready())}

    # ---- liveness ---------------------------------------------------------------------------------

    def live(self) -> dict[str, Check]:
        return {"event_loop": self._event_loop(), "engine_thread": self._engine_thread()}

    def _event_loop(self) -> Check:
        loop = self.worker.loop
        if loop is None or loop.is_closed():
            return Check(False, "the event loop is not running")
        answered = threading.Event()
        try:
            loop.call_soon_threadsafe(answered.set)
        except RuntimeError:  # closed between the check and the call
            return Check(False, "the event loop is closed")
        if not answered.wait(LOOP_TIMEOUT_S):
            return Check(False, f"the event loop ran no callback within {LOOP_TIMEOUT_S:g} s")
        return Check(True, "the event loop answers")

    def _engine_thread(self) -> Check:
        if self.worker.engine.alive:
            return Check(True, f"the step thread runs ({self.worker.engine.steps} steps so far)")
        return Check(False, "the engine's step thread is not running")

    # ---- readiness --------------------------------------------------------------------------------

    def ready(self) -> dict[str, Check]:
        return {"model": self._model(), "broker": self._broker(), "control_log": self._control_log(),
                "consuming": self._consuming(), "event_loop": self._loop_lag()}

    def _loop_lag(self) -> Check:
        woke = self.loop_woke_at
        if woke is None:
            return Check(False, "the event loop's lag is not measured yet")
        limit_s = self.worker.config.ready_max_loop_lag_ms / 1000
        stuck_s = self.clock() - woke - LOOP_PROBE_S  # > 0: late right now
        lag_s = max(self.loop_lag_s, stuck_s)
        if lag_s > limit_s:
            return Check(False, f"the event loop ran a timer {lag_s * 1000:.0f} ms late within the last "
                                f"{LOOP_LAG_WINDOW_S:g} s (at most {limit_s * 1000:.0f} ms: --ready-max-loop-lag-ms)")
        return Check(True, f"the event loop runs on time (worst lag {lag_s * 1000:.0f} ms in {LOOP_LAG_WINDOW_S:g} s)")

    def _model(self) -> Check:
        engine = self.worker.engine
        if not engine.alive:
            return Check(False, "the engine is not running (starting or stopped)")
        return Check(True, f"model loaded on {engine.device} ({str(engine.dtype).removeprefix('torch.')})")

    def _broker(self) -> Check:
        seen = self.broker_seen_at
        if seen is None:
            return Check(False, self.broker_error)
        age = self.clock() - seen
        if age > BROKER_STALE_S:
            return Check(False, f"no broker answer for {age:.0f} s: {self.broker_error}")
        return Check(True, f"the broker answered {age:.1f} s ago")

    def _control_log(self) -> Check:
        worker = self.worker
        if not worker.caught_up:
            return Check(False, f"reading the control topic ({worker.control_offset} records so far)")
        return Check(True, f"caught up at start; {worker.control_offset} control records read")

    def _consuming(self) -> Check:
        worker = self.worker
        if worker.stopping:
            return Check(False, "stopping: no new jobs are taken")
        if not worker.consuming:
            return Check(False, "the jobs consumer has not started")
        owned = sorted(f"{tp.topic}:{tp.partition}" for tp in tuple(worker.partitions))
        if not owned:
            return Check(True, "subscribed; no partition assigned (more group members than partitions?)")
        return Check(True, f"consuming {', '.join(owned)}")

    # ---- the broker probe, a task on the worker's event loop --------------------------------------

    async def watch_broker(self, admin) -> None:
        """Ask the broker for its cluster metadata every BROKER_PROBE_S; runs until cancelled."""
        while True:
            try:
                await asyncio.wait_for(admin.describe_cluster(), BROKER_TIMEOUT_S)
                self.broker_seen_at = self.clock()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # TimeoutError or a KafkaError: the page says which
                self.broker_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                log.debug("broker probe failed: %s", self.broker_error)
            await asyncio.sleep(BROKER_PROBE_S)

    # ---- the loop-lag probe, a task on the worker's event loop ------------------------------------

    async def watch_loop(self) -> None:
        """Sleep LOOP_PROBE_S at a time and keep the worst lateness of the last LOOP_LAG_WINDOW_S; runs until
        cancelled."""
        recent: collections.deque[tuple[float, float]] = collections.deque()  # (woke at, lag)
        while True:
            asleep_at = self.clock()
            await asyncio.sleep(LOOP_PROBE_S)
            woke = self.clock()
            recent.append((woke, max(0.0, woke - asleep_at - LOOP_PROBE_S)))
            while recent[0][0] < woke - LOOP_LAG_WINDOW_S:
                recent.popleft()
            self.loop_lag_s = max(lag for _, lag in recent)
            self.loop_woke_at = woke


def serve_http(host: str, port: int, metrics_page: Callable[[], tuple[str, bytes]],
               pages: dict[str, Callable[[], tuple[int, bytes]]]) -> ThreadingHTTPServer:
    """Serve `/metrics` (`metrics_page() -> (content type, body)`) and the JSON `pages` (path → () -> (status,
    body)) on a daemon thread; the caller shuts the server down. Port 0 takes a free port
    (`server.server_address[1]`)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?", 1)[0]
            try:
                if path == "/metrics":
                    content_type, body = metrics_page()
                    status = 200
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
