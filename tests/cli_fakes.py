"""Stand-ins for the control-plane CLI tests: a fixed clock, worker status records, and the CLI's Kafka
calls stubbed (`FakeBroker`), so the CLI's checks and exit codes run without a broker."""

from lorabus.schemas import VersionStatus, WorkerStatus
from lorabus.worker import cli, client
from lorabus.worker.cli import broker, control
from lorabus.worker.control_log import ControlLog

NOW = 1_800_000_000_000


def fake_status(worker: str, control_offset: int, *, ts_ms: int = NOW, versions=(), serving=None, activated=None,
                routes=(), resident=(), **fields) -> WorkerStatus:
    return WorkerStatus(worker=worker, ts_ms=ts_ms, started_ms=NOW - 60_000, control_offset=control_offset,
                        serving=serving or {}, activated=activated or {},
                        versions=[VersionStatus(*v) for v in versions], resident=list(resident), host_cached=0,
                        routes=list(routes), **fields)


class FakeBroker:
    """Stands in for worker/client.py's Kafka calls: a control log to read, statuses that appear after
    the send, and a record of what was sent."""

    def __init__(self, monkeypatch, log: ControlLog, statuses_after_send=None):
        self.log, self.sent, self.statuses = log, [], statuses_after_send or (lambda offset: {})

        async def read_control_log(bootstrap, topic, timeout_s=30.0, security=None, signed=None):
            return self.log

        async def publish_control(bootstrap, topic, events, signer=None, security=None):
            self.sent += events
            return [self.log.end_offset + i for i in range(len(events))]

        async def read_statuses(bootstrap, topic, timeout_s=30.0, security=None, max_bytes=None):
            return self.statuses(self.log.end_offset) if self.sent else {}

        async def ensure_topics(bootstrap, topics, configs=None, security=None):
            return None

        monkeypatch.setattr(client, "read_control_log", read_control_log)
        monkeypatch.setattr(client, "publish_control", publish_control)
        monkeypatch.setattr(client, "read_statuses", read_statuses)
        monkeypatch.setattr("lorabus.worker.topics.ensure_topics", ensure_topics)
        monkeypatch.setattr(control, "WAIT_POLL_S", 0.01)
        monkeypatch.setattr(broker, "_now_ms", lambda: NOW)


def run_cli(*argv):
    return cli.main([*argv[:2], "--bootstrap-servers", "127.0.0.1:1", *argv[2:]]
                    if argv[0] == "rollout" else [argv[0], "--bootstrap-servers", "127.0.0.1:1", *argv[1:]])
