"""Room at the peers for a node's first steps. A trainer's ``reserve()`` (manager.py) makes
its memory-tier slots before its first saves; through its daemon it also has the peers
that will hold copies of the node's shards make their files ready, zeroed and mapped,
within their memory budgets: the first steps' replicas (or parities) then land in
prepared files, as later steps' do in expired ones. Without it a peer prepares a fresh
file a window ahead of the bytes, and one spare after the first replica."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from ..proto import mtckpt_pb2 as pb
from .holdings import MAX_SHARD_BYTES, Holdings
from .parity import ParityStore
from .peers import Peers
from .replicator import Replicator
from .rpc import MAX_RESERVED_STEPS, error_text

log = logging.getLogger(__name__)

PEER_TIMEOUT = 120.0  # seconds a peer may take to make its files


def check(request: pb.ReserveRequest) -> None:
    """ValueError naming what is wrong with ``request``."""
    if not 0 < request.size <= MAX_SHARD_BYTES:
        raise ValueError(f"files of {request.size} bytes; expected 1 to {MAX_SHARD_BYTES}")
    if not 0 < request.count <= MAX_RESERVED_STEPS:
        raise ValueError(f"files for {request.count} steps; expected 1 to {MAX_RESERVED_STEPS}")


class Reservations:
    def __init__(self, holdings: Holdings, peers: Peers, replicator: Replicator,
                 parity: ParityStore, fits: Callable[[int], bool]) -> None:  # fmt: skip
        """``fits(size)``: whether ``size`` more bytes keep within the memory budget."""
        self.holdings, self.peers, self.replicator = holdings, peers, replicator
        self.parity, self.fits = parity, fits
        self._lock = threading.Lock()
        self._ranks: dict[int, tuple[int, int]] = {}  # this node's: rank -> (size, count)

    def ask_peers(self, rank: int, size: int, count: int) -> pb.ReserveReply:
        """A trainer's request: the peers that will hold copies of this node's shards make
        files for every rank that reserved so far (asked at once); which did, which not."""
        with self._lock:
            self._ranks[rank] = (size, count)
            ranks = list(self._ranks.values())
        requests, nodes = self._requests(ranks)
        reply = pb.ReserveReply()

        def ask(node: str) -> str:
            member = self.peers.by_node(node)
            if member is None:
                return "not known"
            try:
                client = self.peers.client(member.address)
                for size, count in requests:
                    client.reserve(0, size, count, timeout=PEER_TIMEOUT)
            except grpc.RpcError as exc:
                return error_text(exc)
            return ""

        with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
            for node, why in zip(nodes, pool.map(ask, nodes), strict=True):
                if why:
                    log.warning("reserve: %s made no room for this node's steps: %s", node, why)
                    reply.failed.append(f"{node}: {why}")
                else:
                    reply.ready.append(node)
        return reply

    def _requests(self, ranks: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[str]]:
        """``(size, count)`` to ask each peer for, and the peers: replicas of each rank's
        file at its replica targets, or the node's whole blob at its group's holders."""
        encoder = self.replicator.encoder
        if encoder is None:
            by_size: dict[int, int] = {}
            for size, count in ranks:
                by_size[size] = by_size.get(size, 0) + count
            return sorted(by_size.items()), self.replicator.replica_targets()
        holders = encoder.place()[1]
        return [(sum(size for size, _ in ranks), max(count for _, count in ranks))], holders

    def make_here(self, size: int, count: int) -> int:
        """A peer's request: ``count`` replica files of ``size`` bytes ready here, or under
        a coded scheme (``size``: the peer's blob) parity files of its group's stripes held
        here for ``count`` steps. The bytes ready for it."""
        encoder = self.replicator.encoder
        if encoder is None:
            self.holdings.ready_spares(size, count, self.fits)
            return self.holdings.free_of_size(size) * size
        group = encoder.place()[0]
        if group is None:
            return 0
        piece = -(-size // group.scheme.data)
        files = count * len(group.parities_of(self.holdings.node_id))
        return self.parity.spares.reserve(files, piece) * piece
