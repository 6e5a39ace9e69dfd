"""The node's memory budget with real daemons (issue 21): a daemon keeps room for its own
node's steps and refuses peers' replicas that would not fit, saying so in the sender's
status, its metrics and `mtckpt ls`; a trainer through PeerTier takes the daemon's budget
and skips a step that would exceed it."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemons import free_port, state, trainer, wait_for

RUN = "exp"
MIB = 1 << 20


def scrape(address: str) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def refused_everywhere(daemons) -> bool:
    for daemon in daemons.values():
        with daemon.client() as client:
            states = [r for r in client.status().replication if r.shard.step == 2]
        if not states or not all("its budget of 3.5 MiB" in r.error for r in states):
            return False
    return True


@pytest.mark.parametrize("redundancy, refused", [("replicas:1", "a replica of"),
                                                 ("xor:3", "a parity piece from")])  # fmt: skip
def test_peers_data_is_refused_before_the_nodes_own_steps(cluster, redundancy, refused):
    nodes = ["a", "b", "c"]
    port = free_port()
    budget = 7 * MIB // 2  # two own steps and a spare slot of about 1 MiB each, no more
    extra = ["--memory-budget", str(budget), "--redundancy", redundancy]
    daemons = cluster(nodes, extra=extra, later=nodes,
                      per_node={"a": ["--metrics-listen", f"127.0.0.1:{port}"]})  # fmt: skip
    for rank, node in enumerate(nodes):  # every node's steps are saved before its daemon starts
        with trainer(daemons[node], rank, 3) as mgr:
            for step in (1, 2):
                mgr.save(step, state(step, rank)).wait()
    for daemon in daemons.values():
        cluster.restart(daemon)
    wait_for(lambda: refused_everywhere(daemons), what="replicas refused")
    with daemons["b"].client() as client:
        (entry,) = [r for r in client.status().replication if r.shard.step == 2]
    assert f"{refused}" in entry.error and "kept for its own next step" in entry.error
    metrics = scrape(f"127.0.0.1:{port}")
    assert metrics[("mtckpt_redundancy_refused_total", ())] >= 1
    assert metrics[("mtckpt_memory_budget_bytes", ())] == budget
    assert metrics[("mtckpt_memory_bytes", (("kind", "replicas"),))] == 0
    assert metrics[("mtckpt_memory_bytes", (("kind", "parity"),))] == 0
    assert metrics[("mtckpt_memory_bytes", (("kind", "steps"),))] > 2 * MIB
    with daemons["a"].client() as client:  # the own steps are all there
        own = {(s.shard.step, s.shard.rank) for s in client.list_shards(run=RUN, origin="a").shards}
    assert own == {(1, 0), (2, 0)}
    a = daemons["a"]
    ls = subprocess.run([sys.executable, "-m", "mtckpt", "ls", "--daemon", f"unix://{a.socket}",
                         "--memory", str(a.memory_root)],
                        capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ls.returncode == 0, ls.stderr
    assert "of its budget of 3.5 MiB" in ls.stdout and "daemon a" in ls.stdout


def test_a_trainer_takes_the_daemons_budget_and_skips_a_step_past_it(cluster):
    daemons = cluster(["a", "b"], extra=["--memory-budget", str(3 * MIB // 2)])
    with trainer(daemons["a"], 0, 1, peers=True) as mgr:
        first = mgr.save(1, {"w": b"\0" * MIB})
        first.wait("memory")
        second = mgr.save(2, {"w": b"\1" * MIB})
        assert "past its budget of 1.5 MiB" in second.skipped_reason
        assert mgr.metrics.samples()['mtckpt_saves_skipped_total{reason="memory budget"}'] == 1
