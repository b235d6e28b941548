"""`lorabus rollout publish NAME VERSION s3://bucket/prefix/` against a real S3-compatible store (S3Proxy, the
`s3` fixture) and a real broker (`kafka`): the CLI lists the prefix and, with --sha256, hashes the weights'
bytes before anything is sent; a missing file, a mismatch, a missing bucket, refused or absent credentials
and an unreachable store are each one line and exit 2, with nothing on the control topic. Credentials come
only from boto3's chain (the AWS_* variables here); the endpoint from --s3-endpoint-url or its variable."""

import asyncio
import hashlib
import socket
import uuid

import pytest

from helpers import end_offset
from lorabus.schemas import AdapterPublish
from lorabus.worker import cli
from lorabus.worker.adapter_store import StoreSettings
from lorabus.worker.cli.control_checks import validate_event
from lorabus.worker.client import read_control_log
from lorabus.worker.control_log import ControlLog
from lorabus.worker.topics import CONTROL_TOPIC_CONFIGS, ensure_topics

WEIGHTS = b"safetensors bytes of fin v2"
SHA256 = hashlib.sha256(WEIGHTS).hexdigest()
URI = "s3://adapters/fin/v2/"


@pytest.fixture
def store(s3, monkeypatch, tmp_path):
    """`s3` with fin/v2 (both files) and fin/v3 (no weights) uploaded, and boto3's chain holding its keys
    and nothing else (no config files, no instance metadata)."""
    client = s3.client()
    client.put_object(Bucket="adapters", Key="fin/v2/adapter_config.json", Body=b"{}")
    client.put_object(Bucket="adapters", Key="fin/v2/adapter_model.safetensors", Body=WEIGHTS)
    client.put_object(Bucket="adapters", Key="fin/v3/adapter_config.json", Body=b"{}")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "LORABUS_S3_ENDPOINT_URL", "LORABUS_S3_REGION", "LORABUS_S3_ADDRESSING_STYLE", "LORABUS_S3_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3


@pytest.fixture
def control(kafka) -> str:
    topic = f"control-{uuid.uuid4().hex[:8]}"
    asyncio.run(ensure_topics(kafka, {topic: 1}, {topic: CONTROL_TOPIC_CONFIGS}))
    return topic


def publish(kafka, control, *args) -> int:
    return cli.main(["rollout", "publish", "fin", *args, "--bootstrap-servers", kafka, "--control-topic", control])


def problems(store, path: str, sha256: str | None = None, **settings) -> list[str]:
    settings = {"endpoint_url": store.endpoint, "addressing_style": "path", **settings}
    return validate_event(AdapterPublish("fin", "v", path, sha256), ControlLog(), store=StoreSettings(**settings))


# ---- through the CLI, with the real broker -------------------------------------------------------------------

def test_publish_from_the_store_is_checked_then_sent(kafka, control, store, monkeypatch, capsys):
    monkeypatch.setenv("LORABUS_S3_ENDPOINT_URL", store.endpoint)  # the workers' variable
    assert publish(kafka, control, "v2", URI, "--sha256", SHA256.upper(), "--s3-addressing-style", "path") == 0, \
        capsys.readouterr().err
    assert capsys.readouterr().out.startswith("sent adapter.publish ")
    event = asyncio.run(read_control_log(kafka, control)).published("fin", "v2")
    assert (event.path, event.sha256) == (URI, SHA256.upper())  # sent as given: the workers fetch the same


@pytest.mark.parametrize("version, uri, extra, line", [
    ("v3", "s3://adapters/fin/v3/", [], "adapter path s3://adapters/fin/v3/ has no adapter_model.safetensors"),
    ("v2", URI, ["--sha256", "0" * 64],
     f"sha256 {'0' * 64} does not match {URI}adapter_model.safetensors (its sha256 is {SHA256})"),
    ("v2", URI, ["--s3-addressing-style", "sideways"],
     "--s3-addressing-style 'sideways' (or LORABUS_S3_ADDRESSING_STYLE): use auto, path, virtual"),
])
def test_publish_refused_by_the_store_sends_nothing(kafka, control, store, capsys, version, uri, extra, line):
    before = asyncio.run(end_offset(kafka, control))
    assert publish(kafka, control, version, uri, "--s3-endpoint-url", store.endpoint, *extra) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[0] == f"lorabus rollout publish: {line}", err
    assert "Traceback" not in err
    assert asyncio.run(end_offset(kafka, control)) == before, "a refused publish reached the control topic"


def test_publish_with_credentials_the_store_refuses_sends_nothing(kafka, control, store, monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-" + store.secret_key)
    before = asyncio.run(end_offset(kafka, control))
    assert publish(kafka, control, "v2", URI, "--s3-endpoint-url", store.endpoint, "--s3-addressing-style", "path") == 2
    problem, sent = capsys.readouterr().err.splitlines()
    assert problem.startswith(f"lorabus rollout publish: adapter path {URI}: SignatureDoesNotMatch (HTTP 403)")
    assert problem.endswith("(credentials: boto3's chain, e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                            "or AWS_PROFILE)")
    assert store.secret_key not in problem
    assert sent == "lorabus rollout publish: nothing sent (--force sends it anyway)"
    assert publish(kafka, control, "v2", URI, "--s3-endpoint-url", store.endpoint, "--force") == 0  # skips the store
    assert asyncio.run(end_offset(kafka, control)) == before + 1


# ---- the checks themselves ---------------------------------------------------------------------------------------

def test_store_publish_checks_pass_on_the_published_bytes(store):
    assert problems(store, URI) == []
    assert problems(store, URI, SHA256) == []
    assert problems(store, URI, SHA256.upper()) == []
    assert problems(store, URI, SHA256, addressing_style="auto") == []  # boto3 keeps a custom endpoint path-style


def test_store_publish_problems_are_one_line(store, monkeypatch):
    assert problems(store, "s3://adapters/fin/") == [  # the name's prefix, not a version's: its files are deeper
        "adapter path s3://adapters/fin/ has no adapter_config.json",
        "adapter path s3://adapters/fin/ has no adapter_model.safetensors"]
    assert problems(store, "s3://adapters/fin/v3/", SHA256) == [
        "adapter path s3://adapters/fin/v3/ has no adapter_model.safetensors"]  # listed, never hashed
    (problem,) = problems(store, "s3://no-such-bucket/fin/v2/")
    assert problem.startswith("adapter path s3://no-such-bucket/fin/v2/: NoSuchBucket (HTTP 404)")
    (problem,) = problems(store, "s3://adapters/fin/v2")
    assert problem == "adapter path 's3://adapters/fin/v2' is not an s3://bucket/prefix/ URI (a directory, ending in /)"
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    (problem,) = problems(store, URI, endpoint_url=endpoint)
    assert problem.startswith(f"adapter path {URI}: EndpointConnectionError: ")
    (problem,) = problems(store, URI, endpoint_url="not a url")
    assert problem == "--s3-endpoint-url 'not a url': Invalid endpoint: not a url"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    (problem,) = problems(store, URI)
    assert problem.startswith(f"adapter path {URI}: NoCredentialsError: no usable credentials in boto3's chain")
