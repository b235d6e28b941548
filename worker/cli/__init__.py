"""The `lorabus` command: `worker`, `produce`, `publish`, `activate`, `rollout ...`, `status`, `demo`, `model`.

One module per command group: serve.py (worker, demo, model fetch), produce.py, control.py (the control
events, `rollout ...` and the `publish` / `activate` shortcuts, with --wait), status.py; their flags come
from flags.py (every worker flag generated from `WorkerConfig` / `EngineConfig`, also settable as an
environment variable `LORABUS_<FLAG>`; flags win over the environment). What `status` and --wait show
is fleet_view.py; what a control event is checked against, control_checks.py."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lorabus.worker import package_version
from lorabus.worker.cli import control, produce, serve, status
from lorabus.worker.cli.broker import _CONNECT_FAILURES
from lorabus.worker.cli.flags import _prog, _security_from
from lorabus.worker.kafka_security import KafkaSecurityError, client_options


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
    serve.add_worker_command(sub)
    produce.add_produce_command(sub)
    control.add_control_command(sub, "publish")  # = `lorabus rollout publish`
    status.add_status_command(sub)
    control.add_rollout_command(sub)
    control.add_control_command(sub, "activate")  # = `lorabus rollout activate`
    serve.add_demo_command(sub)
    serve.add_model_command(sub)
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
