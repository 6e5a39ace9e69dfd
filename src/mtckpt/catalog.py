"""What a tier holds, whole steps across every rank: listing, verifying, copying and
removing checkpoints. The operator's view (``mtckpt ls | verify | restore | gc``); the
manager's is one rank's."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from . import commit, naming, restore, retention, tiercopy
from .errors import CorruptCheckpointError, StepNotFoundError
from .manifest import RankManifest
from .tiers.base import Storage

log = logging.getLogger(__name__)

COMPLETE, INCOMPLETE, DAMAGED = "complete", "incomplete", "damaged"


@dataclass(frozen=True)
class StepInfo:
    """One step of a run on one tier. ``ranks``: the ranks whose shard is whole there;
    ``committed_ranks``: those its COMMIT names (a node-local tier commits the node's
    ranks only). ``status``: complete (committed, every committed rank present),
    incomplete (not committed: a save under way, or one that died) or damaged (committed
    but a shard is missing or its manifest does not parse: ``problems`` says which)."""

    tier: str
    run: str
    step: int
    status: str
    world_size: int | None
    ranks: tuple[int, ...]
    committed_ranks: tuple[int, ...]
    bytes: int
    modified: float | None
    problems: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"tier": self.tier, "run": self.run, "step": self.step, "status": self.status,
                "world_size": self.world_size, "ranks": list(self.ranks),
                "committed_ranks": list(self.committed_ranks), "bytes": self.bytes,
                "modified": self.modified, "problems": list(self.problems)}  # fmt: skip


def step_info(storage: Storage, run: str, step: int) -> StepInfo:
    """What ``storage`` holds of ``step``, from its file listing, COMMIT and manifests
    (no data is read)."""
    return _read_step(storage, run, step)[0]


def _read_step(storage: Storage, run: str, step: int) -> tuple[StepInfo, list[RankManifest]]:
    """:func:`step_info`, and the manifests that parse, by rank."""
    files = storage.files(run, step)
    problems: list[str] = []
    world, committed_ranks = None, ()
    if naming.COMMIT in files:
        try:
            marker = json.loads(storage.read_bytes(run, step, naming.COMMIT))
            world, committed_ranks = int(marker["world_size"]), tuple(marker["ranks"])
        except FileNotFoundError:
            files.remove(naming.COMMIT)  # removed since the listing
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"malformed {naming.COMMIT} ({exc!r})")
    found: list[RankManifest] = []
    for name in files:
        parsed = naming.parse_rank_file(name)
        if parsed is None or parsed[1] != "json":
            continue
        try:
            manifest = restore.read_manifest(storage, run, step, parsed[0])
        except (CorruptCheckpointError, FileNotFoundError) as exc:
            problems.append(str(exc))
            continue
        found.append(manifest)
        world = world or manifest.world_size
    found.sort(key=lambda m: m.rank)
    ranks = [m.rank for m in found]
    size = sum(m.stored.size if m.stored is not None else m.file_size for m in found)
    committed = naming.COMMIT in files
    missing = sorted(set(committed_ranks) - set(ranks))
    if committed and missing:
        problems.append(f"committed rank(s) {missing} have no manifest")
    status = INCOMPLETE if not committed else DAMAGED if problems else COMPLETE
    named = [name for name in files if naming.parse_rank_file(name) is not None]
    stamp = naming.COMMIT if committed else next(iter(named), None)  # temp files have none
    info = StepInfo(
        tier=storage.name, run=run, step=step, status=status, world_size=world,
        ranks=tuple(ranks), committed_ranks=committed_ranks, bytes=size,
        modified=storage.modified(run, step, stamp) if stamp else None, problems=tuple(problems),
    )  # fmt: skip
    return info, found


def listing(storage: Storage, run: str | None = None) -> list[StepInfo]:
    """Every step of ``run`` (default: of every run) on ``storage``, by run and step."""
    runs = [naming.check_run(run)] if run is not None else storage.runs()
    return [step_info(storage, r, step) for r in runs for step in storage.steps(r)]


def verify(storage: Storage, run: str, step: int, threads: int = 1) -> tuple[int, list[str]]:
    """Check every chunk's crc32c of every shard of ``step`` on ``storage``: the bytes
    checked and the problems found (none: the step is good there)."""
    info, manifests_found = _read_step(storage, run, step)
    problems = list(info.problems)
    if info.status == INCOMPLETE:
        problems.append("not committed")
    checked = 0
    for manifest in manifests_found:
        where = f"{storage.describe()}: run {run} step {step} rank {manifest.rank}"
        try:
            data = restore.open_data(storage, manifest, where, threads)
            try:
                tiercopy.check_chunks(memoryview(data).cast("B"), manifest, 0, where, threads)
            finally:
                restore.close_mapping(data)
        except (CorruptCheckpointError, OSError) as exc:
            problems.append(str(exc))
            continue
        checked += manifest.file_size
    return checked, problems


def newest_complete(storage: Storage, run: str) -> list[int]:
    """Committed steps of ``run`` on ``storage``, newest first."""
    return sorted(commit.committed_steps(storage, run), reverse=True)


def copy_step(
    source: Storage,
    dest: Storage,
    run: str,
    step: int,
    ranks: list[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[int], int]:
    """Copy ``step``'s shards of ``ranks`` (default: every rank ``source`` holds) to
    ``dest``, each verified on the way, and commit it there for those ranks: the ranks
    copied and their bytes. CorruptCheckpointError names the first damaged shard."""
    info = step_info(source, run, step)
    if info.status != COMPLETE:
        raise CorruptCheckpointError(
            f"{source.describe()}: run {run} step {step} is {info.status}"
            + (f": {'; '.join(info.problems)}" if info.problems else "")
        )
    wanted = list(info.ranks) if ranks is None else sorted(ranks)
    absent = sorted(set(wanted) - set(info.ranks))
    if absent:
        raise StepNotFoundError(
            f"{source.describe()}: run {run} step {step} has no shard of rank(s) {absent} "
            f"(it holds ranks {list(info.ranks)})"
        )
    copied = 0
    for rank in wanted:
        copied += tiercopy.copy_shard(source, dest, run, step, rank, progress=progress)
    commit.try_commit(dest, run, step, info.world_size, wanted)
    return wanted, copied


@dataclass(frozen=True)
class Removal:
    step: int
    reason: str


def gc_plan(storage: Storage, run: str, keep: int, keep_every: int | None = None) -> list[Removal]:
    """What garbage collection removes on ``storage`` (:func:`retention.due`: the policy the
    trainers apply), with the reason for each step."""
    expired, stale = retention.due(storage, run, keep, keep_every)
    plan = [Removal(s, f"beyond the newest {keep} complete") for s in expired]
    plan += [Removal(s, "incomplete, older than the newest complete step") for s in stale]
    return sorted(plan, key=lambda r: r.step)


def remove_step(storage: Storage, run: str, step: int) -> None:
    """Remove every file of ``step`` (COMMIT first, so it is never seen committed with a
    shard gone)."""
    storage.delete(run, step, naming.COMMIT)
    for name in storage.files(run, step):
        storage.delete(run, step, name)
    if not storage.remove_step_dir(run, step):
        log.warning("%s: step %d of run %r: files left after removal", storage.describe(),
                    step, run)  # fmt: skip


def manifests(storage: Storage, run: str, step: int) -> list[RankManifest]:
    """Every rank's manifest of a step on ``storage``, by rank."""
    info, found = _read_step(storage, run, step)
    if info.status == INCOMPLETE and not info.ranks:
        raise StepNotFoundError(f"{storage.describe()}: run {run} has no step {step}")
    return found

