"""Signed control events: who may publish and activate adapters.

A control record is signed with HMAC-SHA256 over its exact value bytes and the key id, and the
signature travels in one Kafka header, `x-lorabus-signature: v1:<keyid>:<hex digest>`. Keys come
from a spec (`--control-key` / LORABUS_CONTROL_KEY): a file path, or `env:NAME` naming an
environment variable, holding one `keyid:secret` per line. The signer uses the first key; the
verifier accepts every listed key, so a key is rotated by listing the new one first on the
publishers and both on the workers until nothing signs with the old one.

Headers are whatever a producer sent, hostile ones included: `verify` never raises, it returns a
`Verdict` whose `code` is a short label for metrics and whose `reason` is safe to log.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass

SIGNATURE_HEADER = "x-lorabus-signature"
SIGNATURE_VERSION = "v1"
ENV_PREFIX = "env:"
# Domain separation: a control-event MAC cannot be mistaken for any other HMAC made with the same secret.
_MAC_CONTEXT = b"lorabus-control-v1\x00"
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_SECRET_BYTES = 16  # below this an HMAC secret is guessable; `openssl rand -hex 32` gives 64
MAX_SPEC_BYTES = 64 * 1024  # a key file is a few lines; refuse to slurp a wrong path such as a device
# A well-formed header is "v1:" + key id (≤ 64) + ":" + 64 hex digits; anything longer is not parsed.
MAX_HEADER_BYTES = len(SIGNATURE_VERSION) + 1 + 64 + 1 + 64
_HEADER_PATTERN = re.compile(r"(?P<version>[^:]*):(?P<key_id>[A-Za-z0-9._-]{1,64}):(?P<digest>[0-9a-fA-F]{64})")


class ControlKeyError(ValueError):
    """A bad key spec; the message is one line and never contains a secret."""


# Every Verdict.code: a fixed set, so it can label a metric.
VERDICT_CODES = ("ok", "no_value", "unsigned", "duplicate", "malformed", "bad_version", "unknown_key", "bad_signature")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    code: str  # one of VERDICT_CODES
    reason: str
    key_id: str | None = None


def _mac(secret: bytes, key_id: str, value: bytes) -> bytes:
    return hmac.new(secret, _MAC_CONTEXT + key_id.encode() + b"\x00" + value, hashlib.sha256).digest()


def _read_spec(spec: str) -> tuple[str, str]:
    """(where the keys came from, their text)."""
    if spec.startswith(ENV_PREFIX):
        name = spec[len(ENV_PREFIX):]
        if not name:
            raise ControlKeyError("control key spec 'env:' names no environment variable")
        if name not in os.environ:
            raise ControlKeyError(f"control key environment variable {name} is not set")
        return f"environment variable {name}", os.environ[name]
    try:
        with open(spec, "rb") as fh:
            raw = fh.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise ControlKeyError(f"control key file {spec}: {exc.strerror or exc}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise ControlKeyError(f"control key file {spec} is larger than {MAX_SPEC_BYTES} bytes")
    try:
        return f"control key file {spec}", raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ControlKeyError(f"control key file {spec} is not UTF-8 text") from None


def _parse(source: str, text: str) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key_id, sep, secret = line.partition(":")
        key_id, secret = key_id.strip(), secret.strip()
        # Messages name the line, never its content: the content may be a secret.
        if not sep or not KEY_ID_PATTERN.fullmatch(key_id):
            raise ControlKeyError(f"{source}, line {number}: expected 'keyid:secret' with a key id of [A-Za-z0-9._-]{{1,64}}")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ControlKeyError(f"{source}, line {number}: the secret of key {key_id} is shorter than {MIN_SECRET_BYTES} bytes")
        if key_id in keys:
            raise ControlKeyError(f"{source}, line {number}: key id {key_id} is listed twice")
        keys[key_id] = secret.encode()
    if not keys:
        raise ControlKeyError(f"{source} holds no 'keyid:secret' line")
    return keys


class ControlKeys:
    """The keys of one spec, in order: the first signs, all of them verify."""

    def __init__(self, keys: dict[str, bytes]):
        if not keys:
            raise ControlKeyError("no control keys")
        self._keys = dict(keys)
        self.signing_key_id = next(iter(self._keys))

    @classmethod
    def load(cls, spec: str) -> "ControlKeys":
        """Keys from a file path or `env:NAME`; ControlKeyError with a one-line reason when the spec is bad."""
        if not spec or not spec.strip():
            raise ControlKeyError("control key spec is empty")
        return cls(_parse(*_read_spec(spec.strip())))

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    def __repr__(self) -> str:  # never the secrets
        return f"ControlKeys(key_ids={self.key_ids})"

    def sign(self, value: bytes) -> tuple[str, bytes]:
        """The Kafka header that signs a record value with the first key."""
        key_id = self.signing_key_id
        digest = _mac(self._keys[key_id], key_id, bytes(value)).hex()
        return SIGNATURE_HEADER, f"{SIGNATURE_VERSION}:{key_id}:{digest}".encode()

    def verify(self, value, headers) -> Verdict:
        """Whether a record (value, headers as Kafka delivered them) carries a valid signature. Never raises."""
        try:
            return self._verify(value, headers)
        except Exception as exc:  # a hostile record must not take the control reader down
            return Verdict(False, "malformed", f"unreadable record ({type(exc).__name__})")

    def _verify(self, value, headers) -> Verdict:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            return Verdict(False, "no_value", "record has no value")
        found = [raw for key, raw in (headers or ()) if _is_signature_header(key)]
        if not found:
            return Verdict(False, "unsigned", f"no {SIGNATURE_HEADER} header")
        if len(found) > 1:
            # Two signatures are ambiguous (which one did the reader check?): refuse rather than pick.
            return Verdict(False, "duplicate", f"{len(found)} {SIGNATURE_HEADER} headers")
        raw = found[0]
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        if not isinstance(raw, (bytes, bytearray)) or len(raw) > MAX_HEADER_BYTES:
            return Verdict(False, "malformed", f"{SIGNATURE_HEADER} is not 'v1:<keyid>:<hex>'")
        try:
            text = bytes(raw).decode("ascii")
        except UnicodeDecodeError:
            return Verdict(False, "malformed", f"{SIGNATURE_HEADER} is not ASCII")
        match = _HEADER_PATTERN.fullmatch(text)
        if match is None:
            return Verdict(False, "malformed", f"{SIGNATURE_HEADER} is not 'v1:<keyid>:<hex>'")
        if match["version"] != SIGNATURE_VERSION:
            return Verdict(False, "bad_version", f"signature version is not {SIGNATURE_VERSION}")
        key_id = match["key_id"]  # safe to log: the pattern allows only [A-Za-z0-9._-]
        secret = self._keys.get(key_id)
        if secret is None:
            return Verdict(False, "unknown_key", f"unknown key id {key_id}", key_id)
        if not hmac.compare_digest(_mac(secret, key_id, bytes(value)), bytes.fromhex(match["digest"])):
            return Verdict(False, "bad_signature", f"signature does not match (key {key_id})", key_id)
        return Verdict(True, "ok", f"signed with key {key_id}", key_id)


def _is_signature_header(key) -> bool:
    if isinstance(key, (bytes, bytearray)):
        key = bytes(key).decode("utf-8", "replace")
    return isinstance(key, str) and key.strip().lower() == SIGNATURE_HEADER
