"""What the daemons survive, in the cluster in a box (network namespaces, the manifests'
command lines, a real gloo job): saves faster than a shaped link still leave a recent step
on the peers, so a lost node resumes from them; a partition is logged with the peer's id
and address, its healing too, and replication goes on after it; ranks that restore before
the process group is up agree through the daemons on one step after a node loss."""

from __future__ import annotations

import re

import pytest
from tools.cluster.job import Cluster, Config
from tools.cluster.report import summarize

NO_REMOTE = 10_000  # the object tier's every: never reached, so peers are all there is


def daemon_logs(cluster: Cluster) -> str:
    return "".join((node.root / "daemon.log").read_text() for node in cluster.nodes)


@pytest.mark.slow
def test_saves_faster_than_a_shaped_link_leave_a_recent_step_on_the_peers(tmp_path):
    """4 MiB saved about every 0.1 s over links capped at 40 Mbit/s (a transfer takes about
    0.8 s): the node lost at step 60 or later resumes from its peer, a few transfers back."""
    config = Config("peers", remote_every=NO_REMOTE)
    with Cluster(3, 1, config, tmp_path, shaping_mbit=40) as cluster:
        run = cluster.run(120, step_seconds=0.1, mib=4, every=1, failures=["node"],
                          timeout=400, limit=1, from_step=60)  # fmt: skip
        logs = daemon_logs(cluster)
    summary = summarize(run)
    assert summary["bit_identical"]
    (failure,) = summary["failures"]
    assert failure["same_step"] and "peers" in failure["tiers"], failure
    assert failure["step"] - 30 <= failure["restored_step"] <= failure["step"], failure
    assert "crc32c" not in logs  # no transfer was cut off by a slot reused under it


@pytest.mark.slow
def test_a_partition_is_named_and_healed_and_replication_goes_on(tmp_path):
    """Node 1's link is down for 8 s, then back; later node 1 is lost and resumes from
    the replica that node 0 received after the partition."""
    config = Config("peers", remote_every=NO_REMOTE, link_down=8.0)
    with Cluster(2, 1, config, tmp_path) as cluster:
        run = cluster.run(150, step_seconds=0.2, mib=2, every=10, failures=["link", "node"],
                          timeout=400, limit=2, from_step=20)  # fmt: skip
        log0 = (cluster.nodes[0].root / "daemon.log").read_text()
    summary = summarize(run)
    assert summary["bit_identical"]
    link, node = summary["failures"]
    assert link["kind"] == "link" and node["kind"] == "node"
    peer = r"peer train-1 \(10\.77\.\d+\.\d+:\d+\)"
    assert re.search(rf"{peer} unreachable", log0), log0[-3000:]
    assert re.search(rf"{peer} reachable again after \d+ s", log0), log0[-3000:]
    assert node["step"] > link["step"] and node["same_step"]
    assert node["restored_step"] >= node["step"] - 2, node  # the replicas caught up
    assert "peers" in node["tiers"], node


@pytest.mark.slow
def test_ranks_restoring_without_a_process_group_agree_through_the_daemons(tmp_path):
    """Each rank restores before torch.distributed is up, so only the daemons can make
    them agree; after a node loss (often mid-save) every rank restores one step. At the
    job's first start nothing is complete anywhere: the daemons' "none" is the answer, and
    no rank warns that it decides alone."""
    config = Config("peers", remote_every=NO_REMOTE, restore_first=True)
    with Cluster(3, 1, config, tmp_path) as cluster:
        run = cluster.run(100, step_seconds=0.1, mib=4, every=1, failures=["node"],
                          timeout=400, limit=1, from_step=40)  # fmt: skip
        rank_logs = "".join(
            (node.root / "rank0.log").read_text(errors="replace") for node in cluster.nodes
        )
    summary = summarize(run)
    assert summary["bit_identical"]
    loss, *retries = summary["failures"]
    # a rank whose daemon cannot reach the replacement's yet raises AgreementError, and
    # the job is restarted again, as a Job's backoff would
    assert all(f["kind"] == "crash" for f in retries), summary["failures"]
    assert rank_logs.count("AgreementError:") == len(retries)
    for restart in [loss, *retries]:
        assert restart.get("same_step", True), restart  # every rank, one step
    final = summary["failures"][-1]
    assert final["restored_step"] >= loss["step"] - 2 and "peers" in final["tiers"], final
    assert "each rank picks its own" not in rank_logs  # the daemons answer "none" at first
