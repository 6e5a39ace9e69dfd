"""Incremental replicas (issue 22), real daemon processes: a trainer on node-a saves a
state that is mostly frozen; each step after the first reaches node-b as its changed
blocks only, and node-b rebuilds the whole replica from its replica of the step before,
bit-exact; node-a's replacement recovers from it; a peer without the earlier replica
gets the step whole."""

from __future__ import annotations

import os
import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from daemons import free_port, replicated, trainer, wait_for
from mtckpt.daemon.holdings import REPLICAS_DIR
from mtckpt.format import naming
from states import assert_same_state

RUN = "exp"
SIZE = 4 << 20
MOVING = 64 << 10


def state(step: int) -> dict:
    return {
        "frozen": np.random.default_rng(0).integers(0, 255, SIZE, dtype=np.uint8),
        "moving": np.random.default_rng(step).integers(0, 255, MOVING, dtype=np.uint8),
        "step": step,
    }


def received(address: str) -> float:
    """Bytes of replicas node-b took in (its mtckpt_replica_received_bytes_total)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "mtckpt_replica_received_bytes":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    raise AssertionError("no mtckpt_replica_received_bytes family")


def replica_file(daemon, origin: str, step: int):
    return (daemon.memory_root / REPLICAS_DIR / origin / RUN / naming.step_dir(step)
            / naming.data_file(0))  # fmt: skip


def test_a_peer_gets_the_changed_blocks_and_rebuilds_the_replica_bit_exact(cluster):
    metrics = f"127.0.0.1:{free_port()}"
    daemons = cluster(["node-a", "node-b"], per_node={"node-b": ["--metrics-listen", metrics]})
    a, b = daemons["node-a"], daemons["node-b"]
    sizes = []
    with trainer(a, 0, 1, peers=True) as mgr:
        for step in (1, 2, 3):
            before = received(metrics)
            mgr.save(step, state(step)).wait("peers")
            wait_for(lambda s=step: replicated(a, RUN, s), what=f"step {step} on node-b")
            # counted once the sender has its answer: a moment later
            wait_for(lambda b=before: received(metrics) > b, what=f"step {step} counted")
            sizes.append(received(metrics) - before)
    assert sizes[0] > SIZE  # the first goes whole
    assert all(MOVING <= size <= MOVING + 3 * (64 << 10) for size in sizes[1:]), sizes
    for step in (1, 2, 3):
        own = a.memory_root / RUN / naming.step_dir(step) / naming.data_file(0)
        if own.exists():
            assert replica_file(b, "node-a", step).read_bytes() == own.read_bytes()
    a.lose_node()
    cluster.restart(a)
    with a.client() as client:
        assert client.recover(RUN).step == 3
    with trainer(a, 0, 1) as mgr:
        step, restored = mgr.restore()
    assert step == 3
    assert_same_state(restored, state(3))


def test_a_peer_without_the_earlier_replica_gets_the_step_whole(cluster):
    metrics = f"127.0.0.1:{free_port()}"
    daemons = cluster(["node-a", "node-b"], per_node={"node-b": ["--metrics-listen", metrics]})
    a, b = daemons["node-a"], daemons["node-b"]
    with trainer(a, 0, 1, peers=True) as mgr:
        mgr.save(1, state(1)).wait("peers")
        wait_for(lambda: replicated(a, RUN, 1), what="step 1 on node-b")
        os.remove(replica_file(b, "node-a", 1))  # the base is gone: the listing is stale
        before = received(metrics)
        mgr.save(2, state(2)).wait("peers")
        wait_for(lambda: replicated(a, RUN, 2), what="step 2 on node-b")
        wait_for(lambda: received(metrics) > before, what="step 2 counted")
    assert received(metrics) - before > SIZE
    own = a.memory_root / RUN / naming.step_dir(2) / naming.data_file(0)
    assert replica_file(b, "node-a", 2).read_bytes() == own.read_bytes()
