"""Idle node daemons at growing cluster sizes: CPU per daemon once every daemon knows the
others, against one daemon alone measured in the same run (the baseline: what a daemon
costs with nobody to watch). Membership should cost each daemon the same at any size.

    python benchmarks/bench_membership.py [--sizes 4,16,64,256] [--window 20]
        [--processes 64] [--hosts 2]

Each size: N daemons on loopback, each on an address of its own (127.0.x.y, the usual
ports; tiny memory roots, every other daemon in --peers, --replicas 1), started one after
another; once each lists all others with their node ids, the CPU time (user + system,
from /proc) each uses over --window seconds. With ``--replicate-mib M``, then every
measured daemon's node saves one step of M MiB at once: the time until each step is on its
replica target, and the CPU each measured daemon spent meanwhile.

Above ``--processes`` daemons (a daemon process is about 100 MB resident: 256 of them need
more memory than a small machine has), the first ``--processes`` run as processes of
their own and are the ones measured; the others are the same Daemon class hosted together
in ``--hosts`` processes (their own gRPC servers, peers and replicators, only sharing an
interpreter), so every measured daemon sees a cluster of N. Where those would need more
cores than the machine has, ``--host-scan`` slows their scans: a measured daemon's own
calls do not depend on it, only how often its watchers ask it (one or two of them).
With ``--stand-ins``, the others are stand-ins instead, far lighter than a daemon (one
asyncio gRPC server each, in ``--hosts`` processes): each answers Status with its node id
and ListShards with nothing, and asks its own replica target for its brief Status every
``--host-scan`` seconds, which is all an idle daemon does once it knows everyone; a
measured daemon cannot tell them from daemons with nothing saved."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
PORT = 7787  # every daemon on its own loopback address (127.0.x.y), as on its own node


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def hosts_of(n: int) -> list[str]:
    return [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(n)]  # one address each


def serve(first: int, count: int, n: int, root: Path, scan: float) -> None:
    """Host daemons ``first`` .. ``first + count - 1`` of ``n`` in this process, each
    scanning every ``scan`` seconds, until SIGTERM."""
    import signal
    import threading

    from mtckpt.daemon.config import DaemonConfig
    from mtckpt.daemon.service import Daemon

    os.nice(10)  # the daemons measured come first when the cores are short
    hosts = hosts_of(n)
    daemons = []
    for i in range(first, first + count):
        config = DaemonConfig(
            node_id=f"d{i}", listen=f"{hosts[i]}:{PORT}", memory_root=str(root / f"m{i}"),
            peers=[f"{h}:{PORT}" for h in hosts if h != hosts[i]], replicas=1, insecure=True,
            workers=2, scan_interval=scan,
        )  # fmt: skip
        daemon = Daemon(config)
        daemon.start()
        daemons.append(daemon)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    for daemon in daemons:
        daemon.stop(drain=False)


def stand_in(first: int, count: int, n: int, scan: float) -> None:
    """Stand-ins for daemons ``first`` .. ``first + count - 1`` of ``n``, until SIGTERM."""
    import asyncio
    import signal

    import grpc

    from mtckpt.daemon.placement import replica_targets
    from mtckpt.proto import mtckpt_pb2 as pb
    from mtckpt.proto import mtckpt_pb2_grpc as pb_grpc

    os.nice(10)
    hosts, ids = hosts_of(n), [f"d{i}" for i in range(n)]

    class StandIn(pb_grpc.DaemonServicer):
        def __init__(self, i: int) -> None:
            self.reply = pb.StatusReply(node_id=ids[i], address=f"{hosts[i]}:{PORT}",
                                        replicas=1, version=1, redundancy="replicas:1")  # fmt: skip

        async def Status(self, request, context):  # noqa: N802 (gRPC's name)
            return self.reply

        async def ListShards(self, request, context):  # noqa: N802
            return pb.ListShardsReply()

    async def watch(i: int) -> None:
        target = replica_targets(ids[i], "", [(d, "") for d in ids], 1)[0]
        async with grpc.aio.insecure_channel(f"{hosts[ids.index(target)]}:{PORT}") as channel:
            stub = pb_grpc.DaemonStub(channel)
            while True:
                try:
                    await stub.Status(pb.StatusRequest(brief=True), timeout=5)  # knows all
                except grpc.RpcError:
                    pass
                await asyncio.sleep(scan)

    async def main() -> None:
        servers = []
        for i in range(first, first + count):
            server = grpc.aio.server()
            pb_grpc.add_DaemonServicer_to_server(StandIn(i), server)
            server.add_insecure_port(f"{hosts[i]}:{PORT}")
            await server.start()
            servers.append(server)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        watchers = [asyncio.create_task(watch(i)) for i in range(first, first + count)]
        await stop.wait()
        for task in watchers:
            task.cancel()
        await asyncio.gather(*(server.stop(0) for server in servers))

    asyncio.run(main())


def start(n: int, root: Path, daemons: list[tuple[subprocess.Popen, str]],
          hosting: list[subprocess.Popen], processes: int, hosts: int,
          host_scan: float, stand_ins: bool = False) -> None:  # fmt: skip
    """Start ``n`` daemons: the first ``processes`` each appended to ``daemons`` as it
    starts, the others in ``hosts`` processes appended to ``hosting`` (the caller stops
    them all, those started before a failure too)."""
    hosts_list = hosts_of(n)
    rest = list(range(processes, n))
    for part in range(hosts if rest else 0):
        chosen = rest[part * len(rest) // hosts : (part + 1) * len(rest) // hosts]
        first, count = chosen[0], len(chosen)
        log = open(root / f"host{part}.log", "wb")  # noqa: SIM115 (its stderr)
        mode = "--stand-in" if stand_ins else "--serve"
        command = [sys.executable, __file__, mode, f"{first}:{count}", "--size", str(n),
                   "--root", str(root), "--host-scan", str(host_scan)]  # fmt: skip
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        hosting.append(proc)
        if "ready" not in proc.stdout.readline():
            why = (root / f"host{part}.log").read_text()
            raise RuntimeError(f"host {part} did not start: {why}")
    for i, host in enumerate(hosts_list[:processes]):
        peers = ",".join(f"{h}:{PORT}" for h in hosts_list if h != host)
        socket_path = root / f"d{i}.sock"
        command = [sys.executable, "-m", "mtckpt", "daemon", "--node-id", f"d{i}",
                   "--listen", f"{host}:{PORT}", "--socket", str(socket_path),
                   "--memory-root", str(root / f"m{i}"), "--peers", peers, "--replicas", "1",
                   "--insecure", "--workers", "4"]  # fmt: skip
        log = open(root / f"d{i}.log", "wb")  # noqa: SIM115 (the daemon's stderr)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        daemons.append((proc, f"unix://{socket_path}"))
        if "ready" not in proc.stdout.readline():
            raise RuntimeError(f"daemon d{i} did not start: {(root / f'd{i}.log').read_text()}")


def all_known(daemons, n: int) -> bool:
    from mtckpt.daemon.rpc import Client

    for _, address in daemons:
        with Client(address, timeout=10) as client:
            peers = client.status().peers
        if sum(1 for p in peers if p.node_id) < n - 1:
            return False
    return True


def replicate(daemons, root: Path, mib: float) -> dict:
    """Every measured daemon's node saves step 1 of run ``scale`` (``mib`` MiB) and tells
    its daemon, one after another; the seconds from the last until every step is on its
    target, and each daemon's CPU from the first save."""
    import numpy as np

    import mtckpt
    from mtckpt.daemon.rpc import Client

    before = [cpu_seconds(p.pid) for p, _ in daemons]
    started = time.monotonic()
    for i, (_, address) in enumerate(daemons):
        tier = mtckpt.MemoryTier(str(root / f"m{i}"), keep=1)
        state = {"w": np.full(int(mib * (1 << 18)), i, np.float32)}
        with mtckpt.CheckpointManager("scale", memory=tier, rank=0, world_size=1) as mgr:
            mgr.save(1, state).wait()
        with Client(address, timeout=30) as client:
            client.notify("scale", 1)
    saved = time.monotonic()
    pending = list(range(len(daemons)))
    while pending:
        if time.monotonic() - started > 600:
            raise RuntimeError(f"daemons {pending} did not replicate their step in 600 s")
        pending = [i for i in pending if not _replicated(daemons[i][1])]
        time.sleep(0.1)
    seconds = time.monotonic() - saved
    used = [cpu_seconds(p.pid) - b for (p, _), b in zip(daemons, before, strict=True)]
    return {"saving_s": round(saved - started, 2), "replicated_s": round(seconds, 2),
            "replicated_mib": mib * len(daemons),
            "replication_cpu_s": sum(used) / len(used)}  # fmt: skip


def _replicated(address: str) -> bool:
    from mtckpt.daemon.rpc import Client

    with Client(address, timeout=30) as client:
        states = [r for r in client.status().replication if r.shard.run == "scale"]
    return bool(states) and all(set(r.targets) <= set(r.stored) for r in states)


def measure(n: int, window: float, settle: float, processes: int, hosts: int,
            host_scan: float, mib: float = 0, stand_ins: bool = False) -> dict:  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mtc-mem-", dir="/dev/shm") as root:
        daemons: list[tuple[subprocess.Popen, str]] = []
        hosting: list[subprocess.Popen] = []
        try:
            start(n, Path(root), daemons, hosting, min(n, processes), hosts, host_scan,
                  stand_ins)
            started = time.monotonic()
            while not all_known(daemons, n):
                if time.monotonic() - started > 600:
                    raise RuntimeError(f"{n} daemons did not all learn each other in 600 s")
                time.sleep(1)
            learned = time.monotonic() - started
            time.sleep(settle)  # first probes and backoffs over
            before = [cpu_seconds(p.pid) for p, _ in daemons]
            time.sleep(window)
            used = [cpu_seconds(p.pid) - b for (p, _), b in zip(daemons, before, strict=True)]
            real = not stand_ins or n <= processes  # a stand-in takes no replica
            replication = replicate(daemons, Path(root), mib) if mib and n > 1 and real else {}
        finally:
            procs = [p for p, _ in daemons] + hosting
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    per = [1000 * u / window for u in used]
    return {"daemons": n, "measured": len(per), "learned_s": round(learned, 1),
            "mean_mcores": sum(per) / len(per), "max_mcores": max(per), **replication}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4,16,64")
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds before that")
    parser.add_argument("--processes", type=int, default=64,
                        help="daemons run as processes of their own (the ones measured)")
    parser.add_argument("--hosts", type=int, default=2,
                        help="processes hosting the other daemons together")
    parser.add_argument("--host-scan", type=float, default=0.5,
                        help="scan interval of the hosted daemons (the measured keep 0.5 s)")
    parser.add_argument("--replicate-mib", type=float, default=0,
                        help="then each measured daemon's node saves a step of this size")
    parser.add_argument("--out", type=Path, default=Path("bench-out/membership.json"))
    parser.add_argument("--stand-ins", action="store_true",
                        help="the others are stand-ins, not hosted daemons")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # FIRST:COUNT, for a host
    parser.add_argument("--stand-in", help=argparse.SUPPRESS)  # FIRST:COUNT
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve or args.stand_in:
        first, count = (int(v) for v in (args.serve or args.stand_in).split(":"))
        if args.serve:
            serve(first, count, args.size, args.root, args.host_scan)
        else:
            stand_in(first, count, args.size, args.host_scan)
        return 0
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a connection to every peer
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20))  # root may
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sizes = [1] + [int(n) for n in args.sizes.split(",")]
    print("| daemons | measured | all known after s | CPU per daemon, mean (millicores) | "
          "max | mean / one daemon alone |\n|---|---|---|---|---|---|", flush=True)  # fmt: skip
    rows: list[dict] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for n in sizes:  # each row as it is measured: a larger size may not finish
        row = measure(n, args.window, args.settle, args.processes, args.hosts, args.host_scan,
                      args.replicate_mib, args.stand_ins)
        rows.append(row)
        ratio = row["mean_mcores"] / rows[0]["mean_mcores"]
        print(f"| {row['daemons']} | {row['measured']} | {row['learned_s']} | "
              f"{row['mean_mcores']:.1f} | {row['max_mcores']:.1f} | {ratio:.2f} |",
              flush=True)  # fmt: skip
        args.out.write_text(json.dumps(rows, indent=1))
    if args.replicate_mib:
        print("\n| daemons | nodes saving | MiB in all | saves took s | all on their "
              "targets s after the last | CPU per saving daemon s |\n"
              "|---|---|---|---|---|---|")  # fmt: skip
        for row in (r for r in rows[1:] if "replicated_s" in r):
            print(f"| {row['daemons']} | {row['measured']} | {row['replicated_mib']:.0f} | "
                  f"{row['saving_s']} | {row['replicated_s']} | "
                  f"{row['replication_cpu_s']:.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
