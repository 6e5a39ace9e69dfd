"""Pushing this node's committed shards to the peers chosen to hold them.

Runs in its own thread of the daemon, never in the trainer: woken by a trainer's Notify
or every ``scan_interval`` seconds, it lists the node's own committed shards (the newest
``keep`` steps of each run and its kept sync steps), asks each target peer which it already
holds, and streams the others: sync steps first, then the newest. While its transfers lag
behind the saves it sends sync steps only (daemon/sync.py), and the newest once the saves
pause. A peer that is down leaves the shard degraded (reported in Status) and is caught up
once it answers again. Bytes per second can be capped.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import grpc

from .. import checksum, incremental
from ..errors import MtckptError
from ..format import naming
from ..format.manifest import RankManifest
from ..metrics import Metrics
from ..proto import mtckpt_pb2 as pb
from ..redundancy import Redundancy
from ..tiers.base import close_mapping
from ..tiers.memory import open_held
from . import bulk, frames
from .auth import TLSFiles, host_of
from .encoder import Encoder
from .groups import Group
from .holdings import Holdings, Shard
from .peers import Peers
from .placement import replica_targets
from .rpc import error_text, shard_id
from .sync import Strides, is_sync, sync_steps

log = logging.getLogger(__name__)

DRAIN_PAUSE = 0.05  # seconds between the cycles of a drain that left something pending


@dataclass
class ReplicaState:
    targets: list[str]
    stored: set[str] = field(default_factory=set)
    error: str = ""
    since: float = field(default_factory=time.monotonic)  # when the shard was first listed

    @property
    def complete(self) -> bool:
        return set(self.targets) <= self.stored


class Replicator:
    def __init__(
        self,
        holdings: Holdings,
        peers: Peers,
        *,
        zone: str,
        scheme: Redundancy,
        bandwidth: float | None = None,
        scan_interval: float = 0.5,
        tls: TLSFiles | None = None,
        metrics: Metrics | None = None,
        strides: Strides | None = None,
        on_change: Callable[[], None] = lambda: None,
        incremental: bool = True,
    ) -> None:
        """``on_change`` is called after the replication state changes (Status waiters);
        ``incremental``: a peer holding an earlier step of a shard's lineage gets only the
        blocks changed since."""
        self.holdings, self.peers, self.metrics = holdings, peers, metrics
        self.incremental = incremental
        self.strides = strides or Strides()
        self._stride = 1  # the cluster's, as last logged
        self._pushes = 0  # shards sent
        self._began = 0.0  # monotonic time the step being sent began
        self._sending = 0.0  # seconds the last step took to send
        self.on_change = on_change
        self.zone, self.scheme, self.replicas = zone, scheme, 0 if scheme.coded else scheme.data
        self.encoder = None
        if scheme.coded:
            self.encoder = Encoder(holdings, peers, scheme, zone, tls=tls, bandwidth=bandwidth,
                                   metrics=metrics, sends_now=self.strides.sends_now)  # fmt: skip
        self.relays = self.encoder.relays if self.encoder is not None else None  # sums passing
        self.bandwidth, self.scan_interval, self.tls = bandwidth, scan_interval, tls
        self.state: dict[Shard, ReplicaState] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._cycles = 0
        self._short = ""  # why fewer peers than wanted hold copies, as last logged
        self._listed_once = False  # whether a cycle has listed this node's shards
        self._cycle_done = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name="mtckpt-replicator", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def snapshot(self) -> dict[Shard, ReplicaState]:
        with self._lock:
            return {
                s: ReplicaState(list(r.targets), set(r.stored), r.error, r.since)
                for s, r in self.state.items()
            }

    def drain(self, timeout: float) -> bool:
        """Run replication until nothing reachable is pending (or ``timeout``); whether it
        finished."""
        deadline = time.monotonic() + timeout
        if not self.state and not self._newest_own_shards():
            return True  # nothing of this node's to send
        with self._lock:
            # A cycle under way may have listed the shards before the last commit: only
            # one that starts after this call counts, hence the next but one.
            seen = self._cycles + 1
        while time.monotonic() < deadline:
            self._wake.set()
            with self._lock:
                self._cycle_done.wait_for(
                    lambda s=seen: self._cycles > s, deadline - time.monotonic()
                )
                if self._cycles <= seen:
                    continue
                seen = self._cycles
                if not self._pending_reachable():
                    return True
            time.sleep(min(DRAIN_PAUSE, max(0.0, deadline - time.monotonic())))  # not a spin
        return False

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=0.2)
        if self._thread.is_alive():  # in a call to a peer: closing the channels ends it
            self.peers.close()
            self._thread.join(timeout=10)

    def _pending_reachable(self) -> bool:
        reachable = {m.node_id for m in self.peers.members() if m.reachable}
        return any((set(r.targets) - r.stored) & reachable for r in self.state.values())

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.scan_interval)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self.cycle()
            except Exception:  # keep replicating; the next cycle retries
                log.exception("replication cycle failed")
            with self._lock:
                self._cycles += 1
                self._cycle_done.notify_all()

    def cycle(self) -> None:
        """One scan: list the node's newest shards, ask each target peer what it holds of
        them, and push what it lacks, newest steps first."""
        if not self.peers.refreshed.is_set():
            return  # who the peers are is not known yet: placing now would misplace
        me = self.holdings.node_id
        stride = self._sync_stride()
        own = self._newest_own_shards(stride)
        shards = list(own)
        groups: dict[tuple[str, int], Group] = {}  # coded: the group each step goes to
        targets_of: dict[tuple[str, int], list[str]] = {}  # and its holders (else: targets)
        if self.encoder is not None:
            group, targets, watched, short = self.encoder.place()
            listings = self.encoder.listings
            if group is not None:
                steps = {(s.run, s.step) for s in shards}
                groups = {k: self.encoder.group_to_send(*k, group) for k in steps}
                targets_of = {k: g.holders_of(me) for k, g in groups.items()}
                targets = sorted({n for holders in targets_of.values() for n in holders})
        else:
            targets = self.replica_targets()
            listings, short, watched = self._listings, "", targets
            if len(targets) < self.replicas:
                short = f"{self.replicas} replicas wanted, {len(targets)} other daemon(s) known"
        self.peers.watch(watched)
        # A shard saved since the last cycle is held by no peer yet: a coded step of such
        # shards is sent at once, its holders asked what they hold only if it is not.
        fresh = {s for s in shards if s not in self.state} if self._listed_once else set()
        self._listed_once = True
        listed = functools.cache(lambda: listings(targets, me) if shards else ({}, {}))
        if self.encoder is None:
            held_by, unreachable = listed()
        if short != self._short:  # said once per change, not every scan
            self._short = short
            if short:
                log.warning("replication degraded: %s", short)
        with self._lock:
            self.state = {s: self.state.get(s) or ReplicaState([]) for s in shards}
            for shard in shards:
                state = self.state[shard]
                chosen = targets_of.get((shard.run, shard.step), targets)
                state.targets = list(chosen)
                state.stored &= set(chosen)
                if short:  # reported from the start, not once the pushes are done
                    state.error = short
        self.on_change()
        current, began, pushes = None, 0, 0
        for shard in shards:
            if current != (shard.run, shard.step):
                self._measure_lag(current, began, pushes)
                if current is not None and self._wake.is_set():
                    return  # a newer step was saved meanwhile: it goes next, not this older one
                current, pushes = (shard.run, shard.step), self._pushes
                began, self._began = self._newest(shard.run), time.monotonic()
                step_group = groups.get((shard.run, shard.step))
                if step_group is not None and not self._encode(shard, shards, step_group, listed,
                                                               fresh):  # fmt: skip
                    return
            if self.encoder is None and not self._replicate(
                shard, own[shard], targets, held_by, unreachable
            ):
                return
            with self._lock:
                if self.state.get(shard) is not None and self.state[shard].complete:
                    self.state[shard].error = short
            self.on_change()
        self._measure_lag(current, began, pushes)

    def replica_targets(self) -> list[str]:
        """The peers chosen to hold this node's replicas (under ``replicas:R``)."""
        members = [(m.node_id, m.zone) for m in self.peers.members() if m.node_id]
        return replica_targets(self.holdings.node_id, self.zone, members, self.replicas)

    def _encode(self, first: Shard, shards: list[Shard], group, listed: Callable[[], tuple],
                fresh: set[Shard]) -> bool:  # fmt: skip
        """Send this node's pieces of ``first``'s step to its group (asking the holders
        what they hold unless the step's shards are all ``fresh``); False once stopping."""
        step_shards = [s for s in shards if (s.run, s.step) == (first.run, first.step)]
        listings, unreachable = ({}, {}) if fresh.issuperset(step_shards) else listed()

        def mark(node: str, error: str) -> None:
            with self._lock:
                for shard in step_shards:
                    state = self.state.get(shard)
                    if state is None:
                        continue
                    if error:
                        state.stored.discard(node)
                        state.error = error
                    else:
                        state.stored.add(node)
                        state.error = "" if state.complete else state.error
            self.on_change()

        try:
            sent = self.encoder.send_step(first.run, first.step, step_shards, group, listings,
                                          unreachable, mark, self._stopping)  # fmt: skip
        except FileNotFoundError:
            log.info("run %r step %d expired before its pieces were sent (newer steps go first)",
                     first.run, first.step)  # fmt: skip
            with self._lock:
                for shard in step_shards:
                    self.state.pop(shard, None)
            self.on_change()
            return True
        self._pushes += 1
        return sent

    def group_for(self, run: str, step: int):
        """The coded group this node's pieces of ``step`` went to (None: not sent, or
        replicas)."""
        return None if self.encoder is None else self.encoder.group_for(run, step)

    def _newest(self, run: str) -> int:
        return max(self.holdings.own.steps(run), default=0)

    def _measure_lag(self, current: tuple[str, int] | None, began: int, pushes: int) -> None:
        """Steps saved while a step's shards were sent (from ``began``, the newest then),
        where any was sent: the lag behind the saves that sets this node's stride."""
        if current is not None and self._pushes > pushes:
            self.strides.lagged(self._newest(current[0]) - began)
            self._sending = time.monotonic() - self._began

    def _quiet(self, run: str, newest: int) -> bool:
        """Whether steps other than sync steps are sent: unless this node lags, or the
        saves have paused for as long as a step takes to send (a lagging node's newest
        step reaches its peers once the saves stop)."""
        if self.strides.own == 1:
            return True
        committed = self.holdings.own.modified(run, newest, naming.COMMIT)
        return committed is not None and time.time() - committed >= self._sending

    def _sync_stride(self) -> int:
        """The cluster's sync stride, after keeping this node's newest sync steps (and
        releasing the others) to match it."""
        stride = self.strides.cluster()
        if stride != self._stride:
            log.warning("the cluster's replication stride is now %d (this node's %d): %s",
                        stride, self.strides.own,
                        "every step replicated" if stride == 1 else
                        f"steps {stride} apart are sent first and kept")  # fmt: skip
            self._stride = stride
        kept = self.holdings.kept
        for run in self.holdings.runs(self.holdings.own):
            steps = self.holdings.own.steps(run) + kept.steps(run)
            sync = set(sync_steps(steps, stride))
            for step in sorted(sync):
                kept.keep(run, step)
            kept.release(run, sync)
        return stride

    def keep_if_sync(self, run: str, step: int) -> None:
        """A trainer committed ``step``: keep it now if it is a sync step (before the
        trainers expire it, which may be before the next cycle)."""
        stride = self.strides.cluster()
        if stride > 1 and is_sync(step, stride):
            self.holdings.kept.keep(run, step)

    def _newest_own_shards(self, stride: int = 1) -> dict[Shard, int]:
        """This node's shards to send, in order, with their manifests' crc32c: sync steps
        newest first, then the newest ``keep`` steps of each run unless this node lags
        (then sync steps only, until the saves pause)."""
        own = self.holdings.list(origin=self.holdings.node_id)
        newest: dict[str, list[int]] = {}
        for held in own:
            newest.setdefault(held.shard.run, []).append(held.shard.step)
        keep = {
            run: set(sorted(set(steps))[-self.holdings.keep :]) for run, steps in newest.items()
        }
        sync = {run: set(sync_steps(steps, stride)) for run, steps in newest.items()}
        newest_too = {run: self._quiet(run, max(steps)) for run, steps in newest.items()}
        chosen = sorted(
            (h for h in own if h.shard.step in sync[h.shard.run]
             or (newest_too[h.shard.run] and h.shard.step in keep[h.shard.run])),
            key=lambda h: (h.shard.step not in sync[h.shard.run], -h.shard.step, h.shard.run,
                           h.shard.rank),
        )  # fmt: skip
        return {h.shard: h.manifest_crc for h in chosen}

    def _listings(
        self, targets: list[str], me: str
    ) -> tuple[dict[str, set[tuple[Shard, int]]], dict[str, str]]:
        """What each target holds of this node's shards (with their manifests' crc32c: a
        replica of an earlier save of the step is not this one), and why the unreachable
        ones are."""
        held_by: dict[str, set[tuple[Shard, int]]] = {}
        unreachable: dict[str, str] = {}
        for node in targets:
            member = self.peers.by_node(node)
            try:
                listing = self.peers.client(member.address).list_shards(origin=me)
            except grpc.RpcError as exc:
                unreachable[node] = error_text(exc)
                continue
            held_by[node] = {
                (Shard(i.shard.run, i.shard.step, i.shard.rank, i.shard.origin), i.manifest_crc)
                for i in listing.shards
            }
        return held_by, unreachable

    def _replicate(
        self,
        shard: Shard,
        manifest_crc: int,
        targets: list[str],
        held_by: dict[str, set[tuple[Shard, int]]],
        unreachable: dict[str, str],
    ) -> bool:
        """Push ``shard`` to every target that lacks this save of it (its manifest's
        crc32c); False once stopping."""
        state = self.state[shard]
        for node in targets:
            if self._stopping.is_set():
                return False
            if (shard, manifest_crc) in held_by.get(node, ()):
                with self._lock:
                    state.stored.add(node)
                self.on_change()
                continue
            if node in unreachable:
                with self._lock:
                    state.error = f"peer {node} unreachable: {unreachable[node]}"
                self.on_change()
                continue
            started = time.monotonic()
            try:
                size = self.push(shard, self.peers.by_node(node).address, held_by.get(node, ()))
            except (grpc.RpcError, OSError, MtckptError) as exc:
                expired = isinstance(exc, FileNotFoundError)
                if expired or not self._held(shard):
                    # The trainer's retention removed the step before its send began (one
                    # being sent is held: it finishes).
                    log.info("%s expired before it was sent to %s (newer steps go first)",
                             shard, node)  # fmt: skip
                    with self._lock:
                        self.state.pop(shard, None)
                    self.on_change()
                    return True
                reason = error_text(exc)
                error = f"push to {node} failed: {reason}"
                if error != state.error:  # said once, not at every retry
                    log.warning("replicating %s to %s failed: %s", shard, node, reason)
                with self._lock:
                    state.error = error
                self.on_change()
                continue
            if self.metrics is not None:
                self.metrics.save_seconds.observe(time.monotonic() - started, stage="peers")
                self.metrics.bytes_written.inc(size, tier="peers")
            self._pushes += 1
            with self._lock:
                state.stored.add(node)
            self.on_change()
        return True

    def _held(self, shard: Shard) -> bool:
        try:
            self.holdings.holding(shard)
        except FileNotFoundError:
            return False
        return True

    def push(self, shard: Shard, address: str, held: Iterable[tuple[Shard, int]] = ()) -> int:
        """Send a shard to the peer at ``address``: over its data port (bulk.py), or as a
        gRPC stream where the peer has none; only the blocks changed since an earlier step
        of its lineage the peer ``held``, where there is one. The bytes sent."""
        storage = self.holdings.holding(shard)
        manifest = storage.read_bytes(shard.run, shard.step, naming.manifest_file(shard.rank))
        path = storage.path(shard.run, shard.step, naming.data_file(shard.rank))
        client = self.peers.client(address)
        described = RankManifest.from_json(manifest, f"{shard}: manifest")
        with open_held(path) as f:  # the trainer does not reuse it while it is sent
            size = os.fstat(f.fileno()).st_size
            base, runs = self._base(shard, described, held)
            header = pb.PushHeader(shard=shard_id(shard), manifest=manifest, data_size=size,
                                   base_step=base)  # fmt: skip
            try:
                ticket = client.open_push(header)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and base:
                    log.info("%s goes to %s whole: %s", shard, address, exc.details())
                    header.base_step, base = 0, 0
                    ticket = client.open_push(header)
                elif exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                else:
                    header.base_step, base, ticket = 0, 0, None
            if ticket is not None:
                host = host_of(address)
                tls = self.tls if ticket.tls else None
                if base:
                    parts = [(f.fileno(), offset, length) for offset, length in runs]
                    bulk.send_parts(host, ticket.port, ticket.ticket, parts, tls=tls,
                                    bandwidth=self.bandwidth)  # fmt: skip
                    size = sum(length for _, length in runs)
                else:
                    bulk.send(host, ticket.port, ticket.ticket, f.fileno(), described, tls=tls,
                              bandwidth=self.bandwidth)  # fmt: skip
            else:
                mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else b""
                try:
                    client.push(frames.push_messages(header, mapping, self.bandwidth))
                finally:
                    close_mapping(mapping)
        log.info("replicated %s to %s (%d bytes%s)", shard, address, size,
                 f", changed since step {base}" if base else "")  # fmt: skip
        return size

    def _base(self, shard: Shard, manifest: RankManifest,
              held: Iterable[tuple[Shard, int]]) -> tuple[int, list[tuple[int, int]]]:  # fmt: skip
        """The newest earlier step of ``shard`` the peer ``held`` that this node still has
        the same save of, if it is of the step's lineage and some block is unchanged since:
        (that step, the runs of changed blocks to send); (0, []) to send it whole."""
        same = (shard.run, shard.rank, shard.origin)
        earlier = [(s.step, crc) for s, crc in held
                   if s.step < shard.step and (s.run, s.rank, s.origin) == same]  # fmt: skip
        if not self.incremental or manifest.changes is None or not earlier:
            return 0, []
        step, crc = max(earlier)
        try:
            raw = self.holdings.holding(replace(shard, step=step)).read_bytes(
                shard.run, step, naming.manifest_file(shard.rank))  # fmt: skip
        except FileNotFoundError:
            return 0, []
        base = RankManifest.from_json(raw, f"{shard.run} step {step}: manifest")
        if checksum.crc32c(raw) != crc or not incremental.continues(manifest, base):
            return 0, []
        changed = incremental.changed_blocks(manifest, base)
        if len(changed) == len(manifest.changes.since):
            return 0, []
        return step, incremental.runs_of(changed, manifest.changes.block_size, manifest.file_size)
