"""Object-tier benchmark: flushing a step to an S3 endpoint (moto_server on loopback) and
to file://, against fsspec moving the same bytes itself, in the same run.

Measured:
- flush throughput: from the step's commit in node memory until ``h.wait("remote")``
  returns, against a plain ``fs.pipe_file`` of the same bytes (target: at least 90%);
- the slowdown of a single-threaded CPU-bound loop while a flush runs, against the same
  loop saving to the memory tier only (target: under 5%);
- restore from the object tier into a node with empty memory, against a plain
  ``fs.cat_file`` download of the same bytes.
"""

from __future__ import annotations

import os

# The loop stands for one training thread: BLAS must not take every core (read at import).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import datetime as _dt
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from _harness import (
    GIB,
    cpu_bound_steps,
    free_port,
    markdown_table,
    print_checks,
    target_check,
    write_report,
)

import mtckpt
from mtckpt import naming

RUN = "bench"


class Moto:
    """moto_server on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        self.options = {
            "endpoint_url": f"http://127.0.0.1:{self.port}", "key": "bench", "secret": "bench",
            "client_kwargs": {"region_name": "eu-west-1"},
        }  # fmt: skip
        import s3fs

        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.options)
        self.fs.mkdir("bench")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def state_of(nbytes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    per = 64 << 20
    return {f"t{i}": rng.integers(0, 255, min(per, nbytes - i * per), dtype=np.uint8)
            for i in range(-(-nbytes // per))}  # fmt: skip


def manager(memory_root: Path, remote: mtckpt.ObjectTier | None) -> mtckpt.CheckpointManager:
    return mtckpt.CheckpointManager(RUN, memory=mtckpt.MemoryTier(str(memory_root)),
                                    remote=remote, rank=0, world_size=1)  # fmt: skip


def flush_and_restore(url: str, options: dict, memory_root: Path, nbytes: int,
                      repeats: int) -> dict:  # fmt: skip
    """Seconds from memory commit to flushed, per step; then the restore into an empty
    memory tier; and the plain upload / download of the data file's bytes."""
    remote = mtckpt.ObjectTier(url=url, storage_options=options, keep=2)
    flushed, data_size = [], 0
    with manager(memory_root / "a", remote) as mgr:
        for step in range(1, repeats + 1):
            handle = mgr.save(step, state_of(nbytes, step))
            handle.wait("memory")
            started = time.perf_counter()
            handle.wait("remote")
            flushed.append(time.perf_counter() - started)
        data_size = (memory_root / "a" / RUN / naming.step_dir(repeats) /
                     naming.data_file(0)).stat().st_size  # fmt: skip
    started = time.perf_counter()
    with manager(memory_root / f"fresh-{uuid.uuid4().hex[:6]}", remote) as mgr:
        step, _ = mgr.restore()
    restored = time.perf_counter() - started
    assert step == repeats

    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **options)
    data = np.random.default_rng(0).integers(0, 255, data_size, dtype=np.uint8).tobytes()
    plain_up, plain_down = [], []
    for i in range(repeats):
        path = f"{root}/plain/{i}"
        if url.startswith("file://"):
            fs.makedirs(f"{root}/plain", exist_ok=True)
        started = time.perf_counter()
        fs.pipe_file(path, data)
        plain_up.append(time.perf_counter() - started)
        started = time.perf_counter()
        fs.cat_file(path)
        plain_down.append(time.perf_counter() - started)
        fs.rm_file(path)
    return {"bytes": data_size, "flush_s": flushed, "restore_s": restored,
            "plain_pipe_s": plain_up, "plain_cat_s": plain_down}  # fmt: skip


def loop_times(memory_root: Path, remote: mtckpt.ObjectTier | None, nbytes: int,
               steps: int, every: int) -> list[float]:  # fmt: skip
    state = state_of(nbytes, 0)
    with manager(memory_root, remote) as mgr:

        def save(step: int) -> None:
            if step % every == 0:
                state["t0"][:8] = step & 0xFF
                mgr.save(step, state)

        times = cpu_bound_steps(steps, save)
        mgr.wait()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="bytes of the step (1.0)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-steps", type=int, default=300)
    parser.add_argument("--loop-save-every", type=int, default=100)
    parser.add_argument("--loop-size-gib", type=float, default=0.125)
    parser.add_argument("--loop-rounds", type=int, default=2)
    parser.add_argument("--memory-root", default="/dev/shm")
    parser.add_argument("--local-root", default=None, help="where file:// goes (temp dir)")
    parser.add_argument("--out", default="bench-out/object.json")
    args = parser.parse_args()
    started = _dt.datetime.now(_dt.timezone.utc)
    nbytes = int(args.size_gib * GIB)
    memory = Path(tempfile.mkdtemp(prefix="mtckpt-bench-obj-", dir=args.memory_root))
    disk = Path(tempfile.mkdtemp(prefix="mtckpt-bench-obj-", dir=args.local_root))
    moto = Moto()
    results, loops = {}, {}
    try:
        targets = {"S3 (moto_server, loopback)": ("s3://bench/ckpt", moto.options),
                   "file:// (local disk)": (f"file://{disk}/ckpt", {})}  # fmt: skip
        for label, (url, options) in targets.items():
            results[label] = flush_and_restore(url, options, memory / label[:2], nbytes,
                                               args.repeats)  # fmt: skip
        labels = ("memory tier only", "flushing to S3 (moto)")
        loops = {label: [] for label in labels}
        for round_ in range(args.loop_rounds):  # interleaved: drift hits both alike
            remote = mtckpt.ObjectTier(url=f"s3://bench/loop-{round_}",
                                       storage_options=moto.options, keep=1)  # fmt: skip
            for index, (label, tier) in enumerate(zip(labels, (None, remote), strict=True)):
                loops[label] += loop_times(memory / f"loop-{round_}-{index}", tier,
                                           int(args.loop_size_gib * GIB), args.loop_steps,
                                           args.loop_save_every)  # fmt: skip
    finally:
        moto.stop()
        shutil.rmtree(memory, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)

    rows, checks = [], []
    for label, r in results.items():
        gib = r["bytes"] / GIB
        flush, plain = statistics.median(r["flush_s"]), statistics.median(r["plain_pipe_s"])
        cat = statistics.median(r["plain_cat_s"])
        rows.append([label, f"{flush:.2f} s ({gib / flush:.2f} GiB/s)",
                     f"{plain:.2f} s ({gib / plain:.2f} GiB/s)", f"{r['restore_s']:.2f} s",
                     f"{cat:.2f} s"])  # fmt: skip
        checks.append(target_check(f"flush throughput / plain fs.pipe_file, {label}",
                                   plain / flush, 0.9, "min",
                                   "same bytes, same run; median of the repeats"))  # fmt: skip
    print(f"\n{args.size_gib} GiB step, median of {args.repeats}:")
    print(markdown_table(["target", "mtckpt flush", "plain fs.pipe_file", "mtckpt restore "
                          "(empty memory)", "plain fs.cat_file"], rows))  # fmt: skip
    base = statistics.mean(loops["memory tier only"])
    loop_rows = [[label, f"{statistics.median(t) * 1e3:.2f}", f"{statistics.mean(t) * 1e3:.2f}"]
                 for label, t in loops.items()]  # fmt: skip
    print(f"\nCPU-bound loop, {args.loop_rounds} rounds of {args.loop_steps} steps, a "
          f"{args.loop_size_gib} GiB save every {args.loop_save_every}:")  # fmt: skip
    print(markdown_table(["tiers", "median step ms", "mean step ms"], loop_rows))
    checks.append(target_check(
        "loop slowdown while flushing (mean)",
        statistics.mean(loops["flushing to S3 (moto)"]) / base - 1, 0.05, "max",
        "2 cores: the loop, the flush and the S3 emulator share them",
    ))  # fmt: skip
    print_checks("targets", checks)
    write_report(args.out, "object", started, {"results": results, "loops": loops,
                                               "checks": checks})  # fmt: skip


if __name__ == "__main__":
    main()
