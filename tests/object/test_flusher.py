"""The daemon's flusher in-process, over a file:// object tier: newest wins per rank, the
step committed once every rank's shard is up, retention applied."""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest

pytest.importorskip("grpc")

from mtckpt import CheckpointManager, MemoryTier, ObjectTier
from mtckpt.daemon.flusher import Flusher, Phase  # noqa: E402
from mtckpt.daemon.holdings import Holdings, Shard  # noqa: E402
from mtckpt.format import commit, naming  # noqa: E402
from mtckpt.tiers.object import object_storage  # noqa: E402
from node import side_by_side  # noqa: E402

RUN = "fl"


def saved_steps(root, steps, world=2):
    """Every rank of a ``world``-rank job on this node saves ``steps`` into ``root``, side
    by side."""
    managers = []
    for rank in range(world):
        env = {"LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}
        with mock.patch.dict(os.environ, env):
            memory = MemoryTier(str(root), keep=len(steps))
            managers.append(CheckpointManager(RUN, rank=rank, world_size=world, memory=memory))

    def save(mgr):
        with mgr:
            for step in steps:
                mgr.save(step, {"w": np.full(1000, step + mgr.rank, np.int32)}).wait()

    side_by_side(save, managers)


def test_newest_wins_and_the_step_commits_once_every_rank_is_up(shm_dir, tmp_path):
    saved_steps(shm_dir, [1, 2, 3])
    tier = ObjectTier(url=f"file://{tmp_path}/remote", keep=1)
    storage = object_storage(tier)
    flusher = Flusher(Holdings("n1", shm_dir, keep=2), tier, storage)
    for step in (1, 2, 3):  # asked for faster than they go up: only the newest does
        flusher.request(Shard(RUN, step, 0, "n1"))
    flusher.request(Shard(RUN, 2, 1, "n1"))
    flusher.start()
    try:
        assert flusher.drain(60)
        phases = {(s.step, s.rank): f.phase for s, f in flusher.snapshot().items()}
        assert phases == {(1, 0): Phase.SKIPPED, (2, 0): Phase.SKIPPED, (3, 0): Phase.DONE,
                          (2, 1): Phase.DONE}  # fmt: skip
        assert not commit.is_committed(storage, RUN, 3)  # rank 1 of step 3 is not up
        flusher.request(Shard(RUN, 3, 1, "n1"))
        assert flusher.drain(60)
        assert commit.is_committed(storage, RUN, 3)
        assert storage.steps(RUN) == [3]  # keep=1: step 2 (never complete) is gone
        assert naming.COMMIT in storage.files(RUN, 3)
    finally:
        flusher.stop()
