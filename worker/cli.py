"""The `lorabus` command: `worker`, `produce`, `publish`, `activate`, `demo`.

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
    if not config.model:
        print("lorabus worker: --model (or LORABUS_MODEL) is required", file=sys.stderr)
        return 2
    from lorabus.worker.signing import ControlKeyError

    try:
        asyncio.run(_serve(config))
    except ControlKeyError as exc:
        print(f"lorabus worker: --control-key: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_produce(args) -> int:
    from lorabus.worker.client import run_jobs

    source = open(args.file) if args.file != "-" else sys.stdin
    jobs = []
    for line in source:
        if line.strip():
            job_id = json.loads(line).get("id", f"line-{len(jobs)}")
            jobs.append((str(job_id), line.strip().encode()))
    results = asyncio.run(run_jobs(args.bootstrap_servers, args.jobs_topic, args.results_topic, jobs, args.timeout,
                           on_result=lambda r: print(json.dumps(_plain(r)), flush=True)))
    missing = [job_id for job_id, _ in jobs if job_id not in results]
    if missing:
        print(f"no result within {args.timeout}s for {len(missing)} jobs: {missing[:10]}", file=sys.stderr)
        return 1
    return 0


def _send_control(args, event) -> int:
    """Send one control event, signed when a control key is given; a bad key spec is a one-line error."""
    from lorabus.worker.client import publish_control
    from lorabus.worker.signing import ControlKeyError, ControlKeys

    signer = None
    if args.control_key:
        try:
            signer = ControlKeys.load(args.control_key).sign
        except ControlKeyError as exc:
            print(f"lorabus {args.command}: {exc}", file=sys.stderr)
            return 2
    if event.event_id is None:  # every event the CLI sends can be traced in results and logs
        event = msgspec.structs.replace(event, event_id=uuid.uuid4().hex, ts_ms=int(time.time() * 1000))
    asyncio.run(publish_control(args.bootstrap_servers, args.control_topic, [event], signer=signer))
    print(f"sent {event.__struct_config__.tag} {event.event_id}")
    return 0


def cmd_publish(args) -> int:
    from lorabus.schemas import AdapterPublish

    tenants = args.tenants.split(",") if args.tenants else None
    return _send_control(args, AdapterPublish(args.name, args.version, os.path.abspath(args.path), args.sha256, tenants))


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
    try:  # the same strict checks a worker applies, before anything is sent
        event = msgspec.json.decode(msgspec.json.encode(RouteSet(task=args.task, targets=targets, tenant=args.tenant,
                                                                 sticky=args.sticky)), type=RouteSet)
    except (msgspec.ValidationError, ValueError) as exc:
        print(f"lorabus rollout route: {exc}", file=sys.stderr)
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


def cmd_demo(args) -> int:
    from lorabus.worker.demo import main as demo_main

    return demo_main(args)


def _plain(result) -> dict:
    import msgspec

    return msgspec.to_builtins(result)


def _client_flags(parser: argparse.ArgumentParser, *topics: str) -> None:
    defaults = WorkerConfig()
    parser.add_argument("--bootstrap-servers", default=os.environ.get("LORABUS_BOOTSTRAP_SERVERS", defaults.bootstrap_servers))
    for topic in topics:
        env = "LORABUS_" + topic.upper()
        parser.add_argument("--" + topic.replace("_", "-"), default=os.environ.get(env, getattr(defaults, topic)))


def _control_command(subparsers, name: str, text: str, func) -> argparse.ArgumentParser:
    """A command that sends one control event: broker, control topic and signing key flags included."""
    parser = subparsers.add_parser(name, help=text)
    _client_flags(parser, "control_topic")
    parser.add_argument("--control-key", default=os.environ.get("LORABUS_CONTROL_KEY", ""),
                        help="sign with the first key of this file (or env:NAME) of 'keyid:secret' lines [env LORABUS_CONTROL_KEY]")
    parser.set_defaults(func=func)
    return parser


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

    publish = _control_command(sub, "publish", "publish an adapter version on the control topic", cmd_publish)
    publish.add_argument("name")
    publish.add_argument("version")
    publish.add_argument("path")
    publish.add_argument("--sha256")
    publish.add_argument("--tenants", help="comma-separated tenants allowed (default: all)")

    rollout = sub.add_parser("rollout", help="route a task's traffic across adapter versions").add_subparsers(
        dest="rollout", required=True)
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
        (sub, "activate", "make a published version the active one (hot swap, rollback)", cmd_activate),
        (rollout, "retire", "adapter.retire: new jobs naming the version get adapter_not_found", cmd_retire),
        (rollout, "warm", "adapter.warm: load the version and run one dummy step, no traffic", cmd_warm),
    ):
        command = _control_command(parent, verb, text, func)
        command.add_argument("name")
        command.add_argument("version")

    demo = sub.add_parser("demo", help="the embedded default: local broker, tiny model, three adapters, sample jobs")
    demo.add_argument("--workdir", default=os.environ.get("LORABUS_DEMO_DIR", ".lorabus/demo"))
    demo.add_argument("--jobs", type=int, default=12)
    demo.add_argument("--metrics-port", type=int, default=9400)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
