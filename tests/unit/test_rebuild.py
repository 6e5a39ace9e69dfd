"""Which sources a lost node's pieces are rebuilt from (daemon/rebuild.py), from what the
daemons list, without the network: a member recorded as holding nothing of the step gives
its piece as zeros, fetched from no one, and does not count as lost."""

from __future__ import annotations

from mtckpt.daemon import rebuild
from mtckpt.proto import mtckpt_pb2 as pb

GROUP = ["a", "b", "c"]  # xor:3: stripe s takes pieces of GROUP[s], GROUP[s+1]; parity GROUP[s+2]


def listing(node: str, own_ranks: dict[int, int], parities) -> pb.ListShardsReply:
    """``node``'s listing: its own shards of step 1 (rank -> manifest crc) and the
    parities it holds (stripe, {origin: ranks})."""
    reply = pb.ListShardsReply(node_id=node)
    for rank, crc in own_ranks.items():
        reply.shards.add(shard=pb.ShardId(run="run", step=1, rank=rank, origin=node),
                         manifest_crc=crc, world_size=2)  # fmt: skip
    for stripe, members in parities:
        info = reply.parities.add(
            stripe=pb.StripeId(run="run", step=1, code="xor:3", group=GROUP, stripe=stripe),
            size=100, complete=True, world_size=2,
        )  # fmt: skip
        for origin, ranks in members.items():
            info.contributors.add(origin=origin, ranks=ranks, manifest_crcs=[7] * len(ranks),
                                  data_sizes=[300] * len(ranks))  # fmt: skip
    return reply


def coded_view(b_lost: bool = False):
    """b's trainer saved nothing: the stripes it is a data node of count it as zeros."""
    infos = [
        ("a", "", listing("a", {0: 7}, [(1, {"b": [], "c": [1]})])),
        ("c", "", listing("c", {1: 7}, [(0, {"a": [0], "b": []})])),
    ]
    if not b_lost:
        infos.append(("b", "", listing("b", {}, [(2, {"c": [1], "a": [0]})])))
    return rebuild.collect(infos, 1)


def test_a_member_holding_nothing_gives_zeros_from_no_one():
    coded = coded_view()
    found = rebuild.sources(coded, "a", "run", 1)
    # a's piece 0 (stripe 0): b's piece as zeros and c's parity; piece 1 (stripe 2): c's
    # piece and b's parity
    assert [(s.node, s.member is not None and s.member.is_empty) for s in found[0]] == [
        ("b", True), ("c", False)]  # fmt: skip
    assert [s.node for s in found[1]] == ["c", "b"]
    assert rebuild.why_not(coded, "a", "run", 1) == ""
    assert "b" not in coded.members  # nothing of b's to rebuild


def test_a_lost_member_that_held_nothing_still_gives_its_zeros():
    coded = coded_view(b_lost=True)  # b gone too: its pieces of step 1 were zeros anyway
    found = rebuild.sources(coded, "a", "run", 1)
    assert [s.node for s in found[0]] == ["b", "c"]  # a's piece in stripe 0: rebuildable
    assert rebuild.why_not(coded, "a", "run", 1).startswith(
        "node a's piece 1 has 1 of the 2 sources")  # stripe 2 lost b's parity  # fmt: skip
