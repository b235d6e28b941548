"""The worker's metrics and its metrics port, without a broker: bounded per-adapter series (top K by
traffic + other), lag series that follow ownership, no `_created` series, process/platform/build
info, the HTTP paths, and the health pages' JSON."""

import asyncio
import json
import threading
import urllib.error
import urllib.request
from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lorabus.worker import health
from lorabus.worker.health import Check, HealthChecks, page, serve_http
from lorabus.worker import package_version
from lorabus.worker.metrics import HALF_LIFE_S, MAX_PLAN_SERIES, Metrics, TopAdapterCounter


def _completed(counter: TopAdapterCounter) -> dict[tuple[str, str], float]:
    (family,) = counter.collect()
    return {(s.labels["adapter"], s.labels["version"]): s.value for s in family.samples}


def test_top_adapters_get_series_and_the_rest_count_as_other():
    counter = TopAdapterCounter("lorabus_jobs_completed", "jobs", max_adapters=2)
    for adapter, jobs in (("a", 5), ("b", 3), ("c", 1)):
        for _ in range(jobs):
            counter.inc(adapter, "v1")
    counter.inc(None, None)
    assert _completed(counter) == {("base", ""): 1, ("a", "v1"): 5, ("b", "v1"): 3, ("other", "other"): 1}
    # c grows past twice b's traffic: it takes b's series from then on; b's past jobs stay counted in b's series.
    for _ in range(6):
        counter.inc("c", "v1")
    series = _completed(counter)
    assert ("b", "v1") not in series and len(series) == 4, series
    assert series[("c", "v1")] + series[("other", "other")] == 7  # every c job counted once, somewhere
    assert series[("other", "other")] >= 1


def test_adapter_series_only_rise_and_count_every_job_once():
    """Whatever the churn, each exported series is monotonic and the increases add up to the jobs counted."""
    counter = TopAdapterCounter("lorabus_jobs_completed", "jobs", max_adapters=3)
    last: dict[tuple[str, str], float] = {}
    seen_increase = 0.0
    jobs = 0
    for step in range(400):
        adapter = f"ad-{(step * 7) % 11 if step < 200 else (step * 3) % 5}"
        counter.inc(adapter, "v2")
        jobs += 1
        series = _completed(counter)
        assert len(series) <= 3 + 2, series  # K adapters + base + other
        for key, value in series.items():
            assert value >= last.get(key, 0), f"{key} went down: {last.get(key)} -> {value}"
            seen_increase += value - last.get(key, 0)
            last[key] = value
    assert seen_increase == jobs


def test_a_quiet_adapter_gives_its_series_to_a_busy_newcomer():
    now = [0.0]
    counter = TopAdapterCounter("lorabus_jobs_completed", "jobs", max_adapters=1, clock=lambda: now[0])
    for _ in range(100):
        counter.inc("old", "v1")
    now[0] += 10 * HALF_LIFE_S  # 100 jobs then silence: weighs 100 / 2**10 now
    for _ in range(3):
        counter.inc("new", "v1")
    series = _completed(counter)
    assert ("new", "v1") in series and ("old", "v1") not in series, series


def test_no_adapter_series_when_k_is_zero():
    counter = TopAdapterCounter("lorabus_jobs_completed", "jobs", max_adapters=0)
    counter.inc("a", "v1")
    assert _completed(counter) == {("base", ""): 0, ("other", "other"): 1}


def _families(metrics: Metrics) -> dict:
    text = generate_latest(metrics.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}, text


def test_exposition_has_no_created_series_and_has_process_and_build_info():
    metrics = Metrics(max_adapters=4)
    metrics.jobs_consumed.inc()
    metrics.job_results.labels("ok").inc()
    metrics.latency.observe(0.2)
    metrics.tpot.observe(0.01)
    families, text = _families(metrics)
    assert "_created" not in text
    assert families["lorabus_build_info"].samples[0].labels == {"version": package_version()}
    assert families["lorabus_build_info"].samples[0].value == 1
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "python_info", "python_gc_objects_collected",
                 "lorabus_prompt_tokens", "lorabus_time_per_output_token_seconds", "lorabus_job_results",
                 "lorabus_jobs_completed"):
        assert name in families, f"{name} missing from {sorted(families)}"


def test_lag_series_follow_the_partitions_owned():
    metrics = Metrics()
    metrics.set_lag({("jobs", 0): 7, ("jobs", 1): 3, ("jobs", 2): 0})
    metrics.drop_lag("jobs", 1)  # revoked
    metrics.set_lag({("jobs", 0): 5})  # partition 2 no longer assigned either
    families, _ = _families(metrics)
    lag = {(s.labels["topic"], s.labels["partition"]): s.value for s in families["lorabus_consumer_lag"].samples}
    assert lag == {("jobs", "0"): 5}


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def test_metrics_port_serves_metrics_and_pages_and_404_elsewhere():
    metrics = Metrics()
    pages = {"/healthz": lambda: page({"engine_thread": Check(True, "runs")}),
             "/readyz": lambda: page({"broker": Check(False, "no broker contact yet"), "model": Check(True, "ok")})}
    server = serve_http("127.0.0.1", 0, metrics.page, pages)
    try:
        host, port = server.server_address
        assert host == "127.0.0.1"
        base = f"http://127.0.0.1:{port}"
        status, content_type, body = _get(f"{base}/metrics")
        assert status == 200 and content_type.startswith("text/plain") and b"lorabus_build_info" in body
        status, content_type, body = _get(f"{base}/healthz")
        assert status == 200 and content_type == "application/json"
        assert json.loads(body) == {"status": "ok", "checks": {"engine_thread": {"ok": True, "detail": "runs"}}}
        status, _, body = _get(f"{base}/readyz")
        assert status == 503
        assert json.loads(body)["checks"]["broker"] == {"ok": False, "detail": "no broker contact yet"}
        for path in ("/", "/metricsx", "/healthz/x", "/favicon.ico"):
            assert _get(base + path)[0] == 404, path
    finally:
        server.shutdown()
        server.server_close()


def _fake_worker(**overrides):
    engine = SimpleNamespace(alive=True, steps=3, device="cpu", dtype="torch.float32")
    fields = dict(engine=engine, loop=None, caught_up=True, control_offset=4, stopping=False, consuming=True,
                  partitions={}, config=SimpleNamespace(ready_max_loop_lag_ms=500))
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_readiness_names_the_failing_check():
    checks = HealthChecks(_fake_worker(caught_up=False))
    ready = checks.ready()
    assert not ready["broker"].ok and ready["broker"].detail == "no broker contact yet"
    assert not ready["control_log"].ok and ready["model"].ok and ready["consuming"].ok
    now = [100.0]
    checks = HealthChecks(_fake_worker(), clock=lambda: now[0])
    checks.broker_seen_at = 99.0
    assert not checks.ready()["event_loop"].ok  # the loop's lag is not measured yet
    checks.loop_woke_at, checks.loop_lag_s = 99.95, 0.01
    assert all(c.ok for c in checks.ready().values())
    checks.loop_lag_s = 0.6  # a timer ran 600 ms late within the window: jobs would be too
    loop = checks.ready()["event_loop"]
    assert not loop.ok and "600 ms late" in loop.detail and "--ready-max-loop-lag-ms" in loop.detail
    checks.loop_lag_s, now[0] = 0.0, 100.7  # the probe has not woken for 0.75 s: the loop is stuck now
    assert not checks.ready()["event_loop"].ok
    checks.loop_woke_at = 100.65
    assert checks.ready()["event_loop"].ok
    now[0] = 100.0
    now[0] += health.BROKER_STALE_S + 1  # the broker stopped answering
    checks.broker_error = "KafkaConnectionError: refused"
    broker = checks.ready()["broker"]
    assert not broker.ok and "refused" in broker.detail
    assert not HealthChecks(_fake_worker(stopping=True)).ready()["consuming"].ok
    assert not HealthChecks(_fake_worker(consuming=False)).ready()["consuming"].ok


def test_liveness_fails_when_the_engine_thread_or_the_event_loop_is_gone():
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        live = HealthChecks(_fake_worker(loop=loop)).live()
        assert live["event_loop"].ok and live["engine_thread"].ok
        dead_engine = SimpleNamespace(alive=False, steps=0, device="cpu", dtype="torch.float32")
        status, body = page(HealthChecks(_fake_worker(loop=loop, engine=dead_engine)).live())
        assert status == 503 and json.loads(body)["checks"]["engine_thread"]["ok"] is False
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()
    assert not HealthChecks(_fake_worker(loop=loop)).live()["event_loop"].ok  # closed


def test_every_metric_is_in_the_reference(tiny_model):
    """docs/metrics.md has a row for every lorabus_* metric a worker exports (engine gauges included)."""
    from pathlib import Path

    from lorabus.scheduler import Engine, EngineConfig

    reference = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    metrics = Metrics()
    engine = Engine(str(tiny_model), EngineConfig(kv_cache_mb=4, max_loras=4))
    metrics.watch_engine(engine.stats, engine.plans)
    families, _ = _families(metrics)
    # One lorabus_lora_plan_info series (value 1) per plan the engine knows (its cache file may hold hundreds:
    # at most MAX_PLAN_SERIES, each group in turn).
    plans = {(s.labels["group"], s.labels["shape"], s.labels["plan"]): s.value
             for s in families["lorabus_lora_plan_info"].samples}
    assert plans and plans == {(p["group"], p["shape"], p["plan"]): 1 for p in engine.plans(MAX_PLAN_SERIES)}
    assert len(plans) <= MAX_PLAN_SERIES and "attention" in {group for group, _, _ in plans}
    names = {name + ("_total" if family.type == "counter" else "") for name, family in families.items()
             if name.startswith("lorabus_")}
    assert len(names) >= 30
    missing = sorted(name for name in names if f"`{name}`" not in reference)
    assert not missing, f"docs/metrics.md lacks {missing}"


async def test_broker_probe_records_answers_and_failures(monkeypatch):
    from aiokafka.errors import KafkaConnectionError

    monkeypatch.setattr(health, "BROKER_PROBE_S", 0.01)
    answers = [None, KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 1)]")]

    class Admin:
        async def describe_cluster(self):
            if answers[0] is not None:
                raise answers[0]

    checks = HealthChecks(_fake_worker())
    probe = asyncio.create_task(checks.watch_broker(Admin()))
    try:
        async with asyncio.timeout(10):
            while checks.broker_seen_at is None:
                await asyncio.sleep(0.01)
            assert checks.ready()["broker"].ok
            answers[0] = answers[1]  # the broker goes away
            while "bootstrap" not in checks.broker_error:
                await asyncio.sleep(0.01)
        checks.clock = lambda: checks.broker_seen_at + health.BROKER_STALE_S + 1
        broker = checks.ready()["broker"]
        assert not broker.ok and "KafkaConnectionError" in broker.detail, broker
    finally:
        probe.cancel()
