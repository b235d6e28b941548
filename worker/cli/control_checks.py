"""A control event checked without Kafka: what is wrong with it before it is sent (`check_schema`, the
workers' schema rules; `validate_event`, against the control log's state and the adapter a publish names,
a local directory or an `s3://bucket/prefix/` in the object store), and what a worker's status says about
it after (`event_outcome`). Used by the control commands (control.py); functions of a `ControlLog`
(worker/control_log.py), `WorkerStatus` records and, for a publish, the adapter's files."""

from __future__ import annotations

import hashlib
import os
from typing import Literal

import msgspec
from botocore.exceptions import BotoCoreError, ClientError

from lorabus.scheduler.adapters import file_sha256
from lorabus.schemas import (AdapterActivate, AdapterPublish, AdapterRetire, AdapterWarm, ControlEvent, RouteDelete,
                             RouteSet, WorkerStatus)
from lorabus.worker.adapter_paths import ADAPTER_FILES, AdapterPathError, is_store_path, local_path
from lorabus.worker.adapter_store import (WEIGHTS_FILE, StoreError, StoreSettings, _store_error, make_client,
                                          parse_s3_uri)
from lorabus.worker.control_log import ControlLog

Outcome = Literal["pending", "ok"] | tuple[Literal["failed"], str]


# ---- before sending -------------------------------------------------------------------------------

def check_schema(event: ControlEvent) -> ControlEvent:
    """The event as a worker will decode it: the same strict rules (patterns, bounds, route weights).
    Raises ValueError with a one-line message."""
    try:
        return msgspec.json.decode(msgspec.json.encode(event), type=type(event))
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
        raise ValueError(" ".join(str(exc).split())) from None


def validate_event(event: ControlEvent, log: ControlLog, *, force: bool = False,
                   store: StoreSettings = StoreSettings()) -> list[str]:
    """What is wrong with sending `event` onto a control log in state `log` (empty: nothing).

    Checks the state (versions named must be published, a route to delete must exist) and, for a
    publish, the adapter's files: in the local directory, or in the object store reached with `store`
    for an s3:// path. `force` allows retiring the version the log activates or a name's only live version."""
    match event:
        case AdapterPublish():
            return _publish_problems(event, store)
        case AdapterActivate() | AdapterWarm():
            return _unpublished(log, event.name, event.version)
        case AdapterRetire(name=name, version=version):
            problems = _unpublished(log, name, version)
            if problems or force:
                return problems
            if log.activated(name) == version:
                return [f"{name}@{version} is the version the control log activates for {name}: "
                        f"activate another version first (or --force)"]
            if log.candidates(name) == [version]:
                return [f"{name}@{version} is the only live version of {name}: publish and activate another "
                        f"first (or --force)"]
            return []
        case RouteSet():
            problems = []
            for target in event.targets:
                role = "route target " if target.mix is None else f"member of route target {target.label()}: "
                for ref in target.versions():
                    name, _, version = ref.partition("@")
                    problems += _unpublished(log, name, version, role=role)
            return problems
        case RouteDelete(task=task, tenant=tenant):
            if log.routes(task, tenant):
                return []
            others = [route_label(t, tn) for t, tn in log.route_keys() if t == task]
            have = f"; routes of task {task}: {', '.join(others)}" if others else ""
            return [f"there is no route for {route_label(task, tenant)} to delete{have}"]
    return [f"not a control event: {type(event).__name__}"]


def _unpublished(log: ControlLog, name: str, version: str, role: str = "") -> list[str]:
    if log.published(name, version) is not None:
        return []
    live = log.candidates(name)
    have = f"published versions of {name}: {', '.join(live)}" if live else f"{name} has no published version"
    return [f"{role}{name}@{version} is not published ({have})"]


def route_label(task: str, tenant: str | None) -> str:
    return f"task {task} (" + ("every tenant" if tenant is None else f"tenant {tenant}") + ")"


def _publish_problems(event: AdapterPublish, store: StoreSettings) -> list[str]:
    if is_store_path(event.path):
        return _store_publish_problems(event, store)
    try:
        directory = local_path(event.path)
    except AdapterPathError as exc:
        return [str(exc)]
    if not os.path.isabs(directory):
        return [f"adapter path {event.path} is not absolute (workers do not share this working directory)"]
    if not os.path.isdir(directory):
        return [f"adapter path {event.path}: no such directory"]
    problems = [f"adapter path {event.path} has no {name}" for name in ADAPTER_FILES
                if not os.path.isfile(os.path.join(directory, name))]
    weights = os.path.join(directory, ADAPTER_FILES[1])
    if not problems and event.sha256 is not None:
        actual = file_sha256(weights)
        if actual != event.sha256.lower():
            problems.append(f"sha256 {event.sha256} does not match {weights} (its sha256 is {actual})")
    return problems


def _store_publish_problems(event: AdapterPublish, store: StoreSettings) -> list[str]:
    """The prefix as a worker's disk tier will fetch it (worker/adapter_store.py): both files listed directly
    under it, and with a sha256 the weights' bytes hashing to it (downloaded here, as each worker will).
    Every store failure (no bucket, access denied, no credentials, no answer) is one line."""
    try:
        bucket, prefix = parse_s3_uri(event.path)
    except StoreError as exc:
        return [f"adapter path {exc.reason}"]
    try:
        client = make_client(store)
    except ValueError as exc:  # an endpoint that is not a URL
        return [f"--s3-endpoint-url {store.endpoint_url!r}: {exc}"]
    weights, what = f"s3://{bucket}/{prefix}{WEIGHTS_FILE}", event.path
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        keys = {obj["Key"] for page in pages for obj in page.get("Contents", [])}
        problems = [f"adapter path {event.path} has no {name}" for name in ADAPTER_FILES if prefix + name not in keys]
        if problems or event.sha256 is None:
            return problems
        what, digest = weights, hashlib.sha256()
        for chunk in client.get_object(Bucket=bucket, Key=prefix + WEIGHTS_FILE)["Body"].iter_chunks(1 << 20):
            digest.update(chunk)
    except (ClientError, BotoCoreError, ConnectionError, TimeoutError) as exc:
        error = _store_error(exc, what)
        # Credentials are boto3's, not ours: say where they come from, never what they are.
        hint = " (credentials: boto3's chain, e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
        return [f"adapter path {error.reason}" + (hint if error.kind == "denied" else "")]
    if digest.hexdigest() != event.sha256.lower():
        return [f"sha256 {event.sha256} does not match {weights} (its sha256 is {digest.hexdigest()})"]
    return []


# ---- after sending --------------------------------------------------------------------------------

def _version_state(status: WorkerStatus, ref: str):
    return next((v for v in status.versions if v.adapter == ref), None)


def event_outcome(event: ControlEvent, offset: int, status: WorkerStatus) -> Outcome:
    """What `status` says about `event`, sent at control offset `offset`, on that worker:
    "pending" (not read yet, or still loading), "ok", or ("failed", reason)."""
    if status.control_offset <= offset:
        return "pending"
    match event:
        case AdapterPublish(name=name, version=version):
            state = _version_state(status, f"{name}@{version}")
            if state is not None and state.state == "failed":
                return "failed", state.reason or "failed to load"
            return "pending" if state is not None and state.state == "loading" else "ok"
        case AdapterActivate(name=name, version=version):
            state = _version_state(status, f"{name}@{version}")
            if state is not None and state.state == "failed":
                return "failed", state.reason or "failed to load"
            if status.serving.get(name) == version and (state is None or state.state != "loading"):
                return "ok"
            return "pending"
        case AdapterWarm(name=name, version=version):
            state = _version_state(status, f"{name}@{version}")
            if state is None or state.state == "loading":
                return "pending"
            return "ok" if state.state == "ready" else ("failed", state.reason or "failed to load")
        case RouteSet():
            route = next((r for r in status.routes if (r.task, r.tenant) == (event.task, event.tenant)), None)
            if route is not None and event.event_id is not None and route.event_id == event.event_id:
                return "ok"
            refs = dict.fromkeys(ref for t in event.targets for ref in t.versions())  # a mix: every member
            failed = [(ref, s.reason) for ref in refs
                      if (s := _version_state(status, ref)) is not None and s.state == "failed"]
            if failed:
                return "failed", "; ".join(f"{ref}: {reason or 'failed to load'}" for ref, reason in failed)
            return "pending"
    return "ok"  # adapter.retire, route.delete: applied once read
