"""Sending this node's pieces of its steps to the nodes of its coded group that hold the
stripes' parities (daemon/groups.py, daemon/parity.py), for the replicator.

A step's blob is its ranks' data files in rank order, read straight from the memory tier's
files (held open so the trainer does not reuse them meanwhile). Under ``xor`` a step is
first sent along chains (daemon/chain.py): each of its K pieces goes to the next member of
the group, added to the sum of the stripe's earlier pieces, all K at once. Otherwise, and
for a step whose chains broke, each piece goes to the M parity holders of its stripe
directly, one after another in rounds that keep one stream on each link each way. A
holder is *stored* for a step once every stripe of this node's pieces that it holds is
complete: every member's piece is in, and its checksums written.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import NamedTuple

import grpc

from .. import _fastpath
from ..errors import MtckptError
from ..format import naming
from ..proto import mtckpt_pb2 as pb
from ..redundancy import Redundancy
from ..tiers.memory import open_held
from . import bulk
from .absent import newest_of
from .auth import TLSFiles, host_of
from .awaiting import Held, StripesAwaited
from .chain import CHAIN_WAIT, OwnPiece, Relays, summed_frames
from .groups import Group, StepGroups, form_groups, group_of, piece_range
from .holdings import Holdings, Shard
from .peers import Peers
from .rpc import error_text
from .stripes import StripeKey

log = logging.getLogger(__name__)

GONE_AFTER = 10.0  # seconds a group member is down before new steps' stripes leave it out
SEND_BUFFER = 128 << 10  # a chain's socket: no stream of a link runs far ahead of the others


@dataclass(frozen=True)
class RankFile:
    """One rank's data file of the step being sent, held open."""

    rank: int
    fd: int
    size: int
    manifest: bytes
    crc: int  # the manifest's


@dataclass
class Listing:
    """What one holder has of this node's pieces, by stripe."""

    stripes: dict[StripeKey, Held]


_FAILURES = (grpc.RpcError, OSError, MtckptError)
# a next member in a chain that takes no sum now: the sum goes to the holder
_NOT_NOW = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED)  # fmt: skip
_TO_HOLDER = object()


class Piece(NamedTuple):
    round: tuple[int, int]  # (piece index, parity row)
    node: str  # the holder of the parity
    key: StripeKey
    offset: int  # in the blob
    length: int


class Encoder:
    def __init__(self, holdings: Holdings, peers: Peers, scheme: Redundancy, zone: str, *,
                 tls: TLSFiles | None, bandwidth: float | None, metrics=None,
                 sends_now: Callable[[int], bool] = lambda step: True) -> None:  # fmt: skip
        """``sends_now(step)``: whether the replicator sends a step saved now as it comes
        (not while it lags and the step is no sync step)."""
        self.holdings, self.peers, self.scheme, self.zone = holdings, peers, scheme, zone
        self.tls, self.bandwidth, self.metrics, self.sends_now = tls, bandwidth, metrics, sends_now
        self.groups = StepGroups(holdings.root, scheme)  # the group each step was sent to
        self.relays = None
        if scheme.kind == "xor":
            self.relays = Relays(holdings.node_id, scheme, why_not_add=self._why_not_add)
        self._chained: OrderedDict[tuple[str, int], None] = OrderedDict()  # steps sent once
        self._said: dict[str, str] = {}  # the last failure logged, per holder
        self._idle: dict[str, tuple[int, set[str]]] = {}  # run -> (step, members holding none)
        self._idle_lock = threading.Lock()

    def place(self) -> tuple[Group | None, list[str], list[str], str]:
        """This node's group (its members up), the nodes holding parities of its pieces,
        the other members (to watch), and why there is no group ("" if there is one).

        Groups are cut from every daemon identified, up or not, so that one node's failure
        does not move the others' groups; within a group, a member down for GONE_AFTER
        seconds is left out of new steps' stripes while K + M others remain."""
        me = self.holdings.node_id
        members = [(me, self.zone)]
        members += [(m.node_id, m.zone) for m in self.peers.members() if m.node_id]
        whole = group_of(me, form_groups(members, self.scheme))
        if whole is None:
            return None, [], [], (f"{self.scheme} needs groups of {self.scheme.group_size} "
                                  f"nodes, {len(members)} known (this one included)")  # fmt: skip
        others = [n for n in whole.members if n != me]
        up = tuple(n for n in whole.members if n == me or self._up(n))
        if len(up) < self.scheme.group_size:
            down = sorted(set(whole.members) - set(up))
            return None, [], others, (f"{len(up)} of the {whole} are up ({down} down), "
                                      f"{self.scheme.group_size} needed")  # fmt: skip
        group = Group(self.scheme, up)
        return group, group.holders_of(me), others, ""

    def _up(self, node: str) -> bool:
        member = self.peers.by_node(node)
        if member is None or member.reachable or member.down_since is None:
            return member is not None
        return time.monotonic() - member.down_since < GONE_AFTER

    def _why_not_add(self, run: str, step: int) -> str:
        """Why this node will not add its piece of ``step`` to a chain's sum now ("" if
        it will): it holds none (being written counts) and will not save it, or it lags."""
        steps = self.holdings.own.steps(run)
        if step not in steps and (not steps or max(steps) > step):
            return f"it holds no shard of the step ({newest_of(steps)})"
        if not self.sends_now(step):
            return "it lags behind the saves and sends sync steps only"
        return ""

    def group_for(self, run: str, step: int) -> Group | None:
        return self.groups.get(run, step)

    def group_to_send(self, run: str, step: int, current: Group) -> Group:
        """The group ``step``'s pieces go to: the one they went to before while all its
        members are up (a node joining moves no sent step; it holds none of them), else
        this node's ``current`` group (one that lost a member protects the step again)."""
        sent, me = self.groups.get(run, step), self.holdings.node_id
        if sent is None or me not in sent.members:
            return current
        return sent if all(self._up(n) for n in sent.members if n != me) else current

    def listings(self, holders: list[str], me: str) -> tuple[dict[str, Listing], dict[str, str]]:
        """What each holder has of this node's pieces (asked all at once), and why the
        unreachable ones are."""
        with ThreadPoolExecutor(max_workers=max(1, len(holders))) as pool:
            replies = dict(zip(holders, pool.map(lambda n: self._listing(n, me), holders),
                               strict=True))  # fmt: skip
        listings = {n: r for n, r in replies.items() if isinstance(r, Listing)}
        unreachable = {n: r for n, r in replies.items() if isinstance(r, str)}
        return listings, unreachable

    def _listing(self, node: str, me: str, awaited: Iterable[StripeKey] = (),
                 wait: float = 0.0) -> Listing | str:  # fmt: skip
        """What ``node`` has of this node's pieces, once its ``awaited`` stripes are
        complete (or after ``wait`` seconds); why it is unreachable if it is."""
        keys = [k.ident() for k in awaited]
        try:
            client = self.peers.client(self.peers.by_node(node).address)
            reply = client.list_shards(origin=me, parities_only=True, complete=keys,
                                       wait=wait if keys else 0.0)  # fmt: skip
        except grpc.RpcError as exc:
            return error_text(exc)
        listing = Listing({})
        for info in reply.parities:
            try:
                key = StripeKey.checked(info.stripe)
            except ValueError:
                continue
            mine = next((c for c in info.contributors if c.origin == me), None)
            crcs = tuple(mine.manifest_crcs) if mine is not None else ()
            awaiting = tuple(n for n in key.group if n in info.awaiting)  # members only
            listing.stripes[key] = Held(crcs, info.complete, awaiting)
            if info.complete:
                self._note_idle(key, {c.origin for c in info.contributors if not c.ranks})
        return listing

    def _note_idle(self, key: StripeKey, empty: set[str]) -> None:
        """The members a complete stripe of ``key``'s step took as holding nothing of it
        (daemon/absent.py): this node's chains of the run's next steps skip them (a sum
        that comes from one all the same is refused and goes to its holder)."""
        with self._idle_lock:
            step, members = self._idle.get(key.run, (-1, set()))
            if key.step > step:
                self._idle[key.run] = (key.step, set(empty))
                while len(self._idle) > 64:
                    del self._idle[next(iter(self._idle))]
            elif key.step == step:
                members |= empty

    def _idle_member(self, run: str, step: int, node: str) -> bool:
        """Whether a stripe of a step before ``step`` took ``node`` as holding nothing (a
        record of a later step is of steps the job went back from: not trusted)."""
        with self._idle_lock:
            seen, members = self._idle.get(run, (-1, set()))
            return seen < step and node in members

    def send_step(self, run: str, step: int, shards: list[Shard], group: Group,
                  listings: dict[str, Listing], unreachable: dict[str, str],
                  mark: Callable[[str, str], None], stopping) -> bool:  # fmt: skip
        """Send this node's pieces of ``step`` that its holders lack, in rounds
        (:meth:`_send_rounds`); ``mark(node, error)`` says a holder has them all in
        complete stripes ("") or why not. False once ``stopping`` is set."""
        me = self.holdings.node_id
        self.groups.put(run, step, group)
        with ExitStack() as held:
            blob = self._open_blob(shards, held)
            crcs = tuple(f.crc for f in blob)
            size = sum(f.size for f in blob)
            due: list[Piece] = []
            awaited: dict[str, list[StripeKey]] = {}  # holder -> stripes to complete there
            for stripe, index in group.pieces_of(me):
                key = StripeKey(run, step, str(self.scheme), group.members, stripe)
                for row, node in enumerate(group.parity_nodes(stripe)):
                    there = listings.get(node, Listing({})).stripes.get(key)
                    if there is not None and there.crcs == crcs:
                        if not there.complete:
                            awaited.setdefault(node, []).append(key)
                    elif node in unreachable:
                        mark(node, f"peer {node} unreachable: {unreachable[node]}")
                    else:
                        offset, length = piece_range(size, group.scheme.data, index)
                        due.append(Piece((index, row), node, key, offset, length))
                        awaited.setdefault(node, []).append(key)
            for node in group.holders_of(me):
                if node not in awaited and node not in unreachable:
                    mark(node, "")  # it has all its stripes, complete
            stripes = StripesAwaited(awaited, self._ask_complete, self._up, crcs, mark, stopping)
            try:
                if self._chain_first(run, step, due, group):
                    sent = self._send_chained(due, group, blob, stopping, stripes)
                else:
                    due.sort(key=lambda p: p.round)
                    sent = self._send_rounds(due, blob, stopping, stripes)
                for node, error in sent.items():
                    if error:
                        stripes.failed(node, error)
            finally:
                stripes.end()
        return not stopping.is_set()

    def _send_rounds(self, due: list[Piece], blob: list[RankFile], stopping,
                     stripes: StripesAwaited) -> dict[str, str]:  # fmt: skip
        """Send the pieces one after the other, in rounds of (piece index, parity row): in
        each round every member of the group sends to a different holder (the stripes are
        rotated), so each link carries one stream each way, as with replicas. The next
        piece is opened at its holder (which allocates its parity) while one is sent;
        ``stripes`` hears as each is, and of each stripe it completed. Why each holder
        failed ("": it has all its pieces); a failed holder gets no more."""
        sent: dict[str, str] = {}

        def failed(node: str, key: StripeKey, exc: Exception) -> None:
            reason = error_text(exc)
            if self._said.get(node) != reason:  # once, not at every retry
                log.warning("sending %s's piece of %s to %s failed: %s",
                            self.holdings.node_id, key, node, reason)  # fmt: skip
            self._said[node] = reason
            sent[node] = f"piece to {node} failed: {reason}"

        def open_unless_failed(piece: Piece):
            return None if sent.get(piece.node) else self._open(piece, blob)

        with ThreadPoolExecutor(max_workers=1) as opener:
            opened = [opener.submit(open_unless_failed, p) for p in due[:1]]
            for i, piece in enumerate(due):
                if i + 1 < len(due):
                    opened.append(opener.submit(open_unless_failed, due[i + 1]))
                if stopping.is_set():
                    break
                try:
                    ticket = opened[i].result()
                    if sent.get(piece.node):
                        continue
                    if ticket is not None:
                        self._stream(piece, ticket, blob, stripes)
                    sent[piece.node] = ""
                    stripes.begin()
                except _FAILURES as exc:
                    failed(piece.node, piece.key, exc)
        for node, error in sent.items():
            if not error:
                self._said.pop(node, None)
        return sent

    def _chain_first(self, run: str, step: int, due: list[Piece], group: Group) -> bool:
        """Whether to send ``due`` along chains: under xor, the first time the step is
        sent, with every piece due (the other members then chain it too)."""
        if self.relays is None or (run, step) in self._chained:
            return False
        self._chained[(run, step)] = None
        while len(self._chained) > 64:
            self._chained.popitem(last=False)
        return len(due) == len(group.pieces_of(self.holdings.node_id))

    def _send_chained(self, due: list[Piece], group: Group, blob: list[RankFile], stopping,
                      stripes: StripesAwaited) -> dict[str, str]:  # fmt: skip
        """Send every piece at once along its stripe's chain; why each holder failed (as
        :meth:`_send_rounds`)."""
        sent: dict[str, str] = {}

        def send(piece: Piece) -> None:
            if stopping.is_set():
                return
            try:
                self._chain(piece, group, blob, stripes)
                sent.setdefault(piece.node, "")
                stripes.begin()
            except _FAILURES as exc:
                reason = error_text(exc)
                log.info("the chain of %s from %s broke: %s (sent directly next time)",
                         piece.key, self.holdings.node_id, reason)  # fmt: skip
                sent[piece.node] = f"chain of {piece.key} broke: {reason}"

        with ThreadPoolExecutor(max_workers=len(due), thread_name_prefix="mtckpt-chain") as pool:
            list(pool.map(send, due))
        return sent

    def _chain(self, piece: Piece, group: Group, blob: list[RankFile],
               stripes: StripesAwaited) -> None:  # fmt: skip
        """Add this node's ``piece`` to its upstream's sum (awaited CHAIN_WAIT; none for the
        stripe's first piece) and send the sum on: to the next data node of the stripe, or
        to the holder where that one refuses it or it is the last (idle members skipped).
        Whether the holder said the stripe is complete with it goes to the upstream, then
        to ``stripes``, before anything else is done."""
        index, run = piece.round[0], piece.key.run
        data_nodes = group.data_nodes(piece.key.stripe)
        saving = [n for n in data_nodes if not self._idle_member(run, piece.key.step, n)]
        relay = None
        if index:  # a sum is awaited from a member before it that saves, none from idle ones
            before = any(n in saving for n in data_nodes[:index])
            relay = self.relays.claim(piece.key, CHAIN_WAIT if before else 0.0)
        own = OwnPiece(_parts(blob, piece.offset, piece.length))
        try:
            upstream = relay.contributors if relay is not None else []
            size = max(relay.size if relay is not None else 0, own.size)
            header = pb.ContributeHeader(
                stripe=piece.key.ident(), contributor=self._contributor(blob),
                upstream=[c.info(manifests=True) for c in upstream], piece_size=size,
            )  # fmt: skip
            after = [n for n in data_nodes[index + 1 :] if n in saving]
            following = after[0] if after else piece.node
            to, ticket = following, self._open_at(following, header, piece.node)
            if ticket is _TO_HOLDER:
                to, ticket = piece.node, self._open_at(piece.node, header, piece.node)
            if ticket is None:  # the holder has all these pieces
                return
            started = time.monotonic()
            produced = bulk.Produced(f"{piece.key}: sum sent by {self.holdings.node_id}", size,
                                     lambda: summed_frames(relay, own))  # fmt: skip
            address = self.peers.by_node(to).address
            share = self.bandwidth / group.scheme.data if self.bandwidth else None  # K at once
            completed = bulk.send_produced(host_of(address), ticket.port, ticket.ticket,
                                           produced, tls=self.tls if ticket.tls else None,
                                           bandwidth=share, send_buffer=SEND_BUFFER)  # fmt: skip
            if relay is not None:
                relay.finish(completed)
            self._sent(piece, size, started, completed, stripes)
        finally:
            if relay is not None:
                relay.finish(False)  # nothing more is taken from it (a no-op once finished)
            own.close()

    def _open_at(self, node: str, header: pb.ContributeHeader, holder: str):
        """A ticket to send ``header``'s bytes to ``node``; None if it is the holder and has
        them; _TO_HOLDER if ``node`` is not the holder and takes no sum now (it started
        its chain itself, or is unreachable)."""
        member = self.peers.by_node(node)
        try:
            if member is None:
                raise MtckptError(f"peer {node} is not known")
            return self.peers.client(member.address).open_contribute(header)
        except grpc.RpcError as exc:
            if node == holder and exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                return None
            if node != holder and exc.code() in _NOT_NOW:
                return _TO_HOLDER
            raise
        except MtckptError:
            if node == holder:
                raise
            return _TO_HOLDER

    def _contributor(self, blob: list[RankFile]) -> pb.Contributor:
        return pb.Contributor(
            origin=self.holdings.node_id, ranks=[f.rank for f in blob],
            manifest_crcs=[f.crc for f in blob], data_sizes=[f.size for f in blob],
            manifests=[f.manifest for f in blob],
        )  # fmt: skip

    def _ask_complete(self, node: str, keys: list[StripeKey], wait: float) -> dict | None:
        """What ``node`` has of ``keys`` once they are complete there (or after ``wait``
        seconds); None if it is unreachable."""
        listing = self._listing(node, self.holdings.node_id, keys, wait)
        return listing.stripes if isinstance(listing, Listing) else None

    def _open_blob(self, shards: list[Shard], held: ExitStack) -> list[RankFile]:
        """Each rank's data file, in rank order, held open until ``held`` closes."""
        crc32c = _fastpath.backend().crc32c
        blob = []
        for shard in sorted(shards, key=lambda s: s.rank):
            storage = self.holdings.holding(shard)
            manifest = storage.read_bytes(shard.run, shard.step, naming.manifest_file(shard.rank))
            f = held.enter_context(
                open_held(storage.path(shard.run, shard.step, naming.data_file(shard.rank)))
            )
            size = os.fstat(f.fileno()).st_size
            blob.append(RankFile(shard.rank, f.fileno(), size, manifest, crc32c(manifest)))
        return blob

    def _open(self, piece: Piece, blob: list[RankFile]):
        """A ticket to send ``piece`` to its holder; None if it has it already."""
        header = pb.ContributeHeader(stripe=piece.key.ident(), contributor=self._contributor(blob),
                                     piece_size=piece.length)  # fmt: skip
        return self._open_at(piece.node, header, piece.node)

    def _stream(self, piece: Piece, ticket, blob: list[RankFile],
                stripes: StripesAwaited) -> None:  # fmt: skip
        """Send ``piece`` to its holder; ``stripes`` hears if it completed its stripe."""
        started = time.monotonic()
        address = self.peers.by_node(piece.node).address
        tls = self.tls if ticket.tls else None
        parts = _parts(blob, piece.offset, piece.length)
        completed = bulk.send_parts(host_of(address), ticket.port, ticket.ticket, parts,
                                    tls=tls, bandwidth=self.bandwidth)  # fmt: skip
        self._sent(piece, piece.length, started, completed, stripes)

    def _sent(self, piece: Piece, length: int, started: float, completed: bool,
              stripes: StripesAwaited) -> None:  # fmt: skip
        """``piece`` is at its holder: ``stripes`` hears first if it completed its stripe."""
        if completed:
            stripes.completed(piece.node, piece.key)
        if self.metrics is not None:
            self.metrics.save_seconds.observe(time.monotonic() - started, stage="peers")
            self.metrics.bytes_written.inc(length, tier="peers")
        log.info("sent %s's piece of %s (%d bytes) toward %s%s", self.holdings.node_id,
                 piece.key, length, piece.node,
                 ", which has the stripe complete" if completed else "")  # fmt: skip


def _parts(blob: list[RankFile], offset: int, length: int) -> list[tuple[int, int, int]]:
    """``(fd, offset, length)`` in the rank files for ``length`` bytes at ``offset`` of
    the blob."""
    parts, start, end = [], 0, offset + length
    for f in blob:
        lo, hi = max(offset, start), min(end, start + f.size)
        if lo < hi:
            parts.append((f.fd, lo - start, hi - lo))
        start += f.size
    return parts
