"""A trainer's reserve() makes room for its node's first steps at the peers that will hold
their copies: replica files there (replicas), parity files of its group (xor), zeroed and
mapped before the first save, within the peers' memory budgets; the first replicas land
in them."""

from __future__ import annotations

import os

import grpc
import pytest

from daemons import state, trainer, wait_for
from mtckpt.daemon.holdings import FREE_DIR
from mtckpt.daemon.rpc import MAX_RESERVED_STEPS
from mtckpt.daemon.spares import FREE_DIR as PARITY_FREE_DIR
from mtckpt.format import naming

RUN = "job"


def free_files(daemon, directory: str = FREE_DIR) -> dict[str, os.stat_result]:
    """The finished free files in a daemon's memory root, by name."""
    try:
        names = os.listdir(daemon.memory_root / directory)
    except FileNotFoundError:
        return {}
    return {n: (daemon.memory_root / directory / n).stat() for n in names if n[0] != "."}


def data_size(mgr, step_state) -> int:
    return mgr._layout(step_state, 1)[-1].file_size


def test_reserve_has_the_replica_target_make_files_the_first_replicas_land_in(cluster):
    daemons = cluster(["n1", "n2"])
    with trainer(daemons["n1"], 0, 2, peers=True, run=RUN) as mgr:
        size = data_size(mgr, state(1, 0))
        mgr.reserve(state(1, 0))  # keep=2: files for 3 steps
        ready = free_files(daemons["n2"])
        assert len(ready) == 3 and {s.st_size for s in ready.values()} == {size}
        assert not free_files(daemons["n1"])  # n1's replica target is n2, not itself
        inodes = {s.st_ino for s in ready.values()}
        replicas = daemons["n2"].memory_root / ".replicas" / "n1" / RUN
        landed = set()
        for step in (1, 2, 3):
            mgr.save(step, state(step, 0)).wait("peers")
            landed.add((replicas / naming.step_dir(step) / naming.data_file(0)).stat().st_ino)
    assert landed == inodes  # each first step went into a file made ahead


def test_a_peer_makes_no_reserved_file_its_memory_budget_has_no_room_for(cluster):
    size = 1085448  # state()'s data file
    daemons = cluster(["n1", "n2"], per_node={"n2": ["--memory-budget", str(size * 5 // 2)]})
    with trainer(daemons["n1"], 0, 2, peers=True, run=RUN) as mgr:
        assert data_size(mgr, state(1, 0)) == size
        mgr.reserve(state(1, 0))
        assert len(free_files(daemons["n2"])) == 2  # of the 3 asked for, as many as fit
        mgr.save(1, state(1, 0)).wait("peers")  # replicated all the same


def test_reserve_under_xor_has_the_group_make_parity_files(cluster):
    nodes = ["n1", "n2", "n3", "n4"]
    daemons = cluster(nodes, ["--redundancy", "xor:4"])
    with trainer(daemons["n1"], 0, 4, peers=True, run=RUN) as mgr:
        size = data_size(mgr, state(1, 0))
        mgr.reserve(state(1, 0))
    piece = -(-size // 3)
    made = {n: free_files(daemons[n], PARITY_FREE_DIR) for n in nodes}
    assert not made["n1"]
    holders = [n for n in nodes if made[n]]
    assert holders  # each holds one stripe's parity a step: 3 files
    for node in holders:
        assert len(made[node]) == 3 and {s.st_size for s in made[node].values()} == {piece}


@pytest.mark.parametrize(
    "size, count, expected",
    [(0, 3, "files of 0 bytes; expected 1 to"), (1 << 20, 0, "files for 0 steps; expected 1 to"),
     (1 << 20, MAX_RESERVED_STEPS + 1,
      f"files for {MAX_RESERVED_STEPS + 1} steps; expected 1 to {MAX_RESERVED_STEPS}"),
     (1 << 50, 1, f"files of {1 << 50} bytes")],
)  # fmt: skip
def test_a_bad_reserve_is_refused_naming_what_is_wrong(cluster, size, count, expected):
    daemons = cluster(["n1", "n2"])
    with daemons["n1"].client() as client, pytest.raises(grpc.RpcError) as info:
        client.reserve(0, size, count)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in info.value.details()
    assert not free_files(daemons["n2"])


def test_a_peer_that_asks_makes_room_here_and_asks_no_one_else(cluster):
    from mtckpt.daemon.rpc import Client

    daemons = cluster(["n1", "n2", "n3"])
    with Client(daemons["n1"].address) as peer:  # as a peer would, over TCP (--insecure)
        reply = peer.reserve(0, 1 << 20, 2)
    assert reply.bytes == 2 << 20 and not reply.ready
    wait_for(lambda: len(free_files(daemons["n1"])) == 2, what="n1's files")
    assert not free_files(daemons["n2"]) and not free_files(daemons["n3"])


def test_each_rank_of_a_node_gets_its_own_files_at_the_peer(cluster):
    daemons = cluster(["n1", "n2"])
    with daemons["n1"].client() as client:  # the node's two trainers, as their reserve() asks
        first = client.reserve(0, 1 << 20, 2)
        second = client.reserve(1, 1 << 20, 2)
        again = client.reserve(1, 1 << 20, 2)  # a rank asking twice holds its files once
    assert list(first.ready) == list(second.ready) == list(again.ready) == ["n2"]
    assert not first.failed
    assert len(free_files(daemons["n2"])) == 4
