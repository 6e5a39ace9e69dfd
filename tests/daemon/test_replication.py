"""Three or more daemons as real processes on loopback ports: shards saved by trainers on
one node are replicated to peers; after the loss of a node (daemon SIGKILLed, roots
deleted) a replacement daemon pulls the node's shards back with `mtckpt restore`, and the
trainer's restore is bit-exact and needs no other tier."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import grpc
import numpy as np
import pytest

from daemons import replicated, replication_of, restore, save, state, trainer, wait_for
from mtckpt.daemon import frames
from mtckpt.proto import mtckpt_pb2 as pb
from states import assert_same_state, flip_byte

RUN = "exp"  # the run the helpers in daemons.py save
NODES = ["node-a", "node-b", "node-c"]


def mtckpt_restore(daemon, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mtckpt", "restore", "--run", RUN, "--daemon",
           f"unix://{daemon.socket}", "--json", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def three(cluster):
    daemons = cluster(NODES)
    for rank, node in enumerate(NODES):
        save(daemons[node], rank, len(NODES), [1, 2])
    for node in NODES:
        wait_for(lambda n=node: replicated(daemons[n], RUN, 1, 2), what=f"{node} replicated")
    return daemons


def test_each_shard_is_replicated_to_another_node_and_listed_there(three):
    holders = {}
    for node in NODES:
        with three[node].client() as client:
            for info in client.list_shards(run=RUN).shards:
                if info.replica:
                    holders.setdefault((info.shard.step, info.shard.origin), []).append(node)
                    assert info.world_size == 3 and info.data_size > 1 << 20
    for node in NODES:
        for step in (1, 2):
            where = holders[(step, node)]
            assert len(where) == 1 and where[0] != node  # replicas=1, never on the node itself
        (state_,) = replication_of(three[node], RUN, 2)
        assert state_.stored == state_.targets and not state_.error


def test_a_lost_node_is_restored_from_its_peers_bit_exact(three, cluster):
    lost = three["node-b"]
    lost.lose_node()
    assert not lost.memory_root.exists()
    cluster.restart(lost)  # the replacement: same node id and address, empty roots
    done = mtckpt_restore(lost)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["step"] == 2 and report["ranks"] == [1]
    assert report["bytes"] > 1 << 20 and report["sources"] and "node-b" not in report["sources"]
    step, restored = restore(lost, 1, 3)
    assert step == 2
    assert_same_state(restored, state(2, 1))
    # Restore again: the step is here; the reply names the fetch that brought it.
    again = json.loads(mtckpt_restore(lost).stdout)
    assert again["step"] == 2 and again["ranks"] == [1]
    assert (again["bytes"], again["sources"]) == (report["bytes"], report["sources"])


def test_a_replacement_with_a_local_root_also_writes_the_recovered_step_to_disk(three, cluster):
    lost = three["node-b"]
    lost.lose_node()
    lost.extra = ["--local-root", str(lost.local_root)]
    cluster.restart(lost)
    done = mtckpt_restore(lost)
    assert done.returncode == 0, done.stderr
    committed = lost.local_root / RUN / f"step-{2:012d}" / "COMMIT"
    wait_for(committed.exists, what="the recovered step committed in the local tier")
    shutil.rmtree(lost.memory_root)  # only the disk copy is left on the node
    step, restored = restore(lost, 1, 3, local=True)
    assert step == 2
    assert_same_state(restored, state(2, 1))


def test_a_daemon_whose_memory_tier_was_lost_recovers_from_its_local_tier(cluster):
    daemons = cluster(["disk-a", "disk-b"], extra=["--keep", "4"], per_node={
        "disk-a": ["--local-root", str(cluster.base / "disk-a" / "local")]})  # fmt: skip
    node = daemons["disk-a"]
    save(node, 0, 2, [1, 2], local=True)
    save(daemons["disk-b"], 1, 2, [1, 2])
    for daemon in daemons.values():
        wait_for(lambda d=daemon: replicated(d, RUN, 1, 2), what=f"{daemon.node_id} replicated")
    node.kill()
    shutil.rmtree(node.memory_root)  # a reboot: tmpfs gone, the disk kept
    cluster.restart(node)
    with node.client() as client:
        own = {(i.shard.step, i.shard.rank) for i in client.list_shards(run=RUN).shards
               if not i.replica}  # fmt: skip
    assert own == {(1, 0), (2, 0)}  # listed from the local tier: peers may fetch them
    done = mtckpt_restore(node)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["step"] == 2 and report["sources"] == ["local"] and report["bytes"] > 1 << 20
    step, restored = restore(node, 0, 2)  # the memory tier only: restored there
    assert step == 2
    assert_same_state(restored, state(2, 0))


def test_restore_of_an_older_step_by_number(three, cluster):
    lost = three["node-c"]
    lost.lose_node()
    cluster.restart(lost)
    done = mtckpt_restore(lost, "--step", "1")
    assert done.returncode == 0, done.stderr
    step, restored = restore(lost, 2, 3, step=1)
    assert step == 1
    assert_same_state(restored, state(1, 2))


def test_restore_names_what_is_missing_when_no_step_is_complete(cluster):
    daemons = cluster(["solo-a", "solo-b"])
    save(daemons["solo-a"], 0, 2, [1])  # rank 1 never saved
    done = mtckpt_restore(daemons["solo-b"])
    assert done.returncode == 1
    assert "no step is complete for every rank" in done.stderr


def test_a_peer_down_during_save_is_reported_and_caught_up(cluster):
    daemons = cluster(NODES)
    save(daemons["node-a"], 0, 3, [1])
    wait_for(lambda: replicated(daemons["node-a"], RUN, 1), what="first replication")
    (first,) = replication_of(daemons["node-a"], RUN, 1)
    target = daemons[first.targets[0]]
    target.kill()
    save(daemons["node-a"], 0, 3, [2])  # the save itself does not wait for peers

    def degraded():
        states = replication_of(daemons["node-a"], RUN, 2)
        return states and states[0].error and not set(states[0].targets) <= set(states[0].stored)

    wait_for(degraded, what="degraded replication reported")
    (state_,) = replication_of(daemons["node-a"], RUN, 2)
    assert first.targets[0] in state_.error
    cluster.restart(target)
    wait_for(lambda: replicated(daemons["node-a"], RUN, 2), what="caught up")
    with target.client() as client:
        held = {(i.shard.origin, i.shard.step) for i in client.list_shards(run=RUN).shards}
    assert ("node-a", 2) in held


def test_a_daemon_that_joins_later_is_used_without_restarting_the_others(cluster):
    daemons = cluster(NODES, extra=["--replicas", "2"], later=["node-c"])
    pid_a, pid_b = daemons["node-a"].proc.pid, daemons["node-b"].proc.pid
    save(daemons["node-a"], 0, 1, [1])

    def short_of_a_peer():
        states = replication_of(daemons["node-a"], RUN, 1)
        return states and states[0].stored == ["node-b"] and states[0].error

    wait_for(short_of_a_peer, what="one replica of two, reported")
    (state_,) = replication_of(daemons["node-a"], RUN, 1)
    assert "2 replicas wanted, 1 other daemon(s) known" in state_.error
    cluster.restart(daemons["node-c"])  # its first start: node-a and node-b run on
    wait_for(lambda: replicated(daemons["node-a"], RUN, 1), what="the newcomer's replica")
    (state_,) = replication_of(daemons["node-a"], RUN, 1)
    assert sorted(state_.stored) == ["node-b", "node-c"] and not state_.error
    assert daemons["node-a"].proc.pid == pid_a and daemons["node-b"].proc.pid == pid_b


def test_replicas_go_to_another_zone(cluster):
    zones = {"node-a": "rack-1", "node-b": "rack-1", "node-c": "rack-2", "node-d": "rack-2"}
    daemons = cluster(list(zones), per_node={n: ["--zone", z] for n, z in zones.items()})
    for rank, node in enumerate(zones):
        save(daemons[node], rank, len(zones), [1])
    for node in zones:
        wait_for(lambda n=node: replicated(daemons[n], RUN, 1), what=f"{node} replicated")
        (state_,) = replication_of(daemons[node], RUN, 1)
        (holder,) = state_.stored
        assert zones[holder] != zones[node], f"{node}'s replica is in its own zone on {holder}"
        with daemons[holder].client() as client:
            held = {i.shard.origin for i in client.list_shards(run=RUN).shards}
        assert node in held


def test_a_corrupted_replica_is_detected_and_another_source_used(cluster):
    daemons = cluster(NODES, extra=["--replicas", "2"])
    save(daemons["node-a"], 0, 1, [1])
    wait_for(lambda: replicated(daemons["node-a"], RUN, 1), what="two replicas")
    (state_,) = replication_of(daemons["node-a"], RUN, 1)
    assert sorted(state_.stored) == ["node-b", "node-c"]
    # node-b comes first in node-a's peer list, so its copy is the first source tried.
    bad = daemons["node-b"]
    path = (bad.memory_root / ".replicas" / "node-a" / RUN / f"step-{1:012d}"
            / "rank-00000.safetensors")  # fmt: skip
    flip_byte(path, 4096 + 1000, mask=1)
    lost = daemons["node-a"]
    lost.lose_node()
    cluster.restart(lost)
    done = mtckpt_restore(lost)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sources"] == ["node-c"]
    assert "from node-b failed" in lost.log.read_text()
    assert "chunk 0 arrived with crc32c" in lost.log.read_text()
    assert_same_state(restore(lost, 0, 1)[1], state(1, 0))


def test_a_restarted_daemon_finds_what_its_roots_hold(three, cluster):
    daemon = three["node-a"]
    with daemon.client() as client:
        before = sorted((i.shard.origin, i.shard.step, i.shard.rank, i.replica)
                        for i in client.list_shards().shards)  # fmt: skip
    daemon.kill()
    cluster.restart(daemon)
    with daemon.client() as client:
        after = sorted((i.shard.origin, i.shard.step, i.shard.rank, i.replica)
                       for i in client.list_shards().shards)  # fmt: skip
    assert after == before and any(r for *_, r in after) and any(not r for *_, r in after)
    wait_for(lambda: replicated(daemon, RUN, 1, 2), what="replication state rebuilt")


def test_sigterm_drains_and_exits_zero(cluster):
    daemons = cluster(["drain-a", "drain-b"], extra=["--bandwidth", str(8 << 20)])
    save(daemons["drain-a"], 0, 1, [1])  # about 1 MiB at 8 MiB/s
    assert daemons["drain-a"].terminate(timeout=20) == 0
    with daemons["drain-b"].client() as client:
        held = [(i.shard.origin, i.shard.step) for i in client.list_shards(run=RUN).shards]
    assert ("drain-a", 1) in held


def test_a_wrong_token_is_rejected(cluster, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    daemons = cluster(["tok-a", "tok-b"], extra=["--token-file", str(token)])
    daemon = daemons["tok-a"]
    for wrong in (None, "guess"):
        with daemon.client(token=wrong) as client, pytest.raises(grpc.RpcError) as info:
            client.status()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with daemon.client(token="s3cret-token-0123456789") as client:
        assert client.status().node_id == "tok-a"
    save(daemon, 0, 1, [1], token="s3cret-token-0123456789")  # peers use the token too
    wait_for(
        lambda: replicated_with(daemon, "s3cret-token-0123456789"),
        what="replication with the token",
    )


def replicated_with(daemon, token):
    with daemon.client(token=token) as client:
        states = client.status().replication
    return states and all(set(s.targets) <= set(s.stored) for s in states)


def test_the_unix_socket_is_private(cluster):
    daemon = cluster(["sock-a"])["sock-a"]
    assert os.stat(daemon.socket).st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("run", "step", "rank", "origin"),
    [("../etc", 1, 0, "x"), ("exp", -1, 0, "x"), ("exp", 1, 10**6, "x"), ("exp", 1, 0, "../..")],
)
def test_names_from_the_wire_are_validated(cluster, run, step, rank, origin):
    daemon = cluster(["wire-a"])["wire-a"]
    shard = pb.ShardId(run=run, step=step, rank=rank, origin=origin)
    with daemon.client() as client:
        with pytest.raises(grpc.RpcError) as info:
            list(client.fetch(shard))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        header = frames.push_header(pb.PushHeader(shard=shard, manifest=b"{}", data_size=1))
        with pytest.raises(grpc.RpcError) as info:
            client.push([header])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not any(p.name not in ("memory",) for p in daemon.memory_root.parent.iterdir())


def test_peers_found_through_a_dns_name(cluster):
    daemons = cluster(["dns-a", "dns-b"], dns=True)  # dns-a is on 127.0.0.1, dns-b on .2
    save(daemons["dns-b"], 0, 1, [1])
    wait_for(lambda: replicated(daemons["dns-b"], RUN, 1), what="replication to dns-a")
    with daemons["dns-a"].client() as client:
        held = [(i.shard.origin, i.shard.step) for i in client.list_shards(run=RUN).shards]
    assert held == [("dns-b", 1)]


def test_replicas_beyond_keep_expire_and_their_files_are_reused(cluster):
    daemons = cluster(["keep-a", "keep-b"])  # --keep 2 (the default)
    replicas = daemons["keep-b"].memory_root / ".replicas" / "keep-a" / RUN
    inodes = {}
    for step in (1, 2, 3, 4):
        save(daemons["keep-a"], 0, 1, [step])
        wait_for(lambda s=step: replicated(daemons["keep-a"], RUN, s), what=f"step {step}")
        data = replicas / f"step-{step:012d}" / "rank-00000.safetensors"
        inodes[step] = data.stat().st_ino
    assert sorted(p.name for p in replicas.iterdir()) == [f"step-{s:012d}" for s in (3, 4)]
    assert inodes[4] == inodes[1]  # step 1 expired once step 3 came; step 4 took its file
    with daemons["keep-b"].client() as client:
        held = sorted(i.shard.step for i in client.list_shards(run=RUN, origin="keep-a").shards)
    assert held == [3, 4]


def test_a_bad_node_id_stops_the_daemon_with_one_line(tmp_path):
    cmd = [sys.executable, "-m", "mtckpt", "daemon", "--node-id", "../escape",
           "--memory-root", str(tmp_path / "m")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "mtckpt daemon: node id '../escape' is invalid: expected 1-128 characters of letters, "
        "digits, '.', '_' or '-', starting with a letter or digit"
    ]


def _lose_a_large_shard(cluster) -> tuple[dict, dict]:
    """node-a saves a shard of 80 MiB (over recovery.SPLIT_BYTES), replicated to both
    other nodes; then node-a is lost and replaced."""
    daemons = cluster(NODES, extra=["--replicas", "2"])
    big = {"w": np.random.default_rng(5).integers(0, 255, 80 << 20, dtype=np.uint8)}
    with trainer(daemons["node-a"], 0, 1) as mgr:
        mgr.save(1, big).wait()
    with daemons["node-a"].client() as client:
        client.notify(RUN, 1)
    wait_for(lambda: replicated(daemons["node-a"], RUN, 1), what="two replicas")
    daemons["node-a"].lose_node()
    cluster.restart(daemons["node-a"])
    return daemons, big


def test_a_large_shard_comes_from_all_its_replicas_at_once_damaged_runs_from_another(cluster):
    """Both holders serve a run each. node-b's copy is damaged near its start, node-c's
    near its end: whichever run each was asked for, one fails and comes from the other."""
    daemons, big = _lose_a_large_shard(cluster)
    for holder, where in (("node-b", 1000), ("node-c", -1000)):
        path = (daemons[holder].memory_root / ".replicas" / "node-a" / RUN / f"step-{1:012d}"
                / "rank-00000.safetensors")  # fmt: skip
        flip_byte(path, where, mask=1)
    done = mtckpt_restore(daemons["node-a"])
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(done.stdout)["sources"]) == ["node-b", "node-c"]
    assert np.array_equal(restore(daemons["node-a"], 0, 1)[1]["w"], big["w"])
    assert "is damaged here" in daemons["node-a"].log.read_text()
