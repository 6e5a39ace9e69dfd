"""Erasure-code throughput on one core (issue 21): encoding and decoding with ``xor:3+1``
(the parity of ``xor:4``, four nodes a group) and ``rs:4+2``, through the C fast path and its
numpy twin, beside a copy of the same bytes (np.copyto into touched memory) measured in
the same run.

    python benchmarks/bench_erasure.py [--mib 256] [--repeats 5]

Throughput counts the data bytes of the group (K shards of --mib / K MiB each): what a
daemon turns into parity, or rebuilds from, per second. Decoding rebuilds M lost data
shards from the others and the parity."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

GIB = 1 << 30


def timed(fn, repeats: int) -> float:
    fn()  # warm: pages touched, tables built
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(code, data, repeats: int) -> tuple[float, float]:
    size = data[0].size
    parity = [np.zeros(size, np.uint8) for _ in range(code.parity)]
    encode = timed(lambda: code.encode(data, parity), repeats)
    lost = list(range(code.parity))  # the first M data shards
    present = {i: s for i, s in enumerate(data + parity) if i not in lost}
    decode = timed(lambda: code.decode(present, [size] * code.data), repeats)
    rebuilt = code.decode(present, [size] * code.data)
    assert all(np.array_equal(rebuilt[i], data[i]) for i in lost)
    return encode, decode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="data bytes of the group")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default="require,off",
                        help="MTCKPT_NATIVE values: require (C), off (numpy)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench-out/erasure.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import subprocess

    rows = []
    for backend in args.backends.split(","):
        env = {**os.environ, "MTCKPT_NATIVE": backend}
        out = subprocess.run([sys.executable, __file__, "--worker", backend, "--mib",
                              str(args.mib), "--repeats", str(args.repeats)],
                             env=env, capture_output=True, text=True, check=True)  # fmt: skip
        rows += json.loads(out.stdout.strip().splitlines()[-1])
    print("| backend | code | encode GiB/s | ÷ copy | decode GiB/s | ÷ copy | copy GiB/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        encode, decode, copy = r["encode"], r["decode"], r["copy"]
        print(f"| {r['backend']} | {r['code']} | {encode:.2f} | {encode / copy:.2f} | "
              f"{decode:.2f} | {decode / copy:.2f} | {copy:.2f} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    return 0


def worker(args) -> int:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    from mtckpt import _fastpath
    from mtckpt.daemon.erasure import Code

    rng = np.random.default_rng(0)
    rows = []
    for code in (Code("xor", 3, 1), Code("rs", 4, 2)):
        shard = args.mib * (1 << 20) // code.data
        data = [rng.integers(0, 256, shard, np.uint8) for _ in range(code.data)]
        total = shard * code.data
        target = np.zeros(total, np.uint8)
        joined = np.concatenate(data)
        copy = timed(lambda t=target, j=joined: np.copyto(t, j), args.repeats)
        encode, decode = measure(code, data, args.repeats)
        rows.append({"backend": _fastpath.backend_name(),
                     "code": str(code), "bytes": total, "copy": total / copy / GIB,
                     "encode": total / encode / GIB, "decode": total / decode / GIB})  # fmt: skip
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
