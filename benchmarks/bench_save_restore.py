#!/usr/bin/env python
"""Save/restore benchmark: mtckpt next to torch.save, DCP save / async_save and a plain memcpy.

One workload (a transformer-like state of float32 numpy arrays, 1 GiB in ~200 tensors by
default), one run. Each method runs in its own subprocess (this script re-invoked with the
hidden ``--worker METHOD`` flag) so that its peak RSS is its own. Reported per method:
the time the training thread is blocked, the time until the checkpoint is durable in each
tier, restore times, peak RSS and the RSS above the worker's baseline (its state built).
Every figure sits next to the plain-memcpy baseline measured in the same run. Each method
makes two untimed warm-up saves before the timed repeats (reported separately in the JSON).
mtckpt runs twice: ``mtckpt`` (``staging="blocking"``, the default) and ``mtckpt_async``
(``staging="async"``: save() returns once the copy into node memory is started; "staged",
when ``h.wait("staged")`` returns, is when the arrays may be modified again).

    python benchmarks/bench_save_restore.py                        # 1 GiB, 200 tensors, 3 repeats
    python benchmarks/bench_save_restore.py --size-gib 0.05 --tensors 40 --repeats 1   # smoke

Prints a table and writes JSON (``--out``, default ``bench-out/save_restore.json``).
``--local-root`` should be on the node's real disk (the default is under the system temp
dir, which may be tmpfs on some systems; then "durable" means nothing).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _harness import (
    GIB,
    SEED,
    Recorder,
    add_common_args,
    clean_up,
    cpu_count,
    current_rss,
    evict_page_cache,
    fsync_path,
    make_fresh_dir,
    markdown_table,
    parse_methods,
    peak_rss,
    prefaulted_like,
    run_methods,
    run_worker_here,
    save_changed_once_staged,
    summarise,
    timed,
    workload_shapes,
    write_report,
)

METHODS = ("memcpy", "mtckpt", "mtckpt_async", "torch_save", "dcp", "dcp_async")
RUN = "bench"
# Untimed saves before the timed ones, for every method. mtckpt needs two to reach its steady
# state: the first save creates its slot on the training thread, and the memory worker
# creates a spare slot after each of the first two commits (while the local tier writes).
WARMUP_SAVES = 2


# --------------------------------------------------------------------------------------
# workers: each runs in its own process and returns a dict (printed as one JSON line)


def run_save_phase(rec: Recorder, repeats: int, save) -> tuple[int, object]:
    """Call ``save(index, step)`` for the warm-up saves, then the timed ones; each returns
    ``({metric: seconds}, what it saved)``. Records the timings and the save phase's RSS;
    returns the last step and what it saved."""
    saved = None
    for index in range(WARMUP_SAVES + repeats):
        timings, saved = save(index, index + 1)
        for metric, seconds in timings.items():
            rec.add(metric, seconds, warmup=index < WARMUP_SAVES)
    rec.rss["after_save_phase_peak"] = peak_rss()
    rec.rss["after_save_phase"] = current_rss()
    return WARMUP_SAVES + repeats, saved


def remove_previous(path: Path) -> None:
    """Keep one checkpoint on disk at a time, as mtckpt's keep does."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def worker_memcpy(args, arrays, rec: Recorder) -> None:
    import mtckpt._native as native

    destinations = prefaulted_like(arrays)
    pairs = [(destinations[k], arrays[k]) for k in arrays]

    def numpy_copy():
        for name, src in arrays.items():
            np.copyto(destinations[name], src)

    rec.add("numpy_copyto", timed(numpy_copy)[0], warmup=True)
    for _ in range(args.repeats):
        rec.add("numpy_copyto", timed(numpy_copy)[0])

    threads = cpu_count()
    dsts = [d.reshape(-1).view(np.uint8) for d, _ in pairs]
    srcs = [s.reshape(-1).view(np.uint8) for _, s in pairs]
    rec.add("native_copy_many", timed(native.copy_many, dsts, srcs, threads)[0], warmup=True)
    for _ in range(args.repeats):
        rec.add("native_copy_many", timed(native.copy_many, dsts, srcs, threads)[0])
    rec.notes.append(f"native copy_many with threads={threads}")
    for dst, src in pairs:
        if not np.array_equal(dst, src):
            raise AssertionError("memcpy destination differs from its source")
    rec.rss["after_save_phase_peak"] = peak_rss()
    del dsts, srcs, pairs
    destinations.clear()  # give the destination memory back before the next phase

    # For reference: copying into fresh, not yet faulted memory (what a stager that
    # allocates its buffer per save pays).
    def fresh_copy():
        out = [np.empty_like(a) for a in arrays.values()]
        for dst, src in zip(out, arrays.values(), strict=True):
            np.copyto(dst, src)
        return out

    for _ in range(args.repeats):
        seconds, out = timed(fresh_copy)
        rec.add("numpy_copyto_fresh", seconds)
        del out


def worker_mtckpt(args, arrays, rec: Recorder, staging: str = "blocking") -> None:
    """Saves (blocking = until save() returns; staged = until the arrays may change: the
    same with staging="blocking"; durable in memory, on disk), then restores."""
    import mtckpt
    import mtckpt.checksum

    memory_root = Path(args.memory_root) / "tier"
    local_root = Path(args.local_root) / "tier"
    mgr = mtckpt.CheckpointManager(
        RUN,
        mtckpt.MemoryTier(str(memory_root), keep=2),
        mtckpt.LocalTier(str(local_root), keep=2),
        staging=staging,
    )
    rec.notes.append(f"checksum backend {mtckpt.checksum.backend}, threads {mgr.threads}, "
                     f"staging={staging!r}")  # fmt: skip
    returned_early = []

    def save(index: int, step: int) -> tuple[dict, None]:
        t0 = time.perf_counter()
        handle = mgr.save(step, {"model": arrays, "step": step})
        t1 = time.perf_counter()
        returned_early.append(not handle.done("staged"))
        handle.wait("staged")
        t2 = time.perf_counter()
        handle.wait("memory")
        t3 = time.perf_counter()
        handle.wait("local")
        t4 = time.perf_counter()
        # Let the background work finish (garbage collection, the spare slot) so each timed
        # save starts from the steady state; a training step separates two saves by more.
        mgr.wait()
        return {"blocking": t1 - t0, "staged": t2 - t0, "memory_durable": t3 - t0,
                "local_durable": t4 - t0}, None  # fmt: skip

    last_step, _ = run_save_phase(rec, args.repeats, save)
    if staging != "blocking":
        rec.notes.append(f"save() returned before the copy was done in {sum(returned_early)} "
                         f"of {len(returned_early)} saves")  # fmt: skip
        last_step += 1
        save_changed_once_staged(mgr, last_step, {"model": arrays, "step": last_step}, arrays)

    targets = prefaulted_like(arrays)
    target = {"model": targets, "step": 0}

    def check(step: int, restored: dict, where: str, in_place: bool) -> None:
        if step != last_step or restored["step"] != last_step:
            raise AssertionError(f"{where}: restored step {step}/{restored['step']}, "
                                 f"expected {last_step}")  # fmt: skip
        for name, array in arrays.items():
            got = restored["model"][name]
            if in_place and got is not targets[name]:
                raise AssertionError(f"{where}: {name} was not restored in place")
            if got.dtype != array.dtype or not np.array_equal(got, array):
                raise AssertionError(f"{where}: {name} differs from what was saved")

    # memory tier, into the pre-allocated targets (in place: the fast path)
    seconds, (step, restored) = timed(mgr.restore, target)
    check(step, restored, "restore(target) from memory", in_place=True)
    rec.add("restore_memory_in_place", seconds, warmup=True)
    for _ in range(args.repeats):
        rec.add("restore_memory_in_place", timed(mgr.restore, target)[0])

    # memory tier, no target: new arrays
    seconds, (step, restored) = timed(mgr.restore)
    check(step, restored, "restore() from memory", in_place=False)
    rec.add("restore_memory_new_arrays", seconds, warmup=True)
    del restored
    for _ in range(args.repeats):
        seconds, (_, restored) = timed(mgr.restore)
        rec.add("restore_memory_new_arrays", seconds)
        del restored
    mgr.close()

    # local tier alone: a second manager, same local root, an empty memory root
    empty_memory = Path(args.memory_root) / "empty"
    mgr2 = mtckpt.CheckpointManager(
        RUN, mtckpt.MemoryTier(path=str(empty_memory)), mtckpt.LocalTier(str(local_root), keep=2)
    )
    held = mgr2.steps()
    if held.get("memory") or last_step not in held.get("local", []):
        raise AssertionError(f"second manager sees {held}; expected only the local tier")
    for t in targets.values():
        t.fill(0)
    seconds, (step, restored) = timed(mgr2.restore, target)
    check(step, restored, "restore(target) from the local tier", in_place=True)
    rec.add("restore_local_warm", seconds, warmup=True)
    for _ in range(args.repeats):
        rec.add("restore_local_warm", timed(mgr2.restore, target)[0])
    for _ in range(args.repeats):
        evict_page_cache(local_root)
        rec.add("restore_local_cold", timed(mgr2.restore, target)[0])
    check(*mgr2.restore(target), "restore(target) from the local tier after eviction", True)
    mgr2.close()
    rec.notes.append(
        "memory tier = tmpfs files mapped into the process: their pages count in RSS; they "
        "are the node-memory copy of the checkpoint (as a pinned staging buffer would be)"
    )


def torch_state(arrays, step):
    import torch

    return {"model": {k: torch.from_numpy(v) for k, v in arrays.items()}, "step": step}


def torch_targets(arrays):
    import torch

    return {"model": {k: torch.from_numpy(v) for k, v in prefaulted_like(arrays).items()},
            "step": 0}  # fmt: skip


def check_torch(loaded, arrays, step, where):
    import torch

    if loaded["step"] != step:
        raise AssertionError(f"{where}: step {loaded['step']}, expected {step}")
    for name, array in arrays.items():
        if not torch.equal(loaded["model"][name], torch.from_numpy(array)):
            raise AssertionError(f"{where}: {name} differs from what was saved")


def worker_torch_save(args, arrays, rec: Recorder) -> None:
    import torch

    root = Path(args.local_root)

    def save(index: int, step: int) -> tuple[dict, Path]:
        remove_previous(root / f"ckpt-{index - 1:03d}.pt")
        path = root / f"ckpt-{index:03d}.pt"
        state = torch_state(arrays, step)
        t0 = time.perf_counter()
        torch.save(state, path)
        t1 = time.perf_counter()
        fsync_path(path)
        fsync_path(root)
        t2 = time.perf_counter()
        return {"save_no_fsync": t1 - t0, "blocking": t2 - t0, "local_durable": t2 - t0}, path

    step, path = run_save_phase(rec, args.repeats, save)

    load = lambda **kw: torch.load(path, weights_only=True, **kw)  # noqa: E731
    seconds, loaded = timed(load)
    check_torch(loaded, arrays, step, "torch.load")
    rec.add("restore_local_warm", seconds, warmup=True)
    del loaded
    for _ in range(args.repeats):
        seconds, loaded = timed(load)
        rec.add("restore_local_warm", seconds)
        del loaded
    for _ in range(args.repeats):
        evict_page_cache(root)
        seconds, loaded = timed(load)
        rec.add("restore_local_cold", seconds)
        del loaded

    # mmap=True returns lazily mapped tensors: no byte is read until used. Copying them into
    # the targets (in place) is the comparable figure.
    targets = torch_targets(arrays)

    def load_mmap_into_targets():
        loaded = load(mmap=True)
        for name, tensor in targets["model"].items():
            tensor.copy_(loaded["model"][name])
        targets["step"] = loaded["step"]
        return loaded

    seconds, loaded = timed(load, mmap=True)
    check_torch(loaded, arrays, step, "torch.load(mmap=True)")
    del loaded
    for _ in range(args.repeats):
        seconds, loaded = timed(load, mmap=True)
        rec.add("restore_mmap_lazy", seconds)
        del loaded
    for _ in range(args.repeats):
        seconds, loaded = timed(load_mmap_into_targets)
        rec.add("restore_mmap_copy_into_targets_warm", seconds)
        del loaded
    check_torch(targets, arrays, step, "torch.load(mmap=True) + copy_")
    rec.notes.append("blocking = torch.save + fsync (file and directory) = durable on disk")
    rec.notes.append("restore = torch.load(weights_only=True): allocates new tensors")


class DcpCaller:
    """Calls DCP without a process group (no_dist=True); if that fails, initialises a
    single-process gloo group once and calls again."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.use_group = False

    def __call__(self, fn, *args, **kwargs):
        import torch.distributed as dist

        if not self.use_group:
            try:
                return fn(*args, no_dist=True, **kwargs)
            except Exception as exc:
                self.rec.notes.append(f"without a process group DCP failed ({exc!r}); "
                                      "using a single-process gloo group")  # fmt: skip
                self.use_group = True
        if not dist.is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group(
                "gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}"
            )
        return fn(*args, **kwargs)


def _dcp_restore(args, arrays, rec, dcp, call, directory, step) -> None:
    targets = torch_targets(arrays)
    checkpoint = str(directory)
    seconds = timed(call, dcp.load, targets, checkpoint_id=checkpoint)[0]
    check_torch(targets, arrays, step, "dcp.load")
    rec.add("restore_local_warm", seconds, warmup=True)
    for _ in range(args.repeats):
        rec.add("restore_local_warm", timed(call, dcp.load, targets, checkpoint_id=checkpoint)[0])
    for _ in range(args.repeats):
        evict_page_cache(directory)
        rec.add("restore_local_cold", timed(call, dcp.load, targets, checkpoint_id=checkpoint)[0])
    check_torch(targets, arrays, step, "dcp.load after eviction")
    rec.notes.append("restore = dcp.load into pre-allocated tensors (in place)")


def worker_dcp(args, arrays, rec: Recorder) -> None:
    import torch.distributed.checkpoint as dcp

    call = DcpCaller(rec)
    root = Path(args.local_root)

    def save(index: int, step: int) -> tuple[dict, Path]:
        remove_previous(root / f"ckpt-{index - 1:03d}")
        directory = root / f"ckpt-{index:03d}"
        seconds = timed(call, dcp.save, torch_state(arrays, step), checkpoint_id=str(directory))[0]
        return {"blocking": seconds, "local_durable": seconds}, directory

    step, directory = run_save_phase(rec, args.repeats, save)
    rec.notes.append("blocking = dcp.save (FileSystemWriter defaults: fsync) = durable on disk")
    _dcp_restore(args, arrays, rec, dcp, call, directory, step)


def worker_dcp_async(args, arrays, rec: Recorder) -> None:
    import torch.distributed.checkpoint as dcp

    call = DcpCaller(rec)
    root = Path(args.local_root)

    def save(index: int, step: int) -> tuple[dict, Path]:
        remove_previous(root / f"ckpt-{index - 1:03d}")
        directory = root / f"ckpt-{index:03d}"
        state = torch_state(arrays, step)
        t0 = time.perf_counter()
        response = call(dcp.async_save, state, checkpoint_id=str(directory))
        t1 = time.perf_counter()
        staged = t1 - t0
        upload = getattr(response, "upload_completion", response)
        staging = getattr(response, "staging_completion", None)
        if staging is not None:  # AsyncSaveResponse: the state may change only once staged
            staging.result()
            staged = time.perf_counter() - t0
        upload.result()
        t2 = time.perf_counter()
        return {"returned": t1 - t0, "blocking": staged, "local_durable": t2 - t0}, directory

    step, directory = run_save_phase(rec, args.repeats, save)
    rec.notes.append(
        "blocking = until async_save returns (default stager: synchronous copy into a fresh "
        "CPU buffer; if it returns an AsyncSaveResponse, until staging_completion); "
        "durable = until the upload future's result()"
    )
    _dcp_restore(args, arrays, rec, dcp, call, directory, step)


WORKERS = {
    "memcpy": worker_memcpy,
    "mtckpt": worker_mtckpt,
    "mtckpt_async": lambda *a: worker_mtckpt(*a, staging="async"),
    "torch_save": worker_torch_save,
    "dcp": worker_dcp,
    "dcp_async": worker_dcp_async,
}


# --------------------------------------------------------------------------------------
# the parent: run the workers, summarise, print, write JSON


# Table rows: (label, method, metric for the blocking column).
ROWS = [
    ("memcpy (np.copyto)", "memcpy", "numpy_copyto"),
    ("memcpy (native copy_many)", "memcpy", "native_copy_many"),
    ("memcpy into fresh memory", "memcpy", "numpy_copyto_fresh"),
    ("mtckpt", "mtckpt", "blocking"),
    ("mtckpt_async (save() returns)", "mtckpt_async", "blocking"),
    ("torch.save (no fsync)", "torch_save", "save_no_fsync"),
    ("torch.save + fsync", "torch_save", "blocking"),
    ("dcp.save", "dcp", "blocking"),
    ("dcp.async_save", "dcp_async", "blocking"),
]
RESTORE_COLUMNS = [
    ("rst mem in-place", "restore_memory_in_place"),
    ("rst mem new", "restore_memory_new_arrays"),
    ("rst disk warm", "restore_local_warm"),
    ("rst disk cold", "restore_local_cold"),
]


def render_table(results, summary, stat: str) -> str:
    headers = ["method", "blocking", "x memcpy", "staged", "mem durable", "local durable"]
    headers += [h for h, _ in RESTORE_COLUMNS]
    headers += ["peak RSS", "extra RSS save", "extra RSS"]
    baseline = summary.get("memcpy", {}).get("numpy_copyto", {}).get(stat)
    rows = []
    for label, method, blocking_metric in ROWS:
        result = results.get(method)
        if result is None:
            continue
        if result.get("error"):
            rows.append([label, "FAILED: " + result["error"][:80]] + [""] * (len(headers) - 2))
            continue
        s = summary[method]

        def cell(metric, s=s):
            value = s.get(metric, {}).get(stat)
            return "-" if value is None else f"{value:.3f}"

        blocking = s.get(blocking_metric, {}).get(stat)
        ratio = f"{blocking / baseline:.2f}" if blocking is not None and baseline else "-"
        first_row_of_method = blocking_metric in ("numpy_copyto", "blocking")  # RSS shown once
        is_durable_row = blocking_metric == "blocking"
        row = [label, cell(blocking_metric), ratio]
        row.append(cell("staged") if is_durable_row else "-")
        row.append(cell("memory_durable") if is_durable_row else "-")
        row.append(cell("local_durable") if is_durable_row else "-")
        for _, metric in RESTORE_COLUMNS:
            row.append(cell(metric) if is_durable_row else "-")
        if first_row_of_method:
            rss = result["rss_bytes"]
            row.append(f"{rss['peak'] / GIB:.2f}")
            save_peak = rss.get("after_save_phase_peak", rss["peak"])
            row.append(f"{(save_peak - rss['baseline']) / GIB:.2f}")
            row.append(f"{(rss['peak'] - rss['baseline']) / GIB:.2f}")
        else:
            row += ["", "", ""]
        rows.append(row)
    return markdown_table(headers, rows)


def key_ratios(summary, stat: str = "median") -> list[tuple[str, float | None, str]]:
    """(name, value, explanation) of the headline comparisons; value None where a side failed."""

    def get(method, metric):
        return summary.get(method, {}).get(metric, {}).get(stat)

    def ratio(a, b):
        return a / b if a is not None and b else None

    faster = "< 1: mtckpt faster"
    comparisons = [
        ("mtckpt blocking / memcpy", ("mtckpt", "blocking"), ("memcpy", "numpy_copyto"),
         "training-thread blocking time over a plain np.copyto of the same bytes"),
        ("mtckpt blocking / native copy_many", ("mtckpt", "blocking"),
         ("memcpy", "native_copy_many"), "the same over the native multi-threaded copy"),
        ("mtckpt blocking / dcp.async_save blocking", ("mtckpt", "blocking"),
         ("dcp_async", "blocking"), faster),
        ("mtckpt_async blocking (save() returns) / memcpy", ("mtckpt_async", "blocking"),
         ("memcpy", "numpy_copyto"), "staging='async': the training thread is held this long; "
         "the arrays may be modified only after h.wait('staged')"),
        ("mtckpt_async staged / memcpy", ("mtckpt_async", "staged"), ("memcpy", "numpy_copyto"),
         "until the arrays may be modified again"),
        ("mtckpt_async blocking (save() returns) / dcp.async_save blocking",
         ("mtckpt_async", "blocking"), ("dcp_async", "blocking"), faster),
        ("mtckpt_async staged / dcp.async_save blocking", ("mtckpt_async", "staged"),
         ("dcp_async", "blocking"), faster),
        ("mtckpt_async memory durable / mtckpt memory durable",
         ("mtckpt_async", "memory_durable"), ("mtckpt", "memory_durable"), "< 1: async sooner"),
        ("mtckpt local durable / dcp.async_save durable", ("mtckpt", "local_durable"),
         ("dcp_async", "local_durable"), faster),
        ("mtckpt local durable / torch.save+fsync", ("mtckpt", "local_durable"),
         ("torch_save", "local_durable"), faster),
        ("mtckpt local durable / dcp.save", ("mtckpt", "local_durable"),
         ("dcp", "local_durable"), faster),
        ("mtckpt_async local durable / dcp.async_save durable", ("mtckpt_async", "local_durable"),
         ("dcp_async", "local_durable"), faster),
        ("mtckpt restore (memory, in place) / memcpy", ("mtckpt", "restore_memory_in_place"),
         ("memcpy", "numpy_copyto"), "restore copies and checksums every byte"),
        ("mtckpt restore (memory, in place) / dcp.load (warm)",
         ("mtckpt", "restore_memory_in_place"), ("dcp", "restore_local_warm"), faster),
        ("mtckpt restore (memory, in place) / torch.load (warm)",
         ("mtckpt", "restore_memory_in_place"), ("torch_save", "restore_local_warm"), faster),
        ("mtckpt restore (local, warm, in place) / dcp.load (warm, in place)",
         ("mtckpt", "restore_local_warm"), ("dcp", "restore_local_warm"), faster),
        ("mtckpt restore (local, warm) / torch.load (warm)", ("mtckpt", "restore_local_warm"),
         ("torch_save", "restore_local_warm"), faster),
        ("mtckpt restore (local, cold) / dcp.load (cold)", ("mtckpt", "restore_local_cold"),
         ("dcp", "restore_local_cold"), faster),
        ("mtckpt restore (local, cold) / torch.load (cold)", ("mtckpt", "restore_local_cold"),
         ("torch_save", "restore_local_cold"), faster),
    ]  # fmt: skip
    return [(name, ratio(get(*a), get(*b)), why) for name, a, b, why in comparisons]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, METHODS, "bench-out/save_restore.json", "", "the torch/DCP files")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size_gib <= 0 or args.tensors < 1 or args.repeats < 1:
        parser.error("--size-gib must be > 0, --tensors and --repeats >= 1")
    args.method_list = parse_methods(parser, args.methods, METHODS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        imports = ("mtckpt",) if args.worker == "memcpy" else ("mtckpt", "torch")
        size = int(args.size_gib * GIB)
        return run_worker_here(args.worker, WORKERS[args.worker], args, size, args.tensors, imports)

    created: list[Path] = []
    default_memory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    memory_base = make_fresh_dir(args.memory_root, default_memory, "mtckpt-bench-", created)
    local_base = make_fresh_dir(args.local_root, tempfile.gettempdir(), "mtckpt-bench-", created)
    size_bytes = int(args.size_gib * GIB)
    shapes = workload_shapes(size_bytes, args.tensors)
    total = sum(4 * math.prod(s) for _, s in shapes)
    print(f"workload: {len(shapes)} float32 tensors, {total / GIB:.3f} GiB "
          f"(d={shapes[-1][1][0]}, largest {shapes[0][0]} {shapes[0][1]}); "
          f"repeats {args.repeats}", file=sys.stderr)  # fmt: skip
    print(f"memory root {memory_base}, local root {local_base}", file=sys.stderr)

    started = _dt.datetime.now(_dt.timezone.utc)
    try:
        results = run_methods(__file__, args, memory_base, local_base)
    finally:
        clean_up(created)

    summary = summarise(results)
    ratios = key_ratios(summary)
    table_median = render_table(results, summary, "median")
    table_min = render_table(results, summary, "min")
    notes = [
        f"{len(shapes)} float32 tensors, {total} bytes ({total / GIB:.3f} GiB); "
        f"times in seconds (median of {args.repeats}; second table: min), RSS in GiB; "
        "x memcpy = blocking / np.copyto of the same bytes into pre-faulted memory; "
        "rst = restore; staged = until the arrays may be modified again",
        "mtckpt_async = staging='async': blocking = until save() returns (the training thread "
        "is held this long), the arrays may be modified only after h.wait('staged'); one more, "
        "untimed save modifies them right after 'staged', and every restore is of that step",
        f"every method makes {WARMUP_SAVES} untimed warm-up saves first (mtckpt reaches its "
        "steady state of pre-faulted slots only after two); their times are in the JSON "
        "under 'warmup', as is each first (verifying) restore",
        "mtckpt's memory tier lives in tmpfs files mapped into the process, so those pages "
        "count in its RSS: they ARE the node-memory copy of the checkpoint, as a pinned "
        "staging buffer would be. Extra RSS = peak - RSS once the state was built; "
        "'save' = peak during the save phase only (restores allocate targets/new arrays).",
        "restore mem = from mtckpt's memory tier; restore disk = mtckpt's local tier alone "
        "(second manager, empty memory root), torch.load(weights_only=True) (new tensors), "
        "dcp.load (in place); cold = after fsync + POSIX_FADV_DONTNEED of the files.",
    ]
    for method, result in results.items():
        for note in result.get("notes", []):
            notes.append(f"{method}: {note}")

    print()
    print("median:")
    print(table_median)
    print()
    print("min:")
    print(table_min)
    print()
    print("key ratios (medians):")
    for name, value, explanation in ratios:
        shown = "n/a" if value is None else f"{value:.2f}"
        print(f"  {name}: {shown}  ({explanation})")
    print()
    for note in notes:
        print("note: " + note)

    write_report(args.out, "save_restore", started, {
        "params": {
            "size_gib": args.size_gib,
            "bytes": total,
            "tensors": len(shapes),
            "tensors_requested": args.tensors,
            "repeats": args.repeats,
            "memory_root": str(memory_base),
            "local_root": str(local_base),
            "methods": args.method_list,
            "seed": SEED,
        },
        "results": results,
        "summary": summary,
        "ratios": {name: value for name, value, _ in ratios},
        "tables": {"median": table_median, "min": table_min},
        "notes": notes,
    })  # fmt: skip

    fatal = [m for m in ("memcpy", "mtckpt", "mtckpt_async") if results.get(m, {}).get("error")]
    if fatal:
        print(f"FAILED: {', '.join(fatal)} (these must work)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
