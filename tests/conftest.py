"""Shared fixtures: tier directories on real tmpfs and disk, both fast-path backends,
daemons as real processes, and a real S3 endpoint."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest

from daemons import DaemonProcess, free_port, knows, wait_for
from mtckpt import _fastpath
from s3server import MotoServer


@pytest.fixture
def shm_dir():
    """A fresh directory on tmpfs (/dev/shm), removed afterwards."""
    root = Path("/dev/shm")
    path = root / f"mtckpt-test-{uuid.uuid4().hex[:10]}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a real tmpfs of a given size; it fills up for real (ENOSPC)."""
    mounts = []

    def mount(size_kib: int) -> Path:
        path = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        path.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {result.stderr.strip()}")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(params=["native", "python"])
def backend(request):
    """Run the test with the native extension, then with the pure-Python fallback."""
    previous = _fastpath.backend_name()
    _fastpath.select(request.param)
    yield request.param
    _fastpath.select(previous)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """Tests run as one process of a world of one unless they start ranks themselves
    (tests/multiprocess set RANK / WORLD_SIZE in the processes they start)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def moto():
    """A `moto_server` S3 endpoint shared by the session's tests."""
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto) -> str:
    """A fresh bucket on the shared endpoint."""
    return moto.make_bucket()


@pytest.fixture
def own_moto():
    """An endpoint of this test's own, which it may stop and start again."""
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def cluster(tmp_path):
    """A function starting daemons ``ids`` that list each other as peers; with
    ``dns=True`` they share one port on 127.0.0.1, 127.0.0.2, ... and find peers through
    the name localhost instead (which resolves to the first only). Those also in
    ``later`` are listed but not started (``cluster.restart`` starts one)."""
    sockets = Path(tempfile.mkdtemp(prefix="mtd-"))  # Unix socket paths must be short
    started: list[DaemonProcess] = []

    def start(ids, extra=(), per_node=None, dns=False, later=()):
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
            daemons[node] = daemon
            if node not in later:
                started.append(daemon.launch())  # all at once, then each awaited
        for daemon in daemons.values():
            if daemon.proc is not None:
                daemon.await_ready()
        if not dns:  # each knows the others up (placement is stable from the first save)
            for daemon in (d for d in daemons.values() if d.proc is not None):
                up = {d.address for d in daemons.values() if d.proc is not None} - {daemon.address}
                wait_for(lambda d=daemon, up=up: knows(d, up), what=f"{daemon.node_id}'s peers")
        return daemons

    start.restart = lambda daemon: started.append(daemon.start()) or daemon
    start.base = tmp_path  # each node's roots are under base / node id
    yield start
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
    shutil.rmtree(sockets, ignore_errors=True)
