"""A real S3-compatible object store for tests: deploy/local-s3 (S3Proxy over a directory) on a test's own
data dir, with boto3 clients configured for it, and a fixture factory for conftest or a test module."""

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "local-s3"
# deploy/local-s3's defaults: public, for local testing only.
ACCESS_KEY = "lorabus"
SECRET_KEY = "lorabus-secret"
# S3Proxy wants path-style addresses, and rejects the checksum trailers boto3 >= 1.36 sends by default.
CLIENT_CONFIG = Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                       response_checksum_validation="when_required")


class LocalS3:
    """An S3Proxy of a test's own: started on a free port, and restartable on that same port and data, so a
    test can take the store away and bring it back."""

    def __init__(self, data: Path, buckets=(), access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        self.data, self.buckets = data, tuple(buckets)
        self.access_key, self.secret_key = access_key, secret_key
        self.port, self.endpoint = 0, None

    def start(self) -> float:
        """Start (or restart) it; returns the seconds it took to answer."""
        started = time.monotonic()
        buckets = [arg for name in self.buckets for arg in ("--bucket", name)]
        out = subprocess.run([sys.executable, str(SCRIPT), "start", "--port", str(self.port), "--data",
                              str(self.data), "--access-key", self.access_key, "--secret-key", self.secret_key,
                              *buckets], check=True, stdout=subprocess.PIPE, text=True, timeout=600)
        self.endpoint = out.stdout.strip()
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        return time.monotonic() - started

    def stop(self, check: bool = True) -> float:
        started = time.monotonic()
        subprocess.run([sys.executable, str(SCRIPT), "stop", "--data", str(self.data)], check=check,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        return time.monotonic() - started

    def restart(self) -> float:
        """Stop, then start on the same port and data (an outage the objects survive)."""
        self.stop()
        return self.start()

    def client(self, secret_key: str | None = None, config: Config | None = None):
        """A boto3 S3 client for this store (`secret_key` to sign with another key; `config` merged over
        the settings S3Proxy needs, e.g. Config(retries={"max_attempts": 1}))."""
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key,
                            config=CLIENT_CONFIG.merge(config) if config else CLIENT_CONFIG)

    def upload_dir(self, local_dir: Path, bucket: str, prefix: str) -> list[str]:
        """Upload every file under local_dir as prefix/<relative path>; returns the keys, sorted."""
        client, keys = self.client(), []
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            key = "/".join(filter(None, [prefix.strip("/"), path.relative_to(local_dir).as_posix()]))
            client.upload_file(str(path), bucket, key)
            keys.append(key)
        return keys

    def credentials_env(self) -> dict[str, str]:
        """boto3's chain as operators hand it to workers (environment variables): this store's keys, and the
        checksum settings S3Proxy 2.6 needs (../shared/NOTES.md)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}

    def publish(self, adapter_dir: Path, name: str, version: str = "v1"):
        """Upload an adapter to adapters/<name>/<version>/; its publish event there, with the weights' sha256."""
        from lorabus.scheduler.adapters import file_sha256
        from lorabus.schemas import AdapterPublish

        self.upload_dir(adapter_dir, "adapters", f"{name}/{version}")
        return AdapterPublish(name, version, f"s3://adapters/{name}/{version}/",
                              file_sha256(Path(adapter_dir) / "adapter_model.safetensors"))


@contextlib.contextmanager
def running_s3(data: Path, buckets=()) -> Iterator[LocalS3]:
    """A LocalS3 on `data`, started here and stopped on the way out."""
    store = LocalS3(data, buckets)
    store.start()
    try:
        yield store
    finally:
        store.stop(check=False)


def s3_fixture(scope: str = "function", buckets=("adapters",)):
    """A pytest fixture giving a running LocalS3 with `buckets` (empty at first) in a fresh tmp dir:
    `s3 = s3_fixture()` in a test module or conftest.py."""

    @pytest.fixture(scope=scope)
    def fixture(tmp_path_factory) -> Iterator[LocalS3]:
        with running_s3(tmp_path_factory.mktemp("s3"), buckets) as store:
            yield store

    return fixture
