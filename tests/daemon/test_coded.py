"""Coded redundancy (xor:G, rs:K+M) with real daemons: each node's pieces go to the
parity holders of its group, a lost node is rebuilt from the survivors of its group
bit-exact, damage is detected and other sources are used."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemons import (
    free_port,
    knows,
    make_certs,
    replicated,
    replication_of,
    restore,
    save,
    state,
    trainer,
    wait_for,
)
from mtckpt.daemon.auth import TLSFiles
from mtckpt.daemon.chain import CHAIN_WAIT
from mtckpt.daemon.groups import Group, piece_range
from mtckpt.daemon.parity import PARITY_DIR
from mtckpt.daemon.rpc import Client
from mtckpt.daemon.stripes import StripeKey
from mtckpt.format import naming
from mtckpt.proto import mtckpt_pb2 as pb
from mtckpt.redundancy import Redundancy
from states import assert_same_state

RUN = "exp"


def mtckpt_restore(daemon, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mtckpt", "restore", "--run", RUN, "--daemon",
           f"unix://{daemon.socket}", "--json", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def restore_report(daemon, *args) -> dict:
    """The report of a successful `mtckpt restore` through ``daemon``."""
    done = mtckpt_restore(daemon, *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def replaced(cluster, daemon) -> dict:
    """``daemon``'s node lost and replaced by an empty one with its id, then restored
    through `mtckpt restore`: its report."""
    daemon.lose_node()
    cluster.restart(daemon)
    return restore_report(daemon)


def _parities(daemon):
    with daemon.client() as client:
        return list(client.list_shards(run=RUN).parities)


def coded_cluster(cluster, count: int, scheme: str, steps=(1, 2), extra=(), **kwargs) -> dict:
    """``count`` daemons keeping ``scheme``, each node's rank having saved ``steps``, once
    every node's steps are redundant."""
    nodes = [f"n{i}" for i in range(count)]
    daemons = cluster(nodes, extra=["--redundancy", scheme, *extra], **kwargs)
    for rank, node in enumerate(nodes):
        save(daemons[node], rank, count, list(steps))
    for node in nodes:
        wait_for(lambda n=node: replicated(daemons[n], RUN, *steps), what=f"{node} redundant")
    return daemons


@pytest.fixture
def xor4(cluster):
    return coded_cluster(cluster, 4, "xor:4")


def test_xor_group_holds_a_third_of_each_shard_as_parity(xor4):
    for daemon in xor4.values():
        parities = _parities(daemon)
        assert {p.stripe.step for p in parities} == {1, 2}
        assert all(p.complete and len(p.contributors) == 3 for p in parities)
        data = daemon.memory_root / RUN / naming.step_dir(2)
        shard = next(data.glob("*.safetensors")).stat().st_size
        for p in parities:  # a third of a shard, not a whole copy
            assert p.size == -(-shard // 3)


@pytest.mark.parametrize("lost", ["n0", "n2"])
def test_xor_any_lost_node_is_rebuilt_bit_exact(xor4, cluster, lost):
    node = xor4[lost]
    report = replaced(cluster, node)
    rank = int(lost[1:])
    assert report["step"] == 2 and report["ranks"] == [rank]
    assert lost not in report["sources"] and len(report["sources"]) == 3
    step, restored = restore(node, rank, 4)
    assert step == 2
    assert_same_state(restored, state(2, rank))


def _daemon_logs(daemons) -> str:
    return "".join(d.log.read_text() for d in daemons.values())


def test_rs_any_two_lost_nodes_are_rebuilt_bit_exact(cluster):
    daemons = coded_cluster(cluster, 5, "rs:3+2")
    lost = ["n1", "n3"]
    for node in lost:
        daemons[node].lose_node()
    for node in lost:
        cluster.restart(daemons[node])
    for node in lost:
        rank = int(node[1:])
        assert restore_report(daemons[node])["step"] == 2
        step, restored = restore(daemons[node], rank, 5)
        assert step == 2
        assert_same_state(restored, state(2, rank))


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_damaged_data_piece_and_parity_are_refused_and_other_sources_used(cluster):
    daemons = coded_cluster(cluster, 5, "rs:3+2")
    (info, *_) = [p for p in _parities(daemons["n0"]) if p.stripe.step == 2]
    group = Group(Redundancy.parse("rs:3+2"), tuple(info.stripe.group))
    stripes = [stripe for stripe, _ in group.pieces_of("n1")]
    # A chunk of another data node's piece in one stripe of n1's pieces (the sender checks
    # whole chunks: every piece of that node in the chunk is refused) and the first parity
    # of a stripe where that node holds the second, the spare.
    s1, x, s2 = next(
        (s1, x, s2) for s1 in stripes for x in group.data_nodes(s1) if x != "n1"
        for s2 in stripes if group.parity_nodes(s2)[1] == x
    )  # fmt: skip
    data = daemons[x].memory_root / RUN / naming.step_dir(2) / naming.data_file(int(x[1:]))
    offset, _ = piece_range(data.stat().st_size, 3, group.data_nodes(s1).index(x))
    _flip(data, offset + 100)
    y = group.parity_nodes(s2)[0]
    key = StripeKey(RUN, 2, "rs:3+2", group.members, s2)
    _flip(daemons[y].memory_root / PARITY_DIR / RUN / naming.step_dir(2) / f"{key.name}.parity",
          10)  # fmt: skip
    replaced(cluster, daemons["n1"])
    step, restored = restore(daemons["n1"], 1, 5)
    assert step == 2
    assert_same_state(restored, state(2, 1))
    logs = _daemon_logs(daemons)  # the helpers rebuilding n1's pieces met the damage
    assert f"from {x} failed" in logs and f"from {y} failed" in logs and "is damaged" in logs


def sized_state(step: int, rank: int) -> dict:
    rng = np.random.default_rng(step * 100 + rank)
    return {"w": rng.standard_normal(50_000 * (rank + 1) ** 2, dtype=np.float32), "step": step}


@pytest.mark.parametrize("lost", [0, 3])
def test_unequal_shard_sizes_in_a_group_are_rebuilt(cluster, lost):
    nodes = [f"n{i}" for i in range(4)]
    daemons = cluster(nodes, extra=["--redundancy", "xor:4"])
    for rank, node in enumerate(nodes):
        with trainer(daemons[node], rank, 4) as mgr:
            mgr.save(1, sized_state(1, rank)).wait()
        with daemons[node].client() as client:
            client.notify(RUN, 1)
    for node in nodes:
        wait_for(lambda n=node: replicated(daemons[n], RUN, 1), what=f"{node} redundant")
    node = daemons[f"n{lost}"]
    replaced(cluster, node)
    with trainer(node, lost, 4) as mgr:
        step, restored = mgr.restore()
    assert step == 1
    assert_same_state(restored, sized_state(1, lost))


def test_a_group_that_lost_too_many_says_so(xor4, cluster):
    for node in ("n0", "n1"):
        xor4[node].lose_node()
    cluster.restart(xor4["n0"])
    done = mtckpt_restore(xor4["n0"])
    assert done.returncode != 0
    assert "survives 1 loss" in done.stderr and "node n0's piece" in done.stderr


def test_a_group_re_forms_without_a_lost_node_and_keeps_the_old_parity(cluster):
    daemons = coded_cluster(cluster, 5, "xor:4")
    daemons["n4"].lose_node()  # gone for good: the job goes on with four nodes
    survivors = ["n0", "n1", "n2", "n3"]
    for rank, node in enumerate(survivors):
        save(daemons[node], rank, 4, [3])
    for node in survivors:  # step 2 again too, its group having lost n4 for good
        wait_for(lambda n=node: replicated(daemons[n], RUN, 2, 3), what=f"{node} redundant")
    for node in survivors:
        by_step = {}
        for p in _parities(daemons[node]):
            if p.complete:
                by_step.setdefault(p.stripe.step, set()).add(tuple(p.stripe.group))
        assert any(sorted(g) == survivors for g in by_step[3])  # the group without n4
        assert any(len(g) == 5 for g in by_step[2])  # the old step keeps its old parity too
        assert any(sorted(g) == survivors for g in by_step[2])  # and is protected again
    replaced(cluster, daemons["n1"])
    step, restored = restore(daemons["n1"], 1, 4)
    assert step == 3
    assert_same_state(restored, state(3, 1))


def test_a_node_joining_re_forms_the_group_for_new_steps_and_the_old_parity_stays(cluster):
    nodes = [f"n{i}" for i in range(5)]
    daemons = cluster(nodes, extra=["--redundancy", "xor:4"], later=["n4"])
    first = nodes[:4]
    for rank, node in enumerate(first):  # a job of four nodes
        save(daemons[node], rank, 4, [1])
    for node in first:
        wait_for(lambda n=node: replicated(daemons[n], RUN, 1), what=f"{node} redundant")
    cluster.restart(daemons["n4"])  # a fifth node joins; the job goes on with five
    for node in first:
        wait_for(lambda n=node: knows(daemons[n], {daemons["n4"].address}),
                 what=f"{node} knows n4")  # fmt: skip
    for rank, node in enumerate(nodes):
        save(daemons[node], rank, 5, [2])
    for node in nodes:
        wait_for(lambda n=node: replicated(daemons[n], RUN, 2), what=f"{node} redundant")
    groups = {}
    for node in nodes:
        for p in _parities(daemons[node]):
            assert p.complete, p.stripe
            groups.setdefault(p.stripe.step, set()).add(tuple(sorted(p.stripe.group)))
    assert groups == {1: {tuple(first)}, 2: {tuple(nodes)}}  # n4 holds none of step 1
    replaced(cluster, daemons["n1"])
    step, restored = restore(daemons["n1"], 1, 5)
    assert step == 2
    assert_same_state(restored, state(2, 1))
    assert restore_report(daemons["n1"], "--step", "1")["step"] == 1  # by the old group
    step, restored = restore(daemons["n1"], 1, 4, step=1)
    assert step == 1
    assert_same_state(restored, state(1, 1))


def _empty_in(daemons, step: int) -> dict[str, set[str]]:
    """Per stripe of ``step`` (its holder and number), the data nodes its complete parity
    counts as holding nothing of the step; AssertionError while a stripe is incomplete."""
    out = {}
    for node, daemon in daemons.items():
        for p in _parities(daemon):
            if p.stripe.step == step:
                assert p.complete, f"{node}: stripe {p.stripe.stripe} incomplete"
                out[f"{node}:{p.stripe.stripe}"] = {c.origin for c in p.contributors
                                                     if not c.ranks}  # fmt: skip
    return out


def test_a_member_that_saves_nothing_counts_as_zeros_and_its_group_rebuilds(cluster):
    """A daemon in the peer list whose trainer saves nothing (an idle node of a DaemonSet)
    is a data node of some stripes all the same. Each node whose pieces wait on it first
    says so in its Status; then the holders, told by it that it holds nothing of the step,
    take its pieces as zeros (daemon/absent.py): the others are redundant, and a lost one
    is rebuilt from the group, the idle member's pieces counted as zeros."""
    nodes = [f"n{i}" for i in range(5)]
    metrics = {node: f"127.0.0.1:{free_port()}" for node in nodes}
    per_node = {node: ["--metrics-listen", address] for node, address in metrics.items()}
    daemons = cluster(nodes, extra=["--redundancy", "xor:4"], per_node=per_node)
    saving = nodes[:4]
    for rank, node in enumerate(saving):  # n4's trainer saves nothing
        save(daemons[node], rank, 4, [1])
    named = set()

    def redundant(node: str) -> bool:
        said = " ".join(s.error for s in replication_of(daemons[node], RUN, 1))
        if "await the pieces of n4" in said:
            named.add(node)
        return replicated(daemons[node], RUN, 1)

    wait_for(lambda: all([redundant(n) for n in saving]), what="the saving nodes redundant")
    assert named  # while their stripes waited (for 5 s: each names it about 3 s in)
    empty = _empty_in(daemons, 1)
    assert set().union(*empty.values()) == {"n4"}
    assert sum(1 for e in empty.values() if e) == 3  # n4 is a data node of 3 stripes of 5
    logs = _daemon_logs(daemons)
    assert "step 1: node n4 holds no shard of the step (nor of the run)" in logs
    before = {node: received_bytes(address) for node, address in metrics.items()}
    for rank, node in enumerate(saving):  # n4 found idle: the next step's stripes do not wait
        save(daemons[node], rank, 4, [2])
    wait_for(lambda: all([replicated(daemons[n], RUN, 2) for n in saving]),
             what="the saving nodes' step 2 redundant")  # fmt: skip
    assert set().union(*_empty_in(daemons, 2).values()) == {"n4"}
    for node in nodes:  # the chains skip n4: one sum per stripe, not one each side of it
        held = sum(p.size for p in _parities(daemons[node]) if p.stripe.step == 2)
        assert received_bytes(metrics[node]) - before[node] == held, node
    assert "step 2: node n4 holds" not in _daemon_logs(daemons)  # taken as idle, not asked again
    replaced(cluster, daemons["n1"])
    step, restored = restore(daemons["n1"], 1, 4)
    assert step == 2
    assert_same_state(restored, state(2, 1))
    assert restore_report(daemons["n1"], "--step", "1")["step"] == 1
    step, restored = restore(daemons["n1"], 1, 4, step=1)
    assert step == 1
    assert_same_state(restored, state(1, 1))


def test_a_member_saving_a_step_late_replaces_the_stripes_that_counted_it_as_zeros(cluster):
    """A member whose trainer saves a step only after the holders took its pieces as zeros
    (a slow node, one that joined late): its pieces replace those stripes, the others
    send theirs again, and the step is rebuilt with its piece."""
    nodes = [f"n{i}" for i in range(5)]
    daemons = cluster(nodes, extra=["--redundancy", "xor:4"])
    for rank, node in enumerate(nodes[:4]):
        save(daemons[node], rank, 5, [1])
    wait_for(lambda: all([replicated(daemons[n], RUN, 1) for n in nodes[:4]]),
             what="four nodes redundant, n4 counted as zeros")  # fmt: skip
    assert set().union(*_empty_in(daemons, 1).values()) == {"n4"}
    save(daemons["n4"], 4, 5, [1])

    def none_empty() -> bool:
        try:
            return not any(_empty_in(daemons, 1).values())
        except AssertionError:  # a stripe incomplete: its pieces on their way again
            return False

    wait_for(none_empty, what="every stripe of step 1 complete with n4's pieces")
    replaced(cluster, daemons["n4"])
    step, restored = restore(daemons["n4"], 4, 5)
    assert step == 1
    assert_same_state(restored, state(1, 4))


def test_a_coded_group_over_mutual_tls_rebuilds_and_refuses_outsiders(cluster, tmp_path):
    pytest.importorskip("cryptography")
    nodes = [f"n{i}" for i in range(4)]
    certs = make_certs(tmp_path / "pki", [*nodes, "mallory"])
    per_node = {n: ["--tls-cert", certs[n][0], "--tls-key", certs[n][1], "--tls-ca", certs["ca"]]
                for n in nodes}  # fmt: skip
    daemons = coded_cluster(cluster, 4, "xor:4", steps=(1,), per_node=per_node)
    (info, *_) = _parities(daemons["n0"])
    mallory = Client(daemons["n0"].address, tls=TLSFiles(*certs["mallory"], certs["ca"]),
                     timeout=10)  # fmt: skip
    with mallory:
        refused = [  # a piece of n0's step, a parity, a rebuild: none to a node outside
            lambda: mallory.open_fetch(pb.ShardId(run=RUN, step=1, rank=0, origin="n0"),
                                       offset=0, length=100),
            lambda: mallory.open_fetch(parity=info.stripe),
            lambda: mallory.open_fetch(parity=info.stripe, rebuild_for=info.contributors[0].origin),
        ]  # fmt: skip
        for call in refused:
            with pytest.raises(grpc.RpcError) as raised:
                call()
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    replaced(cluster, daemons["n2"])
    step, restored = restore(daemons["n2"], 2, 4)
    assert step == 1
    assert_same_state(restored, state(1, 2))


def test_over_mutual_tls_a_restarted_daemon_still_lets_its_group_rebuild(cluster, tmp_path):
    """The group each step was sent to outlives the daemon (node memory does): a group
    member asking for pieces of a restarted daemon's shards is still let in."""
    pytest.importorskip("cryptography")
    nodes = [f"n{i}" for i in range(4)]
    certs = make_certs(tmp_path / "pki", nodes)
    per_node = {n: ["--tls-cert", certs[n][0], "--tls-key", certs[n][1], "--tls-ca", certs["ca"]]
                for n in nodes}  # fmt: skip
    daemons = coded_cluster(cluster, 4, "xor:4", steps=(1,), per_node=per_node,
                            extra=["--scan-interval", "60"])  # fmt: skip
    daemons["n2"].lose_node()
    for node in ("n0", "n1", "n3"):  # each survivor's sidecar restarted while n2 is gone:
        daemons[node].kill()  # no group can form again (3 nodes of 4 known) before n2's
        cluster.restart(daemons[node])  # replacement asks for their pieces
    cluster.restart(daemons["n2"])
    assert restore_report(daemons["n2"])["step"] == 1
    step, restored = restore(daemons["n2"], 2, 4)
    assert step == 1
    assert_same_state(restored, state(1, 2))


def assert_parities_are_the_xor_of_the_pieces(daemons, step: int) -> None:
    """Every parity of ``step`` the daemons hold is complete and the xor of its stripe's
    pieces, cut from the data nodes' own files."""
    checked = 0
    for daemon in daemons.values():
        for info in (p for p in _parities(daemon) if p.stripe.step == step):
            assert info.complete
            group = Group(Redundancy.parse(info.stripe.code), tuple(info.stripe.group))
            expected = np.zeros(info.size, np.uint8)
            for index, node in enumerate(group.data_nodes(info.stripe.stripe)):
                where = daemons[node].memory_root / RUN / naming.step_dir(step)
                blob = b"".join(f.read_bytes() for f in sorted(where.glob("*.safetensors")))
                offset, length = piece_range(len(blob), group.scheme.data, index)
                expected[:length] ^= np.frombuffer(blob, np.uint8, length, offset)
            key = StripeKey.checked(info.stripe)
            parity = (
                daemon.memory_root / PARITY_DIR / RUN / naming.step_dir(step) / f"{key.name}.parity"
            )
            assert parity.read_bytes() == expected.tobytes(), f"{key} on {daemon.node_id}"
            checked += 1
    assert checked == len(daemons)


def received_bytes(address: str) -> float:
    """Bytes of peers' data a daemon took in and stored (mtckpt_replica_received_bytes)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    family = next(f for f in text_string_to_metric_families(text)
                  if f.name == "mtckpt_replica_received_bytes")  # fmt: skip
    return sum(s.value for s in family.samples if s.name.endswith("_total"))


def test_under_xor_each_stripe_reaches_its_holder_as_one_sum_along_its_data_nodes(cluster):
    nodes = [f"n{i}" for i in range(4)]
    metrics = {node: f"127.0.0.1:{free_port()}" for node in nodes}
    per_node = {node: ["--metrics-listen", address] for node, address in metrics.items()}
    daemons = cluster(nodes, extra=["--redundancy", "xor:4", "--scan-interval", "3600"],
                      per_node=per_node)  # fmt: skip
    for rank, node in enumerate(nodes):  # saved first, then sent together, as a job's nodes
        with trainer(daemons[node], rank, 4) as mgr:
            mgr.save(1, state(1, rank)).wait()
    for node in nodes:
        with daemons[node].client() as client:
            client.notify(RUN, 1)
    for node in nodes:
        wait_for(lambda n=node: replicated(daemons[n], RUN, 1), what=f"{node} redundant")
    assert_parities_are_the_xor_of_the_pieces(daemons, 1)
    for node in nodes:  # one sum per stripe held, not a piece from each of its 3 data nodes
        (held,) = [p.size for p in _parities(daemons[node])]
        assert received_bytes(metrics[node]) == held
    # each node's three pieces: the holder's word that the stripe completed comes back along
    # the chain to every data node in the statuses
    wait_for(lambda: _daemon_logs(daemons).count("which has the stripe complete") == 12,
             what="every piece's status saying its stripe is complete")  # fmt: skip
    assert "broke" not in _daemon_logs(daemons)


def test_a_restarted_daemon_finds_its_steps_held_and_sends_none_again(xor4, cluster):
    """A step saved since the daemon's last cycle goes out without asking its holders
    first; one it finds at its start (sent before it was restarted) is listed first."""
    daemon = xor4["n1"]
    daemon.terminate()
    logged = len(daemon.log.read_text())
    cluster.restart(daemon)
    wait_for(lambda: replicated(daemon, RUN, 1, 2), what="n1's steps stored again")
    time.sleep(CHAIN_WAIT + 0.5)  # a chain started would have broken by now
    since = daemon.log.read_text()[logged:]
    assert "sent n1's piece" not in since and "broke" not in since, since


def test_a_member_that_saves_late_refuses_the_sums_and_the_pieces_go_directly(cluster):
    """A node that has saved nothing of the run refuses the sums its upstream sends it at
    once (they go to their holders: no chain breaks waiting for it); the others, having
    waited CHAIN_WAIT for its sums, started their chains without them: its pieces go on
    their own."""
    nodes = [f"n{i}" for i in range(4)]
    daemons = cluster(nodes, extra=["--redundancy", "xor:4"])
    for rank, node in enumerate(nodes[1:], start=1):
        save(daemons[node], rank, 4, [1])
    time.sleep(CHAIN_WAIT + 0.5)
    save(daemons["n0"], 0, 4, [1])
    for node in nodes:
        wait_for(lambda n=node: replicated(daemons[n], RUN, 1), what=f"{node} redundant")
    assert_parities_are_the_xor_of_the_pieces(daemons, 1)
    assert "broke" not in _daemon_logs(daemons)
    replaced(cluster, daemons["n0"])
    step, restored = restore(daemons["n0"], 0, 4)
    assert step == 1
    assert_same_state(restored, state(1, 0))


def test_a_listing_waits_for_the_stripes_asked_for_to_complete(cluster):
    nodes = [f"n{i}" for i in range(4)]
    daemons = cluster(nodes, extra=["--redundancy", "xor:4", "--scan-interval", "3600"])

    def saved(step: int) -> None:
        for rank, node in enumerate(nodes):
            with trainer(daemons[node], rank, 4) as mgr:
                mgr.save(step, state(step, rank)).wait()
        for node in nodes:
            with daemons[node].client() as client:
                client.notify(RUN, step)

    saved(1)
    for node in nodes:
        wait_for(lambda n=node: replicated(daemons[n], RUN, 1), what=f"{node} redundant")
    (stripe,) = (p.stripe for p in _parities(daemons["n0"]))
    stripe.step = 2
    replies = []
    with daemons["n0"].client() as client:

        def wait_for_step_2() -> None:
            replies.append(client.list_shards(run=RUN, parities_only=True, complete=[stripe],
                                              wait=5))  # fmt: skip

        waiter = threading.Thread(target=wait_for_step_2)
        waiter.start()
        time.sleep(0.5)
        assert not replies  # step 2 is not saved yet
        saved(2)
        waiter.join()
        (reply,) = replies
        assert not reply.shards
        assert any(p.stripe == stripe and p.complete for p in reply.parities)
        stripe.step = 3  # never saved: the reply comes after the wait, without it
        started = time.monotonic()
        reply = client.list_shards(run=RUN, complete=[stripe], wait=0.3)
        assert 0.3 <= time.monotonic() - started < 3
        assert not any(p.stripe.step == 3 for p in reply.parities) and reply.shards
        for change, says in [({"wait": 6}, "wait 6.0 s; expected 0 to 5.0"),
                             ({"complete": [stripe] * 1025}, "1025 stripes awaited; at most"),
                             ({"code": "mirror"}, "'mirror'")]:  # fmt: skip
            asked = {"complete": [stripe], "wait": 1, **change}
            if "code" in asked:
                stripe.code = asked.pop("code")
            with pytest.raises(grpc.RpcError) as refused:
                client.list_shards(**asked)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "ListShards: " in refused.value.details()
            assert says in refused.value.details()


def test_a_replacement_daemon_rebuilds_its_shards_from_its_group_as_it_starts(xor4, cluster):
    lost = xor4["n1"]
    lost.lose_node()
    cluster.restart(lost)

    def own_steps() -> list[int]:
        with lost.client() as client:
            listing = client.list_shards(run=RUN, origin="n1")
        return sorted(i.shard.step for i in listing.shards)

    wait_for(lambda: own_steps() == [2], what="n1's shard of step 2 rebuilt with no one asking")
    step, restored = restore(lost, 1, 4)
    assert step == 2
    assert_same_state(restored, state(2, 1))
