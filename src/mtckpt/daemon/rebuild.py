"""Rebuilding a lost node's shards from the survivors of its coded group (daemon/groups.py).

The parity holders list, for each stripe, its contributors with their manifests, so a
replacement node learns its own ranks, their sizes and checksums from them. For each of its
K pieces, the stripe's other members give K sources: pieces of the other data nodes' steps
(ranges of their data files, checked against their manifests by the sender before they go)
and complete parities (checked against their own checksums). A window of each at a time is
fetched in parallel over the data ports, decoded in C, and written into the node's new data
files, which check every chunk against the original manifest. A source that fails or is
damaged is replaced by another of the stripe while there is one.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from ..errors import CorruptCheckpointError, MtckptError
from ..proto import mtckpt_pb2 as pb
from . import bulk
from .auth import host_of
from .groups import Group, piece_range
from .holdings import Holdings, Incoming, Shard
from .parity import StripeKey
from .peers import Peers
from .rpc import error_text, shard_id

log = logging.getLogger(__name__)

WINDOW = 16 << 20  # bytes of each source decoded at once


@dataclass(frozen=True)
class Member:
    """A contributor of a stripe as its parities recorded it."""

    origin: str
    ranks: tuple[int, ...]
    crcs: tuple[int, ...]
    sizes: tuple[int, ...]
    manifests: tuple[bytes, ...]
    world_size: int

    @property
    def blob_size(self) -> int:
        return sum(self.sizes)


@dataclass
class Coded:
    """What the daemons list of one step's coded groups: each parity held (stripe ->
    {row: node, address}), each contributor as recorded, and who holds which step whole
    (node -> manifest crcs of its own ranks)."""

    parities: dict[StripeKey, dict[int, tuple[str, str, int]]] = field(default_factory=dict)
    members: dict[str, Member] = field(default_factory=dict)
    groups: dict[str, Group] = field(default_factory=dict)  # origin -> its group
    whole: dict[str, tuple[str, dict[int, int]]] = field(default_factory=dict)


def collect(step_infos: list[tuple[str, str, pb.ListShardsReply]], step: int) -> Coded:
    """The coded view of ``step`` from ``(node, address, listing)`` of each daemon."""
    coded = Coded()
    for node, address, listing in step_infos:
        own = {s.shard.rank: s.manifest_crc for s in listing.shards
               if s.shard.step == step and s.shard.origin == node and not s.replica}  # fmt: skip
        if own:
            coded.whole[node] = (address, own)
        for info in listing.parities:
            if info.stripe.step != step or not info.complete:
                continue
            try:
                key = StripeKey.checked(info.stripe)
            except ValueError:
                continue
            coded.parities.setdefault(key, {})[info.row] = (node, address, info.size)
            for c in info.contributors:
                coded.groups.setdefault(c.origin, key.group_of)
                if c.origin not in coded.members or c.manifests:
                    coded.members[c.origin] = Member(
                        c.origin, tuple(c.ranks), tuple(c.manifest_crcs), tuple(c.data_sizes),
                        tuple(c.manifests), info.world_size,
                    )  # fmt: skip
    return coded


@dataclass(frozen=True)
class Source:
    index: int  # in the code: 0..K-1 data, K.. parity
    node: str
    address: str
    key: StripeKey
    member: Member | None  # a data source: whose piece
    size: int = 0  # a parity: its bytes


def sources(coded: Coded, origin: str, run: str, step: int) -> dict[int, list[Source]]:
    """For each of ``origin``'s pieces (by piece index), the sources its stripe offers."""
    group = coded.groups[origin]
    out: dict[int, list[Source]] = {}
    for stripe, index in group.pieces_of(origin):
        key = StripeKey(run, step, str(group.scheme), group.members, stripe)
        found = []
        for i, node in enumerate(group.data_nodes(stripe)):
            member = coded.members.get(node)
            whole = coded.whole.get(node)
            if node == origin or member is None or whole is None:
                continue
            if all(whole[1].get(r) == c for r, c in zip(member.ranks, member.crcs, strict=True)):
                found.append(Source(i, node, whole[0], key, member))
        for row, (node, address, size) in sorted(coded.parities.get(key, {}).items()):
            found.append(Source(group.scheme.data + row, node, address, key, None, size))
        out[index] = found
    return out


def why_not(coded: Coded, origin: str, run: str, step: int) -> str:
    """"" if ``origin``'s shards of ``step`` can be rebuilt, else why not."""
    if origin not in coded.members or origin not in coded.groups:
        return f"no complete parity records node {origin!r}"
    group = coded.groups[origin]
    for index, found in sources(coded, origin, run, step).items():
        if len(found) < group.scheme.data:
            lost = [n for n in group.members if n not in coded.whole and n != origin]
            return (
                f"node {origin!r}'s piece {index} has {len(found)} of the {group.scheme.data} "
                f"sources it needs in its {group} (without their step: {lost}; it survives "
                f"{group.scheme.losses} loss(es))"
            )
    return ""


def _manifests(peers: Peers, coded: Coded, origin: str, run: str, step: int) -> Member:
    """``origin``'s record with its manifests, from the first parity holder that gives it."""
    problems = []
    for key, rows in coded.parities.items():
        if origin not in key.group_of.data_nodes(key.stripe):
            continue
        for node, address, _ in rows.values():
            try:
                reply = peers.client(address).list_shards(run=run, origin=origin, manifests=True)
            except grpc.RpcError as exc:
                problems.append(f"{node}: {error_text(exc)}")
                continue
            for info in reply.parities:
                if info.stripe.step == step and info.complete:
                    for c in info.contributors:
                        if c.origin == origin and c.manifests:
                            return Member(c.origin, tuple(c.ranks), tuple(c.manifest_crcs),
                                          tuple(c.data_sizes), tuple(c.manifests),
                                          info.world_size)  # fmt: skip
    raise CorruptCheckpointError(
        f"run {run!r} step {step}: no parity holder gave node {origin!r}'s manifests "
        f"({'; '.join(problems) or 'none listed them'})"
    )


def rebuild(holdings: Holdings, peers: Peers, coded: Coded, run: str, step: int,
            ranks: list[int]) -> tuple[int, list[str]]:  # fmt: skip
    """This node's ``ranks`` of ``step`` rebuilt into its memory tier from its group;
    the bytes fetched and the nodes they came from."""
    me = holdings.node_id
    member, group = _manifests(peers, coded, me, run, step), coded.groups[me]
    writer = _BlobWriter(holdings, member, run, step, set(ranks))
    fetched, used = 0, []
    try:
        for index, found in sorted(sources(coded, me, run, step).items()):
            offset, length = piece_range(member.blob_size, group.scheme.data, index)
            chosen, spare = found[: group.scheme.data], found[group.scheme.data :]
            for window in range(0, length, WINDOW):
                size = min(WINDOW, length - window)
                pieces, got = _fetch_window(peers, chosen, spare, window, size)
                fetched += got
                present = {s.index: pieces[s.index] for s in chosen}
                sizes = [0] * group.scheme.data
                for s in chosen:
                    if s.member is not None:
                        sizes[s.index] = len(pieces[s.index])
                sizes[index] = size
                decoded = group.code.decode(present, sizes)[index]
                writer.write(offset + window, memoryview(decoded)[:size])
                used += [s.node for s in chosen if s.node not in used]
        writer.commit()
    finally:
        writer.close()
    log.info("rebuilt run %r step %d ranks %s of %s from %s (%d bytes fetched)",
             run, step, ranks, me, used, fetched)  # fmt: skip
    return fetched, used


def _fetch_window(peers: Peers, chosen: list[Source], spare: list[Source], window: int,
                  size: int) -> tuple[dict[int, bytearray], int]:  # fmt: skip
    """``size`` bytes at ``window`` of each chosen source's piece or parity (shorter where
    it ends sooner); a failing source is replaced (in ``chosen``) by a spare one."""
    out: dict[int, bytearray] = {}
    problems: list[str] = []
    while True:
        with ThreadPoolExecutor(max_workers=len(chosen)) as pool:
            results = list(pool.map(lambda s: _try_fetch(peers, s, window, size), chosen))
        failed = [(s, r) for s, r in zip(chosen, results, strict=True) if isinstance(r, str)]
        for s, r in zip(chosen, results, strict=True):
            if not isinstance(r, str):
                out[s.index] = r
        if not failed:
            return out, sum(len(b) for b in out.values())
        for source, reason in failed:
            log.warning("rebuild: %s from %s failed: %s", source.key, source.node, reason)
            problems.append(f"{source.node}: {reason}")
            chosen.remove(source)
            if not spare:
                raise CorruptCheckpointError(
                    f"{source.key}: no source left to rebuild from ({'; '.join(problems)})"
                )
            chosen.append(spare.pop(0))


def _try_fetch(peers: Peers, source: Source, window: int, size: int) -> bytearray | str:
    """The bytes, or why they could not be had."""
    try:
        return _fetch(peers, source, window, size)
    except (grpc.RpcError, MtckptError, OSError, ValueError) as exc:
        return error_text(exc)


def _fetch(peers: Peers, source: Source, window: int, size: int) -> bytearray:
    client = peers.client(source.address)
    tls = peers.tls
    if source.member is None:  # a parity
        lo, hi = min(window, source.size), min(window + size, source.size)
        buffer = bytearray(hi - lo)
        if hi > lo:
            ticket = client.open_fetch(parity=source.key.ident(), offset=lo, length=hi - lo)
            sink = _Received(memoryview(buffer), f"parity of {source.key}")
            bulk.fetch(host_of(source.address), ticket.port, ticket.ticket, sink,
                       tls=tls if ticket.tls else None)  # fmt: skip
        return buffer
    group = source.key.group_of
    position = group.data_nodes(source.key.stripe).index(source.node)
    offset, length = piece_range(source.member.blob_size, group.scheme.data, position)
    lo, hi = offset + min(window, length), offset + min(window + size, length)
    buffer = bytearray(hi - lo)
    start, filled = 0, 0
    for rank, file_size in zip(source.member.ranks, source.member.sizes, strict=True):
        a, b = max(lo, start), min(hi, start + file_size)
        if a < b:
            shard = Shard(source.key.run, source.key.step, rank, source.node)
            ticket = client.open_fetch(shard_id(shard), offset=a - start, length=b - a)
            sink = _Received(memoryview(buffer)[filled : filled + b - a], f"{shard}")
            bulk.fetch(host_of(source.address), ticket.port, ticket.ticket, sink,
                       tls=tls if ticket.tls else None)  # fmt: skip
            filled += b - a
        start += file_size
    return buffer


class _Received:
    """A sink for bulk.fetch: frames into ``target`` in order (their crc32c checked)."""

    def __init__(self, target: memoryview, where: str) -> None:
        self.target, self.where = target, where
        self.size, self.received = target.nbytes, 0

    def whole_chunks(self, offset: int, length: int) -> bool:
        return False

    def region(self, offset: int, length: int) -> memoryview:
        if offset != self.received or length < 0 or offset + length > self.size:
            raise CorruptCheckpointError(
                f"{self.where}: {length} bytes at offset {offset}; expected offset "
                f"{self.received} of {self.size}"
            )
        return self.target[offset : offset + length]

    def accept(self, offset: int, length: int) -> None:
        self.received += length


class _BlobWriter:
    """A node's blob written in order into new data files of its ``ranks`` (the others'
    bytes skipped), each checked against its manifest as it fills."""

    def __init__(self, holdings: Holdings, member: Member, run: str, step: int,
                 ranks: set[int]) -> None:  # fmt: skip
        self.files: list[tuple[int, Incoming | None]] = []
        for rank, size, manifest in zip(member.ranks, member.sizes, member.manifests,
                                        strict=True):  # fmt: skip
            shard = Shard(run, step, rank, member.origin)
            self.files.append((size, holdings.receive(shard, manifest) if rank in ranks else None))

    def write(self, offset: int, data: memoryview) -> None:
        start = 0
        for size, incoming in self.files:
            lo, hi = max(offset, start), min(offset + data.nbytes, start + size)
            if lo < hi and incoming is not None:
                incoming.put(lo - start, data[lo - offset : hi - offset])
            start += size

    def commit(self) -> None:
        for _, incoming in self.files:
            if incoming is not None:
                incoming.commit()

    def close(self) -> None:
        for _, incoming in self.files:
            if incoming is not None:
                incoming.close()
