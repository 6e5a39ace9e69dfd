"""Zeroed parity files made ahead of need, mapped with their pages present, under
``{memory_root}/.parity-free/``: the next step's stripes of the same size then start
without allocating (about 20 ms per 20 MiB here, while every contributor of a stripe
waits), as replicas reuse spare replica files. They are made in the background once a
stripe completes, as many as the stripes of that step held here, and only where the
memory budget has room; a budget that needs their room drops them first."""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from .. import _fastpath
from ..format import naming

log = logging.getLogger(__name__)

FREE_DIR = ".parity-free"


class ZeroedSpares:
    def __init__(self, root: str | os.PathLike, fits: Callable[[int], bool]) -> None:
        """``fits(size)``: whether ``size`` more bytes keep within the memory budget."""
        self.dir = Path(root) / FREE_DIR
        self.fits = fits
        self._ready: dict[Path, mmap.mmap] = {}
        self._wanted = (0, 0)  # (count, size)
        self._serial = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def want(self, count: int, size: int) -> None:
        """Keep ``count`` spares of ``size`` bytes ready (those of another size go)."""
        with self._lock:
            self._wanted = (count, size)
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="mtckpt-parity-spares",
                                                daemon=True)  # fmt: skip
                self._thread.start()
        self._wake.set()

    def reserve(self, count: int, size: int) -> int:
        """At least ``count`` spares of ``size`` bytes made now, in this thread, within the
        budget (a group member's trainer reserved them for its first steps); how many of
        that size are ready."""
        with self._lock:
            wanted, now = self._wanted
            self._wanted = (max(count, wanted if now == size else 0), size)
        self._top_up()
        with self._lock:
            return sum(len(mapping) == size for mapping in self._ready.values())

    def take(self, size: int, path: Path) -> mmap.mmap | None:
        """A ready spare for ``size`` bytes (of at least that and at most twice; the stripe
        truncates the rest once complete), moved to ``path``, with its mapping; None if
        there is none."""
        with self._lock:
            fitting = [s for s, m in self._ready.items() if size <= len(m) <= 2 * size]
            if not fitting:
                return None
            spare = min(fitting, key=lambda s: len(self._ready[s]))
            mapping = self._ready.pop(spare)
            os.replace(spare, path)
        self._wake.set()
        return mapping

    def drop(self) -> None:
        """Delete every spare (a memory budget needs their room, or the daemon starts)."""
        with self._lock:
            ready, self._ready = self._ready, {}
            self._wanted = (0, 0)
            for mapping in ready.values():
                mapping.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.drop()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._top_up()
            except OSError as exc:  # a full tmpfs: the stripes allocate as they come
                log.warning("no spare parity file made in %s: %s", self.dir, exc)

    def _top_up(self) -> None:
        with self._lock:
            count, size = self._wanted
            for spare in [p for p, m in self._ready.items() if len(m) != size]:
                self._ready.pop(spare).close()
                spare.unlink(missing_ok=True)
            missing = count - len(self._ready)
        for _ in range(missing):
            if self._stopping or not size or not self.fits(size):
                return
            made = self._make(size)
            with self._lock:
                if self._stopping or self._wanted[1] != size:
                    made[1].close()
                    made[0].unlink(missing_ok=True)
                    if not self._ready:  # dropped while it was made: no directory left
                        shutil.rmtree(self.dir, ignore_errors=True)
                    return
                self._ready[made[0]] = made[1]

    def _make(self, size: int) -> tuple[Path, mmap.mmap]:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lock:
            self._serial += 1
            path = self.dir / f"spare-{self._serial}"
        return path, zeroed_file(path, size)


def zeroed_file(path: Path, size: int) -> mmap.mmap:
    """A zeroed file of ``size`` bytes at ``path``, mapped with its pages present, under
    its final name only once it is ready (a temporary name meanwhile); a full tmpfs
    raises OSError here."""
    temp = path.with_name(naming.temp_name(path.name))
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        _fastpath.backend().fallocate(fd, 0, size)
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        _fastpath.backend().prefault(mapping)
        os.replace(temp, path)
        return mapping
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
