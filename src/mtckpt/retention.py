"""Garbage collection: expired steps, damaged and incomplete steps, and leftovers of
crashed writers.

Retention never removes the last good copy of a run on a tier. Only complete steps
(:func:`mtckpt.catalog.step_info`: COMMIT parses, the manifests of the ranks it names are
valid, every data file has its recorded size) count toward ``keep``; a damaged step is
removed first and never counts. A step beyond the newest ``keep`` is removed only once the
newest complete step has passed checksum verification on that tier (this rank's shard; a
step that fails is damaged, and the next older one is considered). :class:`Verdicts`
remembers what was verified, so retention after every step reads no data. A step stored
incrementally holds some of its chunks in older steps' data objects: those steps (and
theirs) stay as long as a step that refers to them does.

Several ranks may share one storage (a node's memory or disk). Each rank removes only its
own files (and files of ranks outside the current world); whoever comes first removes
``COMMIT``, which is always removed before any shard so a step is never seen committed
with a shard missing. The memory tier turns a rank's data files back into slots.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from . import catalog
from .errors import CorruptCheckpointError, FormatVersionError
from .format import commit, naming
from .format.manifest import RankManifest
from .restore import read as restore
from .tiers.base import Storage

log = logging.getLogger(__name__)


def remove_rank_files(storage: Storage, run: str, step: int, rank: int, world_size: int) -> None:
    """Uncommit ``step`` and remove this rank's files there (and those of departed ranks)."""
    storage.delete(run, step, naming.COMMIT)
    recycle = getattr(storage, "recycle", None)
    for name in storage.files(run, step):
        owner = naming.rank_of_file(name)
        if naming.temp_target(name) == naming.COMMIT:
            storage.delete(run, step, name)  # a commit marker some writer never finished
            continue
        if owner is None or (owner != rank and owner < world_size):
            continue
        if recycle is not None and owner == rank and name == naming.data_file(rank):
            recycle(run, step, rank)
        else:
            storage.delete(run, step, name)
    storage.remove_step_dir(run, step)


@dataclass(frozen=True)
class Removal:
    step: int
    reason: str


class Verdicts:
    """What this process knows of one storage's steps, so that retention, which runs after
    every step, reads no data in the steady state: each step's reading
    (:func:`catalog.read_step`, reused while the step's listing is unchanged) and the shards
    known to pass checksum verification there, recorded by whoever checked every chunk (the
    memory tier's commit, a verified copy to a slower tier) or by a verification here.

    On the object tier this means a shard is downloaded for verification only when a
    removal depends on it (a step beyond ``keep`` is due and the newest complete step's
    shard of this rank was neither uploaded nor verified by this process), and then once
    per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._steps: dict[tuple[str, int], tuple[dict, tuple | None]] = {}
        self._good: dict[tuple[str, int, int], tuple] = {}

    def record(self, manifest: RankManifest) -> None:
        """``manifest``'s shard is good on this storage: its every chunk was just checked."""
        with self._lock:
            self._good[manifest.run, manifest.step, manifest.rank] = _identity(manifest)

    def read(self, storage: Storage, run: str, step: int) -> tuple[catalog.StepInfo, dict] | None:
        """The step's :class:`catalog.StepInfo` and each shard's identity, by rank; None for
        a step written in a newer format (neither counted nor removed: a newer mtckpt's)."""
        stats = storage.stat_files(run, step)
        with self._lock:
            cached = self._steps.get((run, step))
        if cached is not None and cached[0] == stats:
            return cached[1]
        try:
            info, manifests = catalog.read_step(storage, run, step, stats)
            known = info, {m.rank: _identity(m) for m in manifests}
        except FormatVersionError as exc:
            log.warning("%s: run %r step %d is left alone: %s", storage.describe(), run, step,
                        exc)  # fmt: skip
            known = None
        with self._lock:
            self._steps[run, step] = (stats, known)
        return known

    def is_good(self, run: str, step: int, rank: int, identity: tuple) -> bool:
        with self._lock:
            return self._good.get((run, step, rank)) == identity

    def forget(self, run: str, present: Collection[int]) -> None:
        """Drop what is known of ``run``'s steps gone from the listing ``present`` (not of
        newer ones: a step may have been written and recorded since the listing)."""
        newest = max(present, default=-1)
        with self._lock:
            for known in (self._steps, self._good):
                gone = [k for k in known if k[0] == run and k[1] < newest and k[1] not in present]
                for key in gone:
                    del known[key]


def _identity(manifest: RankManifest) -> tuple:
    """What a verdict is about: the data file a manifest describes."""
    return manifest.file_size, manifest.chunk_size, manifest.chunk_crc32c


def plan(
    storage: Storage,
    run: str,
    keep: int,
    keep_every: int | None = None,
    *,
    rank: int | None = None,
    verdicts: Verdicts | None = None,
    threads: int = 1,
    progress: Callable[[int], None] | None = None,
) -> list[Removal]:
    """What garbage collection removes of ``run`` on ``storage``, by step: damaged steps,
    incomplete steps older than the newest committed one (newer ones may be a save under
    way), and complete steps beyond the newest ``keep`` complete (except multiples of
    ``keep_every``: kept for the long term). Those last only once the newest complete step
    passes checksum verification (``rank``'s shard; for ``rank=None``, the operator's
    view, every shard); one that fails is damaged, and the next older complete step is
    considered. The newest complete step that verifies is never among them; if
    it cannot be read now, no complete step is."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    verdicts = Verdicts() if verdicts is None else verdicts
    steps = storage.steps(run)
    known = {step: verdicts.read(storage, run, step) for step in steps}
    known = {step: found for step, found in known.items() if found is not None}
    verdicts.forget(run, steps)
    failed: dict[int, str] = {}
    while True:
        removals, kept, expired = _classify(known, keep, keep_every, failed)
        if not expired:
            return removals
        newest = kept[0]
        problem = _verify_newest(storage, run, newest, known[newest], rank, verdicts, threads,
                                 progress)  # fmt: skip
        if problem is None:  # cannot tell now: nothing that depends on it goes
            return removals
        if not problem:
            reason = f"beyond the newest {keep} complete (step {newest} verified)"
            return sorted(removals + [Removal(s, reason) for s in expired], key=_by_step)
        log.warning("%s: run %r step %d fails checksum verification (damaged; the next "
                    "older step is considered): %s", storage.describe(), run, newest,
                    problem)  # fmt: skip
        failed[newest] = problem


def _by_step(removal: Removal) -> int:
    return removal.step


def _classify(
    known: dict[int, tuple[catalog.StepInfo, dict]],
    keep: int,
    keep_every: int | None,
    failed: dict[int, str],
) -> tuple[list[Removal], list[int], list[int]]:
    """The removals that need no verification (damaged and stale steps), the complete
    steps counted toward ``keep`` (newest first), and the complete steps beyond them."""
    removals, kept, expired = [], [], []
    committed = [s for s, (info, _) in known.items() if info.status != catalog.INCOMPLETE]
    newest_committed = max(committed, default=None)
    for step in sorted(known, reverse=True):
        info = known[step][0]
        if step in failed or info.status == catalog.DAMAGED:
            problems = [failed[step]] if step in failed else info.problems
            removals.append(Removal(step, f"damaged: {'; '.join(problems)}"))
        elif info.status == catalog.INCOMPLETE:
            if newest_committed is not None and step < newest_committed:
                removals.append(Removal(step, "incomplete, older than the newest complete step"))
        elif len(kept) < keep:
            kept.append(step)
        elif not keep_every or step % keep_every:
            expired.append(step)
    staying = set(known) - {r.step for r in removals} - set(expired)
    needed = _referenced(known, staying)
    removals = [r for r in removals if r.step not in needed]
    return sorted(removals, key=_by_step), kept, [s for s in expired if s not in needed]


def _referenced(known: dict[int, tuple[catalog.StepInfo, dict]], steps: set[int]) -> set[int]:
    """The steps holding chunks of ``steps``, and those holding chunks of these, ..."""
    found: set[int] = set()
    todo = list(steps)
    while todo:
        step = todo.pop()
        for held_by in known[step][0].references if step in known else ():
            if held_by not in found:
                found.add(held_by)
                todo.append(held_by)
    return found


def _verify_newest(
    storage: Storage,
    run: str,
    step: int,
    known: tuple[catalog.StepInfo, dict],
    rank: int | None,
    verdicts: Verdicts,
    threads: int,
    progress: Callable[[int], None] | None = None,
) -> str | None:
    """'' if ``step``'s shards pass checksum verification on ``storage`` (known from
    ``verdicts``, else read now), the problem if one does not, None if one cannot be read
    now. The shards: ``rank``'s; for a rank the step has none of (a new world size), the
    one its rank picks, so that the ranks of a larger world share the work; for None,
    every one."""
    shards = known[1]
    if rank is None:
        ranks = sorted(shards)
    else:
        ranks = [rank] if rank in shards else sorted(shards)[rank % len(shards) :][:1]
    for shard_rank in ranks:
        if verdicts.is_good(run, step, shard_rank, shards[shard_rank]):
            continue
        log.info("%s: verifying run %r step %d rank %d before removing older steps",
                 storage.describe(), run, step, shard_rank)  # fmt: skip
        try:
            manifest = restore.read_manifest(storage, run, step, shard_rank)
            catalog.verify_shard(storage, manifest, threads, progress)
        except CorruptCheckpointError as exc:
            return str(exc)
        except OSError as exc:
            log.warning("%s: cannot verify run %r step %d, so no older step is removed now: "
                        "%s", storage.describe(), run, step, exc)  # fmt: skip
            return None
        verdicts.record(manifest)
    return ""


def apply(
    storage: Storage,
    run: str,
    rank: int,
    world_size: int,
    keep: int,
    protected: Collection[int] = (),
    keep_every: int | None = None,
    verdicts: Verdicts | None = None,
    threads: int = 1,
) -> list[int]:
    """Remove this rank's files of the steps :func:`plan` names, sparing ``protected``
    steps; returns the steps removed. ``verdicts``: what this process knows of
    ``storage`` (none: a step is verified before older ones go)."""
    removals = plan(storage, run, keep, keep_every, rank=rank, verdicts=verdicts,
                    threads=threads)  # fmt: skip
    removed = []
    for removal in removals:
        if removal.step in protected:
            continue
        if removal.reason.startswith("damaged"):
            log.warning("%s: removing run %r step %d: %s", storage.describe(), run,
                        removal.step, removal.reason)  # fmt: skip
        remove_rank_files(storage, run, removal.step, rank, world_size)
        removed.append(removal.step)
    if removed:
        log.debug("%s: removed steps %s of run %r", storage.describe(), removed, run)
    return removed


def apply_or_log(
    storage: Storage, run: str, rank: int, world_size: int, keep: int,
    keep_every: int | None = None, verdicts: Verdicts | None = None, threads: int = 1,
) -> None:  # fmt: skip
    """:func:`apply` after a step was written to a slower tier; a failure is logged, never
    raised: garbage collection failing must not stop checkpointing (the next step retries)."""
    try:
        apply(storage, run, rank, world_size, keep, keep_every=keep_every, verdicts=verdicts,
              threads=threads)  # fmt: skip
    except Exception as exc:
        log.warning("%s tier: garbage collection failed: %s", storage.name, exc)


def clean_after_crash(storage: Storage, run: str, rank: int, world_size: int) -> None:
    """At start-up, before this rank writes anything: remove its temporary files, unfinished
    commit markers of committed steps, and its shards of steps that never committed (a
    previous process of this rank died writing them).
    """
    for step in storage.steps(run):
        if not commit.is_committed(storage, run, step):
            remove_rank_files(storage, run, step, rank, world_size)
            continue
        for name in storage.files(run, step):
            target = naming.temp_target(name)
            if target == naming.COMMIT or (target and naming.rank_of_file(name) == rank):
                storage.delete(run, step, name)


def start_up(storage: Storage, run: str, rank: int, world_size: int, cfg: Any, *, clean: bool,
             verdicts: Verdicts, threads: int) -> None:  # fmt: skip
    """A manager's start on ``storage``: (``clean``: not a tier the node daemon writes too)
    clean up after a crashed predecessor, then apply the tier's retention (``cfg``'s keep),
    except on a shared tier with several ranks: there each upload applies it, where here
    each rank would read every rank's manifests of every step (ranks² reads)."""
    if clean:
        clean_after_crash(storage, run, rank, world_size)
        storage.clean_leftovers(run, rank)
    if storage.shared and world_size > 1:
        return
    apply(storage, run, rank, world_size, cfg.keep, keep_every=getattr(cfg, "keep_every", None),
          verdicts=verdicts, threads=threads)  # fmt: skip
