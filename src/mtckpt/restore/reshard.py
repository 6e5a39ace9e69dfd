"""Restoring a region of a sharded array from the shards every rank saved.

When a restore target does not hold exactly the shard this rank saved (another world
size, other placements, a replica another rank stored, or a whole array wanted from a
sharded checkpoint), its region is assembled from the overlapping slices of the saved
shards, read from the rank files of the step that this node's storages hold. Every chunk a
slice is read from is verified against its crc32c in the pass that copies it, once per
restore.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from .. import _fastpath, arrays
from ..arrays import Region
from ..errors import CorruptCheckpointError
from ..format import shard
from ..format.manifest import LeafRecord, RankManifest
from ..tiers.base import Storage
from .read import (
    VerifiedShard,
    close_mapping,
    copy_verified,
    open_data,
    read_manifest,
    region_of,
    regions_to_assemble,
    verify_shard,
)

log = logging.getLogger(__name__)

# Bytes are moved as unsigned integers of the item size: no dtype needs to be known to numpy.
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class StepFiles:
    """The rank files of one step across this node's storages (fastest first), opened on
    demand and verified chunk by chunk as byte ranges are read from them (``progress`` is
    told the bytes of each chunk checked)."""

    def __init__(self, storages: list[Storage], run: str, step: int,
                 progress: Callable[[int], None] | None = None) -> None:  # fmt: skip
        self.storages, self.run, self.step = storages, run, step
        self.progress = progress
        self._manifests: dict[int, tuple[Storage, RankManifest, dict[str, LeafRecord]]] = {}
        self._mappings: dict[int, Any] = {}
        self._verified: dict[int, set[int]] = {}  # per rank, the chunks checked so far
        self._bad: dict[int, list[tuple[Storage, str]]] = {}  # copies found damaged, per rank
        self._lock = threading.RLock()

    def manifest(self, rank: int) -> tuple[Storage, RankManifest, dict[str, LeafRecord]]:
        """The first good manifest of ``rank`` in the storages, with its records by key."""
        with self._lock:
            if rank not in self._manifests:
                self._manifests[rank] = self._find_manifest(rank)
            return self._manifests[rank]

    def _find_manifest(self, rank: int) -> tuple[Storage, RankManifest, dict[str, LeafRecord]]:
        problems = [reason for _, reason in self._bad.get(rank, [])]
        damaged = {storage for storage, _ in self._bad.get(rank, [])}
        for storage in self.storages:
            if storage in damaged:
                continue
            try:
                manifest = read_manifest(storage, self.run, self.step, rank)
            except CorruptCheckpointError as exc:
                problems.append(str(exc))
                continue
            return storage, manifest, manifest.records_by_key()
        raise CorruptCheckpointError(
            f"step {self.step}: no usable shard of rank {rank} on this node ({'; '.join(problems)})"
        )

    def copy(
        self, rank: int, pieces: list[tuple[str, int, int, np.ndarray | None]], threads: int = 1
    ) -> tuple[RankManifest, np.ndarray]:
        """Copy each ``(key, start, end, dst)`` byte range of a record of ``rank``'s data
        file into ``dst`` (None: only verify it), every chunk under them verified in the
        same pass. A damaged copy is set aside for the same rank's copy in the next storage.
        Returns the manifest and the bytes of the data file the ranges came from."""
        while True:
            storage, manifest, records = self.manifest(rank)
            where = f"{storage.describe()}: step {self.step} {manifest.data_file}"
            try:
                data = self._data(rank, storage, manifest, where)
                segments = []
                for key, start, end, dst in pieces:
                    record = records.get(key)
                    if record is None or end > record.nbytes:
                        raise CorruptCheckpointError(
                            f"{where}: the manifest has no {end} bytes of key {key!r}"
                        )
                    first = manifest.data_start + record.offset
                    segments.append((first + start, first + end, dst))
                with self._lock:
                    verified = set(self._verified.get(rank, ()))
                checked = copy_verified(data, manifest, segments, threads=threads, where=where,
                                        verified=verified, progress=self.progress)  # fmt: skip
                with self._lock:
                    self._verified.setdefault(rank, set()).update(checked)
                return manifest, data
            except CorruptCheckpointError as exc:
                with self._lock:
                    if self._manifests.get(rank, (None,))[0] is storage:
                        log.warning("%s; trying the next copy", str(exc))
                        self._bad.setdefault(rank, []).append((storage, str(exc)))
                        del self._manifests[rank]
                        self._verified.pop(rank, None)
                        close_mapping(self._mappings.pop(rank, None))

    def verified_bytes(self, rank: int, record: LeafRecord) -> np.ndarray:
        """The bytes of a record of ``rank``'s data file, every chunk under them verified."""
        manifest, data = self.copy(rank, [(record.key, 0, record.nbytes, None)])
        start = manifest.data_start + self.manifest(rank)[2][record.key].offset
        return data[start : start + record.nbytes]

    def _data(self, rank, storage, manifest, where) -> np.ndarray:
        with self._lock:
            if rank not in self._mappings:
                self._mappings[rank] = open_data(storage, manifest, where)
            mapping = self._mappings[rank]
        return np.frombuffer(mapping, np.uint8) if len(mapping) else np.zeros(0, np.uint8)

    def close(self) -> None:
        for mapping in self._mappings.values():
            close_mapping(mapping)
        self._mappings.clear()


class _Piece(NamedTuple):
    """The part of one saved shard that falls in a region being assembled."""

    key: str  # the saved shard's key in its data file
    output: Any  # the region it goes into
    source: Region  # the saved shard
    into: tuple[slice, ...]  # where it goes in the region
    out_of: tuple[slice, ...]  # where it comes from in the shard


def plan(
    files: StepFiles, key: str, dtype: str, saved_world: int, region: Region, output: Any = None
) -> dict:
    """The pieces of every saved shard of ``key`` that overlap ``region`` (going into
    ``output``), by rank. Raises CorruptCheckpointError if the shards leave a gap."""
    by_rank: dict[int, list[_Piece]] = {}
    copied: set[tuple] = set()  # shards seen in two places (replicas on two nodes) count once
    covered = 0
    for rank in range(saved_world):
        _, _, records = files.manifest(rank)
        leaf = records.get(key)
        for record in () if leaf is None else leaf.parts or (leaf,):
            if record.stored_by is not None:
                continue
            source = region_of(record)
            if source.global_shape != region.global_shape or record.dtype != dtype:
                raise CorruptCheckpointError(
                    f"key {key!r}: rank {rank} saved {record.dtype} of global shape "
                    f"{source.global_shape}, others {dtype} of {region.global_shape}"
                )
            piece = _overlap(record.key, output, source, region, copied)
            if piece is not None:
                by_rank.setdefault(rank, []).append(piece)
                covered += math.prod(s.stop - s.start for s in piece.into)
    if covered != math.prod(region.shape):
        raise CorruptCheckpointError(
            f"key {key!r}: the saved shards cover {covered} of the {math.prod(region.shape)} "
            f"elements at offset {region.global_offset} of shape {region.shape} needed here"
        )
    return by_rank


def _overlap(key, output, source: Region, region: Region, copied: set) -> _Piece | None:
    """The piece of saved shard ``source`` inside ``region``; None if they do not overlap,
    or a shard at the same place was taken already."""
    lows = [max(s, r) for s, r in zip(source.global_offset, region.global_offset, strict=True)]
    highs = [
        min(s + n, r + m)
        for s, n, r, m in zip(
            source.global_offset, source.shape, region.global_offset, region.shape, strict=True
        )
    ]
    placement = (source.global_offset, source.shape)
    if any(lo >= hi for lo, hi in zip(lows, highs, strict=True)) or placement in copied:
        return None
    copied.add(placement)
    into = tuple(
        slice(lo - r, hi - r) for lo, hi, r in zip(lows, highs, region.global_offset, strict=True)
    )
    out_of = tuple(
        slice(lo - s, hi - s) for lo, hi, s in zip(lows, highs, source.global_offset, strict=True)
    )
    return _Piece(key, output, source, into, out_of)


def _span(shape: tuple[int, ...], box: tuple[slice, ...]) -> tuple[int, int, bool]:
    """The first and one-past-last element of ``box`` in a C-order array of ``shape``, and
    whether the box is that whole run (so it can be copied as one range)."""
    strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    first = sum(s.start * stride for s, stride in zip(box, strides, strict=True))
    last = sum((s.stop - 1) * stride for s, stride in zip(box, strides, strict=True))
    extents = [s.stop - s.start for s in box]
    return first, last + 1, last + 1 - first == math.prod(extents)


def verify_assembly(
    files: StepFiles,
    manifest: RankManifest,
    regions: dict[str, list[Region]],
    targets: dict[str, Any],
    threads: int = 1,
) -> Callable[[], dict[str, Any]]:
    """Check every chunk each leaf's regions are assembled from, in the saved shards; what
    goes into new buffers is copied in that pass. Returns the function that copies the rest
    into the targets (in place where their memory allows, else through new buffers) and
    gives each leaf's value; call it while ``files`` is open. Nothing in ``targets``
    changes before. Each source file is read in one pass over the chunks it is needed
    from, on ``threads`` threads."""
    records = {record.key: record for record in manifest.leaves}
    outputs = {}  # (key, region index) -> (dtype, region, buffer, whether the target's memory)
    leaves = {}  # key -> (record, adapter, target, in place)
    pieces: dict[int, list[_Piece]] = {}
    for key, wanted in regions.items():
        record = records[key]
        target = targets.get(key)
        adapter = arrays.for_target(target)
        buf = adapter.target_bytes(target) if adapter is not None and len(wanted) == 1 else None
        leaves[key] = (record, adapter, target, buf is not None)
        for index, region in enumerate(wanted):
            own = buf is not None and not index
            if not own:
                buf = np.empty(math.prod(region.shape) * shard.ITEMSIZE[record.dtype], np.uint8)
            output = (key, index)
            outputs[output] = (record.dtype, region, buf, own)
            found = plan(files, key, record.dtype, manifest.world_size, region, output)
            for rank, more in found.items():
                pieces.setdefault(rank, []).extend(more)
    later = []  # copies into the targets' memory and strided copies, once all is verified
    for rank, found in sorted(pieces.items()):
        later.extend(_verify_pieces(files, rank, found, outputs, threads))

    def fill() -> dict[str, Any]:
        _copy_later(later, threads)
        values = {}
        for key, (record, adapter, target, in_place) in leaves.items():
            bufs = [outputs[key, index][2] for index in range(len(regions[key]))]
            if adapter is None:
                kind = arrays.for_kind(record.kind)
                shape = regions[key][0].shape
                values[key] = kind.new_value(record.kind, record.dtype, shape, bufs[0])
            elif in_place:
                values[key] = target
            else:
                values[key] = adapter.fill_regions(target, record.dtype, bufs)
        return values

    return fill


def _verify_pieces(files, rank, found, outputs, threads) -> list[tuple]:
    """Check the chunks of ``rank``'s file the pieces are read from, copying the pieces
    that are one run of bytes into new buffers; returns the copies left for later:
    ``("run", dst, src)`` into a target's memory, ``("strided", piece, item, source,
    output)`` for every piece that is not one run of bytes in both."""
    ranges, later = [], []
    for piece in found:
        dtype, region, buf, own = outputs[piece.output]
        item = shard.ITEMSIZE[dtype]
        first, end, whole = _span(piece.source.shape, piece.out_of)
        dst_first, _, dst_whole = _span(region.shape, piece.into)
        dst = None
        if whole and dst_whole:
            dst = buf[dst_first * item : (dst_first + end - first) * item]
            if own:
                later.append(("run", dst, piece.key, first * item, end * item))
                dst = None
        else:
            later.append(("strided", piece, item))
        ranges.append((piece.key, first * item, end * item, dst))
    manifest, data = files.copy(rank, ranges, threads)
    _, _, records = files.manifest(rank)
    copies = []
    for entry in later:
        if entry[0] == "run":
            _, dst, key, start, end = entry
            offset = manifest.data_start + records[key].offset
            copies.append(("run", dst, data[offset + start : offset + end]))
        else:
            _, piece, item = entry
            offset = manifest.data_start + records[piece.key].offset
            nbytes = math.prod(piece.source.shape) * item
            source = data[offset : offset + nbytes].view(_RAW[item]).reshape(piece.source.shape)
            copies.append(("strided", piece, item, source, outputs[piece.output]))
    return copies


def _copy_later(copies: list[tuple], threads: int) -> None:
    """The copies :func:`_verify_pieces` left, from verified bytes."""
    runs = [entry for entry in copies if entry[0] == "run"]
    _fastpath.backend().copy_many([e[1] for e in runs], [e[2] for e in runs], threads)
    strided = [entry for entry in copies if entry[0] == "strided"]

    def copy_one(entry) -> None:
        _, piece, item, source, (_, region, buf, _) = entry
        raw = _RAW[item]
        np.copyto(buf.view(raw).reshape(region.shape)[piece.into], source[piece.out_of])

    if threads > 1 and len(strided) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(copy_one, strided))
    else:
        for entry in strided:
            copy_one(entry)
    copies.clear()


class VerifiedValues:
    """Every leaf of a rank's shard of a step, verified and not yet in the targets:
    :meth:`fill` puts it there and gives the values; :meth:`close` releases the files
    (the caller's ``StepFiles`` too stay open until then)."""

    def __init__(self, own: VerifiedShard, assembly: Callable[[], dict[str, Any]]) -> None:
        self._own, self._assembly = own, assembly

    def fill(self) -> dict[str, Any]:
        values = self._own.fill()
        values.update(self._assembly())
        return values

    def close(self) -> None:
        self._own.close()


def verify_values(
    files: StepFiles,
    storage: Storage,
    manifest: RankManifest,
    targets: dict[str, Any],
    skip: set[str],
    threads: int = 1,
) -> VerifiedValues:
    """Every leaf of ``manifest`` not in ``skip``, verified: read from its own file on
    ``storage`` where the target (or, without one, the whole array) is exactly the saved
    piece, and assembled from the step's other rank files where it is not. Nothing in
    ``targets`` changes until :meth:`VerifiedValues.fill`."""
    regions = regions_to_assemble(manifest, targets, skip)
    own = verify_shard(storage, manifest, targets, skip=skip | set(regions), threads=threads,
                       progress=files.progress)  # fmt: skip
    try:
        assembly = verify_assembly(files, manifest, regions, targets, threads=threads)
    except BaseException:
        own.close()
        raise
    return VerifiedValues(own, assembly)


def load_values(
    files: StepFiles,
    storage: Storage,
    manifest: RankManifest,
    targets: dict[str, Any],
    skip: set[str],
    threads: int = 1,
) -> dict[str, Any]:
    """:func:`verify_values`, then its fill: every leaf's value."""
    verified = verify_values(files, storage, manifest, targets, skip, threads)
    try:
        return verified.fill()
    finally:
        verified.close()
