"""crc32c through the fast path: the native extension when built, else the numpy fallback.

The backend is chosen once, on first use (``MTCKPT_NATIVE=auto|require|off``);
``mtckpt.checksum.backend`` says which one runs: ``"native"`` or ``"python"``.
"""

from __future__ import annotations

from typing import Any

from . import _fastpath


def crc32c(data: Any, value: int = 0) -> int:
    """CRC-32C of ``data`` (any buffer), continuing from ``value``."""
    return _fastpath.backend().crc32c(data, value)


def crc32c_chunks(data: Any, chunk_size: int, threads: int = 1) -> list[int]:
    """CRC-32C of each consecutive ``chunk_size`` piece of ``data``."""
    return _fastpath.backend().crc32c_chunks(data, chunk_size, threads)


def __getattr__(name: str) -> Any:
    if name == "backend":
        return _fastpath.backend_name()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
