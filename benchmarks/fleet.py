"""Fleet benchmark: does adapter affinity (worker/affinity.py) cut adapter loads across a consumer group?

    KAFKA_BOOTSTRAP_SERVERS=HOST:PORT .venv/bin/python benchmarks/fleet.py [--workers 3] [--adapters 200] [--jobs 1200]
        [--partitions 12] [--max-loras 8] [--max-cpu-loras 16] [--max-inflight 64] [--max-new-tokens 4]
        [--zipf 1.1] [--repeats 3] [--threads 1] [--write docs/benchmarks-serving.md]

Without KAFKA_BOOTSTRAP_SERVERS (or --bootstrap-servers) a private broker is started with deploy/local-kafka.

Setup: a tiny random Llama (as tests/conftest.py's `tiny_model`), --adapters rank-8 q/v adapters, all
published once on a fresh control topic. Each run gets a fresh jobs topic of --partitions partitions and
a fresh consumer group of --workers `lorabus worker` processes (separate processes, so each has its own
interpreter lock, as in production; each with --threads torch threads), with --max-loras device slots
and a --max-cpu-loras host cache, far fewer than the adapters, so loads actually happen. Once every
worker is ready and the group owns every partition, the producer sends --jobs jobs at once (adapters
drawn Zipf(s) over the adapters, same seeded stream for both keyings of a repeat; 8-token prompts,
--max-new-tokens tokens, greedy) keyed either by job id or by `AffinityKeyer`, and waits for every
result. The two keyings run back to back in each repeat, their order alternating between repeats.

Reported per run, from each worker's Prometheus metrics (differences over the run, so the start-up
warm-ups do not count) and the producer's clock:
* loads/worker: `lorabus_adapter_load_seconds_count`, every load into a device slot or the host cache;
* cold p99: the 99th percentile of `lorabus_adapter_cold_start_seconds` (arrival → first token of jobs
  whose adapter was not resident), interpolated in the merged histogram buckets;
* jobs/s and tok/s: jobs (tokens) / (last result − first send);
* p99 latency: send → result received, per job.
The table gives median [min..max] over the repeats, and the affinity/id ratio per repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("lorabus_adapter_load_seconds_count", "lorabus_tokens_generated_total")
COLD = "lorabus_adapter_cold_start_seconds_bucket"
READY_TIMEOUT_S = 300
PROMPT_TOKENS = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap-servers", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", ""))
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--adapters", type=int, default=200)
    p.add_argument("--jobs", type=int, default=1200)
    p.add_argument("--partitions", type=int, default=12)
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--max-cpu-loras", type=int, default=16)
    p.add_argument("--max-inflight", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take to answer every job")
    p.add_argument("--write", default="", help="append the report to this markdown file")
    p.add_argument("--json", default="", help="write every run's figures here")
    return p.parse_args(argv)


# ---- setup ------------------------------------------------------------------------------------------


def build_assets(workdir: Path, adapters: int) -> tuple[Path, list[Path]]:
    from lorabus.worker.testing import build_sample_adapter, build_tiny_model

    model = build_tiny_model(workdir / "model")
    paths = [build_sample_adapter(workdir / f"a{i:03d}", model, rank=8, seed=i) for i in range(adapters)]
    return model, paths


def zipf_stream(jobs: int, adapters: int, s: float, max_new_tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** s for rank in range(adapters)]
    names = rng.choices([f"a{i:03d}" for i in range(adapters)], weights=weights, k=jobs)
    return [{"id": f"j{seed}-{i}", "tenant": "bench", "adapter": name, "max_new_tokens": max_new_tokens,
             "prompt_ids": [rng.randrange(3, 200) for _ in range(PROMPT_TOKENS)]} for i, name in enumerate(names)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(args, model: Path, control: str, tag: str, workdir: Path) -> list[tuple[subprocess.Popen, int]]:
    workers = []
    for w in range(args.workers):
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "LORABUS_BOOTSTRAP_SERVERS": args.bootstrap_servers, "LORABUS_MODEL": str(model),
               "LORABUS_GROUP_ID": f"fleet-{tag}", "LORABUS_JOBS_TOPIC": f"fleet-jobs-{tag}",
               "LORABUS_RESULTS_TOPIC": f"fleet-results-{tag}", "LORABUS_CONTROL_TOPIC": control,
               "LORABUS_DLQ_TOPIC": f"fleet-dlq-{tag}", "LORABUS_STATUS_TOPIC": f"fleet-status-{tag}",
               "LORABUS_TOPIC_PARTITIONS": str(args.partitions), "LORABUS_METRICS_PORT": str(port),
               "LORABUS_WORKER_ID": f"w{w}", "LORABUS_MAX_LORAS": str(args.max_loras),
               "LORABUS_MAX_CPU_LORAS": str(args.max_cpu_loras), "LORABUS_MAX_INFLIGHT": str(args.max_inflight),
               "LORABUS_KV_CACHE_MB": "64", "LORABUS_DEVICE": "cpu"}
        log = open(workdir / f"worker-{tag}-{w}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "lorabus.worker.cli", "worker"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        workers.append((proc, port))
    return workers


def stop_workers(workers) -> None:
    for proc, _ in workers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc, _ in workers:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def wait_ready(workers, partitions: int) -> None:
    """Every worker ready, and the group's assignment covering every partition once (no rebalance pending)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(proc.poll() is not None for proc, _ in workers):
            raise RuntimeError("a worker exited during start-up (see its log in the work directory)")
        owned = []
        for _, port in workers:
            status, body = _get(port, "/readyz")
            if status != 200:
                break
            detail = json.loads(body)["checks"]["consuming"]["detail"]
            if detail.startswith("consuming "):
                owned += detail.removeprefix("consuming ").split(", ")
        else:
            if len(owned) == partitions == len(set(owned)):
                return
        time.sleep(0.5)
    raise TimeoutError("the workers did not become ready")


def scrape(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    _, text = _get(port, "/metrics")
    values: dict = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in METRICS:
                values[sample.name] += sample.value
            elif sample.name == COLD:
                values[(COLD, float(sample.labels["le"]))] += sample.value
    return values


def bucket_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket the rank falls in."""
    edges = sorted(buckets)
    total = buckets[edges[-1]] if edges else 0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for edge in edges:
        if buckets[edge] >= rank:
            if edge == float("inf"):
                return lower
            return lower + (edge - lower) * (rank - below) / max(buckets[edge] - below, 1e-12)
        lower, below = edge, buckets[edge]
    return lower


# ---- one run ----------------------------------------------------------------------------------------


async def send_and_collect(bootstrap: str, jobs_topic: str, results_topic: str, jobs: list[dict], keys: list[bytes],
                           timeout_s: float) -> tuple[dict[str, float], dict[str, float], int, float]:
    """Send every job at once; (send time by id, result time by id, tokens generated, first send time)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from lorabus.schemas import decode_result
    from lorabus.worker.client import topic_partitions

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await consumer.start()
    await producer.start()
    sent, answered, tokens, errors = {}, {}, 0, 0
    try:
        parts = await topic_partitions(bootstrap, results_topic)
        consumer.assign(parts)
        await consumer.seek_to_end(*parts)
        for tp in parts:
            await consumer.position(tp)
        first = time.monotonic()
        for job, key in zip(jobs, keys):
            sent[job["id"]] = time.monotonic()
            await producer.send(jobs_topic, json.dumps(job).encode(), key=key)
        await producer.flush()
        deadline = time.monotonic() + timeout_s
        while len(answered) < len(jobs) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                now = time.monotonic()
                for record in records:
                    result = decode_result(record.value)
                    if result.id in sent and result.id not in answered:
                        answered[result.id] = now
                        tokens += result.usage.completion_tokens
                        errors += result.status != "ok"
    finally:
        await producer.stop()
        await consumer.stop()
    if errors:
        raise RuntimeError(f"{errors} jobs answered with an error")
    return sent, answered, tokens, first


def run_once(args, model: Path, control: str, jobs: list[dict], keying: str, workdir: Path) -> dict:
    from lorabus.worker.affinity import AffinityKeyer, job_key
    from lorabus.worker.config import WorkerConfig
    from lorabus.worker.topics import ensure_worker_topics

    tag = uuid.uuid4().hex[:8]
    config = WorkerConfig(bootstrap_servers=args.bootstrap_servers, jobs_topic=f"fleet-jobs-{tag}",
                          results_topic=f"fleet-results-{tag}", control_topic=control, dlq_topic=f"fleet-dlq-{tag}",
                          status_topic=f"fleet-status-{tag}", topic_partitions=args.partitions)
    asyncio.run(ensure_worker_topics(config))
    keyer = AffinityKeyer(args.partitions) if keying == "affinity" else None
    keys = [job_key(job, keyer) for job in jobs]
    workers = start_workers(args, model, control, tag, workdir)
    try:
        wait_ready(workers, args.partitions)
        before = [scrape(port) for _, port in workers]
        sent, answered, tokens, first = asyncio.run(send_and_collect(
            args.bootstrap_servers, config.jobs_topic, config.results_topic, jobs, keys, args.timeout))
        after = [scrape(port) for _, port in workers]
    finally:
        stop_workers(workers)
    if len(answered) < len(jobs):
        raise TimeoutError(f"{keying}: {len(jobs) - len(answered)} of {len(jobs)} jobs unanswered")
    loads = [a["lorabus_adapter_load_seconds_count"] - b["lorabus_adapter_load_seconds_count"]
             for a, b in zip(after, before)]
    cold: dict[float, float] = defaultdict(float)
    for a, b in zip(after, before):
        for key in a:
            if isinstance(key, tuple):
                cold[key[1]] += a[key] - b.get(key, 0.0)
    elapsed = max(answered.values()) - first
    latencies = sorted(answered[i] - sent[i] for i in answered)
    return {"keying": keying, "loads_per_worker": loads, "loads_mean": statistics.fmean(loads),
            "cold_p99_s": bucket_quantile(cold, 0.99), "jobs_per_s": len(jobs) / elapsed,
            "tokens_per_s": tokens / elapsed, "p99_latency_s": latencies[int(0.99 * (len(latencies) - 1))],
            "distinct_adapters": len({j["adapter"] for j in jobs})}


# ---- the report -------------------------------------------------------------------------------------

ROWS = [("adapter loads / worker", "loads_mean", "{:.0f}"), ("cold-start p99 (s)", "cold_p99_s", "{:.3f}"),
        ("throughput (jobs/s)", "jobs_per_s", "{:.1f}"), ("throughput (tok/s)", "tokens_per_s", "{:.0f}"),
        ("p99 latency (s)", "p99_latency_s", "{:.2f}")]


def _spread(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}..{fmt.format(max(values))}]"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def report(args, runs: list[dict], command: str) -> str:
    by = {k: [r for r in runs if r["keying"] == k] for k in ("id", "affinity")}
    lines = [
        f"## Fleet: adapter affinity ({datetime.date.today().isoformat()})", "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, "
        f"torch threads per worker: {args.threads}; {args.workers} worker processes in one group, "
        f"{args.partitions} partitions, {args.adapters} adapters (Zipf s={args.zipf}), --max-loras {args.max_loras}, "
        f"--max-cpu-loras {args.max_cpu_loras}, --max-inflight {args.max_inflight}, {args.jobs} jobs per run "
        f"({PROMPT_TOKENS}-token prompts, {args.max_new_tokens} new tokens), {args.repeats} repeats.", "",
        f"Command: `{command}`", "",
        "| per run | keys by job id | affinity keys | affinity / id |", "|---|---|---|---|",
    ]
    for label, field, fmt in ROWS:
        ratios = [a[field] / i[field] for i, a in zip(by["id"], by["affinity"]) if a[field] and i[field]]
        lines.append(f"| {label} | {_spread([r[field] for r in by['id']], fmt)} | "
                     f"{_spread([r[field] for r in by['affinity']], fmt)} | {_spread(ratios, '{:.2f}')} |")
    per_worker = "; ".join(f"{r['keying']}: {', '.join(f'{x:.0f}' for x in r['loads_per_worker'])}" for r in runs)
    lines += ["", f"Loads per worker, run by run: {per_worker}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    command = ".venv/bin/python benchmarks/fleet.py " + " ".join(argv if argv is not None else sys.argv[1:])
    broker = None
    with tempfile.TemporaryDirectory(prefix="lorabus-fleet-") as tmp:
        workdir = Path(tmp)
        if not args.bootstrap_servers:
            port = free_port()
            broker = workdir / "kafka"
            out = subprocess.run([sys.executable, str(ROOT / "deploy" / "local-kafka"), "start", "--port", str(port),
                                  "--data", str(broker)], check=True, capture_output=True, text=True)
            args.bootstrap_servers = out.stdout.strip().splitlines()[-1]
        try:
            from lorabus.schemas import AdapterPublish
            from lorabus.worker.client import publish_control
            from lorabus.worker.config import WorkerConfig
            from lorabus.worker.topics import ensure_worker_topics

            print(f"building the model and {args.adapters} adapters in {workdir}", file=sys.stderr)
            model, paths = build_assets(workdir, args.adapters)
            tag = uuid.uuid4().hex[:8]
            control = f"fleet-control-{tag}"
            asyncio.run(ensure_worker_topics(WorkerConfig(  # the control topic compacted, as workers make it
                bootstrap_servers=args.bootstrap_servers, control_topic=control, jobs_topic=f"fleet-jobs-{tag}",
                results_topic=f"fleet-results-{tag}", dlq_topic=f"fleet-dlq-{tag}",
                status_topic=f"fleet-status-{tag}")))
            asyncio.run(publish_control(args.bootstrap_servers, control,
                                        [AdapterPublish(p.name, "v1", str(p)) for p in paths]))
            runs = []
            for repeat in range(args.repeats):
                jobs = zipf_stream(args.jobs, args.adapters, args.zipf, args.max_new_tokens, seed=repeat)
                order = ("id", "affinity") if repeat % 2 == 0 else ("affinity", "id")
                for keying in order:
                    run = run_once(args, model, control, jobs, keying, workdir)
                    runs.append(run)
                    print(json.dumps(run), file=sys.stderr, flush=True)
            text = report(args, runs, command)
            print(text)
            if args.write:
                with open(args.write, "a") as f:
                    f.write("\n" + text)
            if args.json:
                Path(args.json).write_text(json.dumps(runs, indent=2))
        finally:
            if broker is not None:
                subprocess.run([sys.executable, str(ROOT / "deploy" / "local-kafka"), "stop", "--data", str(broker)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
