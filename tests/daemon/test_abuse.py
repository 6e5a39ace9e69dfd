"""Peers that misbehave cannot take the daemon from its trainers: streams opened and never
read are limited per peer and cancelled once idle, trainer calls on the Unix socket have
threads of their own, and a replica whose sender stalls or whose receiver is killed leaves
no file behind."""

from __future__ import annotations

import threading

import grpc
import numpy as np

from daemons import TRAIN_RUN, replicated, save, trainer, wait_for
from mtckpt.daemon import frames
from mtckpt.daemon.limits import STREAMS_PER_PEER
from mtckpt.daemon.rpc import Client
from mtckpt.format import naming
from mtckpt.proto import mtckpt_pb2 as pb

UNREAD = 40


def save_big_shard(daemon) -> pb.ShardId:
    """A 64 MiB shard of ``daemon``'s node, committed in its memory tier."""
    with trainer(daemon, 0, 1) as mgr:
        mgr.save(1, {"w": np.ones(16 << 20, np.float32)}).wait()
    return pb.ShardId(run=TRAIN_RUN, step=1, rank=0, origin=daemon.node_id)


def test_unread_fetch_streams_cannot_starve_the_daemon(cluster):
    daemons = cluster(["busy-a", "busy-b"], extra=["--stream-idle-timeout", "3"])
    a, b = daemons["busy-a"], daemons["busy-b"]
    ident = save_big_shard(a)
    peer = Client(a.address, timeout=30)
    calls = [peer._fetch(pb.FetchRequest(shard=ident)) for _ in range(UNREAD)]  # never read

    with a.client(timeout=5) as local:  # the trainer's calls still answer at once
        assert local.status().node_id == "busy-a"
        local.notify(TRAIN_RUN, 1)
    save(b, 1, 2, [1])  # and replication into the busy daemon goes on
    wait_for(lambda: replicated(b, TRAIN_RUN, 1), what="replication to the busy daemon")

    wait_for(lambda: sum(call.done() for call in calls) == UNREAD - STREAMS_PER_PEER,
             what="the streams over the peer's limit refused")  # fmt: skip
    refused = [call for call in calls if call.done()]
    assert {call.code() for call in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert f"has {STREAMS_PER_PEER} streams open already" in refused[0].details()
    # The held ones are cancelled once idle: the peer's slots are free again, and a
    # stream that is read gets every byte while the old ones are still unread.
    wait_for(lambda: a.log.read_text().count("made no progress for") == STREAMS_PER_PEER,
             what="the idle streams cancelled")  # fmt: skip
    data = a.memory_root / TRAIN_RUN / f"step-{1:012d}" / naming.data_file(0)
    assert sum(len(piece) for _, piece, _ in peer.fetch(ident)) == data.stat().st_size
    for call in calls:
        call.cancel()
    peer.close()


def replica_temp_files(daemon) -> list:
    return [p for p in (daemon.memory_root / ".replicas").rglob("*")
            if p.is_file() and naming.temp_target(p.name) is not None]  # fmt: skip


def stalled_push(sender, receiver) -> tuple[threading.Thread, dict, threading.Event]:
    """Start pushing ``sender``'s shard to ``receiver`` over gRPC, then stall after the
    first chunk; returns the pushing thread, its outcome and what releases it."""
    ident = save_big_shard(sender)
    storage = sender.memory_root / TRAIN_RUN / f"step-{1:012d}"
    manifest = (storage / naming.manifest_file(0)).read_bytes()
    data = (storage / naming.data_file(0)).read_bytes()
    header = pb.PushHeader(shard=ident, manifest=manifest, data_size=len(data))
    release, outcome = threading.Event(), {}

    def messages():
        yield frames.push_header(header)
        yield frames.push_chunk(
            0,
            data[: frames.CHUNK_BYTES],
            frames._fastpath.backend().crc32c(data[: frames.CHUNK_BYTES]),
        )
        release.wait(120)

    def push():
        try:
            with Client(receiver.address, timeout=120) as client:
                outcome["reply"] = client.push(messages())
        except grpc.RpcError as exc:
            outcome["code"] = exc.code()

    thread = threading.Thread(target=push)
    thread.start()
    wait_for(lambda: replica_temp_files(receiver), what="the replica being received")
    return thread, outcome, release


def test_a_stalled_push_is_cancelled_and_leaves_no_file(cluster):
    daemons = cluster(["push-a", "push-b"], extra=["--stream-idle-timeout", "3"])
    thread, outcome, release = stalled_push(daemons["push-a"], daemons["push-b"])
    thread.join(60)
    release.set()
    assert outcome.get("code") == grpc.StatusCode.CANCELLED
    wait_for(lambda: not replica_temp_files(daemons["push-b"]), what="the temp file removed")


def test_a_receiver_killed_mid_transfer_removes_the_partial_replica_at_restart(cluster):
    # kill-a replicates nothing itself: the one partial replica is the stalled push's
    daemons = cluster(["kill-a", "kill-b"], per_node={"kill-a": ["--replicas", "0"]})
    thread, outcome, release = stalled_push(daemons["kill-a"], daemons["kill-b"])
    daemons["kill-b"].kill()
    release.set()
    thread.join(60)
    (partial,) = replica_temp_files(daemons["kill-b"])
    shard = daemons["kill-a"].memory_root / TRAIN_RUN / f"step-{1:012d}" / naming.data_file(0)
    assert partial.stat().st_size == shard.stat().st_size  # allocated whole up front
    cluster.restart(daemons["kill-b"])
    assert not partial.exists()
    assert replica_temp_files(daemons["kill-b"]) == []
