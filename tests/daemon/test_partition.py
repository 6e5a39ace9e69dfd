"""A peer that stops answering (SIGSTOP: its connections open, nothing comes back, as in a
network partition) is logged with its id, address and reason while transfers to it hang;
its return is logged; replication catches up on its own. Membership probes only the
peers a node replicates to."""

from __future__ import annotations

import os
import re
import signal
import time

from daemons import knows, replicated, save, wait_for

RUN = "exp"


def logged(daemon, pattern: str) -> re.Match | None:
    return re.search(pattern, daemon.log.read_text())


def test_a_partitioned_peer_is_named_then_welcomed_back_and_caught_up(cluster):
    daemons = cluster(["part-a", "part-b"])
    a, b = daemons["part-a"], daemons["part-b"]
    save(a, 0, 1, [1])
    wait_for(lambda: replicated(a, RUN, 1), what="step 1 replicated")
    os.kill(b.proc.pid, signal.SIGSTOP)
    try:
        save(a, 0, 1, [2])
        gone = wait_for(
            lambda: logged(a, rf"peer part-b \({re.escape(b.address)}\) unreachable: (\S+)"),
            what="the partition logged",
        )
        assert gone.group(1) == "DEADLINE_EXCEEDED:", gone.group(0)
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    back = wait_for(
        lambda: logged(a, rf"peer part-b \({re.escape(b.address)}\) reachable again after "
                          r"(\d+) s"),  # fmt: skip
        what="the return logged",
    )
    assert int(back.group(1)) >= 0
    wait_for(lambda: replicated(a, RUN, 1, 2), what="step 2 replicated after the partition")


def test_a_peer_started_later_is_found_by_its_backoff_not_the_next_scan(cluster):
    """A daemon whose listed peer is not up yet asks it again after a short backoff, even
    with scans an hour apart."""
    daemons = cluster(["late-a", "late-b"], extra=["--scan-interval", "3600"], later=["late-b"])
    a, b = daemons["late-a"], daemons["late-b"]
    time.sleep(1.5)  # a has asked b and found nobody
    cluster.restart(b)
    wait_for(lambda: knows(a, {b.address}), timeout=20, what="late-a knowing late-b")


def test_a_peer_that_is_not_a_replica_target_is_not_asked_again(cluster):
    """With replicas=1 among three daemons, each asks one peer, its target, every scan;
    the third, once known, is left alone (its Status calls stop)."""
    daemons = cluster(["m-a", "m-b", "m-c"], extra=["--replicas", "1"])
    save(daemons["m-a"], 0, 1, [1])
    wait_for(lambda: replicated(daemons["m-a"], RUN, 1), what="replicated")
    with daemons["m-a"].client() as client:
        (state,) = client.status().replication
    (target,) = state.targets
    other = ({"m-b", "m-c"} - {target}).pop()
    os.kill(daemons[other].proc.pid, signal.SIGSTOP)  # it would not answer if asked
    try:
        save(daemons["m-a"], 0, 1, [2])
        wait_for(lambda: replicated(daemons["m-a"], RUN, 1, 2), what="step 2 replicated")
        assert not logged(daemons["m-a"], f"peer {other} .*unreachable")
    finally:
        os.kill(daemons[other].proc.pid, signal.SIGCONT)


def test_connections_to_peers_not_watched_close_once_unused(cluster, monkeypatch):
    """A daemon's connections to the peers it does not replicate to close once unused for
    IDLE_CHANNEL seconds (they would pile up to one per node of the cluster)."""
    from mtckpt.daemon import peers as membership

    daemons = cluster(["c-a", "c-b"])
    a, b = daemons["c-a"], daemons["c-b"]
    monkeypatch.setattr(membership, "IDLE_CHANNEL", 0.0)
    known = membership.Peers("c-x", [a.address, b.address], timeout=5.0)
    try:
        known.watch(["c-a"])
        known.refresh(everyone=True)  # both answer; only c-a is watched
        assert {m.node_id for m in known.members() if m.reachable} == {"c-a", "c-b"}
        assert set(known._clients) == {a.address}
        known.refresh()  # c-a asked again, its connection kept
        assert set(known._clients) == {a.address}
    finally:
        known.close()


def test_an_address_not_answering_takes_the_identity_a_peer_reports():
    """An address never identified takes the node id a reachable peer reported for it and
    is asked at once, not after its backoff (up to 30 s for one that never answered, so
    that a large cluster starting does not probe itself over and over); only valid ids,
    only for addresses of its own list."""
    import time

    from mtckpt.daemon import peers as membership
    from mtckpt.proto import mtckpt_pb2 as pb

    quiet, other = "127.0.0.1:9", "127.0.0.1:10"  # nothing listens there
    known = membership.Peers("c-x", [quiet, other], timeout=0.5)
    try:
        reply = pb.StatusReply(node_id="c-a")
        reply.peers.add(address=quiet, node_id="c-q", zone="z1", reachable=True)
        reply.peers.add(address=other, node_id="../etc", reachable=True)  # not a node id
        reply.peers.add(address="10.0.0.9:7787", node_id="c-z", reachable=True)  # not listed
        known.refresh(everyone=True)  # neither answers
        for address in (quiet, other):
            assert known._members[address].next_probe > time.monotonic()  # backing off
        known._hear_members(reply)
        known.refresh()  # the quiet one asked again at once, with the identity reported
        by_address = {m.address: m for m in known.members()}
        assert (by_address[quiet].node_id, by_address[quiet].zone) == ("c-q", "z1")
        assert by_address[quiet].failures == 1 and not by_address[quiet].hinted
        assert by_address[other].node_id == "" and by_address[other].failures == 1
        assert set(by_address) == {quiet, other}
    finally:
        known.close()


def test_a_daemon_that_knows_every_peer_asks_them_briefly(cluster, monkeypatch):
    """Once every listed address is identified, a probe asks only who the peer is and its
    stride: the full Status carries lists that grow with the cluster (its peers, its
    replication), and a daemon of 256 answers its watchers every scan."""
    from mtckpt.daemon import peers as membership
    from mtckpt.daemon.rpc import Client

    daemons = cluster(["b-a", "b-b"])
    a, b = daemons["b-a"], daemons["b-b"]
    asked = []
    status = Client.status

    def recorded(self, *args, brief=False, **kwargs):
        asked.append(brief)
        return status(self, *args, brief=brief, **kwargs)

    monkeypatch.setattr(Client, "status", recorded)
    known = membership.Peers("b-x", [a.address, b.address], timeout=5.0)
    try:
        known.refresh(everyone=True)  # not identified yet: the full answer, for hints
        known.refresh(everyone=True)
    finally:
        known.close()
    assert asked == [False, False, True, True]
    assert {m.node_id for m in known.members() if m.reachable} == {"b-a", "b-b"}
    with a.client() as client:
        full, brief = client.status(), client.status(brief=True)
    assert full.peers and full.memory and full.version
    assert (brief.node_id, brief.address, brief.redundancy) == ("b-a", a.address, full.redundancy)
    assert not brief.peers and not brief.memory and not brief.replication
