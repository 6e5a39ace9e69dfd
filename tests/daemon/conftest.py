"""The cluster fixture: daemons started as real processes that list each other as peers."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("grpc")

from daemons import DaemonProcess, free_port  # noqa: E402


@pytest.fixture
def cluster(tmp_path):
    """A function starting daemons ``ids`` that list each other as peers; with
    ``dns=True`` they share one port on 127.0.0.1, 127.0.0.2, ... and find peers through
    the name localhost instead (which resolves to the first only)."""
    sockets = Path(tempfile.mkdtemp(prefix="mtd-"))  # Unix socket paths must be short
    started: list[DaemonProcess] = []

    def start(ids, extra=(), per_node=None, dns=False):
        shared = free_port()
        ports = {node: shared if dns else free_port() for node in ids}
        daemons = {}
        for i, node in enumerate(ids):
            peers = [] if dns else [f"127.0.0.1:{ports[o]}" for o in ids if o != node]
            args = [*extra, *((per_node or {}).get(node, []))]
            if dns:
                args += ["--peers-dns", f"localhost:{shared}"]
            host = f"127.0.0.{i + 1}" if dns else "127.0.0.1"
            daemon = DaemonProcess(node, tmp_path, sockets, ports[node], peers, args, host)
            daemons[node] = daemon.start()
            started.append(daemon)
        return daemons

    start.restart = lambda daemon: started.append(daemon.start()) or daemon
    start.base = tmp_path  # each node's roots are under base / node id
    yield start
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
    shutil.rmtree(sockets, ignore_errors=True)
