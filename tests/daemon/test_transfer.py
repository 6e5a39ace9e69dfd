"""The two ways a replica travels: the gRPC Push stream and the bulk data port (a ticket
from OpenPush, then frames over TCP). Both keep only what verifies, whole."""

from __future__ import annotations

import mmap
import os
import socket
import threading
import time

import grpc
import numpy as np
import pytest

from daemons import save, wait_for
from mtckpt import checksum
from mtckpt.daemon import bulk, frames, sockets
from mtckpt.daemon.holdings import Holdings, Shard
from mtckpt.daemon.rpc import shard_id
from mtckpt.errors import ChecksumMismatchError
from mtckpt.format import naming
from mtckpt.format.manifest import RankManifest
from mtckpt.proto import mtckpt_pb2 as pb
from mtckpt.tiers import base

RUN = "exp"


@pytest.fixture
def pair(cluster):
    daemons = cluster(["src", "dst"], extra=["--replicas", "0"])  # no replication of its own
    save(daemons["src"], 0, 1, [1])
    holdings = Holdings("src", daemons["src"].memory_root, keep=2)
    return daemons, holdings, Shard(RUN, 1, 0, "src")


def held(daemon) -> list[tuple[str, int]]:
    with daemon.client() as client:
        return [(i.shard.origin, i.shard.step) for i in client.list_shards(run=RUN).shards]


def test_a_replica_pushed_over_grpc_is_stored_whole(pair):
    daemons, holdings, shard = pair
    manifest = holdings.own.read_bytes(RUN, 1, naming.manifest_file(0))
    data = holdings.own.path(RUN, 1, naming.data_file(0)).read_bytes()
    header = pb.PushHeader(shard=shard_id(shard), manifest=manifest, data_size=len(data))
    with daemons["dst"].client() as client:
        reply = client.push(frames.push_messages(header, data))
    assert reply.bytes == len(data)
    assert held(daemons["dst"]) == [("src", 1)]


def open_push(daemon, holdings, shard):
    manifest = holdings.own.read_bytes(RUN, 1, naming.manifest_file(0))
    size = holdings.own.path(RUN, 1, naming.data_file(0)).stat().st_size
    header = pb.PushHeader(shard=shard_id(shard), manifest=manifest, data_size=size)
    with daemon.client() as client:
        return client.open_push(header), RankManifest.from_json(manifest, "test")


def test_bulk_data_that_does_not_match_its_manifest_is_refused(pair, tmp_path):
    daemons, holdings, shard = pair
    ticket, manifest = open_push(daemons["dst"], holdings, shard)
    damaged = tmp_path / "damaged"
    data = bytearray(holdings.own.path(RUN, 1, naming.data_file(0)).read_bytes())
    data[5000] ^= 1
    damaged.write_bytes(data)
    with open(damaged, "rb") as f, pytest.raises(bulk.BulkError, match="chunk 0 arrived"):
        bulk.send("127.0.0.1", ticket.port, ticket.ticket, f.fileno(), manifest, tls=None)
    assert held(daemons["dst"]) == []
    # The ticket was used up: the right bytes under it are refused too.
    path = holdings.own.path(RUN, 1, naming.data_file(0))
    with open(path, "rb") as f, pytest.raises(bulk.BulkError, match="unknown or expired ticket"):
        bulk.send("127.0.0.1", ticket.port, ticket.ticket, f.fileno(), manifest, tls=None)


def test_bulk_needs_a_ticket_from_an_authorised_open_push(pair):
    daemons, holdings, shard = pair
    ticket, manifest = open_push(daemons["dst"], holdings, shard)
    path = holdings.own.path(RUN, 1, naming.data_file(0))
    with open(path, "rb") as f, pytest.raises(bulk.BulkError, match="unknown or expired"):
        bulk.send("127.0.0.1", ticket.port, b"x" * 32, f.fileno(), manifest, tls=None)
    with open(path, "rb") as f:
        bulk.send("127.0.0.1", ticket.port, ticket.ticket, f.fileno(), manifest, tls=None)
    assert held(daemons["dst"]) == [("src", 1)]


def test_open_push_checks_the_header(pair):
    daemons, holdings, shard = pair
    manifest = holdings.own.read_bytes(RUN, 1, naming.manifest_file(0))
    wrong_step = pb.PushHeader(shard=shard_id(Shard(RUN, 2, 0, "src")), manifest=manifest,
                               data_size=10)  # fmt: skip
    with daemons["dst"].client() as client, pytest.raises(grpc.RpcError) as info:
        client.open_push(wrong_step)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the manifest is of run 'exp' step 1" in info.value.details()


def test_open_fetch_of_a_shard_not_held_is_not_found(pair):
    daemons, _, _ = pair
    with daemons["dst"].client() as client, pytest.raises(grpc.RpcError) as info:
        client.open_fetch(shard_id(Shard(RUN, 1, 0, "src")))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "is not held here" in info.value.details()


def test_sendfile_waits_for_a_slow_receiver(tmp_path):
    """The data port's sockets have a timeout, so they are non-blocking underneath: a
    full send buffer must be waited out, not fail the transfer."""
    path = tmp_path / "data"
    data = os.urandom(1 << 20) * 32
    path.write_bytes(data)
    sender, receiver = socket.socketpair()
    sender.settimeout(bulk.SOCKET_TIMEOUT)
    received = bytearray()

    def read_slowly():
        time.sleep(0.5)  # the sender fills its buffer meanwhile
        while len(received) < len(data):
            received.extend(receiver.recv(1 << 20))

    reader = threading.Thread(target=read_slowly)
    reader.start()
    with sender, receiver, open(path, "rb") as f:
        sockets.sendfile(sender, f.fileno(), 0, len(data))
        reader.join()
    assert received == data


@pytest.mark.parametrize("loopback", [True, False], ids=["loopback", "unix"])
def test_frames_to_a_loopback_peer_are_copied_from_a_mapping_else_sendfiled(tmp_path, monkeypatch,
                                                                           loopback):  # fmt: skip
    """On loopback the receiving kernel copies every byte anyway: the sender copies from a
    mapping instead of handing over page references (sendfile). Elsewhere (here a unix
    socket, standing for a NIC) it sends the file's pages."""
    data, manifest_json = _saved_shard(tmp_path / "src", 1, (3 << 20) + 4321)
    manifest = RankManifest.from_json(manifest_json, "test")
    source = tmp_path / "sent"
    source.write_bytes(data)
    sendfiled = []
    sendfile = sockets.sendfile
    monkeypatch.setattr(sockets, "sendfile", lambda *a: (sendfiled.append(a[3]), sendfile(*a)))
    if loopback:
        with socket.create_server(("127.0.0.1", 0)) as server:
            sender = socket.create_connection(server.getsockname())
            receiver, _ = server.accept()
    else:
        sender, receiver = socket.socketpair()
    sender.settimeout(bulk.SOCKET_TIMEOUT)
    assert sockets.copying(sender) == loopback
    received = bytearray()

    def read() -> None:
        header = bytearray(bulk.FRAME.size)
        while len(received) < len(data):
            sockets.recv_into_exactly(receiver, memoryview(header))
            offset, length, crc = bulk.FRAME.unpack(header)
            assert offset == len(received)
            frame = sockets.recv_exactly(receiver, length)
            assert checksum.crc32c(frame) == crc
            received.extend(frame)

    reader = threading.Thread(target=read)
    reader.start()
    with sender, receiver, open(source, "rb") as f:
        bulk._send_frames(sender, f.fileno(), manifest)
        reader.join()
    assert received == data
    assert sum(sendfiled) == (0 if loopback else len(data))


def test_expired_replica_files_are_reused_for_replicas_of_any_size(tmp_path):
    from mtckpt import CheckpointManager, MemoryTier

    sizes = {1: 2 << 20, 2: 2 << 20, 3: 2 << 20, 4: 3 << 20, 5: 1 << 20}  # bytes per step
    with CheckpointManager(RUN, memory=MemoryTier(str(tmp_path / "src"), keep=5)) as mgr:
        for step, size in sizes.items():
            mgr.save(step, {"w": np.full(size, step, np.uint8)}).wait()
    source = Holdings("src", tmp_path / "src", keep=5)
    dst = Holdings("dst", tmp_path / "dst", keep=1)
    inodes = {}
    for step in sizes:
        shard = Shard(RUN, step, 0, "src")
        data = source.own.path(RUN, step, naming.data_file(0)).read_bytes()
        manifest = source.own.read_bytes(RUN, step, naming.manifest_file(0))
        dst.store(shard, manifest, [(0, data)])
        dst.expire_replicas("src", RUN)
        replica = dst.storage("src").path(RUN, step, naming.data_file(0))
        assert replica.read_bytes() == data, step
        inodes[step] = replica.stat().st_ino
    # keep=1: each step's file is freed by the next and taken by the one after (mapped
    # ahead when the size matches: step 3; resized when it does not: steps 4 and 5).
    assert inodes[3] == inodes[1] and inodes[4] == inodes[2] and inodes[5] == inodes[3]


def _saved_shard(root, step: int, nbytes: int) -> tuple[bytes, bytes]:
    from mtckpt import CheckpointManager, MemoryTier

    with CheckpointManager(RUN, memory=MemoryTier(str(root), keep=1)) as mgr:
        data = np.random.default_rng(step).integers(0, 255, nbytes, dtype=np.uint8)
        mgr.save(step, {"w": data}).wait()
    source = Holdings("src", root, keep=1)
    return (source.own.path(RUN, step, naming.data_file(0)).read_bytes(),
            source.own.read_bytes(RUN, step, naming.manifest_file(0)))  # fmt: skip


def test_a_fresh_replica_file_is_allocated_a_window_ahead_and_stored_whole(tmp_path, monkeypatch):
    from mtckpt.daemon.incoming import Preparer

    monkeypatch.setattr(Preparer, "WINDOW", 1 << 20)
    data, manifest = _saved_shard(tmp_path / "src", 1, (5 << 20) + 12345)
    dst = Holdings("dst", tmp_path / "dst", keep=1)
    incoming = dst.receive(Shard(RUN, 1, 0, "src"), manifest)
    try:
        assert incoming._preparer is not None  # a fresh file: no spare to take
        for offset in range(0, len(data), 1 << 20):
            piece = data[offset : offset + (1 << 20)]
            incoming.region(offset, len(piece))[:] = piece
            assert incoming._preparer.ready >= offset + len(piece)
            incoming.accept(offset, len(piece))
        incoming.commit()
    finally:
        incoming.close()
    assert dst.storage("src").path(RUN, 1, naming.data_file(0)).read_bytes() == data


def test_a_replica_larger_than_the_memory_left_fails_naming_it(tmp_path, small_tmpfs):
    data, manifest = _saved_shard(tmp_path / "src", 1, 3 << 20)
    root = small_tmpfs(2048)
    dst = Holdings("dst", root, keep=1)
    with pytest.raises(OSError, match=r"run 'exp' step 1 rank 0 of node 'src'.*allocating"):
        dst.store(Shard(RUN, 1, 0, "src"), manifest, [(0, data)])
    assert not any(p.is_file() and p.stat().st_size for p in root.rglob("*"))


def test_a_spare_replica_file_is_made_ready_for_the_next_step_while_none_is_free(tmp_path):
    from mtckpt.daemon.holdings import FREE_DIR

    shards = {step: _saved_shard(tmp_path / f"src{step}", step, 3 << 20) for step in (1, 2)}
    dst = Holdings("dst", tmp_path / "dst", keep=2)
    free = tmp_path / "dst" / FREE_DIR
    dst.store(Shard(RUN, 1, 0, "src"), shards[1][1], [(0, shards[1][0])])
    dst.ready_spare(3 << 20, fits=lambda size: False)  # over the memory budget: none
    assert not free.exists()
    dst.ready_spare(len(shards[1][0]), fits=lambda size: True)
    dst.ready_spare(len(shards[1][0]), fits=lambda size: True)  # one is free: no second
    (spare,) = free.iterdir()
    inode = spare.stat().st_ino
    dst.store(Shard(RUN, 2, 0, "src"), shards[2][1], [(0, shards[2][0])])
    replica = dst.storage("src").path(RUN, 2, naming.data_file(0))
    assert replica.stat().st_ino == inode and replica.read_bytes() == shards[2][0]
    assert not list(free.iterdir())


def test_a_spare_a_killed_daemon_was_still_making_is_removed_at_start(tmp_path):
    from mtckpt.daemon.holdings import FREE_DIR

    free = tmp_path / "dst" / FREE_DIR
    free.mkdir(parents=True)
    making = free / naming.temp_name("zeroed-0a1b2c3d")
    making.write_bytes(b"\0" * 4096)
    (free / "zeroed-ready").write_bytes(b"\0" * 4096)  # one made whole: kept for reuse
    Holdings("dst", tmp_path / "dst", keep=1).clean_after_crash()
    assert sorted(p.name for p in free.iterdir()) == ["zeroed-ready"]


def _reused_incoming(tmp_path, nbytes: int, resized: bool = False):
    """A receive of step 3 into the file step 1's replica left (keep=1): mapped already
    (a spare), or, ``resized`` to another size, not mapped."""
    dst = Holdings("dst", tmp_path / "dst", keep=1)
    for step in (1, 2):
        data, manifest = _saved_shard(tmp_path / "src", step, nbytes - resized * 8192)
        dst.store(Shard(RUN, step, 0, "src"), manifest, [(0, data)])
        dst.expire_replicas("src", RUN)
    data, manifest = _saved_shard(tmp_path / "src", 3, nbytes)
    incoming = dst.receive(Shard(RUN, 3, 0, "src"), manifest)
    return dst, incoming, data, RankManifest.from_json(manifest, "test")


def _over_tcp(incoming, send) -> None:
    """``send(conn)`` on one end of a TCP connection, bulk.receive_frames into
    ``incoming`` on the other (the data port's timeout on both)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = socket.create_connection(server.getsockname())
        receiver, _ = server.accept()
    sender.settimeout(bulk.SOCKET_TIMEOUT)
    receiver.settimeout(bulk.SOCKET_TIMEOUT)
    thread = threading.Thread(target=lambda: (send(sender), sender.close()))
    thread.start()
    try:
        with receiver:
            bulk.receive_frames(receiver, incoming)
    finally:
        thread.join()


@pytest.mark.parametrize("resized", [False, True], ids=["spare", "resized"])
@pytest.mark.parametrize("damaged", [False, True], ids=["whole", "damaged"])
def test_frames_into_a_reused_file_are_spliced_then_checked(tmp_path, monkeypatch, damaged,
                                                            resized):  # fmt: skip
    spliced = []
    receive = sockets.SocketToFile.receive

    def counted(self, fd, offset, length):
        spliced.append(length)
        receive(self, fd, offset, length)

    monkeypatch.setattr(sockets.SocketToFile, "receive", counted)
    dst, incoming, data, manifest = _reused_incoming(tmp_path, (3 << 20) + 4321, resized)
    assert (incoming._mapping is None) == resized  # then read back to be checked
    source = tmp_path / "sent"
    sent = bytearray(data)
    if damaged:
        sent[(2 << 20) + 7] ^= 0x40  # in flight: the frames still carry the manifest's crcs
    source.write_bytes(sent)
    try:
        assert incoming.spliceable
        with open(source, "rb") as f:
            send = lambda conn: bulk._send_frames(conn, f.fileno(), manifest)  # noqa: E731
            if damaged:
                chunk = (2 << 20) // manifest.chunk_size
                with pytest.raises(ChecksumMismatchError, match=f"step 3 .*chunk {chunk} "):
                    _over_tcp(incoming, send)
                return
            _over_tcp(incoming, send)
        assert sum(spliced) == len(data)  # none passed through this process
        incoming.commit()
    finally:
        incoming.close()
    assert dst.storage("src").path(RUN, 3, naming.data_file(0)).read_bytes() == data


def test_a_connection_closed_in_the_middle_of_a_spliced_frame_is_named(tmp_path):
    _, incoming, data, _ = _reused_incoming(tmp_path, 2 << 20)

    def half_a_frame(conn):
        conn.sendall(bulk.FRAME.pack(0, 1 << 20, 0) + data[:1000])

    try:
        with pytest.raises(bulk.BulkError, match="closed in the middle of a frame"):
            _over_tcp(incoming, half_a_frame)
    finally:
        incoming.close()


def test_a_mapping_handed_over_is_unmapped_after_a_delay(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "UNMAP_DELAY", 0.3)
    path = tmp_path / "data"
    path.write_bytes(b"x" * 8192)
    with open(path, "r+b") as f:
        mapping = mmap.mmap(f.fileno(), 8192)
    handed = time.monotonic()
    base.close_mapping_later(mapping)
    assert not mapping.closed and mapping[:1] == b"x"  # still there for a while
    wait_for(lambda: mapping.closed, timeout=10, what="the unmap")
    assert time.monotonic() - handed >= 0.3


@pytest.mark.parametrize(
    "answer, says",
    [(bulk.STATUS.pack(7, 0), "answered status 7 with 0 bytes; expected 0, 2, or 1 with at most"),
     (bulk.STATUS.pack(bulk.COMPLETED, 5), "answered status 2 with 5 bytes"),
     (bulk.STATUS.pack(bulk.REFUSED, 1 << 30), "answered status 1 with 1073741824 bytes"),
     (bulk.STATUS.pack(bulk.REFUSED, 4) + b"full", "refused the transfer: full")],
)  # fmt: skip
def test_a_status_from_the_peer_is_bounded_and_checked(answer, says):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def peer():
        conn, _ = listener.accept()
        with conn:
            sockets.recv_exactly(conn, bulk.TICKET_BYTES)
            conn.sendall(answer)
            time.sleep(0.5)  # the client reads no more than it should

    thread = threading.Thread(target=peer)
    thread.start()
    try:
        with pytest.raises(bulk.BulkError, match=f"the peer at 127.0.0.1:{port} {says}"):
            bulk.fetch("127.0.0.1", port, b"t" * bulk.TICKET_BYTES, None, tls=None)
    finally:
        thread.join()
        listener.close()
