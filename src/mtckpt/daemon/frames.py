"""Data-carrying messages encoded and decoded by hand in protobuf's wire format.

``DataChunk`` (and ``PushMessage`` holding one) carry most of the bytes a daemon moves.
Building them as protobuf objects copies the data three more times (into the object, out
of it when serialized, out of the parsed message); by hand, the sender copies it once
into the frame and the receiver reads it as a view of the received frame. The frames are
exactly what the .proto describes: either side may be a generated stub (tests check it).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from .. import _fastpath
from ..errors import ChecksumMismatchError
from ..proto import mtckpt_pb2 as pb

CHUNK_BYTES = 4 * 1024 * 1024  # data bytes per streamed message

# Field numbers and wire types (mtckpt.proto): DataChunk{offset=1, data=2, crc32c=3},
# PushMessage{header=1, chunk=2}.
_VARINT, _LEN = 0, 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or oversized varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _chunk_parts(offset: int, size: int, crc32c: int) -> tuple[bytes, bytes]:
    """What goes before and after the data in an encoded DataChunk."""
    head = _key(1, _VARINT) + _varint(offset) + _key(2, _LEN) + _varint(size)
    return head, _key(3, _VARINT) + _varint(crc32c)


def data_chunk(offset: int, data, crc32c: int) -> bytes:
    """An encoded ``DataChunk``; ``data`` is any buffer (copied once, here)."""
    head, tail = _chunk_parts(offset, memoryview(data).nbytes, crc32c)
    return b"".join((head, data, tail))


def push_chunk(offset: int, data, crc32c: int) -> bytes:
    """An encoded ``PushMessage`` holding a ``DataChunk``."""
    size = memoryview(data).nbytes
    head, tail = _chunk_parts(offset, size, crc32c)
    inner = len(head) + size + len(tail)
    return b"".join((_key(2, _LEN) + _varint(inner) + head, data, tail))


def push_header(header: pb.PushHeader) -> bytes:
    return pb.PushMessage(header=header).SerializeToString()


def read_data_chunk(frame) -> tuple[int, memoryview, int]:
    """``(offset, data, crc32c)`` of an encoded ``DataChunk``; ``data`` is a view of
    ``frame``. Raises ValueError on a malformed frame."""
    buf = memoryview(frame)
    offset, crc32c, data = 0, 0, buf[0:0]
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos)
            if field == 1:
                offset = value
            elif field == 3:
                crc32c = value
        elif wire == _LEN:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("a field runs past the end of the frame")
            if field == 2:
                data = buf[pos : pos + size]
            pos += size
        else:
            raise ValueError(f"unexpected wire type {wire} in a DataChunk")
    return offset, data, crc32c


def read_push(frame) -> pb.PushHeader | tuple[int, memoryview, int]:
    """A ``PushMessage``: its header, or its chunk as ``(offset, data view, crc32c)``."""
    buf = memoryview(frame)
    key, pos = _read_varint(buf, 0)
    size, pos = _read_varint(buf, pos)
    if key == _key(1, _LEN)[0] and pos + size == len(buf):
        return pb.PushHeader.FromString(bytes(buf[pos:]))
    if key == _key(2, _LEN)[0] and pos + size == len(buf):
        return read_data_chunk(buf[pos:])
    raise ValueError("a PushMessage holds one header or one chunk")


def verified(chunks: Iterable[tuple[int, memoryview, int]], where: str):
    """``(offset, data)`` of ``(offset, data, crc32c sent)`` chunks whose data matches the
    crc32c sent with it; ChecksumMismatchError naming ``where`` and the offset otherwise."""
    crc32c = _fastpath.backend().crc32c
    for offset, data, sent in chunks:
        got = crc32c(data)
        if got != sent:
            raise ChecksumMismatchError(
                f"{where}: a chunk at offset {offset} arrived damaged (crc32c {got:#010x}, "
                f"sent {sent:#010x})"
            )
        yield offset, data


def pace(sent: int, bandwidth: float | None, started: float) -> None:
    """Sleep until ``sent`` bytes since ``started`` (time.monotonic) fit ``bandwidth``
    bytes per second (None: no cap)."""
    if bandwidth:
        ahead = sent / bandwidth - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)


def push_messages(header: pb.PushHeader, data, bandwidth: float | None = None) -> Iterator[bytes]:
    """A whole push: the header, then ``data`` (a buffer of ``header.data_size`` bytes) in
    chunks, each with its crc32c; at most ``bandwidth`` bytes per second if given."""
    crc32c = _fastpath.backend().crc32c
    yield push_header(header)
    view = memoryview(data)
    started = time.monotonic()
    try:
        for offset in range(0, view.nbytes, CHUNK_BYTES):
            piece = view[offset : offset + CHUNK_BYTES]
            yield push_chunk(offset, piece, crc32c(piece))
            piece.release()
            pace(offset + CHUNK_BYTES, bandwidth, started)
    finally:
        view.release()
