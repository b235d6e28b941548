"""worker/adapter_store.py against a real S3-compatible server (S3Proxy, tests/s3_store.py): fetches byte-equal
to the published adapter, one copy per content, sha256 checks, the store's refusals and outages as StoreError
kinds, LRU eviction with pins, one download per uri across threads and processes, and cut downloads, full
disks and mismatches that leave nothing a later fetch could trust. Credentials reach boto3 only through the
environment (its standard chain); no repr or log line shows the secret."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from botocore.exceptions import IncompleteReadError, ResponseStreamingError

from lorabus.worker import adapter_store
from lorabus.worker.adapter_store import DiskTier, StoreError, StoreSettings
from lorabus.worker.testing import build_sample_adapter, build_tiny_model
from s3_store import s3_fixture

FILES = ("adapter_config.json", "adapter_model.safetensors")
s3 = s3_fixture(scope="module", buckets=("adapters",))


@pytest.fixture(scope="module")
def adapters(s3, tmp_path_factory) -> dict[str, Path]:
    """Local adapter directories, each uploaded under s3://adapters/<name>/ ("same" holds a's bytes; "a" also
    carries files no fetch may download; "pickled" has only a .bin)."""
    root = tmp_path_factory.mktemp("adapters")
    model = build_tiny_model(root / "model")
    local = {name: build_sample_adapter(root / name, model, seed=seed) for seed, name in enumerate("abcd")}
    for name, path in local.items():
        s3.upload_dir(path, "adapters", f"{name}/")
    s3.upload_dir(local["a"], "adapters", "same/")
    extras = root / "extras"
    extras.mkdir()
    (extras / "README.md").write_text("not an adapter file\n")
    (extras / "training_args.bin").write_bytes(b"\x80\x04pickle")
    s3.upload_dir(extras, "adapters", "a/")
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(local["a"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    s3.upload_dir(pickled, "adapters", "pickled/")
    return local


@pytest.fixture(autouse=True)
def credentials(s3, monkeypatch, tmp_path):
    """The store's keys in the environment, where boto3's chain finds them; no config file of this machine."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    monkeypatch.setenv("AWS_REGION", "us-east-1")


def settings(s3, **overrides) -> StoreSettings:
    return StoreSettings(endpoint_url=s3.endpoint, addressing_style="path", **overrides)


def sha(path: Path) -> str:
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


def size(path: Path) -> int:
    return sum((path / name).stat().st_size for name in FILES)


class Requests:
    """Requests the tier's client sends, by operation (boto3's event hooks)."""

    def __init__(self, tier: DiskTier):
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        tier.client.meta.events.register("before-call.s3", self._count)

    def _count(self, model, **_):
        with self.lock:
            self.counts[model.name] = self.counts.get(model.name, 0) + 1

    def total(self) -> int:
        return sum(self.counts.values())


def versions(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "sha256").iterdir())


def assert_nothing_trusted(root: Path) -> None:
    """No version, no index entry, nothing in tmp/."""
    assert versions(root) == []
    assert list((root / "index").iterdir()) == []
    assert list((root / "tmp").iterdir()) == []


def test_fetch_is_byte_equal_and_repeat_fetches_skip_the_network(s3, adapters, tmp_path):
    tier = DiskTier(tmp_path / "tier", 10 << 20, settings(s3))
    requests = Requests(tier)
    path = tier.fetch("s3://adapters/a/", sha(adapters["a"]))
    assert path == tmp_path / "tier" / "sha256" / path.name
    assert sorted(p.name for p in path.iterdir()) == list(FILES)  # README.md and training_args.bin left out
    for name in FILES:
        assert (path / name).read_bytes() == (adapters["a"] / name).read_bytes()
    assert requests.counts == {"ListObjectsV2": 1, "GetObject": 2}

    assert tier.fetch("s3://adapters/a/", sha(adapters["a"])) == path
    assert requests.total() == 3  # with a sha256: no request at all
    assert tier.fetch("s3://adapters/a/") == path
    assert requests.counts == {"ListObjectsV2": 2, "GetObject": 2}  # without: one LIST, the ETags unchanged
    assert DiskTier(tmp_path / "tier", 10 << 20, settings(s3)).fetch("s3://adapters/a/", sha(adapters["a"])) == path


def test_same_bytes_under_two_uris_share_one_copy(s3, adapters, tmp_path):
    tier = DiskTier(tmp_path / "tier", 10 << 20, settings(s3))
    first = tier.fetch("s3://adapters/a/")
    second = tier.fetch("s3://adapters/same/", sha(adapters["a"]))
    assert first == second
    assert versions(tmp_path / "tier") == [first.name]
    assert list((tmp_path / "tier" / "tmp").iterdir()) == []
    assert tier.fetch("s3://adapters/b/") != first


def test_sha256_mismatch_leaves_nothing(s3, adapters, tmp_path):
    tier = DiskTier(tmp_path / "tier", 10 << 20, settings(s3))
    with pytest.raises(StoreError) as err:
        tier.fetch("s3://adapters/a/", sha(adapters["b"]))
    assert err.value.kind == "corrupt"
    assert sha(adapters["b"]) in err.value.reason and "a/adapter_model.safetensors" in err.value.reason
    assert_nothing_trusted(tmp_path / "tier")
    assert tier.fetch("s3://adapters/a/", sha(adapters["a"]).upper()).is_dir()


@pytest.mark.parametrize("uri, kind, words", [
    ("s3://adapters/missing/", "not_found", "no adapter_config.json or adapter_model.safetensors"),
    ("s3://no-such-bucket/a/", "not_found", "NoSuchBucket"),
    ("s3://adapters/pickled/", "corrupt", "pickled weights are not loaded"),
    ("s3://adapters/a", "not_found", "not an s3://bucket/prefix/ URI"),
    ("/local/a/", "not_found", "not an s3://bucket/prefix/ URI"),
])
def test_refusals(s3, adapters, tmp_path, uri, kind, words):
    tier = DiskTier(tmp_path / "tier", 10 << 20, settings(s3))
    with pytest.raises(StoreError) as err:
        tier.fetch(uri)
    assert (err.value.kind, words in err.value.reason) == (kind, True), err.value
    assert_nothing_trusted(tmp_path / "tier")


def test_version_larger_than_the_tier_is_refused_before_download(s3, adapters, tmp_path):
    tier = DiskTier(tmp_path / "tier", size(adapters["a"]) - 1, settings(s3))
    requests = Requests(tier)
    with pytest.raises(StoreError) as err:
        tier.fetch("s3://adapters/a/")
    assert err.value.kind == "full" and "larger than the whole disk tier" in err.value.reason
    assert requests.counts == {"ListObjectsV2": 1}


@pytest.mark.parametrize("variable, code", [("AWS_SECRET_ACCESS_KEY", "SignatureDoesNotMatch"),
                                            ("AWS_ACCESS_KEY_ID", "InvalidAccessKeyId")])
def test_wrong_credentials_are_denied(s3, adapters, tmp_path, monkeypatch, variable, code):
    monkeypatch.setenv(variable, "wrong-" + os.environ[variable])
    tier = DiskTier(tmp_path / "tier", 10 << 20, settings(s3))
    for sha256 in (None, sha(adapters["a"])):
        with pytest.raises(StoreError) as err:
            tier.fetch("s3://adapters/a/", sha256)
        assert err.value.kind == "denied" and code in err.value.reason and "s3://adapters/a/" in err.value.reason
        assert s3.secret_key not in str(err.value) and s3.secret_key not in repr(err.value)
    assert_nothing_trusted(tmp_path / "tier")


def test_no_credentials_at_all_are_denied(s3, adapters, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreError) as err:
        DiskTier(tmp_path / "tier", 10 << 20, settings(s3)).fetch("s3://adapters/a/")
    assert err.value.kind == "denied" and "NoCredentialsError" in err.value.reason


def test_no_secret_in_reprs_or_log_lines(s3, adapters, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, botocore's included
    tier = DiskTier(tmp_path / "tier", size(adapters["a"]) + size(adapters["b"]), settings(s3))
    tier.fetch("s3://adapters/a/")
    tier.fetch("s3://adapters/b/", sha(adapters["b"]))
    tier.fetch("s3://adapters/c/")  # evicts a: that is logged too
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3.secret_key)
    with pytest.raises(StoreError) as err:
        DiskTier(tmp_path / "tier", 10 << 20, settings(s3)).fetch("s3://adapters/d/")
    ours = [r.getMessage() for r in caplog.records if r.name == adapter_store.__name__]
    assert any("fetched s3://adapters/a/" in line for line in ours) and any("evicted" in line for line in ours)
    everything = [r.getMessage() for r in caplog.records]
    assert not [line for line in everything if s3.secret_key in line]
    assert not [line for line in ours if s3.access_key in line]
    for obj in (tier, tier.settings, err.value, StoreError("denied", "x")):
        assert s3.secret_key not in repr(obj) and s3.access_key not in repr(obj), repr(obj)
    assert [name for name in vars(tier) if "secret" in name or "key" in name or "cred" in name] == []


def test_store_down_is_unavailable_then_fetch_works_again(s3, adapters, tmp_path):
    tier = DiskTier(tmp_path / "tier", 10 << 20, settings(s3, connect_timeout_s=2))
    s3.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StoreError) as err:
            tier.fetch("s3://adapters/a/", sha(adapters["a"]))
        assert err.value.kind == "unavailable" and "s3://adapters/a/" in err.value.reason
        assert time.monotonic() - started < 10  # one attempt: the caller owns the retries
        assert_nothing_trusted(tmp_path / "tier")
    finally:
        s3.start()
    path = tier.fetch("s3://adapters/a/", sha(adapters["a"]))
    assert (path / "adapter_model.safetensors").read_bytes() == (adapters["a"] / "adapter_model.safetensors").read_bytes()


def test_retry_delay_grows_capped_with_jitter():
    store = StoreSettings(retry_first_s=0.5, retry_max_s=8)
    for attempt, ceiling in [(0, 0.5), (1, 1), (3, 4), (4, 8), (5, 8), (1000, 8)]:
        delays = {store.retry_delay(attempt) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays) and len(delays) > 1, (attempt, delays)


def test_lru_eviction_by_bytes_skips_pinned_versions(s3, adapters, tmp_path):
    one = size(adapters["a"])
    assert {size(adapters[n]) for n in "abcd"} == {one}
    root = tmp_path / "tier"
    tier = DiskTier(root, 2 * one + one // 2, settings(s3))
    requests = Requests(tier)
    a = tier.fetch("s3://adapters/a/")
    b = tier.fetch("s3://adapters/b/")
    assert tier.fetch("s3://adapters/a/") == a  # a is now the most recently used
    c = tier.fetch("s3://adapters/c/")
    assert versions(root) == sorted([a.name, c.name])  # b, the least recently used, went
    gets = requests.counts["GetObject"]
    assert tier.fetch("s3://adapters/b/") == b
    assert requests.counts["GetObject"] == gets + 2  # downloaded again, evicting a
    assert versions(root) == sorted([b.name, c.name])

    tier.pin(b)
    d = tier.fetch("s3://adapters/d/", pin=True)
    assert versions(root) == sorted([b.name, d.name])  # c went though b was older: b is pinned
    with pytest.raises(StoreError) as err:
        tier.fetch("s3://adapters/a/")
    assert err.value.kind == "full" and "pinned" in err.value.reason
    assert versions(root) == sorted([b.name, d.name]) and list((root / "tmp").iterdir()) == []
    tier.pin(b)  # pins are counted: one unpin leaves it pinned
    tier.unpin(b)
    with pytest.raises(StoreError):
        tier.fetch("s3://adapters/a/")
    tier.unpin(b)
    assert tier.fetch("s3://adapters/a/") == a
    assert versions(root) == sorted([a.name, d.name])


def test_a_pin_holds_across_processes(s3, adapters, tmp_path):
    one = size(adapters["a"])
    root = tmp_path / "tier"
    other = DiskTier(root, 2 * one + one // 2, settings(s3))  # another worker on the same root
    a = other.fetch("s3://adapters/a/", pin=True)
    tier = DiskTier(root, 2 * one + one // 2, settings(s3))
    tier.fetch("s3://adapters/b/")
    tier.fetch("s3://adapters/c/")
    assert a.name in versions(root)  # the flock of the other tier's pin kept it
    other.unpin(a)
    tier.fetch("s3://adapters/d/")
    assert a.name not in versions(root)


def slow_gets(tier: DiskTier, seconds: float):
    """Each GetObject answered `seconds` late, and the most GETs ever in flight at once."""
    state = {"now": 0, "most": 0}
    lock = threading.Lock()

    def before(**_):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])

    def after(**_):
        time.sleep(seconds)
        with lock:
            state["now"] -= 1

    tier.client.meta.events.register("before-call.s3.GetObject", before)
    tier.client.meta.events.register("after-call.s3.GetObject", after)
    return state


def run_threads(count: int, target) -> list:
    results: list = [None] * count

    def run(i):
        try:
            results[i] = target(i)
        except Exception as exc:  # reported by the assertions on the results
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


@pytest.mark.parametrize("with_sha256", [False, True])
def test_threads_fetching_one_uri_download_once(s3, adapters, tmp_path, with_sha256):
    tier = DiskTier(tmp_path / "tier", 10 << 20, settings(s3))
    requests = Requests(tier)
    slow_gets(tier, 0.3)
    sha256 = sha(adapters["a"]) if with_sha256 else None
    results = run_threads(6, lambda _: tier.fetch("s3://adapters/a/", sha256))
    assert len(set(results)) == 1 and isinstance(results[0], Path), results
    assert requests.counts["GetObject"] == 2


def test_downloads_in_flight_are_bounded(s3, adapters, tmp_path):
    tier = DiskTier(tmp_path / "tier", 10 << 20, settings(s3, max_concurrent_downloads=2))
    state = slow_gets(tier, 0.3)
    results = run_threads(4, lambda i: tier.fetch(f"s3://adapters/{'abcd'[i]}/"))
    assert all(isinstance(r, Path) for r in results), results
    assert state["most"] == 2


FETCH_SCRIPT = """
import sys, threading, time
from pathlib import Path
from lorabus.worker.adapter_store import DiskTier, StoreSettings
tier = DiskTier(Path(sys.argv[1]), 10 << 20, StoreSettings(endpoint_url=sys.argv[2], addressing_style="path"))
gets = []
tier.client.meta.events.register("before-call.s3.GetObject", lambda **_: gets.append(1))
tier.client.meta.events.register("after-call.s3.GetObject", lambda **_: time.sleep(0.5))
print(tier.fetch("s3://adapters/a/", sys.argv[3]), len(gets))
"""


def test_processes_sharing_a_root_download_once(s3, adapters, tmp_path):
    script = tmp_path / "fetch.py"
    script.write_text(FETCH_SCRIPT)
    args = [sys.executable, "-P", str(script), str(tmp_path / "tier"), s3.endpoint, sha(adapters["a"])]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=60)[0].split() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs[0][0] == outputs[1][0]
    assert sorted(int(out[1]) for out in outputs) == [0, 2]
    assert (Path(outputs[0][0]) / "adapter_model.safetensors").read_bytes() == \
        (adapters["a"] / "adapter_model.safetensors").read_bytes()


class CutBody:
    """A GetObject body that fails with `error` after `limit` bytes."""

    def __init__(self, body, limit: int, error: Exception):
        self.body, self.limit, self.error = body, limit, error

    def iter_chunks(self, chunk_size):
        yield self.body.read(self.limit)
        raise self.error


@pytest.mark.parametrize("error, kind", [
    (IncompleteReadError(actual_bytes=1000, expected_bytes=5000), "corrupt"),
    (ResponseStreamingError(error=ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")), "unavailable"),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "unavailable"),
])
def test_a_cut_download_leaves_nothing(s3, adapters, tmp_path, monkeypatch, error, kind):
    tier = DiskTier(tmp_path / "tier", 10 << 20, settings(s3))
    get_object = tier.client.get_object

    def cut_weights(**kwargs):
        response = get_object(**kwargs)
        if kwargs["Key"].endswith(".safetensors"):
            response["Body"] = CutBody(response["Body"], 1000, error)
        return response

    monkeypatch.setattr(tier.client, "get_object", cut_weights)
    with pytest.raises(StoreError) as err:
        tier.fetch("s3://adapters/a/", sha(adapters["a"]))
    assert err.value.kind == kind and "a/adapter_model.safetensors" in err.value.reason
    assert_nothing_trusted(tmp_path / "tier")
    monkeypatch.undo()
    assert tier.fetch("s3://adapters/a/", sha(adapters["a"])).is_dir()


def test_a_full_disk_leaves_nothing(s3, adapters, tmp_path, monkeypatch):
    written = []

    class FillingFile:
        """A real file whose writes fail with ENOSPC after the first 1000 bytes."""

        def __init__(self, *args):
            self.file = open(*args)

        def write(self, data):
            if sum(written) + len(data) > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written.append(len(data))
            return self.file.write(data)

        def __getattr__(self, name):  # flush, fileno
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(adapter_store, "open", FillingFile, raising=False)  # the module's file writes only
    tier = DiskTier(tmp_path / "tier", 10 << 20, settings(s3))
    with pytest.raises(StoreError) as err:
        tier.fetch("s3://adapters/a/", sha(adapters["a"]))
    assert err.value.kind == "full" and "No space left on device while downloading s3://adapters/a/" in err.value.reason
    assert written  # the config file went through before the disk filled
    assert_nothing_trusted(tmp_path / "tier")
    monkeypatch.undo()
    assert tier.fetch("s3://adapters/a/", sha(adapters["a"])).is_dir()


def test_leftovers_of_a_crash_are_removed_at_start_but_live_downloads_kept(s3, tmp_path):
    root = tmp_path / "tier"
    DiskTier(root, 10 << 20, settings(s3))
    (root / "tmp" / "fetch-crashed").mkdir()
    (root / "tmp" / "fetch-crashed" / "adapter_model.safetensors").write_bytes(b"half")
    (root / "tmp" / "index-crashed").write_text("{")
    live = root / "tmp" / "fetch-live"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as another process's download in flight holds it
    try:
        DiskTier(root, 10 << 20, settings(s3))
        assert sorted(p.name for p in (root / "tmp").iterdir()) == ["fetch-live"]
    finally:
        os.close(fd)
    DiskTier(root, 10 << 20, settings(s3))
    assert list((root / "tmp").iterdir()) == []
