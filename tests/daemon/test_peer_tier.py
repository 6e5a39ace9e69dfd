"""A trainer with peers=PeerTier(daemon=...): the memory tier is the daemon's, each step's
replication is followed by h.wait("peers") and mgr.steps(), and a replacement node's
restore pulls its shards from the peers by itself."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from daemons import replicated, wait_for
from daemons import trainer as node_trainer
from mtckpt import CheckpointManager, ConfigError, MemoryTier, PeerTier, TierError

RUN = "job"


def state(step: int, rank: int) -> dict:
    rng = np.random.default_rng(1000 * step + rank)
    return {"w": rng.standard_normal((512, 512)).astype(np.float32), "step": step}


def trainer(daemon, rank: int, world: int) -> CheckpointManager:
    return node_trainer(daemon, rank, world, peers=True, run=RUN)


def test_saves_are_replicated_and_a_replacement_node_restores_from_peers(cluster):
    daemons = cluster(["n1", "n2", "n3"])
    for rank, node in enumerate(["n1", "n2", "n3"]):
        with trainer(daemons[node], rank, 3) as mgr:
            assert mgr._memory.root == daemons[node].memory_root  # the daemon's memory tier
            for step in (1, 2):
                h = mgr.save(step, state(step, rank))
                assert "peers" in h.tiers
                h.wait("peers")
            assert mgr.steps()["peers"] == [1, 2]
    lost = daemons["n2"]
    lost.lose_node()
    cluster.restart(lost)
    with trainer(lost, 1, 3) as mgr:
        step, restored = mgr.restore()
    assert step == 2
    assert np.array_equal(restored["w"], state(2, 1)["w"]) and restored["step"] == 2


def test_replication_that_cannot_happen_fails_the_peers_stage_only(cluster):
    daemon = cluster(["alone"])["alone"]
    with trainer(daemon, 0, 1) as mgr:
        h = mgr.save(1, state(1, 0))
        h.wait("memory")
        with pytest.raises(TierError, match="1 replicas wanted, 0 other daemon"):
            h.wait("peers", timeout=30)
        assert mgr.steps()["memory"] == [1] and mgr.steps()["peers"] == []
        with pytest.raises(TierError):
            mgr.wait()


def test_a_trainer_killed_after_its_save_loses_nothing(cluster):
    daemons = cluster(["k1", "k2"])
    socket_path = daemons["k1"].socket
    script = textwrap.dedent(f"""
        import os, signal
        import numpy as np
        from mtckpt import CheckpointManager, PeerTier
        rng = np.random.default_rng(1000)
        state = {{"w": rng.standard_normal((512, 512)).astype(np.float32), "step": 1}}
        mgr = CheckpointManager({RUN!r}, peers=PeerTier(daemon="unix://{socket_path}"),
                                rank=0, world_size=1)
        mgr.save(1, state).wait("memory")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    wait_for(lambda: replicated(daemons["k1"], RUN, 1), what="replication after the kill")
    with trainer(daemons["k1"], 0, 1) as mgr:
        step, restored = mgr.restore()
    assert step == 1 and np.array_equal(restored["w"], state(1, 0)["w"])


def test_bad_peer_configuration_is_refused_with_the_reason(cluster, tmp_path):
    with pytest.raises(ConfigError, match="no mtckpt daemon answers at unix://"):
        CheckpointManager(RUN, peers=PeerTier(daemon=f"unix://{tmp_path}/none.sock"))
    daemon = cluster(["cfg"])["cfg"]
    address = f"unix://{daemon.socket}"
    with pytest.raises(ConfigError, match="keeps 1 replica"):
        CheckpointManager(RUN, peers=PeerTier(daemon=address, replicas=2))
    with pytest.raises(ConfigError, match="is not the memory root"):
        CheckpointManager(RUN, MemoryTier(str(tmp_path / "elsewhere")),
                          peers=PeerTier(daemon=address))  # fmt: skip
    with pytest.raises(ConfigError, match="peers.replicas"):
        PeerTier(replicas=0)
