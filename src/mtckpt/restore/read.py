"""Reading one rank's shard back from a storage, verified before any of it lands.

The data file is mapped and walked chunk by chunk (the manifest holds one crc32c per
chunk). A restore first checks every chunk holding bytes it reads, copying in the same pass
what goes into new buffers (values without a target); only once every chunk is good are the
bytes copied into the target's own arrays, so a damaged copy leaves the caller's memory as
it was. Chunks no wanted byte lies in are not read. Chunks are spread over threads; a
mismatch names the file, the chunk and the keys it holds. From the object tier (a storage
read by ranged requests, whose manifest records how the file is stored), only the stored
pieces under wanted bytes are fetched, in parallel, decoded, checked and copied the same
way, bytes bound for a target's memory into a staging buffer first (the network, not that
copy, sets the pace); no whole-file buffer is made.
"""

from __future__ import annotations

import bisect
import itertools
import pickle
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .. import _fastpath, arrays, incremental
from ..errors import (
    ChecksumMismatchError,
    CorruptCheckpointError,
    StateMismatchError,
    UnsupportedLeafError,
)
from ..format import encoding, naming, shard
from ..format.manifest import LeafRecord, RankManifest
from ..format.structure import DATA_KINDS
from ..tiers.base import Storage, close_mapping


def read_manifest(storage: Storage, run: str, step: int, rank: int) -> RankManifest:
    where = f"{storage.describe()}: step {step} {naming.manifest_file(rank)}"
    try:
        raw = storage.read_bytes(run, step, naming.manifest_file(rank))
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{where}: the manifest is missing") from None
    manifest = RankManifest.from_json(raw, where)
    if (manifest.run, manifest.step, manifest.rank) != (run, step, rank):
        raise CorruptCheckpointError(
            f"{where}: records run {manifest.run!r} step {manifest.step} rank {manifest.rank}, "
            f"expected run {run!r} step {step} rank {rank}"
        )
    return manifest


def check_target(record: LeafRecord, target: Any, allow_pickle: bool) -> None:
    """Raise if ``record`` cannot be restored into ``target`` (a placeholder or None: a new
    value is built)."""
    if record.kind == "pickle" and not allow_pickle:
        raise UnsupportedLeafError(
            f"key {record.key!r} was saved with pickle; pass allow_pickle=True to restore it "
            "(only for checkpoints you trust)"
        )
    adapter = arrays.for_target(target)
    if adapter is not None:
        if record.kind not in arrays.ARRAY_KINDS:
            raise StateMismatchError(
                f"key {record.key!r}: the target is a {adapter.name} but the checkpoint holds "
                f"a {record.kind} leaf"
            )
        dtype, _, writable = adapter.target_signature(target)
        region, held = adapter.target_region(target), region_of(record)
        sharded = " (global)" if region.shape != region.global_shape or record.global_shape else ""
        saved = f"{record.dtype} {tuple(held.global_shape)}{sharded}"
        wanted = f"{dtype} {tuple(region.global_shape)}{sharded}"
        if saved != wanted:
            raise StateMismatchError(
                f"key {record.key!r}: the checkpoint holds {saved}, the target expects {wanted}"
            )
        if not writable:
            raise StateMismatchError(f"key {record.key!r}: the target array is read-only")
        try:
            adapter.target_regions(target)
        except ValueError as exc:
            raise StateMismatchError(
                f"key {record.key!r}: the target's sharding does not fit its global shape "
                f"{tuple(region.global_shape)}: {exc}"
            ) from None
    elif (
        record.kind in arrays.ARRAY_KINDS
        and arrays.for_kind(record.kind) is arrays.NUMPY
        and shard.numpy_dtype(record.dtype) is None
    ):
        raise UnsupportedLeafError(
            f"key {record.key!r} has dtype {record.dtype}, which numpy can only read with the "
            "ml_dtypes package installed; install it, or restore into a target of that dtype"
        )


def region_of(record: LeafRecord) -> arrays.Region:
    """Where a saved leaf sits in its global array (all of it, unless it is a shard)."""
    if record.global_shape is None:
        return arrays.Region(record.shape, (0,) * len(record.shape), record.shape)
    return arrays.Region(record.global_shape, record.global_offset, record.shape)


def regions_to_assemble(
    manifest: RankManifest, targets: Mapping[str, Any], skip: Collection[str]
) -> dict[str, list[arrays.Region]]:
    """The array leaves whose target is not exactly the saved piece of this file (another
    region of a sharded array, a replica another rank stored, a leaf saved or wanted in
    several parts, or a whole array from a sharded checkpoint), with the regions each
    target wants."""
    wanted = {}
    for record in manifest.leaves:
        if record.kind not in arrays.ARRAY_KINDS or record.key in skip:
            continue
        held = region_of(record)
        adapter = arrays.for_target(targets.get(record.key))
        if adapter is not None:
            regions = adapter.target_regions(targets[record.key])
        else:
            shape = held.global_shape
            regions = [arrays.Region(shape, (0,) * len(shape), shape)]
        if record.stored_by is not None or record.parts or regions != [held]:
            wanted[record.key] = regions
    return wanted


class VerifiedShard:
    """A shard whose wanted bytes are all verified but not yet in the target's memory:
    :meth:`fill` puts them there and gives every leaf's value; :meth:`close` releases the
    data file (after ``fill``, or instead of it when the restore goes elsewhere)."""

    def __init__(self, plan: _Plan, mapping: Any = None, threads: int = 1) -> None:
        self._plan, self._mapping, self._threads = plan, mapping, threads

    def fill(self) -> dict[str, Any]:
        """Copy the verified bytes into the targets' memory; every leaf's value."""
        copies = self._plan.into_targets
        _fastpath.backend().copy_many([d for d, _ in copies], [s for _, s in copies],
                                      self._threads)  # fmt: skip
        copies.clear()
        return self._plan.finish()  # before the mapping closes: targets may take views of it

    def close(self) -> None:
        self._plan = None
        close_mapping(self._mapping)
        self._mapping = None


def verify_shard(
    storage: Storage,
    manifest: RankManifest,
    targets: Mapping[str, Any],
    *,
    skip: Collection[str] = (),
    threads: int,
    progress: Callable[[int], None] | None = None,
) -> VerifiedShard:
    """Check every chunk of the shard's data file under the bytes of the leaves not in
    ``skip`` (copying those without a target into new buffers on the way); nothing in
    ``targets`` changes until :meth:`VerifiedShard.fill`. Call :func:`check_target` for
    every leaf first. Raises CorruptCheckpointError (ChecksumMismatchError for bad bytes)
    if the stored copy is damaged. ``progress`` is told the bytes of each chunk checked
    (not for a ranged read from object storage)."""
    where = f"{storage.describe()}: step {manifest.step} {manifest.data_file}"
    if manifest.stored is not None and storage.ranged_reads:
        return VerifiedShard(_fetch_verified(storage, manifest, targets, set(skip), where),
                             threads=threads)  # fmt: skip
    mapping = open_data(storage, manifest, where, threads)
    try:
        src = np.frombuffer(mapping, np.uint8) if manifest.file_size else np.zeros(0, np.uint8)
        plan = _Plan(manifest, targets, set(skip), src)
        copy_verified(src, manifest, plan.segments, threads=threads, where=where,
                      progress=progress)  # fmt: skip
    except BaseException:
        src = plan = None
        close_mapping(mapping)
        raise
    return VerifiedShard(plan, mapping, threads)


def open_data(storage: Storage, manifest: RankManifest, where: str, threads: int = 1) -> Any:
    """The shard's whole data file from ``storage``, decoded if it is stored encoded: a
    buffer for :func:`close_mapping`. Raises CorruptCheckpointError if it is missing or its
    size or stored bytes are not what the manifest records."""
    if manifest.stored is not None and manifest.stored.encoding == incremental.DELTA:
        return incremental.assemble(storage, manifest, where, threads)
    try:
        mapping = storage.map(manifest.run, manifest.step, manifest.data_file)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{where}: the data file is missing") from None
    try:
        if manifest.stored is not None:
            data = encoding.decode(mapping, manifest.stored, manifest.file_size, where, threads)
            if data is not mapping:
                close_mapping(mapping)
                mapping = data
        if len(mapping) != manifest.file_size:
            raise CorruptCheckpointError(
                f"{where}: {len(mapping)} bytes, the manifest records {manifest.file_size}"
            )
    except BaseException:
        close_mapping(mapping)
        raise
    return mapping


def _fetch_verified(storage, manifest, targets, skip, where) -> _Plan:
    """verify_shard from a storage read by ranged requests: the stored pieces under wanted
    bytes are fetched ``storage.concurrency`` at a time, decoded, and copied into new
    buffers (for a target's memory: staging buffers), every chunk checked; no whole-file
    buffer is made."""
    plan = _Plan(manifest, targets, skip)
    size = manifest.chunk_size
    segments = sorted((seg for seg in plan.segments if seg[1] > seg[0]), key=lambda seg: seg[0])
    starts, ends = [seg[0] for seg in segments], [seg[1] for seg in segments]  # both ascending
    group = max(size, storage.part_size // size * size)
    pieces = []  # (piece, the segments in it)
    for piece in incremental.pieces(manifest, group):
        inside = segments[
            bisect.bisect_right(ends, piece.data_start) : bisect.bisect_left(starts, piece.data_end)
        ]
        if inside:
            pieces.append((piece, inside))

    def fetch(item) -> None:
        piece, inside = item
        start, end = piece.data_start, piece.data_end
        data = incremental.read_piece(storage, manifest, piece)
        if manifest.stored.encoding == "zstd":
            data = encoding.decompress(data, end - start, where, start)
        src = np.frombuffer(data, np.uint8)
        chunks = range(start // size, -(-end // size))
        held = where + piece.held_by(manifest.step)
        copy_verified(src, manifest, inside, threads=1, where=held, base=start, only=chunks)

    try:
        with ThreadPoolExecutor(max(1, min(storage.concurrency, len(pieces)))) as pool:
            list(pool.map(fetch, pieces))
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{where}: the data file is missing") from None
    return plan


class _Plan:
    """Where the wanted bytes of a shard's data file go (``segments``: start, end and a new
    buffer, or None for bytes that are only checked), what is copied into the targets'
    memory once every chunk is good (``into_targets``: destination, source), and how the
    leaves' values are made of them. With ``src``, the mapped data file, the targets'
    bytes come from it and targets that fill from storage take views of it; without,
    from staging buffers that the segments fill."""

    def __init__(self, manifest: RankManifest, targets, skip, src: np.ndarray | None = None):
        self.manifest, self.skip = manifest, skip
        self.values: dict[str, Any] = {}
        self.in_place: set[str] = set()  # keys restored into the target's own array
        self.fixups = []  # (adapter, target, record, buffer): filled once their bytes verify
        self.segments = []
        self.into_targets: list[tuple[np.ndarray, np.ndarray]] = []
        for record in manifest.data_records(parts=False):  # leaves in parts are assembled
            if record.key in skip:
                continue
            start = manifest.data_start + record.offset
            end = start + record.nbytes
            target = targets.get(record.key)
            adapter = arrays.for_target(target)
            if adapter is None:
                dst = self.values[record.key] = np.empty(record.nbytes, np.uint8)
                self.segments.append((start, end, dst))
                continue
            self.in_place.add(record.key)
            self.values[record.key] = target
            own = adapter.target_bytes(target)
            if own is not None:
                staged = np.empty(record.nbytes, np.uint8) if src is None else None
                self.into_targets.append((own, src[start:end] if src is not None else staged))
                self.segments.append((start, end, staged))
            elif adapter.fills_from_storage(target) and src is not None:
                self.fixups.append((adapter, target, record, src[start:end]))
                self.segments.append((start, end, None))
            else:
                dst = np.empty(record.nbytes, np.uint8)
                self.fixups.append((adapter, target, record, dst))
                self.segments.append((start, end, dst))

    def finish(self) -> dict[str, Any]:
        """Every leaf's value, once the segments are copied and verified."""
        for adapter, target, record, buf in self.fixups:
            self.values[record.key] = adapter.fill(target, record.dtype, record.shape, buf)
        self.fixups.clear()
        values = self.values
        for record in self.manifest.leaves:
            if record.key in self.skip:
                continue
            if record.kind not in DATA_KINDS:
                values[record.key] = record.value
            elif record.key not in self.in_place:
                values[record.key] = _finish_value(record, values[record.key])
        return values


def _chunks_under(segments, size: int) -> list[int]:
    """The chunks the non-empty ``(start, end, _)`` byte ranges touch, ascending."""
    touched = (range(lo // size, (hi - 1) // size + 1) for lo, hi, _ in segments if hi > lo)
    return sorted(set(itertools.chain.from_iterable(touched)))


def copy_verified(
    src: np.ndarray,
    manifest: RankManifest,
    segments: list[tuple[int, int, np.ndarray | None]],
    *,
    threads: int,
    where: str,
    verified: Collection[int] = (),
    base: int = 0,
    only: range | None = None,
    progress: Callable[[int], None] | None = None,
) -> set[int]:
    """Copy each ``(start, end, dst)`` byte range of the data file into ``dst`` (None: only
    read it), checking the crc32c of every chunk a range touches in the same pass; chunks in
    ``verified`` were checked before and are only copied. ``src`` holds the data file from
    byte ``base`` on; with ``only``, just those chunks (whole in ``src``) are done. Returns
    the chunks checked, each told to ``progress`` (its bytes) once checked. Raises
    ChecksumMismatchError naming the chunk and its keys."""
    segments = sorted((seg for seg in segments if seg[1] > seg[0]), key=lambda seg: seg[0])
    size, count = manifest.chunk_size, len(manifest.chunk_crc32c)
    needed = _chunks_under(segments, size)
    if only is not None:
        needed = [i for i in needed if i in only]
    if needed and needed[-1] >= count:
        raise CorruptCheckpointError(
            f"{where}: byte {min(manifest.file_size, needed[-1] * size)} is past the "
            f"{count} chunks the manifest records"
        )
    fastpath = _fastpath.backend()
    # Segments may overlap (one shard read into several regions): the first segment that
    # can reach a chunk is found by the running maximum of their ends.
    reach = list(itertools.accumulate((end for _, end, _ in segments), max))

    def check(index: int) -> None:
        lo, hi = index * size, min((index + 1) * size, manifest.file_size)
        only_copy = index in verified
        crc, position = 0, lo
        first = bisect.bisect_right(reach, lo)
        for start, end, dst in itertools.islice(segments, first, None):
            if start >= hi:
                break
            a, b = max(start, lo), min(end, hi)
            if a >= b:
                continue
            if only_copy or b <= position:  # every byte of it checked already
                if dst is not None:
                    fastpath.copy(dst[a - start : b - start], src[a - base : b - base])
                continue
            if a < position:  # its head was checked with an earlier segment
                if dst is not None:
                    head = src[a - base : position - base]
                    fastpath.copy(dst[a - start : position - start], head)
                a = position
            elif a > position:
                crc = fastpath.crc32c(src[position - base : a - base], crc)
            piece = src[a - base : b - base]
            if dst is None:
                crc = fastpath.crc32c(piece, crc)
            else:
                crc = fastpath.copy_crc32c(dst[a - start : b - start], piece, crc)
            position = b
        if only_copy:
            return
        if position < hi:
            crc = fastpath.crc32c(src[position - base : hi - base], crc)
        if crc != manifest.chunk_crc32c[index]:
            raise _mismatch(manifest, where, index, lo, hi, crc)
        if progress is not None:
            progress(hi - lo)

    _in_batches(check, needed, threads)
    return set(needed).difference(verified)


def _mismatch(
    manifest: RankManifest, where: str, index: int, lo: int, hi: int, crc: int
) -> ChecksumMismatchError:
    """The error for chunk ``index`` (bytes ``lo``-``hi``) found with ``crc``: it names the
    keys whose bytes the chunk holds."""
    keys = [
        r.key
        for r in manifest.data_records()
        if manifest.data_start + r.offset < hi and manifest.data_start + r.offset + r.nbytes > lo
    ]
    return ChecksumMismatchError(
        f"{where}: chunk {index} (bytes {lo}-{hi}) has crc32c {crc:#010x}, recorded "
        f"{manifest.chunk_crc32c[index]:#010x}; keys affected: "
        f"{keys[:8]}{' ...' if len(keys) > 8 else ''}"
    )


def _in_batches(work: Callable[[int], None], indices: list[int], threads: int) -> None:
    """``work(i)`` for every index, on up to ``threads`` threads: a few batches per thread
    (chunks may be small, and a task per chunk costs more than checking it)."""

    def run(batch: list[int]) -> None:
        for index in batch:
            work(index)

    if threads <= 1 or len(indices) <= 1:
        run(indices)
        return
    batches = min(len(indices), threads * 4)
    per = -(-len(indices) // batches)
    with ThreadPoolExecutor(max_workers=min(threads, batches)) as pool:
        # Executor.map keeps no future (whose error refers to this frame) alive after it
        # raises: no reference cycle keeps the source mapped until the next collection.
        list(pool.map(run, [indices[i : i + per] for i in range(0, len(indices), per)]))


def _finish_value(record: LeafRecord, buf: np.ndarray) -> Any:
    """The leaf's value from its filled, verified bytes."""
    if record.kind in arrays.ARRAY_KINDS:
        return arrays.for_kind(record.kind).new_value(record.kind, record.dtype, record.shape, buf)
    if record.kind == "bytes":
        return buf.tobytes()
    if record.kind == "bytearray":
        return bytearray(buf.tobytes())
    return pickle.loads(buf.tobytes())
