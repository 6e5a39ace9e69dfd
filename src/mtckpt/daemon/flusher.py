"""Uploading this node's shards to the object tier, for the trainers that ask (Flush).

A trainer whose step is due for the object tier asks its daemon instead of uploading it
itself: compression and HTTP then cost the trainer nothing, and an upload under way
outlives a trainer that is killed. One thread uploads, a shard at a time (each in
parallel parts); per run and rank the newest step asked for wins over older ones still
queued. After each shard, the step is committed on the object tier if every rank's shard
is there, and the tier's retention applies. The trainer keeps the step in its memory tier
until the daemon reports it done; a data file that changes meanwhile anyway is caught by
the checks before and after its upload.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import retention, tiercopy
from ..config import ObjectTier
from ..errors import ChecksumMismatchError, CorruptCheckpointError
from ..format import commit
from ..metrics import Metrics
from ..proto import mtckpt_pb2 as pb
from ..tiers.object import ObjectStorage
from .holdings import Holdings, Shard

log = logging.getLogger(__name__)

Phase = pb.FlushState.Phase
REMEMBERED = 8  # finished flushes reported per run and rank


@dataclass
class FlushState:
    phase: int = Phase.QUEUED
    error: str = ""


class Flusher:
    def __init__(
        self,
        holdings: Holdings,
        tier: ObjectTier,
        storage: ObjectStorage,
        metrics: Metrics | None = None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        """``on_change`` is called after a flush changes phase (Status waiters)."""
        self.holdings, self.tier, self.storage, self.metrics = holdings, tier, storage, metrics
        self.verdicts = retention.Verdicts()  # the shards flushed here were checked on the way
        self.on_change = on_change
        self.state: dict[Shard, FlushState] = {}
        self._queue: collections.OrderedDict[tuple[str, int], Shard] = collections.OrderedDict()
        self._busy = False
        self._stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="mtckpt-flusher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request(self, shard: Shard) -> None:
        """Queue ``shard`` (this node's) for upload; an older step of its run and rank still
        queued is skipped, and so is ``shard`` if a newer one is."""
        key = (shard.run, shard.rank)
        with self._cond:
            if shard in self.state and self.state[shard].phase != Phase.FAILED:
                return  # asked again (a trainer retrying): it is on its way or done
            queued = self._queue.get(key)
            if queued is not None and queued.step > shard.step:
                self.state[shard] = FlushState(Phase.SKIPPED, f"step {queued.step} is queued")
                self.on_change()
                return
            if queued is not None:
                self.state[queued] = FlushState(Phase.SKIPPED, f"step {shard.step} is due")
                log.warning(
                    "remote tier: skipping %s because step %d is already due (the object "
                    "tier is slower than the save rate)", queued, shard.step,
                )  # fmt: skip
            self._queue[key] = shard
            self._queue.move_to_end(key)
            self.state[shard] = FlushState()
            self._forget_old(key)
            self._cond.notify_all()
        self.on_change()

    def snapshot(self) -> dict[Shard, FlushState]:
        with self._cond:
            return {s: FlushState(f.phase, f.error) for s, f in self.state.items()}

    def drain(self, timeout: float) -> bool:
        """Wait until nothing is queued or uploading (or ``timeout``); whether it was so."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def _forget_old(self, key: tuple[str, int]) -> None:
        finished = sorted(
            (s for s, f in self.state.items() if (s.run, s.rank) == key
             and f.phase in (Phase.DONE, Phase.SKIPPED, Phase.FAILED)),
            key=lambda s: s.step,
        )  # fmt: skip
        for shard in finished[:-REMEMBERED]:
            del self.state[shard]

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if self._stopping:
                    return
                _, shard = self._queue.popitem(last=False)
                self._busy = True
                self.state[shard].phase = Phase.FLUSHING
            self.on_change()
            error = ""
            started = time.monotonic()
            try:
                size = self.flush(shard)
            except Exception as exc:  # reported to the trainer; its next due step tries again
                error = str(exc) or type(exc).__name__
                log.error("remote tier: flushing %s failed: %s", shard, error)
                self._count_failure(exc)
            else:
                seconds = time.monotonic() - started
                log.info("flushed %s to %s in %.1f s", shard, self.tier.url, seconds)
                if self.metrics is not None:
                    self.metrics.save_seconds.observe(seconds, stage="remote")
                    self.metrics.bytes_written.inc(size, tier="remote")
            with self._cond:
                self.state[shard] = FlushState(Phase.FAILED if error else Phase.DONE, error)
                self._busy = False
                self._cond.notify_all()
            self.on_change()

    def _count_failure(self, exc: Exception) -> None:
        if self.metrics is not None:
            self.metrics.errors.inc(tier="remote")
            if isinstance(exc, ChecksumMismatchError):  # the node's copy changed or rotted
                self.metrics.checksum_failures.inc(tier="memory")

    def flush(self, shard: Shard) -> int:
        """Upload ``shard`` and commit its step there once every rank is up; its bytes."""
        run, step, rank = shard.run, shard.step, shard.rank
        source = next(
            (s for s in self.holdings.own_storages() if commit.is_committed(s, run, step)), None
        )
        if source is None:
            raise CorruptCheckpointError(
                f"{shard}: not committed in this node's memory or local tier"
            )
        size = tiercopy.copy_shard(
            source, self.storage, run, step, rank, recheck=True, verified=self.verdicts.record
        )
        world = commit.saved_world_size(source, run, step)
        commit.try_commit(self.storage, run, step, world, range(world))
        retention.apply_or_log(self.storage, run, rank, world, self.tier.keep,
                               self.tier.keep_every, self.verdicts)  # fmt: skip
        return size
