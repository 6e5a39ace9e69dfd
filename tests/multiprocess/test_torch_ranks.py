"""PyTorch jobs of several ranks (gloo on CPU, real processes): restore agrees on a step every
rank can load, with collectives only in the foreground."""

import os
import re
from pathlib import Path

import pytest
from spawn import check_ok, run_ranks

from states import flip_byte

pytest.importorskip("torch")


def shard(root: Path, tier: str, step: int, rank: int, node=None) -> Path:
    base = root / f"node{node}" if node is not None else root
    return base / tier / "job" / f"step-{step:012d}" / f"rank-{rank:05d}.safetensors"


def test_ddp_training_resumes_bit_exact_on_two_ranks(tmp_path):
    uninterrupted = check_ok(
        run_ranks("torch_worker.py", 2, ["train", "--root", str(tmp_path / "a"), "--steps", "6"])
    )
    check_ok(
        run_ranks("torch_worker.py", 2, ["train", "--root", str(tmp_path / "b"), "--steps", "3"])
    )
    resumed = check_ok(
        run_ranks(
            "torch_worker.py",
            2,
            ["resume", "--root", str(tmp_path / "b"), "--step", "3", "--steps", "6"],
        )
    )
    for rank in range(2):
        expected = uninterrupted[rank].lines()
        got = resumed[rank].lines()
        assert got[0] == "restored 3"
        assert got[1:] == expected[3:], f"rank {rank}: {got} vs {expected}"
        assert got[-1].startswith("final ")
    assert resumed[0].lines()[-1] == resumed[1].lines()[-1]  # DDP keeps the replicas equal


def test_ranks_agree_on_the_newest_step_every_rank_holds(tmp_path):
    nodes = {r: {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"} for r in range(2)}  # a node each
    args = ["--root", str(tmp_path), "--node-per-rank"]
    check_ok(
        run_ranks(
            "torch_worker.py", 2, ["save", *args, "--steps", "1", "2", "3"], per_rank_env=nodes
        )
    )
    for tier in ("shm", "disk"):
        step3 = shard(tmp_path, tier, 3, 1, node=1).parent
        if step3.exists():
            for path in step3.iterdir():
                path.unlink()  # node 1 never finished step 3
    results = check_ok(run_ranks("torch_worker.py", 2, ["restore", *args], per_rank_env=nodes))
    assert [r.lines() for r in results] == [["restored 2"], ["restored 2"]]


def test_a_corrupt_shard_on_one_rank_moves_every_rank_to_an_older_step(tmp_path):
    check_ok(
        run_ranks("torch_worker.py", 2, ["save", "--root", str(tmp_path), "--steps", "1", "2", "3"])
    )
    flip_byte(shard(tmp_path, "shm", 3, 1))
    flip_byte(shard(tmp_path, "disk", 3, 1))
    results = check_ok(run_ranks("torch_worker.py", 2, ["restore", "--root", str(tmp_path)]))
    assert [r.lines() for r in results] == [["restored 2"], ["restored 2"]]
    # Rank 1 finds no good copy; rank 0 may find the shared step decommitted by then too.
    assert re.search(
        r"no good copy on rank\(s\) \[(0, )?1\]; trying an older step", results[0].stderr
    )


def test_a_step_one_rank_cannot_restore_is_put_in_no_rank_target(tmp_path):
    """Rank 0 verifies its copy, rank 1 finds none: rank 0 must not have filled its target
    (each rank verifies first; bytes land only once every rank has a good copy)."""
    check_ok(run_ranks("torch_worker.py", 2, ["save", "--root", str(tmp_path), "--steps", "3"]))
    flip_byte(shard(tmp_path, "shm", 3, 1))
    flip_byte(shard(tmp_path, "disk", 3, 1))
    results = run_ranks("torch_worker.py", 2, ["restore", "--root", str(tmp_path)], timeout=120)
    assert [r.returncode for r in results] == [1, 1], [r.stderr for r in results]
    for result in results:
        assert "error CorruptCheckpointError: no good copy of any step of run 'job'" in (
            result.stdout
        )
        assert "target untouched: True" in result.stdout, result.stdout


def test_a_target_mismatch_on_one_rank_stops_every_rank(tmp_path):
    check_ok(run_ranks("torch_worker.py", 2, ["save", "--root", str(tmp_path), "--steps", "1"]))
    results = run_ranks(
        "torch_worker.py",
        2,
        ["restore", "--root", str(tmp_path), "--wrong-shape-on", "1"],
        timeout=120,
    )
    assert [r.returncode for r in results] == [1, 1]
    assert (
        "error StateMismatchError: key 'w': the checkpoint holds F32 (1000,)" in results[1].stdout
    )
    assert (
        "error MtckptError: restore of step 1 failed on other ranks: rank 1: key 'w'"
        in results[0].stdout
    )


def test_a_rank_that_died_makes_restore_fail_within_the_timeout(tmp_path):
    check_ok(run_ranks("torch_worker.py", 2, ["save", "--root", str(tmp_path), "--steps", "1"]))
    results = run_ranks(
        "torch_worker.py",
        2,
        ["restore", "--root", str(tmp_path), "--exit-early-on", "1", "--timeout", "10"],
        timeout=120,
    )
    assert results[1].returncode == 3
    assert results[0].returncode == 1
    assert "the ranks did not agree on the steps to restore within 10" in results[0].stdout


def test_a_manager_kept_across_an_in_process_restart_restores_through_the_new_group(tmp_path):
    # One node, two ranks; rank 0 "dies" before saving step 3, rank 1 saved it and waits
    # for rank 0's shard (collective_timeout 60 s). Both leave the process group and join
    # a new one with the same managers: rank 1's node commit is given up at once, and the
    # ranks agree on step 2 through the new group.
    results = check_ok(
        run_ranks("torch_worker.py", 2, ["rejoin", "--root", str(tmp_path)], timeout=120)
    )
    for result in results:
        assert "restored 2" in result.lines()
        assert "then restored 3" in result.lines()
    assert "given up: step 3 of run 'job' cannot commit in the memory tier" in results[1].stdout
    assert "rank(s) [0] of this node were missing when the job's process group was replaced" in (
        results[1].stdout
    )


def test_saves_in_flight_do_not_block_the_trainers_collectives(tmp_path):
    results = check_ok(
        run_ranks("torch_worker.py", 2, ["busy", "--root", str(tmp_path)], timeout=240)
    )
    assert [r.lines() for r in results] == [["busy done 200.0"], ["busy done 200.0"]]


def test_a_rank_killed_mid_save_leaves_the_others_running_and_the_step_uncommitted(tmp_path):
    results = run_ranks("torch_worker.py", 2, ["die", "--root", str(tmp_path), "--timeout", "5"],
                        timeout=120)  # fmt: skip
    assert results[1].returncode == -9
    assert results[0].returncode == 0 and results[0].lines() == [
        f"survivor: step 3 of run 'job' cannot commit in the memory tier ({tmp_path / 'shm'}): "
        "rank(s) [1] of this node did not write their shard within 5 s (collective_timeout); "
        "this node's ranks [0, 1] are those that shared this node's memory root when the "
        "manager started (every rank was asked, as LOCAL_RANK / LOCAL_WORLD_SIZE are not set): "
        "a rank of this node died, or saves other steps"
    ]
    assert not shard(tmp_path, "shm", 3, 0).parent.exists()  # the survivor's shard is gone
    after = check_ok(run_ranks("torch_worker.py", 2, ["restore", "--root", str(tmp_path)]))
    assert [r.lines() for r in after] == [["restored 2"], ["restored 2"]]
    assert os.path.exists(shard(tmp_path, "shm", 2, 1))


def test_fsdp2_state_resumes_on_the_same_world_and_reshards_to_3_ranks(tmp_path):
    """The reshard to 2 ranks too: test_fsdp2_state_reshards_to_2_ranks (slow)."""
    fsdp2_round(tmp_path, worlds=(3,))


@pytest.mark.slow
def test_fsdp2_state_reshards_to_2_ranks(tmp_path):
    fsdp2_round(tmp_path, worlds=(2,))


def fsdp2_round(tmp_path, worlds: tuple[int, ...]) -> None:
    """4 ranks train 5 steps; 4 others save at 3, resume bit-exact to 5; ``worlds`` ranks
    restore step 3 resharded."""
    root = str(tmp_path / "ckpt")
    uninterrupted = check_ok(
        run_ranks(
            "torch_worker.py",
            4,
            ["fsdp", "--root", str(tmp_path / "ref"), "--steps", "5"],
            timeout=300,
        )
    )
    saved = check_ok(
        run_ranks("torch_worker.py", 4, ["fsdp", "--root", root, "--steps", "3"], timeout=300)
    )
    at_step_3 = saved[0].lines()[2].split()[-1]
    assert all(r.lines()[2].split()[-1] == at_step_3 for r in saved)  # one global state
    assert uninterrupted[0].lines()[2].split()[-1] == at_step_3

    resumed = check_ok(
        run_ranks(
            "torch_worker.py",
            4,
            ["fsdp", "--root", root, "--step", "3", "--steps", "5"],
            timeout=300,
        )
    )
    for rank in range(4):
        assert resumed[rank].lines()[0] == f"restored 3 {at_step_3}"
        assert resumed[rank].lines()[1:] == uninterrupted[rank].lines()[3:5]  # bit-exact losses

    for world in worlds:
        restored = check_ok(
            run_ranks(
                "torch_worker.py",
                world,
                ["fsdp", "--root", root, "--step", "3", "--steps", "3"],
                timeout=300,
            )
        )
        assert [r.lines() for r in restored] == [[f"restored 3 {at_step_3}"]] * world


def test_replicated_dtensor_shards_are_stored_once_per_node(tmp_path):
    import json

    check_ok(run_ranks("torch_worker.py", 4, ["mesh2d", "--root", str(tmp_path)]))
    step = tmp_path / "shm" / "job" / "step-000000000001"
    stored_by = {}
    for rank in range(4):
        manifest = json.loads((step / f"rank-{rank:05d}.json").read_text())
        for leaf in manifest["leaves"]:
            if "stored_by" in leaf:
                stored_by[(leaf["key"], rank)] = leaf["stored_by"]
    assert stored_by == {("rows", 1): 0, ("rows", 3): 2, ("cols", 2): 0, ("cols", 3): 1}
    results = check_ok(
        run_ranks("torch_worker.py", 4, ["mesh2d", "--root", str(tmp_path), "--step", "1"])
    )
    assert [r.lines() for r in results] == [["mesh2d restored"]] * 4


def test_dcp_save_and_load_through_mtckpt_across_world_sizes(tmp_path):
    saved = check_ok(run_ranks("torch_worker.py", 4, ["dcp", "--root", str(tmp_path)], timeout=300))
    fingerprint = saved[0].lines()[-1]
    assert all(r.lines()[-1] == fingerprint for r in saved)
    loaded = check_ok(
        run_ranks(
            "torch_worker.py", 2, ["dcp", "--root", str(tmp_path), "--step", "2"], timeout=300
        )
    )
    assert [r.lines()[-1] for r in loaded] == [fingerprint] * 2
