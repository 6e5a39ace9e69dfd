"""After a restore from a slower tier: copying the step into the faster ones, so that the
next restart finds it there (``restore(populate=True)``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from .. import tiercopy
from ..format import commit
from ..format.manifest import RankManifest
from ..tiers.base import Storage

log = logging.getLogger(__name__)


def start(
    source: Storage,
    storages: Sequence[Storage],
    run: str,
    step: int,
    rank: int,
    world_size: int,
    node_ranks: Sequence[int],
    verified: dict[str, Callable[[RankManifest], None]],
) -> threading.Thread:
    """Copy ``rank``'s shard of ``step`` from ``source`` into each tier of ``storages``
    (fastest first) faster than it (the first from ``source``, the others from that one),
    verified, and commit it there, on a thread of its own (returned, started).
    ``verified[tier]`` records each shard checked into a tier.
    A step saved by another world size is left where it is."""

    faster = storages[: list(storages).index(source)]

    def copy() -> None:
        try:
            saved_world = commit.saved_world_size(source, run, step)
        except Exception as exc:
            log.warning("step %d: not copied to the faster tiers: %s", step, exc)
            return
        if saved_world != world_size:
            log.info("step %d was saved by another world size: not copied to the faster tiers",
                     step)  # fmt: skip
            return
        origin = source
        for storage in faster:
            try:
                tiercopy.copy_shard(origin, storage, run, step, rank,
                                    verified=verified[storage.name])  # fmt: skip
                ranks = range(world_size) if storage.shared else node_ranks
                commit.try_commit(storage, run, step, world_size, ranks)
                origin = faster[0]
            except Exception as exc:  # the restore is done; only the next one is slower
                log.warning("step %d: not copied to %s for the next restart: %s", step,
                            storage.describe(), exc)  # fmt: skip

    thread = threading.Thread(target=copy, name="mtckpt-populate", daemon=True)
    thread.start()
    return thread
