"""The other daemons: from a static address list or a DNS name resolving to all of them
(a Kubernetes headless service), re-read on every refresh, so daemons that go away or
appear are noticed without restarting the others. A peer keeps its identity (node id,
zone) from its last answer while unreachable, so replica placement does not move when a
peer is briefly down."""

from __future__ import annotations

import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from .auth import TLSFiles
from .rpc import Client, error_text

log = logging.getLogger(__name__)


@dataclass
class Member:
    address: str
    node_id: str = ""
    zone: str = ""
    reachable: bool = False
    error: str = ""


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
    ) -> None:
        self.node_id = node_id
        self._static = list(addresses or [])
        self._dns = dns
        self._token, self.tls, self._timeout = token, tls, timeout
        self._members: dict[str, Member] = {}
        self._clients: dict[str, Client] = {}
        self._lock = threading.Lock()

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
            if address not in self._clients:
                self._clients[address] = Client(
                    address, token=self._token, tls=self.tls, timeout=30.0
                )
            return self._clients[address]

    def refresh(self) -> None:
        """Ask every listed daemon who it is (all at once); forget those no longer listed."""
        addresses = self.addresses()
        if addresses:
            with ThreadPoolExecutor(max_workers=min(16, len(addresses))) as pool:
                answers = list(pool.map(self._ask, addresses))
        else:
            answers = []
        with self._lock:
            for member in answers:
                self._members[member.address] = member
            for gone in set(self._members) - set(addresses):
                del self._members[gone]
                client = self._clients.pop(gone, None)
                if client is not None:
                    client.close()

    def _ask(self, address: str) -> Member:
        with self._lock:
            known = self._members.get(address)
        member = Member(address, known.node_id, known.zone) if known else Member(address)
        try:
            reply = self.client(address).status(timeout=self._timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            member.reachable, member.error = False, error_text(exc)
        else:
            member.node_id, member.zone = reply.node_id, reply.zone
            member.reachable = True
        return member

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
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
