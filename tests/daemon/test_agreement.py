"""Ranks without a process group agree on one step through their node daemons (issue 26):
a node lost mid-save leaves the other ranks with a newer step than it; every rank
restores the newest step complete across the daemons, or raises AgreementError; never a
mix of steps. Without daemons the warning comes when such a restore runs, not before."""

from __future__ import annotations

import logging
import os
from unittest import mock

import numpy as np
import pytest

from daemons import replicated, wait_for
from daemons import trainer as node_trainer
from mtckpt import AgreementError, CheckpointManager, MemoryTier

RUN = "agree"


def state(step: int, rank: int) -> dict:
    return {"w": np.full(4096, 10 * step + rank, np.float32), "step": step}


def trainer(daemon, rank: int) -> CheckpointManager:
    return node_trainer(daemon, rank, 2, peers=True, run=RUN)


def save_steps(daemons, steps_of_rank) -> None:
    """Rank r saves ``steps_of_rank[r]`` through the daemon of node r, each replicated."""
    for rank, steps in enumerate(steps_of_rank):
        with trainer(daemons[rank], rank) as mgr:
            for step in steps:
                mgr.save(step, state(step, rank)).wait("peers")


def test_ranks_restore_the_newest_step_complete_across_the_daemons(cluster, caplog):
    daemons = list(cluster(["ag-a", "ag-b"]).values())
    save_steps(daemons, [[1, 2, 3], [1, 2]])  # node b was lost while saving step 3
    caplog.set_level(logging.WARNING, logger="mtckpt")
    for rank in (0, 1):
        with trainer(daemons[rank], rank) as mgr:
            assert mgr.steps()["memory"][-1] == (3 if rank == 0 else 2)
            step, restored = mgr.restore()
            assert step == 2 and restored["w"][0] == 20 + rank
            # Training resumes from step 2: rank 0's old step 3 gives way to the new one,
            # on its node and on the peer holding its replica.
            mgr.save(3, {"w": np.full(4096, 300 + rank, np.float32), "step": 3}).wait("peers")
    assert "each rank picks its own" not in caplog.text
    assert "step 3 follows the restored step 2: removing this rank's steps [3]" in caplog.text
    daemons[0].lose_node()
    daemons[0].start()
    for rank in (0, 1):
        with trainer(daemons[rank], rank) as mgr:
            step, restored = mgr.restore()
        assert step == 3 and restored["w"][0] == 300 + rank


def test_a_daemon_that_cannot_reach_a_peer_makes_it_an_agreement_error(cluster):
    nodes = cluster(["ag-c", "ag-d", "ag-e"])
    daemons = [nodes["ag-c"], nodes["ag-d"]]
    save_steps(daemons, [[1, 2], [1, 2]])
    wait_for(lambda: replicated(daemons[0], RUN, 1, 2), what="replicated")
    nodes["ag-e"].kill()
    with trainer(daemons[0], 0) as mgr:
        with pytest.raises(AgreementError) as info:
            mgr.restore()
        assert f"peer ag-e ({nodes['ag-e'].address}) did not answer" in str(info.value)
        step, restored = mgr.restore(step=2)  # asked for by number: nothing to agree on
        assert step == 2 and restored["w"][0] == 20


def test_without_daemons_the_warning_comes_with_the_restore(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mtckpt")
    with mock.patch.dict(os.environ, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}):
        mgr = CheckpointManager(RUN, rank=0, world_size=2, memory=MemoryTier(str(tmp_path)))
    with mgr:
        mgr.save(1, state(1, 0)).wait()
        assert "each rank picks its own" not in caplog.text
        assert mgr.restore()[0] == 1
    assert "2 ranks restore without torch.distributed or jax.distributed" in caplog.text
