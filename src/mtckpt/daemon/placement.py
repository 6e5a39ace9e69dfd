"""Where a node's shards are replicated: a deterministic choice any node can recompute."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable


@functools.lru_cache(maxsize=1 << 16)  # asked for every member at every scan
def _ring_key(node_id: str) -> bytes:
    return hashlib.sha256(node_id.encode()).digest()


def replica_targets(
    node_id: str, zone: str, members: Iterable[tuple[str, str]], replicas: int
) -> list[str]:
    """The ``replicas`` nodes that hold copies of ``node_id``'s shards, from the other
    ``(node id, zone)`` members: the next ones after it on a hash ring, those in another
    zone first (when zones are labelled), so that copies land on other failure domains."""
    others = {m: z for m, z in members if m != node_id}
    ring = sorted([*others, node_id], key=_ring_key)
    start = ring.index(node_id)
    order = [ring[(start + i) % len(ring)] for i in range(1, len(ring))]
    elsewhere = [m for m in order if not zone or others[m] != zone]
    nearby = [m for m in order if m not in elsewhere]
    return (elsewhere + nearby)[:replicas]
