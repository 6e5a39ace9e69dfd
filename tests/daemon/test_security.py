"""Peer traffic over mutual TLS: daemons with certificates from one CA replicate to each
other; a client without a certificate, or speaking plain text, is refused."""

from __future__ import annotations

import grpc
import pytest

from daemons import make_certs, replicated, save, wait_for
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
