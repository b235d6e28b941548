"""How lorabus's Kafka clients authenticate and encrypt, for managed clusters that refuse plain text.

`KafkaSecurity` holds the settings (the `--security-protocol`, `--sasl-*` and `--ssl-*` flags of every
`lorabus` command, and `LORABUS_*` variables); `client_options(security)` turns them into the keyword
arguments every aiokafka client lorabus creates (consumers, producers, admin clients) is built with.
Secrets are never part of a repr or a log line: a password is given as text, as `env:NAME`, or
through `LORABUS_SASL_PASSWORD`.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass, field

from aiokafka.helpers import create_ssl_context

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class KafkaSecurityError(ValueError):
    """A security setting that cannot work (unknown name, missing file or secret); one line for the user."""


class ConnectFailures(logging.Filter):
    """aiokafka raises only "Unable to bootstrap from [...]" when no broker takes the connection, and logs
    why (refused, SaslAuthenticationFailed, a TLS error) on its own ERROR line. Installed on the "aiokafka"
    logger, this keeps the latest such line for a command's error message, and with `hide` drops it from
    the log (a short-lived command then prints one line, not two)."""

    def __init__(self, hide: bool = True):
        super().__init__()
        self.hide = hide
        self.cause = ""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith("Unable connect to"):
            self.cause = text
            return not self.hide
        return True



@dataclass(frozen=True)
class KafkaSecurity:
    security_protocol: str = field(default="PLAINTEXT", metadata=dict(help=
        "how clients talk to the brokers: PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL (login over TLS)"))
    sasl_mechanism: str = field(default="PLAIN", metadata=dict(help=
        "SASL login: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with a SASL_* protocol)"))
    sasl_username: str = field(default="", metadata=dict(help="SASL user name"))
    sasl_password: str = field(default="", repr=False, metadata=dict(help=
        "SASL password, or env:NAME to read it from variable NAME (that, or LORABUS_SASL_PASSWORD, keeps it out of `ps`)"))
    ssl_cafile: str = field(default="", metadata=dict(help=
        "PEM file of the CAs that signed the brokers' certificates (default: the system's CAs)"))
    ssl_certfile: str = field(default="", metadata=dict(help="PEM client certificate, for clusters that want mutual TLS"))
    ssl_keyfile: str = field(default="", metadata=dict(help="PEM private key of --ssl-certfile"))
    ssl_password: str = field(default="", repr=False, metadata=dict(help=
        "password of an encrypted --ssl-keyfile, or env:NAME"))


def _secret(flag: str, value: str) -> str:
    if not value.startswith("env:"):
        return value
    name = value[len("env:"):]
    if name not in os.environ:
        raise KafkaSecurityError(f"--{flag}: environment variable {name} is not set")
    return os.environ[name]


def _ssl_context(security: KafkaSecurity) -> ssl.SSLContext:
    for flag, path in (("ssl-cafile", security.ssl_cafile), ("ssl-certfile", security.ssl_certfile),
                       ("ssl-keyfile", security.ssl_keyfile)):
        if path and not os.path.isfile(path):
            raise KafkaSecurityError(f"--{flag} {path}: no such file")
    if security.ssl_keyfile and not security.ssl_certfile:
        raise KafkaSecurityError("--ssl-keyfile needs --ssl-certfile")
    try:
        return create_ssl_context(cafile=security.ssl_cafile or None, certfile=security.ssl_certfile or None,
                                  keyfile=security.ssl_keyfile or None,
                                  password=_secret("ssl-password", security.ssl_password) or None)
    except (ssl.SSLError, OSError) as exc:  # not PEM, key not matching the certificate, wrong key password
        files = ", ".join(p for p in (security.ssl_cafile, security.ssl_certfile, security.ssl_keyfile) if p)
        raise KafkaSecurityError(f"cannot use TLS files {files}: {exc}") from None


def client_options(security: KafkaSecurity | None) -> dict:
    """Keyword arguments for AIOKafkaConsumer/Producer/AdminClient; {} for None (plain text).
    Raises KafkaSecurityError for settings that cannot work, before any connection is tried."""
    if security is None:
        return {}
    protocol = security.security_protocol.upper()
    if protocol not in SECURITY_PROTOCOLS:
        raise KafkaSecurityError(f"--security-protocol {security.security_protocol}: "
                                 f"expected one of {', '.join(SECURITY_PROTOCOLS)}")
    uses_tls, uses_sasl = protocol in ("SSL", "SASL_SSL"), protocol.startswith("SASL_")
    # A setting the protocol would silently ignore is a mistake (e.g. a password sent nowhere).
    if not uses_sasl and (security.sasl_username or security.sasl_password):
        raise KafkaSecurityError(f"--sasl-username/--sasl-password need --security-protocol SASL_PLAINTEXT "
                                 f"or SASL_SSL (it is {protocol})")
    if not uses_tls and (security.ssl_cafile or security.ssl_certfile or security.ssl_keyfile):
        raise KafkaSecurityError(f"--ssl-* files need --security-protocol SSL or SASL_SSL (it is {protocol})")
    options: dict = {"security_protocol": protocol}
    if uses_tls:
        options["ssl_context"] = _ssl_context(security)
    if uses_sasl:
        mechanism = security.sasl_mechanism.upper()
        if mechanism not in SASL_MECHANISMS:
            raise KafkaSecurityError(f"--sasl-mechanism {security.sasl_mechanism}: "
                                     f"expected one of {', '.join(SASL_MECHANISMS)}")
        password = _secret("sasl-password", security.sasl_password)
        if not security.sasl_username or not password:
            raise KafkaSecurityError(f"{protocol} needs --sasl-username and --sasl-password "
                                     "(or LORABUS_SASL_PASSWORD)")
        options.update(sasl_mechanism=mechanism, sasl_plain_username=security.sasl_username,
                       sasl_plain_password=password)
    return options
