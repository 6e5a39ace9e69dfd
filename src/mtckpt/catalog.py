"""What a tier holds, whole steps across every rank: listing, verifying, copying and
removing checkpoints. The operator's view (``mtckpt ls | verify | restore | gc``); the
manager's is one rank's."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from . import incremental, tiercopy
from .errors import CorruptCheckpointError, StepNotFoundError
from .format import commit, naming
from .format.manifest import RankManifest
from .restore import read as restore
from .tiers.base import FileStat, Storage

VERIFY_WINDOW = 64 << 20  # bytes checked between two progress reports

log = logging.getLogger(__name__)

COMPLETE, INCOMPLETE, DAMAGED = "complete", "incomplete", "damaged"


@dataclass(frozen=True)
class StepInfo:
    """One step of a run on one tier. ``ranks``: the ranks whose shard is whole there;
    ``committed_ranks``: those its COMMIT names (a node-local tier commits the node's
    ranks only). ``status``: complete (committed, every committed rank present),
    incomplete (not committed: a save under way, or one that died) or damaged (committed
    but the COMMIT marker or a manifest does not parse, a committed rank's shard is
    missing, or a data file is not the size its manifest records: ``problems`` says
    which). Complete is read from the listing and manifests alone: a flipped byte shows
    only in :func:`verify`. ``references``: the older steps whose data objects hold some
    of its chunks (a step stored incrementally; retention keeps them while it stays)."""

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
    references: tuple[int, ...] = ()  # steps holding chunks of this one (incremental)

    def to_json(self) -> dict:
        return {"tier": self.tier, "run": self.run, "step": self.step, "status": self.status,
                "world_size": self.world_size, "ranks": list(self.ranks),
                "committed_ranks": list(self.committed_ranks), "bytes": self.bytes,
                "modified": self.modified, "problems": list(self.problems),
                "references": list(self.references)}  # fmt: skip


def step_info(storage: Storage, run: str, step: int) -> StepInfo:
    """What ``storage`` holds of ``step``, from its file listing, COMMIT and manifests
    (no data is read): the one decision whether a step is complete, for ``ls``, ``gc``
    and retention alike."""
    return read_step(storage, run, step)[0]


def read_step(
    storage: Storage, run: str, step: int, stats: dict[str, FileStat] | None = None
) -> tuple[StepInfo, list[RankManifest]]:
    """:func:`step_info`, and the manifests that parse, by rank; ``stats``: the step's
    listing (:meth:`Storage.stat_files`) if the caller has it."""
    stats = storage.stat_files(run, step) if stats is None else stats
    files = list(stats)
    problems: list[str] = []
    world, committed_ranks = None, ()
    if naming.COMMIT in files:
        try:
            world, committed_ranks = commit.read_marker(storage, run, step)
            if not committed_ranks:
                problems.append(f"{naming.COMMIT} names no rank")
        except FileNotFoundError:
            files.remove(naming.COMMIT)  # removed since the listing
        except CorruptCheckpointError as exc:
            problems.append(str(exc))
    committed = naming.COMMIT in files
    found = _manifests_found(storage, run, step, files, problems)
    for manifest in found:
        world = world or manifest.world_size
        problems += _size_problems(storage, manifest, stats)
    ranks = [m.rank for m in found]
    size = sum(m.stored.size if m.stored is not None else m.file_size for m in found)
    missing = sorted(set(committed_ranks) - set(ranks))
    if committed and missing:
        problems.append(f"committed rank(s) {missing} have no manifest")
    status = INCOMPLETE if not committed else DAMAGED if problems else COMPLETE
    named = [name for name in files if naming.parse_rank_file(name) is not None]
    stamp = naming.COMMIT if committed else next(iter(named), None)  # temp files have none
    info = StepInfo(
        tier=storage.name, run=run, step=step, status=status, world_size=world,
        ranks=tuple(ranks), committed_ranks=committed_ranks, bytes=size,
        modified=stats[stamp].modified if stamp else None, problems=tuple(problems),
        references=tuple(sorted(set().union(*(incremental.references(m) for m in found)))),
    )  # fmt: skip
    return info, found


def _manifests_found(
    storage: Storage, run: str, step: int, files: list[str], problems: list[str]
) -> list[RankManifest]:
    """The manifests among ``files`` that parse, by rank; each one that does not is a
    problem."""
    found = []
    for name in files:
        parsed = naming.parse_rank_file(name)
        if parsed is None or parsed[1] != "json":
            continue
        try:
            found.append(restore.read_manifest(storage, run, step, parsed[0]))
        except (CorruptCheckpointError, FileNotFoundError) as exc:
            problems.append(str(exc))
    return sorted(found, key=lambda m: m.rank)


def _size_problems(
    storage: Storage, manifest: RankManifest, stats: dict[str, FileStat]
) -> list[str]:
    """Whether ``manifest``'s data file is there with the size it records (as stored)."""
    where = f"{storage.describe()}: step {manifest.step} {manifest.data_file}"
    wanted = manifest.stored.size if manifest.stored is not None else manifest.file_size
    stat = stats.get(manifest.data_file)
    if stat is None:
        return [f"{where}: the data file is missing"]
    if stat.size != wanted:
        return [f"{where}: {stat.size} bytes, the manifest records {wanted}"]
    return []


def listing(storage: Storage, run: str | None = None) -> list[StepInfo]:
    """Every step of ``run`` (default: of every run) on ``storage``, by run and step."""
    runs = [naming.check_run(run)] if run is not None else storage.runs()
    return [step_info(storage, r, step) for r in runs for step in storage.steps(r)]


def verify(storage: Storage, run: str, step: int, threads: int = 1,
           progress: Callable[[int], None] | None = None) -> tuple[int, list[str]]:  # fmt: skip
    """Check every chunk's crc32c of every shard of ``step`` on ``storage``: the bytes
    checked and the problems found (none: the step is good there). ``progress(n)``: n
    more bytes checked."""
    info, manifests_found = read_step(storage, run, step)
    problems = list(info.problems)
    if info.status == INCOMPLETE:
        problems.append("not committed")
    checked = 0
    for manifest in manifests_found:
        try:
            verify_shard(storage, manifest, threads, progress)
        except (CorruptCheckpointError, OSError) as exc:
            problems.append(str(exc))
            continue
        checked += manifest.file_size
    return checked, problems


def verify_shard(storage: Storage, manifest: RankManifest, threads: int = 1,
                 progress: Callable[[int], None] | None = None) -> None:  # fmt: skip
    """Read ``manifest``'s whole data file from ``storage`` and check every chunk's crc32c
    (``progress(n)`` after each window of n bytes). Raises CorruptCheckpointError
    (ChecksumMismatchError for bad bytes) if the copy is damaged, OSError if it cannot be
    read now."""
    where = f"{storage.describe()}: run {manifest.run} step {manifest.step} rank {manifest.rank}"
    data = restore.open_data(storage, manifest, where, threads)
    window = max(1, VERIFY_WINDOW // manifest.chunk_size) * manifest.chunk_size
    try:
        with memoryview(data).cast("B") as view:
            for lo in range(0, view.nbytes, window):
                with view[lo : lo + window] as piece:
                    first = lo // manifest.chunk_size
                    tiercopy.check_chunks(piece, manifest, first, where, threads)
                    if progress is not None:
                        progress(piece.nbytes)
    finally:
        restore.close_mapping(data)


def newest_complete(storage: Storage, run: str) -> list[int]:
    """Complete steps of ``run`` on ``storage`` (:func:`step_info`), newest first."""
    steps = reversed(storage.steps(run))
    return [step for step in steps if step_info(storage, run, step).status == COMPLETE]


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
    info, found = read_step(storage, run, step)
    if info.status == INCOMPLETE and not info.ranks:
        raise StepNotFoundError(f"{storage.describe()}: run {run} has no step {step}")
    return found
