"""Copying a committed shard from one tier's storage to another, every chunk checked
against the manifest's crc32c on the way: a copy never carries bytes that changed after
they were committed."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from . import checksum, incremental
from .errors import ChecksumMismatchError
from .format import encoding, naming
from .format.manifest import RankManifest
from .restore.read import open_data, read_manifest
from .tiers.base import Storage, close_mapping

WRITE_SIZE = 16 * 1024 * 1024  # bytes per write to the destination


def put_shard(
    dest: Storage, manifest: RankManifest, data, where: str, threads: int = 1,
    recheck: bool = False, progress: Callable[[int], None] | None = None,
) -> int:  # fmt: skip
    """Write a shard to ``dest``: ``data`` (its whole data file), every chunk checked against
    ``manifest`` before it is given out, then the manifest (the shard is whole on ``dest``
    once its manifest is there). A storage that takes whole files gets the file in one
    buffer, encoded as it stores it, and a manifest that records how it is stored; with
    ``recheck`` (``data`` may be overwritten meanwhile: a memory slot no one pins), the
    file is checked again once it is up, and deleted if it changed. ``progress`` is given
    the bytes of each piece written. A storage that stores incrementally gets only the
    blocks changed since its base step (:mod:`mtckpt.incremental`). The bytes written."""
    view = memoryview(data).cast("B")
    run, step = manifest.run, manifest.step
    if dest.whole_files:
        check_chunks(view, manifest, 0, where, threads)
        delta = _delta(dest, manifest)
        with ThreadPoolExecutor(1) as pool:  # the stored bytes' crc32c beside the upload
            if delta is not None:
                own, planned = delta
                block = planned.block_size
                pieces = [view[i * block : (i + 1) * block] for i in own]
                crc = pool.submit(lambda: _crc_of(pieces))
                dest.write_stream(run, step, manifest.data_file, planned.size, iter(pieces))
                stored = dataclasses.replace(planned, crc32c=crc.result())
            else:
                pieces, stored = encoding.encode(view, manifest.chunk_size, dest.compression,
                                                 dest.compression_level, threads, pool)  # fmt: skip
                size = view.nbytes if dest.compression is None else None  # zstd: at the end
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
        written = stored.size
    else:
        dest.write_stream(run, step, manifest.data_file, manifest.file_size,
                          _pieces(view, manifest, where, progress))  # fmt: skip
        manifest = dataclasses.replace(manifest, stored=None)
        written = manifest.file_size
    dest.write_bytes(run, step, naming.manifest_file(manifest.rank), manifest.to_json())
    return written


def _delta(dest: Storage, manifest: RankManifest):
    """The blocks to upload and the StoredFile of a delta, if ``dest`` stores this step
    as one: it stores incrementally, the step records its changes, a base step is there
    and some block is unchanged since it. None: the step goes up whole."""
    if not dest.full_every or manifest.changes is None or dest.compression is not None:
        return None
    base = incremental.find_base(dest, manifest, dest.full_every)
    if base is None:
        return None
    own, stored = incremental.delta_of(manifest, base)
    return None if len(own) == len(manifest.changes.since) else (own, stored)


def _crc_of(pieces: list[memoryview]) -> int:
    crc = 0
    for piece in pieces:
        crc = checksum.crc32c(piece, crc)
    return crc


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
    ``progress``, ``threads``: see put_shard). ``verified`` is
    given the manifest once the shard is on ``dest``, every chunk checked (retention's
    Verdicts.record). Committing the step is the caller's. The bytes written to ``dest``
    (fewer than the file's where ``dest`` stores incrementally)."""
    manifest = read_manifest(source, run, step, rank)
    where = f"{source.describe()}: step {step} {manifest.data_file}"
    data = open_data(source, manifest, where)
    try:
        written = put_shard(dest, manifest, data, where, threads, recheck, progress)
    finally:
        close_mapping(data)
    if verified is not None:
        verified(manifest)
    return written
