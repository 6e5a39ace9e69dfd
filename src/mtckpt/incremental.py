"""Incremental steps: what changed since the previous step, and storing only that.

At commit, each block of a rank's data file (BLOCK_BYTES, a divisor of the chunk size the
manifest's crc32c are of) is compared byte for byte with the same block of the previous
step this process committed in node memory (native code, the GIL released, on the memory
worker's thread, not the training thread). The manifest records, per block, the step since
which its bytes are unchanged (:class:`~mtckpt.format.manifest.Changes`). Blocks finer
than the chunks keep a small tensor that changes (an adapter) from making a whole chunk
of frozen bytes around it go up again.
The steps one process compared, each with the one before, form a *lineage* (named by a
random id): a chunk unchanged since step s holds the same bytes in every step of its
lineage from s on. Equality is decided by comparing bytes, never by a hash.

A tier that stores incrementally (the object tier) writes only the blocks changed since
its *base*, the newest step of the same lineage and rank it holds: its data object holds
those blocks, in order, and the manifest it keeps records, for every block, the step whose
data object holds it and where (a ``delta`` :class:`~mtckpt.format.encoding.StoredFile`).
References point straight at the bytes, so a reader never follows a chain; a full step is
written every ``full_every`` steps of the tier (or when no base fits), so they stay near.
Any step is read as a full data file, every chunk checked against that step's manifest.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from . import _fastpath, checksum
from .errors import ChecksumMismatchError, CorruptCheckpointError
from .format import naming
from .format.encoding import StoredFile
from .format.manifest import Changes, RankManifest
from .tiers.base import Storage, close_mapping

log = logging.getLogger(__name__)

DELTA = "delta"
BLOCK_BYTES = 64 << 10  # the unit of comparison and of a delta (at most a chunk)


def block_size(chunk_size: int) -> int:
    """The block size for data files in ``chunk_size`` chunks: BLOCK_BYTES if it divides
    the chunk size, else the chunk size."""
    return BLOCK_BYTES if chunk_size % BLOCK_BYTES == 0 else chunk_size


class ChangeTracker:
    """The changes of each step one rank commits in node memory, against the step it
    committed before (this process's lineage)."""

    def __init__(self, data_of: Callable[[int], Any], chunk_size: int, threads: int) -> None:
        """``data_of(step)``: a buffer of this rank's committed data file of ``step`` in
        node memory, to be closed by the caller (FileNotFoundError if it is gone)."""
        self.data_of, self.block, self.threads = data_of, block_size(chunk_size), threads
        self.lineage = uuid.uuid4().hex[:16]
        self._previous: tuple[int, Changes] | None = None

    def compare(self, step: int, data: Any) -> Changes:
        """``data`` (the data file of ``step``, about to commit) against the previous step.
        A step not after the previous one (a run taken back to an older step) starts a new
        lineage: a lineage's steps only go forward."""
        count = -(-memoryview(data).nbytes // self.block)
        since = [step] * count
        previous, self._previous = self._previous, None
        if previous is not None and previous[0] >= step:
            self.lineage = uuid.uuid4().hex[:16]
        elif previous is not None and previous[1].block_size == self.block:
            same = self._same_blocks(previous[0], data)
            earlier = previous[1].since
            since = [earlier[i] if same[i] and i < len(earlier) else step
                     for i in range(count)]  # fmt: skip
        changes = Changes(self.lineage, self.block, tuple(since))
        self._previous = (step, changes)
        return changes

    def _same_blocks(self, step: int, data: Any) -> bytes:
        """1 for each block of ``data`` equal to the block of ``step``'s data file; all 0
        if that file cannot be read."""
        try:
            before = self.data_of(step)
        except OSError as exc:
            log.info("step %d is not in node memory to compare with (%s): every block of "
                     "the next step counts as changed", step, exc)  # fmt: skip
            return bytes(-(-memoryview(data).nbytes // self.block))
        try:
            return _fastpath.backend().equal_chunks(data, before, self.block, self.threads)
        finally:
            close_mapping(before)

    def forget(self, step: int) -> None:
        """``step`` did not commit: every block of the next step counts as changed."""
        if self._previous is not None and self._previous[0] == step:
            self._previous = None


class Part(NamedTuple):
    """Bytes ``[start, end)`` of the data object of step ``step``."""

    step: int
    start: int
    end: int


class Piece(NamedTuple):
    """Bytes ``[data_start, data_end)`` of a step's data file, stored as ``parts`` (their
    bytes in order: the data itself, or for zstd the frames that decode to it)."""

    data_start: int
    data_end: int
    parts: tuple[Part, ...]

    def held_by(self, step: int) -> str:
        """`` (held by step ...)``: the other steps whose data objects hold some of it;
        "" if none."""
        return held_by_steps(p.step for p in self.parts if p.step != step)


def held_by_steps(steps: Iterable[int]) -> str:
    """`` (held by step 1, 3)`` for a message; "" for no step."""
    found = sorted(set(steps))
    return f" (held by step {', '.join(map(str, found))})" if found else ""


def continues(manifest: RankManifest, base: RankManifest) -> bool:
    """Whether ``manifest``'s step continues the lineage of the earlier step ``base`` in the
    same blocks: only then is a block unchanged since a step at or before ``base`` the
    same in both."""
    changes, earlier = manifest.changes, base.changes
    return (changes is not None and earlier is not None and base.step < manifest.step
            and earlier.lineage == changes.lineage
            and earlier.block_size == changes.block_size)  # fmt: skip


def find_base(dest: Storage, manifest: RankManifest, full_every: int) -> RankManifest | None:
    """The manifest ``dest`` keeps of the step a delta of ``manifest``'s step would be
    made against: the newest earlier step there with a shard of this rank, if it is of the
    same lineage, in the same blocks, stored as it is or as a delta less than
    ``full_every - 1`` deep; None if there is none (the step goes up whole). Not looked
    for where every block changed since the previous step."""
    changes = manifest.changes
    if changes is None or full_every < 2 or all(s == manifest.step for s in changes.since):
        return None
    run, rank = manifest.run, manifest.rank
    for step in reversed([s for s in dest.steps(run) if s < manifest.step]):
        where = f"{dest.describe()}: step {step} {naming.manifest_file(rank)}"
        try:
            base = RankManifest.from_json(dest.read_bytes(run, step, naming.manifest_file(rank)),
                                          where)  # fmt: skip
        except FileNotFoundError:
            continue  # no shard of this rank there: an older step may have one
        except CorruptCheckpointError as exc:
            log.info("%s: not a base for an incremental step (%s)", where, exc)
            return None
        if (
            not continues(manifest, base)
            or base.stored is None
            or base.stored.encoding not in ("identity", DELTA)
            or (base.stored.encoding == DELTA and base.stored.depth + 1 >= full_every)
        ):
            return None
        return base
    return None


def changed_blocks(manifest: RankManifest, base: RankManifest) -> list[int]:
    """The blocks of ``manifest``'s data file that ``base`` (an earlier step of the same
    lineage, in the same blocks) does not hold: changed since it, or not of the same
    length there."""
    size, block = manifest.file_size, manifest.changes.block_size
    return [i for i, since in enumerate(manifest.changes.since)
            if since > base.step or i * block >= base.file_size
            or _length(base, i, block) != min(block, size - i * block)]  # fmt: skip


def runs_of(blocks: list[int], block: int, size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of each run of consecutive ``blocks`` in a file of ``size``."""
    runs: list[list[int]] = []
    for index in blocks:
        start, end = index * block, min(size, (index + 1) * block)
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1][1] += end - start
        else:
            runs.append([start, end - start])
    return [(start, length) for start, length in runs]


def delta_of(manifest: RankManifest, base: RankManifest) -> tuple[list[int], StoredFile]:
    """The blocks of ``manifest``'s data file to store (changed since ``base``), and the
    StoredFile recording where every block is (its crc32c left for the caller to fill
    in)."""
    size, block, step = manifest.file_size, manifest.changes.block_size, manifest.step
    own = changed_blocks(manifest, base)
    mine = set(own)
    steps, offsets = [], []
    stored = 0
    for index in range(len(manifest.changes.since)):
        if index in mine:
            steps.append(step)
            offsets.append(stored)
            stored += min(block, size - index * block)
        else:
            held = _location(base, index, block)
            steps.append(held[0])
            offsets.append(held[1])
    depth = (base.stored.depth if base.stored.encoding == DELTA else 0) + 1
    return own, StoredFile(DELTA, stored, 0, depth=depth, block_size=block, steps=tuple(steps),
                           offsets=tuple(offsets))  # fmt: skip


def _location(base: RankManifest, index: int, block: int) -> tuple[int, int]:
    """Where ``base`` has block ``index`` stored: (step of the data object, offset)."""
    if base.stored.encoding == DELTA:
        return base.stored.steps[index], base.stored.offsets[index]
    return base.step, index * block


def _length(manifest: RankManifest, index: int, block: int) -> int:
    return min(block, manifest.file_size - index * block)


def references(manifest: RankManifest) -> set[int]:
    """The other steps whose data objects hold blocks of ``manifest``'s step."""
    stored = manifest.stored
    if stored is None or stored.encoding != DELTA:
        return set()
    return set(stored.steps) - {manifest.step}


def pieces(manifest: RankManifest, group: int) -> list[Piece]:
    """The data file as pieces of whole chunks that can each be read alone, of about
    ``group`` stored bytes (whole zstd frames; for a delta, the runs of blocks lying
    together in one data object)."""
    stored, step = manifest.stored, manifest.step
    if stored.encoding != DELTA:
        return [Piece(d0, d1, (Part(step, s0, s1),))
                for s0, s1, d0, d1 in stored.pieces(manifest.file_size, group)]  # fmt: skip
    size, block, chunk = manifest.file_size, stored.block_size, manifest.chunk_size
    out: list[Piece] = []
    parts: list[Part] = []
    start = 0
    for index, (held, offset) in enumerate(zip(stored.steps, stored.offsets, strict=True)):
        length = min(block, size - index * block)
        last = parts[-1] if parts else None
        if last is not None and last.step == held and last.end == offset:
            parts[-1] = last._replace(end=offset + length)
        else:
            parts.append(Part(held, offset, offset + length))
        end = index * block + length
        if end == size or (end % chunk == 0 and end - start >= group):
            out.append(Piece(start, end, tuple(parts)))
            parts, start = [], end
    return out


def read_piece(storage: Storage, manifest: RankManifest, piece: Piece) -> bytes:
    """The stored bytes of ``piece``'s parts, in order (ranged reads where the storage
    makes them): the parts in one data object in one read where the bytes between them
    are fewer than theirs (a delta's frozen blocks around the changed ones)."""
    if len(piece.parts) == 1:
        return _read_part(storage, manifest, piece.parts[0])
    spans: dict[int, Part] = {}
    for part in piece.parts:
        span = spans.get(part.step)
        spans[part.step] = part if span is None else span._replace(
            start=min(span.start, part.start), end=max(span.end, part.end))  # fmt: skip
    read: dict[int, tuple[int, bytes]] = {}
    for step, span in spans.items():
        wanted = sum(p.end - p.start for p in piece.parts if p.step == step)
        if span.end - span.start <= 2 * wanted:
            read[step] = (span.start, _read_part(storage, manifest, span))
    out = []
    for part in piece.parts:
        if part.step in read:
            start, data = read[part.step]
            out.append(memoryview(data)[part.start - start : part.end - start])
        else:
            out.append(_read_part(storage, manifest, part))
    return b"".join(out)


def _read_part(storage: Storage, manifest: RankManifest, part: Part) -> bytes:
    name, run = manifest.data_file, manifest.run
    read_range = getattr(storage, "read_range", None)
    if read_range is not None:
        return read_range(run, part.step, name, part.start, part.end)
    mapping = storage.map(run, part.step, name)
    try:
        data = bytes(memoryview(mapping)[part.start : part.end])
    finally:
        close_mapping(mapping)
    if len(data) != part.end - part.start:
        raise CorruptCheckpointError(f"{storage.describe()}: step {part.step} {name} is "
                                     f"shorter than step {manifest.step} records")  # fmt: skip
    return data


def assemble(storage: Storage, manifest: RankManifest, where: str, threads: int = 1) -> bytearray:
    """The whole data file of a step stored as a delta, from its own data object and those
    of the steps it references, every chunk checked against its manifest:
    CorruptCheckpointError (ChecksumMismatchError) naming the chunk and the steps holding
    it, if one is missing or damaged."""
    out = bytearray(manifest.file_size)
    view = memoryview(out)
    todo = pieces(manifest, max(manifest.chunk_size, getattr(storage, "part_size", 32 << 20)))

    def fetch(piece: Piece) -> None:
        try:
            view[piece.data_start : piece.data_end] = read_piece(storage, manifest, piece)
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"{where}: bytes {piece.data_start}-{piece.data_end}"
                f"{piece.held_by(manifest.step)}: a data object is missing"
            ) from None

    try:
        workers = max(1, min(getattr(storage, "concurrency", threads), len(todo)))
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fetch, todo))
        crcs = checksum.crc32c_chunks(view, manifest.chunk_size, threads)
    finally:
        view.release()
    per = manifest.chunk_size // manifest.stored.block_size
    for index, (got, wanted) in enumerate(zip(crcs, manifest.chunk_crc32c, strict=True)):
        if got != wanted:
            blocks = manifest.stored.steps[index * per : (index + 1) * per]
            by = held_by_steps(s for s in blocks if s != manifest.step)
            raise ChecksumMismatchError(f"{where}: chunk {index}{by} has crc32c {got:#010x}, "
                                        f"the manifest records {wanted:#010x}")  # fmt: skip
    return out
