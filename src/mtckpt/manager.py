"""CheckpointManager: the user's entry point. Decides which tiers take a step, stages it on
the training thread, hands the rest to the background pipeline, and restores the newest
complete, verified step from the fastest tier that holds a good copy."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _fastpath, config, coordination, retention, topology
from .config import LocalTier, ManagerOptions, MemoryTier, ObjectTier, PeerTier
from .daemon.link import DaemonLink, memory_tier
from .errors import (
    ClosedError,
    ConfigError,
    MemoryBudgetError,
    StepExistsError,
    StepNotFoundError,
)
from .format import commit, naming
from .metrics import Metrics
from .pipeline import uploader
from .pipeline.handle import SaveHandle
from .pipeline.stages import Pipeline, SaveJob, SlowerTier
from .pipeline.staging import framework_of, leaf_records, plan_save, stage_into_slot
from .restore import populate as populating
from .restore.plan import Restorer
from .tiers.base import Storage
from .tiers.directory import DirectoryStorage
from .tiers.local import LocalStorage
from .tiers.memory import MemoryStorage
from .tiers.object import object_storage

log = logging.getLogger(__name__)


class CheckpointManager:
    """Saves and restores the checkpoints of one run across the configured tiers.

    ``save`` returns once the state is copied into node memory; checksums, manifests,
    commits and the slower tiers follow in the background. ``restore`` returns the newest
    step complete in some tier whose copy verifies, falling back to another tier or an
    older step (and logging it) when a copy is damaged.
    """

    def __init__(
        self,
        run: str,
        memory: MemoryTier | None = None,
        local: LocalTier | None = None,
        peers: PeerTier | None = None,
        remote: ObjectTier | None = None,
        *,
        rank: int | None = ManagerOptions.rank,
        world_size: int | None = ManagerOptions.world_size,
        allow_pickle: bool = ManagerOptions.allow_pickle,
        chunk_size: int = ManagerOptions.chunk_size,
        threads: int | None = ManagerOptions.threads,
        collective_timeout: float = ManagerOptions.collective_timeout,
        staging: str = ManagerOptions.staging,
    ) -> None:
        tiers = {"peers": peers, "memory": memory, "local": local, "remote": remote}
        for name, tier in tiers.items():
            cls = config.TIER_CLASSES[name]
            if tier is not None and not isinstance(tier, cls):
                raise ConfigError(
                    f"{name} must be a mtckpt.{cls.__name__}, got {type(tier).__name__}"
                )
        opts = ManagerOptions(run, rank, world_size, allow_pickle, chunk_size, threads,
                              collective_timeout, staging)  # fmt: skip
        self.run = opts.run
        self.staging = staging
        self.metrics = Metrics()  # mgr.metrics.samples() / .render(): the daemon's families
        self.rank, self.world_size = topology.detect(rank, world_size)
        self._collective_timeout = collective_timeout
        self._coordinator = coordination.for_job(self.world_size, collective_timeout)
        self.allow_pickle = bool(allow_pickle)
        self.chunk_size = chunk_size
        self.threads = threads or max(1, min(8, os.cpu_count() or 1))
        _fastpath.backend()  # choose (and report) the fast path now, not mid-save

        self._peers = None if peers is None else DaemonLink(peers, self.run, self.rank)
        self._replicating = peers is not None and peers.replicating
        uploads = self._peers is not None and self._peers.remote_url
        self._daemon_counts = ("peers", "remote") if uploads else ("peers",)  # it sends those
        memory = memory_tier(self._peers, memory, peers)
        self._memory = MemoryStorage(config.expand_path(memory.path), memory.max_bytes)
        self._tiers: list[tuple[Any, Storage]] = [(memory, self._memory)]
        if local is not None:
            self._tiers.append((local, LocalStorage(config.expand_path(local.path))))
        if remote is not None:
            self._tiers.append((remote, object_storage(remote)))
        self._restorer = Restorer(self.run, self.rank, self.world_size,
                                  [storage for _, storage in self._tiers], self._coordinator,
                                  self.metrics, self.threads)  # fmt: skip
        self._closed = False
        self._uploader: uploader.Uploader | None = None  # the object tier's helper process
        self._handles: list[SaveHandle] = []
        self._populating: list[threading.Thread] = []  # restore(populate=True) copies
        self._last_saved_at: dict[str, float] = {}
        try:
            daemon_node = self._peers.node_id if self._peers is not None else None
            # A collective on every rank (unless LOCAL_RANK says), so here, never in a save.
            self.node_ranks, self._node_origin = topology.find_node_ranks(
                self.rank, self.world_size, self._memory.root, daemon_node, self._coordinator
            )
            self._coordinator.release()
            self._start(memory.keep, chunk_size, collective_timeout)
        except BaseException:  # nothing of this manager stays held
            self._release()
            raise

    def _start(self, memory_keep: int, chunk_size: int, collective_timeout: float) -> None:
        """Clean up after a crashed predecessor, apply retention and start the pipeline."""
        # Tiers the node daemon writes too (node memory; the object tier when it uploads):
        # its files in progress there are not a crashed trainer's leftovers.
        daemon_writes = set()
        if self._peers is not None:
            daemon_writes = {"memory", "remote"} if self._peers.remote_url else {"memory"}
        # What this process verified on each tier: retention removes a step only once a
        # newer one verifies, and reads no data for what was checked already.
        self._verdicts = {storage.name: retention.Verdicts() for _, storage in self._tiers}
        for index, (cfg, storage) in enumerate(self._tiers):
            self._prepare_storage(storage, cfg, essential=index == 0,
                                  clean=storage.name not in daemon_writes)  # fmt: skip
        self._newest = self.latest_step()
        self._pipeline = Pipeline(
            run=self.run,
            rank=self.rank,
            world_size=self.world_size,
            node_ranks=self.node_ranks,
            memory=self._memory,
            memory_keep=memory_keep,
            slower={s.name: self._slower_tier(cfg, s) for cfg, s in self._tiers[1:]},
            chunk_size=chunk_size,
            threads=max(1, self.threads // 2),
            on_memory_commit=self._peers.committed if self._replicating else None,
            memory_verdicts=self._verdicts[self._memory.name],
            node_timeout=collective_timeout,
            node_origin=self._node_origin,
            compare=self._replicating or any(s.full_every for _, s in self._tiers[1:]),
        )

    def _slower_tier(self, cfg: Any, storage: Storage) -> SlowerTier:
        """How the pipeline writes a slower tier: itself, or for the object tier, by the node
        daemon when it uploads to the same URL, else by a helper process (``uploader``)."""
        tier = SlowerTier(storage, cfg.keep, verdicts=self._verdicts[storage.name])
        if not isinstance(cfg, ObjectTier):
            return tier
        tier.keep_every, tier.backlog = cfg.keep_every, cfg.backlog
        daemon = self._peers
        if daemon is not None and daemon.remote_url:
            if daemon.remote_url != cfg.url:
                raise ConfigError(
                    f"remote.url {cfg.url!r} is not the object tier {daemon.remote_url!r} of "
                    f"the daemon at {daemon.cfg.daemon}; use the same URL (or start the daemon "
                    "without one to have the trainers upload)"
                )
            tier.flush = daemon.flush
        elif not uploader.in_process(cfg):
            helpers = max(1, self.threads // 2)
            self._uploader = uploader.Uploader(cfg, self.run, self.rank, self.world_size,
                                               self._memory.root, helpers)  # fmt: skip
            tier.flush = self._uploader.flush
        return tier

    @classmethod
    def from_config(cls, path: str | os.PathLike | None = None, **overrides: Any):
        """A manager from a TOML file (default ``$MTCKPT_CONFIG``) and ``MTCKPT_*`` variables;
        keyword arguments override both."""
        kwargs = config.load(path)
        kwargs.update(overrides)
        if "run" not in kwargs:
            raise ConfigError("no run name: set the config key run, MTCKPT_RUN or run=...")
        return cls(**kwargs)

    def _prepare_storage(self, storage: Storage, cfg: Any, essential: bool, clean: bool) -> None:
        """Hold this run and rank on a node tier until close (a second manager of them gets
        RankInUseError before its start-up could remove this one's files in progress; the
        trainer's own lock: a daemon's memory tier stays the daemon's), then
        :func:`retention.start_up`. An unusable tier other than memory is reported, and
        written when it can be."""
        try:
            if isinstance(storage, DirectoryStorage):
                storage.lock_rank(self.run, self.rank)
            retention.start_up(storage, self.run, self.rank, self.world_size, cfg, clean=clean,
                               verdicts=self._verdicts[storage.name],
                               threads=self.threads)  # fmt: skip
        except OSError as exc:
            if essential:
                raise ConfigError(f"{storage.describe()} is not usable: {exc}") from exc
            log.error(
                "%s is not usable (saves go on without it until it is): %s", storage.describe(), exc
            )

    def _committed(self, storage: Storage, any_rank: bool = False) -> list[int]:
        """Committed steps holding this rank's shard in ``storage`` (any committed step with
        ``any_rank``: a rank of a new world size reads the others'); a tier that cannot be
        listed is reported and counted as empty rather than failing the caller."""
        try:
            return commit.committed_steps(storage, self.run, None if any_rank else self.rank)
        except OSError as exc:
            log.error("cannot list %s: %s", storage.describe(), exc)
            return []

    # -- saving ----------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """Whether any tier's schedule takes ``step`` now."""
        return bool(self._due_tiers(naming.check_step(step), time.monotonic()))

    def _due_tiers(self, step: int, now: float) -> list[str]:
        due = []
        for cfg, storage in self._tiers:
            last = self._last_saved_at.get(storage.name)
            if config.is_due(cfg, step, None if last is None else now - last):
                due.append(storage.name)
        return due

    def save(self, step: int, state: Any, *, force: bool = False) -> SaveHandle:
        """Stage ``state`` as ``step`` in node memory and return; the rest runs in the background.

        The tiers whose schedule takes ``step`` (all of them with ``force=True``) receive it;
        if none does, nothing is saved and the handle has no tiers. Once this returns, the
        saved arrays may be modified.
        """
        self._check_open()
        step = naming.check_step(step)
        if self._newest is not None and step <= self._newest:
            if self._restorer.agreed is None or step <= self._restorer.agreed:
                raise StepExistsError(
                    f"step {step} is not newer than step {self._newest}, which run "
                    f"{self.run!r} already holds; steps must increase "
                    "(CheckpointManager.delete(step) removes newer steps to go back)"
                )
            self._rewind(step)
        now = time.monotonic()
        due = [s.name for _, s in self._tiers] if force else self._due_tiers(step, now)
        configured = tuple(s.name for _, s in self._tiers) + self._peer_stage()
        if not due:
            handle = SaveHandle(step, (), configured)
            handle._finish("staged")
            return handle
        if "memory" not in due:
            due.insert(0, "memory")  # every step passes through memory on its way
        node, leaves, data_leaves, stored_by, layout = self._layout(state, step)
        if self._memory.free_slots(self.run, self.rank) == 0:
            self._pipeline.wait_memory_idle()  # its garbage collection may free a slot
        try:
            slot = self._memory.acquire(self.run, self.rank, layout.file_size)
        except MemoryBudgetError as exc:  # never fails the training step: skipped, said
            log.warning("step %d of run %r skipped: %s", step, self.run, exc)
            self.metrics.saves_skipped.inc(reason="memory budget")
            return SaveHandle(step, (), configured, skipped_reason=str(exc))
        try:
            finish_staging = stage_into_slot(slot, layout, data_leaves, self.threads)
            if self.staging == "blocking":
                finish_staging()
        except BaseException:
            self._memory.release(slot, self.run, self.rank)
            raise
        handle = SaveHandle(step, tuple(due) + self._peer_stage(), configured,
                            on_finish=functools.partial(self.metrics.stage_done, layout.file_size,
                                                        counted_by_daemon=self._daemon_counts),
                            started=now)  # fmt: skip
        if self.staging == "blocking":
            handle._finish("staged")
        self._pipeline.submit(
            SaveJob(
                step=step,
                slot=slot,
                layout=layout,
                tree=node,
                records=leaf_records(leaves, layout, stored_by),
                framework=framework_of(data_leaves),
                tiers=tuple(due[1:]),
                handle=handle,
                finish_staging=None if self.staging == "blocking" else finish_staging,
            )
        )
        self._newest = step
        for name in due:
            self._last_saved_at[name] = now
        self._handles = [h for h in self._handles if not h.done()] + [handle]
        return handle

    def _layout(self, state: Any, step: int):
        return plan_save(state, step, run=self.run, rank=self.rank, world_size=self.world_size,
                         node_ranks=self.node_ranks, allow_pickle=self.allow_pickle)  # fmt: skip

    def reserve(self, state: Any, slots: int | None = None) -> int:
        """Prepare ``slots`` node-memory slots for saves of ``state`` before the first
        (default: the memory tier's keep + 1, what saves back to back take), mapped with
        their pages present, within the memory budget: then every save, the first ones
        too, blocks for about one copy. With a daemon replicating, the peers that will
        hold the copies prepare their files for as many steps too. The bytes of the
        slots made here."""
        self._check_open()
        layout = self._layout(state, (self._newest or 0) + 1)[-1]
        count = self._tiers[0][0].keep + 1 if slots is None else slots
        made = self._memory.reserve(self.run, self.rank, layout.file_size, count)
        if self._replicating and count:
            self._peers.reserve(layout.file_size, count)
        return made * layout.file_size

    def _peer_stage(self) -> tuple[str, ...]:
        """The "peers" stage: every step committed in memory is replicated by the daemon."""
        return ("peers",) if self._replicating else ()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for all pending work of every tier, garbage collection included; raise the
        first error among it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        handles, self._handles = self._handles, []
        first_error = None
        for handle in handles:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                handle.wait(timeout=remaining)
            except TimeoutError as exc:
                if not handle.done():  # this wait's time is up, not a stage's error
                    self._handles = handles
                    raise
                first_error = first_error or exc
            except Exception as exc:
                first_error = first_error or exc
        while self._populating:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._populating[0].join(remaining)
            if self._populating[0].is_alive():
                raise TimeoutError(f"copies of run {self.run!r} not done after {timeout} s")
            self._populating.pop(0)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._pipeline.wait_idle(remaining):
            raise TimeoutError(f"background work of run {self.run!r} not done after {timeout} s")
        if first_error is not None:
            raise first_error

    # -- restoring ---------------------------------------------------------------------------

    def restore(self, target: Any = None, *, step: int | None = None, strict: bool = True,
                allow_pickle: bool | None = None,
                populate: bool = False) -> tuple[int, Any]:  # fmt: skip
        """``(step, state)`` of the newest complete step (or ``step``) whose copy verifies.

        Without ``target`` the saved tree comes back with numpy arrays. With one, its arrays
        are filled in place (JAX arrays, immutable: new ones with the target's shardings),
        its stateful objects get ``load_state_dict``, and the tree returned has the target's
        structure. ``strict=False`` restores the keys both share. With ``populate``, a step
        from a slower tier is copied into this rank's faster tiers in the background
        (``wait()`` waits for it). When the ranks agree on an older step than this rank
        holds, the next save removes the newer ones: training resumed from the older."""
        self._check_open()
        started = time.monotonic()
        self._follow_job()
        try:
            return self._restore(target, step, strict, allow_pickle, populate, started)
        finally:
            self._coordinator.release()

    def _follow_job(self) -> None:
        """After an in-process restart (the job's process group replaced), node commits
        still waiting for a node-mate are given up (it died, or restarts and restores) and
        the ranks agree through the new group."""
        if self._coordinator.current():
            self._pipeline.wait_memory_idle()
            return
        self._pipeline.give_up_node_waits("the job's process group was replaced")
        self._coordinator = coordination.for_job(self.world_size, self._collective_timeout)
        self._restorer.coordinator = self._coordinator

    def _restore(self, target, step, strict, allow_pickle, populate, started) -> tuple[int, Any]:
        if self._peers is not None:  # fetches a replacement node's shards from the peers
            known = self._peers.recover()  # the daemons' view: ranks agree through it
            if known is not None:
                self._coordinator.learn_complete(*known)
        allow_pickle = self.allow_pickle if allow_pickle is None else allow_pickle
        holders = {
            storage.name: set(self._committed(storage, any_rank=True)) for _, storage in self._tiers
        }
        candidates = self._restorer.candidates(holders, step)
        undo: list[Callable[[], None]] = []  # reverts stateful targets prepared for the restore
        try:
            restored, state, storage = self._restorer.restore_newest(
                candidates, step, holders, target, strict, allow_pickle, started, undo
            )
        except BaseException:
            for revert in reversed(undo):
                revert()
            raise
        if populate and storage is not self._tiers[0][1]:  # copied into the faster tiers
            verdicts = {name: v.record for name, v in self._verdicts.items()}
            args = (self.run, restored, self.rank, self.world_size, self.node_ranks, verdicts)
            self._populating.append(populating.start(storage, [s for _, s in self._tiers], *args))
        return restored, state

    # -- inspecting and removing -----------------------------------------------------------

    def steps(self) -> dict[str, list[int]]:
        """Complete steps holding this rank's shard, per tier, ascending ("peers": those
        every peer chosen by the daemon holds)."""
        self._check_open()
        steps = {storage.name: self._committed(storage) for _, storage in self._tiers}
        if self._replicating:
            steps["peers"] = self._peers.replicated_steps()
        return steps

    def latest_step(self) -> int | None:
        """The newest step complete in any tier, or None."""
        return max(
            (s for _, storage in self._tiers for s in self._committed(storage)), default=None
        )

    def _rewind(self, step: int) -> None:
        """Training resumed from the step the ranks agreed on (0: none), older than this
        rank's newest (another node lost newer ones): those go before ``step`` does."""
        after = self._restorer.agreed
        newer = sorted({s for _, t in self._tiers for s in t.steps(self.run) if s > after})
        log.warning("step %d follows the restored step %d: removing this rank's steps %s, "
                    "saved before", step, after, newer)  # fmt: skip
        for old in newer:
            self.delete(old)
        self._restorer.agreed = None

    def delete(self, step: int) -> None:
        """Remove ``step`` (this rank's shard, and its commit) from every tier;
        StepNotFoundError if no tier holds it."""
        self._check_open()
        step = naming.check_step(step)
        self.wait()
        holding = [storage for _, storage in self._tiers if step in storage.steps(self.run)]
        if not holding:
            raise StepNotFoundError(
                f"cannot delete step {step} of run {self.run!r}: no tier holds it (looked in "
                f"{self._where()})"
            )
        for storage in holding:
            retention.remove_rank_files(storage, self.run, step, self.rank, self.world_size)
        self._newest = self.latest_step()

    # -- lifetime ----------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Finish all pending work, stop the background threads and release the memory slots.

        Raises the first error of the pending work, after everything is shut down. With
        ``timeout``, the work not done by then is abandoned (steps not yet committed in a
        tier stay uncommitted there; what is under way finishes) and TimeoutError raised."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait(timeout)
        except TimeoutError:
            self._pipeline.abandon()
            if self._peers is not None:
                self._peers.abandon()
            raise
        finally:
            self._pipeline.close()
            self._release()

    def _release(self) -> None:
        """Stop the upload helper, close the storages and the daemon link."""
        if self._uploader is not None:
            self._uploader.close()
        for _, storage in self._tiers:
            storage.close()
        if self._peers is not None:
            self._peers.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except Exception as close_error:  # do not mask the error that ended the block
            if exc_type is None:
                raise
            log.error("closing the checkpoint manager failed: %s", close_error)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"the CheckpointManager of run {self.run!r} is closed")

    def _where(self) -> str:
        return self._restorer.where

    def __repr__(self) -> str:
        return (
            f"CheckpointManager(run={self.run!r}, rank={self.rank}/{self.world_size}, "
            f"tiers=[{self._where()}])"
        )
