"""The per-rank data file: a safetensors-compatible layout of a rank's tensor bytes.

``[8-byte little-endian header length][JSON header, space-padded][data buffer]``. The
header is padded so the data buffer starts on a 4 KiB boundary, and tensors are ordered by
decreasing item size so each one is aligned to its item size (safetensors forbids gaps).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import KeyCollisionError

HEADER_ALIGN = 4096
METADATA_KEY = "__metadata__"

# safetensors dtype name -> item size in bytes.
ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4,
    "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
    "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
}  # fmt: skip

_NUMPY_NAMES = {
    np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8",
    np.dtype(np.int16): "I16", np.dtype(np.uint16): "U16", np.dtype(np.float16): "F16",
    np.dtype(np.int32): "I32", np.dtype(np.uint32): "U32", np.dtype(np.float32): "F32",
    np.dtype(np.int64): "I64", np.dtype(np.uint64): "U64", np.dtype(np.float64): "F64",
    np.dtype(np.complex64): "C64",
}  # fmt: skip
# Extension dtypes (ml_dtypes, used by JAX) known by their numpy name.
_EXTENSION_NAMES = {
    "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e8m0fnu": "F8_E8M0", "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
}  # fmt: skip
_BY_NAME = {name: dtype for dtype, name in _NUMPY_NAMES.items()}


def dtype_name(dtype: np.dtype) -> str:
    """The safetensors name of a numpy dtype; ValueError if the format has none."""
    dtype = np.dtype(dtype)
    name = _NUMPY_NAMES.get(dtype.newbyteorder("=")) or _EXTENSION_NAMES.get(dtype.name)
    if name is None:
        raise ValueError(
            f"numpy dtype {dtype} has no safetensors equivalent; supported: "
            f"{', '.join(sorted({str(d) for d in _NUMPY_NAMES} | set(_EXTENSION_NAMES)))}"
        )
    return name


def numpy_dtype(name: str) -> np.dtype | None:
    """The little-endian numpy dtype for a safetensors dtype name, None if numpy lacks it."""
    dtype = _BY_NAME.get(name)
    if dtype is not None:
        return dtype.newbyteorder("<")
    extension = next((ext for ext, st in _EXTENSION_NAMES.items() if st == name), None)
    if extension is None:
        return None
    try:
        import ml_dtypes  # optional: comes with JAX
    except ImportError:
        return None
    return np.dtype(getattr(ml_dtypes, extension)) if hasattr(ml_dtypes, extension) else None


@dataclass(frozen=True)
class Entry:
    """Where one leaf's bytes lie in the data buffer (offsets relative to its start)."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Layout:
    """A planned data file: the header bytes and every leaf's position after it."""

    header: bytes
    entries: tuple[Entry, ...]  # in file order
    data_start: int
    file_size: int


def plan(items: Iterable[tuple[str, str, Sequence[int], int]], metadata: dict[str, str]) -> Layout:
    """Lay out ``(key, dtype, shape, nbytes)`` items and build the safetensors header."""
    items = list(items)
    for key, dtype, shape, nbytes in items:
        if key == METADATA_KEY:
            raise KeyCollisionError(
                f"key path {METADATA_KEY!r} is reserved by the safetensors format"
            )
        expected = ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64))
        if nbytes != expected:
            raise ValueError(
                f"key {key!r}: {nbytes} bytes given for dtype {dtype} shape {tuple(shape)}, "
                f"expected {expected}"
            )
    order = sorted(range(len(items)), key=lambda i: -ITEMSIZE[items[i][1]])
    entries, offset = [], 0
    for i in order:
        key, dtype, shape, nbytes = items[i]
        entries.append(Entry(key, dtype, tuple(int(d) for d in shape), offset, nbytes))
        offset += nbytes
    header_json = {METADATA_KEY: dict(metadata)}
    for entry in entries:
        header_json[entry.key] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [entry.offset, entry.offset + entry.nbytes],
        }
    text = json.dumps(header_json, separators=(",", ":"), ensure_ascii=False).encode()
    padded = len(text) + (-(8 + len(text)) % HEADER_ALIGN)
    header = struct.pack("<Q", padded) + text.ljust(padded, b" ")
    return Layout(header, tuple(entries), len(header), len(header) + offset)
