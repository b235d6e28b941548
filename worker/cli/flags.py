"""The `lorabus` commands' flags, built once from the typed config: every `WorkerConfig` / `EngineConfig` /
`KafkaSecurity` field is a flag and a `LORABUS_<FLAG>` environment variable (flags win over the
environment), and the parsed flags become those dataclasses again. Also the flags every Kafka client
command shares (broker, topics, status size limit, control key), the workers' object-store flags a publish
check needs, and `UsageError`."""

from __future__ import annotations

import argparse
import dataclasses
import os

from lorabus.scheduler import EngineConfig
from lorabus.worker.adapter_store import StoreSettings
from lorabus.worker.config import WorkerConfig
from lorabus.worker.kafka_security import KafkaSecurity
from lorabus.worker.store_fetches import store_settings


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


def _signed_control(args):
    """The fleet's signing rule from --control-key and --control-max-skew-ms (None without a key), so the
    CLI folds the control log as the workers do; ControlKeyError when the key spec is bad."""
    from lorabus.worker.control_log import SignedControl
    from lorabus.worker.signing import ControlKeys

    if not args.control_key:
        return None
    return SignedControl(ControlKeys.load(args.control_key), args.control_max_skew_ms)


def _prog(args) -> str:
    """The command as its messages name it: `lorabus activate`, `lorabus rollout activate`."""
    rollout = getattr(args, "rollout", None)
    return f"lorabus {args.command}" + (f" {rollout}" if args.command == "rollout" and rollout else "")


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


# The workers' object-store settings (WorkerConfig.s3_*: the same flags, variables and defaults), so `publish`
# checks an s3:// path where and as the workers will fetch it. Credentials are no flags: boto3's chain.
STORE_FIELDS = ("s3_endpoint_url", "s3_region", "s3_addressing_style", "s3_ca_bundle")
ADDRESSING_STYLES = ("auto", "path", "virtual")


def _store_flags(parser: argparse.ArgumentParser) -> None:
    _add_config_flags(parser, WorkerConfig, skip=[f.name for f in dataclasses.fields(WorkerConfig)
                                                  if f.name not in STORE_FIELDS])


def _store_settings(args) -> StoreSettings:
    """The store settings of --s3-* (an empty value: boto3's own resolution); UsageError when unusable."""
    if args.s3_addressing_style not in ADDRESSING_STYLES:
        raise UsageError(f"--s3-addressing-style {args.s3_addressing_style!r} (or LORABUS_S3_ADDRESSING_STYLE): "
                         f"use {', '.join(ADDRESSING_STYLES)}")
    return store_settings(WorkerConfig(**{name: getattr(args, name) for name in STORE_FIELDS}))
