"""A trainer with peers=PeerTier(daemon=...): the memory tier is the daemon's, each step's
replication is followed by h.wait("peers") and mgr.steps(), and a replacement node's
restore pulls its shards from the peers by itself."""

from __future__ import annotations

import os
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


def test_a_replacement_daemon_fetches_its_shards_before_its_trainer_asks(cluster, caplog):
    daemons = cluster(["n1", "n2", "n3"])
    for rank, node in enumerate(["n1", "n2", "n3"]):
        with trainer(daemons[node], rank, 3) as mgr:
            for step in (1, 2):
                mgr.save(step, state(step, rank)).wait("peers")
    lost = daemons["n2"]
    lost.lose_node()
    cluster.restart(lost)

    def own_shards() -> list[tuple[int, int]]:
        with lost.client(token=lost.token) as client:
            listing = client.list_shards(run=RUN, origin="n2")
        return sorted((i.shard.step, i.shard.rank) for i in listing.shards)

    wait_for(lambda: own_shards() == [(2, 1)], what="n2's shard of step 2 back in its memory")
    with caplog.at_level("INFO", logger="mtckpt"), trainer(lost, 1, 3) as mgr:
        step, restored = mgr.restore()
    assert step == 2 and np.array_equal(restored["w"], state(2, 1)["w"])
    assert "bytes of this node's shards fetched from peers" in caplog.text  # by its daemon


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
    with pytest.raises(ConfigError, match="peers.replicas must be an int >= 0"):
        PeerTier(replicas=-1)


NODE_RANK = textwrap.dedent("""
    import sys
    import numpy as np
    from mtckpt import CheckpointManager, PeerTier

    mode, socket, steps = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]]
    with CheckpointManager("job", peers=PeerTier(daemon=f"unix://{socket}")) as mgr:
        if mode == "save":
            for step in steps:
                rng = np.random.default_rng(1000 * step + mgr.rank)
                mgr.save(step, {"w": rng.standard_normal((512, 512)).astype(np.float32),
                                "step": step}).wait("peers")
            print(mgr.steps()["peers"])
        else:
            step, restored = mgr.restore()
            rng = np.random.default_rng(1000 * step + mgr.rank)
            assert np.array_equal(restored["w"], rng.standard_normal((512, 512)).astype(np.float32))
            print(step)
""")


def run_node(daemon, ranks, world, mode, steps=()):
    """The ranks of one node, as separate processes at once (as torchrun starts them)."""
    procs = []
    for local, rank in enumerate(ranks):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(len(ranks))}  # fmt: skip
        command = [sys.executable, "-c", NODE_RANK, mode, str(daemon.socket), *map(str, steps)]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(out.strip())
    return outputs


def test_several_ranks_per_node_replicate_and_recover_together(cluster):
    """Two nodes of two ranks each, and a spare: the node lost is brought back by both of
    its ranks asking the replacement daemon to recover at once."""
    daemons = cluster(["m1", "m2", "m3"])
    assert run_node(daemons["m1"], [0, 1], 4, "save", [1, 2]) == ["[1, 2]"] * 2
    assert run_node(daemons["m2"], [2, 3], 4, "save", [1, 2]) == ["[1, 2]"] * 2
    lost = daemons["m2"]
    lost.lose_node()
    cluster.restart(lost)
    assert run_node(lost, [2, 3], 4, "restore") == ["2", "2"]
    assert run_node(daemons["m1"], [0, 1], 4, "restore") == ["2", "2"]


def test_steps_the_daemon_cannot_replicate_before_they_expire_are_skipped(cluster, caplog):
    """Saves faster than a capped replication: the daemon sends the newest steps first and
    the older ones expire in memory unsent; their "peers" stage is skipped (newest wins)
    instead of waiting out the timeout, and the newest step is replicated."""
    daemons = cluster(["f1", "f2"], extra=["--bandwidth", str(4 << 20), "--keep", "2"])
    big = {"w": np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)}
    tier = PeerTier(daemon=f"unix://{daemons['f1'].socket}", timeout=120)
    with (
        caplog.at_level("INFO", logger="mtckpt"),
        CheckpointManager(RUN, rank=0, world_size=1, peers=tier) as mgr,
    ):
        handles = []
        for step in range(1, 7):
            big["w"][0, 0] = step
            handles.append(mgr.save(step, big))
            handles[-1].wait("memory")
        for h in handles:
            h.wait("peers", timeout=60)  # none raises, none waits out PeerTier.timeout
        skipped = [h.step for h in handles if "peers" in h.skipped]
        assert skipped and 6 not in skipped
        assert mgr.steps()["peers"][-1] == 6
    assert f"skipping step {skipped[0]} because the daemon has moved on" in caplog.text
    assert replicated(daemons["f1"], RUN, 6)
