"""Signed control events (worker/signing.py): round trip, key rotation, tampering, hostile headers, key specs."""

import hashlib
import hmac

import pytest

from lorabus.schemas import AdapterPublish, encode
from lorabus.worker import cli
from lorabus.worker.signing import SIGNATURE_HEADER, VERDICT_CODES, ControlKeyError, ControlKeys

NEW = "k2:" + "n" * 32
OLD = "k1:" + "o" * 32
VALUE = encode(AdapterPublish("fin", "v1", "/adapters/fin-v1"))


def keys_from(tmp_path, *lines: str, name: str = "keys") -> ControlKeys:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return ControlKeys.load(str(path))


def test_sign_verify_round_trip(tmp_path):
    keys = keys_from(tmp_path, NEW)
    header = keys.sign(VALUE)
    assert header[0] == SIGNATURE_HEADER
    version, key_id, digest = header[1].decode().split(":")
    assert (version, key_id, len(digest)) == ("v1", "k2", 64)
    verdict = keys.verify(VALUE, [header])
    assert verdict.ok and verdict.code == "ok" and verdict.key_id == "k2"
    # Other headers around it do not matter; the header name is matched case-insensitively.
    assert keys.verify(VALUE, [("x-tenant-id", b"acme"), (SIGNATURE_HEADER.upper(), header[1])]).ok
    assert keys.verify(bytearray(VALUE), (header,)).ok


def test_signature_is_hmac_sha256_over_key_id_and_value(tmp_path):
    """The documented format, so a producer in another language can sign: pin the MAC input."""
    keys = keys_from(tmp_path, NEW)
    want = hmac.new(b"n" * 32, b"lorabus-control-v1\x00k2\x00" + VALUE, hashlib.sha256).hexdigest()
    assert keys.sign(VALUE)[1] == f"v1:k2:{want}".encode()


def test_rotation_signs_with_first_key_and_accepts_all(tmp_path):
    workers = keys_from(tmp_path, NEW, OLD, name="workers")
    old_publisher = keys_from(tmp_path, OLD, name="old")
    new_publisher = keys_from(tmp_path, NEW, OLD, name="new")
    assert workers.key_ids == ["k2", "k1"] and workers.signing_key_id == "k2"
    assert workers.verify(VALUE, [old_publisher.sign(VALUE)]).key_id == "k1"
    assert workers.verify(VALUE, [new_publisher.sign(VALUE)]).key_id == "k2"
    # After rotation the old key is dropped from the workers: its signatures no longer pass.
    rotated = keys_from(tmp_path, NEW, name="rotated")
    verdict = rotated.verify(VALUE, [old_publisher.sign(VALUE)])
    assert not verdict.ok and verdict.code == "unknown_key" and "k1" in verdict.reason


def test_tampered_value_fails(tmp_path):
    keys = keys_from(tmp_path, NEW)
    header = keys.sign(VALUE)
    tampered = VALUE.replace(b"/adapters/fin-v1", b"/etc/passwd-xxxx")
    verdict = keys.verify(tampered, [header])
    assert not verdict.ok and verdict.code == "bad_signature"
    assert not keys.verify(VALUE + b" ", [header]).ok


def test_wrong_secret_and_swapped_key_id_fail(tmp_path):
    workers = keys_from(tmp_path, NEW, OLD, name="workers")
    forger = keys_from(tmp_path, "k2:" + "x" * 32, name="forger")  # right key id, wrong secret
    verdict = workers.verify(VALUE, [forger.sign(VALUE)])
    assert not verdict.ok and verdict.code == "bad_signature" and verdict.key_id == "k2"
    # A valid k1 digest relabelled as k2 does not pass: the key id is part of the MAC.
    digest = keys_from(tmp_path, OLD, name="old").sign(VALUE)[1].decode().split(":")[2]
    assert workers.verify(VALUE, [(SIGNATURE_HEADER, f"v1:k2:{digest}".encode())]).code == "bad_signature"
    assert workers.verify(VALUE, [(SIGNATURE_HEADER, f"v1:k9:{digest}".encode())]).code == "unknown_key"


def test_unsigned_and_valueless_records_fail(tmp_path):
    keys = keys_from(tmp_path, NEW)
    for headers in (None, [], (), [("x-tenant-id", b"acme")]):
        verdict = keys.verify(VALUE, headers)
        assert not verdict.ok and verdict.code == "unsigned", headers
    verdict = keys.verify(None, [keys.sign(VALUE)])
    assert not verdict.ok and verdict.code == "no_value"


@pytest.mark.parametrize("raw, code", [
    (b"", "malformed"),
    (b"v1", "malformed"),
    (b"v1:k2", "malformed"),
    (b"v1:k2:zz", "malformed"),
    (b"\xff\xfe\x00garbage", "malformed"),  # not UTF-8
    (b"v1:k2:" + b"\xe9" * 64, "malformed"),
    (b"v1:k2:" + b"a" * 64 + b":extra", "malformed"),
    (b"v1:k\xc3\xa9:" + b"a" * 64, "malformed"),  # non-ASCII key id
    (b"v1:" + b"k" * 10_000 + b":" + b"a" * 64, "malformed"),  # huge
    (b"v2:k2:" + b"a" * 64, "bad_version"),
    (None, "malformed"),
    ("v1:k2:" + "a" * 64, "bad_signature"),  # a str value is read as text, and checked
    (12345, "malformed"),
])
def test_garbage_signature_headers_never_raise(tmp_path, raw, code):
    keys = keys_from(tmp_path, NEW)
    verdict = keys.verify(VALUE, [(SIGNATURE_HEADER, raw)])
    assert not verdict.ok and verdict.code == code and code in VERDICT_CODES, verdict
    assert "\n" not in verdict.reason and len(verdict.reason) < 200


@pytest.mark.parametrize("headers", [
    [(None, b"x")],
    [(b"\xff\xfe", b"x")],
    [(123, b"x")],
    [("only-one-element",)],
    [(SIGNATURE_HEADER, b"a", b"b")],
    "not a header list",
    12,
    [object()],
    [(SIGNATURE_HEADER, "\ud800")],  # a lone surrogate cannot be encoded
    [("x-lorabus-signature\udcff", b"v1:k2:" + b"a" * 64)],  # a non-UTF-8 key, surrogate-escaped by the reader
    [("\udcff\udcfe", b"\xff")],
])
def test_hostile_header_lists_never_raise(tmp_path, headers):
    keys = keys_from(tmp_path, NEW)
    verdict = keys.verify(VALUE, headers)
    assert not verdict.ok and verdict.code in ("unsigned", "malformed"), verdict


def test_duplicate_signature_headers_are_refused(tmp_path):
    keys = keys_from(tmp_path, NEW)
    good = keys.sign(VALUE)
    # Even two copies of a valid signature: which one a reader checks must not matter.
    for headers in ([good, good], [good, (SIGNATURE_HEADER, b"junk")], [(SIGNATURE_HEADER, b"junk"), good],
                    [good, ("X-Lorabus-Signature", good[1])]):
        verdict = keys.verify(VALUE, headers)
        assert not verdict.ok and verdict.code == "duplicate", headers


def test_uppercase_hex_digest_verifies(tmp_path):
    keys = keys_from(tmp_path, NEW)
    _, raw = keys.sign(VALUE)
    version, key_id, digest = raw.decode().split(":")
    assert keys.verify(VALUE, [(SIGNATURE_HEADER, f"{version}:{key_id}:{digest.upper()}".encode())]).ok


def test_env_spec(monkeypatch):
    monkeypatch.setenv("LB_TEST_KEYS", f"{NEW}\n{OLD}\n")
    keys = ControlKeys.load("env:LB_TEST_KEYS")
    assert keys.key_ids == ["k2", "k1"]
    assert keys.verify(VALUE, [keys.sign(VALUE)]).ok
    monkeypatch.delenv("LB_TEST_KEYS")
    with pytest.raises(ControlKeyError, match="LB_TEST_KEYS is not set"):
        ControlKeys.load("env:LB_TEST_KEYS")
    monkeypatch.setenv("LB_TEST_KEYS", "")
    with pytest.raises(ControlKeyError, match="holds no"):
        ControlKeys.load("env:LB_TEST_KEYS")
    with pytest.raises(ControlKeyError, match="names no environment variable"):
        ControlKeys.load("env:")


def test_comments_blank_lines_crlf_and_colons_in_secrets(tmp_path):
    path = tmp_path / "keys"
    path.write_bytes(b"# rotated 2026-05\r\n\r\nk2:" + b"s:e:c" * 8 + b"\r\n  k1 : " + b"o" * 32 + b"  \r\n")
    keys = ControlKeys.load(str(path))
    assert keys.key_ids == ["k2", "k1"]
    want = hmac.new(b"s:e:c" * 8, b"lorabus-control-v1\x00k2\x00" + VALUE, hashlib.sha256).hexdigest()
    assert keys.sign(VALUE)[1].decode().endswith(want)


@pytest.mark.parametrize("content, message", [
    ("", "holds no"),
    ("\n# only a comment\n\n", "holds no"),
    ("no-colon-here-" + "s" * 32 + "\n", "line 1: expected 'keyid:secret'"),
    (f"{NEW}\nbad key:{'s' * 32}\n", "line 2: expected"),
    (f"{NEW}\n:{'s' * 32}\n", "line 2: expected"),
    (f"{NEW}\nk3:\n", "line 2: the secret of key k3 is shorter"),
    ("k1:short\n", "shorter than 16 bytes"),
    (f"{NEW}\n{OLD}\nk2:{'z' * 32}\n", "line 3: key id k2 is listed twice"),
])
def test_bad_key_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "keys"
    path.write_text(content)
    with pytest.raises(ControlKeyError, match=message) as info:
        ControlKeys.load(str(path))
    text = str(info.value)
    assert "\n" not in text and str(path) in text
    assert "s" * 32 not in text and "z" * 32 not in text and "short" not in text.replace("shorter", "")


def test_missing_unreadable_and_odd_key_files(tmp_path):
    with pytest.raises(ControlKeyError, match="No such file"):
        ControlKeys.load(str(tmp_path / "missing"))
    with pytest.raises(ControlKeyError, match="Is a directory"):
        ControlKeys.load(str(tmp_path))
    with pytest.raises(ControlKeyError, match="empty"):
        ControlKeys.load("")
    (tmp_path / "binary").write_bytes(b"k1:\xff" + b"x" * 32)
    with pytest.raises(ControlKeyError, match="not UTF-8"):
        ControlKeys.load(str(tmp_path / "binary"))
    (tmp_path / "huge").write_text(f"{NEW}\n" + "#" * 70_000)
    with pytest.raises(ControlKeyError, match="larger than"):
        ControlKeys.load(str(tmp_path / "huge"))


def test_repr_never_shows_secrets(tmp_path):
    keys = keys_from(tmp_path, NEW, OLD)
    assert "k2" in repr(keys) and "nnnn" not in repr(keys) and "oooo" not in repr(keys)


@pytest.mark.parametrize("command", [["publish", "fin", "v1", "/adapters/x"], ["activate", "fin", "v1"]])
def test_cli_bad_control_key_is_a_one_line_error(tmp_path, capsys, command):
    """No broker needed: the key spec is read before anything is sent."""
    rc = cli.main([command[0], "--bootstrap-servers", "127.0.0.1:1", "--control-key", str(tmp_path / "missing"),
                   *command[1:]])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"lorabus {command[0]}: control key file") and err.count("\n") == 1


def test_cli_control_key_from_environment(monkeypatch):
    monkeypatch.setenv("LORABUS_CONTROL_KEY", "env:SOME_KEYS")
    args = cli.build_parser().parse_args(["activate", "fin", "v1"])
    assert args.control_key == "env:SOME_KEYS"
    assert cli.build_parser().parse_args(["activate", "fin", "v1", "--control-key", "/k"]).control_key == "/k"
