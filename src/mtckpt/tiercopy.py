"""Copying a committed shard from one tier's storage to another, every chunk checked
against the manifest's crc32c on the way: a copy never carries bytes that changed after
they were committed."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from . import checksum, naming
from .errors import ChecksumMismatchError
from .manifest import RankManifest
from .restore import close_mapping, read_manifest
from .tiers.base import Storage

WRITE_SIZE = 16 * 1024 * 1024  # bytes per write to the destination


def checked_pieces(
    dest: Storage, data, manifest: RankManifest, where: str, threads: int = 1
) -> Iterable[memoryview]:
    """``data`` (a shard's whole data file) as ``dest.write_stream`` takes it, every chunk
    checked against ``manifest`` before it is given out: one buffer where ``dest`` wants
    whole files, else pieces of about WRITE_SIZE whole chunks, each checked in turn."""
    view = memoryview(data).cast("B")
    if dest.whole_files:
        _check_chunks(view, manifest, 0, where, threads)
        return [view]
    return _pieces(view, manifest, where)


def _pieces(view: memoryview, manifest: RankManifest, where: str) -> Iterator[memoryview]:
    size = manifest.chunk_size
    per_piece = max(1, WRITE_SIZE // size)  # small chunks, large writes
    try:
        for first in range(0, len(manifest.chunk_crc32c), per_piece):
            piece = view[first * size : (first + per_piece) * size]
            _check_chunks(piece, manifest, first, where)
            yield piece
    finally:
        view.release()


def _check_chunks(piece, manifest: RankManifest, first: int, where: str, threads: int = 1):
    """Check ``piece``, the whole chunks from chunk ``first`` on, against ``manifest``."""
    actual = checksum.crc32c_chunks(piece, manifest.chunk_size, threads)
    wanted_crcs = manifest.chunk_crc32c[first : first + len(actual)]
    for index, (got, wanted) in enumerate(zip(actual, wanted_crcs, strict=True), first):
        if got != wanted:
            raise ChecksumMismatchError(
                f"{where}: chunk {index} has crc32c {got:#010x}, the manifest records "
                f"{wanted:#010x}"
            )


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
        pieces = checked_pieces(dest, mapping, manifest, where)
        dest.write_stream(run, step, manifest.data_file, manifest.file_size, pieces)
    finally:
        close_mapping(mapping)
    dest.write_bytes(run, step, naming.manifest_file(rank), manifest_json)
    return manifest.file_size
