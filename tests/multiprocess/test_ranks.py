"""Several ranks sharing a node's tiers: each writes its own shard, COMMIT appears only
once every rank of the node is present, and each rank restores its own shard."""

import json
import os
import subprocess
import sys

from spawn import PYTHONPATH, TESTS


def run_rank(rank, world, mode, memory, local, steps=(), extra_env=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "RANK": str(rank), "WORLD_SIZE": str(world)}
    env.pop("LOCAL_RANK", None)
    env.pop("LOCAL_WORLD_SIZE", None)
    env.update(extra_env or {})
    command = [
        sys.executable,
        str(TESTS / "multiprocess" / "rank_worker.py"),
        mode,
        "--memory",
        str(memory),
        "--local",
        str(local),
        "--collective-timeout",
        str(timeout),
        "--steps",
        *map(str, steps),
    ]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(procs):
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(out)
    return outputs


def test_two_ranks_commit_together_and_restore_their_own_shards(shm_dir, tmp_path):
    local = tmp_path / "local"
    finish([run_rank(r, 2, "save", shm_dir, local, steps=[0, 1, 2]) for r in range(2)])
    for root in (shm_dir, local):
        step = root / "ranks" / "step-000000000002"
        assert sorted(os.listdir(step)) == [
            "COMMIT",
            "rank-00000.json",
            "rank-00000.safetensors",
            "rank-00001.json",
            "rank-00001.safetensors",
        ]
        marker = json.loads((step / "COMMIT").read_text())
        assert marker == {"run": "ranks", "step": 2, "world_size": 2, "ranks": [0, 1]}
    outputs = finish([run_rank(r, 2, "restore", shm_dir, local) for r in range(2)])
    assert outputs == ["rank 0 restored 2\n", "rank 1 restored 2\n"]


def test_a_step_one_rank_of_the_node_never_saves_fails_on_the_other_and_is_not_committed(
    shm_dir, tmp_path
):
    local = tmp_path / "local"
    finish([run_rank(r, 2, "save", shm_dir, local, steps=[0, 1]) for r in range(2)])
    alone = run_rank(0, 2, "save", shm_dir, local, steps=[2], timeout=3)  # rank 1 never does
    _, err = alone.communicate(timeout=120)
    assert alone.returncode == 1
    assert (
        "mtckpt.errors.NodeRanksMissingError: step 2 of run 'ranks' cannot commit in the "
        f"memory tier ({shm_dir}): rank(s) [1] of this node did not write their shard within "
        "3 s (collective_timeout); this node's ranks [0, 1] are the whole world" in err
    ), err
    assert "step 2: waiting 2 s for rank(s) [1] of this node" in err, err
    assert not (shm_dir / "ranks" / "step-000000000002").exists()  # its slot is free again
    assert not (local / "ranks" / "step-000000000002").exists()
    outputs = finish([run_rank(r, 2, "restore", shm_dir, local) for r in range(2)])
    assert outputs == ["rank 0 restored 1\n", "rank 1 restored 1\n"]


def test_ranks_on_separate_nodes_commit_their_node_only(tmp_path):
    """LOCAL_RANK / LOCAL_WORLD_SIZE (as torchrun sets them): each node commits its ranks."""
    nodes = [(tmp_path / f"node{n}" / "shm", tmp_path / f"node{n}" / "disk") for n in range(2)]
    procs = [
        run_rank(
            rank,
            4,
            "save",
            *nodes[rank // 2],
            steps=[0],
            extra_env={"LOCAL_RANK": str(rank % 2), "LOCAL_WORLD_SIZE": "2"},
        )
        for rank in range(4)
    ]
    finish(procs)
    for n, (memory, local) in enumerate(nodes):
        for root in (memory, local):
            marker = json.loads((root / "ranks" / "step-000000000000" / "COMMIT").read_text())
            assert marker["ranks"] == [2 * n, 2 * n + 1] and marker["world_size"] == 4
