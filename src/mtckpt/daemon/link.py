"""The trainer's side of the node daemon: where the memory tier is, telling the daemon
when a step is committed there, following its replication for ``h.wait("peers")`` and
``mgr.steps()``, having it upload steps due for the object tier when it has one, and
asking it to fetch this node's shards from peers before a restore.

All of it runs off the training thread, except the recovery call made by ``restore``."""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from pathlib import Path

from ..config import MemoryTier, PeerTier, expand_path
from ..errors import ConfigError, TierError
from ..redundancy import Redundancy

log = logging.getLogger(__name__)

# The trainer waits for its daemon's replication and upload state to change in a long-polled
# Status of up to WAIT_SECONDS; it asks again no sooner than POLL_SECONDS (FLUSH_POLL_SECONDS
# for an upload) when nothing changed: a daemon with no room for another waiting call
# answers at once.
WAIT_SECONDS = 10.0
POLL_SECONDS = 0.2
FLUSH_POLL_SECONDS = 0.5
DEGRADED_AFTER = 3.0  # seconds an error must last to fail h.wait("peers") (not a blip)


class DaemonLink:
    def __init__(self, cfg: PeerTier, run: str, rank: int) -> None:
        try:
            import grpc

            from .auth import read_token
            from .rpc import Client
        except ImportError as exc:
            raise ConfigError(f"peers= needs grpcio: pip install 'mtckpt[grpc]' ({exc})") from None
        self._grpc = grpc
        self.cfg, self.run, self.rank = cfg, run, rank
        self.client = Client(cfg.daemon, token=read_token(cfg.token_file), timeout=30.0)
        try:
            status = self.client.status(timeout=10.0)
        except grpc.RpcError as exc:
            self.client.close()
            raise ConfigError(
                f"no mtckpt daemon answers at {cfg.daemon}: {exc.details()}"
            ) from None
        problem = _mismatch(cfg, status)
        if problem:
            self.client.close()
            raise ConfigError(problem)
        self.node_id, self.memory_root = status.node_id, status.memory_root
        self.memory_budget = status.memory_budget or None  # bytes; None: no budget
        self.remote_url = status.remote_url  # empty: the daemon uploads nothing
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._worker, name="mtckpt-peers", daemon=True)
        self._thread.start()
        # Each commit is told at once, not after the steps before it are followed: the
        # daemon keeps a sync step before the trainer's retention expires it.
        self._abandoned = threading.Event()  # closing with a timeout that passed
        self._notices: queue.Queue = queue.Queue()
        self._notifier = threading.Thread(target=self._notify_each, name="mtckpt-notify",
                                          daemon=True)  # fmt: skip
        self._notifier.start()

    def committed(self, step: int, handle) -> None:
        """``step`` is committed in memory on this rank: tell the daemon, follow its
        replication."""
        self._notices.put(step)
        with self._cond:
            self._pending += 1
        self._queue.put((step, handle))

    def _notify_each(self) -> None:
        while (step := self._notices.get()) is not None:
            try:
                self.client.notify(self.run, step)
            except self._grpc.RpcError:
                pass  # the follower tells it again, and the daemon scans its memory tier

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            step, handle = item
            try:
                self._follow(step, handle)
            except Exception as exc:  # never let the follower die: the handle says why
                handle._finish("peers", error=TierError(f"step {step}: replication: {exc}"))
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def _follow(self, step: int, handle) -> None:
        grpc = self._grpc
        deadline = time.monotonic() + self.cfg.timeout
        notified = False
        failing_since = None  # since when the daemon has reported an error
        version = 0  # of the daemon's last Status
        while True:
            if self._abandoned.is_set():
                handle._finish("peers", error=TierError(
                    f"step {step} rank {self.rank}: replication not followed: the manager "
                    "closed first (the daemon goes on)"))  # fmt: skip
                return
            decide_by = deadline if failing_since is None else min(
                deadline, failing_since + DEGRADED_AFTER)  # fmt: skip
            try:
                if not notified:
                    self.client.notify(self.run, step)
                    notified = True
                status = self._next_status(version, decide_by, POLL_SECONDS)
            except grpc.RpcError as exc:
                state, error = None, f"daemon at {self.cfg.daemon}: {exc.details()}"
                version = 0
                time.sleep(POLL_SECONDS)
            else:
                version = status.version
                entries = self._mine(status)
                state = next((e for e in entries if e.shard.step == step), None)
                error = state.error if state is not None else ""
                newer = [e.shard.step for e in entries if e.shard.step > step]
                if state is None and newer:
                    # The daemon replicates the newest steps first and only its newest
                    # `keep`: one it has gone past without it will never be replicated.
                    log.info("peers tier: skipping step %d because the daemon has moved on "
                             "to step %d (newest wins: the step expired, or was not among "
                             "the newest it keeps, before it could be sent)",
                             step, max(newer))  # fmt: skip
                    handle._finish("peers", skipped=True)
                    return
            if state is not None and _stored_everywhere(state) and not error:
                handle._finish("peers")
                return
            failing_since = (failing_since or time.monotonic()) if error else None
            if error and time.monotonic() - failing_since >= DEGRADED_AFTER:
                handle._finish("peers", error=TierError(
                    f"step {step} rank {self.rank}: replication degraded ({error}); the daemon "
                    "goes on trying"))  # fmt: skip
                return
            if time.monotonic() > deadline:
                why = error or "no replication reported"
                handle._finish("peers", error=TierError(
                    f"step {step} rank {self.rank}: not replicated after {self.cfg.timeout} s "
                    f"({why})"))  # fmt: skip
                return

    def _next_status(self, version: int, decide_by: float, pace: float):
        """The daemon's Status once it differs from the one of ``version`` (0: now), or
        at ``decide_by`` (a monotonic time) at the latest; an unchanged one no sooner than
        ``pace`` seconds after asking."""
        asked = time.monotonic()
        wait = min(WAIT_SECONDS, max(0.0, decide_by - asked)) if version else 0.0
        status = self.client.status(changed_since=version, wait=wait)
        if status.version == version:
            time.sleep(max(0.0, pace - (time.monotonic() - asked)))
        return status

    def _mine(self, status) -> list:
        """The replication state of this rank's shards (every step) in a daemon Status."""
        return [
            e
            for e in status.replication
            if (e.shard.run, e.shard.rank, e.shard.origin) == (self.run, self.rank, self.node_id)
        ]

    def flush(self, step: int) -> bool:
        """Have the daemon upload this rank's shard of ``step`` to its object tier, and wait:
        True once it is up, False if the daemon skipped it for a newer step. TierError if
        the upload failed, or the daemon did not answer for ``timeout`` seconds."""
        from ..proto import mtckpt_pb2 as pb

        grpc, Phase = self._grpc, pb.FlushState.Phase
        shard = pb.ShardId(run=self.run, step=step, rank=self.rank, origin=self.node_id)
        asked, silent_since, version = False, None, 0
        while True:
            try:
                if not asked:
                    self.client.flush(shard)
                    asked = True
                status = self._next_status(version, math.inf, FLUSH_POLL_SECONDS)
            except grpc.RpcError as exc:
                version = 0
                silent_since = silent_since or time.monotonic()
                if time.monotonic() - silent_since > self.cfg.timeout:
                    raise TierError(f"step {step} rank {self.rank}: the daemon at "
                                    f"{self.cfg.daemon} does not answer ({exc.details()})"
                                    ) from None  # fmt: skip
                time.sleep(FLUSH_POLL_SECONDS)
                continue
            silent_since, version = None, status.version
            state = next((f for f in status.flushes if f.shard == shard), None)
            if state is None:  # a restarted daemon does not know it: ask again
                asked, version = False, 0
            elif state.phase == Phase.DONE:
                return True
            elif state.phase == Phase.SKIPPED:
                return False
            elif state.phase == Phase.FAILED:
                raise TierError(f"step {step} rank {self.rank}: the daemon's upload to "
                                f"{self.remote_url} failed: {state.error}")  # fmt: skip

    def reserve(self, size: int, count: int) -> list[str]:
        """Have the peers that will hold copies of this node's shards make files ready for
        ``count`` steps of this rank's ``size`` bytes; the peers that did (those that did
        not are logged: their first copies are only slower)."""
        from .rpc import MAX_RESERVED_STEPS

        try:
            reply = self.client.reserve(self.rank, size, min(count, MAX_RESERVED_STEPS),
                                        timeout=self.cfg.timeout)  # fmt: skip
        except self._grpc.RpcError as exc:
            log.warning("the daemon at %s made no room at its peers: %s", self.cfg.daemon,
                        exc.details())  # fmt: skip
            return []
        for failure in reply.failed:
            log.warning("no room made at peer %s", failure)
        return list(reply.ready)

    def replicated_steps(self) -> list[int]:
        """Steps whose shard of this rank every target peer holds, ascending."""
        try:
            entries = self._mine(self.client.status())
        except self._grpc.RpcError as exc:
            log.error("cannot reach the daemon at %s: %s", self.cfg.daemon, exc.details())
            return []
        return sorted(e.shard.step for e in entries if _stored_everywhere(e) and not e.error)

    def recover(self) -> tuple[list[int], list[str]] | None:
        """Have the daemon fetch this node's shards of the newest step complete across the
        daemons, when this node lacks them (a replacement node). The steps complete for
        every rank across the daemons, newest first, and the peers that did not answer
        (the list may lack steps then); None without an answer."""
        grpc = self._grpc
        try:
            reply = self.client.recover(self.run, timeout=self.cfg.timeout,
                                        none_is_an_answer=True)  # fmt: skip
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("the daemon could not recover run %r from peers: %s", self.run,
                            exc.details())  # fmt: skip
            return None  # NOT_FOUND: a daemon that cannot answer "none" (older)
        if reply.bytes:
            log.info("step %d: %d bytes of this node's shards fetched from peers %s",
                     reply.step, reply.bytes, list(reply.sources))  # fmt: skip
        return list(reply.complete), list(reply.unreachable)

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def abandon(self) -> None:
        """Stop following replication (a close whose timeout passed)."""
        self._abandoned.set()

    def close(self) -> None:
        self._notices.put(None)
        self._queue.put(None)
        self._notifier.join(timeout=30)
        self._thread.join(timeout=30)
        self.client.close()


def _stored_everywhere(entry) -> bool:
    """Whether every peer chosen for a shard holds it (a ReplicaState from the daemon)."""
    return bool(entry.targets) and set(entry.targets) <= set(entry.stored)


def _mismatch(cfg: PeerTier, status) -> str:
    """Why the daemon does not keep the redundancy PeerTier asks for ("" if it does)."""
    kept = status.redundancy or f"replicas:{status.replicas}"  # an older daemon says replicas
    if cfg.redundancy is not None:
        if Redundancy.parse(cfg.redundancy) != Redundancy.parse(kept):
            return (f"the daemon at {cfg.daemon} keeps redundancy {kept}, PeerTier asks for "
                    f"{Redundancy.parse(cfg.redundancy)}; start it with --redundancy "
                    f"{cfg.redundancy}")  # fmt: skip
        return ""
    if Redundancy.parse(kept).coded or status.replicas >= cfg.replicas:
        return ""
    return (
        f"the daemon at {cfg.daemon} keeps {status.replicas} replica(s) of each shard, "
        f"PeerTier asks for {cfg.replicas}; start it with --replicas {cfg.replicas}"
    )


def memory_tier(link: DaemonLink | None, memory: MemoryTier | None,
                peers: PeerTier | None) -> MemoryTier:  # fmt: skip
    """``memory``, or the default; with a node daemon, its memory root (``memory`` may only
    name the same directory) and its memory budget unless ``memory`` sets one."""
    if link is None:
        return MemoryTier() if memory is None else memory
    root = link.memory_root
    if memory is None:
        return MemoryTier(path=root, max_bytes=link.memory_budget)
    if expand_path(memory.path).resolve() != Path(root).resolve():
        link.close()
        raise ConfigError(
            f"memory.path {memory.path!r} is not the memory root {root!r} of the daemon "
            f"at {peers.daemon}; leave memory= out to use the daemon's"
        )
    if memory.max_bytes is None and link.memory_budget is not None:
        return dataclasses.replace(memory, max_bytes=link.memory_budget)
    return memory
