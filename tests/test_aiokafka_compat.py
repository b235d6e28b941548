"""worker/aiokafka_compat.py, without a broker: the installed aiokafka has what each patch needs, a missing
need is reported by name (patch, attribute, aiokafka version) when a patch is applied, and no other file
in the tree reaches into aiokafka's internals."""

import ast
import importlib.util
import inspect
from pathlib import Path

import aiokafka
import pytest
from aiokafka.client import AIOKafkaClient
from aiokafka.consumer import fetcher
from aiokafka.producer import message_accumulator, sender
from aiokafka.record import default_records, memory_records
from aiokafka.record.memory_records import MemoryRecords

from helpers import RawHeaderKey
from lorabus.worker import aiokafka_compat as compat

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("worker", "scheduler", "kernels", "schemas", "tests", "benchmarks")
COMPAT = ROOT / "worker" / "aiokafka_compat.py"
# Private attributes of aiokafka's objects lorabus has reached for (consumer._fetcher, producer._sender, ...).
PRIVATE_ATTRIBUTES = {"_client", "_fetcher", "_sender", "_coordinator", "_subscription", "_pending_tasks",
                      "sender_task"}
# Replacing one of these on an object other than `self` replaces a method of aiokafka's client (shared by
# every producer and consumer): a patch, as `client.force_metadata_update = ...` was.
CLIENT_METHODS = {name for name, value in vars(AIOKafkaClient).items() if callable(value) and not name.startswith("_")}


# ---- each patch against the installed aiokafka ------------------------------------------------------------

@pytest.mark.parametrize("patch", compat.PATCHES, ids=lambda patch: patch.name)
def test_installed_aiokafka_has_what_the_patch_needs(patch):
    patch.require()  # else AiokafkaIncompatible: the patch, what aiokafka lacks, its version


# Per patch: one thing it needs, deleted for the test, and how the code applies the patch.
REMOVALS = [
    (compat.TOLERANT_HEADER_KEYS, memory_records, "_MemoryRecordsPy", compat.install_tolerant_records),
    (compat.METADATA_THROTTLE, AIOKafkaClient, "force_metadata_update", lambda: compat.throttle_metadata(object())),
    (compat.PRODUCER_CLOSE, sender.Sender, "sender_task", lambda: compat.force_close_producer(object(), 1.0)),
    (compat.CONSUMER_STOP, AIOKafkaClient, "close", lambda: compat.finish_consumer_stop(object())),
    (compat.PYTHON_RECORD_BUILDER, default_records, "_DefaultRecordBatchBuilderPy", compat.use_python_record_builder),
]


@pytest.mark.parametrize("patch, owner, attribute, apply", REMOVALS, ids=[case[0].name for case in REMOVALS])
async def test_a_missing_need_is_an_error_naming_the_patch(monkeypatch, patch, owner, attribute, apply):
    records, builder = fetcher.MemoryRecords, message_accumulator.DefaultRecordBatchBuilder
    monkeypatch.delattr(owner, attribute)
    owner_name = owner.__name__ if isinstance(owner, type(aiokafka)) else f"{owner.__module__}.{owner.__qualname__}"
    expected = (f"aiokafka {aiokafka.__version__} lacks {owner_name}.{attribute}, which lorabus's patch "
                f'"{patch.name}" (worker/aiokafka_compat.py) needs')
    assert patch.missing() == [f"{owner_name}.{attribute}"]
    with pytest.raises(compat.AiokafkaIncompatible) as raised:
        applied = apply()
        if inspect.isawaitable(applied):  # the async ones check when awaited
            await applied
    assert str(raised.value) == expected
    # Nothing was patched on the way to the error.
    assert (fetcher.MemoryRecords, message_accumulator.DefaultRecordBatchBuilder) == (records, builder)


def test_needs_are_looked_up_in_modules_classes_and_instance_attributes():
    patch = compat.Patch("example", {
        "aiokafka.consumer.fetcher": ("Fetcher._pending_tasks",     # set on self in Fetcher.__init__
                                      "Fetcher._no_such_attribute", "NoSuchClass.anything"),
        "aiokafka.no_such_module": ("anything",),
    })
    assert patch.missing() == ["aiokafka.consumer.fetcher.Fetcher._no_such_attribute",
                               "aiokafka.consumer.fetcher.NoSuchClass", "aiokafka.no_such_module"]


def test_tolerant_records_read_a_header_key_that_is_not_utf8():
    compat.use_python_record_builder()  # conftest has: the builder that sends RawHeaderKey's bytes as they are
    builder = message_accumulator.DefaultRecordBatchBuilder(
        magic=2, compression_type=0, is_transactional=0, producer_id=-1, producer_epoch=-1, base_sequence=-1,
        batch_size=1 << 16)
    builder.append(0, timestamp=None, key=b"k", value=b"a", headers=[("ok", b"1")])
    builder.append(1, timestamp=None, key=b"k", value=b"b", headers=[(RawHeaderKey(b"x-\xff"), b"2"), ("ok", None)])
    builder.append(2, timestamp=None, key=None, value=b"c", headers=[])
    fetched = bytes(builder.build())
    with pytest.raises(UnicodeDecodeError):  # aiokafka's own reader: the whole fetch fails
        list(MemoryRecords(fetched).next_batch())
    compat.install_tolerant_records()
    compat.install_tolerant_records()  # idempotent
    records = fetcher.MemoryRecords(fetched)
    assert [(r.offset, r.key, r.value, r.headers) for r in records.next_batch()] == [
        (0, b"k", b"a", [("ok", b"1")]),
        (1, b"k", b"b", [(b"x-\xff".decode("utf-8", "surrogateescape"), b"2"), ("ok", None)]),
        (2, None, b"c", [])]
    assert not records.has_next()


# ---- nothing else in the tree touches aiokafka's internals --------------------------------------------------

def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))  # __version__ is public


def _call_name(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _is_module(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _aiokafka_modules(tree: ast.AST) -> set[str]:
    """Local names bound to aiokafka modules: `import aiokafka...`, `from aiokafka.x import <module>`, and
    loop variables over tuples of those (`for module in (message_accumulator, producer)`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((alias.asname or alias.name.split(".")[0]) for alias in node.names
                         if alias.name.split(".")[0] == "aiokafka")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "aiokafka":
            names.update((alias.asname or alias.name) for alias in node.names
                         if _is_module(f"{node.module}.{alias.name}"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, (ast.Tuple, ast.List))
                and node.iter.elts and all(isinstance(e, ast.Name) and e.id in names for e in node.iter.elts)):
            names.add(node.target.id)
    return names


def aiokafka_internals(source: str) -> list[tuple[int, str]]:
    """(line, what) for each use of aiokafka's internals in `source`."""
    tree = ast.parse(source)
    modules = _aiokafka_modules(tree)

    def is_module(node: ast.AST) -> bool:  # a name bound to an aiokafka module, or an attribute chain on one
        while isinstance(node, ast.Attribute):
            node = node.value
        return isinstance(node, ast.Name) and node.id in modules

    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "aiokafka":
            private = [alias.name for alias in node.names if _private(alias.name)]
            if private or any(map(_private, node.module.split("."))):
                found.append((line, f"imports {', '.join(private) or node.module} from {node.module}"))
        elif isinstance(node, ast.Import):
            found += [(line, f"imports {alias.name}") for alias in node.names
                      if alias.name.split(".")[0] == "aiokafka" and any(map(_private, alias.name.split(".")))]
        elif isinstance(node, ast.Attribute):
            if node.attr in PRIVATE_ATTRIBUTES:
                found.append((line, f"reaches {ast.unparse(node)}"))
            elif is_module(node.value) and (_private(node.attr) or not isinstance(node.ctx, ast.Load)):
                verb = "uses" if isinstance(node.ctx, ast.Load) else "assigns" if isinstance(node.ctx, ast.Store) else "deletes"
                found.append((line, f"{verb} {ast.unparse(node)}"))
            elif (isinstance(node.ctx, ast.Store) and node.attr in CLIENT_METHODS
                  and not (isinstance(node.value, ast.Name) and node.value.id == "self")):
                found.append((line, f"replaces aiokafka's client method {ast.unparse(node)}"))
        elif isinstance(node, ast.Call) and _call_name(node) in ("getattr", "hasattr", "setattr", "delattr") and node.args:
            target, strings = node.args[0], [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
            if any(s in PRIVATE_ATTRIBUTES for s in strings):
                found.append((line, f"reaches {strings[0]} by {_call_name(node)}"))
            elif _call_name(node) == "setattr" and (is_module(target) or (
                    isinstance(target, ast.Constant) and str(target.value).startswith("aiokafka."))):
                found.append((line, f"patches aiokafka: {ast.unparse(node)}"))
            elif _call_name(node) in ("getattr", "hasattr") and is_module(target) and any(
                    isinstance(s, str) and _private(s) for s in strings):
                found.append((line, f"uses {strings[0]} of an aiokafka module"))
    return sorted(found)


def test_no_file_but_the_compat_module_touches_aiokafka_internals():
    found = [f"{path.relative_to(ROOT)}:{line}: {what}"
             for folder in SCANNED for path in sorted((ROOT / folder).rglob("*.py")) if path != COMPAT
             for line, what in aiokafka_internals(path.read_text())]
    assert not found, ("aiokafka's internals used outside worker/aiokafka_compat.py (add a named patch there "
                       "and call it):\n" + "\n".join(found))


# What the tree did before worker/aiokafka_compat.py existed: each must be caught.
BEFORE = {
    "worker/kafka_records.py": '''
from aiokafka.consumer import fetcher
from aiokafka.record.default_records import _DefaultRecordBatchPy, _DefaultRecordPy
def install():
    fetcher.MemoryRecords = TolerantMemoryRecords
''',
    "worker/producer.py": '''
def _throttle_metadata(producer):
    client = producer.client
    client.force_metadata_update = force_metadata_update
async def close_producer(producer, timeout):
    task = getattr(getattr(producer, "_sender", None), "sender_task", None)
''',
    "worker/service.py": '''
async def _stop_consumer(consumer):
    pending = list(getattr(consumer._fetcher, "_pending_tasks", ()))
    await consumer._client.close()
''',
    "tests/helpers.py": '''
def use_python_record_builder():
    from aiokafka.producer import message_accumulator, producer
    from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
    for module in (message_accumulator, producer):
        module.DefaultRecordBatchBuilder = _DefaultRecordBatchBuilderPy
''',
    "elsewhere": '''
import aiokafka.record._crecords
from aiokafka.record import memory_records
import aiokafka.producer.producer as pp
memory_records._MemoryRecordsPy
getattr(memory_records, "_MemoryRecordsPy")
setattr(memory_records, "MemoryRecords", None)
monkeypatch.setattr("aiokafka.consumer.fetcher.MemoryRecords", None)
pp.DefaultRecordBatchBuilder = None
del aiokafka.consumer.fetcher.MemoryRecords
consumer._coordinator, consumer._subscription
''',
}


def test_the_check_catches_what_the_tree_did_before():
    found = {name: aiokafka_internals(source) for name, source in BEFORE.items()}
    assert [what for _, what in found["worker/kafka_records.py"]] == [
        "imports _DefaultRecordBatchPy, _DefaultRecordPy from aiokafka.record.default_records",
        "assigns fetcher.MemoryRecords"]
    assert [what for _, what in found["worker/producer.py"]] == [
        "replaces aiokafka's client method client.force_metadata_update", "reaches _sender by getattr",
        "reaches sender_task by getattr"]
    assert [what for _, what in found["worker/service.py"]] == [
        "reaches _pending_tasks by getattr", "reaches consumer._fetcher", "reaches consumer._client"]
    assert [what for _, what in found["tests/helpers.py"]] == [
        "imports _DefaultRecordBatchBuilderPy from aiokafka.record.default_records",
        "assigns module.DefaultRecordBatchBuilder"]
    assert [line for line, _ in found["elsewhere"]] == [2, 5, 6, 7, 8, 9, 10, 11, 11], found["elsewhere"]


# ---- "bounded inflate" --------------------------------------------------------------------------------------

def _gzip_batch(records: list[tuple[bytes, bytes]]) -> bytes:
    builder = default_records.DefaultRecordBatchBuilder(
        magic=2, compression_type=1, is_transactional=0,  # 1: gzip
        producer_id=-1, producer_epoch=-1, base_sequence=-1, batch_size=1 << 30)
    for offset, (key, value) in enumerate(records):
        builder.append(offset, timestamp=1, key=key, value=value, headers=[])
    return bytes(builder.build())


def _read_all(batch: bytes) -> list:
    records = compat._tolerant_memory_records()(batch)
    out = []
    while (next_batch := records.next_batch()) is not None:
        out += [(r.key, len(r.value)) for r in next_batch]
    return out


def test_a_batch_that_inflates_past_the_limit_yields_nothing_and_is_named_by_its_first_key():
    bomb = _gzip_batch([(b"w-bomb", b"{" + b" " * 5_000_000 + b"}"), (b"w2", b"x")])  # 5 MB in a few KB
    small = _gzip_batch([(b"w1", b"y" * 1000)])
    assert len(bomb) < 50_000
    skipped = []
    with compat.inflate_limit(100_000, lambda offset, key, why: skipped.append((offset, key, why))):
        assert _read_all(bomb) == []
        assert _read_all(small) == [(b"w1", 1000)]
    assert skipped == [(0, b"w-bomb", "a gzip batch that inflates past 100000 bytes")]
    assert _read_all(bomb) == [(b"w-bomb", 5_000_002), (b"w2", 1)]  # outside the block: aiokafka's own reading


def test_gzip_inflation_is_bounded_across_members_and_refuses_truncated_data():
    import gzip
    import zlib

    two = gzip.compress(b"a" * 600) + gzip.compress(b"b" * 600)
    assert compat._inflate_gzip(two, 2000) == (b"a" * 600 + b"b" * 600, True)
    inflated, whole = compat._inflate_gzip(two, 1000)
    assert not whole and len(inflated) == 1001
    with pytest.raises(zlib.error):
        compat._inflate_gzip(gzip.compress(b"c" * 600)[:-12], 2000)
