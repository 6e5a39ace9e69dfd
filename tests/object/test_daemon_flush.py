"""The node daemon uploads to the object tier for its trainers: a real daemon process with
the moto S3 endpoint, trainers in this process and in a subprocess killed mid-upload."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

pytest.importorskip("grpc")

from daemons import DaemonProcess, free_port, wait_for  # noqa: E402
from mtckpt import CheckpointManager, ConfigError, MemoryTier, ObjectTier, PeerTier
from mtckpt.format import naming  # noqa: E402
from mtckpt.proto import mtckpt_pb2 as pb  # noqa: E402
from mtckpt.tiers.object import ObjectStorage  # noqa: E402
from states import assert_same_state  # noqa: E402

RUN = "flushed"
Phase = pb.FlushState.Phase


def state(step: int, nbytes: int = 3 << 20) -> dict:
    rng = np.random.default_rng(step)
    return {"w": rng.integers(0, 255, nbytes, dtype=np.uint8), "step": step}


@pytest.fixture
def remote_daemon(moto, bucket, tmp_path):
    """A daemon uploading to ``s3://{bucket}/ckpt`` (zstd) from the config file's
    [remote] table, and the ObjectTier trainers give for the same place."""
    options = moto.options()
    config = tmp_path / "mtckpt.toml"
    config.write_text(textwrap.dedent(f"""\
        [remote]
        url = "s3://{bucket}/ckpt"
        part_size = {5 << 20}
        compression = "zstd"
        [remote.storage_options]
        endpoint_url = "{options["endpoint_url"]}"
        key = "testing"
        secret = "testing"
        client_kwargs = {{ region_name = "eu-west-1" }}
    """))  # fmt: skip
    sockets = Path(tempfile.mkdtemp(prefix="mtf-"))
    ports = free_port(), free_port()
    daemon = DaemonProcess("node-a", tmp_path, sockets, ports[0], [f"127.0.0.1:{ports[1]}"],
                           ["--config", str(config)]).start()  # fmt: skip
    peer = DaemonProcess("node-b", tmp_path, sockets, ports[1], [f"127.0.0.1:{ports[0]}"], [])
    peer.start()  # a peer that takes the replicas, with no object tier of its own
    remote = ObjectTier(url=f"s3://{bucket}/ckpt", storage_options=options, part_size=5 << 20)
    yield daemon, remote
    for process in (daemon, peer):
        if process.proc.poll() is None:
            process.kill()


def trainer(daemon, remote: ObjectTier, replicas: int = 1) -> CheckpointManager:
    with mock.patch.dict(os.environ, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}):
        peers = PeerTier(daemon=f"unix://{daemon.socket}", replicas=replicas)
        return CheckpointManager(RUN, rank=0, world_size=1, peers=peers, remote=remote)


def flushes(daemon) -> dict[int, pb.FlushState]:
    with daemon.client() as client:
        return {f.shard.step: f for f in client.status().flushes if f.shard.run == RUN}


def test_the_daemon_uploads_what_its_trainer_saves(remote_daemon, shm_dir):
    daemon, remote = remote_daemon
    with daemon.client() as client:
        assert client.status().remote_url == remote.url
    with trainer(daemon, remote) as mgr:
        for step in (1, 2):
            mgr.save(step, state(step)).wait("remote")
        assert mgr.steps()["remote"] == [1, 2]
        samples = mgr.metrics.samples()  # the daemon wrote them: its metrics count them
        assert 'mtckpt_written_bytes_total{tier="remote"}' not in samples
        assert samples['mtckpt_written_bytes_total{tier="memory"}'] > 0
    assert {s: f.phase for s, f in flushes(daemon).items()} == {1: Phase.DONE, 2: Phase.DONE}
    assert "flushed run 'flushed' step 2 rank 0" in daemon.log.read_text()
    storage = ObjectStorage(remote.url, storage_options=remote.storage_options)
    assert naming.COMMIT in storage.files(RUN, 2)
    manifest = storage.read_bytes(RUN, 2, naming.manifest_file(0))
    assert b'"encoding": "zstd"' in manifest  # the daemon's [remote] settings apply
    fresh = MemoryTier(str(shm_dir / "fresh"))
    with CheckpointManager(RUN, rank=0, world_size=1, memory=fresh, remote=remote) as mgr:
        step, restored = mgr.restore()
    assert step == 2
    assert_same_state(restored, state(2))


def test_without_replicas_the_daemon_keeps_node_memory_and_uploads(remote_daemon):
    daemon, remote = remote_daemon
    with trainer(daemon, remote, replicas=0) as mgr:
        handle = mgr.save(1, state(1))
        handle.wait()
        assert "peers" not in handle.tiers
        assert mgr.steps() == {"memory": [1], "remote": [1]}
    assert flushes(daemon)[1].phase == Phase.DONE


def test_a_trainer_naming_another_url_than_its_daemon_is_refused(remote_daemon, bucket):
    daemon, remote = remote_daemon
    other = ObjectTier(url=f"s3://{bucket}/elsewhere", storage_options=remote.storage_options)
    with pytest.raises(ConfigError, match=r"remote.url .*elsewhere.* is not the object tier"):
        trainer(daemon, other)


TRAINER = """
import os, sys, time
import numpy as np
from mtckpt import CheckpointManager, ObjectTier, PeerTier
os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
remote = ObjectTier(url=sys.argv[2], storage_options=eval(sys.argv[3]), part_size=5 << 20)
mgr = CheckpointManager("flushed", rank=0, world_size=1, remote=remote,
                        peers=PeerTier(daemon=sys.argv[1]))
w = np.random.default_rng(7).integers(0, 255, 96 << 20, dtype=np.uint8)
mgr.save(7, {"w": w}).wait("memory")
print("committed", flush=True)
time.sleep(600)
"""


def test_an_upload_under_way_outlives_a_killed_trainer(remote_daemon, shm_dir):
    daemon, remote = remote_daemon
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAINER, f"unix://{daemon.socket}", remote.url,
         repr(remote.storage_options)], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "committed"
        wait_for(lambda: 7 in flushes(daemon), 60, "the daemon to take the upload")
        killed_while = flushes(daemon)[7].phase
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: flushes(daemon)[7].phase == Phase.DONE, 120, "the upload to finish")
    assert killed_while in (Phase.QUEUED, Phase.FLUSHING)
    fresh = MemoryTier(str(shm_dir / "fresh"))
    with CheckpointManager(RUN, rank=0, world_size=1, memory=fresh, remote=remote) as mgr:
        step, restored = mgr.restore()
    assert step == 7
    expected = np.random.default_rng(7).integers(0, 255, 96 << 20, dtype=np.uint8)
    assert restored["w"].tobytes() == expected.tobytes()


def test_a_daemon_without_an_object_tier_refuses_flush(tmp_path):
    import grpc

    sockets = Path(tempfile.mkdtemp(prefix="mtf-"))
    daemon = DaemonProcess("node-c", tmp_path, sockets, free_port(), [], ["--replicas", "0"])
    daemon.start()
    try:
        with daemon.client() as client:
            assert client.status().remote_url == ""
            shard = pb.ShardId(run=RUN, step=1, rank=0, origin="node-c")
            with pytest.raises(grpc.RpcError, match="this daemon has no object tier"):
                client.flush(shard)
    finally:
        daemon.kill()


def test_a_daemon_flushes_only_its_own_node_shards(remote_daemon):
    import grpc

    daemon, _ = remote_daemon
    with daemon.client() as client:
        other = pb.ShardId(run=RUN, step=1, rank=0, origin="node-b")
        with pytest.raises(grpc.RpcError, match="only this node's own shards are flushed here"):
            client.flush(other)
        missing = pb.ShardId(run=RUN, step=5, rank=0, origin="node-a")
        client.flush(missing)  # accepted, then reported as failed: nothing to upload
    wait_for(lambda: flushes(daemon).get(5) and flushes(daemon)[5].phase == Phase.FAILED, 30,
             "the flush to fail")  # fmt: skip
    assert "step 5 rank 0 of node 'node-a': not committed" in flushes(daemon)[5].error
