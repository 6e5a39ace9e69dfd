"""What every mtckpt benchmark shares: the workload, timing and RSS helpers, one subprocess
per measured method (its peak RSS is its own), statistics and machine facts.

A worker is this benchmark's script re-invoked with ``--worker METHOD``; it prints one line
``BENCH_RESULT {json}`` that :func:`spawn_worker` collects.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

RESULT_PREFIX = "BENCH_RESULT "
SEED = 20240611
GIB = 1 << 30
WORKER_TIMEOUT_S = 3600

# --------------------------------------------------------------------------------------
# workload


def workload_shapes(size_bytes: int, tensors: int) -> list[tuple[str, tuple[int, ...]]]:
    """Named float32 shapes of a transformer-like model totalling about ``size_bytes``.

    Per layer: qkv (d, 3d) + bias, out proj (d, d) + bias, mlp up (d, 4d) + bias, mlp down
    (4d, d) + bias, two norms (d,): 10 tensors. Plus a token embedding (vocab, d) and a final
    norm. ``d`` follows from the size and the layer count; the embedding's row count takes
    up the remainder so the total is within one row of ``size_bytes``.
    """
    per_layer = 10
    layers = max(1, round((tensors - 2) / per_layer))
    params = size_bytes // 4
    # layers * 12 d^2 (weights) + an embedding of about 4 d^2 (vocab = 4 d)
    d = max(8, int(math.sqrt(params / (12 * layers + 4))) // 8 * 8)
    layer_params = 12 * d * d + 9 * d + d + 2 * d  # weights, biases (3d+d+4d+d), 2 norms
    vocab = max(1, (params - layers * layer_params - d) // d)
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (vocab, d))]
    for i in range(layers):
        p = f"layers.{i:03d}."
        shapes += [
            (p + "attn.qkv.weight", (d, 3 * d)),
            (p + "attn.qkv.bias", (3 * d,)),
            (p + "attn.out.weight", (d, d)),
            (p + "attn.out.bias", (d,)),
            (p + "mlp.up.weight", (d, 4 * d)),
            (p + "mlp.up.bias", (4 * d,)),
            (p + "mlp.down.weight", (4 * d, d)),
            (p + "mlp.down.bias", (d,)),
            (p + "norm1.weight", (d,)),
            (p + "norm2.weight", (d,)),
        ]
    shapes.append(("norm.weight", (d,)))
    return shapes


def build_arrays(size_bytes: int, tensors: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """Deterministic float32 arrays (seeded normal * 0.02), generated in place."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in workload_shapes(size_bytes, tensors):
        array = np.empty(shape, np.float32)
        rng.standard_normal(out=array, dtype=np.float32)
        array *= np.float32(0.02)
        arrays[name] = array
    return arrays


def prefaulted_like(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zeroed arrays of the same shapes, every page touched (a live model's parameters)."""
    out = {}
    for name, array in arrays.items():
        target = np.empty_like(array)
        target.fill(0)
        out[name] = target
    return out


def state_bytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays.values())


# --------------------------------------------------------------------------------------
# measuring helpers


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - t0, value


def evict_page_cache(root: Path) -> int:
    """fsync and drop from the page cache every file under ``root``; returns bytes evicted."""
    total = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


class Recorder:
    """Per-repeat timings of one worker, plus RSS checkpoints and notes."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.timings: dict[str, list[float]] = {}
        self.warmup: dict[str, list[float]] = {}
        self.notes: list[str] = []
        self.rss: dict[str, int] = {}

    def add(self, metric: str, seconds: float, warmup: bool = False) -> None:
        (self.warmup if warmup else self.timings).setdefault(metric, []).append(seconds)

    def result(self, nbytes: int) -> dict:
        self.rss["peak"] = peak_rss()
        return {
            "method": self.method,
            "bytes": nbytes,
            "timings": self.timings,
            "warmup": self.warmup,
            "rss_bytes": self.rss,
            "notes": self.notes,
            "error": None,
        }


def run_worker_here(
    method: str, work: Callable, args, size_bytes: int, tensors: int, imports: tuple[str, ...] = ()
) -> int:
    """The ``--worker METHOD`` entry: build the state, run ``work(args, arrays, recorder)``,
    print one JSON line. ``imports`` are imported before the RSS baseline is taken."""
    rec = Recorder(method)
    try:
        for module in imports:
            __import__(module)  # before the baseline, so the baseline counts it

        t0 = time.perf_counter()
        arrays = build_arrays(size_bytes, tensors)
        rec.notes.append(f"state built in {time.perf_counter() - t0:.1f} s")
        rec.rss["baseline"] = current_rss()
        rec.rss["baseline_peak"] = peak_rss()
        work(args, arrays, rec)
        result = rec.result(state_bytes(arrays))
    except Exception as exc:  # reported to the parent, which decides whether it is fatal
        traceback.print_exc()
        result = rec.result(0)
        result["error"] = f"{type(exc).__name__}: {exc}"
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


def make_fresh_dir(root: str | None, default_parent: str, prefix: str, created: list[Path]) -> Path:
    """A new directory inside ``root`` (or ``default_parent``); every directory this makes
    is appended to ``created`` (deepest last) for clean-up."""
    parent = Path(root if root is not None else default_parent).absolute()
    missing = []
    probe = parent
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    parent.mkdir(parents=True, exist_ok=True)
    created.extend(reversed(missing))
    fresh = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    created.append(fresh)
    return fresh


def clean_up(created: list[Path]) -> None:
    for path in reversed(created):
        if path.name.startswith("mtckpt-bench-"):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.rmdir()  # only if empty: never remove what someone else put there
            except OSError:
                pass


def spawn_worker(
    script: str, method: str, worker_args: list[str], memory_dir: Path, local_dir: Path
) -> dict:
    """Run ``script --worker method`` with fresh memory and local directories; its result."""
    memory_dir.mkdir()
    local_dir.mkdir()
    command = [sys.executable, script, "--worker", method, *worker_args,
               "--memory-root", str(memory_dir), "--local-root", str(local_dir)]  # fmt: skip
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"worker timed out after {WORKER_TIMEOUT_S} s"}
    finally:
        shutil.rmtree(memory_dir, ignore_errors=True)
        shutil.rmtree(local_dir, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    stderr_tail = proc.stderr[-4000:]
    if not lines:
        return {"method": method, "error": f"worker exited {proc.returncode} without a result",
                "stderr_tail": stderr_tail}  # fmt: skip
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["wall_s"] = time.perf_counter() - started
    if result.get("error"):
        result["stderr_tail"] = stderr_tail
    return result


def stats(values: list[float], nbytes: int) -> dict:
    median = statistics.median(values)
    return {
        "median": median,
        "min": min(values),
        "max": max(values),
        "gib_per_s_median": nbytes / GIB / median if median > 0 else None,
        "n": len(values),
    }


def summarise(results: dict[str, dict]) -> dict[str, dict[str, dict]]:
    summary = {}
    for method, result in results.items():
        if result.get("error"):
            continue
        nbytes = result["bytes"]
        summary[method] = {m: stats(v, nbytes) for m, v in result["timings"].items() if v}
    return summary


def machine_info() -> dict:
    import mtckpt.checksum

    info = {
        "cpu_count": cpu_count(),
        "cpu_model": None,
        "memory_total_gib": None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": None,
        "mtckpt_checksum_backend": mtckpt.checksum.backend,
        "mtckpt_native_crc32c_hardware": None,
    }
    try:
        info["torch"] = metadata.version("torch")
    except metadata.PackageNotFoundError:
        pass
    try:
        import mtckpt._native as native

        info["mtckpt_native_crc32c_hardware"] = native.hardware
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                None,
            )
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
            info["memory_total_gib"] = round(kib / (1 << 20), 1)
    except (OSError, StopIteration, ValueError):
        pass
    return info


# --------------------------------------------------------------------------------------
# multi-rank workers: one process per rank, as torchrun starts them

RANK_GRACE_S = 30  # how long the other ranks may run on once one rank has failed


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(
    script: str, world: int, worker_args: list[str], timeout: float = WORKER_TIMEOUT_S
) -> dict:
    """Run ``world`` processes of ``script *worker_args`` as the ranks of one job, with the
    environment torchrun gives them (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS=1) on loopback. Each rank prints one
    ``BENCH_RESULT`` line. Returns ``{"ranks": [result of each rank], "error", "wall_s"}``;
    once a rank has failed, the others (likely stuck in a collective) are killed after
    :data:`RANK_GRACE_S`."""
    port = free_port()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mtckpt-ranks-") as scratch:
        procs, outputs = [], []
        for rank in range(world):
            env = dict(os.environ)
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       PYTHONUNBUFFERED="1")  # fmt: skip
            out = open(Path(scratch) / f"rank-{rank}.out", "w+")  # noqa: SIM115
            err = open(Path(scratch) / f"rank-{rank}.err", "w+")  # noqa: SIM115
            outputs.append((out, err))
            command = [sys.executable, script, *worker_args]
            procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True))
        deadline = time.monotonic() + timeout
        failed_at = None
        error = None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + RANK_GRACE_S):
                error = "timed out" if now > deadline else "a rank failed; the others were killed"
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                for p in procs:
                    p.wait()
                break
            time.sleep(0.1)
        ranks = []
        for rank, (proc, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
            out.close()
            err.close()
            lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
            if lines:
                result = json.loads(lines[-1][len(RESULT_PREFIX) :])
            else:
                result = {"rank": rank, "error": f"rank exited {proc.returncode} without a result"}
            if result.get("error") or proc.returncode != 0:
                result["returncode"] = proc.returncode
                result["stderr_tail"] = stderr[-4000:]
                error = (
                    error or f"rank {rank}: {result.get('error') or 'exit ' + str(proc.returncode)}"
                )
            ranks.append(result)
    return {"ranks": ranks, "error": error, "wall_s": time.perf_counter() - started}
