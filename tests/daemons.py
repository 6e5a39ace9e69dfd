"""Real daemon processes on loopback ports, each with its own roots, for the daemon tests."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mtckpt.daemon.rpc import Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonProcess:
    def __init__(self, node_id: str, base: Path, sockets: Path, port: int, peers: list[str],
                 extra: list[str]) -> None:  # fmt: skip
        self.node_id = node_id
        self.memory_root = base / node_id / "memory"
        self.socket = sockets / f"{node_id}.sock"
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.peers = peers
        self.extra = extra
        self.log = base / f"{node_id}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> DaemonProcess:
        cmd = [sys.executable, "-m", "mtckpt", "-v", "daemon", "--node-id", self.node_id,
               "--listen", self.address, "--socket", str(self.socket),
               "--memory-root", str(self.memory_root), "--peers", ",".join(self.peers),
               *self.extra]  # fmt: skip
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        line = self.proc.stdout.readline()
        if "ready" not in line:
            self.proc.kill()
            raise RuntimeError(
                f"daemon {self.node_id} did not start: {line!r}\n{self.log.read_text()}"
            )
        return self

    def client(self, **kwargs) -> Client:
        return Client(f"unix://{self.socket}", **kwargs)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def lose_node(self) -> None:
        """The node is gone: its daemon killed and its roots deleted."""
        self.kill()
        shutil.rmtree(self.memory_root.parent)


def wait_for(condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def replicated(daemon: DaemonProcess, run: str, step: int) -> bool:
    """Every shard of ``step`` this daemon's node saved is held by all its targets."""
    with daemon.client() as c:
        status = c.status()
    states = [r for r in status.replication if r.shard.run == run and r.shard.step == step]
    return bool(states) and all(set(r.targets) <= set(r.stored) and not r.error for r in states)


def replication_of(daemon: DaemonProcess, run: str, step: int):
    with daemon.client() as c:
        return [r for r in c.status().replication if r.shard.run == run and r.shard.step == step]
