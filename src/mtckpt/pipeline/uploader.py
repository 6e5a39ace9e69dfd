"""Uploading a trainer's shards to the object tier from a helper process.

Without a node daemon, uploads on the trainer's own threads would share its GIL: s3fs's
event loop, the HTTP bookkeeping and the part copies slow a Python training loop by 10-20%
(benchmarks/RESULTS.md). So the manager has a helper process upload instead, started on
the first flush. The pipeline's worker for the object tier hands it one step at a time and
waits for the answer; the step stays pinned in node memory meanwhile. The helper reads the
rank's shard from the memory tier, uploads it verified, commits the step on the object
tier once every rank's shard is up and applies the tier's retention, as the node daemon's
flusher does. What it logs comes back with its answer and is logged in the trainer. It
ends when the manager closes, and within a moment of its trainer's death.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from .. import retention, tiercopy
from ..config import ObjectTier
from ..errors import ConfigError, TierError
from ..format import commit

NICE = 10  # as the node daemon: the training loop goes first
STOP_SECONDS = 10.0  # for an idle helper to exit when asked, before it is killed
PARENT_POLL_SECONDS = 0.2
HELPER = "import sys; from mtckpt.pipeline.uploader import main; main(sys.argv)"


def in_process(cfg: ObjectTier) -> bool:
    """Whether ``cfg``'s uploads run on the trainer's threads rather than in a helper:
    "auto" keeps them there for memory:// and for filesystems a fresh process cannot find
    by name (registered at run time by the training script)."""
    if cfg.uploader != "auto":
        return cfg.uploader == "thread"
    from fsspec.registry import known_implementations

    protocols = [part.split("://", 1)[0] for part in cfg.url.split("::")]  # chained URLs too
    return any(p == "memory" or p not in known_implementations for p in protocols)


class Uploader:
    """The helper process that uploads one rank's shards; ``flush(step)`` is the pipeline's
    hook for the object tier."""

    def __init__(self, cfg: ObjectTier, run: str, rank: int, world_size: int,
                 memory_root: Path, threads: int) -> None:  # fmt: skip
        try:
            self._setup = pickle.dumps((cfg, run, rank, world_size, str(memory_root), threads))
        except Exception as exc:
            raise ConfigError(
                f"remote.storage_options cannot be sent to the upload helper process ({exc}); "
                "pass options that pickle, or set remote.uploader = 'thread'"
            ) from None
        self.where = f"rank {rank}: the upload helper process for {cfg.url}"
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    def flush(self, step: int) -> bool:
        """Have the helper upload ``step`` and commit it when every rank is up; True when
        it is. Raises what the upload raised, or TierError if the helper died meanwhile."""
        with self._lock:
            if self._proc is None:
                self._start()
            try:
                self._conn.send(step)
                logs, error = self._conn.recv()
            except (EOFError, OSError):
                code = self._stop()
                raise TierError(
                    f"step {step} {self.where} ended before it answered (exit "
                    f"code {code}); the next due step starts a new one"
                ) from None
        _replay(logs)
        if error is not None:
            raise error
        return True

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._stop()

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", HELPER, str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            )  # fmt: skip
            self._conn = Connection(ours.detach())
        self._conn.send_bytes(self._setup)

    def _stop(self) -> int:
        """End the helper: ask it, then kill it; its exit code."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        try:
            conn.send(None)
            if conn.poll(STOP_SECONDS):
                _replay(conn.recv()[0])
        except (EOFError, OSError):
            pass
        conn.close()
        try:
            return proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def _replay(logs: list[tuple[str, int, str]]) -> None:
    for name, level, message in logs:
        logging.getLogger(name).log(level, "%s", message)


# -- the helper process ------------------------------------------------------------------


class _Captured(logging.Handler):
    """What the helper logs, sent back with its answer."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))

    def take(self) -> list[tuple[str, int, str]]:
        records, self.records = self.records, []
        return records


def _portable(exc: Exception) -> Exception:
    """``exc`` if it crosses the pipe intact, else a TierError with its message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return TierError(str(exc) or type(exc).__name__)


def _end_with_parent(parent: int) -> None:
    """Exit within a poll of the trainer's death (a SIGKILL sends no word down the pipe)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="mtckpt-parent-watch", daemon=True).start()


def _serve(conn: Connection) -> None:
    from ..tiers.memory import MemoryStorage
    from ..tiers.object import object_storage

    cfg, run, rank, world_size, memory_root, threads = pickle.loads(conn.recv_bytes())
    source = MemoryStorage(memory_root)
    captured = _Captured()
    logging.getLogger("mtckpt").addHandler(captured)
    logging.getLogger("mtckpt").setLevel(logging.INFO)
    storage = None
    verdicts = retention.Verdicts()  # the shards uploaded here were checked on the way
    while (step := conn.recv()) is not None:
        error = None
        try:
            if storage is None:
                storage = object_storage(cfg, check=False)
            tiercopy.copy_shard(
                source, storage, run, step, rank, threads=threads, verified=verdicts.record
            )
            commit.try_commit(storage, run, step, world_size, range(world_size))
        except Exception as exc:
            error = _portable(exc)
        conn.send((captured.take(), error))
        if storage is not None:  # after the answer, as the pipeline's own tier workers do
            retention.apply_or_log(storage, run, rank, world_size, cfg.keep, cfg.keep_every,
                                   verdicts, threads)  # fmt: skip
    conn.send((captured.take(), None))  # what the last garbage collection logged


def main(argv: list[str]) -> None:
    fd, parent = int(argv[1]), int(argv[2])
    _end_with_parent(parent)
    try:
        os.nice(NICE)
    except OSError:
        pass
    conn = Connection(fd)
    try:
        _serve(conn)
    except (EOFError, OSError):  # the trainer closed the pipe or went away
        pass
