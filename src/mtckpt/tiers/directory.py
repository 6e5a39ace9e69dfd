"""Storage in a directory tree: ``{root}/{run}/step-{step:012d}/{file}``.

A file is written to a hidden temporary name in its step directory and renamed onto its
final name once complete; with ``durable=True`` the file and then the directory are
fsynced around the rename, so a crash leaves either the old state or the whole new file.
Every directory and file made here is the owner's only (0700, 0600): checkpoints hold a
model's weights.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import _fastpath
from ..errors import RankInUseError, TierError
from ..format import naming
from .base import FileStat, Storage

_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class DirectoryStorage(Storage):
    """``durable``: fsync around every rename (a disk). ``populate``: ``map`` reads a whole
    file in up front, which is fastest from a disk; on tmpfs the copying threads faulting
    pages in lazily is faster."""

    def __init__(
        self, root: str | os.PathLike, name: str, *, durable: bool, populate: bool
    ) -> None:
        self.root = Path(root)
        self.name = name
        self.durable = durable
        self.populate = populate
        self._locks: list[int] = []  # descriptors of the lock files held (lock_rank)

    def describe(self) -> str:
        return f"{self.name} tier ({self.root})"

    def run_dir(self, run: str) -> Path:
        return self.root / naming.check_run(run)

    def step_path(self, run: str, step: int) -> Path:
        return self.run_dir(run) / naming.step_dir(step)

    def path(self, run: str, step: int, name: str) -> Path:
        return self.step_path(run, step) / naming.check_file_name(name)

    def runs(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return [name for name in naming.runs_of(names) if (self.root / name).is_dir()]

    def modified(self, run: str, step: int, name: str) -> float | None:
        try:
            return self.path(run, step, name).stat().st_mtime
        except FileNotFoundError:
            return None

    def steps(self, run: str) -> list[int]:
        try:
            names = os.listdir(self.run_dir(run))
        except FileNotFoundError:
            return []
        return naming.steps_of(names)

    def files(self, run: str, step: int) -> list[str]:
        try:
            return sorted(os.listdir(self.step_path(run, step)))
        except FileNotFoundError:
            return []

    def stat_files(self, run: str, step: int) -> dict[str, FileStat]:
        stats = {}
        try:
            with os.scandir(self.step_path(run, step)) as entries:
                for entry in entries:
                    try:
                        st = entry.stat()
                    except FileNotFoundError:  # removed since the listing
                        continue
                    stats[entry.name] = FileStat(st.st_size, st.st_mtime)
        except FileNotFoundError:
            return {}
        return dict(sorted(stats.items()))

    def exists(self, run: str, step: int, name: str) -> bool:
        return self.path(run, step, name).exists()

    def read_bytes(self, run: str, step: int, name: str) -> bytes:
        return self.path(run, step, name).read_bytes()

    def map(self, run: str, step: int, name: str) -> Any:
        with open(self.path(run, step, name), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return memoryview(b"")
            flags = mmap.MAP_SHARED | (_MAP_POPULATE if self.populate else 0)
            return mmap.mmap(f.fileno(), size, flags=flags, prot=mmap.PROT_READ)

    def write_bytes(self, run: str, step: int, name: str, data: bytes) -> None:
        self.write_stream(run, step, name, len(data), [data])

    def write_stream(self, run: str, step: int, name: str, size: int, chunks: Iterable) -> None:
        final = self.path(run, step, name)
        self.make_step_dir(run, step)
        temp = final.with_name(naming.temp_name(name))
        fastpath = _fastpath.backend()
        try:
            fd = self._create_temp(run, step, temp)
            try:
                if self.durable and size:
                    fastpath.fallocate(fd, 0, size)  # full disk fails here, before any write
                offset = 0
                for chunk in chunks:
                    fastpath.pwrite_all(fd, chunk, offset)
                    offset += memoryview(chunk).nbytes
                if offset != size:
                    raise ValueError(f"{final}: expected {size} bytes, got {offset}")
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
        except BaseException as exc:
            _unlink_quietly(temp)
            if isinstance(exc, OSError):
                raise self.error(f"cannot write {final}", exc) from exc
            raise
        if self.durable:
            self.sync_dir(final.parent)

    def _create_temp(self, run: str, step: int, temp: Path) -> int:
        """Open a new temporary file in the step's directory, making the directory again if
        another rank of the node removed it while it was empty (garbage collection of an
        uncommitted step at its start-up)."""
        for attempt in range(3):
            try:
                return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                self.make_step_dir(run, step)
        raise AssertionError("unreachable")

    def delete(self, run: str, step: int, name: str) -> None:
        _unlink_quietly(self.step_path(run, step) / name)

    def remove_step_dir(self, run: str, step: int) -> bool:
        try:
            os.rmdir(self.step_path(run, step))
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise
        return True

    def make_step_dir(self, run: str, step: int) -> Path:
        path = self.step_path(run, step)
        try:
            make_private_dirs(path)
        except OSError as exc:
            raise self.error(f"cannot create {path}", exc) from exc
        return path

    def lock_rank(self, run: str, rank: int) -> None:
        """Hold ``run``'s ``rank`` on this storage until :meth:`close`, so that no second
        manager of the same run and rank works here meanwhile (its start-up would remove
        this one's files in progress): RankInUseError naming the holder if one does."""
        path = self.run_dir(run) / naming.lock_file(rank)
        try:
            make_private_dirs(path.parent)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise self.error(f"cannot open {path}", exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            own = " (this process)" if holder == str(os.getpid()) else ""
            raise RankInUseError(
                f"run {run!r} rank {rank} is in use on the {self.describe()}: {path} is locked "
                f"by {f'pid {holder}{own}' if holder else 'another process'}, a manager of the "
                "same run and rank not closed yet; close it first, or use another run name"
            ) from None
        except OSError as exc:  # a filesystem without locks
            os.close(fd)
            raise self.error(f"cannot lock {path}", exc) from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise self.error(f"cannot write {path}", exc) from exc
        self._locks.append(fd)
        _LOCK_FDS.add(fd)

    def close(self) -> None:
        """Release the ranks this storage holds (:meth:`lock_rank`)."""
        for fd in self._locks:
            _LOCK_FDS.discard(fd)
            os.close(fd)
        self._locks.clear()

    def sync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def error(self, what: str, exc: OSError) -> TierError:
        """A TierError naming this tier, the operation and the OS reason."""
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENOSPC:
            reason = "no space left on device"
        return TierError(exc.errno or 0, f"{self.describe()}: {what}: {reason}")


def make_private_dirs(path: Path) -> None:
    """Make ``path`` and its missing parents, each the owner's only (0700); directories
    that exist are left as they are."""
    missing = []
    while not path.is_dir() and path != path.parent:
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass  # made meanwhile by another rank of the node


# Lock files held open: a child forked by the trainer (a data loader worker) closes its
# copies, or it would hold the lock after the trainer is gone.
_LOCK_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _LOCK_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
