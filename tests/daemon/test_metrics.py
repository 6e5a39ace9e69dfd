"""Prometheus metrics and health endpoints: the daemon's (real processes on loopback),
scraped over HTTP and parsed with prometheus_client's own parser, and the trainer's
``mgr.metrics``."""

from __future__ import annotations

import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemons import free_port, replicated, save, wait_for
from mtckpt import CheckpointManager, LocalTier, MemoryTier
from mtckpt.metrics import Endpoint, Metrics

RUN = "exp"


def scrape(address: str) -> dict[str, dict]:
    """``{family: {(sample name, labels): value}}`` from ``/metrics``, through the parser."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    return {
        family.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        for family in text_string_to_metric_families(text)
    }


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_text_format_parses_and_histograms_accumulate():
    metrics = Metrics()
    for seconds in (0.002, 0.2, 7.0):
        metrics.save_seconds.observe(seconds, stage="local")
    metrics.bytes_written.inc(1 << 30, tier="memory")
    metrics.checksum_failures.inc(tier="peers")
    families = {f.name: f for f in text_string_to_metric_families(metrics.render())}
    buckets = {
        s.labels["le"]: s.value for s in families["mtckpt_save_seconds"].samples
        if s.name.endswith("_bucket")
    }  # fmt: skip
    assert buckets["0.001"] == 0 and buckets["0.005"] == 1 and buckets["0.5"] == 2
    assert buckets["5.0"] == 2 and buckets["10.0"] == 3 and buckets["+Inf"] == 3
    samples = metrics.samples()
    assert samples['mtckpt_save_seconds_count{stage="local"}'] == 3
    assert samples['mtckpt_save_seconds_sum{stage="local"}'] == pytest.approx(7.202)
    assert samples['mtckpt_written_bytes_total{tier="memory"}'] == 1 << 30
    assert samples['mtckpt_checksum_failures_total{tier="peers"}'] == 1
    with pytest.raises(ValueError, match=r"labels \['tier'\] given, expected \['stage'\]"):
        metrics.save_seconds.observe(1.0, tier="local")
    with pytest.raises(ValueError, match="only goes up"):
        metrics.bytes_read.inc(-1, tier="local")


def test_an_endpoint_serves_metrics_and_health_and_refuses_other_paths():
    ready = [False]
    endpoint = Endpoint("127.0.0.1:0", Metrics(), ready=lambda: ready[0])
    try:
        base = f"http://{endpoint.address}"
        assert http_status(f"{base}/healthz") == 200
        assert http_status(f"{base}/readyz") == 503
        ready[0] = True
        assert http_status(f"{base}/readyz") == 200
        assert http_status(f"{base}/nothing") == 404
        assert "mtckpt_save_seconds" in scrape(endpoint.address)
    finally:
        endpoint.close()
    with pytest.raises(ValueError, match="'localhost': expected HOST:PORT"):
        Endpoint("localhost", Metrics())


def test_the_trainer_counts_saves_restores_bytes_and_damaged_copies(tmp_path):
    state = {"w": np.arange(1 << 18, dtype=np.float32), "step": 0}
    tiers = {"memory": MemoryTier(str(tmp_path / "mem"), keep=3),
             "local": LocalTier(str(tmp_path / "disk"), keep=3)}  # fmt: skip
    with CheckpointManager(RUN, **tiers) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state).wait()
        data = tmp_path / "mem" / RUN / "step-000000000003" / "rank-00000.safetensors"
        size = data.stat().st_size
        with open(data, "r+b") as f:  # a flipped byte in the newest memory copy, in place
            f.seek(size - 5)
            byte = f.read(1)[0]
            f.seek(size - 5)
            f.write(bytes([byte ^ 0xFF]))
        step, _ = mgr.restore()
        samples = mgr.metrics.samples()
    assert step == 3  # from the local copy
    for stage in ("staged", "memory", "local"):
        assert samples[f'mtckpt_save_seconds_count{{stage="{stage}"}}'] == 3
    assert samples['mtckpt_written_bytes_total{tier="memory"}'] == 3 * size
    assert samples['mtckpt_written_bytes_total{tier="local"}'] == 3 * size
    assert samples['mtckpt_checksum_failures_total{tier="memory"}'] == 1
    assert samples['mtckpt_restore_seconds_count{tier="local"}'] == 1
    assert samples['mtckpt_read_bytes_total{tier="local"}'] == size
    assert 'mtckpt_restore_seconds_count{tier="memory"}' not in samples


def test_daemons_report_replication_peers_and_health(cluster):
    ports = {"node-a": free_port(), "node-b": free_port()}
    daemons = cluster(list(ports), per_node={
        node: ["--metrics-listen", f"127.0.0.1:{port}"] for node, port in ports.items()
    })  # fmt: skip
    a, b = (f"127.0.0.1:{ports[n]}" for n in ("node-a", "node-b"))
    assert http_status(f"http://{a}/healthz") == 200
    assert http_status(f"http://{a}/readyz") == 200
    save(daemons["node-a"], 0, 2, [1, 2])
    wait_for(lambda: replicated(daemons["node-a"], RUN, 1, 2), what="node-a replicated")
    sent = scrape(a)
    pushed = sent["mtckpt_written_bytes"][("mtckpt_written_bytes_total", (("tier", "peers"),))]
    assert pushed > 2 * (1 << 20)  # two steps of a 1 MiB+ shard
    assert sent["mtckpt_save_seconds"][("mtckpt_save_seconds_count", (("stage", "peers"),))] == 2
    assert sent["mtckpt_replication_pending_shards"][("mtckpt_replication_pending_shards", ())] == 0
    assert sent["mtckpt_replication_lag_seconds"][("mtckpt_replication_lag_seconds", ())] == 0
    assert sent["mtckpt_replication_stride"][("mtckpt_replication_stride", ())] == 1  # kept up
    received = scrape(b)["mtckpt_replica_received_bytes"]
    assert received[("mtckpt_replica_received_bytes_total", ())] == pushed

    daemons["node-b"].kill()
    peers = "mtckpt_peers"
    wait_for(lambda: scrape(a)[peers][(peers, (("state", "unreachable"),))] == 1,
             what="node-b reported unreachable")  # fmt: skip
    save(daemons["node-a"], 0, 2, [3])
    wait_for(lambda: scrape(a)["mtckpt_replication_lag_seconds"][
        ("mtckpt_replication_lag_seconds", ())] > 0, what="a replication lag")  # fmt: skip
    assert daemons["node-a"].terminate() == 0
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{a}/healthz", timeout=5)


def test_every_metric_the_grafana_dashboard_queries_is_served(cluster):
    """integrations/grafana: each series its panels and variables ask for is one a daemon
    serves or a trainer's ``mgr.metrics`` holds (a renamed metric breaks this)."""
    import json
    import re
    from pathlib import Path

    port = free_port()
    cluster(["dash-a"], per_node={"dash-a": ["--metrics-listen", f"127.0.0.1:{port}"]})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        served = list(text_string_to_metric_families(reply.read().decode()))
    served += list(text_string_to_metric_families(Metrics().render()))
    series = set()
    for family in served:
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        series |= {family.name + s for s in suffixes.get(family.type, [""])}
    grafana = Path(__file__).resolve().parents[2] / "integrations" / "grafana"
    dashboard = json.loads((grafana / "mtckpt-dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(queries) >= 9 and all(p["datasource"]["uid"] == "${datasource}"
                                     for p in dashboard["panels"])  # fmt: skip
    asked = {name for q in queries for name in re.findall(r"\bmtckpt_[a-z_]+", q)}
    assert asked >= {"mtckpt_save_seconds_bucket", "mtckpt_replication_lag_seconds",
                     "mtckpt_replication_pending_shards", "mtckpt_memory_bytes"}  # fmt: skip
    assert asked <= series, f"not served: {sorted(asked - series)}"
