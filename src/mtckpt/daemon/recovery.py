"""Bringing a node's shards back from its peers after the node was lost.

A replacement node's daemon starts with empty roots and the lost node's id. Recovery
lists what every reachable daemon holds, takes the newest step that is complete for all
ranks across them (or the step asked for), and fetches the shards saved by this node id
from the peers holding replicas, several at once and spread over the sources, a large
shard from all its holders at once (a run of chunks from each), verifying each chunk
against the manifest as it arrives; a bad or unreachable source is replaced by the next
one. Shards this node's local tier still holds (a daemon restarted after its
memory tier was lost) or its daemon kept (a sync step the trainers expired) are copied
from there instead. The shards land in this node's memory tier with the step's COMMIT, so
the trainer then restores at memory speed; with a local root, :func:`persist` then writes
them to the local tier too. A daemon whose memory tier holds none of its own shards (a
replacement) starts recovering every run its peers hold shards of at once, before its
trainers ask (:class:`Recoveries`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from .. import _fastpath, tiercopy
from ..errors import (
    CorruptCheckpointError,
    MtckptError,
    StepNotFoundError,
)
from ..format import commit
from ..format.manifest import RankManifest
from . import bulk, frames, rebuild
from .auth import host_of
from .holdings import Holdings, Shard
from .peers import Peers
from .rpc import error_text, shard_id

log = logging.getLogger(__name__)

SPLIT_BYTES = 64 << 20  # a shard at least this large comes from all its holders at once


@dataclass
class Recovered:
    step: int
    ranks: list[int]
    bytes: int = 0
    sources: list[str] = field(default_factory=list)
    world_size: int = 0
    complete: list[int] = field(default_factory=list)  # across the daemons, newest first
    unreachable: list[str] = field(default_factory=list)  # peers that did not answer


@dataclass
class _Copy:
    node: str
    address: str | None  # None: this daemon, or rebuilt from its coded group
    shard: Shard
    world_size: int
    coded: bool = False  # not held whole anywhere: its group can rebuild it
    manifest_crc: int | None = None  # as its holder listed it


class Recoveries:
    """A node's recoveries, one per run at a time: asked for by its trainers (every rank of
    the node asks; the first fetches, the others then find the shards here) or, at the
    start of a daemon whose memory tier holds none of its own shards, by the daemon for
    every run its peers hold shards of, so the trainers' restore finds them here."""

    def __init__(self, holdings: Holdings, peers: Peers,
                 on_recovered: Callable[[str, Recovered, float], None]) -> None:  # fmt: skip
        """``on_recovered(run, result, seconds)``: after each recovery (persist, count)."""
        self.holdings, self.peers, self.on_recovered = holdings, peers, on_recovered
        self._lock = threading.Lock()
        self._runs: dict[str, threading.Lock] = {}
        self._fetched: dict[str, Recovered] = {}  # each run's last fetch from peers

    def recover(self, run: str, step: int | None = None,
                none_is_an_answer: bool = False) -> Recovered:  # fmt: skip
        """:func:`recover`, after any recovery of ``run`` under way. A step an earlier
        recovery fetched comes back with that fetch's bytes and sources."""
        started = time.monotonic()
        with self._lock:
            lock = self._runs.setdefault(run, threading.Lock())
        with lock:
            result = recover(self.holdings, self.peers, run, step, none_is_an_answer)
            earlier = self._fetched.get(run)
            if result.bytes:
                self._fetched[run] = result
        self.on_recovered(run, result, time.monotonic() - started)
        if not result.bytes and earlier is not None and earlier.step == result.step:
            return dataclasses.replace(result, bytes=earlier.bytes, sources=earlier.sources)
        return result

    def start(self) -> threading.Thread | None:
        """Recover in the background where this node's memory tier holds none of its own
        shards; the thread, or None."""
        me = self.holdings.node_id
        if any(h.shard.origin == me for h in self.holdings.list()):
            return None
        thread = threading.Thread(target=self._at_start, name="mtckpt-recover-at-start",
                                  daemon=True)  # fmt: skip
        thread.start()
        return thread

    def _at_start(self) -> None:
        me = self.holdings.node_id
        self.peers.refresh(everyone=True)
        runs: set[str] = set()
        for member in self.peers.members():
            if not member.reachable:
                continue
            try:
                listing = self.peers.client(member.address).list_shards(origin=me)
            except grpc.RpcError as exc:
                log.info("recovery at start: %s did not list: %s", member.name(), error_text(exc))
                continue
            runs.update(info.shard.run for info in listing.shards)
            runs.update(info.stripe.run for info in listing.parities)  # a coded group's
        for run in sorted(runs):
            try:
                self.recover(run, none_is_an_answer=True)
            except Exception as exc:  # the trainers' restore asks again, and says why
                log.warning("recovery at start: run %r: %s", run, exc)


def _copies(holdings: Holdings, peers: Peers, run: str, unreachable: list[str],
            listings: list) -> list[_Copy]:  # fmt: skip
    """Every copy of ``run``'s shards this daemon and its reachable peers list; the peers
    that did not list go in ``unreachable``, the listings of those that did in
    ``listings`` as ``(node, address, reply)``."""
    copies = [_Copy(holdings.node_id, None, h.shard, h.world_size) for h in holdings.list(run=run)]
    for member in peers.members():
        if not member.reachable:
            unreachable.append(member.name())
            continue
        try:
            listing = peers.client(member.address).list_shards(run=run)
        except grpc.RpcError as exc:
            log.warning("recovery: %s did not list: %s", member.name(), error_text(exc))
            unreachable.append(member.name())
            continue
        listings.append((listing.node_id, member.address, listing))
        for info in listing.shards:
            s = info.shard
            shard = Shard(s.run, s.step, s.rank, s.origin)
            copies.append(_Copy(listing.node_id, member.address, shard, info.world_size,
                                manifest_crc=info.manifest_crc))  # fmt: skip
    return copies


def _coded_copies(copies: list[_Copy], listings: list, run: str,
                  reasons: list[str]) -> tuple[dict, list[_Copy]]:  # fmt: skip
    """The coded view of each step with parities listed, and a copy for each rank no daemon
    holds whole that its coded group can rebuild (why the others cannot go in ``reasons``)."""
    steps = {p.stripe.step for _, _, reply in listings for p in reply.parities if p.complete}
    views, found = {}, []
    for step in sorted(steps):
        coded = views[step] = rebuild.collect(listings, step)
        whole = {(c.shard.origin, c.shard.rank) for c in copies if c.shard.step == step}
        for origin, member in coded.members.items():
            lacking = [r for r in member.ranks if (origin, r) not in whole]
            if not lacking:
                continue
            reason = rebuild.why_not(coded, origin, run, step)
            if reason:
                log.warning("recovery: run %r step %d: %s", run, step, reason)
                reasons.append(f"step {step}: {reason}")
                continue
            found += [_Copy(origin, None, Shard(run, step, r, origin), member.world_size, True)
                      for r in lacking]  # fmt: skip
    return views, found


def recover(holdings: Holdings, peers: Peers, run: str, step: int | None = None,
            none_is_an_answer: bool = False) -> Recovered:  # fmt: skip
    """This node's shards of ``step`` (or the newest step complete across the daemons)
    in its memory tier; StepNotFoundError where there is none, or with
    ``none_is_an_answer`` step -1 and no steps complete."""
    peers.refresh(everyone=True)
    unreachable: list[str] = []
    listings: list = []
    copies = _copies(holdings, peers, run, unreachable, listings)
    reasons: list[str] = []
    views, rebuildable = _coded_copies(copies, listings, run, reasons)
    copies += rebuildable
    by_step: dict[int, list[_Copy]] = {}
    for copy in copies:
        by_step.setdefault(copy.shard.step, []).append(copy)
    complete = sorted((s for s, found in by_step.items() if _complete(found)), reverse=True)
    if step is None and not complete and none_is_an_answer:
        return Recovered(-1, [], unreachable=unreachable)
    if step is None and not complete:
        raise StepNotFoundError(
            f"run {run!r}: no step is complete for every rank across this daemon and its "
            f"{len(peers.members())} peer(s) (steps seen: {sorted(by_step, reverse=True)[:10]})"
            + "".join(f"; {r}" for r in reasons[:4])
        )
    if step is not None and step not in complete:
        raise StepNotFoundError(
            f"run {run!r} step {step} is not complete for every rank across the daemons; "
            f"complete steps: {complete[:10] or 'none'}" + "".join(f"; {r}" for r in reasons[:4])
        )
    candidates = complete if step is None else [step]
    for tried, chosen in enumerate(candidates):
        result = Recovered(chosen, [], complete=complete[tried:], unreachable=unreachable)
        try:
            return _bring_back(holdings, peers, run, by_step[chosen], views.get(chosen), result)
        except CorruptCheckpointError as exc:
            if tried + 1 == len(candidates):
                raise
            log.warning("recovery: run %r step %d cannot be brought back (%s); trying step %d",
                        run, chosen, exc, candidates[tried + 1])  # fmt: skip
    raise AssertionError("unreachable")


def _bring_back(holdings: Holdings, peers: Peers, run: str, found: list[_Copy],
                coded_view, result: Recovered) -> Recovered:  # fmt: skip
    """This node's shards of ``result.step`` from the ``found`` copies into its memory tier:
    from its local tier or kept steps, rebuilt from its coded group, or fetched whole."""
    me, chosen = holdings.node_id, result.step
    world = found[0].world_size
    mine = result.ranks = sorted({c.shard.rank for c in found if c.shard.origin == me})
    in_memory = commit.ranks_present(holdings.own, run, chosen)
    for storage in holdings.own_storages()[1:]:  # the local tier, the kept sync steps
        present = commit.ranks_present(storage, run, chosen)
        for rank in sorted((set(mine) - in_memory) & present):
            try:
                result.bytes += tiercopy.copy_shard(storage, holdings.own, run, chosen, rank)
            except (MtckptError, OSError) as exc:
                log.warning("recovery: rank %d from %s failed: %s; trying the peers",
                            rank, storage.describe(), exc)  # fmt: skip
                continue
            in_memory.add(rank)
            if storage.name not in result.sources:
                result.sources.append(storage.name)
    coded = sorted(c.shard.rank for c in found if c.coded and c.shard.origin == me)
    if set(coded) - in_memory:
        size, nodes = rebuild.rebuild(holdings, peers, coded_view, run, chosen,
                                      sorted(set(coded) - in_memory))  # fmt: skip
        result.bytes += size
        result.sources += [n for n in nodes if n not in result.sources]
        in_memory |= set(coded)
    missing = [rank for rank in mine if rank not in in_memory]
    if missing:
        sources = {
            rank: [c for c in found if c.shard.rank == rank and c.shard.origin == me and c.address]
            for rank in missing
        }
        with ThreadPoolExecutor(max_workers=min(4, len(missing))) as pool:
            fetched = list(pool.map(
                lambda item: _fetch(holdings, peers, item[1], item[0]),
                enumerate(sources[rank] for rank in missing),
            ))  # fmt: skip
        for size, nodes in fetched:
            result.bytes += size
            result.sources += [n for n in nodes if n not in result.sources]
    if mine:  # a node that saved nothing of this step has nothing to commit
        commit.try_commit(holdings.own, run, chosen, world, mine)
    result.world_size = world
    log.info(
        "recovered run %r step %d ranks %s: %d bytes from %s",
        run, chosen, mine, result.bytes, result.sources or "this node",
    )  # fmt: skip
    return result


def persist(holdings: Holdings, run: str, recovered: Recovered) -> None:
    """Write a recovered step's shards from the memory tier to the local tier (those it
    lacks) and commit it there: the node survives a restart of its memory tier too."""
    local, step = holdings.local, recovered.step
    if local is None or not recovered.ranks:
        return
    for rank in sorted(set(recovered.ranks) - commit.ranks_present(local, run, step)):
        tiercopy.copy_shard(holdings.own, local, run, step, rank)
    commit.try_commit(local, run, step, recovered.world_size, recovered.ranks)
    log.info("run %r step %d ranks %s written to %s", run, step, recovered.ranks,
             local.describe())  # fmt: skip


def _complete(copies: list[_Copy]) -> bool:
    worlds = {c.world_size for c in copies}
    if len(worlds) != 1:
        return False
    return {c.shard.rank for c in copies} >= set(range(worlds.pop()))


def _fetch(holdings: Holdings, peers: Peers, sources: list[_Copy],
           turn: int) -> tuple[int, list[str]]:  # fmt: skip
    """Fetch one shard from the first source that gives it whole and verified, starting
    at a different source for each shard to spread the load; a large shard comes from
    that source and every other holding the same save at once. Its size, and from whom."""
    problems = []
    order = sources[turn % len(sources) :] + sources[: turn % len(sources)]
    for source in order:
        shard = source.shard
        ident = shard_id(shard)
        client = peers.client(source.address)
        try:
            pieces = frames.verified(client.fetch(ident, manifest=True), _where(source))
            manifest = b"".join(data for _, data in pieces)
            crc = _fastpath.backend().crc32c(manifest)
            used = [source]
            if _data_size(manifest) >= SPLIT_BYTES:
                used += [s for s in order if s is not source and s.manifest_crc == crc]
            if len(used) > 1:
                size, served = _pull_split(holdings, peers, used, manifest)
            else:
                size, served = _pull(holdings, peers, source, manifest), [source.node]
        except (grpc.RpcError, MtckptError, OSError) as exc:
            reason = error_text(exc)
            log.warning(
                "recovery: %s from %s failed: %s; trying another source", shard, source.node, reason
            )
            problems.append(f"{source.node}: {reason}")
            continue
        return size, served
    raise CorruptCheckpointError(
        f"no peer could provide {sources[0].shard}: {'; '.join(problems) or 'no source'}"
    )


def _pull(holdings: Holdings, peers: Peers, source: _Copy, manifest: bytes) -> int:
    """A shard's data file from ``source``: over its data port, or as a gRPC stream where
    it has none; verified, then committed here. Returns its size."""
    client, ident = peers.client(source.address), shard_id(source.shard)
    try:
        ticket = client.open_fetch(ident)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        pieces = frames.verified(client.fetch(ident), _where(source))
        return holdings.store(source.shard, manifest, pieces)
    incoming = holdings.receive(source.shard, manifest)
    try:
        host = host_of(source.address)
        tls = peers.tls if ticket.tls else None
        bulk.fetch(host, ticket.port, ticket.ticket, incoming, tls=tls)
        incoming.commit()
    finally:
        incoming.close()
    return incoming.size


def _data_size(manifest: bytes) -> int:
    return RankManifest.from_json(manifest, "a fetched manifest").file_size


def _pull_split(holdings: Holdings, peers: Peers, sources: list[_Copy],
                manifest: bytes) -> tuple[int, list[str]]:  # fmt: skip
    """A shard's data file from every peer in ``sources`` at once (each holds the same
    save), a run of whole chunks from each over its data port, each chunk checked against
    the manifest; a run whose peer fails comes from the others. Committed here; its size
    and the peers that served it."""
    shard = sources[0].shard
    incoming = holdings.receive(shard, manifest)
    try:
        ranges = incoming.ranges(len(sources))

        def fill(turn: int) -> str:
            part, problems = ranges[turn], []
            for source in sources[turn:] + sources[:turn]:
                try:
                    ticket = peers.client(source.address).open_fetch(
                        shard_id(shard), offset=part.lo, length=part.size
                    )
                    tls = peers.tls if ticket.tls else None
                    bulk.fetch(host_of(source.address), ticket.port, ticket.ticket, part, tls=tls)
                    return source.node
                except (grpc.RpcError, MtckptError, OSError) as exc:
                    problems.append(f"{source.node}: {error_text(exc)}")
                    log.warning("recovery: %s from %s failed: %s; trying another source",
                                part.where, source.node, problems[-1])  # fmt: skip
                    part.received = 0  # from the start of the run, from the next peer
            raise CorruptCheckpointError(f"{part.where}: no peer could provide it: "
                                         f"{'; '.join(problems)}")  # fmt: skip

        with ThreadPoolExecutor(max_workers=len(ranges)) as pool:
            served = [pool.submit(fill, turn) for turn in range(len(ranges))]
            nodes = list(dict.fromkeys(done.result() for done in served))
        incoming.filled()
        incoming.commit()
    finally:
        incoming.close()
    log.info("recovery: %s from %s at once", shard, nodes)
    return incoming.size, nodes


def _where(source: _Copy) -> str:
    return f"{source.shard} from {source.node}"
