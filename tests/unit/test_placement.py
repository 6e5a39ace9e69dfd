"""Replica placement: every node computes the same targets for a node's shards, never the
node itself, on other failure domains first."""

import pytest

pytest.importorskip("grpc")  # mtckpt.daemon starts with the gRPC service

from mtckpt.daemon.placement import replica_targets  # noqa: E402

ZONES = {"a": "rack-1", "b": "rack-1", "c": "rack-2", "d": "rack-2", "e": "rack-3"}


def members_seen_by(node):
    return [(m, z) for m, z in ZONES.items() if m != node]


@pytest.mark.parametrize("node", sorted(ZONES))
def test_targets_are_other_nodes_in_other_zones_first(node):
    for replicas in (1, 2, 3):
        targets = replica_targets(node, ZONES[node], members_seen_by(node), replicas)
        assert len(targets) == replicas and len(set(targets)) == replicas
        assert node not in targets
        # Three zones: the first two copies never share the origin's rack.
        assert all(ZONES[t] != ZONES[node] for t in targets[:2])


def test_every_node_computes_the_same_targets_whatever_order_it_learns_members():
    listed = members_seen_by("a")
    forward = replica_targets("a", "rack-1", listed, 2)
    backward = replica_targets("a", "rack-1", list(reversed(listed)), 2)
    with_itself = replica_targets("a", "rack-1", [("a", "rack-1"), *listed], 2)
    assert forward == backward == with_itself


def test_a_node_that_leaves_moves_only_the_copies_it_held():
    everyone = {m: "" for m in "abcdefgh"}
    before = {n: replica_targets(n, "", [(m, "") for m in everyone], 1) for n in everyone}
    gone = "d"
    after = {n: replica_targets(n, "", [(m, "") for m in everyone if m != gone], 1)
             for n in everyone if n != gone}  # fmt: skip
    moved = [n for n in after if after[n] != before[n]]
    assert moved and all(before[n] == [gone] for n in moved)  # its ring predecessor moves


def test_unlabelled_zones_and_too_few_members():
    assert replica_targets("a", "", [("b", ""), ("c", "")], 5) in (["b", "c"], ["c", "b"])
    assert replica_targets("a", "rack-1", [], 1) == []
    # All in the origin's zone: copies still go to other nodes there.
    assert replica_targets("a", "rack-1", [("b", "rack-1")], 1) == ["b"]
