"""A peer that stops answering (SIGSTOP: its connections open, nothing comes back, as in a
network partition) is logged with its id, address and reason while transfers to it hang;
its return is logged; replication catches up on its own. Membership probes only the
peers a node replicates to."""

from __future__ import annotations

import os
import re
import signal

from daemons import replicated, save, wait_for

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
