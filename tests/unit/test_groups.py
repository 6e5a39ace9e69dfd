"""Coded groups (issue 21): the redundancy names, groups on distinct failure domains, and
the stripe layout that lets any M losses of a group be rebuilt."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from mtckpt.daemon.groups import (
    GROUPS_DIR,
    REMEMBERED,
    Group,
    StepGroups,
    form_groups,
    group_of,
    piece_range,
)
from mtckpt.redundancy import Redundancy


@pytest.mark.parametrize(
    "text, kind, data, parity, shown",
    [("replicas:2", "replicas", 2, 0, "replicas:2"), ("xor:4", "xor", 3, 1, "xor:4"),
     ("rs:4+2", "rs", 4, 2, "rs:4+2"), (" rs:10+4 ", "rs", 10, 4, "rs:10+4")],
)  # fmt: skip
def test_redundancy_names_parse_and_print_back(text, kind, data, parity, shown):
    scheme = Redundancy.parse(text)
    assert (scheme.kind, scheme.data, scheme.parity, str(scheme)) == (kind, data, parity, shown)


def test_peer_memory_of_xor4_is_a_third_of_a_shard():
    assert Redundancy.parse("xor:4").peer_fraction == pytest.approx(1 / 3)
    assert Redundancy.parse("rs:4+2").losses == 2


@pytest.mark.parametrize(
    "text, says",
    [("xor:2", "3 to 255"), ("rs:4", "expected"), ("replicas", "expected"),
     ("rs:0+2", "K >= 1"), ("rs:200+100", "K + M <= 255"), ("mirror:2", "expected"),
     ("xor:4+1", "expected")],
)  # fmt: skip
def test_bad_redundancy_names_say_what_is_expected(text, says):
    with pytest.raises(ValueError, match=re.escape(says)) as raised:
        Redundancy.parse(text)
    assert repr(text) in str(raised.value)


def members(count: int, zones: int = 0) -> list[tuple[str, str]]:
    return [(f"node-{i:03d}", f"z{i % zones}" if zones else "") for i in range(count)]


@pytest.mark.parametrize("count", [3, 4, 5, 7, 8, 11, 17, 64])
@pytest.mark.parametrize("text", ["xor:4", "rs:2+2", "rs:3+2"])
def test_every_node_is_in_one_group_of_at_least_k_plus_m(count, text):
    scheme = Redundancy.parse(text)
    groups = form_groups(members(count), scheme)
    if count < scheme.group_size:
        assert groups == []
        return
    seen = [m for g in groups for m in g.members]
    assert sorted(seen) == sorted(m for m, _ in members(count))
    assert all(scheme.group_size <= len(g.members) < 2 * scheme.group_size for g in groups)
    # Any node computes the same groups, whatever order it lists the members in.
    shuffled = members(count)
    random.Random(count).shuffle(shuffled)
    assert form_groups(shuffled, scheme) == groups


def test_groups_span_distinct_zones_when_there_are_enough():
    groups = form_groups(members(16, zones=4), Redundancy.parse("xor:4"))
    zone = dict(members(16, zones=4))
    assert len(groups) == 4
    for group in groups:
        assert len({zone[m] for m in group.members}) == 4


@pytest.mark.parametrize("text, size", [("xor:4", 4), ("xor:4", 6), ("rs:2+2", 5),
                                        ("rs:3+2", 5), ("rs:4+2", 7)])  # fmt: skip
def test_any_m_losses_leave_k_pieces_of_every_stripe(text, size):
    scheme = Redundancy.parse(text)
    group = Group(scheme, tuple(f"n{i}" for i in range(size)))
    for node in group.members:
        assert len(group.pieces_of(node)) == scheme.data
        assert len(group.parities_of(node)) == scheme.parity
        for stripe, index in group.pieces_of(node):
            assert group.data_nodes(stripe)[index] == node
        for stripe, row in group.parities_of(node):
            assert group.parity_nodes(stripe)[row] == node
    for stripe in range(size):
        assert len(set(group.data_nodes(stripe) + group.parity_nodes(stripe))) == scheme.group_size
    for lost in itertools.combinations(group.members, scheme.parity):
        for stripe in range(size):
            left = [n for n in group.data_nodes(stripe) + group.parity_nodes(stripe)
                    if n not in lost]  # fmt: skip
            assert len(left) >= scheme.data


def test_group_of_a_node_and_none_for_a_stranger():
    groups = form_groups(members(8), Redundancy.parse("xor:4"))
    assert group_of("node-003", groups) is not None
    assert group_of("elsewhere", groups) is None


@pytest.mark.parametrize("size", [0, 1, 2, 3, 10, 1 << 20, (1 << 20) + 1])
@pytest.mark.parametrize("data", [1, 2, 3, 4])
def test_pieces_cover_the_blob_in_order(size, data):
    pieces = [piece_range(size, data, i) for i in range(data)]
    assert sum(length for _, length in pieces) == size
    position = 0
    for offset, length in pieces:
        assert offset == position and length >= 0
        position += length
    assert max(length for _, length in pieces) == -(-size // data)


def test_the_groups_of_a_nodes_steps_outlive_its_daemon(tmp_path):
    xor4 = Redundancy.parse("xor:4")
    group = Group(xor4, ("a", "b", "c", "d"))
    StepGroups(tmp_path, xor4).put("run", 7, group)
    again = StepGroups(tmp_path, xor4)  # a restarted daemon, the same node memory
    assert again.get("run", 7) == group
    assert again.get("run", 8) is None and again.get("other", 7) is None
    for step in range(8, 8 + REMEMBERED):
        again.put("run", step, group)
    assert StepGroups(tmp_path, xor4).get("run", 7) is None  # only the newest are kept


@pytest.mark.parametrize("text", ["{", '{"scheme": "xor:4", "steps": {"1": ["../x"]}}',
                                  '{"scheme": "nope", "steps": {}}', "[]"])  # fmt: skip
def test_an_unreadable_groups_file_is_named_and_forgotten(tmp_path, caplog, text):
    (tmp_path / GROUPS_DIR).mkdir()
    (tmp_path / GROUPS_DIR / "run.json").write_text(text)
    groups = StepGroups(tmp_path, Redundancy.parse("xor:4"))
    assert groups.get("run", 1) is None
    assert "run.json: unreadable" in caplog.text and "forgotten" in caplog.text
