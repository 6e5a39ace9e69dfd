"""This node's sync steps kept by its daemon after its trainers expire them (daemon/sync.py).

A kept step is a second name for the memory tier's files, in
``{memory_root}/.kept/{run}/step-.../``: hard links to the data files and manifests (no
copy), and the COMMIT marker. The daemon holds each kept data file open as a reader
(``open_held``), so when the trainers' retention expires the step it unlinks the data file
instead of reusing it as a slot for a later save: the kept bytes never change. A kept
shard is listed, sent and recovered like one in the memory tier.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import BinaryIO

from ..format import commit, naming
from ..tiers.directory import DirectoryStorage
from ..tiers.memory import open_held

log = logging.getLogger(__name__)

KEPT_DIR = ".kept"


class KeptSteps:
    def __init__(self, memory: DirectoryStorage) -> None:
        self.memory = memory
        self.storage = DirectoryStorage(
            memory.root / KEPT_DIR, "kept", durable=False, populate=False
        )
        self._held: dict[Path, BinaryIO] = {}
        self._lock = threading.Lock()

    def keep(self, run: str, step: int) -> bool:
        """Link the memory tier's committed ``step`` of ``run`` here (the ranks not linked
        yet); whether the step is kept whole."""
        memory, kept = self.memory, self.storage
        with self._lock:
            if not commit.is_committed(memory, run, step):
                return commit.is_committed(kept, run, step)
            kept.make_step_dir(run, step)
            for rank in sorted(commit.ranks_present(memory, run, step)):
                self._link(run, step, rank)
            if not kept.exists(run, step, naming.COMMIT):
                try:
                    marker = memory.read_bytes(run, step, naming.COMMIT)
                except FileNotFoundError:
                    return False  # expired meanwhile: the ranks linked are held for now
                kept.write_bytes(run, step, naming.COMMIT, marker)
                log.info("run %r step %d kept as a sync step", run, step)
            return True

    def _link(self, run: str, step: int, rank: int) -> None:
        data, manifest = naming.data_file(rank), naming.manifest_file(rank)
        target = self.storage.path(run, step, data)
        if target in self._held:
            return
        try:
            held = open_held(self.memory.path(run, step, data))
        except FileNotFoundError:
            return  # expired before it could be kept
        try:
            os.link(self.memory.path(run, step, data), target)
            os.link(self.memory.path(run, step, manifest), self.storage.path(run, step, manifest))
        except FileExistsError:
            pass
        except FileNotFoundError:  # expired between the hold and the links
            held.close()
            _unlink(target)
            return
        self._held[target] = held

    def steps(self, run: str) -> list[int]:
        return commit.committed_steps(self.storage, run)

    def release(self, run: str, keep: set[int]) -> None:
        """Remove the kept steps of ``run`` not in ``keep``."""
        for step in self.storage.steps(run):
            if step in keep:
                continue
            with self._lock:
                self.storage.delete(run, step, naming.COMMIT)
                for name in self.storage.files(run, step):
                    path = self.storage.path(run, step, name)
                    held = self._held.pop(path, None)
                    if held is not None:
                        held.close()
                    _unlink(path)
                self.storage.remove_step_dir(run, step)
            log.info("run %r step %d no longer kept", run, step)

    def hold_all(self) -> None:
        """At start-up: hold the kept data files a previous daemon left (a trainer could
        reuse them otherwise)."""
        with self._lock:
            for run in self.storage.runs():
                for step in self.storage.steps(run):
                    for name in self.storage.files(run, step):
                        path = self.storage.path(run, step, name)
                        parsed = naming.parse_rank_file(name)
                        if parsed and parsed[1] == "safetensors" and path not in self._held:
                            self._held[path] = open_held(path)

    def close(self) -> None:
        with self._lock:
            for held in self._held.values():
                held.close()
            self._held.clear()


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
