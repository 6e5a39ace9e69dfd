"""Simulated nodes' network: one network namespace per node, each with a veth link to a
bridge in a hub namespace of its own (so no traffic touches the machine's own
interfaces), an address 10.77.N.i/24, and a hosts file naming every node. Links can be
shaped (``tc tbf``), cut and restored. Needs root (CAP_NET_ADMIN)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

NETNS_ETC = Path("/etc/netns")  # `ip netns exec NS` bind-mounts NETNS_ETC/NS/* over /etc


class NetworkError(RuntimeError):
    """A namespace, link or shaping command failed: the command and its error."""


def ip(*args: str, ns: str | None = None) -> None:
    command = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise NetworkError(f"{' '.join(command)}: {done.stderr.strip()}")


def in_ns(ns: str, *command: str) -> list[str]:
    """``command`` run inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns, *command]


def reap_stale() -> list[str]:
    """Remove the namespaces (and their /etc files) of harnesses no longer running: one
    killed before its cleanup (SIGKILL, a timeout) leaves them. Their names carry the
    harness's pid. The namespaces removed."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    removed = []
    for name in (line.split()[0] for line in listed.splitlines() if line.strip()):
        found = re.fullmatch(r"m(\d+)-(hub|n\d+)", name)
        if found is None or _alive(int(found.group(1))):
            continue
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def can_make_namespaces() -> str | None:
    """None where this process can make network namespaces, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "the ip and tc commands (iproute2) are missing"
    probe = f"mtcprobe{os.getpid() % 100000}"
    try:
        ip("netns", "add", probe)
    except NetworkError as exc:
        return str(exc)
    ip("netns", "del", probe)
    return None


@dataclass
class Link:
    node: int
    ns: str  # the node's namespace
    inside: str  # the veth end in the node's namespace
    outside: str  # the end on the hub's bridge
    address: str


class Network:
    """``nodes`` namespaces on a bridge; ``names`` adds host names (each node is
    ``{prefix}-{i}``, and ``group`` resolves to every node, as a headless service does)."""

    def __init__(self, nodes: int, *, group: str = "train",
                 node_name: str = "train-{i}.train") -> None:  # fmt: skip
        if not 1 <= nodes <= 200:
            raise ValueError(f"nodes: expected 1..200, got {nodes}")
        self.tag = f"m{os.getpid()}"  # the harness's pid: see reap_stale
        self.subnet = 64 + os.getpid() % 128  # 10.77.<subnet>.0/24, per harness
        self.hub = f"{self.tag}-hub"
        self.hub_address = f"10.77.{self.subnet}.254"
        self.group, self.node_name = group, node_name
        self.links = [
            Link(
                i,
                f"{self.tag}-n{i}",
                f"{self.tag}v{i}",
                f"{self.tag}h{i}",
                f"10.77.{self.subnet}.{i + 1}",
            )  # fmt: skip
            for i in range(nodes)
        ]
        self._made: list[str] = []

    def __enter__(self) -> Network:
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def create(self) -> None:
        reap_stale()
        ip("netns", "add", self.hub)
        self._made.append(self.hub)
        ip("link", "add", "br0", "type", "bridge", ns=self.hub)
        ip("addr", "add", f"{self.hub_address}/24", "dev", "br0", ns=self.hub)
        ip("link", "set", "br0", "up", ns=self.hub)
        ip("link", "set", "lo", "up", ns=self.hub)
        for link in self.links:
            self._add(link)
        self._write_hosts()

    def _add(self, link: Link) -> None:
        ip("netns", "add", link.ns)
        self._made.append(link.ns)
        ip("link", "add", link.inside, "type", "veth", "peer", "name", link.outside)
        ip("link", "set", link.inside, "netns", link.ns)
        ip("link", "set", link.outside, "netns", self.hub)
        ip("link", "set", link.outside, "master", "br0", ns=self.hub)
        ip("link", "set", link.outside, "up", ns=self.hub)
        ip("addr", "add", f"{link.address}/24", "dev", link.inside, ns=link.ns)
        ip("link", "set", link.inside, "up", ns=link.ns)
        ip("link", "set", "lo", "up", ns=link.ns)

    def _write_hosts(self) -> None:
        lines = ["127.0.0.1 localhost", f"{self.hub_address} hub"]
        for link in self.links:
            name = self.node_name.format(i=link.node)
            lines.append(f"{link.address} {name} {name.split('.')[0]} {self.group}")
        for ns in self._made:
            directory = NETNS_ETC / ns
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "hosts").write_text("\n".join(lines) + "\n")
            (directory / "host.conf").write_text("multi on\n")  # every node for the group

    def shape(self, node: int, rate_mbit: float | None) -> None:
        """Cap what ``node`` sends at ``rate_mbit`` Mbit/s (a token bucket); None: no cap."""
        link = self.links[node]
        command = ["tc", "qdisc", "del", "dev", link.inside, "root"]
        subprocess.run(in_ns(link.ns, *command), capture_output=True)  # none there: fine
        if rate_mbit is not None:
            burst = max(32 * 1024, int(rate_mbit * 1e6 / 8 / 100))  # 10 ms at the rate
            command = ["tc", "qdisc", "add", "dev", link.inside, "root", "tbf", "rate",
                       f"{rate_mbit}mbit", "burst", str(burst), "latency", "100ms"]  # fmt: skip
            done = subprocess.run(in_ns(link.ns, *command), capture_output=True, text=True)
            if done.returncode != 0:
                raise NetworkError(f"{' '.join(command)}: {done.stderr.strip()}")

    def cut(self, node: int) -> None:
        """Take ``node``'s link down: its packets go nowhere (a partition)."""
        ip("link", "set", self.links[node].outside, "down", ns=self.hub)

    def heal(self, node: int) -> None:
        ip("link", "set", self.links[node].outside, "up", ns=self.hub)

    def destroy(self) -> None:
        """Remove every namespace made (their links go with them) and their /etc files."""
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        self._made.clear()
