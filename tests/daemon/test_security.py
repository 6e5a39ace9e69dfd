"""Peers are authenticated by default. Over mutual TLS daemons with certificates from one CA
replicate to each other; a client without a certificate, or speaking plain text, is
refused; a certificate binds a peer to its node id, so no node can push or fetch another's
shards. Without a token or certificates a daemon serves peers only with --insecure, on a
loopback address."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest

from daemons import free_port, make_certs, replicated, save, wait_for
from mtckpt.daemon import frames
from mtckpt.daemon.auth import TLSFiles
from mtckpt.daemon.rpc import Client
from mtckpt.proto import mtckpt_pb2 as pb
from mtckpt.proto import mtckpt_pb2_grpc as pb_grpc

pytest.importorskip("cryptography")


@pytest.fixture
def tls_cluster(cluster, tmp_path):
    certs = make_certs(tmp_path / "pki", ["tls-a", "tls-b"])
    per_node = {
        node: ["--tls-cert", certs[node][0], "--tls-key", certs[node][1], "--tls-ca", certs["ca"]]
        for node in ("tls-a", "tls-b")
    }
    return cluster(["tls-a", "tls-b"], per_node=per_node), certs


def test_daemons_replicate_over_mutual_tls(tls_cluster):
    daemons, _ = tls_cluster
    save(daemons["tls-a"], 0, 1, [1])
    wait_for(lambda: replicated(daemons["tls-a"], "exp", 1), what="replication over TLS")
    with daemons["tls-a"].client() as client:
        (peer,) = client.status().peers
    assert peer.reachable and peer.node_id == "tls-b"


def call_status(channel) -> None:
    pb_grpc.DaemonStub(channel).Status(pb.StatusRequest(), timeout=5)


def test_a_client_without_a_certificate_is_refused(tls_cluster):
    daemons, certs = tls_cluster
    with open(certs["ca"], "rb") as f:
        ca = f.read()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)  # no client certificate
    with grpc.secure_channel(daemons["tls-b"].address, credentials) as channel:
        with pytest.raises(grpc.RpcError) as info:
            call_status(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plain_text_to_a_tls_port_is_refused(tls_cluster):
    daemons, _ = tls_cluster
    with grpc.insecure_channel(daemons["tls-b"].address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            call_status(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# -- secure by default --------------------------------------------------------------------


def start_daemon(tmp_path, *args):
    cmd = [sys.executable, "-m", "mtckpt", "daemon", "--node-id", "n1",
           "--memory-root", str(tmp_path / "m"), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_a_daemon_without_authentication_refuses_to_serve_peers(tmp_path):
    done = start_daemon(tmp_path, "--listen", f"127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert "without authentication: give --token-file FILE" in done.stderr
    assert "--insecure with a loopback --listen address" in done.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "[::]"])
def test_insecure_is_refused_beyond_loopback(tmp_path, host):
    done = start_daemon(tmp_path, "--listen", f"{host}:{free_port()}", "--insecure")
    assert done.returncode == 1
    assert f"--insecure is refused on {host}:" in done.stderr


@pytest.mark.parametrize("token", ["", "short-token", "has a space in it, long enough"])
def test_a_token_that_cannot_resist_guessing_is_refused(tmp_path, token):
    path = tmp_path / "token"
    path.write_text(token)
    done = start_daemon(tmp_path, "--listen", f"127.0.0.1:{free_port()}", "--token-file",
                        str(path))  # fmt: skip
    assert done.returncode == 1
    assert f"token file {path}: a token is 16 to 4096 printable ASCII characters" in done.stderr


def test_insecure_on_loopback_serves_and_warns(cluster):
    daemons = cluster(["open-a", "open-b"])
    save(daemons["open-a"], 0, 1, [1])
    wait_for(lambda: replicated(daemons["open-a"], "exp", 1), what="replication")
    assert "WITHOUT AUTHENTICATION (--insecure)" in daemons["open-a"].log.read_text()


# -- with mutual TLS, a certificate is a node's identity ------------------------------------


def tls_client(daemon, certs, name):
    cert, key = certs[name]
    return Client(daemon.address, tls=TLSFiles(cert, key, certs["ca"]), timeout=10)


def push_header(origin: str, step: int = 7) -> pb.PushHeader:
    manifest = {"run": "exp", "step": step, "rank": 0}
    return pb.PushHeader(shard=pb.ShardId(run="exp", step=step, rank=0, origin=origin),
                         manifest=json.dumps(manifest).encode(), data_size=0)  # fmt: skip


@pytest.fixture
def pki_cluster(cluster, tmp_path):
    certs = make_certs(tmp_path / "pki", ["tls-a", "tls-b", "mallory"])
    per_node = {
        node: ["--tls-cert", certs[node][0], "--tls-key", certs[node][1], "--tls-ca", certs["ca"]]
        for node in ("tls-a", "tls-b")
    }
    return cluster(["tls-a", "tls-b"], per_node=per_node), certs


def test_a_node_cannot_push_or_fetch_another_nodes_shards(pki_cluster):
    """mallory holds a certificate of the cluster's CA: it may push and fetch shards of
    node mallory only, never forge tls-a's state on tls-b or read it back."""
    daemons, certs = pki_cluster
    save(daemons["tls-a"], 0, 1, [1])
    wait_for(lambda: replicated(daemons["tls-a"], "exp", 1), what="replication over TLS")
    forged = push_header("tls-a")
    with tls_client(daemons["tls-b"], certs, "mallory") as mallory:
        for call in (lambda: mallory.open_push(forged),
                     lambda: mallory.push(iter([frames.push_header(forged)])),
                     lambda: mallory.open_fetch(pb.ShardId(run="exp", step=1, rank=0,
                                                           origin="tls-a")),
                     lambda: list(mallory.fetch(pb.ShardId(run="exp", step=1, rank=0,
                                                           origin="tls-a"))),
                     ):  # fmt: skip
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "certificate for node 'mallory' may not" in info.value.details()
            assert "of node 'tls-a'" in info.value.details()
        # Its own node's shards are another matter: the check is the binding, not a ban.
        with pytest.raises(grpc.RpcError) as info:
            mallory.open_push(push_header("mallory"))
        assert info.value.code() != grpc.StatusCode.PERMISSION_DENIED
    with tls_client(daemons["tls-b"], certs, "tls-a") as owner:
        ident = pb.ShardId(run="exp", step=1, rank=0, origin="tls-a")
        assert sum(len(data) for _, data, _ in owner.fetch(ident, manifest=True)) > 0
    with daemons["tls-b"].client() as local:
        held = [(s.shard.origin, s.shard.step) for s in local.list_shards(run="exp").shards]
    assert held == [("tls-a", 1)]


def test_peers_cannot_call_the_trainers_methods(pki_cluster):
    daemons, certs = pki_cluster
    with tls_client(daemons["tls-b"], certs, "tls-a") as peer:
        for call in (
            lambda: peer.notify("exp", 1),
            lambda: peer.recover("exp", timeout=10),
            lambda: peer.flush(pb.ShardId(run="exp", step=1, rank=0, origin="tls-b")),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "served to this node's trainers only" in info.value.details()
