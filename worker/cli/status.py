"""`lorabus status`: read the control log and the workers' statuses and print the fleet, as text
(`fleet_view.render_status`) or JSON (`fleet_view.fleet_json`)."""

from __future__ import annotations

import asyncio
import json
import sys

from lorabus.worker.cli import broker
from lorabus.worker.cli.broker import _kafka_errors, _why
from lorabus.worker.cli.flags import _client_flags, _control_key_flags, _security_from, _signed_control, \
    _status_read_flags


def cmd_status(args) -> int:
    from lorabus.worker.cli.fleet_view import fleet_json, render_status
    from lorabus.worker.client import read_control_log, read_statuses, status_topic_warnings
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
    for warning in warnings:  # a topic made before the status plane was hardened (docs/trust.md)
        print(f"lorabus status: warning: status topic {args.status_topic}: {warning}", file=sys.stderr)
    now = broker._now_ms()
    if args.json:
        view = fleet_json(log, statuses, now)
        print(json.dumps({"control_topic": args.control_topic, "status_topic": args.status_topic, **view}, indent=2))
    else:
        print(f"control topic {args.control_topic}, status topic {args.status_topic}")
        print(render_status(log, statuses, now))
    return 0


def add_status_command(sub) -> None:
    status = sub.add_parser("status", help="the fleet: each worker's state, versions, routes and control-log progress")
    _client_flags(status, "control_topic", "status_topic")
    _status_read_flags(status)
    _control_key_flags(status, "the workers' key file (or env:NAME): fold only the control records they apply, "
                               "and list the ones they ignore apart")
    status.add_argument("--json", action="store_true", help="print the statuses and the control log's state as JSON")
    status.set_defaults(func=cmd_status)
