"""The topics a worker creates, and the configs the control log needs to stay whole.

The control topic is the fleet's only memory of what is published, activated and routed. It is
created compacted with no retention, with one partition (events are ordered), and its record keys
(worker/control_log.py) make compaction keep exactly the state a restarted worker needs. A control
topic that already exists is checked at start-up, with a warning for each setting that would lose
state or order. The status topic is compacted too: one record per worker id. Its records carry the
broker's clock (LogAppendTime), which readers take for a worker's liveness since a writer cannot choose
it, and are stored uncompressed, so the broker's max.message.bytes bounds what a reader must inflate.
"""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from lorabus.worker.config import WorkerConfig
from lorabus.worker.kafka_security import KafkaSecurity, client_options

log = logging.getLogger(__name__)

# retention.ms=-1: compaction alone decides what goes, even if the policy is later widened to delete.
# LogAppendTime: a signed event's freshness is judged against the broker's time on its record, which a
# writer re-sending an old record cannot choose (worker/control_log.py admit_record).
CONTROL_TOPIC_CONFIGS = {"cleanup.policy": "compact", "retention.ms": "-1", "retention.bytes": "-1",
                         "message.timestamp.type": "LogAppendTime"}
# LogAppendTime: the broker stamps each record (worker/cli/fleet_view.py is_live). compression.type=uncompressed:
# the broker inflates a compressed batch and re-checks its size against max.message.bytes, refusing a
# small record that would inflate to gigabytes in every `lorabus status`.
STATUS_TOPIC_CONFIGS = {"cleanup.policy": "compact", "message.timestamp.type": "LogAppendTime",
                        "compression.type": "uncompressed"}


async def ensure_topics(bootstrap: str, topics: dict[str, int], configs: dict[str, dict[str, str]] | None = None,
                        security: KafkaSecurity | None = None) -> None:
    """Create the topics that are missing (name → partitions), with `configs[name]` when given."""
    configs = configs or {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_options(security))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(t, n, 1, topic_configs=configs.get(t)) for t, n in topics.items() if t not in existing]
        if missing:
            response = await admin.create_topics(missing)
            # Errors come back per topic, not raised; "already exists" means another worker won the race.
            errors = [f"{topic}: {message or code}" for topic, code, message, *_ in response.topic_errors
                      if code not in (0, TopicAlreadyExistsError.errno)]
            if errors:
                raise KafkaError(f"could not create topics: {'; '.join(errors)}")
    finally:
        await admin.close()


async def ensure_worker_topics(config: WorkerConfig, lane_topics: list[str] | None = None) -> None:
    """Every topic a worker uses, created (when missing) as a worker creates them: its jobs topics (by
    default --jobs-topic; with lanes, the jobs and results topics the lanes name), results, control,
    dead-letter and status topics."""
    jobs = dict.fromkeys(lane_topics if lane_topics is not None else [config.jobs_topic], config.topic_partitions)
    await ensure_topics(config.bootstrap_servers,
                        {**jobs, config.results_topic: config.topic_partitions,
                         config.control_topic: 1, config.dlq_topic: 1, config.status_topic: 1},
                        {config.control_topic: CONTROL_TOPIC_CONFIGS, config.status_topic: STATUS_TOPIC_CONFIGS},
                        config.security)


async def topic_configs(admin: AIOKafkaAdminClient, topic: str) -> dict[str, str | None]:
    (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    (resource,) = response.resources
    error_code, _message, _type, _name, entries = resource[:5]
    if error_code:
        raise LookupError(f"describe_configs {topic}: error {error_code}")
    return {entry[0]: entry[1] for entry in entries}


def control_topic_problems(configs: dict[str, str | None], partitions: int) -> list[str]:
    """What about an existing control topic would lose state or order (empty when nothing)."""
    problems = []
    policy = {p.strip() for p in (configs.get("cleanup.policy") or "delete").split(",")}
    if "delete" in policy:
        if configs.get("retention.ms") not in ("-1", None):
            problems.append(f"cleanup.policy={','.join(sorted(policy))} with retention.ms={configs.get('retention.ms')}: "
                            "control events older than that are deleted and a restarted worker forgets them "
                            "(set cleanup.policy=compact)")
        if configs.get("retention.bytes") not in ("-1", None):
            problems.append(f"retention.bytes={configs.get('retention.bytes')}: the oldest control events are deleted "
                            "once the topic grows past it (set cleanup.policy=compact)")
    if "compact" not in policy:
        problems.append("cleanup.policy has no compact: the control log is never compacted and grows without bound")
    if partitions != 1:
        problems.append(f"{partitions} partitions: control events on different partitions have no order (use 1)")
    if configs.get("message.timestamp.type") != "LogAppendTime":
        problems.append(f"message.timestamp.type={configs.get('message.timestamp.type')}: writers choose the record "
                        "time a signed event's freshness is judged by, so a re-sent old record can pass as new "
                        "(set message.timestamp.type=LogAppendTime)")
    return problems


def status_topic_problems(configs: dict[str, str | None]) -> list[str]:
    """What about an existing status topic lets one writer mislead every reader (empty when nothing)."""
    problems = []
    if configs.get("message.timestamp.type") != "LogAppendTime":
        problems.append(f"message.timestamp.type={configs.get('message.timestamp.type')}: writers choose the record "
                        "time liveness is judged by (set message.timestamp.type=LogAppendTime)")
    if configs.get("compression.type") != "uncompressed":
        problems.append(f"compression.type={configs.get('compression.type')}: a small compressed record may inflate "
                        "far past max.message.bytes in every reader (set compression.type=uncompressed)")
    return problems


async def check_control_topic(admin: AIOKafkaAdminClient, topic: str, partitions: int) -> list[str]:
    """Warn (and return) what about the control topic would lose state; never fails start-up."""
    try:
        problems = control_topic_problems(await topic_configs(admin, topic), partitions)
    except Exception as exc:  # a broker that will not describe configs must not stop the worker
        log.warning("could not check the configs of control topic %s: %s", topic, exc)
        return []
    for problem in problems:
        log.warning("control topic %s: %s", topic, problem)
    return problems
