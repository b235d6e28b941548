"""The Kafka path: how close the worker comes to the engine alone and to a raw aiokafka loop, on one-token
jobs of the tiny model, where the bus and the hand-off dominate rather than the model.

    .venv/bin/python -P benchmarks/kafka_path.py [--jobs 5000] [--repeats 5] [--threads 1]
        [--json /tmp/kafka_path.json] [--profile DIR --profile-system worker-at-least-once]

Systems, run side by side on one broker, in an order that rotates between repeats:
* worker-at-least-once / worker-exactly-once: a `Worker` (default settings but a 64 MiB KV cache)
  started on a fresh jobs topic that already holds a backlog of --jobs jobs;
* engine: the same requests handed to an `Engine` alone (no Kafka), in one `submit_many` call;
* raw: an aiokafka consume → produce → commit loop over the same backlog that does no work.
Rates come from result timestamps: (results - 1) / (last - first), so start-up does not count (the
record timestamps of results for the Kafka systems, the completion callbacks' clock for the engine).
Printed: median [min..max] per system, the ratios worker/engine and worker/raw, torch threads and the
CPU model. --json writes every run; a PNG bar chart goes next to it. --profile records the chosen
system's backlog phase (a worker: from when it starts consuming) with py-spy (raw collapsed stacks, all
threads, on-CPU samples only, 200 Hz) into DIR.
Uses KAFKA_BOOTSTRAP_SERVERS, or starts deploy/local-kafka.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from lorabus.scheduler import Engine, EngineConfig, Request, SamplingParams
from lorabus.worker.config import WorkerConfig
from lorabus.worker.service import Worker
from lorabus.worker.testing import build_tiny_model
from lorabus.worker.topics import ensure_topics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' support modules (never the repository root)

sys.path.insert(0, str(ROOT / "benchmarks"))  # the sibling charts.py, also under -P
import charts  # noqa: E402
from helpers import broker_at  # noqa: E402

SYSTEMS = ("worker-at-least-once", "worker-exactly-once", "engine", "raw")
PARTITIONS = 3
KV_CACHE_MB = 64
RUN_TIMEOUT_S = 600
START_TIMEOUT_S = 120
READ_POLL_MS = 200
PROFILE_POLL_S = 0.01
PROMPT_SPAN = 50  # prompts differ in their last token: [5, 6, 7 + i % PROMPT_SPAN]


def job_value(i: int) -> bytes:
    return json.dumps({"id": f"k-{i}", "tenant": "bench", "prompt_ids": [5, 6, 7 + i % PROMPT_SPAN],
                       "max_new_tokens": 1}).encode()


def rate(stamps: list[float]) -> float:
    """Jobs per second between the first and the last result."""
    return (len(stamps) - 1) / (max(stamps) - min(stamps))


class Profiler:
    """py-spy recording this process while one phase runs (None: no profiling)."""

    def __init__(self, out: Path | None):
        self.out, self.proc = out, None

    def start(self, name: str) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{name}-{time.strftime('%H%M%S')}.txt"
        self.proc = subprocess.Popen([str(ROOT / ".venv/bin/uv"), "tool", "run", "py-spy", "record",
                                      "--threads", "--rate", "200", "--format", "raw", "--output", str(path),
                                      "--pid", str(os.getpid())], stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(60)
            self.proc = None


async def produce_backlog(bootstrap: str, topic: str, jobs: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for i in range(jobs):
            await producer.send(topic, job_value(i), key=f"k-{i}".encode())
        await producer.flush()
    finally:
        await producer.stop()


async def result_stamps(bootstrap: str, topic: str, jobs: int, isolation: str, deadline: float) -> list[float]:
    """The timestamps (s) of the first `jobs` records of `topic`, read from the start."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, isolation_level=isolation)
    await consumer.start()
    stamps: list[float] = []
    try:
        while len(stamps) < jobs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{topic}: only {len(stamps)}/{jobs} results")
            for records in (await consumer.getmany(timeout_ms=READ_POLL_MS)).values():
                stamps += [r.timestamp / 1000 for r in records]
    finally:
        await consumer.stop()
    return stamps


async def fresh_topics(bootstrap: str) -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    jobs_topic, results_topic = f"jobs-{tag}", f"results-{tag}"
    await ensure_topics(bootstrap, {jobs_topic: PARTITIONS, results_topic: PARTITIONS})
    return jobs_topic, results_topic


async def run_worker(bootstrap: str, model: Path, jobs: int, exactly_once: bool, profiler: Profiler,
                     name: str) -> float:
    jobs_topic, results_topic = await fresh_topics(bootstrap)
    tag = jobs_topic.split("-", 1)[1]
    await ensure_topics(bootstrap, {f"control-{tag}": 1, f"dlq-{tag}": 1})
    await produce_backlog(bootstrap, jobs_topic, jobs)
    config = WorkerConfig(bootstrap_servers=bootstrap, model=str(model), group_id=f"bench-{tag}",
                          jobs_topic=jobs_topic, results_topic=results_topic, control_topic=f"control-{tag}",
                          dlq_topic=f"dlq-{tag}", metrics_port=-1, exactly_once=exactly_once,
                          engine=EngineConfig(kv_cache_mb=KV_CACHE_MB))
    worker = Worker(config)
    task = asyncio.create_task(worker.run())
    try:
        started = time.monotonic()
        while not worker.consuming and not task.done():  # the backlog phase only, not the start-up
            if time.monotonic() - started > START_TIMEOUT_S:
                raise RuntimeError(f"{name}: the worker did not start consuming within {START_TIMEOUT_S} s")
            await asyncio.sleep(PROFILE_POLL_S)
        if task.done():
            task.result()  # the worker failed to start: its error, not a wait for results that never come
        profiler.start(name)
        stamps = await result_stamps(bootstrap, results_topic, jobs,
                                     "read_committed" if exactly_once else "read_uncommitted",
                                     time.monotonic() + RUN_TIMEOUT_S)
    finally:
        profiler.stop()
        worker.stop()
        await asyncio.wait_for(task, 120)
    return rate(stamps)


def run_engine(model: Path, jobs: int, profiler: Profiler) -> float:
    engine = Engine(str(model), EngineConfig(kv_cache_mb=KV_CACHE_MB))
    engine.start()
    stamps: list[float] = []
    done = threading.Event()

    def on_done(completion):
        if completion.status != "ok":
            raise RuntimeError(f"{completion.id}: {completion.error_message}")
        stamps.append(time.time())
        if len(stamps) == jobs:
            done.set()

    requests = [Request(id=f"k-{i}", tenant="bench", prompt_ids=[5, 6, 7 + i % PROMPT_SPAN],
                        params=SamplingParams(max_new_tokens=1)) for i in range(jobs)]
    profiler.start("engine")
    try:
        if hasattr(engine, "submit_many"):
            engine.submit_many([(request, on_done) for request in requests])
        else:  # the engine before submit_many (the "before" profile)
            for request in requests:
                engine.submit(request, on_done)
        if not done.wait(RUN_TIMEOUT_S):
            raise RuntimeError(f"engine: only {len(stamps)}/{jobs} answered")
    finally:
        profiler.stop()
        engine.stop()
    return rate(stamps)


async def run_raw(bootstrap: str, jobs: int, max_records: int, profiler: Profiler) -> float:
    jobs_topic, results_topic = await fresh_topics(bootstrap)
    await produce_backlog(bootstrap, jobs_topic, jobs)
    consumer = AIOKafkaConsumer(jobs_topic, bootstrap_servers=bootstrap, group_id=f"raw-{jobs_topic}",
                                enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=max_records)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await consumer.start()
    await producer.start()
    profiler.start("raw")
    try:
        answered = 0
        while answered < jobs:
            batches = await consumer.getmany(timeout_ms=100, max_records=max_records)
            sent = [await producer.send(results_topic, b"{}", key=r.key) for rs in batches.values() for r in rs]
            await asyncio.gather(*sent)
            if sent:
                await consumer.commit()
            answered += len(sent)
        stamps = await result_stamps(bootstrap, results_topic, jobs, "read_uncommitted",
                                     time.monotonic() + RUN_TIMEOUT_S)
    finally:
        profiler.stop()
        await consumer.stop()
        await producer.stop()
    return rate(stamps)


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} [{min(values):,.0f}..{max(values):,.0f}]"


def draw(report: dict, json_path: str) -> list[Path]:
    """The chart beside the JSON: each system's jobs/s, median with [min..max]."""
    groups = {name: {"jobs/s": rates} for name, rates in report["rates"].items()}
    return [charts.bar_chart(charts.png_beside(json_path), "The Kafka path: one-token jobs", "jobs/s", groups,
                             log_y=True, subtitle=report["header"])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS))
    parser.add_argument("--json", default="", help="write every run here (and a PNG chart next to it)")
    parser.add_argument("--profile", default="", help="directory for py-spy recordings of --profile-system")
    parser.add_argument("--profile-system", default="worker-at-least-once", choices=SYSTEMS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    systems = [s for s in args.systems.split(",") if s]
    if unknown := set(systems) - set(SYSTEMS):
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    quiet = Profiler(None)
    profiler = Profiler(Path(args.profile)) if args.profile else quiet
    max_records = WorkerConfig().max_inflight
    rates: dict[str, list[float]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "model")
        with broker_at(os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), Path(tmp) / "kafka") as bootstrap:
            for rep in range(args.repeats):
                shift = rep % len(systems)  # rotated: no system always runs first
                for name in systems[shift:] + systems[:shift]:
                    prof = profiler if name == args.profile_system else quiet
                    if name == "engine":
                        r = run_engine(model, args.jobs, prof)
                    elif name == "raw":
                        r = asyncio.run(run_raw(bootstrap, args.jobs, max_records, prof))
                    else:
                        r = asyncio.run(run_worker(bootstrap, model, args.jobs, name == "worker-exactly-once",
                                                   prof, name))
                    rates[name].append(r)
                    print(f"run {rep + 1}/{args.repeats} {name}: {r:,.0f} jobs/s", flush=True)
    head = (f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
            f"{args.jobs} one-token jobs (tiny model), {args.repeats} runs per system")
    print(f"\n{head}\n\n| system | jobs/s median [min..max] |\n|---|---|")
    for name in systems:
        print(f"| {name} | {summary(rates[name])} |")
    ratios = {}
    for worker in ("worker-at-least-once", "worker-exactly-once"):
        for other in ("engine", "raw", "worker-at-least-once"):
            if worker in rates and other in rates and worker != other:
                ratios[f"{worker}/{other}"] = statistics.median(rates[worker]) / statistics.median(rates[other])
    print()
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")
    if args.json:
        out = Path(args.json)
        report = {"script": "kafka_path", "header": head, "cpu": cpu, "torch_threads": torch.get_num_threads(),
                  "jobs": args.jobs, "rates": rates, "ratios": ratios}
        out.write_text(json.dumps(report, indent=1))
        print(f"wrote {out} and {', '.join(map(str, draw(report, args.json)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
