"""Copying a committed shard from one tier's storage to another, every chunk checked
against the manifest's crc32c on the way: a copy never carries bytes that changed after
they were committed."""

from __future__ import annotations

from collections.abc import Iterator

from . import checksum, naming
from .errors import ChecksumMismatchError
from .manifest import RankManifest
from .restore import close_mapping, read_manifest
from .tiers.base import Storage

WRITE_SIZE = 16 * 1024 * 1024  # bytes per write to the destination


def verified_pieces(data, manifest: RankManifest, where: str) -> Iterator[memoryview]:
    """``data`` (a shard's whole data file) in pieces of about WRITE_SIZE whole chunks,
    each checked against ``manifest`` before it is given out."""
    size = manifest.chunk_size
    per_piece = max(1, WRITE_SIZE // size)  # small chunks, large writes
    view = memoryview(data).cast("B")
    expected = manifest.chunk_crc32c
    try:
        for first in range(0, len(expected), per_piece):
            piece = view[first * size : (first + per_piece) * size]
            actual = checksum.crc32c_chunks(piece, size)
            for index, (got, wanted) in enumerate(
                zip(actual, expected[first : first + len(actual)], strict=True), first
            ):
                if got != wanted:
                    raise ChecksumMismatchError(
                        f"{where}: chunk {index} has crc32c {got:#010x}, the manifest records "
                        f"{wanted:#010x}"
                    )
            yield piece
    finally:
        view.release()


def verified(data, manifest: RankManifest, where: str, threads: int = 1) -> memoryview:
    """``data`` (a shard's whole data file) once every chunk matches ``manifest``."""
    view = memoryview(data).cast("B")
    actual = checksum.crc32c_chunks(view, manifest.chunk_size, threads)
    for index, (got, wanted) in enumerate(zip(actual, manifest.chunk_crc32c, strict=True)):
        if got != wanted:
            raise ChecksumMismatchError(
                f"{where}: chunk {index} has crc32c {got:#010x}, the manifest records "
                f"{wanted:#010x}"
            )
    return view


def copy_shard(source: Storage, dest: Storage, run: str, step: int, rank: int) -> int:
    """Copy ``rank``'s data file and then its manifest (the shard is whole on ``dest`` once
    its manifest is there); the bytes copied. Committing the step is the caller's."""
    manifest = read_manifest(source, run, step, rank)
    manifest_json = source.read_bytes(run, step, naming.manifest_file(rank))
    where = f"{source.describe()}: step {step} {manifest.data_file}"
    mapping = source.map(run, step, manifest.data_file)
    try:
        if len(mapping) != manifest.file_size:
            raise ChecksumMismatchError(
                f"{where}: {len(mapping)} bytes, the manifest records {manifest.file_size}"
            )
        pieces = verified_pieces(mapping, manifest, where)
        dest.write_stream(run, step, manifest.data_file, manifest.file_size, pieces)
    finally:
        close_mapping(mapping)
    dest.write_bytes(run, step, naming.manifest_file(rank), manifest_json)
    return manifest.file_size
