"""Object-tier benchmark: flushing a step to an S3 endpoint (moto_server on loopback) and
to file://, against fsspec moving the same bytes itself, in the same run.

Measured:
- flush throughput: from the step's commit in node memory until ``h.wait("remote")``
  returns, against a plain ``fs.pipe_file`` of the same bytes (target: at least 90%);
- the slowdown of a single-threaded CPU-bound loop while a flush runs, against the same
  loop saving to the memory tier only (target: under 5%): uploads by the trainer's helper
  process (the default without a daemon), on the trainer's own threads, or by the daemon;
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
    start_daemon,
    target_check,
    write_report,
)

import mtckpt
from mtckpt.format import naming

RUN = "bench"


class Moto:
    """moto_server on a free loopback port, at ``nice`` (it stands for a remote service:
    niced, it does not take the training loop's core first)."""

    def __init__(self, nice: int) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.nice(nice),
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


class Daemon:
    """``mtckpt daemon`` (nice +10, no peers) uploading to ``url`` for its trainer."""

    def __init__(self, memory_root: Path, url: str, options: dict) -> None:
        memory_root.mkdir(parents=True)
        config = memory_root.parent / f"{memory_root.name}.toml"
        table = ", ".join(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {{ region_name = "
                          f"{v['region_name']!r} }}" for k, v in options.items())  # fmt: skip
        config.write_text(f"[remote]\nurl = {url!r}\nkeep = 1\nstorage_options = {{ {table} }}\n")
        self.socket = memory_root.parent / f"{memory_root.name}.sock"
        self.proc = start_daemon(
            ["--node-id", "bench", "--replicas", "0", "--listen", f"127.0.0.1:{free_port()}",
             "--socket", str(self.socket), "--memory-root", str(memory_root),
             "--config", str(config), "--insecure"],
            "the daemon",
        )  # fmt: skip
        self.peers = mtckpt.PeerTier(daemon=f"unix://{self.socket}", replicas=0)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


def state_of(nbytes: int, seed: int, weights: bool = False) -> dict:
    """Random bytes, or with ``weights`` float32 values of a trained layer's spread (what
    zstd can shrink a little: the exponent bytes repeat)."""
    rng = np.random.default_rng(seed)
    per = 64 << 20
    if weights:
        return {f"t{i}": (rng.standard_normal(min(per, nbytes - i * per) // 4, np.float32) * 0.02)
                for i in range(-(-nbytes // per))}  # fmt: skip
    return {f"t{i}": rng.integers(0, 255, min(per, nbytes - i * per), dtype=np.uint8)
            for i in range(-(-nbytes // per))}  # fmt: skip


def manager(memory_root: Path, remote: mtckpt.ObjectTier | None,
            peers: mtckpt.PeerTier | None = None) -> mtckpt.CheckpointManager:  # fmt: skip
    memory = None if peers is not None else mtckpt.MemoryTier(str(memory_root))
    return mtckpt.CheckpointManager(RUN, memory=memory, remote=remote, peers=peers, rank=0,
                                    world_size=1)  # fmt: skip


def flush_and_restore(url: str, options: dict, memory_root: Path, nbytes: int,
                      repeats: int, compression: str | None) -> dict:  # fmt: skip
    """Seconds from memory commit to flushed, per step; then the restore into an empty
    memory tier; and the plain upload / download of the data file's bytes."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **options)
    remote = mtckpt.ObjectTier(url=url, storage_options=options, keep=2, compression=compression)
    flushed, plain_up, plain_down, data_size = [], [], [], 0
    with manager(memory_root / "a", remote) as mgr:
        for step in range(1, repeats + 1):  # interleaved with the plain uploads: the disk's
            state = state_of(nbytes, step, weights=compression is not None)
            handle = mgr.save(step, state)  # write-back hits both alike
            handle.wait("memory")
            started = time.perf_counter()
            handle.wait("remote")
            flushed.append(time.perf_counter() - started)
            mgr.wait()  # retention done before the plain upload
            stored = fs.size(f"{root}/{RUN}/{naming.step_dir(step)}/{naming.data_file(0)}")
            data_file = memory_root / "a" / RUN / naming.step_dir(step) / naming.data_file(0)
            data_size = data_file.stat().st_size
            data = data_file.read_bytes()
            path = f"{root}/plain/{step}"
            if url.startswith("file://"):
                fs.makedirs(f"{root}/plain", exist_ok=True)
            started = time.perf_counter()
            fs.pipe_file(path, data)
            plain_up.append(time.perf_counter() - started)
            started = time.perf_counter()
            fs.cat_file(path)
            plain_down.append(time.perf_counter() - started)
            fs.rm_file(path)
            del data
    started = time.perf_counter()
    with manager(memory_root / f"fresh-{uuid.uuid4().hex[:6]}", remote) as mgr:
        step, _ = mgr.restore()
    restored = time.perf_counter() - started
    assert step == repeats
    return {"bytes": data_size, "stored_bytes": stored, "flush_s": flushed, "restore_s": restored,
            "plain_pipe_s": plain_up, "plain_cat_s": plain_down}  # fmt: skip


def loop_times(memory_root: Path, remote: mtckpt.ObjectTier | None, nbytes: int, steps: int,
               every: int, peers: mtckpt.PeerTier | None = None) -> list[float]:  # fmt: skip
    state = state_of(nbytes, 0)
    with manager(memory_root, remote, peers) as mgr:

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
    parser.add_argument(
        "--endpoint-nice",
        type=int,
        default=10,
        help="nice value of the S3 emulator (10: it stands for a remote service)",
    )
    parser.add_argument(
        "--compression",
        choices=["zstd"],
        default=None,
        help="flush with zstd (the step then holds float32 weights-like data)",
    )
    parser.add_argument("--out", default="bench-out/object.json")
    args = parser.parse_args()
    started = _dt.datetime.now(_dt.timezone.utc)
    nbytes = int(args.size_gib * GIB)
    memory = Path(tempfile.mkdtemp(prefix="mtckpt-bench-obj-", dir=args.memory_root))
    disk = Path(tempfile.mkdtemp(prefix="mtckpt-bench-obj-", dir=args.local_root))
    moto = Moto(args.endpoint_nice)
    results, loops = {}, {}
    try:
        targets = {"S3 (moto_server, loopback)": ("s3://bench/ckpt", moto.options),
                   "file:// (local disk)": (f"file://{disk}/ckpt", {})}  # fmt: skip
        for label, (url, options) in targets.items():
            results[label] = flush_and_restore(url, options, memory / label[:2], nbytes,
                                               args.repeats, args.compression)  # fmt: skip
        labels = ("memory tier only", "flushing to file://",
                  "flushing to S3, by the trainer's helper process",
                  "flushing to S3, on the trainer's threads",
                  "flushing to S3, by the node daemon")  # fmt: skip
        loops = {label: [] for label in labels}
        loop_bytes = int(args.loop_size_gib * GIB)
        for round_ in range(args.loop_rounds):  # interleaved: drift hits both alike

            def tier(url: str, options: dict, uploader: str = "auto") -> mtckpt.ObjectTier:
                return mtckpt.ObjectTier(url=url, storage_options=options, keep=1,
                                         uploader=uploader)  # fmt: skip

            daemon_url = f"s3://bench/loop-daemon-{round_}"
            daemon = Daemon(memory / f"loop-{round_}-daemon", daemon_url, moto.options)
            try:
                variants = [(None, None), (tier(f"file://{disk}/loop-{round_}", {}), None),
                            (tier(f"s3://bench/loop-{round_}", moto.options), None),
                            (tier(f"s3://bench/loop-t{round_}", moto.options, "thread"), None),
                            (tier(daemon_url, moto.options), daemon.peers)]  # fmt: skip
                for index, (label, (remote, peers)) in enumerate(
                    zip(labels, variants, strict=True)
                ):
                    loops[label] += loop_times(memory / f"loop-{round_}-{index}", remote,
                                               loop_bytes, args.loop_steps,
                                               args.loop_save_every, peers)  # fmt: skip
            finally:
                daemon.stop()
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
                     f"{cat:.2f} s", f"{r['stored_bytes'] / r['bytes']:.3f}"])  # fmt: skip
        checks.append(target_check(f"flush throughput / plain fs.pipe_file, {label}",
                                   plain / flush, 0.9, "min",
                                   "same bytes, same run; median of the repeats"))  # fmt: skip
    what = "zstd, float32 weights-like data" if args.compression else "random bytes"
    print(f"\n{args.size_gib} GiB step ({what}), median of {args.repeats}:")
    print(markdown_table(["target", "mtckpt flush", "plain fs.pipe_file", "mtckpt restore "
                          "(empty memory)", "plain fs.cat_file", "stored / data bytes"],
                         rows))  # fmt: skip
    if args.loop_rounds:
        base = statistics.mean(loops["memory tier only"])
        loop_rows = [
            [label, f"{statistics.median(t) * 1e3:.2f}", f"{statistics.mean(t) * 1e3:.2f}"]
            for label, t in loops.items()
        ]
        print(f"\nCPU-bound loop, {args.loop_rounds} rounds of {args.loop_steps} steps, a "
              f"{args.loop_size_gib} GiB save every {args.loop_save_every}:")  # fmt: skip
        print(markdown_table(["tiers", "median step ms", "mean step ms"], loop_rows))
        for label in list(loops)[1:]:
            checks.append(target_check(
                f"loop slowdown (mean), {label}", statistics.mean(loops[label]) / base - 1,
                0.05, "max", f"2 cores: the loop, the flush and the S3 emulator (nice "
                f"{args.endpoint_nice}) share them",
            ))  # fmt: skip
    print_checks("targets", checks)
    write_report(args.out, "object", started, {"results": results, "loops": loops,
                                               "checks": checks})  # fmt: skip


if __name__ == "__main__":
    main()
