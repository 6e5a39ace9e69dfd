"""The newest step every rank can restore: the steps to try, newest first, agreed by the
ranks; for each, every rank verifies its part in the fastest tier with a good copy (a
damaged one is decommitted and the next tier tried), and only once every rank has a
good copy does any byte land in the target. The manager's restore runs it; its caller
reverts what prepared stateful targets (``undo``) should it raise."""

from __future__ import annotations

import logging
import time
from typing import Any

from .. import arrays, coordination, tree
from ..errors import CorruptCheckpointError, StateMismatchError, StepNotFoundError
from ..format import commit, naming
from ..metrics import Metrics
from ..tiers.base import Storage
from . import read, reshard

log = logging.getLogger(__name__)

MAX_LISTED_KEYS = 20  # in a StateMismatchError


class Restorer:
    """Restoring one rank's part of a run from ``storages`` (fastest first)."""

    def __init__(self, run: str, rank: int, world_size: int, storages: list[Storage],
                 coordinator: coordination.Coordinator, metrics: Metrics,
                 threads: int) -> None:  # fmt: skip
        self.run, self.rank, self.world_size = run, rank, world_size
        self.storages, self.coordinator = storages, coordinator
        self.metrics, self.threads = metrics, threads
        self.where = ", ".join(storage.describe() for storage in storages)
        # The step the ranks' last restore without a step number agreed on (0: none; they
        # start over): this rank's newer steps are from before it (the manager's _rewind).
        self.agreed: int | None = None

    def _everyone(self) -> str:
        return "every rank" if self.world_size > 1 else f"rank {self.rank}"

    def candidates(self, holders: dict[str, set[int]], step: int | None) -> list[int]:
        """The steps to try, newest first: ``step`` alone, or every step all ranks hold."""
        held = set().union(*holders.values())
        shared = set().union(*(holders.get(s.name, ()) for s in self.storages if s.shared))
        agreed = self.coordinator.agree(sorted(held), step, sorted(shared))
        note = f" (this rank holds {sorted(held, reverse=True)[:10] or 'none'})"
        self.agreed = 0 if step is None and not agreed else None
        return steps_to_try(agreed, step, self.run, f"{self._everyone()} in {self.where}", note)

    def restore_newest(self, candidates, step, holders, target, strict, allow_pickle,
                        started, undo) -> tuple[int, Any, Storage]:  # fmt: skip
        """Restore the first of ``candidates`` that every rank verifies: ``(step, state, the
        storage it came from)``. Each rank checks its part first; only once all ranks found a
        good copy does any byte go into ``target``, so a step that fails anywhere leaves the
        target as it was."""
        storages = self.storages
        problems: list[str] = []
        for candidate in candidates:
            files = reshard.StepFiles(storages, self.run, candidate)
            verified = None
            try:
                outcome, loaded = self._load_step(candidate, files, holders, target, strict,
                                                  allow_pickle, problems, undo)  # fmt: skip
                if outcome.status == coordination.OK:
                    storage, node, verified, targets, size = loaded
                outcomes = self.coordinator.settle(candidate, outcome)
                if outcome.status == coordination.FATAL:
                    raise loaded
                coordination.raise_for_others(candidate, outcomes, self.rank)
                if any(o.status != coordination.OK for o in outcomes):
                    failed = [r for r, o in enumerate(outcomes) if o.status != coordination.OK]
                    log.warning("step %d has no good copy on rank(s) %s; trying an older step",
                                candidate, failed)  # fmt: skip
                    continue
                values = verified.fill()
            finally:
                if verified is not None:
                    verified.close()
                files.close()
            self.metrics.restore_seconds.observe(time.monotonic() - started, tier=storage.name)
            self.metrics.bytes_read.inc(size, tier=storage.name)
            if candidate != candidates[0]:
                log.warning(
                    "restored step %d from the %s tier: no good copy of newer step(s) %s",
                    candidate,
                    storage.name,
                    [s for s in candidates if s > candidate],
                )
            else:
                log.info("restored step %d from the %s tier", candidate, storage.name)
            self.agreed = candidate if step is None else None
            return candidate, tree.unflatten(node, {**targets, **values}.__getitem__), storage
        which = f"step {step}" if step is not None else "any step"
        raise CorruptCheckpointError(
            f"no good copy of {which} of run {self.run!r} for {self._everyone()}: "
            + "; ".join(problems)
        )

    def _load_step(self, step, files, holders, target, strict, allow_pickle, problems, undo):
        """Verify this rank's part of ``step`` in the fastest tier with a good copy:
        ``(Outcome, (storage, node, verified values, targets, bytes of the rank's file))``,
        or the error for RETRY / FATAL. Nothing goes into ``target`` yet (the verified
        values' ``fill`` does that); what prepares a stateful target goes in ``undo``.

        The rank reads its own file; a rank the saved world did not have reads rank 0's.
        Whatever the target holds that is not exactly a piece of that file (other shard
        regions after a change of world size or placements) is assembled from every
        rank's file of the step on this node (``files``)."""
        for storage in copies(step, files.storages, holders):
            try:
                saved_world = commit.saved_world_size(storage, self.run, step)
                base = self.rank if self.rank < saved_world else 0
                manifest = read.read_manifest(storage, self.run, step, base)
                node, targets = graft_target(target, manifest, undo)
                skip = self._check_plan(manifest, node, targets, strict, allow_pickle,
                                        has_target=target is not None)  # fmt: skip
                verified = reshard.verify_values(files, storage, manifest, targets, skip,
                                                 self.threads)  # fmt: skip
            except CorruptCheckpointError as exc:
                self.metrics.checksum_failures.inc(tier=storage.name)
                reason = str(exc)  # not the error: its traceback holds the data file mapped
                problems.append(reason)
                log.warning("%s; trying the next copy", reason)
                commit.decommit(storage, self.run, step, reason)
                continue
            except Exception as exc:  # no other copy or step can fix it: every rank stops
                return coordination.Outcome(coordination.FATAL, str(exc)), exc
            loaded = (storage, node, verified, targets, manifest.file_size)
            return coordination.Outcome(coordination.OK), loaded
        reason = f"rank {self.rank} has no good copy of step {step}"
        return coordination.Outcome(coordination.RETRY, reason), None

    def _check_plan(self, manifest, node, targets, strict, allow_pickle, has_target) -> set[str]:
        """Raise StateMismatchError where the target cannot take the saved state; returns
        the saved keys not to read (not in a non-strict target)."""
        saved = {record.key: record for record in manifest.leaves}
        skip: set[str] = set()
        if has_target:
            wanted = set(node.leaf_keys())
            missing = [key for key in targets if key not in saved]
            unexpected = [key for key in saved if key not in wanted]
            if strict and (missing or unexpected):
                raise StateMismatchError(
                    f"step {manifest.step} of run {self.run!r} and the restore target differ: "
                    f"keys missing from the checkpoint: {listing(missing)}; keys not in the "
                    f"target: {listing(unexpected)}; pass strict=False to restore the keys "
                    "they share"
                )
            skip = set(unexpected)
        for key, record in saved.items():
            if key not in skip:
                read.check_target(record, targets.get(key), allow_pickle)
        return skip


def steps_to_try(complete: list[int], step: int | None, run: str, who: str,
                 note: str = "") -> list[int]:  # fmt: skip
    """The rule of every restore, the library's and the CLI's: ``step`` alone, else every
    step of ``complete`` (newest first); StepNotFoundError naming ``who`` (whose copies,
    where) when ``step`` is not complete or nothing is."""
    if step is not None:
        step = naming.check_step(step)
        if step not in complete:
            raise StepNotFoundError(
                f"step {step} of run {run!r} is not complete for {who}; complete steps: "
                f"{complete[:10] or 'none'}{note}"
            )
        return [step]
    if not complete:
        raise StepNotFoundError(f"no checkpoint of run {run!r} is complete for {who}{note}")
    return complete


def copies(step: int, storages: list[Storage], holders: dict[str, set[int]]) -> list[Storage]:
    """Where a restore reads ``step`` from, in order: the storages (fastest first) whose
    ``holders`` entry has it complete. The next is tried when a copy turns out damaged."""
    return [storage for storage in storages if step in holders[storage.name]]


def graft_target(target: Any, manifest, undo: list) -> tuple[tree.Node, dict[str, Any]]:
    """The structure to rebuild and the target's leaves by key. Stateful objects whose
    empty state the checkpoint fills are first prepared by their framework (a torch
    optimizer gets its state, shaped and sharded like its parameters); what reverts that,
    should the restore fail, goes in ``undo``."""
    if target is None:
        return manifest.tree, {}
    node, leaves = tree.flatten(target, as_target=True)
    filled: list = []
    grafted = tree.graft(node, manifest.tree, filled)
    reverts = [revert for revert in map(arrays.prepare_target, filled) if revert is not None]
    undo.extend(reverts)
    if reverts:
        node, leaves = tree.flatten(target, as_target=True)
        grafted = tree.graft(node, manifest.tree)
    return grafted, {leaf.key: leaf.value for leaf in leaves}


def listing(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:MAX_LISTED_KEYS])
    more = f" and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else ""
    return f"[{shown}{more}]" if keys else "none"
