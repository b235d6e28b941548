"""Every place lorabus reaches into aiokafka's internals (private classes and attributes, module patches).

aiokafka offers no public way to do six things lorabus needs; each is a named `Patch` below that declares
what it uses from aiokafka (module and attribute names), and is applied through one public function:

    "tolerant header keys"            install_tolerant_records()        worker/client.py, worker/service.py
    "bounded inflate"                 inflate_limit(max_bytes, on_skip) worker/client.py (the status reader)
    "metadata refresh throttle"       throttle_metadata(producer)       worker/producer.py
    "producer close without flush"    close_producer(producer, t)       worker/producer.py, status, streaming
    "consumer stop finished by hand"  stop_consumer(consumer)           worker/service.py
    "python record builder"           use_python_record_builder()       tests (tests/conftest.py, helpers)

Internals change without notice (pyproject.toml keeps aiokafka at 0.14.x for this module's sake), so each
function first checks its patch against the installed aiokafka and raises `AiokafkaIncompatible`, naming the
patch, what is missing and the aiokafka version, rather than failing obscurely or silently doing nothing.
tests/test_aiokafka_compat.py checks every patch against the installed aiokafka, and that no other file in
the tree touches aiokafka's internals: a new one belongs here, as a patch.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import contextvars
import functools
import importlib
import inspect
import logging
import textwrap
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import aiokafka
from aiokafka.errors import CorruptRecordException


class AiokafkaIncompatible(RuntimeError):
    """The installed aiokafka lacks something a patch of this module needs."""


@dataclass(frozen=True, eq=False)
class Patch:
    """One reach into aiokafka's internals: its name (for error messages) and what it uses."""

    name: str
    # module → attribute paths in it: "Class.attr" is an attribute of the class or one its methods set on
    # `self` (an instance attribute). Listing a member implies its class.
    needs: dict[str, tuple[str, ...]]

    def missing(self) -> list[str]:
        """What of `needs` the installed aiokafka lacks, as dotted names (the outermost missing part)."""
        missing = [_first_missing(module, path) for module, paths in self.needs.items() for path in paths]
        return list(dict.fromkeys(name for name in missing if name is not None))

    def require(self) -> None:
        """Raise AiokafkaIncompatible unless the installed aiokafka has everything this patch needs."""
        if missing := self.missing():
            raise AiokafkaIncompatible(
                f"aiokafka {aiokafka.__version__} lacks {', '.join(missing)}, which lorabus's patch "
                f'"{self.name}" (worker/aiokafka_compat.py) needs')


def _first_missing(module_name: str, path: str) -> str | None:
    """None if aiokafka has `module_name` + `path`, else the dotted name of its outermost missing part."""
    try:
        obj = importlib.import_module(module_name)
    except ImportError:
        return module_name
    *outer, last = path.split(".")
    for depth, part in enumerate(outer, 1):
        if not hasattr(obj, part):
            return ".".join([module_name, *outer[:depth]])
        obj = getattr(obj, part)
    if hasattr(obj, last) or (isinstance(obj, type) and last in _instance_attributes(obj)):
        return None
    return f"{module_name}.{path}"


@functools.cache
def _instance_attributes(cls: type) -> frozenset[str]:
    """Names the methods of `cls` (or of a base) assign on `self`: instance attributes, which exist only
    once an instance does, so they are looked up in aiokafka's source instead."""
    names = set()
    for klass in cls.__mro__:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no Python source: builtins, compiled classes
            continue
        names.update(node.attr for node in ast.walk(tree)
                     if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                     and isinstance(node.value, ast.Name) and node.value.id == "self")
    return frozenset(names)


# ---- "tolerant header keys" -----------------------------------------------------------------------------
# Kafka's protocol says header keys are UTF-8, but the broker does not check, and aiokafka decodes them
# strictly inside `getmany`: one record with a bad key raised out of every fetch of its partition, before our
# code saw it, and the records fetched with it were skipped. With this patch a header key that is not UTF-8
# arrives with surrogate escapes instead (`bytes.decode("utf-8", "surrogateescape")`), so the record reaches
# the worker, which answers it `invalid_job` like any other malformed job. Records are then parsed by
# aiokafka's pure-Python batch reader (CRC checks, compression and transaction markers unchanged), which
# costs microseconds per record, far below a job's cost.

TOLERANT_HEADER_KEYS = Patch("tolerant header keys", {
    "aiokafka.consumer.fetcher": ("MemoryRecords",),  # what the fetcher wraps each fetched partition's bytes in
    "aiokafka.record.memory_records": ("_MemoryRecordsPy.next_batch", "_MemoryRecordsPy._cache_next",
                                       "_MemoryRecordsPy._next_slice", "_MemoryRecordsPy.MIN_SLICE",
                                       "_MemoryRecordsPy.MAGIC_OFFSET"),
    "aiokafka.record.default_records": ("_DefaultRecordBatchPy._read_msg", "_DefaultRecordBatchPy._buffer",
                                        "_DefaultRecordBatchPy._pos", "_DefaultRecordBatchPy.base_offset",
                                        "_DefaultRecordBatchPy.first_timestamp", "_DefaultRecordBatchPy.max_timestamp",
                                        "_DefaultRecordBatchPy.timestamp_type", "_DefaultRecordBatchPy.LOG_APPEND_TIME",
                                        "_DefaultRecordPy"),
    "aiokafka.record.util": ("decode_varint",),
})

_MIN_MAGIC = 2  # record batches of format v2 carry headers; older formats have none

# ---- "bounded inflate" ------------------------------------------------------------------------------------
# A fetch is bounded by its compressed size, and aiokafka inflates a compressed batch whole: a 442 KB gzip
# status record held 152 MB of JSON (issue 20, R5). Within `inflate_limit`, the tolerant batch reader above
# inflates at most `max_bytes` of a batch; a batch that holds more (or uses a codec this install cannot read)
# yields no records and is reported to `on_skip(offset, key, reason)`, with the key of its first record when
# the inflated prefix holds it. The consumer then moves past the batch as it does past a compacted-away one.

BOUNDED_INFLATE = Patch("bounded inflate", {
    "aiokafka.record.default_records": ("_DefaultRecordBatchPy._maybe_uncompress",
                                        "_DefaultRecordBatchPy._decompressed", "_DefaultRecordBatchPy._num_records",
                                        "_DefaultRecordBatchPy.compression_type", "_DefaultRecordBatchPy.CODEC_NONE",
                                        "_DefaultRecordBatchPy.CODEC_GZIP"),
})

OnSkip = Callable[[int, "bytes | None", str], None]
_inflate_bound: contextvars.ContextVar[tuple[int, OnSkip] | None] = contextvars.ContextVar(
    "lorabus_inflate_bound", default=None)
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header and trailer around deflate data
_CODEC_NAMES = {1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}


@contextlib.contextmanager
def inflate_limit(max_bytes: int, on_skip: OnSkip):
    """Within this block (and the consumer tasks started in it), the records of a compressed batch that
    would inflate past `max_bytes` are skipped and reported to `on_skip`, not read. Installs the tolerant
    records reader (it is the reader that enforces the bound)."""
    BOUNDED_INFLATE.require()
    install_tolerant_records()
    token = _inflate_bound.set((max_bytes, on_skip))
    try:
        yield
    finally:
        _inflate_bound.reset(token)


def _inflate_gzip(data: bytes, max_bytes: int) -> tuple[bytes, bool]:
    """The gzip members of `data` inflated, up to `max_bytes + 1` bytes; and whether that was all of it."""
    out = bytearray()
    while data:
        if len(out) > max_bytes:
            return bytes(out), False
        inflater = zlib.decompressobj(wbits=_GZIP_WBITS)
        out += inflater.decompress(data, max_bytes + 1 - len(out))  # never 0 here: 0 would mean unbounded
        if inflater.unconsumed_tail or len(out) > max_bytes:
            return bytes(out), False
        if not inflater.eof:
            raise zlib.error("truncated gzip data")
        data = inflater.unused_data
    return bytes(out), True


def _first_key(inflated: bytes) -> bytes | None:
    """The key of a batch's first record, read from the start of its inflated records (None if cut off)."""
    from aiokafka.record.util import decode_varint

    try:
        pos = 0
        for _ in range(4):  # length, attributes, timestamp delta, offset delta
            _, pos = decode_varint(inflated, pos)
        length, pos = decode_varint(inflated, pos)
    except (IndexError, ValueError):
        return None
    return bytes(inflated[pos:pos + length]) if 0 <= length and pos + length <= len(inflated) else None


def install_tolerant_records() -> None:
    """Point aiokafka's fetcher at a records reader that keeps non-UTF-8 header keys (surrogate-escaped).
    Process-wide and idempotent."""
    TOLERANT_HEADER_KEYS.require()
    from aiokafka.consumer import fetcher

    fetcher.MemoryRecords = _tolerant_memory_records()


@functools.cache  # built after the check: the classes subclass private ones that may be gone
def _tolerant_memory_records() -> type:
    from aiokafka.record.default_records import _DefaultRecordBatchPy, _DefaultRecordPy
    from aiokafka.record.memory_records import _MemoryRecordsPy
    from aiokafka.record.util import decode_varint

    def read_bytes(buffer: bytearray, pos: int) -> tuple[bytes | None, int]:
        length, pos = decode_varint(buffer, pos)
        if length < 0:
            return None, pos
        return bytes(buffer[pos : pos + length]), pos + length

    class TolerantRecordBatch(_DefaultRecordBatchPy):
        """A v2 record batch whose records keep header keys that are not UTF-8 (surrogate-escaped), and that
        inflates within the bound of an `inflate_limit` block when there is one."""

        def _maybe_uncompress(self):
            bound = _inflate_bound.get()
            if bound is None or self._decompressed or self.compression_type == self.CODEC_NONE:
                return super()._maybe_uncompress()
            max_bytes, on_skip = bound
            codec = _CODEC_NAMES.get(self.compression_type, f"codec {self.compression_type}")
            inflated, whole, why = b"", False, f"a {codec} batch, which this reader does not inflate"
            if self.compression_type == self.CODEC_GZIP:
                try:
                    inflated, whole = _inflate_gzip(bytes(memoryview(self._buffer)[self._pos:]), max_bytes)
                    why = f"a gzip batch that inflates past {max_bytes} bytes"
                except zlib.error as exc:
                    why = f"a gzip batch that does not inflate: {exc}"
            self._decompressed, self._pos = True, 0
            if whole:
                self._buffer = bytearray(inflated)
                return
            self._buffer, self._num_records = bytearray(), 0  # iterates as empty: the consumer moves past it
            on_skip(self.base_offset, _first_key(inflated), why)

        def _read_msg(self, *args):
            try:
                return super()._read_msg(*args)
            except UnicodeDecodeError:  # only a header key is decoded as text; the position is unchanged
                return self._read_msg_escaped()

        def _read_msg_escaped(self) -> _DefaultRecordPy:
            # Record v2: length, attributes, timestamp delta, offset delta, key, value, headers (all varint-framed).
            buffer = self._buffer
            length, pos = decode_varint(buffer, self._pos)
            end = pos + length
            _attributes, pos = decode_varint(buffer, pos)
            timestamp_delta, pos = decode_varint(buffer, pos)
            offset_delta, pos = decode_varint(buffer, pos)
            key, pos = read_bytes(buffer, pos)
            value, pos = read_bytes(buffer, pos)
            count, pos = decode_varint(buffer, pos)
            headers = []
            for _ in range(count):
                raw_key, pos = read_bytes(buffer, pos)
                header_value, pos = read_bytes(buffer, pos)
                if raw_key is None:
                    raise CorruptRecordException("a record header has a null key")
                headers.append((raw_key.decode("utf-8", "surrogateescape"), header_value))
            if pos != end:
                raise CorruptRecordException(f"record size {length} does not match its content")
            self._pos = pos
            timestamp = (self.max_timestamp if self.timestamp_type == self.LOG_APPEND_TIME
                         else self.first_timestamp + timestamp_delta)
            return _DefaultRecordPy(self.base_offset + offset_delta, timestamp, self.timestamp_type,
                                    key, value, headers)

    class TolerantMemoryRecords(_MemoryRecordsPy):
        """The fetcher's view of a fetch response: v2 batches are read by `TolerantRecordBatch`."""

        def next_batch(self, *args):
            next_slice = self._next_slice
            if next_slice is None or len(next_slice) < self.MIN_SLICE or next_slice[self.MAGIC_OFFSET] < _MIN_MAGIC:
                return super().next_batch(*args)
            self._cache_next()
            return TolerantRecordBatch(next_slice)

    return TolerantMemoryRecords


# ---- "metadata refresh throttle" ------------------------------------------------------------------------
# While a partition has no known leader (the broker went away mid-shutdown, or is restarting), aiokafka 0.14's
# sender refreshes metadata in a loop without any pause; with the broker down each refresh fails at once:
# measured ~8,000 refreshes/s, a busy CPU core and an ERROR line each. aiokafka has no setting for it, so the
# producer's client gets its own `force_metadata_update`, which spaces refreshes after a failed one.

METADATA_THROTTLE = Patch("metadata refresh throttle", {
    "aiokafka.producer.producer": ("AIOKafkaProducer.client",),
    "aiokafka.producer.sender": ("Sender.client",),  # the sender calls force_metadata_update on this same object
    "aiokafka.client": ("AIOKafkaClient.force_metadata_update",),
})

METADATA_RETRY_S = 0.25  # a metadata refresh that follows a failed one waits this long


def throttle_metadata(producer: aiokafka.AIOKafkaProducer) -> aiokafka.AIOKafkaProducer:
    """Make a metadata refresh requested within METADATA_RETRY_S of a failed one wait out the rest of that
    delay (resolving False, as a failed refresh does) instead of starting at once. The sender awaits that
    future, so its no-leader loop runs a few times a second, not thousands. Returns `producer`."""
    METADATA_THROTTLE.require()
    client = producer.client
    refresh = client.force_metadata_update
    failed_at = -METADATA_RETRY_S

    def noted(fut: asyncio.Future) -> None:
        nonlocal failed_at
        if not fut.cancelled() and fut.exception() is None and not fut.result():
            failed_at = time.monotonic()

    def force_metadata_update():
        wait = failed_at + METADATA_RETRY_S - time.monotonic()
        if wait > 0:
            fut = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(wait, lambda: fut.done() or fut.set_result(False))
            return fut
        fut = refresh()
        fut.add_done_callback(noted)
        return fut

    client.force_metadata_update = force_metadata_update  # an instance attribute: this producer's client only
    return producer


# ---- "producer close without flush" ---------------------------------------------------------------------
# aiokafka has no close-without-flush: stop() waits until the broker takes every batch the producer holds,
# forever while it is away. After a bounded stop() the rest of its steps are done here, dropping what is left.

PRODUCER_CLOSE = Patch("producer close without flush", {
    "aiokafka.producer.producer": ("AIOKafkaProducer._sender", "AIOKafkaProducer.client"),
    "aiokafka.producer.sender": ("Sender.sender_task",),
    "aiokafka.client": ("AIOKafkaClient.close",),
})
CLOSE_STEP_TIMEOUT_S = 10.0  # close_producer: how long each step of a forced close may take


async def force_close_producer(producer: aiokafka.AIOKafkaProducer, timeout_s: float) -> None:
    """Finish closing a producer whose stop() did not complete: its sender task cancelled, its client closed
    (each step waited on for at most `timeout_s`); records it still holds are dropped."""
    PRODUCER_CLOSE.require()
    task = producer._sender.sender_task  # None until the producer has started
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, timeout_s)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(producer.client.close(), timeout_s)


async def close_producer(producer: aiokafka.AIOKafkaProducer, timeout: float | None) -> None:
    """Flush and close; after `timeout` (or if cancelled) drop what is left unsent (aiokafka has no
    close-without-flush: force_close_producer does its last steps)."""
    flushed = False
    try:
        await asyncio.wait_for(producer.stop(), timeout)
        flushed = True
    except Exception as exc:  # including the timeout: the broker did not take the rest
        logging.getLogger(__name__).debug("producer close: %r; dropping its unsent records", exc)
    finally:
        if not flushed:
            await force_close_producer(producer, CLOSE_STEP_TIMEOUT_S)


# ---- "consumer stop finished by hand" -------------------------------------------------------------------
# While the broker is away, aiokafka 0.14's consumer.stop() is aborted halfway: its fetcher's close re-raises
# the CancelledError of a fetch task it cancelled itself, before the other fetch tasks and the client are
# closed. The caller sees that CancelledError (not its own cancellation) and finishes the stop here.

CONSUMER_STOP = Patch("consumer stop finished by hand", {
    "aiokafka.consumer.consumer": ("AIOKafkaConsumer._fetcher", "AIOKafkaConsumer._client"),
    "aiokafka.consumer.fetcher": ("Fetcher._pending_tasks",),
    "aiokafka.client": ("AIOKafkaClient.close",),
})


async def stop_consumer(consumer: aiokafka.AIOKafkaConsumer) -> None:
    """consumer.stop(), finished by hand when aiokafka 0.14 aborts it halfway: while the broker is away its
    fetcher's close re-raises the CancelledError of a fetch task it cancelled itself, before the other
    tasks and the client are closed. Our own cancellation is passed on."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():
            raise
        await finish_consumer_stop(consumer)


async def finish_consumer_stop(consumer: aiokafka.AIOKafkaConsumer) -> None:
    """What an aborted consumer.stop() left undone: the fetcher's remaining fetch tasks cancelled and awaited,
    the client closed."""
    CONSUMER_STOP.require()
    fetcher = consumer._fetcher  # None if the consumer never started
    pending = list(fetcher._pending_tasks) if fetcher is not None else []
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await consumer._client.close()


# ---- "python record builder" (tests only) ---------------------------------------------------------------
# Tests send header keys that are not UTF-8, as a careless producer can (tests/helpers.py, RawHeaderKey: a
# str whose encode() returns arbitrary bytes). aiokafka's C batch builder encodes keys itself; its pure-Python
# builder calls the key's encode(), so test producers are switched to it.

PYTHON_RECORD_BUILDER = Patch("python record builder", {
    "aiokafka.record.default_records": ("_DefaultRecordBatchBuilderPy",),
    # the two modules that build batches, each through its own imported name
    "aiokafka.producer.message_accumulator": ("DefaultRecordBatchBuilder",),
    "aiokafka.producer.producer": ("DefaultRecordBatchBuilder",),
})


def use_python_record_builder() -> None:
    """Make every producer in this process build batches with aiokafka's Python builder. Call it before any
    producer exists (tests/conftest.py does): aiokafka asserts a batch's builder class when it sends the
    batch, so switching classes while producers run would fail their sends. Idempotent."""
    PYTHON_RECORD_BUILDER.require()
    from aiokafka.producer import message_accumulator, producer
    from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

    for module in (message_accumulator, producer):
        module.DefaultRecordBatchBuilder = _DefaultRecordBatchBuilderPy


PATCHES = (TOLERANT_HEADER_KEYS, BOUNDED_INFLATE, METADATA_THROTTLE, PRODUCER_CLOSE, CONSUMER_STOP, PYTHON_RECORD_BUILDER)
