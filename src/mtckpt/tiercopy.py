"""Copying a committed shard from one tier's storage to another, every chunk checked
against the manifest's crc32c on the way: a copy never carries bytes that changed after
they were committed."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from . import checksum
from .errors import ChecksumMismatchError
from .format import encoding, naming
from .format.manifest import RankManifest
from .restore.read import close_mapping, open_data, read_manifest
from .tiers.base import Storage

WRITE_SIZE = 16 * 1024 * 1024  # bytes per write to the destination


def put_shard(
    dest: Storage, manifest: RankManifest, data, where: str, threads: int = 1,
    recheck: bool = False, progress: Callable[[int], None] | None = None,
) -> None:  # fmt: skip
    """Write a shard to ``dest``: ``data`` (its whole data file), every chunk checked against
    ``manifest`` before it is given out, then the manifest (the shard is whole on ``dest``
    once its manifest is there). A storage that takes whole files gets the file in one
    buffer, encoded as it stores it, and a manifest that records how it is stored; with
    ``recheck`` (``data`` may be overwritten meanwhile: a memory slot no one pins), the
    file is checked again once it is up, and deleted if it changed. ``progress`` is given
    the bytes of each piece written."""
    view = memoryview(data).cast("B")
    run, step = manifest.run, manifest.step
    if dest.whole_files:
        check_chunks(view, manifest, 0, where, threads)
        with ThreadPoolExecutor(1) as pool:  # the stored bytes' crc32c beside the upload
            pieces, stored = encoding.encode(view, manifest.chunk_size, dest.compression,
                                             dest.compression_level, threads, pool)  # fmt: skip
            size = view.nbytes if dest.compression is None else None  # zstd: known at the end
            dest.write_stream(run, step, manifest.data_file, size, pieces)
            stored = stored.result()
        if progress is not None:
            progress(view.nbytes)
        if recheck:
            try:
                check_chunks(view, manifest, 0, f"{where} (changed while it was uploaded)",
                              threads)  # fmt: skip
            except ChecksumMismatchError:
                dest.delete(run, step, manifest.data_file)
                raise
        manifest = dataclasses.replace(manifest, stored=stored)
    else:
        dest.write_stream(run, step, manifest.data_file, manifest.file_size,
                          _pieces(view, manifest, where, progress))  # fmt: skip
        manifest = dataclasses.replace(manifest, stored=None)
    dest.write_bytes(run, step, naming.manifest_file(manifest.rank), manifest.to_json())


def _pieces(view: memoryview, manifest: RankManifest, where: str, progress=None
            ) -> Iterator[memoryview]:  # fmt: skip
    size = manifest.chunk_size
    per_piece = max(1, WRITE_SIZE // size)  # small chunks, large writes
    try:
        for first in range(0, len(manifest.chunk_crc32c), per_piece):
            piece = view[first * size : (first + per_piece) * size]
            check_chunks(piece, manifest, first, where)
            yield piece
            if progress is not None:
                progress(piece.nbytes)
    finally:
        view.release()


def check_chunks(piece, manifest: RankManifest, first: int, where: str, threads: int = 1):
    """Check ``piece``, the whole chunks from chunk ``first`` on, against ``manifest``."""
    actual = checksum.crc32c_chunks(piece, manifest.chunk_size, threads)
    wanted_crcs = manifest.chunk_crc32c[first : first + len(actual)]
    for index, (got, wanted) in enumerate(zip(actual, wanted_crcs, strict=True), first):
        if got != wanted:
            raise ChecksumMismatchError(
                f"{where}: chunk {index} has crc32c {got:#010x}, the manifest records "
                f"{wanted:#010x}"
            )


def copy_shard(
    source: Storage, dest: Storage, run: str, step: int, rank: int, recheck: bool = False,
    progress: Callable[[int], None] | None = None, threads: int = 1,
    verified: Callable[[RankManifest], None] | None = None,
) -> int:  # fmt: skip
    """Copy ``rank``'s shard of ``step`` from ``source`` to ``dest``, verified (``recheck``,
    ``progress``, ``threads``: see put_shard); the bytes of its data file. ``verified`` is
    given the manifest once the shard is on ``dest``, every chunk checked (retention's
    Verdicts.record). Committing the step is the caller's."""
    manifest = read_manifest(source, run, step, rank)
    where = f"{source.describe()}: step {step} {manifest.data_file}"
    data = open_data(source, manifest, where)
    try:
        put_shard(dest, manifest, data, where, threads, recheck, progress)
    finally:
        close_mapping(data)
    if verified is not None:
        verified(manifest)
    return manifest.file_size
