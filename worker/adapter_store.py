"""Adapters from an object store (`s3://bucket/prefix/`) into a bounded, content-addressed local disk tier.

The worker calls `DiskTier.fetch(uri, sha256)` on a worker thread before it registers an adapter with the
engine; what comes back is a local adapter directory the loader (scheduler/adapters.py) reads as today.

- Only the two files the loader opens are downloaded (`ADAPTER_FILES`); a prefix that holds pickled weights
  (`.bin`, `.pt`, `.pkl`) and no safetensors is refused, as the local loader refuses `adapter_model.bin`.
- The published sha256 covers `adapter_model.safetensors` only, as for local paths (`read_adapter`, `lorabus
  control publish --sha256`); it is checked on the downloaded bytes before anything is published.
- Layout under `root`: `sha256/<digest>/` holds one version, where digest = sha256 over "name NUL sha256-of-file
  LF" for both files, so two uris publishing the same bytes share one copy; `index/<sha256 of the key>` maps a
  uri plus its version (the published sha256, else both objects' ETags) to a digest; `tmp/` holds downloads in
  flight; `locks/` the lock files. With a sha256 a repeat fetch touches no network; without one it costs one
  LIST (the ETags tell whether the objects changed).
- A download goes to `tmp/<random>/`, is fsynced, verified, then renamed into `sha256/` in one step: a crash, a
  cut download, a full disk or a mismatch leaves only `tmp/` entries, which the next `DiskTier` removes.
- LRU by bytes: a version's directory mtime is its last use (shared by every process on the root); past
  `max_bytes` the least recently used versions that nobody pins are removed. `pin(path)` holds a shared
  `flock` on the version's pin file, so another process's eviction skips it too.
- Concurrency: one download per key at a time (an exclusive `flock` on the key's lock file: threads and
  processes alike wait, then find the version in the index), at most `max_concurrent_downloads` per tier.
- Credentials come only from boto3's standard chain (environment, config files, web identity); nothing here
  reads, keeps or prints them. Failures raise `StoreError(kind, reason)`; `unavailable` is the transient kind,
  retried by the caller after `StoreSettings.retry_delay(attempt)`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, IncompleteReadError, NoCredentialsError,
                                 PartialCredentialsError)

from lorabus.worker.adapter_paths import ADAPTER_FILES

log = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_SUFFIXES = (".bin", ".pt", ".pkl")
KINDS = ("not_found", "denied", "corrupt", "full", "unavailable")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_CHUNK = 1 << 20
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
# Transient answers: the store is overloaded or the object changed between our LIST and GET (If-Match).
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
              "PreconditionFailed", "ServiceUnavailable", "InternalError"}


@dataclass(frozen=True)
class StoreSettings:
    """How the worker talks to the object store. Credentials are not settings: boto3's chain finds them."""

    endpoint_url: str | None = None  # None: boto3's own resolution (AWS_ENDPOINT_URL_S3, config file, AWS)
    region: str | None = None  # None: boto3's own resolution (AWS_REGION, config file)
    addressing_style: str = "auto"  # "path" for most S3-compatible servers, "virtual", or "auto"
    ca_bundle: str | None = None  # a PEM file trusted for TLS; None: the system's / boto3's default
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0  # between two reads of a body, not for the whole download
    max_concurrent_downloads: int = 4  # per tier (process)
    retry_first_s: float = 0.5  # backoff before the first retry of an `unavailable` fetch
    retry_max_s: float = 30.0  # backoff cap

    def retry_delay(self, attempt: int) -> float:
        """Seconds to wait before retry `attempt` (0-based): exponential, capped, with jitter in its upper half
        so that workers failing together do not retry together."""
        ceiling = min(self.retry_max_s, self.retry_first_s * 2 ** min(attempt, 62))
        return random.uniform(ceiling / 2, ceiling)


class StoreError(Exception):
    """A fetch that failed; `kind` is one of KINDS, `reason` names bucket/key and the store's code."""

    def __init__(self, kind: str, reason: str):
        if kind not in KINDS:
            raise ValueError(f"unknown StoreError kind {kind!r}")
        super().__init__(kind, reason)
        self.kind, self.reason = kind, reason

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix ending in "/") of `s3://bucket/prefix/`; StoreError(not_found) for anything else."""
    match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/((?:[^/\x00]+/)*)", uri)
    if match is None:
        raise StoreError("not_found", f"{uri!r} is not an s3://bucket/prefix/ URI (a directory, ending in /)")
    return match[1], match[2]


def make_client(settings: StoreSettings):
    """An S3 client over boto3's standard credential chain. Retries are the caller's (retry_delay), so
    botocore makes one attempt; checksums only where required, as S3-compatible servers differ there."""
    config = Config(connect_timeout=settings.connect_timeout_s, read_timeout=settings.read_timeout_s,
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    s3={"addressing_style": settings.addressing_style},
                    request_checksum_calculation="when_required", response_checksum_validation="when_required",
                    max_pool_connections=max(10, 2 * settings.max_concurrent_downloads))
    return boto3.session.Session().client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
                                          verify=settings.ca_bundle, config=config)


def _store_error(exc: Exception, what: str) -> StoreError:
    """The StoreError for a botocore failure of `what` (an operation and s3://bucket/key)."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        reason = f"{what}: {code or 'error'} (HTTP {status}): {str(error.get('Message', ''))[:300]}"
        if code in _NOT_FOUND or status == 404:
            return StoreError("not_found", reason)
        if code in _TRANSIENT or status in (412, 429) or status >= 500:
            return StoreError("unavailable", reason)
        # 403 (AccessDenied, SignatureDoesNotMatch, InvalidAccessKeyId, ExpiredToken) and every other refusal of
        # the request (a wrong region, a malformed request): retrying the same request cannot help.
        return StoreError("denied", reason)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StoreError("denied", f"{what}: {type(exc).__name__}: no usable credentials in boto3's chain")
    if isinstance(exc, IncompleteReadError):
        return StoreError("corrupt", f"{what}: truncated: {exc}")
    # Connection refused or reset, timeouts, a body cut mid-stream: transient.
    return StoreError("unavailable", f"{what}: {type(exc).__name__}: {exc}"[:500])


def _key_hash(uri: str, sha256: str | None, listing: dict[str, dict] | None) -> str:
    """The index key of a version: its uri and published sha256, else its uri and both objects' ETags."""
    version = f"sha256:{sha256}" if sha256 else "etags:" + ",".join(obj["ETag"] for obj in listing.values())
    return hashlib.sha256(f"{uri}\0{version}".encode()).hexdigest()


class _Locked:
    """An flock on a file, held in a `with` block (exclusive unless shared=True)."""

    def __init__(self, path: Path, shared: bool = False):
        self.path, self.mode = path, fcntl.LOCK_SH if shared else fcntl.LOCK_EX

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, self.mode)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing drops the lock


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _version_bytes(version: Path) -> int:
    return sum((version / name).stat().st_size for name in ADAPTER_FILES)


def _complete(version: Path) -> bool:
    return all((version / name).is_file() for name in ADAPTER_FILES)


class DiskTier:
    """Adapter versions downloaded from the object store, kept under `root` within `max_bytes`."""

    def __init__(self, root: Path, max_bytes: int, settings: StoreSettings = StoreSettings()):
        self.root, self.max_bytes, self.settings = Path(root), max_bytes, settings
        self.client = make_client(settings)
        self._downloads = threading.BoundedSemaphore(settings.max_concurrent_downloads)
        self._pins: dict[str, tuple[int, int]] = {}  # digest → (count, fd holding the shared flock)
        self._pins_lock = threading.Lock()
        for sub in ("sha256", "index", "tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        with self._tier_lock():
            self._sweep_tmp()

    def __repr__(self) -> str:
        return f"DiskTier(root={str(self.root)!r}, max_bytes={self.max_bytes}, settings={self.settings!r})"

    # ------------------------------------------------------------------------------------------- fetch

    def fetch(self, uri: str, sha256: str | None = None, pin: bool = False) -> Path:
        """The local directory of the adapter version at `uri` (`s3://bucket/prefix/`), downloaded once and
        verified against `sha256` (of adapter_model.safetensors) when given. `pin=True` pins it before it is
        returned, so no concurrent fetch can evict it in between. Raises StoreError."""
        bucket, prefix = parse_s3_uri(uri)
        if sha256 is not None and not _SHA256.match(sha256):
            raise StoreError("corrupt", f"{uri}: published sha256 {sha256!r} is not 64 hex digits")
        sha256 = sha256.lower() if sha256 else None
        listing = None if sha256 else self._list(bucket, prefix)
        key_hash = _key_hash(uri, sha256, listing)
        found = self._lookup(key_hash, pin)
        if found:
            return found
        with _Locked(self.root / "locks" / f"{key_hash}.lock"):
            found = self._lookup(key_hash, pin)  # another thread or process fetched it while we waited
            if found:
                return found
            listing = listing or self._list(bucket, prefix)
            # Indexed by its ETags too: a later fetch without the sha256 finds it.
            keys = {key_hash, _key_hash(uri, None, listing)}
            with self._downloads:
                version = self._download(bucket, listing, sha256, keys, uri, pin)
            log.info("fetched %s into %s (%d bytes)", uri, version, _version_bytes(version))
            return version

    def _lookup(self, key_hash: str, pin: bool) -> Path | None:
        try:
            digest = json.loads((self.root / "index" / key_hash).read_text())["digest"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        version = self.root / "sha256" / digest
        if pin:
            self.pin(version)
        try:
            os.utime(version)  # its last use, for LRU
        except OSError:
            version = None  # evicted since it was indexed
        if version is None or not _complete(version):
            if pin:
                self.unpin(self.root / "sha256" / digest)
            return None
        return version

    def _list(self, bucket: str, prefix: str) -> dict[str, dict]:
        """The adapter files under the prefix: name → {Key, ETag, Size}; refused unless both are there."""
        uri = f"s3://{bucket}/{prefix}"
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
            names = {obj["Key"][len(prefix):]: obj for page in pages for obj in page.get("Contents", [])}
        except (ClientError, BotoCoreError) as exc:
            raise _store_error(exc, f"ListObjectsV2 {uri}") from None
        if WEIGHTS_FILE not in names and any(name.endswith(PICKLED_SUFFIXES) for name in names):
            raise StoreError("corrupt", f"{uri}: pickled weights are not loaded; save the adapter with safetensors")
        missing = [name for name in ADAPTER_FILES if name not in names]
        if missing:
            raise StoreError("not_found", f"{uri}: no {' or '.join(missing)} under the prefix")
        listing = {name: names[name] for name in ADAPTER_FILES}
        size = sum(obj["Size"] for obj in listing.values())
        if size > self.max_bytes:
            raise StoreError("full", f"{uri}: the adapter is {size} bytes, larger than the whole disk tier "
                                     f"({self.max_bytes} bytes)")
        return listing

    def _download(self, bucket: str, listing: dict[str, dict], sha256: str | None, keys: set[str], uri: str,
                  pin: bool) -> Path:
        """Both objects into a fresh tmp directory, verified, renamed into `sha256/<digest>` and indexed under
        `keys` (pinned when asked) in one step under the tier lock, then older versions evicted."""
        with self._tier_lock():  # the sweep at start must not take a directory we are about to lock
            need = sum(obj["Size"] for obj in listing.values())
            used = self._evict(need)
            if used + need > self.max_bytes:
                raise StoreError("full", f"disk tier {self.root}: {used} bytes held by pinned versions, "
                                         f"no room for {need} more within {self.max_bytes}")
            work = Path(tempfile.mkdtemp(prefix="fetch-", dir=self.root / "tmp"))
            work_fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(work_fd, fcntl.LOCK_EX)  # ours while it exists: another process's sweep leaves it
        try:
            hashes = {name: self._download_object(bucket, obj, work / name) for name, obj in listing.items()}
            if sha256 is not None and hashes[WEIGHTS_FILE] != sha256:
                raise StoreError("corrupt", f"s3://{bucket}/{listing[WEIGHTS_FILE]['Key']}: sha256 "
                                            f"{hashes[WEIGHTS_FILE]} does not match the published {sha256}")
            digest = hashlib.sha256("".join(f"{name}\0{hashes[name]}\n" for name in ADAPTER_FILES).encode()).hexdigest()
            os.fsync(work_fd)
            os.chmod(work, 0o755)  # mkdtemp's 0700 would keep other local users' workers out
            version = self.root / "sha256" / digest
            with self._tier_lock():
                self._publish(work, version)
                for key_hash in keys:
                    self._write_index(key_hash, uri, digest)
                if pin:
                    self.pin(version)
                self._evict(0, keep=digest)  # concurrent downloads may overshoot the cap until the next one
            return version
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError("full", f"disk tier {self.root}: {os.strerror(exc.errno)} while downloading {uri}") from None
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
            os.close(work_fd)

    def _download_object(self, bucket: str, obj: dict, dest: Path) -> str:
        """One object into `dest`, fsynced; its sha256. The GET pins the listed ETag and the size must match."""
        what = f"GetObject s3://{bucket}/{obj['Key']}"
        digest, written = hashlib.sha256(), 0
        try:
            body = self.client.get_object(Bucket=bucket, Key=obj["Key"], IfMatch=obj["ETag"])["Body"]
            with open(dest, "xb") as out:
                for chunk in body.iter_chunks(_CHUNK):
                    written += len(chunk)
                    if written > obj["Size"]:
                        raise StoreError("corrupt", f"{what}: longer than its listed {obj['Size']} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except (ClientError, BotoCoreError, ConnectionError, TimeoutError) as exc:
            raise _store_error(exc, what) from None
        if written != obj["Size"]:
            raise StoreError("corrupt", f"{what}: truncated: got {written} of {obj['Size']} bytes")
        return digest.hexdigest()

    def _publish(self, work: Path, version: Path) -> None:
        """`work` renamed to `version` in one step, unless the same bytes are already there (then kept as is)."""
        if _complete(version):
            os.utime(version)
            return
        if version.exists():  # cannot come from our rename: removed rather than trusted
            shutil.rmtree(version)
        os.rename(work, version)
        os.utime(version)
        _fsync_dir(version.parent)

    def _write_index(self, key_hash: str, uri: str, digest: str) -> None:
        """Under the tier lock: the sweep at start is the only other writer of tmp/."""
        entry = self.root / "index" / key_hash
        tmp = self.root / "tmp" / f"index-{key_hash}"
        with open(tmp, "w") as out:
            json.dump({"uri": uri, "digest": digest}, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, entry)
        _fsync_dir(entry.parent)

    # ------------------------------------------------------------------------------------ pins and LRU

    def pin(self, version: Path) -> None:
        """Keep `version` (a path fetch returned) from eviction, here and in other processes on this root,
        until as many unpin calls; pins are counted (two slots may hold one version)."""
        digest = Path(version).name
        with self._pins_lock:
            count, fd = self._pins.get(digest, (0, -1))
            if count == 0:
                fd = os.open(self.root / "locks" / f"{digest}.pin", os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(fd, fcntl.LOCK_SH)
            self._pins[digest] = (count + 1, fd)

    def unpin(self, version: Path) -> None:
        digest = Path(version).name
        with self._pins_lock:
            count, fd = self._pins[digest]
            if count == 1:
                del self._pins[digest]
                os.close(fd)
            else:
                self._pins[digest] = (count - 1, fd)

    def _tier_lock(self) -> _Locked:
        return _Locked(self.root / "locks" / "tier.lock")

    def _evict(self, need: int, keep: str | None = None) -> int:
        """Under the tier lock: remove least recently used unpinned versions (never `keep`) until `need` more
        bytes fit; the bytes the tier holds afterwards."""
        versions = []
        for version in (self.root / "sha256").iterdir():
            try:
                versions.append((version.stat().st_mtime_ns, _version_bytes(version), version))
            except OSError:  # incomplete: cannot come from our rename; removed below like any other
                versions.append((0, 0, version))
        used = sum(size for _, size, _ in versions)
        for _, size, version in sorted(versions):
            if used + need <= self.max_bytes:
                break
            if version.name != keep and self._remove_unpinned(version):
                used -= size
                log.info("evicted %s (%d bytes) from the disk tier", version.name, size)
        return used

    def _remove_unpinned(self, version: Path) -> bool:
        fd = os.open(self.root / "locks" / f"{version.name}.pin", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # pinned, here or by another process
            os.close(fd)
            return False
        try:
            # Out of sha256/ in one step, so no reader sees it half removed; a crash leaves it to the sweep.
            doomed = Path(tempfile.mkdtemp(prefix="evict-", dir=self.root / "tmp"))
            os.rename(version, doomed / version.name)
        finally:
            os.close(fd)
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def _sweep_tmp(self) -> None:
        """Remove what a crashed or cut download left in tmp/ (entries locked by live downloads are kept)."""
        for entry in (self.root / "tmp").iterdir():
            fd = os.open(entry, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            finally:
                os.close(fd)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
