"""The Grafana dashboard, checked without a broker: it queries only metrics a worker exports (a renamed
metric breaks this test), every rate/increase window is `$__rate_interval`, every selector carries the
`$job`/`$instance` filter, and every panel's unit fits what it plots. tests/test_prometheus_kafka.py
evaluates the same queries in a real Prometheus."""

import json
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lorabus.scheduler import Engine, EngineConfig
from lorabus.worker.metrics import Metrics
from lorabus.worker.output import OUTPUT_COUNTERS

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "lorabus.json"
FILTER = ('job=~"$job"', 'instance=~"$instance"')
METRIC = re.compile(r"\b((?:lorabus|process|python)_[a-z_]+)\b(\{[^}]*\})?")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def targets() -> list[tuple[dict, str]]:
    return [(panel, target["expr"]) for panel in dashboard()["panels"] for target in panel["targets"]]


@pytest.fixture(scope="module")
def exported(tiny_model) -> set[str]:
    """Sample names a worker exports once each labelled series has been touched."""
    metrics = Metrics()
    metrics.watch_engine(Engine(str(tiny_model), EngineConfig(kv_cache_mb=4)).stats)
    metrics.watch_output(lambda: dict.fromkeys(OUTPUT_COUNTERS, 0))
    metrics.watch_lanes(lambda: {"jobs": 1})
    metrics.lane_taken("jobs", 0)
    metrics.lane_tokens.labels("jobs").inc()
    metrics.set_lag({("jobs", 0): 0})
    metrics.jobs_completed.inc("fin", "v1")
    metrics.job_results.labels("ok").inc()
    metrics.jobs_failed.labels("internal").inc()
    metrics.count_routed("ner", "fin", "v2", "ok")
    metrics.adapter_load_failures.inc()
    metrics.control_ignored.labels("key").inc()
    names = set()
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        names.update(sample.name for sample in family.samples)
    return names


def test_dashboard_queries_exported_metrics(exported):
    queried = {m.group(1) for _, expr in targets() for m in METRIC.finditer(expr)}
    assert len(queried) >= 25
    assert queried <= exported, f"dashboard queries metrics no worker exports: {sorted(queried - exported)}"
    assert not any(name.endswith("_created") for name in exported), "workers must not export _created series"


def test_every_window_is_the_rate_interval():
    for panel, expr in targets():
        windows = re.findall(r"\[([^\]]*)\]", expr)
        assert re.search(r"\b(rate|increase|irate)\(", expr) is None or windows, expr
        assert all(w == "$__rate_interval" for w in windows), f"{panel['title']}: fixed window in {expr}"


def test_every_selector_is_filtered_by_job_and_instance():
    for panel, expr in targets():
        selectors = list(METRIC.finditer(expr))
        assert selectors, f"{panel['title']}: no metric in {expr}"
        for m in selectors:
            labels = m.group(2) or ""
            assert all(f in labels for f in FILTER), f"{panel['title']}: {m.group(0)} lacks the job/instance filter"


def test_job_and_instance_variables():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    for name in ("job", "instance"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["includeAll"] and variable["allValue"] == ".*"
    assert "$job" in variables["instance"]["definition"], "the instance list follows the chosen job"


def test_units_fit_what_panels_plot():
    for panel in dashboard()["panels"]:
        unit = panel["fieldConfig"]["defaults"]["unit"]
        exprs = [t["expr"] for t in panel["targets"]]
        title = panel["title"]
        if any("histogram_quantile" in e for e in exprs):
            assert unit == "s" and all("_seconds_bucket" in e for e in exprs), title
        if any("host_adapters" in e or "consumer_lag" in e or "build_info" in e for e in exprs):
            assert unit in ("short", "none"), f"{title}: counts are not {unit}"
        if any("_bytes" in e for e in exprs):
            assert unit == "bytes", title
        if unit == "percentunit":  # a ratio: a quotient, or CPU seconds per second
            assert all(" / " in e or "process_cpu_seconds_total" in e for e in exprs), title
        if unit in ("reqps", "ops"):
            assert all(e.startswith("sum") and "rate(" in e for e in exprs), title
        # one panel, one kind of quantity: seconds never share a panel with counts or rates
        assert unit in ("s", "short", "none", "percentunit", "reqps", "ops", "bytes"), f"{title}: unit {unit}"
