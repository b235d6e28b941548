"""Test helpers: PEFT-made adapters and the PEFT reference, Kafka topic plumbing, an in-process worker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import torch

from lorabus.scheduler import EngineConfig
from lorabus.worker.config import WorkerConfig


def make_peft_adapter(model_dir: Path, out_dir: Path, seed: int, scale: float = 3.0, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter with non-zero B (init_lora_weights=False), scaled up so it visibly changes outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora_kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(scale)
    model.save_pretrained(out_dir)
    return out_dir


class PeftOracle:
    """Hugging Face PEFT running one adapter alone: the reference every lorabus output must match."""

    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer

        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._models = {}

    def model(self, adapter_dir: Path | None):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if adapter_dir not in self._models:
            model = AutoModelForCausalLM.from_pretrained(self.model_dir)
            if adapter_dir is not None:
                model = PeftModel.from_pretrained(model, adapter_dir)
            self._models[adapter_dir] = model.eval()
        return self._models[adapter_dir]

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    @torch.no_grad()
    def greedy(self, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        model = self.model(adapter_dir)
        ids = torch.tensor([prompt_ids])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        return out[0, len(prompt_ids):].tolist()

    @torch.no_grad()
    def top2_margin(self, adapter_dir: Path | None, ids: list[int]) -> float:
        logits = self.model(adapter_dir)(torch.tensor([ids])).logits[0, -1]
        top = torch.topk(logits.double(), 2).values
        return float(top[0] - top[1])

    def assert_matches(self, adapter_dir: Path | None, prompt_ids: list[int], got: list[int], max_new_tokens: int,
                       label: str = "") -> None:
        """Greedy tokens must equal PEFT's; a divergence is tolerated only at an exact near-tie (margin < 1e-4)."""
        want = self.greedy(adapter_dir, prompt_ids, max_new_tokens)
        if got == want:
            return
        split = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        margin = self.top2_margin(adapter_dir, prompt_ids + want[:split])
        assert margin < 1e-4, f"{label}: tokens diverge from PEFT at {split}: got {got}, PEFT {want} (margin {margin:.3g})"
        print(f"{label}: accepted divergence at token {split}: PEFT's top-2 logit margin there is {margin:.2e} < 1e-4")

    def greedy_requests(self, adapters: dict, prompts: list[str], max_new_tokens: int, count: int | None = None,
                        prefix: str = "r") -> list:
        """`count` (default: one per prompt) greedy engine requests `{prefix}{i}`, cycling over the base model
        and every adapter of `adapters` (name → directory) and over the prompts."""
        from lorabus.scheduler import Request, SamplingParams

        names = [None, *adapters]
        return [Request(f"{prefix}{i}", "t", names[i % len(names)], prompt_ids=self.prompt_ids(prompts[i % len(prompts)]),
                        params=SamplingParams(max_new_tokens))
                for i in range(len(prompts) if count is None else count)]

    def assert_answers(self, adapters: dict, requests, results: dict) -> None:
        """The PEFT-parity check of engine answers: each request's answer (`results` by request id) is ok and
        carries PEFT's greedy tokens for its adapter (`adapters`: name → directory; None is the base model)."""
        for request in requests:
            answer = results[request.id]
            assert answer.status == "ok", answer
            self.assert_matches(adapters.get(request.adapter), request.prompt_ids, answer.token_ids,
                                request.params.max_new_tokens, request.id)


# Shared by the mix tests through the broker (plain mixes and routes to mixes).
MIX_MAX_RANK = 32
MIX_PROMPTS = ["the quick brown fox", "hello world", "summarize: the meeting moved to thursday",
               "classify sentiment: i loved this film"]


class MixOracle(PeftOracle):
    """PEFT with every adapter loaded in one model: a mix is `add_weighted_adapter(..., "cat")` of them."""

    def __init__(self, model_dir, paths: dict[str, object]):
        super().__init__(model_dir)
        self.paths, self._mixes = paths, {}

    def model(self, which):
        if not isinstance(which, tuple):  # a plain adapter (a path) or the base model (None)
            return super().model(which)
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if "all" not in self._models:
            names = list(self.paths)
            # A model of its own: PEFT injects its layers into the model it wraps.
            base = AutoModelForCausalLM.from_pretrained(self.model_dir)
            peft = PeftModel.from_pretrained(base, self.paths[names[0]], adapter_name=names[0])
            for name in names[1:]:
                peft.load_adapter(self.paths[name], adapter_name=name)
            self._models["all"] = peft.eval()
        peft = self._models["all"]
        if which not in self._mixes:
            # PEFT gives the mix the first member's use_rslora (scale sqrt(Σr) instead of 1): lead with one without.
            ordered = sorted(which, key=lambda member: peft.peft_config[member[0]].use_rslora)
            self._mixes[which] = f"mix{len(self._mixes)}"
            peft.add_weighted_adapter([n for n, _ in ordered], [w for _, w in ordered], self._mixes[which],
                                      combination_type="cat")
        peft.set_adapter(self._mixes[which])
        return peft


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def worker_config(kafka: str, model_dir: Path, **overrides) -> WorkerConfig:
    """A worker on fresh topics and a fresh group, so tests never see each other's records."""
    tag = uuid.uuid4().hex[:8]
    engine = overrides.pop("engine", EngineConfig(kv_cache_mb=64))
    base = WorkerConfig(bootstrap_servers=kafka, model=str(model_dir), group_id=f"g-{tag}", jobs_topic=f"jobs-{tag}",
                        results_topic=f"results-{tag}", control_topic=f"control-{tag}", dlq_topic=f"dlq-{tag}",
                        status_topic=f"status-{tag}", metrics_port=-1, commit_interval_ms=100, engine=engine)
    return dataclasses.replace(base, **overrides)


@contextlib.asynccontextmanager
async def running_worker(config: WorkerConfig):
    """A Worker in this event loop; stopped gracefully (and checked to exit cleanly) on the way out."""
    from lorabus.worker.service import Worker
    from lorabus.worker.topics import ensure_worker_topics

    await ensure_worker_topics(config)
    worker = Worker(config)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)


async def committed_lag(bootstrap: str, group: str, topic: str) -> int:
    """Records of `topic` past the group's committed offsets (0 = everything committed)."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient

    from lorabus.worker.client import topic_partitions

    parts = await topic_partitions(bootstrap, topic)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group, partitions=parts)
        ends = await consumer.end_offsets(parts)
        return sum(ends[tp] - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0)
                   for tp in parts)
    finally:
        await consumer.stop()
        await admin.close()


class RawHeaderKey(str):
    """A header key that encodes to arbitrary bytes, so a test can send what a careless producer can."""

    def __new__(cls, raw: bytes):
        key = super().__new__(cls, raw.decode("latin-1"))
        key.raw = raw
        return key

    def encode(self, *args, **kwargs) -> bytes:
        return self.raw


@contextlib.contextmanager
def raw_header_keys():
    """`RawHeaderKey`, for a block of sends with header keys that are not UTF-8. Only aiokafka's Python
    batch builder honours it (the C builder encodes keys itself): `aiokafka_compat.use_python_record_builder`,
    which tests/conftest.py calls once for the whole session, before any producer exists."""
    from lorabus.worker.aiokafka_compat import use_python_record_builder

    use_python_record_builder()  # idempotent; conftest has done it already
    yield RawHeaderKey


def start_worker_process(kafka: str, model_dir: Path, topics: dict[str, str], group: str, log_path: Path, **env):
    """`lorabus worker` as a subprocess on the given topics (jobs, results, control, dlq); extra settings as
    LORABUS_* variables, e.g. MAX_RUNNING="2"."""
    variables = {**os.environ, "LORABUS_BOOTSTRAP_SERVERS": kafka, "LORABUS_MODEL": str(model_dir),
                 "LORABUS_GROUP_ID": group, "LORABUS_JOBS_TOPIC": topics["jobs"],
                 "LORABUS_RESULTS_TOPIC": topics["results"], "LORABUS_CONTROL_TOPIC": topics["control"],
                 "LORABUS_DLQ_TOPIC": topics["dlq"], "LORABUS_METRICS_PORT": "-1", "LORABUS_KV_CACHE_MB": "64",
                 **{f"LORABUS_{name.upper()}": str(value) for name, value in env.items()}}
    return subprocess.Popen([sys.executable, "-m", "lorabus.worker.cli", "worker"], env=variables,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)


class PrivateBroker:
    """A broker of a test's own (deploy/local-kafka on its data dir): started on a free port, and
    restartable on that same port, so a test can take it away and bring it back."""

    SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "local-kafka"

    def __init__(self, data: Path):
        self.data, self.port, self.bootstrap = data, 0, None

    def start(self) -> float:
        """Start (or restart) it; returns the seconds it took to serve."""
        started = time.monotonic()
        out = subprocess.run([sys.executable, str(self.SCRIPT), "start", "--port", str(self.port), "--data",
                              str(self.data)], check=True, stdout=subprocess.PIPE, text=True, timeout=600)
        self.bootstrap = out.stdout.strip().splitlines()[-1]
        self.port = int(self.bootstrap.rsplit(":", 1)[1])
        return time.monotonic() - started

    def stop(self, check: bool = True) -> float:
        started = time.monotonic()
        subprocess.run([sys.executable, str(self.SCRIPT), "stop", "--data", str(self.data)], check=check,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=180)
        return time.monotonic() - started


@contextlib.contextmanager
def private_broker(data: Path, check_stop: bool = False):
    """A PrivateBroker on `data`, started here and stopped on the way out (`check_stop`: a failed stop fails)."""
    broker = PrivateBroker(data)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop(check=check_stop)


@contextlib.contextmanager
def broker_at(bootstrap: str | None, data: Path):
    """`bootstrap` when given (a broker someone else runs), else a private broker on `data`: how the benchmark
    scripts get their broker."""
    if bootstrap:
        yield bootstrap
        return
    with private_broker(data) as broker:
        yield broker.bootstrap


def record_logits(engine) -> dict:
    """Wrap the engine's model runner: every logits row it computes, keyed by (request id, output position)."""
    logits, run = {}, engine.runner.run

    def recording_run(batch):
        out = run(batch)
        for row, seq in enumerate(out.sequences):
            logits[(seq.request.id, len(seq.output_ids))] = out.logits[row].clone()
        return out

    engine.runner.run = recording_run
    return logits


def submit_all(engine, requests, timeout: float = 120):
    """Submit together (so they share steps) and wait until every one is answered exactly once."""
    done, results, lock = threading.Event(), {}, threading.Lock()

    def on_done(c):
        with lock:
            assert c.id not in results, f"{c.id} answered twice"
            results[c.id] = c
            if len(results) == len(requests):
                done.set()

    for request in requests:
        engine.submit(request, on_done)
    assert done.wait(timeout), f"only {len(results)}/{len(requests)} answered: {sorted(results)}"
    return results


async def read_topic(bootstrap: str, topic: str, timeout_s: float = 60, until=None, *, to_end: bool = False,
                     isolation_level: str = "read_uncommitted", **consumer_options) -> list:
    """Every record of `topic` (all its partitions) from the beginning, from a consumer of no group.

    It reads until `until(records)` holds, or with `to_end` until it has reached the end offsets as of the
    call (an AssertionError if that takes over `timeout_s`); with neither, for `timeout_s`. Exactly-once
    readers pass isolation_level="read_committed"; `consumer_options` go to AIOKafkaConsumer (fetch sizes)."""
    from aiokafka import AIOKafkaConsumer

    from lorabus.worker.client import topic_partitions

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                                isolation_level=isolation_level, **consumer_options)
    await consumer.start()
    try:
        parts = await topic_partitions(bootstrap, topic)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts) if to_end else {}
        records, deadline = [], time.monotonic() + timeout_s
        while True:
            if until is not None and until(records):
                return records
            if to_end and all([await consumer.position(tp) >= end for tp, end in ends.items()]):
                return records
            if time.monotonic() >= deadline:
                assert not to_end, f"{topic} not read to its end offsets {ends} within {timeout_s:g} s"
                return records
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    finally:
        await consumer.stop()


async def end_offset(bootstrap: str, topic: str) -> int:
    """The end offset of a one-partition topic (the control and status topics)."""
    from aiokafka import AIOKafkaConsumer

    from lorabus.worker.client import topic_partitions

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        (tp,) = await topic_partitions(bootstrap, topic)
        return (await consumer.end_offsets([tp]))[tp]
    finally:
        await consumer.stop()


async def publish_control_bulk(bootstrap: str, topic: str, events: list) -> None:
    """Send many control events fast (batched, not one round trip each), each under its canonical key, in
    order: what a large fleet's control log looks like to a worker that starts on it."""
    from aiokafka import AIOKafkaProducer

    from lorabus.schemas import encode
    from lorabus.worker.control_log import control_key

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=20,
                                max_batch_size=1 << 20)
    await producer.start()
    try:
        sent = [await producer.send(topic, encode(event), key=control_key(event).encode()) for event in events]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def record_offsets(kafka: str, topic: str) -> tuple[list[int], int]:
    """(offsets of the records read from the beginning up to the end offset, the end offset) of a
    one-partition topic. Compaction leaves gaps: read_topic's `to_end` goes by position, not a count."""
    end = await end_offset(kafka, topic)
    return [r.offset for r in await read_topic(kafka, topic, 30, to_end=True) if r.offset < end], end


async def until(condition, timeout_s: float) -> None:
    """Wait (polling) until `condition()` holds; fail the test past `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


class OracleJobs:
    """Jobs j1, j2, ... through the broker on one prompt, each checked against PEFT (ok) or for its error.
    `check_versions`: an ok result must also name the version its weights are checked against; `alive` is
    called after every batch (to fail fast on a dead worker)."""

    def __init__(self, kafka, config, oracle, dirs, prompt: str, max_new: int, timeout_s: float,
                 check_versions: bool = False, alive=lambda: None):
        self.kafka, self.config, self.oracle, self.dirs = kafka, config, oracle, dirs
        self.max_new, self.timeout_s, self.check_versions, self.alive = max_new, timeout_s, check_versions, alive
        self.ids = oracle.prompt_ids(prompt)
        self.count = 0

    async def run(self, refs: list[str | None]) -> list:
        """One job per ref ("name@version", "name", or None for the base model), sent together."""
        from lorabus.worker.client import run_jobs

        jobs = []
        for ref in refs:
            self.count += 1
            job = {"id": f"j{self.count}", "tenant": "acme", "prompt_ids": self.ids, "max_new_tokens": self.max_new}
            if ref is not None:
                job["adapter"] = ref
            jobs.append((job["id"], json.dumps(job).encode()))
        results = await run_jobs(self.kafka, self.config.jobs_topic, self.config.results_topic, jobs, self.timeout_s)
        self.alive()
        assert len(results) == len(jobs), f"unanswered: {sorted({i for i, _ in jobs} - results.keys())}"
        return [results[job_id][0] for job_id, _ in jobs]

    def check_ok(self, result, weights_of: str | None) -> None:
        """`result` is ok with PEFT's tokens for the weights `dirs[weights_of]` (None: the base model)."""
        assert result.status == "ok", result
        if self.check_versions:
            assert (f"{result.adapter}@{result.adapter_version}" if result.adapter else None) == weights_of, result
        self.oracle.assert_matches(self.dirs.get(weights_of), self.ids, result.token_ids, self.max_new, result.id)

    @staticmethod
    def check_failed(result, reason: str) -> None:
        assert (result.status, result.error.code) == ("error", "adapter_load_failed"), result
        assert reason in result.error.message, result.error.message

    async def served(self, ref: str | None, weights_of: str | None = None) -> None:
        (result,) = await self.run([ref])
        self.check_ok(result, weights_of or ref)

    async def failed(self, ref: str, reason: str) -> None:
        (result,) = await self.run([ref])
        self.check_failed(result, reason)


FAILING_SEED = 666  # the seed whose sampling `fail_sampling` makes raise


def fail_sampling(monkeypatch, seed: int = FAILING_SEED) -> None:
    """Make every sampler of a job with this seed raise when it draws a token (an engine failure after the
    forward pass that belongs to that job alone)."""
    from lorabus.scheduler.sampling import Sampler

    original = Sampler.select

    def select(self, logits, *args):
        if self.params.seed == seed:
            raise RuntimeError("injected sampling failure")
        return original(self, logits, *args)

    monkeypatch.setattr(Sampler, "select", select)
