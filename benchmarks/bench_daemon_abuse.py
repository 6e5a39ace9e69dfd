"""Daemon responsiveness under abusive peers: one `mtckpt daemon` holding a 64 MiB shard.

The trainer's ``Status`` call on the Unix socket is timed (one call at a time, as the
trainer makes them) on an idle daemon and while a peer holds ``--unread`` Fetch streams of
that shard open without reading them, in the same run, alternating round by round. The
target: the trainer's median latency under abuse at most 2x the idle one (before the
per-peer limits, 40 unread streams took every RPC thread and the trainer's calls timed
out). Also reported: how many of the streams the daemon refused at once.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
from _harness import free_port, markdown_table, print_checks, target_check, write_report
from bench_replication import RUN, Daemon

import mtckpt
from mtckpt.daemon.rpc import Client
from mtckpt.proto import mtckpt_pb2 as pb


def status_latencies(client: Client, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        client.status()
        times.append(time.perf_counter() - start)
    return times


def open_unread(peer: Client, ident: pb.ShardId, count: int) -> list:
    """``count`` Fetch streams of ``ident`` opened and never read."""
    return [peer._fetch(pb.FetchRequest(shard=ident)) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unread", type=int, default=100, help="streams held unread (100)")
    parser.add_argument("--calls", type=int, default=200, help="Status calls per round (200)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory-root", default="/dev/shm")
    parser.add_argument("--out", default="bench-out/daemon_abuse.json")
    args = parser.parse_args()
    started = _dt.datetime.now(_dt.timezone.utc)

    base = Path(tempfile.mkdtemp(prefix="mtckpt-bench-abuse-", dir=args.memory_root))
    sockets = Path(tempfile.mkdtemp(prefix="mtb-"))
    # A timeout longer than the run: the streams stay held, as an abuser that reads a
    # byte now and then would keep them.
    daemon = Daemon("abused", base, sockets, free_port(), [], ["--stream-idle-timeout", "3600"])
    daemon.start()
    times: dict[str, list[float]] = {"idle": [], "abused": []}
    refused: list[int] = []
    try:
        with mock.patch.dict(os.environ, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}):
            with mtckpt.CheckpointManager(
                RUN, rank=0, world_size=1, memory=mtckpt.MemoryTier(path=str(daemon.root))
            ) as mgr:
                mgr.save(1, {"w": np.ones(16 << 20, np.float32)}).wait()  # fmt: skip
        ident = pb.ShardId(run=RUN, step=1, rank=0, origin=daemon.node)
        with daemon.client() as trainer:
            trainer.notify(RUN, 1)
            status_latencies(trainer, 20)  # warm the channel
            for _ in range(args.rounds):
                times["idle"] += status_latencies(trainer, args.calls)
                peer = Client(f"127.0.0.1:{daemon.port}", timeout=600)
                calls = open_unread(peer, ident, args.unread)
                time.sleep(0.5)  # the daemon has taken or refused each
                times["abused"] += status_latencies(trainer, args.calls)
                refused.append(sum(call.done() for call in calls))
                for call in calls:
                    call.cancel()
                peer.close()
                time.sleep(0.5)  # the cancelled streams are gone
    finally:
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)

    idle, abused = statistics.median(times["idle"]), statistics.median(times["abused"])
    rows = [[label, f"{statistics.median(xs) * 1e3:.3f}",
             f"{statistics.quantiles(xs, n=100)[98] * 1e3:.3f}", f"{max(xs) * 1e3:.3f}",
             str(len(xs))] for label, xs in times.items()]  # fmt: skip
    print(f"\ntrainer Status over the Unix socket; {args.unread} unread Fetch streams of a "
          f"64 MiB shard held by one peer while abused (refused at once: {refused}):")  # fmt: skip
    print(markdown_table(["daemon", "median ms", "p99 ms", "max ms", "calls"], rows))
    checks = [
        target_check(
            "trainer Status median, abused / idle",
            abused / idle,
            2.0,
            "max",
            f"{args.unread} streams opened and never read by one peer; same daemon, "
            "rounds alternating",
        ),  # fmt: skip
    ]
    print_checks("targets", checks)
    write_report(args.out, "daemon_abuse", started, {"status_s": times, "refused": refused,
                                                     "checks": checks})  # fmt: skip
    sys.exit(0)


if __name__ == "__main__":
    main()
