"""The narrow interface every tier's storage implements."""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, NamedTuple


class FileStat(NamedTuple):
    size: int
    modified: float | None  # seconds since the epoch; None if the storage does not say


class Storage(ABC):
    """Files of checkpoints, addressed by (run, step, file name).

    Writes are atomic: a file appears under its name only once it is complete. Storage knows
    nothing of manifests, commits or policies; :mod:`mtckpt.format.commit` and the pipeline do.
    """

    #: Short tier name used in messages and in ``CheckpointManager.steps()``.
    name: str
    #: Whether every rank of the job writes here (a step commits once all ranks' shards are
    #: present), rather than only the ranks of one node.
    shared: bool = False
    #: Whether ``write_stream`` wants a data file as one buffer rather than as pieces; such
    #: a storage records how it stores each data file in the manifest it keeps
    #: (:mod:`mtckpt.format.encoding`), compressed when ``compression`` is set.
    whole_files: bool = False
    compression: str | None = None
    compression_level: int = 3
    #: A storage that takes whole files may store a data file as the chunks changed since
    #: an earlier step (:mod:`mtckpt.incremental`), whole at least every this many steps;
    #: 0: always whole.
    full_every: int = 0
    #: Whether a restore should fetch the byte ranges it needs (``read_range``) rather than
    #: ``map`` the whole file: a storage read by requests over the network.
    ranged_reads: bool = False

    @abstractmethod
    def describe(self) -> str:
        """Where this storage is, for messages: ``"memory tier (/dev/shm/mtckpt)"``."""

    @abstractmethod
    def runs(self) -> list[str]:
        """Runs with a directory here, sorted."""

    @abstractmethod
    def modified(self, run: str, step: int, name: str) -> float | None:
        """When a file was last written (seconds since the epoch); None if unknown."""

    @abstractmethod
    def steps(self, run: str) -> list[int]:
        """Steps with a directory (complete or not), ascending."""

    @abstractmethod
    def files(self, run: str, step: int) -> list[str]:
        """Names of the files in a step, temporary files included; [] if none."""

    def files_by_step(self, run: str) -> dict[int, list[str]]:
        """:meth:`files` of every step of ``run`` (one listing on an object store)."""
        return {step: self.files(run, step) for step in self.steps(run)}

    @abstractmethod
    def stat_files(self, run: str, step: int) -> dict[str, FileStat]:
        """:meth:`files` with each file's size and modification time, from one listing
        (one request on an object store); {} if none."""

    @abstractmethod
    def exists(self, run: str, step: int, name: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, run: str, step: int, name: str) -> bytes:
        """A whole (small) file; FileNotFoundError if absent."""

    @abstractmethod
    def map(self, run: str, step: int, name: str) -> Any:
        """A read-only buffer over a whole file, to be closed by the caller."""

    @abstractmethod
    def write_bytes(self, run: str, step: int, name: str, data: bytes) -> None:
        """Write a small file atomically."""

    @abstractmethod
    def write_stream(
        self, run: str, step: int, name: str, size: int | None, chunks: Iterable
    ) -> None:
        """Write ``size`` bytes given as consecutive buffers atomically (None: a size known
        only at the end, given only to storages that take whole files)."""

    @abstractmethod
    def delete(self, run: str, step: int, name: str) -> None:
        """Remove a file if present."""

    @abstractmethod
    def remove_step_dir(self, run: str, step: int) -> bool:
        """Remove a step's directory if it is empty; whether it is gone."""

    def clean_leftovers(self, run: str, rank: int) -> None:  # noqa: B027 - optional hook
        """Remove what a killed writer of ``rank`` may have left outside the files (an
        object store's unfinished multipart uploads)."""

    def close(self) -> None:  # noqa: B027 - an optional hook, not every storage holds anything
        """Release what this storage holds open."""


def close_mapping(mapping: Any) -> None:
    """Unmap a mapping from Storage.map (None: nothing to do)."""
    close = getattr(mapping, "close", None)
    if close is not None:
        try:
            close()
        except BufferError:  # a view is still referenced (e.g. by a traceback); GC unmaps it
            pass


UNMAP_DELAY = 2.0  # seconds a mapping handed to close_mapping_later stays
_unmapping: queue.SimpleQueue = queue.SimpleQueue()
_unmapper: list[threading.Thread] = []
_unmapper_lock = threading.Lock()


def close_mapping_later(mapping: Any) -> None:
    """:func:`close_mapping` UNMAP_DELAY seconds from now, on a thread of its own.
    Unmapping a GiB holds the process's memory map for 30-60 ms here, and every thread
    that faults a page meanwhile waits: a transfer's status or a recovery need not."""
    with _unmapper_lock:
        if not _unmapper or not _unmapper[0].is_alive():  # a forked child has none
            _unmapper[:] = [threading.Thread(target=_unmap_in_turn, name="mtckpt-unmap",
                                             daemon=True)]  # fmt: skip
            _unmapper[0].start()
    _unmapping.put((time.monotonic() + UNMAP_DELAY, mapping))


def _unmap_in_turn() -> None:
    while True:
        due, mapping = _unmapping.get()
        time.sleep(max(0.0, due - time.monotonic()))
        close_mapping(mapping)
