"""Whether a step is committed, and writing / removing the ``COMMIT`` marker.

A rank's shard exists once its manifest exists (the manifest is written after the data
file). ``COMMIT`` is written last, once every rank expected on that storage is present;
restore, listing and garbage collection all decide completeness with :func:`is_committed`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from . import naming
from .errors import CorruptCheckpointError
from .tiers.base import Storage

log = logging.getLogger(__name__)


def is_committed(storage: Storage, run: str, step: int) -> bool:
    return storage.exists(run, step, naming.COMMIT)


def committed_steps(storage: Storage, run: str, rank: int | None = None) -> list[int]:
    """Committed steps, ascending; with ``rank``, only those holding that rank's shard."""
    wanted = [naming.COMMIT] if rank is None else [naming.COMMIT, naming.manifest_file(rank)]
    steps = []
    for step in storage.steps(run):
        files = storage.files(run, step)  # one listing per step (one request on S3)
        if all(name in files for name in wanted):
            steps.append(step)
    return steps


def ranks_present(storage: Storage, run: str, step: int) -> set[int]:
    """Ranks whose manifest (hence whole shard) is in the step."""
    ranks = set()
    for name in storage.files(run, step):
        parsed = naming.parse_rank_file(name)
        if parsed is not None and parsed[1] == "json":
            ranks.add(parsed[0])
    return ranks


def ranks_by_step(storage: Storage, run: str) -> dict[int, set[int]]:
    """The ranks whose shard is in each step of ``run`` on ``storage``."""
    return {step: ranks_present(storage, run, step) for step in storage.steps(run)}


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
    where = f"{storage.describe()}: step {step} {naming.COMMIT}"
    try:
        marker = json.loads(storage.read_bytes(run, step, naming.COMMIT))
        world_size = marker["world_size"]
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{where}: the commit marker is gone") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{where}: malformed commit marker ({exc!r})") from None
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise CorruptCheckpointError(f"{where}: world_size {world_size!r} is not a positive int")
    return world_size


def decommit(storage: Storage, run: str, step: int, reason: str) -> None:
    """Mark a step incomplete on ``storage`` (its copy there is bad); GC removes it later."""
    log.warning("%s: step %d is no longer committed there: %s", storage.describe(), step, reason)
    storage.delete(run, step, naming.COMMIT)
