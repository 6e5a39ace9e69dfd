"""Redundancy benchmark: replicas:1 against coded groups (xor:4, rs:2+2), real daemons.

For each scheme in the same run, N `mtckpt daemon` processes on loopback (one trainer rank
per node, saving into its daemon's memory tier), measured:
- peer memory: the bytes each daemon holds for its peers (replicas, or parity) beside the
  bytes of its own kept steps; target for xor:4 at most 0.35x what replicas:1 holds;
- time to redundant: from the notify of a step committed on every node (saved together, the
  daemons' own scans 3 s apart, so that no node starts early; each notify on a channel
  connected before the first step, as a trainer's is) until every node's Status
  says its shards are stored by all their targets (replicas on peers, or complete parities
  in the group), each Status long-polled (answered as it changes, no polling load on the
  daemons); target for xor:4 at most that of replicas:1;
- recovery: a node lost (daemon SIGKILLed, roots deleted, restarted empty), then the time
  from the replacement daemon's ready line until its Recover call returns (the daemon
  starts recovering as it starts; the call waits for that), which fetches a replica or
  rebuilds from the group; target for xor:4 at most 1.5x fetching the replica.
On loopback the daemons share the machine's cores: moving bytes costs CPU, not link time.
With ``--mbit R`` each daemon runs in a network namespace of its own (tools/cluster's
Network) with its link shaped to R Mbit/s each way (``tc tbf``), as a cluster's nodes
are: there a node's link, not the cores, bounds what it sends and receives.
With ``--idle N``, N more daemons are in the peer list whose trainers save nothing (idle
nodes of a DaemonSet): under coded groups the holders count their pieces as zeros
(daemon/absent.py); the times are the saving nodes'.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
from _harness import (
    cpu_count,
    free_port,
    markdown_table,
    print_checks,
    start_daemon,
    target_check,
    write_report,
)
from bench_membership import cpu_seconds  # from /proc, as that bench measures its daemons

import mtckpt
from mtckpt.daemon.rpc import Client

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/, beside benchmarks/
from tools.cluster.network import Network, in_ns  # noqa: E402

RUN = "bench"
MIB = 1 << 20
SCAN = 3.0  # seconds between the daemons' own scans: a step's sends start from its notify


class Node:
    def __init__(self, name: str, base: Path, sockets: Path, address: str, peers: list[str],
                 scheme: str, ns: str | None, token: Path | None) -> None:  # fmt: skip
        self.name, self.root, self.ns, self.token = name, base / name, ns, token
        self.socket = sockets / f"{name}.sock"
        auth = ["--token-file", str(token)] if token else ["--insecure"]
        self.args = ["--node-id", name, "--listen", address, "--socket", str(self.socket),
                     "--memory-root", str(self.root), "--peers", ",".join(peers),
                     "--redundancy", scheme, "--scan-interval", str(SCAN), *auth]  # fmt: skip
        self.proc = None

    def start(self) -> Node:
        if self.ns is None:
            self.proc = start_daemon(self.args, f"daemon {self.name}")
            return self
        command = in_ns(self.ns, sys.executable, "-m", "mtckpt", "daemon", *self.args)
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        if "ready" not in self.proc.stdout.readline():
            raise RuntimeError(f"daemon {self.name} did not start in {self.ns}")
        return self

    def client(self) -> Client:
        token = self.token.read_text().strip() if self.token else None
        return Client(f"unix://{self.socket}", token=token, timeout=600)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=120)


def state_of(nbytes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.integers(0, 255, nbytes, dtype=np.uint8)}


def notify(client: Client, step: int) -> None:
    client.notify(RUN, step)


def shape_both_ways(net: Network, mbit: float) -> None:
    """Each node's link capped at ``mbit`` Mbit/s out of the node and into it."""
    for link in net.links:
        net.shape(link.node, mbit)
        burst = max(32 * 1024, int(mbit * 1e6 / 8 / 100))
        command = ["tc", "qdisc", "add", "dev", link.outside, "root", "tbf", "rate",
                   f"{mbit}mbit", "burst", str(burst), "latency", "100ms"]  # fmt: skip
        subprocess.run(in_ns(net.hub, *command), check=True, capture_output=True)


def redundant(status, step: int) -> bool:
    """Whether a daemon's Status has its shards of ``step`` stored by all their targets."""
    states = [r for r in status.replication if r.shard.step == step]
    return bool(states) and all(set(r.targets) <= set(r.stored) and not r.error for r in states)


def when_redundant(client: Client, step: int, ready: threading.Barrier) -> float:
    """The moment the daemon says its shards of ``step`` are redundant: its Status is
    long-polled, answered as its replication changes (no polling load on the daemon)."""
    reply = client.status()
    ready.wait()
    while not redundant(reply, step):
        reply = client.status(changed_since=reply.version, wait=5.0)
    return time.perf_counter()


def daemons_cpu(nodes: list[Node]) -> float:
    """The user and system CPU seconds the daemons have used, all their threads."""
    return sum(cpu_seconds(node.proc.pid) for node in nodes)


def median_after_first(values: list[float]) -> float:
    """The median of every step but the first: that one allocates the peers' files, later
    steps reuse spare ones, as a running job's do."""
    return statistics.median(values[1:] or values)


def held_bytes(root: Path, parts: tuple[str, ...]) -> int:
    return sum(f.stat().st_size for part in parts for f in (root / part).rglob("*")
               if f.is_file())  # fmt: skip


def run_scheme(scheme: str, saving: int, nbytes: int, steps: int, base: Path,
               net: Network | None, idle: int = 0) -> dict:  # fmt: skip
    """``saving`` nodes whose trainers save, and ``idle`` more daemons."""
    count = saving + idle
    sockets = Path(tempfile.mkdtemp(prefix="mtr-"))
    if net is None:
        addresses = [f"127.0.0.1:{free_port()}" for _ in range(count)]
        spaces, token = [None] * count, None
    else:
        addresses = [f"{link.address}:7787" for link in net.links]
        spaces, token = [link.ns for link in net.links], sockets / "token"
        token.write_text("bench-token-" + "x" * 24)
    home = base / scheme.replace(":", "-")
    nodes = [
        Node(f"n{i}", home, sockets, addresses[i], [a for a in addresses if a != addresses[i]],
             scheme, spaces[i], token)
        for i in range(count)
    ]  # fmt: skip
    for node in nodes:
        node.start()
    time.sleep(SCAN + 1)  # every daemon has identified the others (groups are stable from here)
    result: dict = {"scheme": scheme, "redundant_s": [], "daemon_cpu_s": [], "cores_busy": []}
    watching = [node.client() for node in nodes[:saving]]  # one channel each
    notifying = [node.client() for node in nodes[:saving]]  # connected before the first notify
    for client in notifying:
        client.status()
    try:
        managers = []
        for rank, node in enumerate(nodes[:saving]):
            with mock.patch.dict(os.environ, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}):
                managers.append(mtckpt.CheckpointManager(
                    RUN, rank=rank, world_size=saving,
                    memory=mtckpt.MemoryTier(path=str(node.root), keep=2)))  # fmt: skip
        for step in range(1, steps + 1):
            states = [state_of(nbytes, step * 100 + rank) for rank in range(saving)]
            with ThreadPoolExecutor(saving) as pool:  # the nodes save together, as a job's do
                list(pool.map(lambda m, s, n=step: m.save(n, s).wait("memory"), managers, states))
            ready = threading.Barrier(saving + 1)
            with ThreadPoolExecutor(2 * saving) as pool:  # a watcher and a notify per node
                seen = [pool.submit(when_redundant, c, step, ready) for c in watching]
                ready.wait()  # each daemon's Status is long-polled from before the notify
                started, cpu = time.perf_counter(), daemons_cpu(nodes)
                notified = [pool.submit(notify, c, step) for c in notifying]
                for done in notified:
                    done.result()
                took = max(f.result() for f in seen) - started
                used = daemons_cpu(nodes) - cpu
                result["redundant_s"].append(took)
                result["daemon_cpu_s"].append(used)
                result["cores_busy"].append(used / (took * cpu_count()))
        for mgr in managers:
            mgr.close()
        own = held_bytes(nodes[1].root, (RUN,))
        result["own_bytes"] = own
        result["peer_bytes"] = held_bytes(nodes[1].root, (".replicas", ".parity"))
        result["spare_bytes"] = held_bytes(nodes[1].root, (".replicas-free", ".parity-free"))
        lost = nodes[1]
        lost.stop(signal.SIGKILL)
        shutil.rmtree(lost.root)
        lost.start()  # a replacement daemon recovers its node's shards as it starts
        started = time.perf_counter()  # from its ready line until its shards are back
        with lost.client() as client:
            reply = client.recover(RUN, timeout=600)
        result["recover_s"] = time.perf_counter() - started
        result["recover_bytes"] = reply.bytes
        assert reply.step == steps, reply
    finally:
        for client in watching + notifying:
            client.close()
        for node in nodes:
            node.stop()
        shutil.rmtree(sockets, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="state of each node's rank")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--schemes", default="replicas:1,xor:4,rs:2+2")
    parser.add_argument("--root", default="/dev/shm", help="where the nodes' memory roots go")
    parser.add_argument("--mbit", type=float, help="daemons in network namespaces, each "
                        "link shaped to this many Mbit/s each way (root)")  # fmt: skip
    parser.add_argument("--idle", type=int, default=0, help="daemons beside the nodes whose "
                        "trainers save nothing")  # fmt: skip
    parser.add_argument("--out", default="bench-out/redundancy.json")
    args = parser.parse_args()
    started = _dt.datetime.now()
    base = Path(tempfile.mkdtemp(prefix="mtckpt-redundancy-", dir=args.root))
    results = {}
    net = None
    try:
        if args.mbit:
            net = Network(args.nodes + args.idle, group="bench", node_name="bench-{i}")
            net.create()
            shape_both_ways(net, args.mbit)
        for scheme in args.schemes.split(","):
            results[scheme] = run_scheme(scheme, args.nodes, args.mib * MIB, args.steps, base,
                                         net, args.idle)  # fmt: skip
            print(f"{scheme}: {results[scheme]}", flush=True)
    finally:
        if net is not None:
            net.destroy()
        shutil.rmtree(base, ignore_errors=True)
    rows = []
    base_line = results.get("replicas:1")
    for scheme, r in results.items():
        r["redundant_median_s"] = median_after_first(r["redundant_s"])
        r["daemon_cpu_median_s"] = median_after_first(r["daemon_cpu_s"])
        r["cores_busy_median"] = median_after_first(r["cores_busy"])
        rows.append([scheme, f"{r['peer_bytes'] / r['own_bytes']:.2f}",
                     f"{r['spare_bytes'] / r['own_bytes']:.2f}", f"{r['redundant_median_s']:.3f}",
                     f"{r['daemon_cpu_median_s']:.2f}", f"{r['cores_busy_median']:.0%}",
                     f"{r['recover_s']:.2f}", f"{r['recover_bytes'] / MIB:.0f}"])  # fmt: skip
    print(markdown_table(["scheme", "peer memory ÷ own kept steps", "spare files ÷ own",
                          "time to redundant s (median)", "daemons' CPU s per step",
                          "cores busy", "recovery s", "recovery MiB fetched"], rows))  # fmt: skip
    checks = []
    xor = results.get("xor:4")
    if base_line and xor:
        checks = [
            target_check("xor:4 peer memory / replicas:1",
                         xor["peer_bytes"] / base_line["peer_bytes"], 0.35, "max",
                         "parity kept for peers against whole replicas"),
            target_check("xor:4 time to redundant / replicas:1",
                         xor["redundant_median_s"] / base_line["redundant_median_s"], 1.0, "max",
                         "notify on every node until every node's shards are redundant"),
            target_check("xor:4 recovery / replicas:1", xor["recover_s"] / base_line["recover_s"],
                         1.5, "max", "a replacement node's Recover: rebuilt from the group "
                         "against one replica fetched"),
        ]  # fmt: skip
        print_checks("targets", checks)
    write_report(args.out, "redundancy", started,
                 {"nodes": args.nodes, "idle": args.idle, "mib": args.mib, "mbit": args.mbit,
                  "results": results, "checks": checks})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
