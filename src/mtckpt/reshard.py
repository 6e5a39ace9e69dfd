"""Restoring a region of a sharded array from the shards every rank saved.

When a restore target does not hold exactly the shard this rank saved (another world
size, other placements, a replica another rank stored, or a whole array wanted from a
sharded checkpoint), its region is assembled from the overlapping slices of the saved
shards, read from the rank files of the step that this node's storages hold. Every chunk a
slice is read from is verified against its crc32c first, once per restore.
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from . import arrays, checksum, shard
from .arrays import Region
from .errors import ChecksumMismatchError, CorruptCheckpointError
from .manifest import LeafRecord, RankManifest
from .restore import close_mapping, read_manifest, region_of
from .tiers.base import Storage

log = logging.getLogger(__name__)

# Bytes are moved as unsigned integers of the item size: no dtype needs to be known to numpy.
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class StepFiles:
    """The rank files of one step across this node's storages (fastest first), opened on
    demand and verified chunk by chunk as slices are read from them."""

    def __init__(self, storages: list[Storage], run: str, step: int) -> None:
        self.storages, self.run, self.step = storages, run, step
        self._manifests: dict[int, tuple[Storage, RankManifest, dict[str, LeafRecord]]] = {}
        self._mappings: dict[int, Any] = {}
        # Per rank, chunk -> an event set once its crc32c has been checked: the first thread
        # to need a chunk checks it, others wait for it rather than checking it again.
        self._verified: dict[int, dict[int, threading.Event]] = {}
        self._bad: dict[int, list[tuple[Storage, str]]] = {}  # copies found damaged, per rank
        self._lock = threading.RLock()  # several threads assemble at once

    def manifest(self, rank: int) -> tuple[Storage, RankManifest, dict[str, LeafRecord]]:
        """The first good manifest of ``rank`` in the storages, with its records by key."""
        with self._lock:
            return self._manifest(rank)

    def _manifest(self, rank: int) -> tuple[Storage, RankManifest, dict[str, LeafRecord]]:
        if rank not in self._manifests:
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
                records = {record.key: record for record in manifest.leaves}
                self._manifests[rank] = (storage, manifest, records)
                break
            else:
                raise CorruptCheckpointError(
                    f"step {self.step}: no usable shard of rank {rank} on this node "
                    f"({'; '.join(problems)})"
                )
        return self._manifests[rank]

    def verified_bytes(self, rank: int, record: LeafRecord) -> np.ndarray:
        """The bytes of a record of ``rank``'s data file, every chunk under them verified;
        a damaged copy is set aside for the same rank's copy in the next storage."""
        while True:
            storage = self.manifest(rank)[0]
            try:
                return self._verified_bytes(rank, record)
            except CorruptCheckpointError as exc:
                with self._lock:
                    if self._manifests.get(rank, (None,))[0] is storage:
                        log.warning("%s; trying the next copy", exc)
                        self._bad.setdefault(rank, []).append((storage, str(exc)))
                        del self._manifests[rank]
                        close_mapping(self._mappings.pop(rank, None))

    def _verified_bytes(self, rank: int, record: LeafRecord) -> np.ndarray:
        with self._lock:
            storage, manifest, records = self.manifest(rank)
            record = records.get(record.key, record)
            where = f"{storage.describe()}: step {self.step} {manifest.data_file}"
            if rank not in self._mappings:
                try:
                    mapping = storage.map(self.run, self.step, manifest.data_file)
                except FileNotFoundError:
                    raise CorruptCheckpointError(f"{where}: the data file is missing") from None
                if len(mapping) != manifest.file_size:
                    close_mapping(mapping)
                    raise CorruptCheckpointError(
                        f"{where}: {len(mapping)} bytes, the manifest records {manifest.file_size}"
                    )
                self._mappings[rank], self._verified[rank] = mapping, {}
            data = np.frombuffer(self._mappings[rank], np.uint8)
            verified = self._verified[rank]
        start = manifest.data_start + record.offset
        end = start + record.nbytes
        size = manifest.chunk_size
        for index in range(start // size, (max(end, start + 1) - 1) // size + 1):
            if index >= len(manifest.chunk_crc32c):
                continue
            with self._lock:
                checked = verified.get(index)
                mine = checked is None
                if mine:
                    checked = verified[index] = threading.Event()
            if not mine:
                checked.wait()
                if checked.error is not None:
                    raise ChecksumMismatchError(checked.error)
                continue
            expected = manifest.chunk_crc32c[index]
            try:
                actual = checksum.crc32c(data[index * size : (index + 1) * size])
            except BaseException:
                checked.error = f"{where}: chunk {index} could not be checked"
                checked.set()  # never leave the waiting threads waiting
                raise
            checked.error = None
            if actual != expected:
                checked.error = (
                    f"{where}: chunk {index} has crc32c {actual:#010x}, recorded "
                    f"{expected:#010x} (key {record.key!r})"
                )
            checked.set()
            if checked.error is not None:
                raise ChecksumMismatchError(checked.error)
        return data[start:end]

    def close(self) -> None:
        for mapping in self._mappings.values():
            close_mapping(mapping)
        self._mappings.clear()


def assemble(
    files: StepFiles, key: str, dtype: str, saved_world: int, region: Region, dst: np.ndarray
) -> None:
    """Fill ``dst`` (the uint8 bytes of ``region``, C order) from every saved shard of
    ``key`` that overlaps it. Raises CorruptCheckpointError if the shards leave a gap."""
    raw = _RAW[shard.ITEMSIZE[dtype]]
    target = dst.view(raw).reshape(region.shape) if dst.size else None
    copied: set[tuple] = set()  # shards seen in two places (replicas on two nodes) count once
    covered = 0
    for rank in range(saved_world):
        _, _, records = files.manifest(rank)
        record = records.get(key)
        if record is None or record.stored_by is not None:
            continue
        source = region_of(record)
        if source.global_shape != region.global_shape or record.dtype != dtype:
            raise CorruptCheckpointError(
                f"key {key!r}: rank {rank} saved {record.dtype} of global shape "
                f"{source.global_shape}, others {dtype} of {region.global_shape}"
            )
        lows = [max(s, r) for s, r in zip(source.global_offset, region.global_offset, strict=True)]
        highs = [
            min(s + n, r + m)
            for s, n, r, m in zip(
                source.global_offset, source.shape, region.global_offset, region.shape, strict=True
            )
        ]
        placement = (source.global_offset, source.shape)
        if any(lo >= hi for lo, hi in zip(lows, highs, strict=True)) or placement in copied:
            continue
        copied.add(placement)
        data = files.verified_bytes(rank, record).view(raw).reshape(source.shape)
        into = tuple(
            slice(lo - r, hi - r)
            for lo, hi, r in zip(lows, highs, region.global_offset, strict=True)
        )
        out_of = tuple(
            slice(lo - s, hi - s)
            for lo, hi, s in zip(lows, highs, source.global_offset, strict=True)
        )
        np.copyto(target[into], data[out_of])
        covered += math.prod(hi - lo for lo, hi in zip(lows, highs, strict=True))
    if covered != math.prod(region.shape):
        raise CorruptCheckpointError(
            f"key {key!r}: the saved shards cover {covered} of the {math.prod(region.shape)} "
            f"elements at offset {region.global_offset} of shape {region.shape} needed here"
        )


def assemble_values(
    files: StepFiles,
    manifest: RankManifest,
    regions: dict[str, Region],
    targets: dict[str, Any],
    threads: int = 1,
) -> dict[str, Any]:
    """Assemble each region, on ``threads`` threads: into its target in place where the
    target's memory allows, else into a new buffer (copied into the target, or a new value
    without one)."""
    records = {record.key: record for record in manifest.leaves}
    if threads > 1 and len(regions) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            futures = {
                key: pool.submit(_assemble_one, files, manifest, records[key], region, targets)
                for key, region in regions.items()
            }
            return {key: future.result() for key, future in futures.items()}
    return {
        key: _assemble_one(files, manifest, records[key], region, targets)
        for key, region in regions.items()
    }


def _assemble_one(files, manifest, record, region, targets) -> Any:
    """One region: into its target's memory where possible, else a new buffer."""
    target = targets.get(record.key)
    adapter = arrays.for_target(target)
    buf = adapter.target_bytes(target) if adapter is not None else None
    in_place = buf is not None
    if not in_place:
        buf = np.empty(math.prod(region.shape) * shard.ITEMSIZE[record.dtype], np.uint8)
    assemble(files, record.key, record.dtype, manifest.world_size, region, buf)
    if adapter is None:
        return arrays.for_kind(record.kind).new_value(record.kind, record.dtype, region.shape, buf)
    if not in_place:
        adapter.fill(target, record.dtype, region.shape, buf)
    return target
