"""Incremental steps on a real S3 endpoint (moto_server over HTTP through s3fs): frozen
states upload a fraction of each step, every step restores bit-exact from S3 into empty
node memory, also by the node daemon's uploads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from daemons import DaemonProcess, free_port
from mtckpt import CheckpointManager, MemoryTier, ObjectTier, PeerTier
from mtckpt.restore import read as restore
from mtckpt.tiers.object import ObjectStorage
from states import assert_same_state

RUN = "inc"
CHUNK = 64 << 10
SIZE = 4 << 20


def state(step: int, unchanged: float) -> dict:
    """``unchanged`` of SIZE bytes the same at every step, the rest new at each."""
    frozen = int(SIZE * unchanged)
    return {
        "frozen": np.random.default_rng(0).integers(0, 255, frozen, dtype=np.uint8),
        "moving": np.random.default_rng(step).integers(0, 255, SIZE - frozen, dtype=np.uint8),
        "step": step,
    }


def manager(memory, remote: ObjectTier, peers: PeerTier | None = None) -> CheckpointManager:
    with mock.patch.dict(os.environ, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}):
        memory_tier = None if peers is not None else MemoryTier(str(memory), keep=2)
        return CheckpointManager(RUN, rank=0, world_size=1, chunk_size=CHUNK, peers=peers,
                                 memory=memory_tier, remote=remote)  # fmt: skip


@pytest.mark.parametrize("unchanged", [0.99, 0.5])
def test_a_frozen_state_uploads_what_changed_and_restores_whole_from_s3(
    moto, bucket, shm_dir, unchanged
):
    remote = ObjectTier(url=f"s3://{bucket}/ckpt", storage_options=moto.options(), keep=4,
                        part_size=5 << 20)  # fmt: skip
    with manager(shm_dir / "a", remote) as mgr:
        for step in (1, 2, 3, 4):
            mgr.save(step, state(step, unchanged)).wait()
    storage = ObjectStorage(remote.url, storage_options=moto.options())
    changed = SIZE * (1 - unchanged)
    for step in (2, 3, 4):
        manifest = restore.read_manifest(storage, RUN, step, 0)
        assert manifest.stored.encoding == "delta"
        assert changed <= manifest.stored.size <= changed + 3 * CHUNK  # header, edges
    with manager(shm_dir / "fresh", remote) as mgr:  # node memory gone
        for step in (4, 3, 2, 1):
            got, restored = mgr.restore(step=step)
            assert got == step
            assert_same_state(restored, state(step, unchanged))


def test_the_node_daemon_uploads_incrementally(moto, bucket, tmp_path):
    options = moto.options()
    config = tmp_path / "mtckpt.toml"
    config.write_text(
        f'[remote]\nurl = "s3://{bucket}/ckpt"\nkeep = 4\n[remote.storage_options]\n'
        f'endpoint_url = "{options["endpoint_url"]}"\nkey = "testing"\nsecret = "testing"\n'
        'client_kwargs = { region_name = "eu-west-1" }\n'
    )
    sockets = Path(tempfile.mkdtemp(prefix="mti-"))
    daemon = DaemonProcess("node-a", tmp_path, sockets, free_port(), [],
                           ["--config", str(config), "--replicas", "0"]).start()  # fmt: skip
    try:
        remote = ObjectTier(url=f"s3://{bucket}/ckpt", storage_options=options, keep=4)
        peers = PeerTier(daemon=f"unix://{daemon.socket}", replicas=0)
        with manager(None, remote, peers) as mgr:
            for step in (1, 2, 3):
                mgr.save(step, state(step, 0.9)).wait()
        storage = ObjectStorage(remote.url, storage_options=options)
        delta = restore.read_manifest(storage, RUN, 3, 0).stored
        assert delta.encoding == "delta" and delta.size <= SIZE * 0.1 + 3 * CHUNK
        with manager(tmp_path / "fresh", remote) as mgr:
            assert mgr.restore()[0] == 3
    finally:
        daemon.terminate()
