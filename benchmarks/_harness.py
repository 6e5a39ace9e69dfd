"""What every mtckpt benchmark shares: the workload (whole, or sharded over ranks), timing
and RSS helpers, one subprocess per measured method (its peak RSS is its own) or one
process per rank (as torchrun starts them), statistics, tables, target checks, the common
flags and machine facts.

A worker is this benchmark's script re-invoked with ``--worker METHOD``; it prints one line
``BENCH_RESULT {json}`` that :func:`spawn_worker` (one process) or :func:`spawn_ranks` (one
per rank) collects.
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


# the same state sharded Shard(0) over ranks: each rank generates its own shard only


def sharded_shapes(size_bytes: int, tensors: int, row_multiple: int) -> list[tuple[str, tuple]]:
    """``workload_shapes`` with every first dimension rounded down to a multiple of
    ``row_multiple``, so that Shard(0) over any of the world sizes is even."""
    shapes = []
    for name, shape in workload_shapes(size_bytes, tensors):
        rows = max(row_multiple, shape[0] // row_multiple * row_multiple)
        shapes.append((name, (rows, *shape[1:])))
    return shapes


def shard_rows(global_rows: int, world: int, rank: int) -> tuple[int, int]:
    """(first global row, row count) of ``rank``'s Shard(0) piece."""
    rows = global_rows // world
    return rank * rows, rows


def fill_shard(out: np.ndarray, index: int, first_row: int) -> None:
    """Fill ``out`` (float32, rows ``first_row``... of tensor ``index``) with values in
    [-0.02, 0.02) that depend only on (index, global row, column): an integer hash, so any
    shard of any world size is generated without the rest of the tensor."""
    rows = out.shape[0]
    cols = math.prod(out.shape[1:])
    flat = out.reshape(rows, cols)
    col_mix = np.arange(cols, dtype=np.uint32) * np.uint32(0x85EBCA77)
    key = np.uint32((index * 0xC2B2AE3D + 0x27D4EB2F) & 0xFFFFFFFF)
    block = max(1, (1 << 22) // max(cols, 1))
    x = np.empty((min(block, rows), cols), np.uint32)
    y = np.empty_like(x)
    for start in range(0, rows, block):
        n = min(block, rows - start)
        xs, ys = x[:n], y[:n]
        row_ids = np.arange(first_row + start, first_row + start + n, dtype=np.uint32)
        np.bitwise_xor((row_ids * np.uint32(0x9E3779B1) ^ key)[:, None], col_mix, out=xs)
        for shift, factor in ((15, 0x2C1B3C6D), (12, 0x297A2D39), (15, None)):
            np.right_shift(xs, shift, out=ys)
            xs ^= ys
            if factor is not None:
                xs *= np.uint32(factor)
        np.right_shift(xs, 8, out=ys)
        np.multiply(ys, 0.04 / (1 << 24), out=flat[start : start + n], casting="unsafe")
        flat[start : start + n] -= np.float32(0.02)


def build_shard(shapes, world: int, rank: int) -> dict[str, np.ndarray]:
    """This rank's shard of every tensor of the global state."""
    arrays = {}
    for index, (name, shape) in enumerate(shapes):
        first, rows = shard_rows(shape[0], world, rank)
        array = np.empty((rows, *shape[1:]), np.float32)
        fill_shard(array, index, first)
        arrays[name] = array
    return arrays


def check_shard(restored: dict, shapes, world: int, rank: int, where: str) -> None:
    """Raise unless every restored local shard is bit-identical to a freshly generated one."""
    for index, (name, shape) in enumerate(shapes):
        first, rows = shard_rows(shape[0], world, rank)
        expected = np.empty((rows, *shape[1:]), np.float32)
        fill_shard(expected, index, first)
        got = restored[name].to_local().numpy()
        if got.shape != expected.shape or not np.array_equal(
            got.view(np.uint32), expected.view(np.uint32)
        ):
            raise AssertionError(
                f"{where}: rank {rank}/{world}: {name} (rows {first}..{first + rows}) differs "
                "from the shard it was built as"
            )


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


# --------------------------------------------------------------------------------------
# results: statistics, tables, targets, flags, reports


def run_methods(script: str, args, memory_base: Path, local_base: Path) -> dict[str, dict]:
    """Run each of ``args.method_list`` in its own worker process of ``script`` (the common
    flags passed on), with fresh tier directories; their results by method."""
    results: dict[str, dict] = {}
    worker_args = ["--size-gib", repr(args.size_gib), "--tensors", str(args.tensors),
                   "--repeats", str(args.repeats)]  # fmt: skip
    for method in args.method_list:
        print(f"running {method} ...", file=sys.stderr, flush=True)
        result = spawn_worker(os.path.abspath(script), method, worker_args,
                              memory_base / method, local_base / method)  # fmt: skip
        results[method] = result
        status = "FAILED: " + result["error"] if result.get("error") else "ok"
        print(f"  {method}: {status} ({result.get('wall_s', 0):.1f} s)", file=sys.stderr)
        if result.get("error") and result.get("stderr_tail"):
            print(result["stderr_tail"], file=sys.stderr)
    return results


def start_daemon(args: list[str], what: str, env: dict | None = None) -> subprocess.Popen:
    """``mtckpt daemon ARGS`` (in ``env``, default this one's), once it has printed its
    ready line."""
    proc = subprocess.Popen([sys.executable, "-m", "mtckpt", "daemon", *args],
                            stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    line = proc.stdout.readline()
    if "ready" not in line:
        raise RuntimeError(f"{what} did not start: {line!r}")
    return proc


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


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table, the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [*rows, headers]) for i in range(len(headers))]

    def line(cells):
        out = [str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i])
               for i, c in enumerate(cells)]  # fmt: skip
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(row) for row in rows])


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None where a side is missing (a failed method) or b is zero."""
    return a / b if a is not None and b else None


def fig(summary: dict | None, metric: str, stat: str = "median") -> float | None:
    """``summary[metric][stat]`` of a summary (per method: per metric: statistics), or None."""
    return (summary or {}).get(metric, {}).get(stat)


def target_check(name: str, value: float | None, limit: float, kind: str, explanation: str):
    """One target: ``kind`` "max" passes if value <= limit, "min" if value >= limit; "n/a"
    where the value is missing."""
    if value is None:
        verdict = "n/a"
    elif kind == "max":
        verdict = "PASS" if value <= limit else "FAIL"
    else:
        verdict = "PASS" if value >= limit else "FAIL"
    bound = f"<= {limit}" if kind == "max" else f">= {limit}"
    return {"name": name, "value": value, "target": bound, "verdict": verdict,
            "explanation": explanation}  # fmt: skip


def add_common_args(parser, methods: tuple[str, ...], out: str, plural: str, files: str):
    """The flags every benchmark has: --size-gib, --tensors, --repeats, --memory-root,
    --local-root, --out, --methods (``plural``: "s" where there is a tier per world size;
    ``files``: what else goes under the local root)."""
    parser.add_argument("--size-gib", type=float, default=1.0, help="state size (1.0)")
    parser.add_argument("--tensors", type=int, default=200, help="about this many tensors (200)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; median and min (3)")
    parser.add_argument("--memory-root", default=None,
                        help=f"tmpfs directory for the memory tier{plural}; a fresh directory "
                             "is made inside it (default: /dev/shm)")  # fmt: skip
    parser.add_argument("--local-root", default=None,
                        help=f"directory on the node's real disk for the local tier{plural} and "
                             f"{files}; a fresh directory is made inside it (default: the "
                             "system temp dir)")  # fmt: skip
    parser.add_argument("--out", default=out, help=f"JSON output path ({out})")
    parser.add_argument("--methods", default=",".join(methods),
                        help=f"comma list, a subset of {','.join(methods)}")  # fmt: skip


def parse_methods(parser, text: str, choices: tuple[str, ...]) -> list[str]:
    """The ``--methods`` comma list, in the order of ``choices``; a parser error if unknown."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in choices]
    if unknown or not methods:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(choices)}")
    return [m for m in choices if m in methods]


def write_report(path: str, benchmark: str, started, report: dict) -> None:
    """Write ``report`` as JSON, headed by what every benchmark records: its name, when it
    started (a datetime), the command line and the machine."""
    header = {
        "benchmark": benchmark,
        "date": started.isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "machine": machine_info(),
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**header, **report}, indent=2) + "\n")
    print(f"\nwrote {out}")


def save_changed_once_staged(mgr, step: int, state, arrays) -> None:
    """One more, untimed save whose arrays change as soon as it is staged, as a training
    step would change them (and change back once it is durable): a restore of ``step``
    must still return what was saved."""
    handle = mgr.save(step, state)
    handle.wait("staged")
    flip_bits(arrays)
    mgr.wait()
    flip_bits(arrays)


def flip_bits(arrays) -> None:
    """Flip one bit of the first and of the last element of every (contiguous) array; a
    second call undoes it. Stands for a training step modifying saved arrays."""
    for array in arrays.values() if isinstance(arrays, dict) else arrays:
        words = array.reshape(-1).view(np.uint8)
        words[0] ^= 1
        words[-1] ^= 1


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


def cpu_bound_steps(steps: int, after_step: Callable[[int], None]) -> list[float]:
    """Step times of a single-threaded CPU-bound loop (small matmuls; set OMP_NUM_THREADS=1
    before numpy loads), calling ``after_step(step)`` after each step, outside its time."""
    a = np.random.default_rng(0).standard_normal((192, 192))
    times = []
    for step in range(1, steps + 1):
        started = time.perf_counter()
        x = a
        for _ in range(30):
            x = np.tanh(x @ a)
        times.append(time.perf_counter() - started)
        after_step(step)
    return times


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


def launch_ranks(script: str, world: int, worker_args: list[str], label: str) -> dict:
    """:func:`spawn_ranks` with progress on stderr (and every failing rank's stderr tail)."""
    print(f"running {label} on {world} rank(s) ...", file=sys.stderr, flush=True)
    result = spawn_ranks(script, world, worker_args)
    status = "FAILED: " + result["error"] if result["error"] else "ok"
    print(f"  {label}: {status} ({result['wall_s']:.1f} s)", file=sys.stderr)
    if result["error"]:
        for rank_result in result["ranks"]:
            if rank_result.get("stderr_tail"):
                print(f"--- rank {rank_result['rank']}:\n{rank_result['stderr_tail']}",
                      file=sys.stderr)  # fmt: skip
    return result


class RankRecorder(Recorder):
    """A rank's timings, plus what the parent needs back (``extra``) and the rank's bytes."""

    def __init__(self, method: str) -> None:
        super().__init__(method)
        self.extra: dict = {}
        self.nbytes = 0


def run_rank_worker(method: str, body: Callable[[RankRecorder], None]) -> int:
    """The entry of one rank: run ``body(recorder)`` and print one ``BENCH_RESULT`` line
    (with the error, if it raised: the parent then kills the other ranks, which may be
    waiting for this one). Returns the process's exit code."""
    rec = RankRecorder(method)
    code = 0
    try:
        body(rec)
        result = rec.result(rec.nbytes)
    except Exception as exc:
        traceback.print_exc()
        result = rec.result(rec.nbytes)
        result["error"] = f"{type(exc).__name__}: {exc}"
        code = 1
    result.update(rank=int(os.environ.get("RANK", "0")),
                  world=int(os.environ.get("WORLD_SIZE", "1")), extra=rec.extra)  # fmt: skip
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return code


def aggregate_ranks(launch: dict, first_of: tuple[str, ...] = ()) -> dict:
    """Per metric of a multi-rank launch: each rank's median and the figure, the slowest
    rank of each repeat (its median, min and max over repeats); for the metrics in
    ``first_of``, the slowest rank's first (warm-up) time."""
    if launch.get("error"):
        return {}
    ranks = launch["ranks"]
    out = {}
    for metric in ranks[0]["timings"]:
        per_rank = [r["timings"][metric] for r in ranks]
        slowest = [max(values) for values in zip(*per_rank, strict=True)]
        out[metric] = {
            "per_rank_median": [statistics.median(v) for v in per_rank],
            "median": statistics.median(slowest),
            "min": min(slowest),
            "max": max(slowest),
            "n": len(slowest),
        }
    out["_first_restore_slowest_rank"] = {
        metric: max(r["warmup"][metric][0] for r in ranks)
        for metric in ranks[0]["warmup"]
        if metric in first_of
    }
    out["_bytes_per_rank"] = [r["bytes"] for r in ranks]
    return out


class Rank:
    """This rank's process group and 1-D device mesh, and DTensors sharded over it."""

    def __init__(self, shapes, collective_timeout_s: float = 600) -> None:
        from datetime import timedelta

        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo", timeout=timedelta(seconds=collective_timeout_s))
        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.mesh = init_device_mesh("cpu", (self.world,))
        self.shapes = shapes

    def dtensors(self, arrays: dict[str, np.ndarray]) -> dict:
        import torch
        from torch.distributed.tensor import DTensor, Shard

        return {
            name: DTensor.from_local(torch.from_numpy(a), self.mesh, [Shard(0)], run_check=False)
            for name, a in arrays.items()
        }

    def zero_targets(self) -> dict:
        """Pre-allocated DTensors of this world's placements, zeroed (every page touched)."""
        arrays = {}
        for name, shape in self.shapes:
            rows = shard_rows(shape[0], self.world, self.rank)[1]
            arrays[name] = np.zeros((rows, *shape[1:]), np.float32)
            arrays[name].fill(0)
        return self.dtensors(arrays)

    def barrier(self) -> None:
        self.dist.barrier()

    def timed_after_barrier(self, fn, *args, **kwargs):
        self.barrier()
        return timed(fn, *args, **kwargs)

    def copy_baseline(self, arrays: dict, rec: Recorder, metric: str, repeats: int) -> dict:
        """np.copyto of this rank's bytes into pre-faulted memory, all ranks at once: one
        untimed copy, then ``repeats`` timed ones as ``metric``. Returns the destinations."""
        destinations = {name: np.zeros_like(a) for name, a in arrays.items()}
        for d in destinations.values():
            d.fill(0)

        def numpy_copy():
            for name, src in arrays.items():
                np.copyto(destinations[name], src)

        rec.add(metric, self.timed_after_barrier(numpy_copy)[0], warmup=True)
        for _ in range(repeats):
            rec.add(metric, self.timed_after_barrier(numpy_copy)[0])
        return destinations


def rank_table(world: int, rows: list[tuple], stat: str) -> str:
    """A table of per-rank results: ``rows`` of (label, summary of :func:`aggregate_ranks`,
    metric, baseline); cells: each rank's median, the slowest rank's ``stat`` and that over
    the baseline. Rows whose summary lacks the metric are left out."""
    headers = ["operation"] + [f"rank {r}" for r in range(world)] + ["slowest rank", "x memcpy"]
    lines = []
    for label, summary, metric, baseline in rows:
        if not summary or metric not in summary:
            continue
        entry = summary[metric]
        cells = [label] + [f"{v:.3f}" for v in entry["per_rank_median"]]
        value = entry[stat]
        cells += [f"{value:.3f}", "-" if not baseline else f"{value / baseline:.2f}"]
        lines.append(cells)
    return markdown_table(headers, lines) if lines else "(no results)"


def print_results(tables: dict[str, str], checks: tuple, ratios: tuple, notes: list[str]):
    """Print titled tables, then (title, target checks), (title, {name: ratio}), notes."""
    for title, table in tables.items():
        print(f"\n{title}:")
        print(table)
    print_checks(*checks)
    print(f"\n{ratios[0]}:")
    for name, value in ratios[1].items():
        print(f"  {name}: {'n/a' if value is None else f'{value:.2f}'}")
    print()
    for note in notes:
        print("note: " + note)


def print_checks(title: str, checks: list[dict]) -> None:
    """Targets as printed: verdict, name, value, bound, and the explanation below."""
    print(f"\n{title}:")
    for check in checks:
        shown = "n/a" if check["value"] is None else f"{check['value']:.2f}"
        print(f"  {check['verdict']:4}  {check['name']}: {shown} (target {check['target']})")
        print(f"        {check['explanation']}")
