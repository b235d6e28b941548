"""The control commands, `lorabus rollout publish|route|unroute|activate|retire|warm` (and the shortcuts
`lorabus publish` and `lorabus activate`): build one control event from the arguments, check it, sign
and send it, and with --wait follow it on the status topic until every live worker has an outcome."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import uuid

import msgspec

from lorabus.worker.cli import broker
from lorabus.worker.cli.broker import _kafka_errors, _why
from lorabus.worker.adapter_store import StoreSettings
from lorabus.worker.cli.flags import UsageError, _client_flags, _control_key_flags, _prog, _security_from, \
    _signed_control, _status_read_flags, _store_flags, _store_settings

WAIT_POLL_S = 0.5  # how often --wait reads the status topic


def _send_control(args, event, store: StoreSettings = StoreSettings()) -> int:
    """Send one control event: signed when a control key is given, checked first (the worker's schema
    rules always; unless --force the control log's state and a publish's adapter files, in the local
    directory or in the object store reached with `store`), then with
    --wait follow it on the status topic until every live worker has an outcome.
    Exit codes: 0 sent (and, with --wait, ok everywhere), 1 failed on a worker or a broker error,
    2 refused before sending, 3 --wait timed out, 4 --wait saw no live worker."""
    from lorabus.worker.cli.control_checks import check_schema, validate_event
    from lorabus.worker.client import publish_control, read_control_log
    from lorabus.worker.signing import ControlKeyError

    prog = _prog(args)
    try:
        signed = _signed_control(args)
    except ControlKeyError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    signer = signed.keys.sign if signed is not None else None
    if event.event_id is None:  # every event the CLI sends can be traced in results and logs
        event = msgspec.structs.replace(event, event_id=uuid.uuid4().hex, ts_ms=broker._now_ms())
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
        problems = validate_event(event, log, store=store)
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
    from lorabus.worker.cli.control_checks import event_outcome
    from lorabus.worker.cli.fleet_view import live_workers, terminal_text
    from lorabus.worker.client import read_statuses

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
                live = live_workers(statuses, broker._now_ms())
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
    try:
        store = _store_settings(args)
    except UsageError as exc:
        print(f"{_prog(args)}: {exc}", file=sys.stderr)
        return 2
    return _send_control(args, _publish_event(args), store)


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


# ---- the commands' arguments ----------------------------------------------------------------------

def _name_version_arguments(parser) -> None:
    parser.add_argument("name", help="adapter name")
    parser.add_argument("version", help="adapter version")


def _publish_arguments(parser) -> None:
    _name_version_arguments(parser)
    parser.add_argument("path", help="the adapter directory (or file:// URI) as the workers see it, or its prefix in "
                                     "the object store, s3://bucket/prefix/")
    parser.add_argument("--sha256", help="sha256 of adapter_model.safetensors, checked here and by every worker")
    parser.add_argument("--tenants", help="comma-separated tenants allowed (default: all)")
    _store_flags(parser)  # where an s3:// path is checked: the workers' store settings


def _route_arguments(parser) -> None:
    parser.add_argument("task", help="the task whose jobs (those without an adapter) are routed")
    parser.add_argument("targets", nargs="+", metavar="NAME@VERSION=WEIGHT",
                        help="versions (or mixes of versions, mix:A@V*W+B@V*W) and their integer weights, "
                             "e.g. ner@v1=95 ner@v2=5, or ner@v1=90 mix:ner@v2*0.7+legal@v1*0.3=10")
    parser.add_argument("--tenant", help="only this tenant's jobs (default: every tenant without its own route)")
    parser.add_argument("--sticky", choices=("user", "id"), default="user",
                        help="keep each job's user (or, with id, each job id) on one version (default user)")


def _unroute_arguments(parser) -> None:
    parser.add_argument("task", help="the task whose routes end")
    parser.add_argument("--tenant", help="only this tenant's route (default: the route for every tenant)")


# Each control command, defined once (`lorabus rollout ACTION`, in this order): its help, what it does
# and its own arguments. `lorabus publish` and `lorabus activate` are the same commands at the top level.
CONTROL_COMMANDS = {
    "publish": ("adapter.publish: publish an adapter version on the control topic", cmd_publish, _publish_arguments),
    "route": ("route.set: split TASK's jobs across versions by weight (sticky)", cmd_route, _route_arguments),
    "unroute": ("route.delete: TASK's jobs without an adapter get adapter_not_found", cmd_unroute,
                _unroute_arguments),
    "activate": ("adapter.activate: make a published version the active one (hot swap, rollback)", cmd_activate,
                 _name_version_arguments),
    "retire": ("adapter.retire: new jobs naming the version get adapter_not_found", cmd_retire,
               _name_version_arguments),
    "warm": ("adapter.warm: load the version and run one dummy step, no traffic", cmd_warm, _name_version_arguments),
}


def add_control_command(subparsers, name: str) -> None:
    """Control command `name` under `subparsers`: broker, topics, signing key, --force and --wait flags,
    then its own arguments."""
    text, func, arguments = CONTROL_COMMANDS[name]
    parser = subparsers.add_parser(name, help=text, description=text + ". Checked before sending (exit 2, nothing "
                                   "sent): the worker's schema rules, and unless --force the control log's state and "
                                   "a publish's adapter files (local directory or s3:// prefix).")
    _client_flags(parser, "control_topic", "status_topic")
    _status_read_flags(parser)
    _control_key_flags(parser, "sign with the first key of this file (or env:NAME) of 'keyid:secret' lines, and check "
                               "against the control log as workers with these keys read it")
    parser.add_argument("--force", action="store_true",
                        help="skip the checks against the control log and the adapter files (not the schema ones)")
    parser.add_argument("--wait", action="store_true",
                        help="follow the event on the status topic until every live worker has applied it; "
                             "exit 0 all ok, 1 a failure, 3 timeout, 4 no live worker")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds --wait waits (default 60)")
    parser.set_defaults(func=func)
    arguments(parser)


def add_rollout_command(sub) -> None:
    rollout = sub.add_parser("rollout", help="publish, activate, warm, retire and route adapter versions").add_subparsers(
        dest="rollout", required=True, metavar="ACTION", help="the control event to send")
    for name in CONTROL_COMMANDS:
        add_control_command(rollout, name)
