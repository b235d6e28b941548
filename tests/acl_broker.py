"""A broker of a test's own with ACLs on (issue 22, "Identity bound by the broker"): deploy/local-kafka with
--authorizer (KRaft's StandardAuthorizer, allow.everyone.if.no.acl.found=false), a SASL_PLAINTEXT/SCRAM listener
and the SCRAM users a, b (tenants), worker and operator; the lorabus topics created and the ACLs below added
through the PLAINTEXT address, whose principal (User:ANONYMOUS) is the super user.

    with acl_broker(tmp_path_factory.mktemp("kafka-acl")) as broker:
        producer = AIOKafkaProducer(bootstrap_servers=broker.sasl, **broker.options("a"))
        worker = worker_config(broker.sasl, model, security=broker.security("worker"))

The ACLs (what `kafka-acls.sh` would add; docs/trust.md "Binding tenants to broker identities"):
  tenant T   Write, Describe  topic lorabus.jobs.T (literal) and lorabus.jobs.T.* (prefixed)
             Read, Describe   topic lorabus.results.T (literal) and lorabus.results.T.* (prefixed)
  worker     Read, Describe   topic lorabus.jobs (literal) and lorabus.jobs.* (prefixed): every lane
             Write, Describe  topic lorabus.results (literal) and lorabus.results.* (prefixed), lorabus.dlq, lorabus.status
             Read, Describe, DescribeConfigs  topic lorabus.control
             Read             group lorabus* and g-* (prefixed)
             Write, Describe  transactional id lorabus-* (prefixed: the exactly-once outbox)
             IdempotentWrite  cluster
  operator   Write, Read, Describe  topic lorabus.control; Read, Describe  topic lorabus.status
Nobody else may write lorabus.control. A tenant's prefix ends in "." on purpose: a prefix lorabus.jobs.a would
also match lorabus.jobs.acme, another tenant's lane.

ACLs are created with aiokafka's CreateAcls request (its admin client has no create_acls method, and the Maven
classpath of deploy/local-kafka has no kafka-tools jar, so no AclCommand either).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.admin import CreateAclsRequest, DescribeAclsRequest

from lorabus.worker.kafka_security import KafkaSecurity, client_options
from lorabus.worker.topics import CONTROL_TOPIC_CONFIGS, STATUS_TOPIC_CONFIGS, ensure_topics

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "local-kafka"

TENANTS = ("a", "b")
WORKER, OPERATOR = "worker", "operator"
JOBS, RESULTS = "lorabus.jobs", "lorabus.results"
CONTROL, DLQ, STATUS = "lorabus.control", "lorabus.dlq", "lorabus.status"

# Kafka's wire codes (org.apache.kafka.common.resource.ResourceType, PatternType, acl.AclOperation, AclPermissionType).
RESOURCE = {"topic": 2, "group": 3, "cluster": 4, "transactional-id": 5}
PATTERN = {"literal": 3, "prefixed": 4}
OPERATION = {"All": 2, "Read": 3, "Write": 4, "Create": 5, "Delete": 6, "Alter": 7, "Describe": 8,
             "DescribeConfigs": 10, "AlterConfigs": 11, "IdempotentWrite": 12}
PERMISSION = {"Deny": 2, "Allow": 3}


class Acl(NamedTuple):
    """One ACL binding, named the way `kafka-acls.sh` names it."""
    user: str
    operation: str                 # a key of OPERATION
    resource: str                  # a key of RESOURCE
    name: str                      # "kafka-cluster" for the cluster
    pattern: str = "literal"       # or "prefixed"
    permission: str = "Allow"
    host: str = "*"

    @property
    def principal(self) -> str:
        return f"User:{self.user}"


def _topic(user: str, operations: tuple[str, ...], name: str, pattern: str = "literal") -> list[Acl]:
    return [Acl(user, op, "topic", name, pattern) for op in operations]


def _topic_tree(user: str, operations: tuple[str, ...], name: str) -> list[Acl]:
    """`name` itself and every topic below it (`name.`…), but not `name` + other letters."""
    return _topic(user, operations, name) + _topic(user, operations, name + ".", "prefixed")


def tenant_acls(tenant: str) -> list[Acl]:
    """Tenant `tenant` writes its own lane(s) and reads its own results, nothing else."""
    return (_topic_tree(tenant, ("Write", "Describe"), f"{JOBS}.{tenant}")
            + _topic_tree(tenant, ("Read", "Describe"), f"{RESULTS}.{tenant}"))


def worker_acls(user: str = WORKER) -> list[Acl]:
    return (_topic_tree(user, ("Read", "Describe"), JOBS)
            + _topic_tree(user, ("Write", "Describe"), RESULTS)
            + _topic(user, ("Write", "Describe"), DLQ) + _topic(user, ("Write", "Describe"), STATUS)
            + _topic(user, ("Read", "Describe", "DescribeConfigs"), CONTROL)
            + [Acl(user, "Read", "group", prefix, "prefixed") for prefix in ("lorabus", "g-")]
            + [Acl(user, op, "transactional-id", "lorabus-", "prefixed") for op in ("Write", "Describe")]
            + [Acl(user, "IdempotentWrite", "cluster", "kafka-cluster")])


def operator_acls(user: str = OPERATOR) -> list[Acl]:
    return _topic(user, ("Write", "Read", "Describe"), CONTROL) + _topic(user, ("Read", "Describe"), STATUS)


def lorabus_acls(tenants: tuple[str, ...] = TENANTS) -> list[Acl]:
    return [acl for t in tenants for acl in tenant_acls(t)] + worker_acls() + operator_acls()


def lorabus_topics(tenants: tuple[str, ...] = TENANTS, partitions: int = 3) -> dict[str, int]:
    """name → partitions: each tenant's lane and results topic, and the worker's own topics (created here, so a
    worker needs no Create ACL)."""
    topics = {JOBS: partitions, RESULTS: partitions, CONTROL: 1, DLQ: 1, STATUS: 1}
    for t in tenants:
        topics.update({f"{JOBS}.{t}": partitions, f"{RESULTS}.{t}": partitions})
    return topics


def _wire(acl: Acl) -> tuple:
    return (RESOURCE[acl.resource], acl.name, PATTERN[acl.pattern], acl.principal, acl.host,
            OPERATION[acl.operation], PERMISSION[acl.permission])


async def described_acls(admin: AIOKafkaAdminClient) -> set[tuple]:
    """Every ACL binding the broker's authorizer holds (DescribeAcls matching any), as _wire tuples."""
    response = await admin._send_request(DescribeAclsRequest(1, None, 1, None, None, 1, 1))
    if response.error_code:
        raise RuntimeError(f"DescribeAcls: {response.error_message or response.error_code}")
    return {(rtype, name, pattern, *acl) for rtype, name, pattern, acls in response.resources for acl in acls}


async def create_acls(bootstrap: str, acls: list[Acl], security: KafkaSecurity | None = None,
                      timeout: float = 30) -> None:
    """Add `acls` through `bootstrap` (a super user's address) and wait until the broker's authorizer holds
    them (the controller commits them to the metadata log; the broker applies that log a moment later).
    Raises on any refusal."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_options(security))
    await admin.start()
    try:
        responses = await asyncio.gather(*(admin._send_request(CreateAclsRequest(*_wire(a))) for a in acls))
        errors = [f"{acl}: {message or code}" for acl, response in zip(acls, responses)
                  for code, message in response.creation_responses if code]
        if errors:
            raise RuntimeError("CreateAcls refused: " + "; ".join(errors))
        wanted, deadline = {_wire(a) for a in acls}, asyncio.get_running_loop().time() + timeout
        while missing := wanted - await described_acls(admin):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"after {timeout:g} s the broker still lacks {len(missing)} ACLs, e.g. "
                                   f"{sorted(missing)[0]}")
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


@dataclass(frozen=True)
class AclBroker:
    plain: str                     # PLAINTEXT: User:ANONYMOUS, a super user (the operator's admin address)
    sasl: str                      # SASL_PLAINTEXT with SCRAM: every client here is held to the ACLs
    passwords: dict[str, str] = field(repr=False)
    data: Path
    acls: tuple[Acl, ...]

    @property
    def log(self) -> Path:
        return self.data / "server.log"

    def security(self, user: str, mechanism: str = "SCRAM-SHA-256") -> KafkaSecurity:
        return KafkaSecurity("SASL_PLAINTEXT", mechanism, user, self.passwords[user])

    def options(self, user: str, mechanism: str = "SCRAM-SHA-256") -> dict:
        """aiokafka keyword arguments that log in as `user` (use with bootstrap_servers=self.sasl)."""
        return client_options(self.security(user, mechanism))


def _run(coro):
    """Run `coro` to the end from sync code, also when called inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@contextlib.contextmanager
def acl_broker(data: Path, tenants: tuple[str, ...] = TENANTS, users: tuple[str, ...] = (),
               topics: dict[str, int] | None = None, acls: list[Acl] | None = None,
               extra_acls: list[Acl] = ()) -> Iterator[AclBroker]:
    """Start a broker of its own in `data` with ACLs on and SCRAM users `tenants` + worker + operator + `users`;
    create `topics` (default lorabus_topics(tenants), the control and status topics with the worker's configs)
    and `acls` (default lorabus_acls(tenants)) + `extra_acls` through the super-user address; stop it on exit."""
    names = tuple(dict.fromkeys((*tenants, WORKER, OPERATOR, *users)))
    passwords = {name: secrets.token_hex(8) for name in names}
    cmd = [sys.executable, str(SCRIPT), "start", "--port", "0", "--data", str(data), "--sasl-port", "0",
           "--authorizer"]
    for name, password in passwords.items():
        cmd += ["--scram-user", f"{name}={password}"]
    started = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    if started.returncode != 0:
        raise RuntimeError(f"deploy/local-kafka start failed (exit {started.returncode}):\n{started.stderr[-4000:]}")
    try:
        info = json.loads((data / "broker.json").read_text())
        assert info.get("authorizer"), info
        acls = list(lorabus_acls(tenants) if acls is None else acls) + list(extra_acls)
        topics = lorabus_topics(tenants) if topics is None else topics
        configs = {CONTROL: CONTROL_TOPIC_CONFIGS, STATUS: STATUS_TOPIC_CONFIGS}
        _run(ensure_topics(info["bootstrap"], topics, {t: c for t, c in configs.items() if t in topics}))
        _run(create_acls(info["bootstrap"], acls))
        yield AclBroker(info["bootstrap"], info["sasl_bootstrap"], passwords, data, tuple(acls))
    finally:
        subprocess.run([sys.executable, str(SCRIPT), "stop", "--data", str(data)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=180)
