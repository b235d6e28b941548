"""What the Kafka client commands share when they talk to the broker: the errors that mean it could not
be reached (or was too slow), why in one line, and the wall clock their event times and liveness use
(`_now_ms`, the one place tests fix it)."""

from __future__ import annotations

import time

from lorabus.worker.kafka_security import ConnectFailures


# What reading or writing a topic can raise: the broker unreachable or refusing, or too slow.
def _kafka_errors() -> tuple[type[BaseException], ...]:
    from aiokafka.errors import KafkaError

    return (KafkaError, OSError, TimeoutError, LookupError)


# Why aiokafka could not connect (e.g. SaslAuthenticationFailed) is on its own log line, not in the exception:
# kept (installed in main) for the commands' error messages; the client commands print only those.
_CONNECT_FAILURES = ConnectFailures()


def _why(exc: BaseException) -> str:
    from aiokafka.errors import KafkaConnectionError

    if isinstance(exc, KafkaConnectionError) and _CONNECT_FAILURES.cause:
        return _CONNECT_FAILURES.cause
    return str(exc) if str(exc).startswith(type(exc).__name__) else f"{type(exc).__name__}: {exc}"


def _now_ms() -> int:
    return int(time.time() * 1000)
