"""Ranks of two nodes started with RANK / WORLD_SIZE but no LOCAL_RANK / LOCAL_WORLD_SIZE.
In a torch.distributed group, the manager asks every rank for its node (the daemon's node
id, else the machine and the memory root) and commits with the ranks that share it.
Without one, each rank takes the whole world to share its node's tiers and waits there
for ranks that write elsewhere: the wait logs who is missing, then fails the step with
NodeRanksMissingError at collective_timeout, through h.wait() and mgr.wait(); later steps
fail at once; nothing is left in node memory but the free slot."""

from __future__ import annotations

import json
import os

import pytest
from spawn import check_ok, run_ranks

TIMEOUT = 4  # collective_timeout: who is missing is logged after 2 s (half of it)


def outcomes(result) -> dict:
    return {line["what"]: line for line in map(json.loads, result.lines())}


def check_failed_fast(results, memory_root_of):
    for result in check_ok(results):
        other = 1 - result.rank
        seen = outcomes(result)
        assert list(seen) == ["step 0", "step 1", "mgr.wait"]
        kind, message = seen["step 0"]["error"]
        assert kind == "NodeRanksMissingError"
        assert message == (
            f"step 0 of run 'nodes' cannot commit in the memory tier "
            f"({memory_root_of(result.rank)}): rank(s) [{other}] of this node did not write "
            f"their shard within {TIMEOUT} s (collective_timeout); this node's ranks [0, 1] are "
            "the whole world, as LOCAL_RANK / LOCAL_WORLD_SIZE are not set (with ranks on "
            "several nodes, set them as torchrun does)"
        )
        assert TIMEOUT <= seen["step 0"]["seconds"] < TIMEOUT + 15
        kind, message = seen["step 1"]["error"]
        assert kind == "NodeRanksMissingError"
        assert f"rank(s) [{other}] of this node have written no step here yet, and an " in message
        assert seen["step 1"]["seconds"] - seen["step 0"]["seconds"] < 2  # no second wait
        assert seen["mgr.wait"]["error"][0] == "NodeRanksMissingError"
        assert (
            f"step 0: waiting 2 s for rank(s) [{other}] of this node to write their shard into "
            f"the memory tier ({memory_root_of(result.rank)})" in result.stderr
        ), result.stderr
        run_dir = memory_root_of(result.rank) / "nodes"
        assert sorted(os.listdir(run_dir)) == [f".rank-{result.rank:05d}.lock", ".slots"]
        assert len(os.listdir(run_dir / ".slots" / f"rank-{result.rank:05d}")) == 1


def test_ranks_of_two_nodes_without_local_world_size_fail_instead_of_waiting(tmp_path):
    results = run_ranks("node_worker.py", 2, ["--memory", str(tmp_path),
                        "--collective-timeout", str(TIMEOUT)], timeout=120)  # fmt: skip
    check_failed_fast(results, lambda rank: tmp_path / f"node{rank}")


def test_with_a_node_daemon_the_peers_stage_fails_with_it(cluster):
    pytest.importorskip("grpc")
    daemons = cluster(["n0", "n1"])
    sockets = ",".join(f"unix://{daemons[n].socket}" for n in ("n0", "n1"))
    results = run_ranks("node_worker.py", 2, ["--daemons", sockets,
                        "--collective-timeout", str(TIMEOUT)], timeout=120)  # fmt: skip
    check_failed_fast(results, lambda rank: daemons[f"n{rank}"].memory_root)


def check_committed(results, node_ranks):
    for result in check_ok(results):
        seen = outcomes(result)
        assert [seen[f"step {s}"]["error"] for s in (0, 1)] == [None, None]
        assert seen["mgr.wait"]["error"] is None
        assert seen["restore"]["node_ranks"] == node_ranks(result.rank)
        assert (seen["restore"]["step"], seen["restore"]["w"]) == (1, 1.0)


def test_in_a_process_group_the_ranks_of_each_node_are_found(tmp_path):
    pytest.importorskip("torch")
    results = run_ranks("node_worker.py", 2, ["--memory", str(tmp_path), "--gloo",
                        "--collective-timeout", "60"], timeout=120)  # fmt: skip
    check_committed(results, lambda rank: [rank])


def test_in_a_process_group_ranks_sharing_a_memory_root_are_one_node(tmp_path):
    pytest.importorskip("torch")
    results = run_ranks("node_worker.py", 2, ["--memory", str(tmp_path), "--gloo",
                        "--one-node", "--collective-timeout", "60"], timeout=120)  # fmt: skip
    check_committed(results, lambda rank: [0, 1])


def test_with_node_daemons_in_a_process_group_each_daemon_is_a_node(cluster):
    pytest.importorskip("grpc")
    pytest.importorskip("torch")
    daemons = cluster(["g0", "g1"])
    sockets = ",".join(f"unix://{daemons[n].socket}" for n in ("g0", "g1"))
    results = run_ranks("node_worker.py", 2, ["--daemons", sockets, "--gloo",
                        "--collective-timeout", "60"], timeout=120)  # fmt: skip
    check_committed(results, lambda rank: [rank])
