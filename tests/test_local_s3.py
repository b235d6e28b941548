"""deploy/local-s3 and tests/s3_store.py: a real S3Proxy started by the project; boto3 round trips (a
multipart upload included), signature checks, a missing key, an outage and a restart the objects survive,
and the script's exit codes.

Needs java (17+) and either warm caches or Maven Central access (the first run copies the S3Proxy jars to
${LORABUS_CACHE:-~/.cache/lorabus}); it is deliberately not skipped when they are missing.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError

from s3_store import SCRIPT, LocalS3, s3_fixture

s3 = s3_fixture(buckets=("adapters",))


def local_s3(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def listed_keys(client, bucket, prefix):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    # The filesystem backend lists directory markers ("a/v1/") among the keys.
    return sorted(o["Key"] for page in pages for o in page.get("Contents", ()) if not o["Key"].endswith("/"))


def test_round_trip_auth_outage_restart(s3, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    files = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": os.urandom(9 << 20)}  # > 8 MiB: multipart
    for name, body in files.items():
        (adapter / name).write_bytes(body)

    keys = s3.upload_dir(adapter, "adapters", "/qa/v1/")
    assert keys == ["qa/v1/adapter_config.json", "qa/v1/adapter_model.safetensors"]
    client = s3.client()
    assert listed_keys(client, "adapters", "qa/") == keys
    for name, body in files.items():
        assert client.get_object(Bucket="adapters", Key=f"qa/v1/{name}")["Body"].read() == body
    client.download_file("adapters", "qa/v1/adapter_model.safetensors", str(tmp_path / "down"))
    assert (tmp_path / "down").read_bytes() == files["adapter_model.safetensors"]

    with pytest.raises(ClientError) as denied:
        s3.client(secret_key="not-the-secret").get_object(Bucket="adapters", Key="qa/v1/adapter_config.json")
    assert denied.value.response["Error"]["Code"] in ("AccessDenied", "SignatureDoesNotMatch")
    with pytest.raises(ClientError) as missing:
        client.get_object(Bucket="adapters", Key="qa/v1/absent.bin")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"
    with pytest.raises(ClientError) as missing_head:
        client.head_object(Bucket="adapters", Key="qa/v1/absent.bin")
    assert missing_head.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404

    endpoint = s3.endpoint
    s3.stop()
    once = s3.client(config=Config(retries={"max_attempts": 1}))
    with pytest.raises(EndpointConnectionError):
        once.head_object(Bucket="adapters", Key="qa/v1/adapter_config.json")
    assert local_s3("status", "--data", str(s3.data)).returncode == 3

    s3.start()
    assert s3.endpoint == endpoint
    assert listed_keys(once, "adapters", "qa/") == keys
    assert once.get_object(Bucket="adapters", Key="qa/v1/adapter_model.safetensors")["Body"].read() == \
        files["adapter_model.safetensors"]


def test_script_exit_codes_keys_and_buckets(tmp_path):
    store = LocalS3(tmp_path / "s3", buckets=("models", "adapters.v2"), access_key="k-test", secret_key="s-test")
    data = str(store.data)
    assert local_s3("start", "--data", data, "--bucket", "ab").returncode == 1          # too short for S3
    assert local_s3("status", "--data", data).returncode == 3
    store.start()
    try:
        info = json.loads((store.data / "s3.json").read_text())
        assert info["endpoint"] == store.endpoint and info["access_key"] == "k-test"
        assert "s3proxy.authorization=aws-v2-or-v4\n" in (store.data / "s3proxy.conf").read_text()
        assert {b["Name"] for b in store.client().list_buckets()["Buckets"]} == {"models", "adapters.v2"}
        stranger = LocalS3(store.data)                      # the script's default keys, which this store refuses
        stranger.endpoint = store.endpoint
        with pytest.raises(ClientError) as denied:
            stranger.client().list_buckets()
        assert denied.value.response["Error"]["Code"] in ("AccessDenied", "InvalidAccessKeyId")

        status = local_s3("status", "--data", data)
        assert status.returncode == 0 and f"running  endpoint={store.endpoint} " in status.stdout
        again = local_s3("start", "--data", data, "--bucket", "late-bucket")            # reports, adds the bucket
        assert again.returncode == 0 and again.stdout == store.endpoint + "\n"
        assert "late-bucket" in {b["Name"] for b in store.client().list_buckets()["Buckets"]}
        assert local_s3("start", "--data", data, "--port", str(store.port + 1)).returncode == 1
        assert local_s3("start", "--data", data, "--secret-key", "other").returncode == 1

        pid = int((store.data / "s3.pid").read_text())
        os.kill(pid, signal.SIGSTOP)                                                    # alive, not answering
        try:
            assert local_s3("status", "--data", data).returncode == 1
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        store.stop()
    assert local_s3("status", "--data", data).returncode == 3
    assert local_s3("stop", "--data", data).returncode == 0                             # nothing running: ok
    assert not (store.data / "s3.pid").exists()

