"""The memory tier: a tmpfs directory whose data files are reused as pre-faulted slots.

A fresh tmpfs file costs a page fault per page as it is first written (several times
slower than copying into resident pages). So a rank's data file is staged into a *slot*:
a file in ``{run}/.slots/rank-NNNNN/`` that is already allocated and mapped. Publishing a
step renames the slot into the step directory; when the step expires, its data file is
renamed back into the slot directory, still mapped, for a later step to reuse.

A reader that must see a step's bytes unchanged for a while (the node daemon sending it to
a peer) opens its data file with :func:`open_held`. While it is held, the expiring step's
file is moved to ``.held`` instead of reused: the reader keeps its bytes, the next save
takes a new slot, and the memory budget counts the file until :func:`release_held` finds
the reader gone and removes it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .. import _fastpath
from ..errors import MemoryBudgetError
from ..format import naming
from . import budget
from .budget import human_size
from .directory import DirectoryStorage, make_private_dirs

Pinner = Callable[[np.ndarray], Callable[[], None]]

log = logging.getLogger(__name__)


def open_held(path: Path) -> BinaryIO:
    """Open a published data file for reading and hold it until the file is closed: an
    expiring step then does not hand this file back as a slot, so its bytes cannot change
    under the reader. FileNotFoundError if the step has expired already."""
    f = open(path, "rb")  # noqa: SIM115 (the caller closes it)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        if os.stat(path).st_ino != os.fstat(f.fileno()).st_ino:  # recycled meanwhile
            raise FileNotFoundError(errno.ENOENT, "the step expired as it was opened", str(path))
    except BaseException:
        f.close()
        raise
    return f


def release_held(root: Path) -> None:
    """Remove the files in ``root/.held`` that no reader holds any more."""
    for entry in budget.entries(root / budget.HELD_DIR):
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            if not _held(fd):
                os.unlink(entry.path)
        except FileNotFoundError:  # another process of the node removed it first
            pass
        finally:
            os.close(fd)


def _held(fd: int) -> bool:
    """Whether a reader holds the file (:func:`open_held`); if not, this process holds it
    exclusively until ``fd`` is closed, so no reader can start meanwhile."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    return False


class Slot:
    """A file in the memory tier, mapped read-write, of exactly ``size`` bytes."""

    def __init__(self, path: Path, size: int, mm: mmap.mmap | None = None) -> None:
        self.path = path
        self.size = size
        self.mm = mm
        self._pinners: dict[str, Pinner] = {}  # per framework: what page-locks the mapping
        self._unpin: list[Callable[[], None]] = []

    def view(self) -> np.ndarray:
        """The slot's bytes as a writable uint8 array (a view of the mapping)."""
        if self.size == 0:
            return np.zeros(0, np.uint8)
        return np.frombuffer(self.mm, np.uint8)

    def pin(self, name: str, pinner: Pinner) -> None:
        """Page-lock the mapping for a framework's device copies, once while it stays
        mapped: ``pinner(view)`` registers it and returns what unregisters it."""
        if name not in self._pinners and self.mm is not None:
            self._pinners[name] = pinner
            self._unpin.append(pinner(self.view()))

    def pin_like(self, other: Slot) -> None:
        """Page-lock this slot for the frameworks ``other`` is page-locked for."""
        for name, pinner in other._pinners.items():
            self.pin(name, pinner)

    def unmap(self) -> None:
        for undo in self._unpin:
            undo()
        self._unpin.clear()
        self._pinners.clear()
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # a view of it is still alive; it unmaps when that goes
                pass
            self.mm = None


RENAME_ATTEMPTS = 5


class MemoryStorage(DirectoryStorage):
    def __init__(self, root: str | os.PathLike, max_bytes: int | None = None) -> None:
        super().__init__(root, "memory", durable=False, populate=False)
        self.max_bytes = max_bytes  # the node's memory budget (tiers/budget.py)
        self._lock = threading.Lock()
        self._free: dict[tuple[str, int], list[Slot]] = {}
        self._reserved: dict[tuple[str, int], int] = {}  # reserved slots not taken yet
        self._bound: dict[tuple[str, int, int], Slot] = {}

    def slot_dir(self, run: str, rank: int) -> Path:
        return self.run_dir(run) / ".slots" / f"rank-{rank:05d}"

    def _free_list(self, run: str, rank: int) -> list[Slot]:
        key = (run, rank)
        if key not in self._free:  # first use: adopt slots a previous process left behind
            directory = self.slot_dir(run, rank)
            make_private_dirs(directory)
            self._free[key] = [
                Slot(path, path.stat().st_size)
                for path in sorted(directory.iterdir())
                if path.name.startswith("slot-")
            ]
        return self._free[key]

    def free_slots(self, run: str, rank: int) -> int:
        with self._lock:
            return len(self._free_list(run, rank))

    def acquire(self, run: str, rank: int, size: int) -> Slot:
        """A mapped, pre-faulted slot of exactly ``size`` bytes, reused when one is free."""
        with self._lock:
            free = self._free_list(run, rank)
            slot = None
            if self._reserved.get((run, rank)):
                self._reserved[run, rank] -= 1
            if free:
                # Prefer a slot already mapped (no page faults), then one of the right size.
                free.sort(key=lambda s: (s.mm is not None, s.size == size, s.size >= size))
                slot = free.pop()
        try:
            self._admit(run, rank, size, slot)
        except MemoryBudgetError:
            if slot is not None:
                self.release(slot, run, rank)
            raise
        try:
            if slot is None:
                return self._create(run, rank, size)
            self._fit(slot, size)
            return slot
        except OSError as exc:
            if slot is not None:
                self.drop(slot)
            raise self.error(f"cannot prepare a {size}-byte slot for rank {rank}", exc) from exc

    def _admit(self, run: str, rank: int, size: int, reuse: Slot | None) -> None:
        """MemoryBudgetError unless a ``size``-byte slot (``reuse`` resized) fits the budget,
        after dropping this rank's other spare slots if need be."""
        growth = size - (reuse.size if reuse is not None else 0)
        if self.max_bytes is None or growth <= 0 or self._fits(growth):
            return
        with self._lock:
            self._reserved.pop((run, rank), None)  # reserved ones too
        self.trim(run, rank, 0)  # spare slots give way first
        if self._fits(growth):
            log.warning("%s: spare slots of rank %d dropped to stay within the budget of %s",
                        self.describe(), rank, human_size(self.max_bytes))  # fmt: skip
            return
        held = budget.usage(self.root)
        raise MemoryBudgetError(
            f"{self.describe()}: a {human_size(size)} slot for run {run!r} rank {rank} would "
            f"take it to {human_size(budget.total(held) + growth)}, past its budget of "
            f"{human_size(self.max_bytes)} (held: {budget.describe(held)})"
        )

    def _fits(self, growth: int) -> bool:
        release_held(self.root)
        return budget.total(budget.usage(self.root)) + growth <= self.max_bytes

    def reserve(self, run: str, rank: int, size: int, count: int) -> int:
        """Free slots of ``size`` bytes, mapped with their pages present, until ``count``
        are free (those free already resized to it), as far as the budget allows: the
        slots made."""
        with self._lock:
            self._reserved[run, rank] = count  # kept by trim() until the saves take them
            free = self._free_list(run, rank)
            unfit = [s for s in free if s.size != size or s.mm is None]
            free[:] = [s for s in free if s not in unfit]
        for slot in unfit:
            if self.max_bytes is not None and not self._fits(max(0, size - slot.size)):
                self.drop(slot)
                continue
            self._fit(slot, size)
            with self._lock:
                self._free_list(run, rank).append(slot)
        made = 0
        while self.free_slots(run, rank) < count:
            if self.max_bytes is not None and not self._fits(size):
                break
            slot = self._create(run, rank, size)
            with self._lock:
                self._free_list(run, rank).append(slot)
            made += 1
        return made

    def prepare_spare(self, run: str, rank: int, like: Slot) -> None:
        """Create a free slot like ``like`` (its size, page-locked for the same frameworks)
        if none is free and the budget allows, so the next save reuses it."""
        if self.max_bytes is not None and not self._fits(like.size):
            return
        if self.free_slots(run, rank) == 0:
            slot = self._create(run, rank, like.size)
            slot.pin_like(like)
            with self._lock:
                self._free_list(run, rank).append(slot)

    def _create(self, run: str, rank: int, size: int) -> Slot:
        directory = self.slot_dir(run, rank)
        make_private_dirs(directory)
        slot = Slot(directory / f"slot-{uuid.uuid4().hex[:12]}", 0)
        os.close(os.open(slot.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        try:
            self._fit(slot, size)
        except BaseException:
            self.drop(slot)
            raise
        return slot

    def _fit(self, slot: Slot, size: int) -> None:
        """Resize ``slot`` to ``size`` bytes, allocating and faulting in any new pages."""
        if slot.size == size and (slot.mm is not None or size == 0):
            return
        slot.unmap()
        fd = os.open(slot.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o600)  # a slot left by an older version may be world-readable
            old = os.fstat(fd).st_size
            os.ftruncate(fd, size)
            if size > old:
                _fastpath.backend().fallocate(fd, old, size - old)  # tmpfs full fails here
            slot.size = size
            if size:
                # MADV_POPULATE_WRITE maps every page writable at once; MAP_POPULATE only
                # read-faults a shared mapping and measured twice as slow.
                slot.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
                _fastpath.backend().prefault(slot.mm)
        finally:
            os.close(fd)

    def publish(self, slot: Slot, run: str, step: int, rank: int) -> None:
        """Rename a staged slot into its step directory as the rank's data file."""
        for attempt in range(RENAME_ATTEMPTS):
            final = self.make_step_dir(run, step) / naming.data_file(rank)
            try:
                os.replace(slot.path, final)
                break
            except FileNotFoundError:
                # Another rank of the node, starting up, may remove the step directory while
                # it is still empty (an uncommitted step); make it again.
                if attempt + 1 == RENAME_ATTEMPTS or not slot.path.exists():
                    raise
        slot.path = final
        with self._lock:
            self._bound[(run, step, rank)] = slot

    def release(self, slot: Slot, run: str, rank: int) -> None:
        """Give back a slot that was acquired but not published."""
        with self._lock:
            self._free_list(run, rank).append(slot)

    def recycle(self, run: str, step: int, rank: int) -> None:
        """Turn a rank's data file of an expiring step back into a free slot; one a reader
        holds (:func:`open_held`) is unlinked instead."""
        data = self.step_path(run, step) / naming.data_file(rank)
        with self._lock:
            slot = self._bound.pop((run, step, rank), None)
            free = self._free_list(run, rank)
            target = self.slot_dir(run, rank) / f"slot-{uuid.uuid4().hex[:12]}"
            what = f"step {step} rank {rank} of run {run!r}"
            if not self._give_back(data, target, self.root / budget.HELD_DIR, what):
                if slot is not None:
                    slot.unmap()
                return
            if slot is None:
                slot = Slot(target, target.stat().st_size)
            slot.path = target
            free.append(slot)
        release_held(self.root)

    @staticmethod
    def _give_back(data: Path, target: Path, held: Path, what: str) -> bool:
        """Rename ``data`` to the free slot ``target``; False where it is gone already or
        a reader holds it (it is moved into ``held`` then: the reader keeps its bytes, and
        the budget counts them until :func:`release_held`)."""
        try:
            fd = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            if _held(fd):
                make_private_dirs(held)
                os.replace(data, held / f"{uuid.uuid4().hex[:12]}-{data.name}")
                log.info("%s expires while it is being sent: its data file is left to the "
                         "sender", what)  # fmt: skip
                return False
            os.replace(data, target)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)

    def trim(self, run: str, rank: int, max_free: int) -> None:
        """Delete free slots beyond ``max_free`` (or those reserved and not taken yet), the
        unmapped and smallest first."""
        with self._lock:
            max_free = max(max_free, self._reserved.get((run, rank), 0))
            free = self._free_list(run, rank)
            free.sort(key=lambda s: (s.mm is not None, s.size), reverse=True)
            extra = free[max_free:]
            del free[max_free:]
        for slot in extra:
            self.drop(slot)

    def drop(self, slot: Slot) -> None:
        """Unmap and delete a slot that is in no list."""
        slot.unmap()
        try:
            os.unlink(slot.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        super().close()
        with self._lock:
            for slots in self._free.values():
                for slot in slots:
                    slot.unmap()
            for slot in self._bound.values():
                slot.unmap()
            self._free.clear()
            self._bound.clear()
