"""How a data file is stored on the object tier: as it is, as zstd frames, or as a delta.

A tier that records its stored bytes (the object tier) adds a ``stored`` entry to the
manifest it writes: the encoding, the stored size and the crc32c of the stored bytes. A
zstd file is a run of independent frames (each frame holds ``frame_size`` bytes of the data
file, a whole number of chunks, and carries zstd's own content checksum), so that any byte
range can be read by fetching and decompressing only the frames under it, in parallel.
Concatenated frames are one valid zstd stream: ``zstd -d`` reads the stored object as is.
A ``delta`` holds only the chunks that changed since an earlier step of the tier and
records, for every chunk, the step whose data object holds it and at which offset
(:mod:`mtckpt.incremental`).
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .. import checksum
from ..errors import ChecksumMismatchError, ConfigError, CorruptCheckpointError, FormatVersionError

ENCODINGS = ("identity", "zstd", "delta")
FRAME_BYTES = 8 * 1024 * 1024  # data-file bytes per zstd frame, rounded down to whole chunks
DEFAULT_LEVEL = 3


@dataclass(frozen=True)
class StoredFile:
    """The stored form of a data file. ``frames`` are the stored sizes of the zstd frames,
    each decoding to ``frame_size`` bytes of the data file (the last one to the rest). A
    delta's ``steps`` and ``offsets`` say, for each block of ``block_size`` bytes, whose
    data object holds it and where (this step's own object holds ``size`` bytes: its
    blocks, in order); ``depth`` counts the deltas since the last whole step."""

    encoding: str
    size: int
    crc32c: int
    level: int | None = None
    frame_size: int | None = None
    frames: tuple[int, ...] = ()
    depth: int = 0
    block_size: int = 0
    steps: tuple[int, ...] = ()
    offsets: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"encoding": self.encoding, "size": self.size, "crc32c": self.crc32c}
        if self.encoding == "zstd":
            out.update(level=self.level, frame_size=self.frame_size, frames=list(self.frames))
        if self.encoding == "delta":
            out.update(depth=self.depth, block_size=self.block_size, blocks=self._runs())
        return out

    def _runs(self) -> list[list[int]]:
        """``[count, step, offset]`` for each run of blocks lying one after the other in
        one data object (the last block of a file may be short: it ends its run)."""
        runs: list[list[int]] = []
        for held, offset in zip(self.steps, self.offsets, strict=True):
            last = runs[-1] if runs else None
            if last and last[1] == held and last[2] + last[0] * self.block_size == offset:
                last[0] += 1
            else:
                runs.append([1, held, offset])
        return runs

    @classmethod
    def from_json(cls, body: Any, file_size: int, chunk_size: int, where: str,
                  step: int = 0) -> StoredFile:  # fmt: skip
        encoding = body["encoding"]
        if encoding not in ENCODINGS:
            raise FormatVersionError(
                f"{where}: the data file is stored with encoding {encoding!r}, unknown to "
                f"this mtckpt (it reads {', '.join(ENCODINGS)})"
            )
        size, crc = _count(body["size"], "stored.size"), _count(body["crc32c"], "stored.crc32c")
        if encoding == "identity":
            if size != file_size:
                raise CorruptCheckpointError(
                    f"{where}: {size} bytes stored as they are, the data file has {file_size}"
                )
            return cls(encoding, size, crc)
        if encoding == "delta":
            return _delta(body, size, crc, file_size, chunk_size, where, step)
        frame_size = _count(body["frame_size"], "stored.frame_size")
        frames = tuple(_count(f, "stored.frames") for f in body["frames"])
        if (
            frame_size < chunk_size
            or frame_size % chunk_size
            or len(frames) != -(-file_size // frame_size)
            or sum(frames) != size
        ):
            raise CorruptCheckpointError(
                f"{where}: {len(frames)} zstd frames of {frame_size} bytes stored in {size} "
                f"bytes do not fit a data file of {file_size} bytes in {chunk_size}-byte chunks"
            )
        level = body["level"]
        if isinstance(level, bool) or not isinstance(level, int):
            raise ValueError(f"stored.level must be an int, got {level!r}")
        return cls(encoding, size, crc, level, frame_size, frames)

    def pieces(self, file_size: int, group: int) -> list[tuple[int, int, int, int]]:
        """``(stored_start, stored_end, data_start, data_end)`` of pieces that can be read
        alone, of about ``group`` stored bytes (whole frames for zstd)."""
        if self.encoding == "identity":
            return [(s, min(s + group, file_size)) * 2 for s in range(0, file_size, group)]
        out, stored, data = [], 0, 0
        first_stored, first_data = 0, 0
        for frame in self.frames:
            stored += frame
            data = min(file_size, data + self.frame_size)
            if stored - first_stored >= group or data == file_size:
                out.append((first_stored, stored, first_data, data))
                first_stored, first_data = stored, data
        return out


def _delta(body: Any, size: int, crc: int, file_size: int, chunk_size: int, where: str,
           step: int) -> StoredFile:  # fmt: skip
    """A delta's record, checked: blocks that divide the chunks, a place for every block,
    none in a later step, and this step's own blocks one after the other filling its
    ``size`` bytes."""
    block = _count(body["block_size"], "stored.block_size")
    depth = _count(body["depth"], "stored.depth")
    if not block or chunk_size % block:
        raise CorruptCheckpointError(f"{where}: a delta in blocks of {block} bytes; the "
                                     f"chunks are {chunk_size} bytes")  # fmt: skip
    steps: list[int] = []
    offsets: list[int] = []
    for run in body["blocks"]:
        if not isinstance(run, list) or len(run) != 3:
            raise ValueError(f"stored.blocks must hold [count, step, offset] runs, got {run!r}")
        count, held, offset = (_count(v, "stored.blocks") for v in run)
        steps += [held] * count
        offsets += [offset + i * block for i in range(count)]
    expected = -(-file_size // block)
    if len(steps) != expected:
        raise CorruptCheckpointError(f"{where}: a delta places {len(steps)} blocks; the data "
                                     f"file has {expected}")  # fmt: skip
    if any(s > step for s in steps):
        raise CorruptCheckpointError(f"{where}: a delta of step {step} refers to a later step "
                                     f"({max(steps)})")  # fmt: skip
    own = 0
    for index, (held, offset) in enumerate(zip(steps, offsets, strict=True)):
        if held == step:
            if offset != own:
                raise CorruptCheckpointError(f"{where}: block {index} of the delta is at "
                                             f"offset {offset}, expected {own}")  # fmt: skip
            own += min(block, file_size - index * block)
    if own != size:
        raise CorruptCheckpointError(f"{where}: a delta of {size} bytes holds {own} bytes of "
                                     "blocks")  # fmt: skip
    return StoredFile("delta", size, crc, depth=depth, block_size=block, steps=tuple(steps),
                      offsets=tuple(offsets))  # fmt: skip


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an int >= 0, got {value!r}")
    return value


def check_compression(compression: Any, level: Any, what: str) -> None:
    """Raise ConfigError unless ``compression`` is None or "zstd" with a zstd level."""
    if compression not in (None, "zstd"):
        raise ConfigError(f"{what}.compression must be None or 'zstd', got {compression!r}")
    if isinstance(level, bool) or not isinstance(level, int) or not -7 <= level <= 22:
        raise ConfigError(f"{what}.compression_level must be an int in -7..22, got {level!r}")
    if compression == "zstd":
        _zstd(what)


def _zstd(what: str):
    try:
        import zstandard
    except ImportError:
        raise ConfigError(f"{what}: compression 'zstd' needs pip install 'mtckpt[zstd]'") from None
    return zstandard


def encode(
    data: memoryview, chunk_size: int, compression: str | None, level: int, threads: int,
    pool: Executor,
) -> tuple[Iterator[Any], Future]:  # fmt: skip
    """``data`` (a whole data file) as the buffers to store, in order, and its StoredFile, a
    future done once they are all given out. Without compression: ``data`` itself, its
    crc32c computed on ``pool`` meanwhile. With zstd: frames compressed on ``threads``
    threads a few ahead of the one given out, so the upload overlaps the compression."""
    if compression is None:
        return iter([data]), pool.submit(
            lambda: StoredFile("identity", data.nbytes, checksum.crc32c(data))
        )
    zstandard = _zstd("remote")
    frame_size = max(chunk_size, FRAME_BYTES // chunk_size * chunk_size)
    local = threading.local()
    done: Future = Future()

    def compress(start: int) -> bytes:
        if not hasattr(local, "compressor"):
            local.compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
        return local.compressor.compress(data[start : start + frame_size])

    def frames() -> Iterator[bytes]:
        starts = iter(range(0, data.nbytes, frame_size))
        crc, lengths = 0, []
        with ThreadPoolExecutor(max(1, threads)) as workers:
            first = itertools.islice(starts, 2 * max(1, threads))
            ahead = collections.deque(workers.submit(compress, s) for s in first)
            while ahead:
                frame = ahead.popleft().result()
                following = next(starts, None)
                if following is not None:
                    ahead.append(workers.submit(compress, following))
                crc = checksum.crc32c(frame, crc)
                lengths.append(len(frame))
                yield frame
        done.set_result(StoredFile("zstd", sum(lengths), crc, level, frame_size, tuple(lengths)))

    return frames(), done


def check_stored(data: Any, stored: StoredFile, where: str) -> None:
    """Raise if ``data`` (a whole stored file) is not what ``stored`` records."""
    size = memoryview(data).nbytes
    if size != stored.size:
        raise CorruptCheckpointError(
            f"{where}: {size} bytes stored, the manifest records {stored.size}"
        )
    crc = checksum.crc32c(data)
    if crc != stored.crc32c:
        raise ChecksumMismatchError(
            f"{where}: the stored bytes have crc32c {crc:#010x}, the manifest records "
            f"{stored.crc32c:#010x}"
        )


def decode(data: Any, stored: StoredFile, file_size: int, where: str, threads: int) -> Any:
    """The data file from the whole stored file ``data``, checked against ``stored``."""
    check_stored(data, stored, where)
    if stored.encoding == "identity":
        return data
    out = bytearray(file_size)
    view, source = memoryview(out), memoryview(data).cast("B")

    def expand(frame: tuple[int, int, int, int]) -> None:
        stored_start, stored_end, start, end = frame
        view[start:end] = decompress(source[stored_start:stored_end], end - start, where, start)

    frames = stored.pieces(file_size, 1)  # one piece per frame
    try:
        with ThreadPoolExecutor(max(1, threads)) as pool:
            list(pool.map(expand, frames))
    finally:
        view.release()
        source.release()
    return out


def decompress(frames: Any, size: int, where: str, at: int) -> bytes:
    """``size`` bytes of the data file from byte ``at`` on, out of the zstd frames holding
    them; CorruptCheckpointError naming the place if they do not decode to that."""
    zstandard = _zstd("remote")
    try:
        out = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(frames)
    except zstandard.ZstdError as exc:
        raise CorruptCheckpointError(
            f"{where}: the zstd frames for bytes {at}-{at + size} do not decode ({exc})"
        ) from None
    if len(out) != size:
        raise CorruptCheckpointError(
            f"{where}: the zstd frames for bytes {at}-{at + size} decode to {len(out)} bytes"
        )
    return out
