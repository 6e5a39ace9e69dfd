"""The other daemons: from a static address list or a DNS name resolving to all of them
(a Kubernetes headless service), re-read on every refresh, so daemons that go away or
appear are noticed without restarting the others. A peer keeps its identity (node id,
zone) from its last answer while unreachable, so replica placement does not move when a
peer is briefly down.

Membership costs each daemon the same at any cluster size: a peer is asked who it is
until it answers once; after that only the peers this node replicates to (``watch``) are
asked again, every refresh, and one that does not answer is asked again after a backoff
(doubling up to BACKOFF_MAX); the others' state (Status, metrics) is as of their last
answer, and their connections close once unused for IDLE_CHANNEL seconds. A listed
address that never answered (a daemon not started yet) is asked again at most every
BACKOFF_MAX_NEVER seconds (whatever the scan interval), and sooner once a peer reports
having reached it. Recovery
asks everyone (``refresh(everyone=True)``). A peer that stops answering is logged at once
with its id, address and reason, then every REPORT_EVERY seconds with how long it has
been gone; its return is logged too."""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from ..format import naming
from .auth import TLSFiles
from .rpc import Client, error_text
from .sync import Strides, check_stride

log = logging.getLogger(__name__)


BACKOFF_MAX = 5.0  # seconds between probes of a peer that does not answer, at most
BACKOFF_MAX_NEVER = 30.0  # the same for an address that never answered (not started yet)
REPORT_EVERY = 30.0  # seconds between log lines about a peer still gone
UNKNOWN_GRACE = 5.0  # a peer never reached is logged once this long without an answer
MAX_HINTS = 100_000  # members taken from one peer's Status, at most
IDLE_CHANNEL = 600.0  # seconds unused before the channel to a peer not watched is closed


@dataclass
class Member:
    address: str
    node_id: str = ""
    zone: str = ""
    reachable: bool = False
    error: str = ""
    down_since: float | None = None  # monotonic time it stopped answering
    failures: int = 0  # probes in a row without an answer
    next_probe: float = 0.0
    reported: float | None = None  # when its absence was last logged
    hinted: bool = False  # identity as a peer reported it: asked once at the next refresh

    def name(self) -> str:
        return f"peer {self.node_id or '?'} ({self.address})"


class Peers:
    def __init__(
        self,
        node_id: str,
        addresses: list[str] | None = None,
        dns: str | None = None,
        *,
        token: str | None = None,
        tls: TLSFiles | None = None,
        timeout: float = 1.0,
        strides: Strides | None = None,
    ) -> None:
        self.node_id = node_id
        self.strides = strides
        self._static = list(addresses or [])
        self._dns = dns
        self._token, self.tls, self._timeout = token, tls, timeout
        self._members: dict[str, Member] = {}
        self._clients: dict[str, Client] = {}
        self._watched: set[str] = set()
        self._used: dict[str, float] = {}  # address -> when its client was last taken
        self._hints: dict[str, tuple[str, str]] = {}  # address -> (node id, zone) per a peer
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.refreshed = threading.Event()  # set once every listed peer was asked once

    def addresses(self) -> list[str]:
        if not self._dns:
            return list(self._static)
        host, _, port = self._dns.rpartition(":")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            log.warning("peer discovery: cannot resolve %s: %s", self._dns, exc)
            return list(self._members)
        found = []
        for family, _, _, _, sockaddr in infos:
            ip = sockaddr[0]
            address = (
                f"[{ip}]:{sockaddr[1]}" if family == socket.AF_INET6 else f"{ip}:{sockaddr[1]}"
            )
            if address not in found:
                found.append(address)
        return found

    def client(self, address: str) -> Client:
        with self._lock:
            self._used[address] = time.monotonic()
            if address not in self._clients:
                self._clients[address] = Client(
                    address, token=self._token, tls=self.tls, timeout=30.0
                )
            return self._clients[address]

    def watch(self, node_ids: list[str]) -> None:
        """Keep asking these peers (the replica targets) whether they are up."""
        with self._lock:
            self._watched = set(node_ids)

    def start(self, interval: float) -> None:
        """Refresh every ``interval`` seconds on a thread of its own, so a peer that stops
        answering is noticed while transfers to it hang."""

        def run() -> None:
            while not self._closed.is_set():
                try:
                    self.refresh()
                except Exception:  # keep watching; the next refresh retries
                    log.exception("peer refresh failed")
                self.refreshed.set()
                self._closed.wait(self._until_next(interval))

        self._thread = threading.Thread(target=run, name="mtckpt-peers", daemon=True)
        self._thread.start()

    def refresh(self, everyone: bool = False) -> None:
        """Ask the listed daemons that are due (all with ``everyone``, those down on a new
        connection) who they are, all at once; forget those no longer listed."""
        addresses = self.addresses()
        now = time.monotonic()
        with self._lock:
            self._adopt_hints(addresses)
            due = [a for a in addresses if everyone or self._due(self._members.get(a), now)]
            if everyone:  # a peer down until now may be back (a replacement): asked on a
                for address in due:  # new connection, not after gRPC's reconnect backoff
                    known = self._members.get(address)
                    if known is not None and not known.reachable and address in self._clients:
                        self._clients.pop(address).close()
            # The peers' lists only serve as hints for addresses not identified yet.
            brief = all(a in self._members and self._members[a].node_id for a in addresses)
        ask = functools.partial(self._ask, brief=brief)
        if len(due) > 1:
            with ThreadPoolExecutor(max_workers=min(16, len(due))) as pool:
                answers = list(pool.map(ask, due))
        else:
            answers = [ask(a) for a in due]
        now = time.monotonic()
        with self._lock:
            for member in answers:
                self._settle(self._members.get(member.address), member, now)
                self._members[member.address] = member
            for gone in set(self._members) - set(addresses):
                del self._members[gone]
            idle = [
                a for a, client in self._clients.items()
                if a not in self._members or (
                    self._members[a].node_id not in self._watched
                    and now - self._used.get(a, 0.0) > IDLE_CHANNEL)
            ]  # fmt: skip
            for address in idle:  # connections to the peers not watched do not pile up
                self._clients.pop(address).close()
                self._used.pop(address, None)

    def _adopt_hints(self, addresses: list[str]) -> None:
        """Listed addresses never identified that a peer reached: their identity as that
        peer reported it, and one question at the next refresh (they are likely up now),
        instead of waiting out their backoff."""
        for address in addresses:
            known = self._members.get(address)
            hint = self._hints.get(address)
            if hint is not None and (known is None or not known.node_id):
                self._members[address] = Member(address, *hint, hinted=True,
                                                error="identity as a peer reported it")  # fmt: skip

    def _until_next(self, interval: float) -> float:
        """Seconds to the next refresh: ``interval``, or sooner where a peer not reached
        yet (or watched and down) is due again by its backoff."""
        now = time.monotonic()
        with self._lock:
            probes = [m.next_probe for m in self._members.values()
                      if not m.reachable and self._wanted(m)]  # fmt: skip
        return max(0.05, min([interval, *(p - now for p in probes)]))

    def _due(self, member: Member | None, now: float) -> bool:
        if member is None or member.hinted:
            return True
        return self._wanted(member) and now >= member.next_probe

    def _wanted(self, member: Member) -> bool:
        """Asked again: never identified yet, or a peer this node replicates to."""
        return not member.node_id or member.node_id in self._watched

    def _settle(self, before: Member | None, member: Member, now: float) -> None:
        """Carry the history over from ``before`` and log a change of state."""
        if member.reachable:
            if before is not None and before.down_since is not None and before.reported:
                log.warning("%s reachable again after %.0f s", member.name(),
                            now - before.down_since)  # fmt: skip
            return
        member.down_since = before.down_since if before and before.down_since else now
        member.failures = (before.failures if before else 0) + 1
        ceiling = BACKOFF_MAX if member.node_id else BACKOFF_MAX_NEVER
        member.next_probe = now + min(ceiling, 0.5 * 2**member.failures)
        member.reported = before.reported if before else None
        gone = now - member.down_since
        if member.reported is None:
            if member.node_id or gone >= UNKNOWN_GRACE:
                member.reported = now
                log.warning("%s unreachable%s: %s", member.name(),
                            f" for {gone:.0f} s" if gone >= 1 else "", member.error)  # fmt: skip
        elif now - member.reported >= REPORT_EVERY:
            member.reported = now
            log.warning("%s unreachable for %.0f s: %s", member.name(), gone, member.error)

    def _ask(self, address: str, brief: bool = False) -> Member:
        with self._lock:
            known = self._members.get(address)
        member = Member(address, known.node_id, known.zone) if known else Member(address)
        try:
            reply = self.client(address).status(timeout=self._timeout, wait_for_ready=True,
                                                brief=brief)  # fmt: skip
        except grpc.RpcError as exc:
            member.reachable, member.error = False, error_text(exc)
        else:
            member.node_id, member.zone = reply.node_id, reply.zone
            member.reachable = True
            self._hear_stride(member, reply)
            self._hear_members(reply)
        return member

    def _hear_members(self, reply) -> None:
        """Who the answering peer reached, as hints for the addresses not identified."""
        hints = {}
        for peer in reply.peers[:MAX_HINTS]:
            if peer.reachable and peer.node_id and peer.address:
                try:
                    hints[peer.address] = (naming.check_node_id(peer.node_id), peer.zone[:256])
                except ValueError:
                    continue
        with self._lock:
            self._hints.update(hints)

    def _hear_stride(self, member: Member, reply) -> None:
        if self.strides is None or not reply.sync_stride:  # a daemon that says none
            return
        try:
            stride, ttl = check_stride(reply.sync_stride, reply.sync_ttl, member.name())
        except ValueError as exc:
            log.warning("ignoring what %s", exc)
            return
        self.strides.hear(member.address, stride, ttl)

    def members(self) -> list[Member]:
        """The other daemons ever identified (reachable or not), and those never reached."""
        with self._lock:
            return [m for m in self._members.values() if m.node_id != self.node_id]

    def by_node(self, node_id: str) -> Member | None:
        for member in self.members():
            if member.node_id == node_id:
                return member
        return None

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
