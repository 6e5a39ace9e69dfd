"""Saves faster than the link (issue 26.1): a step being sent holds its data file, so
the send finishes even when the step expires meanwhile (the trainer takes a new slot
instead of reusing that file); then the newest step goes next. Peers keep receiving recent
steps, the receiver sees no damaged transfer, and a node lost afterwards restores from
them bit-exact."""

from __future__ import annotations

import contextlib
import logging
import re
import time

import numpy as np
import pytest

from daemons import replicated, trainer, wait_for
from daemons import state as coded_state
from mtckpt.errors import TierError
from states import assert_same_state

RUN = "slow"
MIB = 1 << 20


def state(step: int) -> dict:
    return {"w": np.full(MIB, step, np.float32), "step": step}  # 4 MiB


def sent(daemon) -> set[int]:
    """The steps ``daemon`` logged as sent to a peer."""
    found = re.findall(rf"replicated run '{RUN}' step (\d+) ", daemon.log.read_text())
    return {int(step) for step in found}


def test_saves_faster_than_the_link_keep_recent_steps_on_peers(cluster, caplog):
    daemons = cluster(["slow-a", "slow-b"], per_node={"slow-a": ["--bandwidth", str(4 * MIB)]})
    a, b = daemons["slow-a"], daemons["slow-b"]
    caplog.set_level(logging.INFO, logger="mtckpt.tiers.memory")
    with trainer(a, 0, 1, peers=True, run=RUN) as mgr:  # keep 2; a send takes about 1 s
        for step in range(1, 21):  # one every 0.2 s: five per send
            mgr.save(step, state(step)).wait("memory")
            time.sleep(0.2)
        during = sent(a)
        wait_for(lambda: 20 in sent(a), what="the newest step sent once saves stop")
    assert "expires while it is being sent" in caplog.text  # held, not reused
    assert "crc32c" not in b.log.read_text()  # no transfer was damaged under the sender
    assert len(during) >= 2, during  # steps kept reaching the peer while saves outpaced it
    a.lose_node()
    a.start()  # a replacement with the same node id
    with trainer(a, 0, 1, peers=True, run=RUN) as mgr:
        step, restored = mgr.restore()
    assert step == 20 and np.array_equal(restored["w"], state(20)["w"])


@pytest.mark.slow  # timing-bound: in 1 of 3 full-suite runs no step was complete after the loss
def test_under_xor_a_node_lost_while_the_links_lag_resumes_with_every_other(cluster):
    """Coded redundancy with saves faster than the links: the daemons send the same sync
    steps and keep them, so a node lost mid-run is rebuilt at a step every other node
    still has, and every rank restores that step bit-exact."""
    nodes = [f"lag{i}" for i in range(4)]
    daemons = cluster(nodes, extra=["--redundancy", "xor:4", "--bandwidth", str(MIB)])
    managers = [trainer(daemons[n], r, 4, peers=True, run=RUN) for r, n in enumerate(nodes)]
    for step in range(1, 25):  # about 1 MiB a node a step; a node's send takes about 1 s
        for rank, mgr in enumerate(managers):
            mgr.save(step, coded_state(step, rank)).wait("memory")
        time.sleep(0.05)

    def a_sync_step_redundant() -> bool:  # the links send a step in about 1 s
        return any(all(replicated(d, RUN, s) for d in daemons.values()) for s in (8, 16))

    wait_for(a_sync_step_redundant, timeout=30, what="a sync step redundant on every node")
    lost = daemons["lag1"]
    lost.lose_node()  # mid-run: the newest steps are not redundant yet
    for mgr in managers:
        with contextlib.suppress(TimeoutError, TierError):  # lag1's steps, pieces sent to it
            mgr.close(timeout=1)
    lost.start()
    with trainer(lost, 1, 4, peers=True, run=RUN) as mgr:
        step, restored = mgr.restore()
    assert 0 < step < 24
    assert_same_state(restored, coded_state(step, 1))
    for rank, node in enumerate(nodes):
        with trainer(daemons[node], rank, 4, peers=True, run=RUN) as mgr:
            again, restored = mgr.restore(step=step)
        assert again == step
        assert_same_state(restored, coded_state(step, rank))
