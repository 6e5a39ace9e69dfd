"""Pure-Python (numpy) twin of ``mtckpt._native``, used where the extension is not built.

The same functions raise the same errors with the same messages as native/module.c
(change both together), only slower: crc32c runs the table update over many lanes at
once with numpy and merges the lanes' crcs with GF(2) shift operators. No threads are
used; ``threads`` arguments are checked and otherwise ignored.
"""

from __future__ import annotations

import errno
import functools
import mmap
import operator
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import gf256

hardware = "none"

_POLY = 0x82F63B78  # CRC-32C, bit-reversed
_UINT32_MAX = 0xFFFFFFFF
_UINT64_MAX = 0xFFFFFFFFFFFFFFFF
# Below this many bytes a plain Python loop beats the lane set-up (measured crossover
# about 1.2 KiB).
_SMALL_INPUT = 1024
# Lanes of the vectorised update: more lanes spread numpy's per-call cost over more
# bytes per step, up to where a step's arrays leave L2 (measured best at 32-64 Ki).
_MAX_LANES = 1 << 15
_MIN_LANE_BYTES = 64


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC polynomial, bit-reflected as the crc is; a != 0."""
    mask = 1 << 31
    product = 0
    while True:
        if a & mask:
            product ^= b
            if not a & (mask - 1):
                return product
        mask >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    powers = [1 << 30]  # x^1
    for _ in range(66):  # x^(2^k) for k < 67: shifts of up to 2^64 bytes
        powers.append(_multmodp(powers[-1], powers[-1]))
    return powers


_X2N = _x2n_table()


def _x2nmodp(n: int, k: int) -> int:
    """x^(n * 2^k) modulo the polynomial: with k = 3, the operator appending n zero bytes."""
    product = 1 << 31  # x^0
    while n:
        if n & 1:
            product = _multmodp(_X2N[k], product)
        n >>= 1
        k += 1
    return product


def _byte_table() -> list[int]:
    table = []
    for byte in range(256):
        reg = byte
        for _ in range(8):
            reg = (reg >> 1) ^ _POLY if reg & 1 else reg >> 1
        table.append(reg)
    return table


_TABLE = _byte_table()


def _pair_table() -> np.ndarray:
    """The register after two byte steps from a register holding only its index."""
    table = np.array(_TABLE, dtype=np.uint32)
    reg = np.arange(1 << 16, dtype=np.uint32)
    for _ in range(2):
        reg = table[reg & 0xFF] ^ (reg >> 8)
    return reg


# Two bytes per step halves the numpy calls; 256 KiB, so it stays in L2.
_PAIR_TABLE = _pair_table()


@functools.lru_cache(maxsize=128)
def _shift_tables(nbytes: int) -> np.ndarray:
    """Byte tables (4 x 256) applying "append nbytes zero bytes" to crc registers.

    The operator is a 32x32 matrix over GF(2); its columns are the images of the 32
    single-bit registers, and each table entry is the xor of the columns of its bits.
    """
    op = _x2nmodp(nbytes, 3)
    columns = np.array([_multmodp(op, 1 << bit) for bit in range(32)], dtype=np.uint32)
    bits = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(bool)
    tables = np.empty((4, 256), dtype=np.uint32)
    for byte in range(4):
        picked = np.where(bits, columns[8 * byte : 8 * byte + 8], np.uint32(0))
        tables[byte] = np.bitwise_xor.reduce(picked, axis=1)
    return tables


def _shift(regs: np.ndarray, nbytes: int) -> np.ndarray:
    tables = _shift_tables(nbytes)
    return (
        tables[0][regs & 0xFF]
        ^ tables[1][(regs >> 8) & 0xFF]
        ^ tables[2][(regs >> 16) & 0xFF]
        ^ tables[3][regs >> 24]
    )


def _register_of(data: np.ndarray) -> int:
    """The crc register after ``data`` from a zero register (no pre- or post-xor)."""
    size = data.size
    lanes = min(_MAX_LANES, 1 << ((size // _MIN_LANE_BYTES).bit_length() - 1))
    lane_len = -(-size // lanes)
    lane_len += lane_len & 1  # whole 16-bit words
    # Zero bytes leave a zero register at zero, so padding the front evens out the lanes.
    pad = lanes * lane_len - size
    if pad:
        padded = np.zeros(lanes * lane_len, dtype=np.uint8)
        padded[pad:] = data
        data = padded
    # Column j is word j of every lane. Reading it strided measured as fast as transposing
    # first: a few dozen steps reuse each cache line while the lanes' lines stay in L2.
    words = data.view("<u2").reshape(lanes, lane_len // 2)
    regs = np.zeros(lanes, dtype=np.uint32)
    index = np.empty(lanes, dtype=np.uint32)
    looked_up = np.empty(lanes, dtype=np.uint32)
    for step in range(words.shape[1]):
        np.bitwise_xor(regs, words[:, step], out=index)
        np.bitwise_and(index, 0xFFFF, out=index)
        np.take(_PAIR_TABLE, index, out=looked_up)
        np.right_shift(regs, 16, out=regs)
        np.bitwise_xor(regs, looked_up, out=regs)
    # Merge neighbours: the left lane's register shifted past the right lane, xor the right.
    span = lane_len
    while regs.size > 1:
        pairs = regs.reshape(-1, 2)
        regs = _shift(pairs[:, 0], span) ^ pairs[:, 1]
        span *= 2
    return int(regs[0])


def _update(data: np.ndarray, crc: int) -> int:
    reg = crc ^ _UINT32_MAX
    if data.size < _SMALL_INPUT:
        table = _TABLE
        for byte in data.tobytes():
            reg = table[(reg ^ byte) & 0xFF] ^ (reg >> 8)
        return reg ^ _UINT32_MAX
    # The register is linear: the incoming one shifted past the data, xor the data's own.
    reg = _multmodp(_x2nmodp(data.size, 3), reg) ^ _register_of(data)
    return reg ^ _UINT32_MAX


def _bytes_of(obj: Any, func: str, arg: str, writable: bool = False) -> np.ndarray:
    """A flat uint8 view of obj's buffer, refused as the native module refuses it."""
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"a bytes-like object is required, not '{type(obj).__name__}'") from None
    if not view.c_contiguous or (writable and view.readonly):
        kind = "writable " if writable else ""
        raise BufferError(f"{func}(): {arg} must be a {kind}C-contiguous buffer")
    return np.frombuffer(view, dtype=np.uint8)


def _uint(obj: Any, func: str, arg: str, maximum: int) -> int:
    value = operator.index(obj)
    if not 0 <= value <= maximum:
        raise ValueError(f"{func}(): {arg} must be between 0 and {maximum}, got {value!r}")
    return value


def _count(obj: Any, func: str, arg: str) -> int:
    value = operator.index(obj)
    if value < 1:
        raise ValueError(f"{func}(): {arg} must be >= 1, got {value!r}")
    return value


def _sequence(obj: Any, message: str) -> Sequence[Any]:
    if isinstance(obj, (list, tuple)):
        return obj
    try:
        items = iter(obj)
    except TypeError:
        raise TypeError(message) from None
    return list(items)


def _checksum(func: str, data: Any, value: Any) -> int:
    view = _bytes_of(data, func, "data")
    return _update(view, _uint(value, func, "value", _UINT32_MAX))


def crc32c(data: Any, value: int = 0, /) -> int:
    """CRC-32C of data, continuing from value (a previous crc)."""
    return _checksum("crc32c", data, value)


def crc32c_sw(data: Any, value: int = 0, /) -> int:
    """CRC-32C; the same numpy path as crc32c here."""
    return _checksum("crc32c_sw", data, value)


def crc32c_hw(data: Any, value: int = 0, /) -> int:
    """Always RuntimeError: the fallback has no hardware path."""
    raise RuntimeError("crc32c_hw(): this CPU has no CRC-32C instruction")


def crc32c_combine(crc1: int, crc2: int, len2: int, /) -> int:
    """CRC-32C of A followed by B, from crc32c(A), crc32c(B) and len(B)."""
    crc1 = _uint(crc1, "crc32c_combine", "crc1", _UINT32_MAX)
    crc2 = _uint(crc2, "crc32c_combine", "crc2", _UINT32_MAX)
    len2 = _uint(len2, "crc32c_combine", "len2", _UINT64_MAX)
    return _multmodp(_x2nmodp(len2, 3), crc1) ^ crc2


def crc32c_chunks(data: Any, chunk_size: int, threads: int = 1, /) -> list[int]:
    """CRC-32C of each consecutive chunk_size piece of data (the last may be shorter)."""
    view = _bytes_of(data, "crc32c_chunks", "data")
    chunk_size = _count(chunk_size, "crc32c_chunks", "chunk_size")
    _count(threads, "crc32c_chunks", "threads")
    return [
        _update(view[start : start + chunk_size], 0) for start in range(0, view.size, chunk_size)
    ]


def equal_chunks(a: Any, b: Any, chunk_size: int, threads: int = 1, /) -> bytes:
    """1 for each chunk_size piece of a (the last may be shorter) that equals the piece of
    b at the same offset, in bytes and length, else 0."""
    a_bytes = _bytes_of(a, "equal_chunks", "a")
    b_bytes = _bytes_of(b, "equal_chunks", "b")
    chunk_size = _count(chunk_size, "equal_chunks", "chunk_size")
    _count(threads, "equal_chunks", "threads")
    pieces = range(0, a_bytes.size, chunk_size)
    return bytes(int(np.array_equal(a_bytes[i : i + chunk_size], b_bytes[i : i + chunk_size]))
                 for i in pieces)  # fmt: skip


def _check_sizes(func: str, dst_bytes: np.ndarray, src_bytes: np.ndarray) -> None:
    if dst_bytes.size != src_bytes.size:
        raise ValueError(
            f"{func}(): dst has {dst_bytes.size} bytes but src has {src_bytes.size} bytes"
        )


def copy(dst: Any, src: Any, threads: int = 1, /) -> None:
    """Copy src into dst (same size)."""
    dst_bytes = _bytes_of(dst, "copy", "dst", writable=True)
    src_bytes = _bytes_of(src, "copy", "src")
    _count(threads, "copy", "threads")
    _check_sizes("copy", dst_bytes, src_bytes)
    np.copyto(dst_bytes, src_bytes)


def copy_many(dsts: Sequence[Any], srcs: Sequence[Any], threads: int = 1, /) -> None:
    """Copy srcs[i] into dsts[i] for every i; nothing is copied unless all pairs match."""
    dsts = _sequence(dsts, "copy_many(): dsts must be a sequence")
    srcs = _sequence(srcs, "copy_many(): srcs must be a sequence")
    _count(threads, "copy_many", "threads")
    if len(dsts) != len(srcs):
        raise ValueError(f"copy_many(): {len(dsts)} destinations but {len(srcs)} sources")
    pairs = []
    for i, (dst, src) in enumerate(zip(dsts, srcs, strict=True)):
        dst_bytes = _bytes_of(dst, "copy_many", f"dsts[{i}]", writable=True)
        src_bytes = _bytes_of(src, "copy_many", f"srcs[{i}]")
        if dst_bytes.size != src_bytes.size:
            raise ValueError(
                f"copy_many(): dsts[{i}] has {dst_bytes.size} bytes"
                f" but srcs[{i}] has {src_bytes.size} bytes"
            )
        pairs.append((dst_bytes, src_bytes))
    for dst_bytes, src_bytes in pairs:
        np.copyto(dst_bytes, src_bytes)


def copy_crc32c(dst: Any, src: Any, value: int = 0, /) -> int:
    """Copy src into dst and return the CRC-32C of src, continuing from value."""
    dst_bytes = _bytes_of(dst, "copy_crc32c", "dst", writable=True)
    src_bytes = _bytes_of(src, "copy_crc32c", "src")
    value = _uint(value, "copy_crc32c", "value", _UINT32_MAX)
    _check_sizes("copy_crc32c", dst_bytes, src_bytes)
    np.copyto(dst_bytes, src_bytes)
    return _update(src_bytes, value)


def gf256_muladd(dst: Any, src: Any, coef: Any, /) -> None:
    dst_bytes = _bytes_of(dst, "gf256_muladd", "dst", writable=True)
    src_bytes = _bytes_of(src, "gf256_muladd", "src")
    product = _uint(coef, "gf256_muladd", "coef", 255)
    _check_sizes("gf256_muladd", dst_bytes, src_bytes)
    if product:
        dst_bytes ^= gf256.products()[product][src_bytes]


def prefault(buf: Any, /) -> None:
    """Make every page of the writable buffer resident by rewriting one byte per page.

    Unlike the native path this cannot detect a mapping that cannot be backed (a full
    tmpfs): the touch then dies of SIGBUS.
    """
    view = _bytes_of(buf, "prefault", "buf", writable=True)
    if not view.size:
        return
    view[:1] = view[:1]
    first_boundary = -view.ctypes.data % mmap.PAGESIZE
    per_page = view[first_boundary :: mmap.PAGESIZE]
    per_page[...] = per_page.copy()


def fallocate(fd: int, offset: int, length: int, /) -> None:
    """posix_fallocate(fd, offset, length); OSError on failure."""
    os.posix_fallocate(fd, offset, length)


def pwrite_all(fd: int, data: Any, offset: int, /) -> None:
    """Write all of data at offset, retrying short writes; OSError on failure."""
    fd, offset = operator.index(fd), operator.index(offset)
    view = memoryview(_bytes_of(data, "pwrite_all", "data"))
    done = 0
    while done < len(view):
        written = os.pwrite(fd, view[done:], offset + done)
        if written == 0:  # no progress and no error: stop rather than spin, as native does
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        done += written


def pread_into(fd: int, buf: Any, offset: int, /) -> int:
    """Fill buf from offset; returns the bytes read, fewer only at end of file."""
    fd, offset = operator.index(fd), operator.index(offset)
    view = memoryview(_bytes_of(buf, "pread_into", "buf", writable=True))
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            break
        done += count
    return done
