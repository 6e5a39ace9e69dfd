"""Type stub of mtckpt._native, the C fast path (native/module.c).

Every buffer argument takes any object with the buffer protocol (bytes, bytearray,
memoryview, mmap, numpy arrays) that is C-contiguous; destinations must be writable.
Otherwise BufferError names the argument. ``threads`` above 64 count as 64.
"""

import sys
from collections.abc import Sequence
from typing import Any, TypeAlias

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:
    Buffer: TypeAlias = Any

hardware: str
"""Which path crc32c uses: "sse4.2", "armv8-crc" or "none"."""

def crc32c(data: Buffer, value: int = 0, /) -> int:
    """CRC-32C of data, continuing from value (a previous crc), on the fastest path."""

def crc32c_sw(data: Buffer, value: int = 0, /) -> int:
    """CRC-32C with the portable software path (slicing-by-8)."""

def crc32c_hw(data: Buffer, value: int = 0, /) -> int:
    """CRC-32C with the CPU's instruction; RuntimeError where it has none."""

def crc32c_combine(crc1: int, crc2: int, len2: int, /) -> int:
    """CRC-32C of A followed by B, from crc32c(A), crc32c(B) and len(B)."""

def crc32c_chunks(data: Buffer, chunk_size: int, threads: int = 1, /) -> list[int]:
    """CRC-32C of each consecutive chunk_size piece of data (the last may be shorter)."""

def equal_chunks(a: Buffer, b: Buffer, chunk_size: int, threads: int = 1, /) -> bytes:
    """1 for each chunk_size piece of a (the last may be shorter) that equals the piece of
    b at the same offset, in bytes and length, else 0."""

def copy(dst: Buffer, src: Buffer, threads: int = 1, /) -> None:
    """Copy src into dst (same size; ValueError otherwise), split across threads when large."""

def copy_many(dsts: Sequence[Buffer], srcs: Sequence[Buffer], threads: int = 1, /) -> None:
    """Copy srcs[i] into dsts[i] for every i, the total bytes split evenly across threads."""

def copy_crc32c(dst: Buffer, src: Buffer, value: int = 0, /) -> int:
    """Copy src into dst and return the CRC-32C of src continuing from value, in one pass."""

def gf256_muladd(dst: Buffer, src: Buffer, coef: int, /) -> None:
    """dst ^= coef * src, byte by byte in GF(2^8) (polynomial 0x11d): a parity update."""

def prefault(buf: Buffer, /) -> None:
    """Make every page of the writable buffer resident and mapped; contents stay."""

def fallocate(fd: int, offset: int, length: int, /) -> None:
    """posix_fallocate(fd, offset, length); OSError on failure."""

def pwrite_all(fd: int, data: Buffer, offset: int, /) -> None:
    """Write all of data at offset, retrying short writes; OSError on failure."""

def pread_into(fd: int, buf: Buffer, offset: int, /) -> int:
    """Fill buf from offset; returns the bytes read, fewer only at end of file."""
