"""A replica (or a recovered or rebuilt shard) being received into the memory tier: straight
into its temporary file (spliced into a reused one, into a mapping of a fresh one), every
chunk checked against the manifest, and whole only once renamed into place with its
manifest written after it."""

from __future__ import annotations

import itertools
import mmap
import os
import threading

from .. import _fastpath, tiercopy
from ..errors import ChecksumMismatchError, CorruptCheckpointError
from ..format import naming
from ..tiers.base import close_mapping_later


def check_next(where: str, offset: int, length: int, received: int, size: int,
               error: type[Exception] = CorruptCheckpointError) -> None:  # fmt: skip
    """Raise ``error`` unless ``length`` bytes at ``offset`` are the next a sink filled in
    order expects (``received`` so far, of ``size``)."""
    if offset != received or length < 0 or offset + length > size:
        raise error(f"{where}: {length} bytes at offset {offset}; expected offset "
                    f"{received} of {size}")  # fmt: skip


READ_BACK = 4 << 20  # bytes spliced into a file are read back this much at a time


class NoBase(ValueError):
    """The replica a changed-blocks push was made against is not here, or not of the same
    lineage: the sender sends the step whole."""


class Incoming:
    """A data file being received, in order, into its temporary file: into a mapping of it
    (:meth:`region`) or written to it (:meth:`file_at`), then each piece is checked while
    still in cache (each manifest chunk's crc32c as soon as the chunk is complete; bytes
    written to an unmapped file are read back); :meth:`commit` renames the file into place
    and writes the manifest (the shard is then whole); :meth:`close` always follows, and
    unmaps. An expired replica's file is reused when one is free (its tmpfs pages exist;
    ``spare``: already mapped with them present). A fresh file's pages are allocated and
    mapped by a :class:`Preparer` a window ahead of the bytes arriving, not all before the
    first (that took longer than the transfer of a GiB here); a full tmpfs fails there,
    not with SIGBUS on a write."""

    def __init__(self, storage, shard, manifest, manifest_json, temp, final, reused, where,
                 spare: mmap.mmap | None = None):  # fmt: skip
        self.storage, self.shard, self.manifest = storage, shard, manifest
        self.manifest_json, self.temp, self.final, self.where = manifest_json, temp, final, where
        self.size = manifest.file_size
        # Bytes are best written to a reused file (file_at), whose pages exist: spliced over
        # TCP here 0.56 s per GiB against 0.66 s into its mapping. Not to a fresh one:
        # that allocates its pages on the receiving thread (1.7-1.9 s per GiB against
        # 0.9-1.0 s into its mapping, prepared ahead).
        self.spliceable = reused
        self.received = 0
        self._crc = 0
        self._fastpath = _fastpath.backend()
        self._done = False
        self._mapping: mmap.mmap | None = None
        self._view = memoryview(bytearray(0))  # the mapping
        self._preparer: Preparer | None = None
        self._ranges: list[Range] = []
        flags = os.O_RDWR | os.O_CLOEXEC | (0 if reused else os.O_CREAT | os.O_EXCL)
        self._fd = os.open(temp, flags, 0o600)  # model weights: the owner's only
        self._scratch: memoryview | None = None  # spliced bytes are read back into it
        try:
            if spare is not None:  # of this size: its pages are allocated and present
                self._mapping, self._view = spare, memoryview(spare)
            else:
                os.ftruncate(self._fd, self.size)
                if not reused:  # its pages allocated and mapped ahead of the bytes
                    self._map()
        except BaseException:
            self.close()
            raise

    def _map(self) -> memoryview:
        """The file's mapping, made when first asked for (a reused file whose bytes are
        all spliced in is never mapped), its pages prepared by a :class:`Preparer`."""
        if self._mapping is None and self.size:
            self._mapping = mmap.mmap(self._fd, self.size, flags=mmap.MAP_SHARED)
            self._view = memoryview(self._mapping)
            self._preparer = Preparer(self._fd, self._view, self.where)
        return self._view

    @property
    def file_size(self) -> int:
        return self.size

    def mapped(self) -> memoryview:
        """The whole file, mapped with its pages present."""
        self._map()
        if self._preparer is not None:
            self._preparer.wait(self.size)
        return self._view

    def ranges(self, count: int) -> list[Range]:
        """The file cut into ``count`` runs of whole chunks (fewer if it has fewer), each
        a sink of its own, filled in parallel (from several peers); its pages prepared by
        a Preparer per run. :meth:`filled` once every run is."""
        if self.received:
            raise CorruptCheckpointError(f"{self.where}: cut into ranges after bytes arrived")
        self._map()
        fresh = self._preparer is not None
        if fresh:
            self._preparer.stop()
            self._preparer = None
        chunks = len(self.manifest.chunk_crc32c)
        bounds = [min(self.size, (chunks * i // count) * self.manifest.chunk_size)
                  for i in range(count + 1)]  # fmt: skip
        runs = [Range(self, lo, hi, fresh) for lo, hi in itertools.pairwise(bounds) if hi > lo]
        self._ranges = runs
        return runs

    def filled(self) -> None:
        """Every range of :meth:`ranges` received whole and checked: the file is."""
        if not self._ranges or any(r.received != r.size for r in self._ranges):
            raise CorruptCheckpointError(f"{self.where}: not every range arrived")
        self.received = self.size

    def whole_chunks(self, offset: int, length: int) -> bool:
        """Whether ``[offset, offset + length)`` is a run of whole manifest chunks (then
        :meth:`accept` checks each against the manifest's crc32c)."""
        size, end = self.manifest.chunk_size, offset + length
        return offset % size == 0 and (end % size == 0 or end == self.size)

    def region(self, offset: int, length: int) -> memoryview:
        """Where the ``length`` bytes at ``offset`` (the next expected) go: receive them
        into it, then :meth:`accept` them."""
        check_next(self.where, offset, length, self.received, self.size)
        self._map()
        if self._preparer is not None:
            self._preparer.wait(offset + length)
        return self._view[offset : offset + length]

    def file_at(self, offset: int, length: int) -> tuple[int, int]:
        """The file and the offset in it where ``region(offset, length)``'s bytes go: a
        receiver may write them there instead (then :meth:`accept`)."""
        check_next(self.where, offset, length, self.received, self.size)
        return self._fd, offset

    def accept(self, offset: int, length: int) -> None:
        """Check the bytes received into ``region(offset, length)`` (or written to the
        file at ``file_at``) and take them."""
        if self._mapping is not None:
            self._check(self.region(offset, length))
            self.received += length
            return
        check_next(self.where, offset, length, self.received, self.size)
        for lo in range(offset, offset + length, READ_BACK):  # spliced: read back, check
            piece = self._read(lo, min(READ_BACK, offset + length - lo))
            self._check(piece)
            self.received += piece.nbytes

    def _read(self, offset: int, length: int) -> memoryview:
        if self._scratch is None:
            self._scratch = memoryview(bytearray(READ_BACK))
        piece = self._scratch[:length]
        got = self._fastpath.pread_into(self._fd, piece, offset)
        if got != length:
            raise CorruptCheckpointError(f"{self.where}: {got} of the {length} bytes at "
                                         f"{offset} could be read back")  # fmt: skip
        return piece

    def put(self, offset: int, data) -> None:
        """Check ``data``, the bytes at ``offset`` (the next expected), and take them."""
        data = memoryview(data).cast("B")
        self.region(offset, data.nbytes)[:] = data
        self.accept(offset, data.nbytes)

    def write_at(self, offset: int, data) -> None:
        """Put ``data`` at ``offset``, in any order (a rebuild's pieces arrive in parallel);
        :meth:`check_written` then checks the whole file before :meth:`commit`."""
        data = memoryview(data).cast("B")
        if offset < 0 or offset + data.nbytes > self.size:
            raise CorruptCheckpointError(f"{self.where}: {data.nbytes} bytes at offset "
                                         f"{offset}, past its {self.size}")  # fmt: skip
        self.mapped()[offset : offset + data.nbytes] = data

    def check_written(self) -> None:
        """Check every chunk written by :meth:`write_at` against the manifest."""
        self.received, self._crc = 0, 0
        self._check(self.mapped()[: self.size])
        self.received = self.size

    def _check(self, data: memoryview) -> None:
        size, expected = self.manifest.chunk_size, self.manifest.chunk_crc32c
        position, end, start = self.received, self.received + data.nbytes, self.received
        while position < end:
            index = position // size
            take = min(end, (index + 1) * size) - position
            piece = data[position - start : position - start + take]
            self._crc = self._fastpath.crc32c(piece, self._crc)
            position += take
            if position % size == 0 or position == self.size:
                if self._crc != expected[index]:
                    raise ChecksumMismatchError(
                        f"{self.where}: chunk {index} arrived with crc32c {self._crc:#010x}, "
                        f"the manifest records {expected[index]:#010x}"
                    )
                self._crc = 0

    def commit(self) -> None:
        if self.received != self.size:
            raise CorruptCheckpointError(
                f"{self.where}: {self.received} of {self.size} bytes arrived"
            )
        # The mapping stays until close(): unmapping a GiB takes tens of milliseconds, and
        # the sender waits for the status that follows this commit.
        manifest_name = naming.manifest_file(self.shard.rank)
        # A replica replaced by another save of its step is not whole until its manifest
        # is back: the manifest goes first.
        self.storage.delete(self.shard.run, self.shard.step, manifest_name)
        os.replace(self.temp, self.final)
        self._done = True
        self.storage.write_bytes(self.shard.run, self.shard.step, manifest_name, self.manifest_json)

    def close(self) -> None:
        """Close the file; one never committed is removed."""
        self._close_file()
        if not self._done:
            _unlink(self.temp)

    def _close_file(self) -> None:
        for preparer in [self._preparer, *(r.preparer for r in self._ranges)]:
            if preparer is not None:
                preparer.stop()
        self._view.release()
        if self._mapping is not None:  # a recovery is not done until its shard is closed
            close_mapping_later(self._mapping)
            self._mapping = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Range:
    """``[lo, hi)`` of an :class:`Incoming` file (whole chunks) as a sink of its own:
    frames at offsets from ``lo``, each one whole chunk, checked against the manifest."""

    def __init__(self, incoming: Incoming, lo: int, hi: int, prepare: bool) -> None:
        """``prepare``: the file is fresh; its pages in the range are allocated ahead."""
        self.incoming, self.lo, self.size = incoming, lo, hi - lo
        self.where = f"{incoming.where} (bytes {lo} to {hi})"
        self.received = 0
        self.preparer = Preparer(incoming._fd, incoming._view, self.where, lo, hi) \
            if prepare else None  # fmt: skip

    def whole_chunks(self, offset: int, length: int) -> bool:
        return True  # accept() checks each against the manifest

    def region(self, offset: int, length: int) -> memoryview:
        check_next(self.where, offset, length, self.received, self.size)
        at = self.lo + offset
        if self.preparer is not None:
            self.preparer.wait(at + length)
        return self.incoming._view[at : at + length]

    def accept(self, offset: int, length: int) -> None:
        manifest, at = self.incoming.manifest, self.lo + offset
        if at % manifest.chunk_size or length != min(manifest.chunk_size, manifest.file_size - at):
            raise CorruptCheckpointError(f"{self.where}: a frame of {length} bytes at {at} "
                                         "is not one whole chunk")  # fmt: skip
        with self.region(offset, length) as data:
            tiercopy.check_chunks(data, manifest, at // manifest.chunk_size, self.where)
        self.received += length


class Preparer:
    """Allocates a fresh file's pages and maps them (``fallocate``, then pre-faulting the
    mapping ``view``) in windows, in a thread of its own, ahead of a writer that
    :meth:`wait`s for each region it fills."""

    WINDOW = 32 << 20
    WAIT = 60.0  # seconds without a window done: the allocation is stuck

    def __init__(self, fd: int, view: memoryview, where: str, start: int = 0,
                 end: int | None = None) -> None:  # fmt: skip
        """Prepares ``[start, end)`` of the file (to its end by default)."""
        self.fd, self.view, self.where = fd, view, where
        self.start, self.end = start, view.nbytes if end is None else end
        self.ready = start
        self.error: OSError | None = None
        self._stopped = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="mtckpt-prepare", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fast = _fastpath.backend()
        try:
            for lo in range(self.start, self.end, self.WINDOW):
                if self._stopped:
                    return
                hi = min(self.end, lo + self.WINDOW)
                fast.fallocate(self.fd, lo, hi - lo)  # a full tmpfs raises here
                with self.view[lo:hi] as window:
                    fast.prefault(window)
                with self._changed:
                    self.ready = hi
                    self._changed.notify_all()
        except OSError as exc:
            with self._changed:
                self.error = exc
                self._changed.notify_all()

    def wait(self, end: int) -> None:
        """Until the first ``end`` bytes are allocated and mapped; the allocation's
        OSError (a full tmpfs), or TimeoutError naming the file if it stalls."""
        with self._changed:
            while self.ready < end and self.error is None:
                before = self.ready
                self._changed.wait(self.WAIT)
                if self.ready == before and self.error is None:
                    raise TimeoutError(f"{self.where}: its memory was not allocated within "
                                       f"{self.WAIT:.0f} s ({before} of {end} bytes)")  # fmt: skip
            if self.ready < end:
                raise OSError(self.error.errno, f"{self.where}: allocating its memory: "
                              f"{self.error.strerror}")  # fmt: skip

    def stop(self) -> None:
        """Stop after the window being prepared (then the mapping can be closed)."""
        self._stopped = True
        self._thread.join()


class PatchedIncoming:
    """A replica made of this node's replica of an earlier step of the same lineage (its
    unchanged blocks, copied in at once) and the changed blocks, which arrive in order as
    one stream (frames at stream offsets from 0): ``runs`` are the ``(offset, length)`` of
    the file they fill. :meth:`commit` checks every chunk of the whole file, then commits
    it as :class:`Incoming` does."""

    def __init__(self, incoming: Incoming, runs: list[tuple[int, int]]) -> None:
        self.incoming, self.runs = incoming, runs
        self.shard, self.where = incoming.shard, f"{incoming.where} (changed blocks)"
        self.size = sum(length for _, length in runs)  # the bytes that arrive
        self.received = 0
        self._run, self._into = 0, 0  # the run being filled, and how far

    @property
    def file_size(self) -> int:
        return self.incoming.size

    def whole_chunks(self, offset: int, length: int) -> bool:
        return False  # each frame's crc32c is checked on arrival, every chunk at commit

    def region(self, offset: int, length: int) -> memoryview:
        check_next(self.where, offset, length, self.received, self.size)
        start, run_length = self.runs[self._run]
        if not 0 < length <= run_length - self._into:
            raise CorruptCheckpointError(f"{self.where}: a frame of {length} bytes across "
                                         f"the end of the run at byte {start}")  # fmt: skip
        at = start + self._into
        return self.incoming.mapped()[at : at + length]

    def accept(self, offset: int, length: int) -> None:
        """Take the bytes received into ``region(offset, length)``."""
        if offset != self.received or length > self.runs[self._run][1] - self._into:
            raise CorruptCheckpointError(f"{self.where}: {length} bytes at offset {offset} "
                                         "were not the region asked for")  # fmt: skip
        self.received += length
        self._into += length
        if self._into == self.runs[self._run][1]:
            self._run, self._into = self._run + 1, 0

    def commit(self) -> None:
        if self.received != self.size:
            raise CorruptCheckpointError(f"{self.where}: {self.received} of {self.size} "
                                         "bytes arrived")  # fmt: skip
        self.incoming.check_written()
        self.incoming.commit()

    def close(self) -> None:
        self.incoming.close()


def _unlink(path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
