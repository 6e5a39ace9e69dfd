"""Incremental steps benchmark (issue 22): a fine-tuning-like state (95% of its bytes in
frozen layers, small adapters between them changing every step) and a state that changes
completely, each saved to node memory and flushed to an S3 endpoint (moto_server on
loopback) by the trainer's upload helper, with the object tier's ``incremental`` on and
off, in the same run (interleaved rounds).

Measured over steps 2 on (the first goes up whole either way):
- bytes uploaded per step (the data object's stored size) over the data file's; target
  for the frozen state: at most 0.10;
- time to durable: from ``save()`` until ``h.wait("remote")``; targets: incremental at
  least 5x shorter than whole uploads for the frozen state, at most 1.05x for the state
  that changes completely;
- the training thread's stall (``save()`` until it returns): incremental against whole,
  reported (target: no change);
- a restore from the object tier into empty node memory of the last step, bit-exact,
  timed beside the whole upload's;
- bytes replicated per step to a peer: two daemons on loopback (a trainer with
  ``PeerTier`` on node-a, replicas on node-b), node-b's received bytes over the data
  file's, with the daemons' ``incremental`` on and off; target for the frozen state: at
  most 0.10.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import statistics
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from _harness import (
    free_port,
    markdown_table,
    print_checks,
    start_daemon,
    target_check,
    write_report,
)
from bench_object import Moto

import mtckpt
from mtckpt.restore import read as restore
from mtckpt.tiers.object import ObjectStorage

RUN = "bench"
MIB = 1 << 20
LAYERS = 16


class State:
    """``frozen`` of the bytes in LAYERS frozen layers, each followed by an adapter that
    changes at every step (with ``frozen`` 0, only adapters: every byte changes)."""

    def __init__(self, nbytes: int, frozen: float) -> None:
        rng = np.random.default_rng(0)
        per_layer = nbytes // LAYERS
        adapter = per_layer - int(per_layer * frozen)
        self.arrays: dict[str, np.ndarray] = {}
        self.moving: list[np.ndarray] = []
        for layer in range(LAYERS):
            if per_layer > adapter:
                self.arrays[f"layer{layer:02d}.weight"] = rng.integers(0, 255, per_layer - adapter,
                                                                       np.uint8)  # fmt: skip
            self.arrays[f"layer{layer:02d}.adapter"] = np.zeros(adapter, np.uint8)
            self.moving.append(self.arrays[f"layer{layer:02d}.adapter"])

    def step(self, step: int) -> dict:
        rng = np.random.default_rng(step)
        for array in self.moving:
            array[:] = rng.integers(0, 255, array.size, np.uint8)
        return {**self.arrays, "step": step}


def run(moto: Moto, memory: Path, nbytes: int, frozen: float, incremental: bool,
        steps: int) -> dict:  # fmt: skip
    url = f"s3://bench/{uuid.uuid4().hex[:8]}"
    remote = mtckpt.ObjectTier(url=url, storage_options=moto.options, keep=2,
                               incremental=incremental, full_every=max(10, steps + 1))  # fmt: skip
    state = State(nbytes, frozen)
    root = memory / uuid.uuid4().hex[:8]
    stalls, durable, stored, sizes = [], [], [], []
    with mtckpt.CheckpointManager(RUN, memory=mtckpt.MemoryTier(str(root), keep=2),
                                  remote=remote, rank=0, world_size=1) as mgr:  # fmt: skip
        storage = ObjectStorage(url, storage_options=moto.options)
        for step in range(1, steps + 1):
            values = state.step(step)
            started = time.perf_counter()
            handle = mgr.save(step, values)
            stalls.append(time.perf_counter() - started)
            handle.wait("remote")
            durable.append(time.perf_counter() - started)
            manifest = restore.read_manifest(storage, RUN, step, 0)
            stored.append(manifest.stored.size)
            sizes.append(manifest.file_size)
        mgr.wait()
    started = time.perf_counter()
    with mtckpt.CheckpointManager(RUN, memory=mtckpt.MemoryTier(str(root) + "-fresh"),
                                  remote=remote, rank=0, world_size=1) as mgr:  # fmt: skip
        restored_step, restored = mgr.restore()
    restore_s = time.perf_counter() - started
    expected = state.step(steps)
    assert restored_step == steps
    assert all(np.array_equal(restored[k], expected[k]) for k in state.arrays), "not bit-exact"
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(str(root) + "-fresh", ignore_errors=True)
    return {"stall_s": stalls[1:], "durable_s": durable[1:], "stored_bytes": stored,
            "file_bytes": sizes, "restore_s": restore_s}  # fmt: skip


def received(address: str) -> float:
    """The replica bytes a daemon took in, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text)
               if f.name == "mtckpt_replica_received_bytes"
               for s in f.samples if s.name.endswith("_total"))  # fmt: skip


def replicate(base: Path, nbytes: int, frozen: float, incremental: bool, steps: int) -> dict:
    """Replica bytes node-b took in per step, over the data file's (steps 2 on)."""
    base = base / uuid.uuid4().hex[:8]
    ports, metrics = [free_port(), free_port()], f"127.0.0.1:{free_port()}"
    env = {**os.environ, "MTCKPT_DAEMON_INCREMENTAL": "1" if incremental else "0"}
    procs = []
    try:
        for i, node in enumerate(("a", "b")):
            args = ["--node-id", node, "--listen", f"127.0.0.1:{ports[i]}", "--socket",
                    str(base / f"{node}.sock"), "--memory-root", str(base / node), "--peers",
                    f"127.0.0.1:{ports[1 - i]}", "--insecure"]  # fmt: skip
            if node == "b":
                args += ["--metrics-listen", metrics]
            procs.append(start_daemon(args, f"daemon {node}", env))
        time.sleep(2)  # each knows the other
        state = State(nbytes, frozen)
        fractions = []
        peers = mtckpt.PeerTier(daemon=f"unix://{base / 'a.sock'}")
        with mtckpt.CheckpointManager(RUN, peers=peers, rank=0, world_size=1) as mgr:
            for step in range(1, steps + 1):
                before = received(metrics)
                mgr.save(step, state.step(step)).wait("peers")
                deadline = time.monotonic() + 60
                while received(metrics) == before and time.monotonic() < deadline:
                    time.sleep(0.01)
                file_bytes = sum(a.nbytes for a in state.arrays.values())
                fractions.append((received(metrics) - before) / file_bytes)
        return {"replicated_fraction": fractions[1:]}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="state size in MiB (256)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--frozen", type=float, default=0.95)
    parser.add_argument("--memory-root", default="/dev/shm")
    parser.add_argument("--out", default="bench-out/incremental.json")
    args = parser.parse_args()
    started = _dt.datetime.now(_dt.timezone.utc)
    memory = Path(tempfile.mkdtemp(prefix="mtckpt-bench-inc-", dir=args.memory_root))
    moto = Moto(10)
    nbytes = args.mib * MIB
    configs = [(f"{args.frozen:.0%} frozen", args.frozen), ("changes completely", 0.0)]
    results: dict = {}
    try:
        for _ in range(args.rounds):  # interleaved: drift hits every configuration alike
            for label, frozen in configs:
                for incremental in (True, False):
                    key = f"{label}, {'incremental' if incremental else 'whole'}"
                    got = run(moto, memory, nbytes, frozen, incremental, args.steps)
                    got |= replicate(memory, nbytes, frozen, incremental, args.steps)
                    merged = results.setdefault(key, {k: [] for k in got})
                    for k, v in got.items():
                        merged[k] += v if isinstance(v, list) else [v]
    finally:
        moto.stop()
        shutil.rmtree(memory, ignore_errors=True)
    rows, summary = [], {}
    for key, r in results.items():
        pairs = zip(r["stored_bytes"], r["file_bytes"], strict=True)
        uploaded = [s / f for i, (s, f) in enumerate(pairs) if i % args.steps]  # not step 1
        summary[key] = {
            "uploaded_fraction": statistics.median(uploaded),
            "durable_s": statistics.median(r["durable_s"]),
            "stall_s": statistics.median(r["stall_s"]),
            "restore_s": statistics.median(r["restore_s"]),
            "replicated_fraction": statistics.median(r["replicated_fraction"]),
        }
        s = summary[key]
        rows.append([key, f"{s['uploaded_fraction']:.3f}", f"{s['durable_s']:.3f}",
                     f"{s['stall_s'] * 1e3:.1f}", f"{s['restore_s']:.2f}",
                     f"{s['replicated_fraction']:.3f}"])  # fmt: skip
    print(markdown_table(["configuration", "uploaded ÷ data file", "time to durable s",
                          "save() stall ms", "restore s", "replicated ÷ data file"],
                         rows))  # fmt: skip
    frozen_key = configs[0][0]
    inc, whole = summary[f"{frozen_key}, incremental"], summary[f"{frozen_key}, whole"]
    ch_inc = summary["changes completely, incremental"]
    ch_whole = summary["changes completely, whole"]
    checks = [
        target_check(f"{frozen_key}: bytes uploaded per step / data file",
                     inc["uploaded_fraction"], 0.10, "max", "changed blocks only"),
        target_check(f"{frozen_key}: bytes replicated per step / data file",
                     inc["replicated_fraction"], 0.10, "max",
                     "the peer rebuilds the rest from its replica of the step before"),
        target_check(f"{frozen_key}: whole / incremental time to durable",
                     whole["durable_s"] / inc["durable_s"], 5.0, "min",
                     "save() until h.wait('remote')"),
        target_check(f"{frozen_key}: save() stall, incremental / whole",
                     inc["stall_s"] / whole["stall_s"], 1.05, "max",
                     "the comparison runs on the memory worker, not the training thread"),
        target_check("changes completely: time to durable, incremental / whole",
                     ch_inc["durable_s"] / ch_whole["durable_s"], 1.05, "max",
                     "each chunk compared, every one uploaded"),
        target_check("changes completely: save() stall, incremental / whole",
                     ch_inc["stall_s"] / ch_whole["stall_s"], 1.05, "max", ""),
    ]  # fmt: skip
    print_checks("targets", checks)
    write_report(args.out, "incremental", started,
                 {"mib": args.mib, "steps": args.steps, "rounds": args.rounds,
                  "results": results, "summary": summary, "checks": checks})  # fmt: skip


if __name__ == "__main__":
    main()
