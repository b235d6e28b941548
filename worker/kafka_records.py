"""Reading Kafka record batches so that no producer can make a fetch fail.

Kafka's protocol says header keys are UTF-8, but the broker does not check, and aiokafka decodes them
strictly inside `getmany`: one record with a bad key raised out of every fetch of its partition,
before our code saw it, and the records fetched with it were skipped. Here a header key that is not
UTF-8 arrives with surrogate escapes instead (`bytes.decode("utf-8", "surrogateescape")`), so the
record reaches the worker, which answers it `invalid_job` like any other malformed job.

`install()` points aiokafka's fetcher at `TolerantMemoryRecords`; it is process-wide and idempotent.
Records are then parsed by aiokafka's pure-Python batch reader (CRC checks, compression and
transaction markers unchanged), which costs microseconds per record, far below a job's cost.
"""

from __future__ import annotations

from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import _DefaultRecordBatchPy, _DefaultRecordPy
from aiokafka.record.memory_records import _MemoryRecordsPy
from aiokafka.record.util import decode_varint

_MIN_MAGIC = 2  # record batches of format v2 carry headers; older formats have none


def _read_bytes(buffer: bytearray, pos: int) -> tuple[bytes | None, int]:
    length, pos = decode_varint(buffer, pos)
    if length < 0:
        return None, pos
    return bytes(buffer[pos : pos + length]), pos + length


class TolerantRecordBatch(_DefaultRecordBatchPy):
    """A v2 record batch whose records keep header keys that are not UTF-8 (surrogate-escaped)."""

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
        key, pos = _read_bytes(buffer, pos)
        value, pos = _read_bytes(buffer, pos)
        count, pos = decode_varint(buffer, pos)
        headers = []
        for _ in range(count):
            raw_key, pos = _read_bytes(buffer, pos)
            header_value, pos = _read_bytes(buffer, pos)
            if raw_key is None:
                raise CorruptRecordException("a record header has a null key")
            headers.append((raw_key.decode("utf-8", "surrogateescape"), header_value))
        if pos != end:
            raise CorruptRecordException(f"record size {length} does not match its content")
        self._pos = pos
        timestamp = self.max_timestamp if self.timestamp_type == self.LOG_APPEND_TIME else self.first_timestamp + timestamp_delta
        return _DefaultRecordPy(self.base_offset + offset_delta, timestamp, self.timestamp_type, key, value, headers)


class TolerantMemoryRecords(_MemoryRecordsPy):
    """The fetcher's view of a fetch response: v2 batches are read by `TolerantRecordBatch`."""

    def next_batch(self, *args):
        next_slice = self._next_slice
        if next_slice is None or len(next_slice) < self.MIN_SLICE or next_slice[self.MAGIC_OFFSET] < _MIN_MAGIC:
            return super().next_batch(*args)
        self._cache_next()
        return TolerantRecordBatch(next_slice)


def install() -> None:
    fetcher.MemoryRecords = TolerantMemoryRecords
