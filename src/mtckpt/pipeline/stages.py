"""What happens to a save after ``save()`` returns, on background threads.

The memory worker takes staged steps in order: checksums each chunk of the slot (native
code, GIL released), compares it with the previous step's where a slower tier stores
incrementally (:mod:`mtckpt.incremental`), writes the rank manifest, publishes the slot
into the step directory and commits it in the memory tier. Each slower tier has its own
worker that copies committed steps from the memory tier, re-verifying every chunk on the
way; if it falls behind, the newest due step wins and older queued ones are skipped (and
logged), unless the tier queues its backlog. A memory step is not recycled while a slower
tier still reads it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import checksum, incremental, retention, tiercopy
from ..errors import MtckptError, NodeRanksMissingError
from ..format import commit, naming
from ..format.manifest import LeafRecord, RankManifest
from ..format.shard import Layout
from ..format.structure import Node
from ..tiers.base import Storage
from ..tiers.memory import MemoryStorage, Slot
from .handle import SaveHandle

log = logging.getLogger(__name__)

# A step committed in node memory waits there for the node's other ranks: who is missing
# is logged after NODE_WAIT_FIRST_LOG seconds (half the timeout if shorter), then every
# NODE_WAIT_LOG_EVERY; the storage is listed again at most every NODE_POLL_SECONDS.
NODE_WAIT_FIRST_LOG = 5.0
NODE_WAIT_LOG_EVERY = 30.0
NODE_POLL_SECONDS = 0.05


@dataclass
class SaveJob:
    step: int
    slot: Slot
    layout: Layout
    tree: Node
    records: list[LeafRecord]
    framework: str
    tiers: tuple[str, ...]  # slower tiers due, in order
    handle: SaveHandle
    finish_staging: Callable[[], None] | None = None  # async staging: run by the stager
    manifest: RankManifest | None = None
    manifest_json: bytes = b""


@dataclass
class SlowerTier:
    storage: Storage
    keep: int
    keep_every: int | None = None
    # Set when the node daemon writes this tier: ``flush(step)`` has it upload this rank's
    # shard (and commit, and apply retention) and waits; False if it skipped the step.
    flush: Callable[[int], bool] | None = None
    # A step due while this tier is busy: "newest" replaces older ones waiting (skipped,
    # logged); "queue" keeps them all, each pinned in node memory until it is written.
    backlog: str = "newest"
    # What this process verified there (copies are checked on the way): retention after
    # each step then reads no data.
    verdicts: retention.Verdicts = field(default_factory=retention.Verdicts)
    queue: collections.deque = field(default_factory=collections.deque)
    thread: threading.Thread | None = None


class Pipeline:
    def __init__(
        self,
        *,
        run: str,
        rank: int,
        world_size: int,
        node_ranks: tuple[int, ...],
        memory: MemoryStorage,
        memory_keep: int,
        slower: dict[str, SlowerTier],
        chunk_size: int,
        threads: int,
        on_memory_commit: Callable[[int, SaveHandle], None] | None = None,
        memory_verdicts: retention.Verdicts | None = None,
        node_timeout: float = 600.0,
        node_origin: str = "",
        compare: bool = False,
    ) -> None:
        """``compare``: record each step's changes since the previous one (a slower tier
        stores incrementally)."""
        self.run, self.rank, self.world_size = run, rank, world_size
        # Each commit checksums the staged bytes: the memory tier's verdicts come free.
        self.memory_verdicts = memory_verdicts or retention.Verdicts()
        self.on_memory_commit = on_memory_commit
        self.node_ranks = node_ranks
        # How long a step waits in node memory for the node's other ranks, and where
        # node_ranks came from (for the error saying why they may never come).
        self.node_timeout, self.node_origin = node_timeout, node_origin
        self._absent: frozenset[int] = frozenset()  # ranks a step last waited for in vain
        self.memory, self.memory_keep = memory, memory_keep
        self.chunk_size, self.threads = chunk_size, threads
        self._changes = None
        if compare:
            data_file = naming.data_file(rank)
            self._changes = incremental.ChangeTracker(
                lambda step: memory.map(run, step, data_file), chunk_size, threads
            )
        self._cond = threading.Condition()
        self._memory_queue: collections.deque[SaveJob] = collections.deque()
        self._memory_busy = False
        self._active = 0  # jobs queued or running in any worker, housekeeping included
        self._pins: collections.Counter[int] = collections.Counter()
        self._retention_lock = threading.Lock()
        self._closing = False  # no more saves: the memory worker drains its queue and stops
        self._tiers_closing = False  # set once it has: tier workers drain and stop
        self._abandoned = False  # closing with a timeout that passed: drop what waits
        self._giving_up = ""  # why the node commits under way stop waiting, while they do
        self._tiers = slower
        self._staging_queue: collections.deque[SaveJob] = collections.deque()
        self._stager = threading.Thread(
            target=self._stager_worker, name="mtckpt-stager", daemon=True
        )
        self._stager.start()
        self._memory_thread = threading.Thread(
            target=self._memory_worker, name="mtckpt-memory", daemon=True
        )
        self._memory_thread.start()
        for name, tier in self._tiers.items():
            tier.thread = threading.Thread(
                target=self._tier_worker, args=(name,), name=f"mtckpt-{name}", daemon=True
            )
            tier.thread.start()

    # -- submitting and waiting ------------------------------------------------------------

    def submit(self, job: SaveJob) -> None:
        with self._cond:
            if self._closing:
                raise MtckptError("the checkpoint pipeline is closed")
            self._memory_queue.append(job)
            if job.finish_staging is not None:
                self._staging_queue.append(job)
            self._active += 1
            self._cond.notify_all()

    def wait_memory_idle(self) -> None:
        """Block until every submitted step has been committed (or failed) in memory."""
        with self._cond:
            self._cond.wait_for(lambda: not self._memory_queue and not self._memory_busy)

    def give_up_node_waits(self, why: str) -> None:
        """Commit nothing more that waits for a node-mate's shard (``why``: its rank
        restarts), then block until every submitted step is committed or given up."""
        with self._cond:
            self._giving_up = why
        try:
            self.wait_memory_idle()
        finally:
            with self._cond:
                self._giving_up = ""

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every worker is done, garbage collection included; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._active == 0, timeout)

    def _job_done(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def abandon(self) -> None:
        """Give up on the work not done (a close whose timeout passed): a step waiting for
        its node's other ranks stops waiting and stays uncommitted, and the copies queued
        for slower tiers are dropped; what is under way finishes."""
        with self._cond:
            self._abandoned = True
            self._cond.notify_all()

    def close(self) -> None:
        """Finish all submitted work, then stop the workers."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._stager.join()
        self._memory_thread.join()
        with self._cond:
            self._tiers_closing = True
            self._cond.notify_all()
        for tier in self._tiers.values():
            tier.thread.join()

    # -- the stager: async staging, off the training thread --------------------------------

    def _stager_worker(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._staging_queue or self._closing)
                if not self._staging_queue:
                    return
                job = self._staging_queue.popleft()
            try:
                job.finish_staging()
            except BaseException as exc:
                log.error("step %d: staging into node memory failed: %s", job.step, exc)
                job.handle._finish("staged", error=exc)
            else:
                job.handle._finish("staged")
            job.finish_staging = None

    # -- the memory worker -----------------------------------------------------------------

    def _next_memory_job(self) -> SaveJob | None:
        with self._cond:
            self._cond.wait_for(lambda: self._memory_queue or self._closing)
            if not self._memory_queue:
                return None
            self._memory_busy = True
            return self._memory_queue.popleft()

    def _memory_worker(self) -> None:
        while (job := self._next_memory_job()) is not None:
            try:
                self._commit_in_memory(job)
            except BaseException as exc:  # reported through the handle, never lost
                log.error("step %d: commit in the memory tier failed: %s", job.step, exc)
                for stage in ("memory",) + job.tiers + self._peer_stage(job):
                    job.handle._finish(stage, error=exc)
            else:
                self._collect_memory_garbage()
                job.handle._finish("memory")
                if self.on_memory_commit is not None:
                    self.on_memory_commit(job.step, job.handle)
                self._prepare_spare_slot(job.slot)
            finally:
                with self._cond:
                    self._memory_busy = False
                    self._active -= 1
                    self._cond.notify_all()

    def _peer_stage(self, job: SaveJob) -> tuple[str, ...]:
        return ("peers",) if "peers" in job.handle.tiers else ()

    def _commit_in_memory(self, job: SaveJob) -> None:
        try:
            job.handle.wait("staged")  # async staging: the bytes must be in the slot
        except BaseException:
            self.memory.release(job.slot, self.run, self.rank)
            raise
        view = job.slot.view()
        try:
            crcs = checksum.crc32c_chunks(view, self.chunk_size, self.threads)
            changes = self._changes.compare(job.step, view) if self._changes else None
        finally:
            del view
        job.manifest = RankManifest(
            run=self.run,
            step=job.step,
            rank=self.rank,
            world_size=self.world_size,
            framework=job.framework,
            tree=job.tree,
            leaves=tuple(job.records),
            data_file=naming.data_file(self.rank),
            file_size=job.layout.file_size,
            data_start=job.layout.data_start,
            chunk_size=self.chunk_size,
            chunk_crc32c=tuple(crcs),
            changes=changes,
        )
        job.manifest_json = job.manifest.to_json()
        try:
            self.memory.publish(job.slot, self.run, job.step, self.rank)
        except BaseException:
            self.memory.release(job.slot, self.run, self.rank)
            raise
        self.memory.write_bytes(
            self.run, job.step, naming.manifest_file(self.rank), job.manifest_json
        )
        try:
            self._commit_on_node(job.step)
        except NodeRanksMissingError:
            if self._changes is not None:
                self._changes.forget(job.step)
            with self._retention_lock:  # the step will never commit: give its slot back
                retention.remove_rank_files(self.memory, self.run, job.step, self.rank,
                                            self.world_size)  # fmt: skip
            raise
        self.memory_verdicts.record(job.manifest)
        for name in job.tiers:
            with self._cond:
                self._pins[job.step] += 1
                self._active += 1
                self._tiers[name].queue.append(job)
                self._cond.notify_all()

    def _commit_on_node(self, step: int) -> None:
        """Commit ``step`` in node memory once every rank of the node has its shard there
        (the last to arrive writes COMMIT; the others see their ranks present and write the
        same marker). NodeRanksMissingError at once if a missing rank saved a newer step
        instead, or is still absent from every step after an earlier step waited in vain
        for it; else after ``node_timeout`` seconds, having logged who is missing."""
        started = time.monotonic()
        next_log = started + min(NODE_WAIT_FIRST_LOG, self.node_timeout / 2)
        pause = 0.001
        while not commit.try_commit(self.memory, self.run, step, self.world_size,
                                    self.node_ranks):  # fmt: skip
            held = commit.ranks_by_step(self.memory, self.run)
            missing = sorted(set(self.node_ranks) - held.get(step, set()))
            if not missing:
                continue  # arrived since try_commit looked
            newer = {r: s for s, ranks in held.items() if s > step for r in ranks if r in missing}
            if newer:
                raise self._missing_error(
                    step,
                    missing,
                    f"saved newer step(s) {sorted(set(newer.values()))} but not this one",
                )
            absent = frozenset(r for r in missing if not any(r in ranks for ranks in held.values()))
            if absent and absent == set(missing) and absent <= self._absent:
                raise self._missing_error(
                    step,
                    missing,
                    "have written no step here yet, and an earlier step waited for them in vain",
                )
            if self._abandoned:
                raise self._missing_error(step, missing, "were still missing at close")
            if self._giving_up:
                raise self._missing_error(step, missing, f"were missing when {self._giving_up}")
            now = time.monotonic()
            if now - started >= self.node_timeout:
                self._absent = absent
                raise self._missing_error(
                    step,
                    missing,
                    "did not write their shard within "
                    f"{self.node_timeout:g} s (collective_timeout)",
                )
            if now >= next_log:
                log.warning("step %d: waiting %.0f s for rank(s) %s of this node to write their "
                            "shard into the %s; this node's ranks %s are %s", step, now - started,
                            missing, self.memory.describe(), list(self.node_ranks),
                            self.node_origin)  # fmt: skip
                next_log = now + NODE_WAIT_LOG_EVERY
            time.sleep(pause)
            pause = min(pause * 2, NODE_POLL_SECONDS)
        self._absent = frozenset()

    def _missing_error(self, step: int, missing: list[int], why: str) -> NodeRanksMissingError:
        return NodeRanksMissingError(
            f"step {step} of run {self.run!r} cannot commit in the {self.memory.describe()}: "
            f"rank(s) {missing} of this node {why}; this node's ranks {list(self.node_ranks)} "
            f"are {self.node_origin or 'given'}"
        )

    def _collect_memory_garbage(self) -> None:
        try:
            with self._retention_lock:
                with self._cond:
                    pinned = set(self._pins)
                retention.apply(
                    self.memory,
                    self.run,
                    self.rank,
                    self.world_size,
                    self.memory_keep,
                    protected=pinned,
                    verdicts=self.memory_verdicts,
                    threads=self.threads,
                )
                self.memory.trim(self.run, self.rank, max_free=1)
        except Exception as exc:  # garbage collection failing must not stop checkpointing
            log.warning("memory tier: garbage collection failed: %s", exc)

    def _prepare_spare_slot(self, like: Slot) -> None:
        try:
            self.memory.prepare_spare(self.run, self.rank, like)
        except Exception as exc:  # the next save creates its slot itself
            log.warning("memory tier: cannot prepare a spare slot: %s", exc)

    # -- slower tiers ----------------------------------------------------------------------

    def _next_tier_job(self, name: str) -> SaveJob | None:
        tier = self._tiers[name]
        with self._cond:
            self._cond.wait_for(lambda: tier.queue or self._tiers_closing)
            if not tier.queue:
                return None
            if self._abandoned:  # every queued step dropped, none copied
                job, skipped = None, list(tier.queue)
            elif tier.backlog == "queue":  # every due step, oldest first
                job, skipped = tier.queue.popleft(), []
            else:  # newest wins
                job, skipped = tier.queue.pop(), list(tier.queue)
            if job is None or tier.backlog != "queue":
                tier.queue.clear()
        for old in skipped:
            if job is None:
                why = f"{name} tier: step {old.step} not copied: the manager closed first"
                old.handle._finish(name, error=MtckptError(why))
            else:
                log.warning("%s tier: skipping step %d because step %d is already due (the "
                            "tier is slower than the save rate; consider a larger `every`)",
                            name, old.step, job.step)  # fmt: skip
                old.handle._finish(name, skipped=True)
            self._unpin(old.step)
            self._job_done()
        return job

    def _tier_worker(self, name: str) -> None:
        tier = self._tiers[name]
        while (job := self._next_tier_job(name)) is not None:
            error, skipped = None, False
            try:
                if tier.flush is not None:
                    skipped = not tier.flush(job.step)
                else:
                    self._copy_to_tier(tier, job)
            except BaseException as exc:
                log.error(
                    "%s tier: step %d failed: %s (training continues; the next due "
                    "step will try again)",
                    name,
                    job.step,
                    exc,
                )
                error = exc
            self._unpin(job.step)
            job.handle._finish(name, error=error, skipped=skipped)
            if tier.flush is None:
                retention.apply_or_log(tier.storage, self.run, self.rank, self.world_size,
                                       tier.keep, tier.keep_every, tier.verdicts,
                                       self.threads)  # fmt: skip
            self._collect_memory_garbage()
            self._job_done()

    def _copy_to_tier(self, tier: SlowerTier, job: SaveJob) -> None:
        storage, manifest = tier.storage, job.manifest
        where = (
            f"step {job.step} rank {self.rank}: the memory tier copy changed after it was "
            f"committed; not copied to {storage.describe()}"
        )
        tiercopy.put_shard(storage, manifest, job.slot.view(), where, self.threads)
        tier.verdicts.record(manifest)
        ranks = range(self.world_size) if storage.shared else self.node_ranks
        commit.try_commit(storage, self.run, job.step, self.world_size, ranks)

    def _unpin(self, step: int) -> None:
        with self._cond:
            self._pins[step] -= 1
            if self._pins[step] <= 0:
                del self._pins[step]
