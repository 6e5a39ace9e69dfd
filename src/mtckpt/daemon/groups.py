"""Coded groups: which nodes protect each other's shards under ``xor:G`` or ``rs:K+M``, and
where each piece and parity of a step goes. Deterministic, so any node recomputes it.

The known nodes are ordered on a hash ring, interleaved by zone, and cut into groups of at
least K + M nodes (the remainder spread over the first groups), so that a group's nodes
are on distinct failure domains when there are enough of them. A node's step (its ranks'
data files, concatenated in rank order: its *blob*) is cut into K pieces. A group of n
nodes has n stripes: stripe s takes piece i from node ``members[(s + i) % n]`` and its
parity j is held by node ``members[(s + K + j) % n]``; the K + M nodes of a stripe are
distinct, so losing any M nodes of a group loses at most M pieces of each stripe. Each
node sends K pieces (one blob) per parity row and holds M parities of about 1/K of a blob.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..format import naming
from ..redundancy import Redundancy
from .erasure import Code
from .placement import _ring_key

log = logging.getLogger(__name__)
GROUPS_DIR = ".groups"  # in the memory root: the group each of the node's steps was sent to
REMEMBERED = 64  # steps of a run whose groups are kept


@dataclass(frozen=True)
class Group:
    scheme: Redundancy
    members: tuple[str, ...]

    @property
    def code(self) -> Code:
        return Code(self.scheme.kind, self.scheme.data, self.scheme.parity)

    def data_nodes(self, stripe: int) -> list[str]:
        n, k = len(self.members), self.scheme.data
        return [self.members[(stripe + i) % n] for i in range(k)]

    def parity_nodes(self, stripe: int) -> list[str]:
        n, k, m = len(self.members), self.scheme.data, self.scheme.parity
        return [self.members[(stripe + k + j) % n] for j in range(m)]

    def pieces_of(self, node: str) -> list[tuple[int, int]]:
        """``(stripe, piece index)`` of each of ``node``'s K pieces."""
        t, n = self.members.index(node), len(self.members)
        return [((t - i) % n, i) for i in range(self.scheme.data)]

    def parities_of(self, node: str) -> list[tuple[int, int]]:
        """``(stripe, parity row)`` of each of the M parities ``node`` holds."""
        t, n, k = self.members.index(node), len(self.members), self.scheme.data
        return [((t - k - j) % n, j) for j in range(self.scheme.parity)]

    def holders_of(self, node: str) -> list[str]:
        """The nodes holding a parity of one of ``node``'s pieces."""
        found = []
        for stripe, _ in self.pieces_of(node):
            found += [p for p in self.parity_nodes(stripe) if p not in found]
        return found

    def __str__(self) -> str:
        return f"{self.scheme} group {', '.join(self.members)}"


def form_groups(members: Iterable[tuple[str, str]], scheme: Redundancy) -> list[Group]:
    """The groups of the ``(node id, zone)`` members; none if they are fewer than K + M."""
    by_zone: dict[str, list[str]] = {}
    for node, zone in sorted(set(members)):
        by_zone.setdefault(zone, []).append(node)
    zones = sorted(by_zone.values(), key=lambda nodes: (-len(nodes), min(nodes)))
    for nodes in zones:
        nodes.sort(key=_ring_key)
    order = [zone[i] for i in range(max(map(len, zones), default=0)) for zone in zones
             if i < len(zone)]  # fmt: skip
    count = len(order) // scheme.group_size
    extra = len(order) - count * scheme.group_size
    groups, start = [], 0
    for g in range(count):
        size = scheme.group_size + extra // count + (1 if g < extra % count else 0)
        groups.append(Group(scheme, tuple(order[start : start + size])))
        start += size
    return groups


def group_of(node: str, groups: list[Group]) -> Group | None:
    return next((g for g in groups if node in g.members), None)


def piece_range(blob_size: int, data: int, index: int) -> tuple[int, int]:
    """``(offset, length)`` of piece ``index`` of ``data`` pieces of a blob (the last ones
    shorter, possibly empty)."""
    per = -(-blob_size // data)
    start = min(blob_size, index * per)
    return start, min(blob_size, start + per) - start


class StepGroups:
    """The group each of this node's steps was sent to, per run: what decides which peers
    may fetch pieces of its shards (mutual TLS). Written to
    ``{memory_root}/.groups/{run}.json`` so that a restarted daemon, whose node memory
    outlives it, still lets the group rebuild a lost member from those shards."""

    def __init__(self, memory_root: str | os.PathLike, scheme: Redundancy) -> None:
        self.dir = Path(memory_root) / GROUPS_DIR
        self.scheme = scheme
        self._groups: dict[tuple[str, int], Group] = {}
        self._loaded: set[str] = set()
        self._lock = threading.Lock()  # asked by the servicer's threads, set by the sender

    def get(self, run: str, step: int) -> Group | None:
        with self._lock:
            self._load(run)
            return self._groups.get((run, step))

    def put(self, run: str, step: int, group: Group) -> None:
        with self._lock:
            self._load(run)
            if self._groups.get((run, step)) != group:
                self._record(run, step, group)

    def _record(self, run: str, step: int, group: Group) -> None:
        self._groups[(run, step)] = group
        for old in [k for k in self._groups if k[0] == run and k[1] <= step - REMEMBERED]:
            del self._groups[old]
        record = {str(s): list(g.members) for (r, s), g in self._groups.items() if r == run}
        self.dir.mkdir(exist_ok=True)
        pending = self.dir / f"{run}.json.tmp"
        pending.write_text(json.dumps({"scheme": str(self.scheme), "steps": record}))
        pending.replace(self.dir / f"{run}.json")

    def _load(self, run: str) -> None:
        if run in self._loaded:
            return
        self._loaded.add(run)
        path = self.dir / f"{run}.json"
        try:
            record = json.loads(path.read_text())
            scheme = Redundancy.parse(record["scheme"])
            for step, members in record["steps"].items():
                nodes = tuple(naming.check_node_id(n) for n in members)
                self._groups[(run, naming.check_step(int(step)))] = Group(scheme, nodes)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s: unreadable (%s); the groups of run %r's earlier steps are "
                        "forgotten", path, exc, run)  # fmt: skip
