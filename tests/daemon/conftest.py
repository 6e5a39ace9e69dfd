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
    """A function starting daemons ``ids`` that list each other as peers."""
    sockets = Path(tempfile.mkdtemp(prefix="mtd-"))  # Unix socket paths must be short
    started: list[DaemonProcess] = []

    def start(ids, extra=(), per_node=None):
        ports = {node: free_port() for node in ids}
        daemons = {}
        for node in ids:
            peers = [f"127.0.0.1:{ports[o]}" for o in ids if o != node]
            args = [*extra, *((per_node or {}).get(node, []))]
            daemon = DaemonProcess(node, tmp_path, sockets, ports[node], peers, args)
            daemons[node] = daemon.start()
            started.append(daemon)
        return daemons

    start.restart = lambda daemon: started.append(daemon.start()) or daemon
    yield start
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
    shutil.rmtree(sockets, ignore_errors=True)
