"""worker/kafka_security.py without a broker: the aiokafka options each setting becomes, TLS contexts built
from a CA, certificate and key made here with the openssl command, and the one-line errors for settings
that cannot work (the broker side is tests/test_sasl_kafka.py)."""

import logging
import ssl
import subprocess

import pytest

from lorabus.worker.cli import build_parser, main
from lorabus.worker.cli.broker import _CONNECT_FAILURES
from lorabus.worker.cli.flags import _config_from
from lorabus.worker.cli.serve import _check_worker_config
from lorabus.worker.kafka_security import ConnectFailures, KafkaSecurity, KafkaSecurityError, client_options


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, and a client certificate it signed with an unencrypted and an encrypted copy of its key."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=lorabus-test-ca", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr",
            "-subj", "/CN=lorabus-client", cwd=d)
    openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "client.pem", "-days", "2", cwd=d)
    openssl("pkey", "-in", "client.key", "-aes256", "-passout", "pass:key-secret", "-out", "client-enc.key", cwd=d)
    return d


def test_plaintext_and_none():
    assert client_options(None) == {}
    assert client_options(KafkaSecurity()) == {"security_protocol": "PLAINTEXT"}


def test_sasl_options_and_env_password(monkeypatch):
    scram = KafkaSecurity("SASL_PLAINTEXT", "scram-sha-512", "alice", "pw-1")
    assert client_options(scram) == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                                     "sasl_plain_username": "alice", "sasl_plain_password": "pw-1"}
    assert "pw-1" not in repr(scram)  # configs get logged; secrets must not
    monkeypatch.setenv("KAFKA_PW_TEST", "from-env")
    from_env = KafkaSecurity("SASL_PLAINTEXT", "PLAIN", "alice", "env:KAFKA_PW_TEST")
    assert client_options(from_env)["sasl_plain_password"] == "from-env"
    monkeypatch.delenv("KAFKA_PW_TEST")
    with pytest.raises(KafkaSecurityError, match="KAFKA_PW_TEST is not set"):
        client_options(from_env)


@pytest.mark.parametrize("security, message", [
    (KafkaSecurity("SASL"), "expected one of PLAINTEXT, SSL"),
    (KafkaSecurity("SASL_PLAINTEXT", "GSSAPI", "alice", "pw"), "--sasl-mechanism GSSAPI"),
    (KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-256", "alice"), "needs --sasl-username and --sasl-password"),
    (KafkaSecurity(sasl_username="alice", sasl_password="pw"), "need --security-protocol SASL_PLAINTEXT"),
    (KafkaSecurity(ssl_cafile="/etc/hosts"), "need --security-protocol SSL or SASL_SSL"),
    (KafkaSecurity("SSL", ssl_cafile="/nonexistent/ca.pem"), "--ssl-cafile /nonexistent/ca.pem: no such file"),
])
def test_settings_that_cannot_work(security, message):
    with pytest.raises(KafkaSecurityError, match=message):
        client_options(security)


def test_tls_context_from_generated_files(pki):
    options = client_options(KafkaSecurity("SASL_SSL", "SCRAM-SHA-256", "alice", "pw", ssl_cafile=str(pki / "ca.pem"),
                                           ssl_certfile=str(pki / "client.pem"), ssl_keyfile=str(pki / "client.key")))
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    issuers = [dict(entry[0] for entry in ca["subject"]) for ca in context.get_ca_certs()]
    assert issuers == [{"commonName": "lorabus-test-ca"}]  # only the given CA, not the system's
    assert options["sasl_mechanism"] == "SCRAM-SHA-256"


def test_tls_key_password_and_bad_files(pki, monkeypatch):
    monkeypatch.setenv("KEY_PW_TEST", "key-secret")
    ok = KafkaSecurity("SSL", ssl_certfile=str(pki / "client.pem"), ssl_keyfile=str(pki / "client-enc.key"),
                       ssl_password="env:KEY_PW_TEST")
    assert isinstance(client_options(ok)["ssl_context"], ssl.SSLContext)
    with pytest.raises(KafkaSecurityError, match="cannot use TLS files"):
        client_options(KafkaSecurity("SSL", ssl_certfile=str(pki / "client.pem"),
                                     ssl_keyfile=str(pki / "client-enc.key"), ssl_password="wrong"))
    with pytest.raises(KafkaSecurityError, match="cannot use TLS files"):  # a file that is not PEM
        client_options(KafkaSecurity("SSL", ssl_cafile=str(pki / "client.csr")))
    with pytest.raises(KafkaSecurityError, match="--ssl-keyfile needs --ssl-certfile"):
        client_options(KafkaSecurity("SSL", ssl_keyfile=str(pki / "client.key")))


def test_worker_flags_and_environment(monkeypatch):
    monkeypatch.setenv("LORABUS_SASL_PASSWORD", "env-secret")
    monkeypatch.setenv("LORABUS_SECURITY_PROTOCOL", "SASL_SSL")
    args = build_parser().parse_args(["worker", "--sasl-mechanism", "SCRAM-SHA-256", "--sasl-username", "bob",
                                      "--auto-offset-reset", "latest"])
    config = _config_from(args)
    assert config.security == KafkaSecurity("SASL_SSL", "SCRAM-SHA-256", "bob", "env-secret")
    assert config.auto_offset_reset == "latest"
    _check_worker_config(config)
    args = build_parser().parse_args(["worker", "--auto-offset-reset", "newest"])
    with pytest.raises(ValueError, match="--auto-offset-reset 'newest'"):
        _check_worker_config(_config_from(args))
    assert build_parser().parse_args(["worker"]).auto_offset_reset == "earliest"


@pytest.mark.parametrize("command", [["produce"], ["status"], ["publish", "n", "v", "/tmp"], ["rollout", "warm", "n", "v"],
                                     ["worker"]])
def test_client_commands_refuse_bad_settings_in_one_line(command, capsys):
    rc = main([*command, "--bootstrap-servers", "127.0.0.1:1", "--security-protocol", "SASL_PLAINTEXT",
               "--sasl-username", "alice"])
    assert _CONNECT_FAILURES not in logging.getLogger("aiokafka").filters  # main leaves logging as it was
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "needs --sasl-username and --sasl-password" in err, err


def test_connect_failures_keep_the_cause():
    failures = ConnectFailures()
    record = logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, 'Unable connect to "%s:%s": %s',
                               ("h", 1, "[Error 58] SaslAuthenticationFailed: invalid credentials"), None)
    assert failures.filter(record) is False  # hidden: the command's own line carries it
    assert failures.cause.endswith("[Error 58] SaslAuthenticationFailed: invalid credentials")
    failures.hide = False
    assert failures.filter(record) is True
