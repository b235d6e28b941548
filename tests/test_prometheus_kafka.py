"""The Grafana dashboard against a real Prometheus scraping a real worker (issue 12, item 3).

A worker on the real broker answers a short stream that touches every series the dashboard reads (ok,
failing and routed jobs, an ignored control record); then one Prometheus (Debian's package, installed
on first use) scrapes its /metrics as job `lorabus-1m` (scrape_interval 1m, Prometheus's default) and
as job `lorabus-5s`, and every expression of every panel is evaluated through `/api/v1/query` with
Grafana's variables substituted the way Grafana does:

- `$__rate_interval` = max(4 × scrape interval, scrape interval + step), Grafana's definition, with
  step = the scrape interval (Grafana's step never drops below the data source's scrape interval,
  which an operator sets to Prometheus's): 4 m at a 1 m scrape, 20 s at 5 s. That is the smallest
  window Grafana can pick (wider time ranges give a larger step), so the strictest case.
- `$job` and `$instance`: the real values (the 1 m instance scraped twice first; the 5 s target's
  address), regex-escaped as Grafana escapes a multi-value variable's value; then once more with both
  "All" (`.*`, the variables' allValue).

Any query error or any panel target without a series fails the test; so does a `[1m]` window (the
operator's bug) returning a series at the 1 m scrape, which proves the check can see that bug.

Prometheus places a target's first scrape at a hash-chosen point of its interval (up to a minute
late at 1 m), so the 1m job lists the worker six times under distinct `instance` labels and the test
uses whichever is scraped twice first: about 70 s instead of up to 120 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from lorabus.schemas import AdapterPublish, RouteSet, RouteTarget
from lorabus.worker.client import publish_control, run_jobs
from helpers import running_worker, worker_config

pytestmark = pytest.mark.kafka

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "lorabus.json"
SLOW, FAST = ("lorabus-1m", 60), ("lorabus-5s", 5)
SLOW_REPLICAS = 6


def prometheus_binary() -> str:
    """The prometheus binary; installs Debian's package when it is missing (a failed install fails the test)."""
    found = shutil.which("prometheus")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=120", "--no-install-recommends",
               "prometheus"]
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
    found = shutil.which("prometheus")
    if done.returncode != 0 or not found:
        pytest.fail(f"could not install prometheus (apt-get rc {done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_config(metrics_port: int) -> str:
    target = f"127.0.0.1:{metrics_port}"
    slow = [{"targets": [target], "labels": {"instance": f"w1m-{i}"}} for i in range(SLOW_REPLICAS)]
    jobs = [{"job_name": SLOW[0], "scrape_interval": f"{SLOW[1]}s", "static_configs": slow},
            {"job_name": FAST[0], "scrape_interval": f"{FAST[1]}s", "static_configs": [{"targets": [target]}]}]
    return json.dumps({"global": {"scrape_timeout": "5s"}, "scrape_configs": jobs})  # JSON is YAML


def rate_interval(scrape_s: int) -> str:
    """Grafana's $__rate_interval, with step = the scrape interval (see the module docstring)."""
    step = scrape_s
    return f"{max(4 * scrape_s, scrape_s + step)}s"


def grafana_regex_escape(value: str) -> str:
    """What Grafana's Prometheus data source does to a multi-value variable's value inside `=~"..."`:
    regex metacharacters get a backslash, itself doubled for the PromQL string (`.` becomes `\\\\.`)."""
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0), value.replace("\\", "\\" * 4))


def grafana_expr(expr: str, job: str, instance: str, scrape_s: int) -> str:
    return (expr.replace("$__rate_interval", rate_interval(scrape_s))
            .replace("$job", job).replace("$instance", instance))


class Prometheus:
    def __init__(self, binary: str, workdir: Path, metrics_port: int):
        config = workdir / "prometheus.yml"
        config.write_text(scrape_config(metrics_port))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = workdir / "prometheus.log"
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)

    def get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            return json.loads(response.read())

    def query(self, expr: str) -> tuple[str | None, list]:
        """(error or None, result series) of an instant query now."""
        try:
            body = self.get("/api/v1/query", query=expr)
        except urllib.error.HTTPError as err:  # 400/422: a bad expression
            return json.loads(err.read()).get("error", str(err)), []
        return (None, body["data"]["result"]) if body["status"] == "success" else (body.get("error"), [])

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"prometheus exited: {self.log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready: {self.log.read_text()[-2000:]}"
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _job(job_id: str, **fields) -> tuple[str, bytes]:
    return job_id, json.dumps({"id": job_id, "tenant": "acme", "prompt_ids": [5, 6, 7], "max_new_tokens": 3,
                               **fields}).encode()


async def _trickle(kafka: str, topic: str, stop: asyncio.Event) -> None:
    """A job every 2 s while Prometheus scrapes, so rates are above zero (results are not awaited)."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka)
    await producer.start()
    try:
        n = 0
        while not stop.is_set():
            job_id, value = _job(f"trickle-{n}", adapter="fin" if n % 2 else None)
            await producer.send_and_wait(topic, value, key=job_id.encode())
            n += 1
            try:
                await asyncio.wait_for(stop.wait(), 2)
            except asyncio.TimeoutError:
                pass
    finally:
        await producer.stop()


async def _scraped_twice(prom: Prometheus, timeout: float) -> str:
    """The first `lorabus-1m` instance with two successful scrapes, once `lorabus-5s` also has two."""
    deadline = time.monotonic() + timeout
    while True:
        _, slow = await asyncio.to_thread(prom.query, f'sum_over_time(up{{job="{SLOW[0]}"}}[10m]) >= 2')
        _, fast = await asyncio.to_thread(prom.query, f'sum_over_time(up{{job="{FAST[0]}"}}[10m]) >= 2')
        if slow and fast:
            return slow[0]["metric"]["instance"]
        assert time.monotonic() < deadline, f"no target scraped twice within {timeout} s: {slow} {fast}"
        await asyncio.sleep(1)


def test_dashboard_against_real_prometheus(kafka, tiny_model, peft_adapters, tmp_path):
    binary = prometheus_binary()
    dashboard = json.loads(DASHBOARD.read_text())
    targets = [(panel["title"], target["refId"], target["expr"])
               for panel in dashboard["panels"] for target in panel["targets"]]
    config = worker_config(kafka, tiny_model, metrics_port=0)
    started = time.monotonic()

    async def main():
        async with running_worker(config) as worker:
            await publish_control(kafka, config.control_topic, [
                AdapterPublish("fin", "v1", str(peft_adapters["qv-r4"])),
                RouteSet(task="ner", targets=[RouteTarget(adapter="fin@v1", weight=100)])])
            producer = AIOKafkaProducer(bootstrap_servers=kafka)
            await producer.start()
            try:  # a control record no worker may apply: counted under lorabus_control_records_ignored_total
                await producer.send_and_wait(config.control_topic, b"not a control event", key=b"adapter:junk@v1")
            finally:
                await producer.stop()
            jobs = [_job("base-0"), _job("base-1"), _job("fin-0", adapter="fin"), _job("fin-1", adapter="fin@v1"),
                    _job("routed-0", task="ner", user="u1"), _job("routed-1", task="ner", user="u2"),
                    _job("missing-0", adapter="nope")]
            results = await run_jobs(kafka, config.jobs_topic, config.results_topic, jobs, timeout_s=60)
            statuses = {job_id: got[0].status for job_id, got in results.items()}
            assert [statuses[j] for j, _ in jobs[:6]] == ["ok"] * 6, statuses
            assert results["missing-0"][0].error.code == "adapter_not_found", results["missing-0"]

            # Prometheus starts after the stream, so every series the stream made is in both 1m scrapes.
            prom = Prometheus(binary, tmp_path, worker.metrics_port)
            stop = asyncio.Event()
            trickle = asyncio.create_task(_trickle(kafka, config.jobs_topic, stop))
            try:
                await asyncio.to_thread(prom.wait_ready, 30)
                slow_instance = await _scraped_twice(prom, 130)
                fast_instance = f"127.0.0.1:{worker.metrics_port}"
                settings = [(SLOW[0], slow_instance, SLOW[1]), (FAST[0], fast_instance, FAST[1]), (".*", ".*", SLOW[1])]
                panels = {}
                for job, instance, scrape_s in settings:
                    escaped = (job, instance) if job == ".*" else tuple(map(grafana_regex_escape, (job, instance)))
                    for title, ref, expr in targets:
                        panels[(f"job={job} instance={instance}", title, ref)] = await asyncio.to_thread(
                            prom.query, grafana_expr(expr, *escaped, scrape_s))
                old_window = await asyncio.to_thread(
                    prom.query, f'rate(lorabus_jobs_consumed_total{{job="{SLOW[0]}", instance="{slow_instance}"}}[1m])')
                # the $job and $instance variables' own queries (Grafana's label_values)
                job_values = prom.get("/api/v1/label/job/values", **{"match[]": "lorabus_build_info"})["data"]
                instance_values = prom.get("/api/v1/label/instance/values",
                                           **{"match[]": f'lorabus_build_info{{job=~"{FAST[0]}"}}'})["data"]
                return panels, old_window, job_values, instance_values, fast_instance
            finally:
                stop.set()
                await trickle
                prom.stop()

    panels, old_window, job_values, instance_values, fast_instance = asyncio.run(main())
    failures = [f"{setting} / {title} / {ref}: {error or 'no series'}"
                for (setting, title, ref), (error, series) in panels.items() if error or not series]
    assert not failures, "panel targets that Grafana would show empty:\n" + "\n".join(failures)
    assert old_window == (None, []), "a [1m] rate at a 1 m scrape returned data: this check cannot see the bug"
    assert sorted(job_values) == sorted([SLOW[0], FAST[0]])
    assert instance_values == [fast_instance]
    # the jobs answered while the 5 s job scraped show as a rate above zero
    _, answered = panels[(f"job={FAST[0]} instance={fast_instance}", dashboard["panels"][0]["title"], "A")]
    assert sum(float(series["value"][1]) for series in answered) > 0, answered
    print(f"dashboard: {len(targets)} targets x {len(panels) // len(targets)} variable settings answered; "
          f"test took {time.monotonic() - started:.0f} s")
