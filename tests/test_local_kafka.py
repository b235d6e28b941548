"""deploy/local-kafka: two real KRaft brokers side by side, a produce/consume
round-trip on each through aiokafka, then a clean stop.

Needs java (17+) and either warm caches or Maven Central access (the first run
copies the Kafka jars to ${LORABUS_CACHE:-~/.cache/lorabus}); it is deliberately
not skipped when they are missing.
"""

import asyncio
import json
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

pytestmark = pytest.mark.kafka  # starts brokers of its own

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "local-kafka"
ADDRESS = re.compile(r"127\.0\.0\.1:(\d+)\n")


def local_kafka(*args, timeout=120):
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout)


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


async def round_trip(bootstrap, topic, n=30):
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
        topics = set(await admin.list_topics())
    finally:
        await admin.close()

    sent = {f"k{i}".encode(): f"v{i}-{topic}".encode() for i in range(n)}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for k, v in sent.items():
            await producer.send(topic, v, key=k)
        await producer.flush()
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"g-{topic}",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    got, partitions = {}, set()
    try:
        deadline = time.monotonic() + 60
        while len(got) < n and time.monotonic() < deadline:
            for tp, msgs in (await consumer.getmany(timeout_ms=1000)).items():
                partitions.add(tp.partition)
                got.update((m.key, m.value) for m in msgs)
        await consumer.commit()
    finally:
        await consumer.stop()
    return topics, sent, got, partitions


def test_two_local_brokers_round_trip(tmp_path):
    data = [tmp_path / "b1", tmp_path / "b2"]
    t0 = time.monotonic()
    starts = [subprocess.Popen([str(SCRIPT), "start", "--port", "0", "--data", str(d)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for d in data]
    pids = []
    try:
        outs = [p.communicate(timeout=900) for p in starts]
        print(f"\ntwo brokers started concurrently in {time.monotonic() - t0:.1f} s")
        for p, (out, err) in zip(starts, outs):
            assert p.returncode == 0, err
            assert ADDRESS.fullmatch(out), repr(out)
        addrs = [out.strip() for out, _ in outs]
        infos = [json.loads((d / "broker.json").read_text()) for d in data]
        pids = [int((d / "broker.pid").read_text()) for d in data]
        assert addrs[0] != addrs[1]
        assert len({i["port"] for i in infos} | {i["controller_port"] for i in infos}) == 4
        assert [i["bootstrap"] for i in infos] == addrs
        for d in data:
            props = (d / "server.properties").read_text()
            assert "auto.create.topics.enable=false" in props
            assert "num.partitions=3" in props
            assert (d / "server.log").stat().st_size > 0     # a real Log4j2 log

        # start on a running data dir only reports its address
        t1 = time.monotonic()
        again = local_kafka("start", "--data", str(data[0]))
        assert again.returncode == 0, again.stderr
        assert again.stdout == addrs[0] + "\n"
        assert time.monotonic() - t1 < 10
        st = local_kafka("status", "--data", str(data[1]))
        assert st.returncode == 0 and "running" in st.stdout and addrs[1] in st.stdout

        topics = [f"lk-{i}-{uuid.uuid4().hex[:8]}" for i in range(2)]
        for i, (addr, topic) in enumerate(zip(addrs, topics)):
            listed, sent, got, partitions = asyncio.run(round_trip(addr, topic))
            assert got == sent
            assert len(partitions) > 1                       # keys spread over 3 partitions
            assert topic in listed and topics[1 - i] not in listed   # separate clusters
    finally:
        for p in starts:
            if p.poll() is None:
                p.kill()
        stops = [local_kafka("stop", "--data", str(d), timeout=60) for d in data]
    for s in stops:
        assert s.returncode == 0, s.stderr
    for pid in pids:
        assert gone(pid), pid
    for d in data:
        assert not (d / "broker.pid").exists()
        assert local_kafka("stop", "--data", str(d)).returncode == 0   # nothing running: ok
        assert local_kafka("status", "--data", str(d)).returncode == 3
    print(f"whole test {time.monotonic() - t0:.1f} s")


def load_script():
    """deploy/local-kafka as a module (it has no .py suffix)."""
    import importlib.machinery
    import importlib.util
    loader = importlib.machinery.SourceFileLoader("local_kafka_script", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def test_authorizer_settings(tmp_path):
    """--authorizer: StandardAuthorizer, no ACL means no access, the PLAINTEXT/CONTROLLER principal
    (User:ANONYMOUS) and each --super-user are super users; without it nothing of that is written."""
    lk = load_script()
    props = lk.server_properties(str(tmp_path), 9, 10, {}, sport=11, super_users=["ops"])
    assert "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer\n" in props
    assert "allow.everyone.if.no.acl.found=false\n" in props
    assert "super.users=User:ANONYMOUS;User:ops\n" in props
    plain = lk.server_properties(str(tmp_path), 9, 10, {}, sport=11)
    assert "authorizer.class.name" not in plain and "super.users" not in plain
    assert lk.parse_super_users(["User:ops", "ops", "b"]) == ["ops", "b"]
    help_text = local_kafka("start", "--help").stdout
    assert "--authorizer" in help_text and "--super-user NAME" in help_text


def test_authorizer_refusals(tmp_path):
    """Combinations that cannot hold are refused before anything starts or is wiped."""
    pem = tmp_path / "id.pem"
    pem.write_text("")
    for args, says in [(["--super-user", "ops"], "--super-user needs --authorizer"),
                       (["--authorizer", "--ssl-port", "0", "--ssl-pem", str(pem)], "--ssl-port"),
                       (["--authorizer", "--super-user", "a;b"], "--super-user wants")]:
        res = local_kafka("start", "--port", "0", "--data", str(tmp_path / "d"), "--fresh", *args, timeout=30)
        assert res.returncode == 1 and says in res.stderr, (args, res.stderr)
        assert not (tmp_path / "d" / "broker.json").exists()
