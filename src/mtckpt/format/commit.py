"""Whether a step is committed, and writing / removing the ``COMMIT`` marker.

A rank's shard exists once its manifest exists (the manifest is written after the data
file). ``COMMIT`` is written last, once every rank expected on that storage is present;
:func:`is_committed` says whether a step is committed; whether a committed step is whole
(its marker and manifests parse, its files have their recorded sizes) is
:func:`mtckpt.catalog.step_info`'s to say, for listing and garbage collection alike
(restore checks every chunk it reads).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import CorruptCheckpointError
from . import naming

if TYPE_CHECKING:  # the format is what tiers hold: it uses a storage, never imports tiers/
    from ..tiers.base import Storage

log = logging.getLogger(__name__)


def is_committed(storage: Storage, run: str, step: int) -> bool:
    return storage.exists(run, step, naming.COMMIT)


def committed_steps(storage: Storage, run: str, rank: int | None = None) -> list[int]:
    """Committed steps, ascending; with ``rank``, only those holding that rank's shard."""
    wanted = [naming.COMMIT] if rank is None else [naming.COMMIT, naming.manifest_file(rank)]
    listing = storage.files_by_step(run)
    return [step for step, files in sorted(listing.items()) if all(n in files for n in wanted)]


def ranks_present(storage: Storage, run: str, step: int) -> set[int]:
    """Ranks whose manifest (hence whole shard) is in the step."""
    return _ranks_of(storage.files(run, step))


def ranks_by_step(storage: Storage, run: str) -> dict[int, set[int]]:
    """The ranks whose shard is in each step of ``run`` on ``storage``."""
    return {step: _ranks_of(files) for step, files in storage.files_by_step(run).items()}


def _ranks_of(files: Iterable[str]) -> set[int]:
    ranks = set()
    for name in files:
        parsed = naming.parse_rank_file(name)
        if parsed is not None and parsed[1] == "json":
            ranks.add(parsed[0])
    return ranks


def try_commit(
    storage: Storage, run: str, step: int, world_size: int, expected_ranks: Iterable[int]
) -> bool:
    """Write ``COMMIT`` if every expected rank's shard is present; whether it was written.

    Several ranks may race to commit: each writes the same marker by atomic rename.
    """
    present = ranks_present(storage, run, step)
    if not set(expected_ranks) <= present:
        return False
    marker = {"run": run, "step": step, "world_size": world_size, "ranks": sorted(present)}
    storage.write_bytes(run, step, naming.COMMIT, json.dumps(marker).encode())
    return True


def saved_world_size(storage: Storage, run: str, step: int) -> int:
    """The world size a committed step was saved with, from its COMMIT marker."""
    try:
        return read_marker(storage, run, step)[0]
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{storage.describe()}: step {step} {naming.COMMIT}: the commit marker is gone"
        ) from None


def read_marker(storage: Storage, run: str, step: int) -> tuple[int, tuple[int, ...]]:
    """The world size and the ranks a step's COMMIT marker records. FileNotFoundError if
    there is none; CorruptCheckpointError if it does not parse."""
    where = f"{storage.describe()}: step {step} {naming.COMMIT}"
    raw = storage.read_bytes(run, step, naming.COMMIT)
    try:
        marker = json.loads(raw)
        world_size, ranks = marker["world_size"], marker["ranks"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(
            f"{where}: malformed commit marker ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise CorruptCheckpointError(f"{where}: world_size {world_size!r} is not a positive int")
    if not isinstance(ranks, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks
    ):
        raise CorruptCheckpointError(f"{where}: ranks {ranks!r} is not a list of ranks")
    return world_size, tuple(ranks)


def decommit(storage: Storage, run: str, step: int, reason: str) -> bool:
    """Mark a step incomplete on ``storage`` (its copy there is bad); GC removes it later.
    A storage that cannot be written (mounted read-only) keeps the step: that is logged,
    and restore goes on to the next copy all the same. Whether the mark was removed."""
    try:
        storage.delete(run, step, naming.COMMIT)
    except OSError as exc:
        log.warning("%s: step %d is damaged (%s) but cannot be marked incomplete there: %s",
                    storage.describe(), step, reason, str(exc))  # fmt: skip
        return False
    log.warning("%s: step %d is no longer committed there: %s", storage.describe(), step, reason)
    return True
