"""Redundancy benchmark: replicas:1 against coded groups (xor:4, rs:2+2), real daemons.

For each scheme in the same run, N `mtckpt daemon` processes on loopback (one trainer rank
per node, saving into its daemon's memory tier), measured:
- peer memory: the bytes each daemon holds for its peers (replicas, or parity) beside the
  bytes of its own kept steps; target for xor:4 at most 0.35x what replicas:1 holds;
- time to redundant: from the notify of a committed step on every node until every node's
  Status says its shards are stored by all their targets (replicas on peers, or complete
  parities in the group); target for xor:4 at most that of replicas:1;
- recovery: a node lost (daemon SIGKILLed, roots deleted, restarted empty), then the time
  of its Recover call, which fetches a replica or rebuilds from the group; target for xor:4
  at most 1.5x fetching the replica.
On one machine the daemons share its cores and the loopback: a rebuild that reads K times
the bytes of a replica is bound by the cores here, where on a cluster the node's link is.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np
from _harness import (
    free_port,
    markdown_table,
    print_checks,
    start_daemon,
    target_check,
    write_report,
)

import mtckpt
from mtckpt.daemon.rpc import Client

RUN = "bench"
MIB = 1 << 20


class Node:
    def __init__(self, name: str, base: Path, sockets: Path, port: int, peers: list[int],
                 scheme: str) -> None:  # fmt: skip
        self.name, self.root = name, base / name
        self.socket = sockets / f"{name}.sock"
        self.args = ["--node-id", name, "--listen", f"127.0.0.1:{port}",
                     "--socket", str(self.socket), "--memory-root", str(self.root),
                     "--peers", ",".join(f"127.0.0.1:{p}" for p in peers), "--insecure",
                     "--redundancy", scheme]  # fmt: skip
        self.proc = None

    def start(self) -> Node:
        self.proc = start_daemon(self.args, f"daemon {self.name}")
        return self

    def client(self) -> Client:
        return Client(f"unix://{self.socket}", timeout=600)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=120)


def state_of(nbytes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.integers(0, 255, nbytes, dtype=np.uint8)}


def redundant(node: Node, step: int) -> bool:
    with node.client() as client:
        states = [r for r in client.status().replication if r.shard.step == step]
    return bool(states) and all(set(r.targets) <= set(r.stored) and not r.error for r in states)


def held_bytes(root: Path, parts: tuple[str, ...]) -> int:
    return sum(f.stat().st_size for part in parts for f in (root / part).rglob("*")
               if f.is_file())  # fmt: skip


def run_scheme(scheme: str, count: int, nbytes: int, steps: int, base: Path) -> dict:
    sockets = Path(tempfile.mkdtemp(prefix="mtr-"))
    ports = [free_port() for _ in range(count)]
    names = [f"n{i}" for i in range(count)]
    home = base / scheme.replace(":", "-")
    nodes = [
        Node(n, home, sockets, ports[i], [p for j, p in enumerate(ports) if j != i], scheme)
        for i, n in enumerate(names)
    ]
    for node in nodes:
        node.start()
    time.sleep(2)  # every daemon has identified the others (groups are stable from here)
    result: dict = {"scheme": scheme, "redundant_s": []}
    try:
        managers = []
        for rank, node in enumerate(nodes):
            with mock.patch.dict(os.environ, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}):
                managers.append(mtckpt.CheckpointManager(
                    RUN, rank=rank, world_size=count,
                    memory=mtckpt.MemoryTier(path=str(node.root), keep=2)))  # fmt: skip
        for step in range(1, steps + 1):
            for rank, mgr in enumerate(managers):
                mgr.save(step, state_of(nbytes, step * 100 + rank)).wait("memory")
            started = time.perf_counter()
            threads = [threading.Thread(target=lambda n=n, s=step: n.client().notify(RUN, s))
                       for n in nodes]  # fmt: skip
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            waiting = list(nodes)
            while waiting:
                waiting = [n for n in waiting if not redundant(n, step)]
                time.sleep(0.01)
            result["redundant_s"].append(time.perf_counter() - started)
        for mgr in managers:
            mgr.close()
        own = held_bytes(nodes[1].root, (RUN,))
        result["own_bytes"] = own
        result["peer_bytes"] = held_bytes(nodes[1].root, (".replicas", ".parity"))
        result["spare_bytes"] = held_bytes(nodes[1].root, (".replicas-free",))
        lost = nodes[1]
        lost.stop(signal.SIGKILL)
        shutil.rmtree(lost.root)
        lost.start()
        time.sleep(1)
        started = time.perf_counter()
        with lost.client() as client:
            reply = client.recover(RUN, timeout=600)
        result["recover_s"] = time.perf_counter() - started
        result["recover_bytes"] = reply.bytes
        assert reply.step == steps, reply
    finally:
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
    parser.add_argument("--out", default="bench-out/redundancy.json")
    args = parser.parse_args()
    started = _dt.datetime.now()
    base = Path(tempfile.mkdtemp(prefix="mtckpt-redundancy-", dir=args.root))
    results = {}
    try:
        for scheme in args.schemes.split(","):
            results[scheme] = run_scheme(scheme, args.nodes, args.mib * MIB, args.steps, base)
            print(f"{scheme}: {results[scheme]}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = []
    base_line = results.get("replicas:1")
    for scheme, r in results.items():
        later = r["redundant_s"][1:] or r["redundant_s"]
        r["redundant_median_s"] = statistics.median(later)
        rows.append([scheme, f"{r['peer_bytes'] / r['own_bytes']:.2f}",
                     f"{r['spare_bytes'] / r['own_bytes']:.2f}", f"{r['redundant_median_s']:.2f}",
                     f"{r['recover_s']:.2f}", f"{r['recover_bytes'] / MIB:.0f}"])  # fmt: skip
    print(markdown_table(["scheme", "peer memory ÷ own kept steps", "spare files ÷ own",
                          "time to redundant s (median)", "recovery s", "recovery MiB fetched"],
                         rows))  # fmt: skip
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
    write_report(
        args.out,
        "redundancy",
        started,
        {"nodes": args.nodes, "mib": args.mib, "results": results, "checks": checks},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
