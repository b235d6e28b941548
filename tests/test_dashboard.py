"""The Grafana dashboard only queries metrics a worker really exports (a renamed metric breaks this test)."""

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client import generate_latest

from lorabus.scheduler import Engine, EngineConfig
from lorabus.worker.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "lorabus.json"


def test_dashboard_queries_exported_metrics(tiny_model):
    metrics = Metrics()
    metrics.watch_engine(Engine(str(tiny_model), EngineConfig(kv_cache_mb=4)).stats)
    metrics.consumer_lag.labels("0").set(0)
    metrics.jobs_completed.labels("base").inc()
    metrics.jobs_failed.labels("internal").inc()
    metrics.count_routed("ner", "fin", "v2", "ok")
    metrics.adapter_load_failures.inc()
    metrics.control_ignored.labels("key").inc()
    exported = set()
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        exported.update(sample.name for sample in family.samples)
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"lorabus_[a-z_]+", target["expr"])}
    assert len(queried) >= 15
    assert queried <= exported, f"dashboard queries metrics no worker exports: {sorted(queried - exported)}"
