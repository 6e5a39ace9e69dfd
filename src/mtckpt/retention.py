"""Garbage collection: expired steps, incomplete steps, and leftovers of crashed writers.

Several ranks may share one storage (a node's memory or disk). Each rank removes only its
own files (and files of ranks outside the current world); whoever comes first removes
``COMMIT``, which is always removed before any shard so a step is never seen committed
with a shard missing. The memory tier turns a rank's data files back into slots.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from . import commit, naming
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


def apply(
    storage: Storage,
    run: str,
    rank: int,
    world_size: int,
    keep: int,
    protected: Collection[int] = (),
    keep_every: int | None = None,
) -> list[int]:
    """Remove the steps :func:`due` names, sparing ``protected`` steps; returns the steps
    removed."""
    expired, stale = due(storage, run, keep, keep_every)
    removed = sorted((set(expired) | set(stale)) - set(protected))
    for step in removed:
        remove_rank_files(storage, run, step, rank, world_size)
    if removed:
        log.debug("%s: removed steps %s of run %r", storage.describe(), removed, run)
    return removed


def apply_or_log(
    storage: Storage, run: str, rank: int, world_size: int, keep: int,
    keep_every: int | None = None,
) -> None:  # fmt: skip
    """:func:`apply` after a step was written to a slower tier; a failure is logged, never
    raised: garbage collection failing must not stop checkpointing (the next step retries)."""
    try:
        apply(storage, run, rank, world_size, keep, keep_every=keep_every)
    except Exception as exc:
        log.warning("%s tier: garbage collection failed: %s", storage.name, exc)


def due(
    storage: Storage, run: str, keep: int, keep_every: int | None = None
) -> tuple[list[int], list[int]]:
    """The steps garbage collection removes, ascending: committed steps beyond the newest
    ``keep`` (except multiples of ``keep_every``: kept for the long term), and incomplete
    steps older than the newest committed one (newer ones may be a save under way). The
    newest committed step is never among them."""
    committed = commit.committed_steps(storage, run)
    if not committed:
        return [], []
    expired = [s for s in committed[:-keep] if not keep_every or s % keep_every]
    stale = [s for s in storage.steps(run) if s < committed[-1] and s not in committed]
    return expired, stale


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
