"""First saves benchmark (issue 23): how long ``save()`` blocks for each of a run's first
saves, back to back, beside the steady state and a plain copy of the same bytes, with and
without ``mgr.reserve(state)`` beforehand, in the same run.

Each configuration starts from an empty memory tier (``keep=2``: the first three saves
each need a slot of their own). Reported: the blocking time of saves 1-3 and the median
of saves 4-8, and ``np.copyto`` of the state's bytes into touched memory (the limit),
with the time ``reserve`` took. Target (issue 23): with the start-up call, every save
including the first blocks for about one copy.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _harness import GIB, markdown_table, print_checks, target_check, write_report

import mtckpt

RUN = "first"
SAVES = 8


def state_of(nbytes: int, tensors: int) -> dict:
    rng = np.random.default_rng(0)
    per = nbytes // tensors
    return {f"t{i:03d}": rng.integers(0, 255, per, dtype=np.uint8) for i in range(tensors)}


def copy_time(state: dict) -> float:
    """np.copyto of the state's bytes into memory already touched (best of three)."""
    targets = {k: np.ones_like(v) for k, v in state.items()}
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for key, array in state.items():
            np.copyto(targets[key], array)
        best = min(best, time.perf_counter() - started)
    return best


def saves(root: Path, state: dict, reserve: bool) -> dict:
    with mtckpt.CheckpointManager(RUN, memory=mtckpt.MemoryTier(str(root), keep=2), rank=0,
                                  world_size=1) as mgr:  # fmt: skip
        reserve_s = 0.0
        if reserve:
            started = time.perf_counter()
            mgr.reserve(state)
            reserve_s = time.perf_counter() - started
        blocked = []
        for step in range(1, SAVES + 1):
            state["t000"][:8] = step
            started = time.perf_counter()
            handle = mgr.save(step, state)
            blocked.append(time.perf_counter() - started)
            handle.wait("memory")
    return {"blocked_s": blocked, "reserve_s": reserve_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory-root", default="/dev/shm")
    parser.add_argument("--out", default="bench-out/first_saves.json")
    args = parser.parse_args()
    started = _dt.datetime.now(_dt.timezone.utc)
    state = state_of(int(args.size_gib * GIB), args.tensors)
    results: dict = {"copy_s": [], "reserved": [], "not reserved": []}
    for _ in range(args.rounds):  # interleaved
        results["copy_s"].append(copy_time(state))
        for label, reserve in (("not reserved", False), ("reserved", True)):
            root = Path(tempfile.mkdtemp(prefix="mtckpt-bench-first-", dir=args.memory_root))
            try:
                results[label].append(saves(root, state, reserve))
            finally:
                shutil.rmtree(root, ignore_errors=True)
    copy = statistics.median(results["copy_s"])
    rows, summary = [], {}
    for label in ("not reserved", "reserved"):
        runs = results[label]
        first = [max(r["blocked_s"][i] for r in runs) for i in range(3)]  # the worst round
        steady = statistics.median(s for r in runs for s in r["blocked_s"][3:])
        reserve_s = statistics.median(r["reserve_s"] for r in runs)
        summary[label] = {"first_s": first, "steady_s": steady, "reserve_s": reserve_s}
        rows.append([label, *(f"{s:.3f} ({s / copy:.1f}x)" for s in first),
                     f"{steady:.3f} ({steady / copy:.1f}x)", f"{reserve_s:.2f}"])  # fmt: skip
    print(f"np.copyto of the state's bytes: {copy:.3f} s")
    print(markdown_table(["", "save 1 s (÷ copy)", "save 2 s", "save 3 s",
                          "saves 4-8 median s", "reserve() s"], rows))  # fmt: skip
    worst = max(summary["reserved"]["first_s"]) / copy
    checks = [target_check("reserved: the slowest of saves 1-3 / np.copyto", worst, 1.5, "max",
                           "about one copy from the first save on")]  # fmt: skip
    print_checks("targets", checks)
    write_report(args.out, "first_saves", started,
                 {"size_gib": args.size_gib, "tensors": args.tensors, "copy_s": copy,
                  "results": results, "summary": summary, "checks": checks})  # fmt: skip


if __name__ == "__main__":
    main()
