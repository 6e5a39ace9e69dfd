"""Idle node daemons at growing cluster sizes: CPU per daemon once every daemon knows the
others, against one daemon alone measured in the same run (the baseline: what a daemon
costs with nobody to watch). Membership should cost each daemon the same at any size.

    python benchmarks/bench_membership.py [--sizes 4,16,64] [--window 20]

Each size: N daemons on loopback, each on an address of its own (127.0.x.y, the usual
ports; tiny memory roots, every other daemon in --peers, --replicas 1), started one after
another; once each lists all others with their node ids, the CPU time (user + system,
from /proc) each uses over --window seconds."""

from __future__ import annotations

import argparse
import json
import os
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


def start(n: int, root: Path, daemons: list[tuple[subprocess.Popen, str]]) -> None:
    """Start ``n`` daemons, each appended to ``daemons`` as it starts (the caller stops
    them, those started before a failure too)."""
    hosts = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(n)]  # one address each
    for i, host in enumerate(hosts):
        peers = ",".join(f"{h}:{PORT}" for h in hosts if h != host)
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


def measure(n: int, window: float, settle: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="mtc-mem-", dir="/dev/shm") as root:
        daemons: list[tuple[subprocess.Popen, str]] = []
        try:
            start(n, Path(root), daemons)
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
        finally:
            for proc, _ in daemons:
                proc.terminate()
            for proc, _ in daemons:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    per = [1000 * u / window for u in used]
    return {"daemons": n, "learned_s": round(learned, 1), "mean_mcores": sum(per) / n,
            "max_mcores": max(per)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4,16,64")
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds before that")
    parser.add_argument("--out", type=Path, default=Path("bench-out/membership.json"))
    args = parser.parse_args()
    baseline = measure(1, args.window, args.settle)
    rows = [baseline] + [measure(int(n), args.window, args.settle)
                         for n in args.sizes.split(",")]  # fmt: skip
    print("| daemons | all known after s | CPU per daemon, mean (millicores) | max | "
          "mean / one daemon alone |\n|---|---|---|---|---|")  # fmt: skip
    for row in rows:
        ratio = row["mean_mcores"] / baseline["mean_mcores"]
        print(f"| {row['daemons']} | {row['learned_s']} | {row['mean_mcores']:.1f} | "
              f"{row['max_mcores']:.1f} | {ratio:.2f} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
