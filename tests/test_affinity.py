"""Adapter affinity: the producer's record keys (worker/affinity.py) and the eviction preference they feed
(scheduler/policy.py `AdapterSlots.affinity`)."""

from aiokafka.partitioner import DefaultPartitioner

from lorabus.scheduler.policy import AdapterSlots
from lorabus.worker.affinity import AffinityKeyer, HomeAdapters, adapter_hint, job_key

PARTITIONS = 12


def partition_of(key: bytes) -> int:
    """Where Kafka's default partitioner (murmur2, as the Java client) sends a record with this key."""
    every = list(range(PARTITIONS))
    return DefaultPartitioner()(key, every, every)


def job(i: int, adapter: str | None = None, task: str | None = None) -> dict:
    return {"id": f"j-{i}", "tenant": "t", "adapter": adapter, "task": task, "prompt": "x"}


def test_keys_are_stable_across_producers():
    a, b = AffinityKeyer(PARTITIONS, window=100), AffinityKeyer(PARTITIONS, window=100)
    jobs = [job(i, adapter=f"ad-{i % 3}") for i in range(300)]
    assert [a.key(j) for j in jobs] == [b.key(j) for j in jobs]
    assert a.key(job(1, adapter="x")).startswith("x#")


def test_base_model_jobs_are_keyed_by_id_and_spread():
    keyer = AffinityKeyer(PARTITIONS)
    keys = [job_key(job(i), keyer) for i in range(200)]
    assert keys == [f"j-{i}".encode() for i in range(200)]
    assert len({partition_of(k) for k in keys}) == PARTITIONS
    assert job_key(job(7, adapter="a")) == b"j-7"  # no keyer: keyed by id


def test_task_jobs_are_keyed_by_task():
    keyer = AffinityKeyer(PARTITIONS)
    assert keyer.key(job(1, task="ner")) == "task:ner#0"
    assert keyer.key(job(2, adapter="fin", task="ner")).startswith("fin#")


def test_salt_count_grows_with_traffic_share():
    keyer = AffinityKeyer(PARTITIONS, window=100)
    assert keyer.salts("hot") == 1  # a fresh producer starts every adapter on one partition
    for i in range(10):
        keyer.key(job(i, adapter="hot"))
    assert keyer.salts("hot") == 2  # 10% of the window × 12 partitions → ceil(1.2)
    for i in range(10, 50):
        keyer.key(job(i, adapter="hot"))
    assert keyer.salts("hot") == 6  # 50%
    for i in range(50, 150):  # the window slides: hot's share falls as others take the traffic
        keyer.key(job(i, adapter=f"cold-{i}"))
    assert keyer.salts("hot") == 1
    capped = AffinityKeyer(PARTITIONS, window=10, max_salts=3)
    for i in range(10):
        capped.key(job(i, adapter="hot"))
    assert capped.salts("hot") == 3


def test_hot_adapter_spreads_over_several_partitions_cold_one_stays_on_one():
    keyer = AffinityKeyer(PARTITIONS, window=200)
    hot_parts, cold_parts = set(), set()
    for i in range(400):  # hot: 3/4 of the traffic; cold: 1/4 spread over 50 adapters
        if i % 4:
            key = job_key(job(i, adapter="hot"), keyer)
            hot_parts.add(partition_of(key))
        else:
            key = job_key(job(i, adapter=f"cold-{i % 200}"), keyer)
            if i % 200 == 0:
                cold_parts.add(partition_of(key))
    assert keyer.salts("hot") == 9  # 150 of the last 200 jobs × 12 partitions
    assert 3 <= len(hot_parts) <= keyer.salts("hot")
    assert len(cold_parts) == 1  # cold-0's jobs all land on one partition


def test_adapter_hint_reads_header_then_affinity_key():
    assert adapter_hint(b"fin@v2#3", []) == "fin@v2"
    assert adapter_hint(b"fin#0", [("x-adapter-id", b"other")]) == "other"
    assert adapter_hint(b"task:ner#0", []) is None  # a route decides, per user
    assert adapter_hint(b"j-17", []) is None
    assert adapter_hint(b"id#x", []) is None
    assert adapter_hint(None, None) is None
    assert adapter_hint(b"\xff#1", []) is None


def test_home_adapters_count_per_partition_and_forget_revoked_ones():
    home = HomeAdapters(per_partition=3)
    for key in ["a", "a", "b"]:
        home.seen(0, key)
    home.seen(1, "c")
    assert home.scores() == {"a": 2, "b": 1, "c": 1}
    home.seen(0, "b")  # slides: the oldest "a" of partition 0 leaves
    assert home.scores() == {"a": 1, "b": 2, "c": 1}
    version = home.version
    home.drop(0)
    assert home.scores() == {"c": 1} and home.version > version


def test_eviction_prefers_adapters_the_workers_partitions_do_not_bring():
    slots = AdapterSlots(3)
    for t, key in enumerate(["home-old", "away", "home-new"]):
        slot = slots.reserve(key, float(t), wanted=set())
        slots.loaded(key, ok=True)
        slots.release(slots.acquire(key, float(t)), float(t))
    # Plain LRU would evict home-old, the least recently used.
    slots.affinity = {"home-old": 5, "home-new": 1}
    slot = slots.reserve("next", 10.0, wanted=set())
    assert slot is not None and "away" not in slots.slot_of and slots.key_of[slot] == "next"
    slots.loaded("next", ok=True)
    # Among home adapters the lower score goes first; LRU breaks ties (next scores 0 like an unknown key).
    slots.affinity = {"home-old": 5, "home-new": 1, "next": 1}
    slot = slots.reserve("other", 11.0, wanted=set())
    assert "home-new" not in slots.slot_of and set(slots.slot_of) == {"home-old", "next", "other"}
    # Without a hint, eviction is LRU again.
    slots.loaded("other", ok=True)
    slots.affinity = {}
    slots.reserve("last", 12.0, wanted=set())
    assert "home-old" not in slots.slot_of
