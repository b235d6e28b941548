"""What exactly-once delivery costs: the same job stream through one worker in at-least-once and in
--exactly-once mode, interleaved and repeated, through a real broker.

    .venv/bin/python benchmarks/delivery.py [--jobs 300] [--repeats 5] [--new-tokens 1]

Each run starts a worker on fresh topics, sends --jobs greedy base-model jobs (one token each by
default, so the Kafka path dominates rather than the model), and times first send → last result seen
by a reader (read_committed in exactly-once mode). Reported per mode: jobs/s as median [min..max] over
--repeats runs, and the ratio of the medians. Uses KAFKA_BOOTSTRAP_SERVERS, or starts deploy/local-kafka.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

from lorabus.scheduler import EngineConfig
from lorabus.worker.client import run_jobs
from lorabus.worker.config import WorkerConfig
from lorabus.worker.testing import build_tiny_model
from lorabus.worker.service import Worker
from lorabus.worker.topics import ensure_topics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' support modules (never the repository root)

from helpers import broker_at  # noqa: E402

MODES = ("at-least-once", "exactly-once")


async def one_run(bootstrap: str, model: Path, mode: str, jobs: int, new_tokens: int) -> float:
    tag = uuid.uuid4().hex[:8]
    config = WorkerConfig(bootstrap_servers=bootstrap, model=str(model), group_id=f"bench-{tag}",
                          jobs_topic=f"jobs-{tag}", results_topic=f"results-{tag}", control_topic=f"control-{tag}",
                          dlq_topic=f"dlq-{tag}", metrics_port=-1, exactly_once=mode == "exactly-once",
                          engine=EngineConfig(kv_cache_mb=64))
    await ensure_topics(bootstrap, {config.jobs_topic: 3, config.results_topic: 3, config.control_topic: 1,
                                    config.dlq_topic: 1})
    worker = Worker(config)
    task = asyncio.create_task(worker.run())
    records = [(f"b-{i}", json.dumps({"id": f"b-{i}", "tenant": "bench", "prompt_ids": [5, 6, 7 + i % 50],
                                      "max_new_tokens": new_tokens}).encode()) for i in range(jobs)]
    isolation = "read_committed" if config.exactly_once else "read_uncommitted"
    try:
        started = time.perf_counter()
        results = await run_jobs(bootstrap, config.jobs_topic, config.results_topic, records, 600,
                                 isolation_level=isolation)
        elapsed = time.perf_counter() - started
    finally:
        worker.stop()
        await asyncio.wait_for(task, 120)
    if len(results) != jobs:
        raise RuntimeError(f"{mode}: only {len(results)}/{jobs} answered")
    return jobs / elapsed


def cpu_model() -> str:
    """The CPU's model name, printed beside every table (tuning fitted to one CPU has lost on another)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "model")
        rates: dict[str, list[float]] = {mode: [] for mode in MODES}
        with broker_at(os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), Path(tmp) / "kafka") as bootstrap:
            for rep in range(args.repeats):
                order = MODES if rep % 2 == 0 else MODES[::-1]  # interleaved: neither mode always runs first
                for mode in order:
                    rate = asyncio.run(one_run(bootstrap, model, mode, args.jobs, args.new_tokens))
                    rates[mode].append(rate)
                    print(f"run {rep + 1}/{args.repeats} {mode}: {rate:.1f} jobs/s", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {cpu_model()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}; {args.jobs} jobs x {args.new_tokens} token(s), {args.repeats} runs per mode\n")
    print("| mode | jobs/s median [min..max] | vs at-least-once |")
    print("|---|---|---|")
    base = statistics.median(rates[MODES[0]])
    for mode in MODES:
        r = rates[mode]
        print(f"| {mode} | {statistics.median(r):.1f} [{min(r):.1f}..{max(r):.1f}] | "
              f"{statistics.median(r) / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
