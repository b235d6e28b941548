"""`lorabus demo`: the embedded default, end to end on one machine.

Starts the local Kafka broker (deploy/local-kafka, unless KAFKA_BOOTSTRAP_SERVERS names one),
builds a tiny base model and three LoRA adapters on disk, starts a worker, publishes the adapters
on the control topic (one of them in two versions, then activates v2), produces jobs that
interleave the adapters and the bare base model, and prints each result with the adapter version
that served it and where the metrics are.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from lorabus.schemas import AdapterActivate, AdapterPublish
from lorabus.worker.client import publish_control, run_jobs
from lorabus.worker.config import WorkerConfig
from lorabus.worker.samples import build_sample_adapter, build_tiny_model

LOCAL_KAFKA = Path(__file__).resolve().parents[1] / "deploy" / "local-kafka"
ADAPTERS = {  # name → (versions, rank, alpha, target modules)
    "fin-ner": (("v1", "v2"), 8, 16, ("q_proj", "v_proj")),
    "support-bot": (("v1",), 16, 32, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "summarize": (("v1",), 4, 4, ("o_proj", "down_proj")),
}
PROMPTS = ["the quick brown fox", "translate english to french: hello", "summarize: the meeting moved",
           "classify sentiment: i loved this film"]


def start_broker(data_dir: Path) -> str:
    out = subprocess.run([sys.executable, str(LOCAL_KAFKA), "start", "--port", "0", "--data", str(data_dir)],
                         check=True, stdout=subprocess.PIPE, text=True)
    return out.stdout.strip().splitlines()[-1]


def stop_broker(data_dir: Path) -> None:
    subprocess.run([sys.executable, str(LOCAL_KAFKA), "stop", "--data", str(data_dir)], check=False)


def build_assets(root: Path) -> tuple[Path, dict[str, Path]]:
    model_dir = root / "model"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir)
    paths = {}
    for seed, (name, (versions, rank, alpha, targets)) in enumerate(ADAPTERS.items()):
        for v, version in enumerate(versions):
            path = root / "adapters" / f"{name}-{version}"
            if not (path / "adapter_config.json").exists():
                build_sample_adapter(path, model_dir, rank=rank, alpha=alpha, target_modules=targets, seed=10 * seed + v)
            paths[f"{name}@{version}"] = path
    return model_dir, paths


async def _demo(config: WorkerConfig, adapters: dict[str, Path], num_jobs: int) -> None:
    from lorabus.worker.service import Worker, ensure_topics

    await ensure_topics(config.bootstrap_servers, {config.jobs_topic: config.topic_partitions,
                                                   config.results_topic: config.topic_partitions,
                                                   config.control_topic: 1, config.dlq_topic: 1})
    worker = Worker(config)
    serving = asyncio.create_task(worker.run())
    events = []
    for key, path in adapters.items():
        name, version = key.split("@")
        events.append(AdapterPublish(name, version, str(path.resolve())))
    events.append(AdapterActivate("fin-ner", "v2"))
    await publish_control(config.bootstrap_servers, config.control_topic, events)
    print(f"published {len(adapters)} adapter versions; fin-ner active version is v2", flush=True)

    run_id = time.strftime("%H%M%S")
    choices = [None, "fin-ner", "support-bot", "summarize", "fin-ner@v1"]
    jobs = []
    for i in range(num_jobs):
        job = {"id": f"demo-{run_id}-{i}", "tenant": "acme", "adapter": choices[i % len(choices)],
               "prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": 12}
        jobs.append((job["id"], json.dumps(job).encode()))
    requested = {job_id: json.loads(value)["adapter"] for job_id, value in jobs}
    print(f"\n{'job':<18} {'asked for':<12} {'served by':<16} {'status':<6} tokens  text", flush=True)

    def show(result):
        served = f"{result.adapter}@{result.adapter_version}" if result.adapter else "base model"
        text = result.text if result.status == "ok" else result.error.message
        print(f"{result.id:<18} {str(requested[result.id] or '-'):<12} {served:<16} {result.status:<6} "
              f"{len(result.token_ids):>6}  {text!r}", flush=True)

    started = time.monotonic()
    results = await run_jobs(config.bootstrap_servers, config.jobs_topic, config.results_topic, jobs, 120, on_result=show)
    print(f"\n{len(results)}/{len(jobs)} jobs answered in {time.monotonic() - started:.2f}s", flush=True)
    if worker.metrics_port:
        url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        print(f"metrics: {url} (Prometheus; while a worker runs), e.g.:")
        for line in body.splitlines():
            if line.startswith(("lorabus_jobs_completed_total", "lorabus_tokens_generated_total",
                                "lorabus_engine_adapter_slots_used", "lorabus_job_latency_seconds_count")):
                print("  " + line)
    worker.stop()
    await serving
    if len(results) != len(jobs):
        raise SystemExit("some jobs got no result")


def main(args) -> int:
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    own_broker = bootstrap is None
    if own_broker:
        print("starting the local Kafka broker ...", flush=True)
        bootstrap = start_broker(root / "kafka")
    print(f"broker: {bootstrap}", flush=True)
    try:
        model_dir, adapters = build_assets(root)
        print(f"base model: {model_dir} (tiny Llama); adapters: {', '.join(adapters)}", flush=True)
        config = WorkerConfig(bootstrap_servers=bootstrap, model=str(model_dir), group_id="lorabus-demo",
                              metrics_port=args.metrics_port)
        asyncio.run(_demo(config, adapters, args.jobs))
    finally:
        if own_broker:
            stop_broker(root / "kafka")
    return 0
