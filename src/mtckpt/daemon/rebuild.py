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
import mmap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from ..errors import CorruptCheckpointError, MtckptError
from ..proto import mtckpt_pb2 as pb
from . import bulk
from .auth import host_of
from .bulk import Produced
from .groups import Group, piece_range
from .holdings import Holdings, Shard
from .incoming import Incoming, check_next
from .parity import ParityStore, Stripe
from .peers import Peers
from .rpc import error_text, shard_id
from .stripes import Contributor, StripeKey

log = logging.getLogger(__name__)

WINDOW = 4 << 20  # bytes of each source decoded at once


@dataclass
class Coded:
    """What the daemons list of one step's coded groups: each parity held (stripe ->
    {row: node, address}), each contributor as recorded, the data nodes recorded as holding
    nothing of the step (their pieces zeros; daemon/absent.py), and who holds which step
    whole (node -> manifest crcs of its own ranks)."""

    parities: dict[StripeKey, dict[int, tuple[str, str, int]]] = field(default_factory=dict)
    members: dict[str, Contributor] = field(default_factory=dict)  # as the parity records
    empty: dict[StripeKey, set[str]] = field(default_factory=dict)
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
                if not c.ranks:
                    coded.empty.setdefault(key, set()).add(c.origin)
                    continue
                coded.groups.setdefault(c.origin, key.group_of)
                if c.origin not in coded.members or c.manifests:
                    coded.members[c.origin] = Contributor(
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
    member: Contributor | None  # a data source: whose piece
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
            if node != origin and node in coded.empty.get(key, ()):
                found.append(Source(i, node, "", key, Contributor.empty(node)))  # zeros
                continue
            if node == origin or member is None or whole is None:
                continue
            if all(whole[1].get(r) == c for r, c in zip(member.ranks, member.crcs, strict=True)):
                found.append(Source(i, node, whole[0], key, member))
        for row, (node, address, size) in sorted(coded.parities.get(key, {}).items()):
            found.append(Source(group.scheme.data + row, node, address, key, None, size))
        out[index] = found
    return out


def why_not(coded: Coded, origin: str, run: str, step: int) -> str:
    """ "" if ``origin``'s shards of ``step`` can be rebuilt, else why not."""
    if origin not in coded.members or origin not in coded.groups:
        return f"no complete parity records node {origin!r}"
    group = coded.groups[origin]
    for index, found in sources(coded, origin, run, step).items():
        if len(found) < group.scheme.data:
            lost = [n for n in group.members if n not in coded.whole and n != origin]
            return (
                f"node {origin}'s piece {index} has {len(found)} of the {group.scheme.data} "
                f"sources it needs in its {group} (without their step: {lost}; it survives "
                f"{group.scheme.losses} loss(es))"
            )
    return ""


def _manifests(peers: Peers, coded: Coded, origin: str, run: str, step: int) -> Contributor:
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
                            return Contributor(c.origin, tuple(c.ranks), tuple(c.manifest_crcs),
                                          tuple(c.data_sizes), tuple(c.manifests),
                                          info.world_size)  # fmt: skip
    raise CorruptCheckpointError(
        f"run {run!r} step {step}: no parity holder gave node {origin!r}'s manifests "
        f"({'; '.join(problems) or 'none listed them'})"
    )


def rebuild(holdings: Holdings, peers: Peers, coded: Coded, run: str, step: int,
            ranks: list[int]) -> tuple[int, list[str]]:  # fmt: skip
    """This node's ``ranks`` of ``step`` rebuilt into its memory tier from its group;
    the bytes fetched and the nodes they came from.

    Each piece is asked, all at once, of a holder of its stripe's parity, which rebuilds it
    from the stripe's other members and sends only the result: this node receives one
    step's worth of bytes, and the K times more that decoding reads cross the other
    nodes' links in parallel. A piece no helper gives is rebuilt here from K sources."""
    me = holdings.node_id
    member, group = _manifests(peers, coded, me, run, step), coded.groups[me]
    writer = _BlobWriter(holdings, member, run, step, set(ranks))
    try:
        found = sorted(sources(coded, me, run, step).items())
        with ThreadPoolExecutor(max_workers=len(found)) as pool:
            done = list(pool.map(lambda item: _piece(peers, group, member, writer, *item), found))
        writer.commit()
    finally:
        writer.close()
    fetched = sum(size for size, _ in done)
    used = list(dict.fromkeys(node for _, nodes in done for node in nodes))
    log.info("rebuilt run %r step %d ranks %s of %s from %s (%d bytes fetched)",
             run, step, ranks, me, used, fetched)  # fmt: skip
    return fetched, used


def _piece(peers: Peers, group: Group, member: Contributor, writer: _BlobWriter, index: int,
           found: list[Source]) -> tuple[int, list[str]]:  # fmt: skip
    """Piece ``index`` of this node's step into ``writer``: from a helper, else decoded
    here. The bytes fetched and from whom."""
    offset, length = piece_range(member.blob_size, group.scheme.data, index)
    if not length:
        return 0, []
    for helper in [s for s in found if s.member is None]:
        sink = _PieceSink(writer, offset, length, f"piece {index} of {member.origin!r} "
                          f"rebuilt by {helper.node}")  # fmt: skip
        try:
            client = peers.client(helper.address)
            ticket = client.open_fetch(parity=helper.key.ident(), rebuild_for=member.origin)
            bulk.fetch(host_of(helper.address), ticket.port, ticket.ticket, sink,
                       tls=peers.tls if ticket.tls else None)  # fmt: skip
            if sink.received == length:
                return length, [helper.node]
        except (grpc.RpcError, MtckptError, OSError) as exc:
            log.warning("rebuild: %s failed: %s; trying another way", sink.where,
                        error_text(exc))  # fmt: skip
    fetched, used = 0, []
    chosen, spare = found[: group.scheme.data], found[group.scheme.data :]
    for window in range(0, length, WINDOW):
        size = min(WINDOW, length - window)
        pieces, got = _fetch_window(peers, chosen, spare, window, size)
        fetched += got
        writer.write(offset + window, _decode(group, chosen, pieces, index, size))
        used += [s.node for s in chosen if s.node not in used]
    return fetched, used


def _decode(group: Group, chosen: list[Source], pieces: dict[int, bytearray], index: int,
            size: int) -> memoryview:  # fmt: skip
    """``size`` bytes of data piece ``index`` from the chosen sources' windows."""
    present = {s.index: pieces[s.index] for s in chosen}
    sizes = [0] * group.scheme.data
    for s in chosen:
        if s.member is not None:
            sizes[s.index] = len(pieces[s.index])
    sizes[index] = size
    return memoryview(group.code.decode(present, sizes)[index])[:size]


def helper(parity: ParityStore, peers: Peers, ident: pb.StripeId, origin: str) -> Produced:
    """``origin``'s piece of a stripe this node holds a complete parity of, rebuilt here
    from this parity and the stripe's other members as it is sent (a window at a time,
    the next fetched while one is sent)."""
    stripe = parity.complete(ident)
    key, group = stripe.key, stripe.key.group_of
    data_nodes, k = group.data_nodes(key.stripe), group.scheme.data
    members = dict(stripe.contributors)
    if origin not in data_nodes or origin not in members:
        raise ValueError(f"{key}: node {origin!r} has no piece in it")
    index = data_nodes.index(origin)
    length = piece_range(members[origin].blob_size, k, index)[1]
    found = [Source(k + stripe.row, parity.node_id, "", key, None, stripe.size)]
    for i, node in enumerate(data_nodes):
        peer, member = peers.by_node(node), members[node]
        if node == origin:
            continue
        if member.is_empty:
            found.append(Source(i, node, "", key, member))  # zeros
        elif peer is not None and _holds(peers, peer.address, member, key):
            found.append(Source(i, node, peer.address, key, member))
    for row, node in enumerate(group.parity_nodes(key.stripe)):
        peer = peers.by_node(node)
        if row != stripe.row and peer is not None and peer.reachable:
            found.append(Source(k + row, node, peer.address, key, None, stripe.size))
    chosen, spare = found[:k], found[k:]
    if len(chosen) < k:
        raise ValueError(f"{key}: {len(chosen)} of the {k} sources needed are up")

    def window(start: int) -> memoryview:
        size = min(WINDOW, length - start)
        pieces, _ = _fetch_window(peers, chosen, spare, start, size, stripe)
        return _decode(group, chosen, pieces, index, size)

    def chunks():
        with ThreadPoolExecutor(max_workers=1) as ahead:
            starts = list(range(0, length, WINDOW))
            coming = ahead.submit(window, starts[0]) if starts else None
            for n in range(len(starts)):
                current = coming.result()
                coming = ahead.submit(window, starts[n + 1]) if n + 1 < len(starts) else None
                yield current

    return Produced(f"piece {index} of {origin!r} in {key}", length, chunks)


def _holds(peers: Peers, address: str, member: Contributor, key: StripeKey) -> bool:
    """Whether the node at ``address`` holds the save of its step that the parity has."""
    try:
        listing = peers.client(address).list_shards(run=key.run, origin=member.origin)
    except grpc.RpcError:
        return False
    held = {s.shard.rank: s.manifest_crc for s in listing.shards
            if s.shard.step == key.step and not s.replica}  # fmt: skip
    return all(held.get(r) == c for r, c in zip(member.ranks, member.crcs, strict=True))


def _fetch_window(
    peers: Peers, chosen: list[Source], spare: list[Source], window: int, size: int,
    local: Stripe | None = None,
) -> tuple[dict[int, bytearray], int]:  # fmt: skip
    """``size`` bytes at ``window`` of each chosen source's piece or parity (shorter where
    it ends sooner); a failing source is replaced (in ``chosen``) by a spare one."""
    out: dict[int, bytearray] = {}
    problems: list[str] = []
    while True:
        with ThreadPoolExecutor(max_workers=len(chosen)) as pool:
            results = list(pool.map(lambda s: _try_fetch(peers, s, window, size, local), chosen))
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


def _try_fetch(peers: Peers, source: Source, window: int, size: int,
               local: Stripe | None) -> bytearray | str:  # fmt: skip
    """The bytes, or why they could not be had (``local``: this node's parity, read here;
    a member that held nothing of the step: none)."""
    if source.member is not None and source.member.is_empty:
        return bytearray()
    try:
        if not source.address and local is not None:
            return _read_local(local, window, size)
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


def _read_local(stripe: Stripe, window: int, size: int) -> bytearray:
    """``size`` bytes at ``window`` of this node's parity file, each chunk touched checked
    against the parity's record."""
    lo, hi = min(window, stripe.size), min(window + size, stripe.size)
    out = bytearray(hi - lo)
    if hi == lo:
        return out
    with open(stripe.path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m, \
            memoryview(m) as view:  # fmt: skip
        bulk.checked_range(view, stripe.chunks, lo, hi, stripe.path.name)
        out[:] = view[lo:hi]
    return out


class _PieceSink:
    """Frames of a piece rebuilt by a helper into the node's new files at ``offset``."""

    def __init__(self, writer: _BlobWriter, offset: int, size: int, where: str) -> None:
        self.writer, self.offset, self.size, self.where = writer, offset, size, where
        self.received = 0
        self._scratch = bytearray(bulk.FRAME_BYTES)

    def whole_chunks(self, offset: int, length: int) -> bool:
        return False

    def region(self, offset: int, length: int) -> memoryview:
        check_next(self.where, offset, length, self.received, self.size)
        if len(self._scratch) < length:
            self._scratch = bytearray(length)
        return memoryview(self._scratch)[:length]

    def accept(self, offset: int, length: int) -> None:
        self.writer.write(self.offset + offset, memoryview(self._scratch)[:length])
        self.received += length


class _Received:
    """A sink for bulk.fetch: frames into ``target`` in order (their crc32c checked)."""

    def __init__(self, target: memoryview, where: str) -> None:
        self.target, self.where = target, where
        self.size, self.received = target.nbytes, 0

    def whole_chunks(self, offset: int, length: int) -> bool:
        return False

    def region(self, offset: int, length: int) -> memoryview:
        check_next(self.where, offset, length, self.received, self.size)
        return self.target[offset : offset + length]

    def accept(self, offset: int, length: int) -> None:
        self.received += length


class _BlobWriter:
    """A node's blob written, in any order, into new data files of its ``ranks`` (the
    others' bytes skipped); each file is checked against its manifest before it is
    committed."""

    def __init__(self, holdings: Holdings, member: Contributor, run: str, step: int,
                 ranks: set[int]) -> None:  # fmt: skip
        self.files: list[tuple[int, Incoming | None]] = []
        try:
            for rank, size, manifest in zip(member.ranks, member.sizes, member.manifests,
                                            strict=True):  # fmt: skip
                shard = Shard(run, step, rank, member.origin)
                wanted = rank in ranks
                self.files.append((size, holdings.receive(shard, manifest) if wanted else None))
        except BaseException:
            self.close()
            raise

    def write(self, offset: int, data: memoryview) -> None:
        start = 0
        for size, incoming in self.files:
            lo, hi = max(offset, start), min(offset + data.nbytes, start + size)
            if lo < hi and incoming is not None:
                incoming.write_at(lo - start, data[lo - offset : hi - offset])
            start += size

    def commit(self) -> None:
        for _, incoming in self.files:
            if incoming is not None:
                incoming.check_written()
        for _, incoming in self.files:
            if incoming is not None:
                incoming.commit()

    def close(self) -> None:
        for _, incoming in self.files:
            if incoming is not None:
                incoming.close()
