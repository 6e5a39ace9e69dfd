#!/usr/bin/env python
"""Multi-rank save/restore benchmark: mtckpt next to DCP save / async_save / load and a plain
memcpy, on 2 and 4 gloo ranks holding the same global state, and restore with resharding.

One global state (the transformer-like float32 state of bench_save_restore.py, 1 GiB in
~200 tensors by default), sharded along dim 0 over each world size as DTensors
(``Shard(0)`` on a 1-D CPU mesh). Every rank builds its own shard only; the values depend
on (tensor index, global row) alone, so every world size describes the same bytes.

For each world size N, each method runs in its own N processes (this script re-invoked with
the hidden ``--worker METHOD`` flag, with the environment torchrun gives its ranks). The
ranks meet at a barrier before every timed operation; each reports its own times and the
figure is the slowest rank's. Then every checkpoint of world N is restored by world M (for
``--ranks 2,4``: 2 -> 4 and 4 -> 2; with a single N: N -> N//2, or 1 -> 2), by mtckpt from
world N's tiers and by dcp.load from world N's DCP directory, next to a memcpy of the
restoring rank's bytes measured in that same launch.

    python benchmarks/bench_ranks.py --local-root /path/on/the/node/disk
    python benchmarks/bench_ranks.py --size-gib 0.02 --tensors 20 --ranks 2 --repeats 1  # smoke

Prints a table per world size and the issue's targets, and writes JSON (``--out``, default
``bench-out/ranks.json``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
from _harness import (
    GIB,
    RESULT_PREFIX,
    Recorder,
    clean_up,
    cpu_count,
    current_rss,
    machine_info,
    make_fresh_dir,
    peak_rss,
    spawn_ranks,
    timed,
    workload_shapes,
)

METHODS = ("memcpy", "mtckpt", "dcp_async", "dcp")
WORKER_MODES = (*METHODS, "reshard")
RUN = "bench"
WARMUP_SAVES = 2  # as in bench_save_restore.py: mtckpt reaches its steady state after two
COLLECTIVE_TIMEOUT_S = 600

# The targets (issue 3, "Targets (benchmark, same run)").
TARGET_BLOCKING_X_MEMCPY = 1.3
TARGET_RESHARD_X_MEMCPY = 4.0
TARGET_X_FASTER_THAN_DCP = 5.0

# --------------------------------------------------------------------------------------
# the global state and each rank's shard of it


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
# worker side: one rank


class RankRecorder(Recorder):
    """A rank's timings, plus what the parent needs back (``extra``: the last step saved,
    the DCP directory)."""

    def __init__(self, method: str) -> None:
        super().__init__(method)
        self.extra: dict = {}


class Rank:
    """This rank's process group and 1-D device mesh, and DTensors sharded over it."""

    def __init__(self, shapes) -> None:
        from datetime import timedelta

        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
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


def check_step(got, expected: int, where: str) -> None:
    if got != expected:
        raise AssertionError(f"{where}: restored step {got}, expected {expected}")


def worker_memcpy(args, ctx: Rank, rec: RankRecorder, arrays) -> None:
    """The baseline: np.copyto of this rank's bytes into pre-faulted memory, all ranks at once."""
    import mtckpt._native as native

    destinations = {name: np.zeros_like(a) for name, a in arrays.items()}
    for d in destinations.values():
        d.fill(0)

    def numpy_copy():
        for name, src in arrays.items():
            np.copyto(destinations[name], src)

    rec.add("numpy_copyto", ctx.timed_after_barrier(numpy_copy)[0], warmup=True)
    for _ in range(args.repeats):
        rec.add("numpy_copyto", ctx.timed_after_barrier(numpy_copy)[0])
    # For reference: the native multi-threaded copy with the threads mtckpt gives a save.
    threads = max(1, min(8, os.cpu_count() or 1))
    dsts = [d.reshape(-1).view(np.uint8) for d in destinations.values()]
    srcs = [s.reshape(-1).view(np.uint8) for s in arrays.values()]
    rec.add("native_copy_many", ctx.timed_after_barrier(native.copy_many, dsts, srcs, threads)[0],
            warmup=True)  # fmt: skip
    for _ in range(args.repeats):
        rec.add(
            "native_copy_many", ctx.timed_after_barrier(native.copy_many, dsts, srcs, threads)[0]
        )
    for name, src in arrays.items():
        if not np.array_equal(destinations[name], src):
            raise AssertionError(f"memcpy destination of {name} differs from its source")
    rec.notes.append(f"native copy_many with threads={threads} per rank")


def mtckpt_manager(memory_root: str, local_root: str):
    import mtckpt

    return mtckpt.CheckpointManager(
        RUN, mtckpt.MemoryTier(memory_root, keep=2), mtckpt.LocalTier(local_root, keep=2)
    )


def copy_in_this_launch(args, ctx: Rank, rec: RankRecorder, arrays) -> None:
    """The memcpy baseline again, in the processes of another method (machines drift
    between launches): ``memcpy_here``."""
    destinations = {name: np.zeros_like(a) for name, a in arrays.items()}
    for d in destinations.values():
        d.fill(0)

    def numpy_copy():
        for name, src in arrays.items():
            np.copyto(destinations[name], src)

    rec.add("memcpy_here", ctx.timed_after_barrier(numpy_copy)[0], warmup=True)
    for _ in range(args.repeats):
        rec.add("memcpy_here", ctx.timed_after_barrier(numpy_copy)[0])


def worker_mtckpt(args, ctx: Rank, rec: RankRecorder, arrays) -> None:
    copy_in_this_launch(args, ctx, rec, arrays)
    model = ctx.dtensors(arrays)
    mgr = mtckpt_manager(args.world_memory_root, args.world_local_root)
    rec.notes.append(f"mtckpt threads per rank {mgr.threads}")
    last = WARMUP_SAVES + args.repeats
    for index in range(last):
        step = index + 1
        ctx.barrier()
        t0 = time.perf_counter()
        handle = mgr.save(step, {"model": model, "step": step})
        t1 = time.perf_counter()
        handle.wait("memory")
        t2 = time.perf_counter()
        handle.wait("local")
        t3 = time.perf_counter()
        mgr.wait()  # garbage collection and the spare slot: each save starts steady
        warmup = index < WARMUP_SAVES
        rec.add("blocking", t1 - t0, warmup)
        rec.add("memory_durable", t2 - t0, warmup)
        rec.add("local_durable", t3 - t0, warmup)
    rec.rss["after_save_phase_peak"] = peak_rss()

    targets = ctx.zero_targets()
    target = {"model": targets, "step": 0}
    seconds, (step, restored) = ctx.timed_after_barrier(mgr.restore, target)
    rec.add("restore_same_world", seconds, warmup=True)
    check_step(step, last, "mtckpt restore (same world)")
    check_step(restored["step"], last, "mtckpt restore (same world)")
    if any(restored["model"][k] is not targets[k] for k in targets):
        raise AssertionError("mtckpt restore (same world) did not fill the targets in place")
    check_shard(targets, ctx.shapes, ctx.world, ctx.rank, "mtckpt restore (same world)")
    for _ in range(args.repeats):
        rec.add("restore_same_world", ctx.timed_after_barrier(mgr.restore, target)[0])
    mgr.close()
    rec.extra["last_step"] = last


def _remove_tree(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)


def _dcp_save_phase(args, ctx: Rank, rec: RankRecorder, arrays, save_one) -> Path:
    """The warm-up and timed saves of a DCP method; one checkpoint kept on disk at a time
    (removed by rank 0 before the barrier). Returns the last checkpoint's directory."""
    model = ctx.dtensors(arrays)
    root = Path(args.dcp_dir)
    directory = root
    for index in range(WARMUP_SAVES + args.repeats):
        if ctx.rank == 0:
            _remove_tree(root / f"ckpt-{index - 1:03d}")
        directory = root / f"ckpt-{index:03d}"
        ctx.barrier()
        for metric, seconds in save_one({"model": model, "step": index + 1}, directory).items():
            rec.add(metric, seconds, warmup=index < WARMUP_SAVES)
    rec.rss["after_save_phase_peak"] = peak_rss()
    rec.extra["last_step"] = WARMUP_SAVES + args.repeats
    rec.extra["checkpoint"] = str(directory)
    return directory


def _dcp_load(args, ctx: Rank, rec: RankRecorder, directory: str, step: int, metric: str, where):
    """dcp.load into pre-allocated DTensors of this world: the first load verified, then timed."""
    import torch.distributed.checkpoint as dcp

    targets = ctx.zero_targets()
    state = {"model": targets, "step": 0}
    rec.add(metric, ctx.timed_after_barrier(dcp.load, state, checkpoint_id=directory)[0], True)
    check_step(state["step"], step, where)
    check_shard(targets, ctx.shapes, ctx.world, ctx.rank, where)
    for _ in range(args.repeats):
        rec.add(metric, ctx.timed_after_barrier(dcp.load, state, checkpoint_id=directory)[0])


def worker_dcp(args, ctx: Rank, rec: RankRecorder, arrays) -> None:
    import torch.distributed.checkpoint as dcp

    def save_one(state, directory):
        seconds = timed(dcp.save, state, checkpoint_id=str(directory))[0]
        return {"blocking": seconds, "local_durable": seconds}

    directory = _dcp_save_phase(args, ctx, rec, arrays, save_one)
    rec.notes.append("blocking = dcp.save (FileSystemWriter defaults: fsync) = durable on disk")
    _dcp_load(args, ctx, rec, str(directory), rec.extra["last_step"], "restore_same_world",
              "dcp.load (same world)")  # fmt: skip


def worker_dcp_async(args, ctx: Rank, rec: RankRecorder, arrays) -> None:
    import torch.distributed.checkpoint as dcp

    def save_one(state, directory):
        t0 = time.perf_counter()
        response = dcp.async_save(state, checkpoint_id=str(directory))
        t1 = time.perf_counter()
        staged = t1 - t0
        upload = getattr(response, "upload_completion", response)
        staging = getattr(response, "staging_completion", None)
        if staging is not None:  # AsyncSaveResponse: the state may change only once staged
            staging.result()
            staged = time.perf_counter() - t0
        upload.result()
        return {"returned": t1 - t0, "blocking": staged, "local_durable": time.perf_counter() - t0}

    directory = _dcp_save_phase(args, ctx, rec, arrays, save_one)
    rec.notes.append(
        "blocking = until async_save returns (or until staging_completion if it returns an "
        "AsyncSaveResponse); durable = until the upload future's result()"
    )
    _dcp_load(args, ctx, rec, str(directory), rec.extra["last_step"], "restore_same_world",
              "dcp.load (same world)")  # fmt: skip


def worker_reshard(args, ctx: Rank, rec: RankRecorder, arrays) -> None:
    """World M restores world N's checkpoints into M-way DTensors: the memcpy baseline of
    this rank's bytes, mtckpt from N's tiers (and from its local tier alone), dcp.load."""
    worker_memcpy(args, ctx, rec, arrays)
    arrays.clear()  # the restored shards are checked against freshly generated ones
    step = args.source_step
    where = f"restore of world {args.source_world}'s step {step} on world {ctx.world}"
    if args.world_memory_root:
        targets = ctx.zero_targets()
        target = {"model": targets, "step": 0}
        # Same run and roots as world N, explicit step; it only restores (a save would write
        # into world N's run). Its start-up garbage collection touches incomplete steps only.
        mgr = mtckpt_manager(args.world_memory_root, args.world_local_root)
        seconds, (got, restored) = ctx.timed_after_barrier(mgr.restore, target, step=step)
        rec.add("mtckpt_restore", seconds, warmup=True)
        check_step(got, step, "mtckpt " + where)
        check_step(restored["step"], step, "mtckpt " + where)
        check_shard(targets, ctx.shapes, ctx.world, ctx.rank, "mtckpt " + where)
        for _ in range(args.repeats):
            rec.add("mtckpt_restore", ctx.timed_after_barrier(mgr.restore, target, step=step)[0])
        mgr.close()
        del targets, target, restored

        # The local tier alone (a node whose memory tier is gone), page cache warm.
        targets = ctx.zero_targets()
        target = {"model": targets, "step": 0}
        empty_memory = Path(args.scratch_root) / f"empty-memory-{ctx.rank}"
        mgr = mtckpt_manager(str(empty_memory), args.world_local_root)
        seconds, (got, _) = ctx.timed_after_barrier(mgr.restore, target, step=step)
        rec.add("mtckpt_restore_local", seconds, warmup=True)
        check_step(got, step, "mtckpt (local tier) " + where)
        check_shard(targets, ctx.shapes, ctx.world, ctx.rank, "mtckpt (local tier) " + where)
        for _ in range(args.repeats):
            rec.add("mtckpt_restore_local",
                    ctx.timed_after_barrier(mgr.restore, target, step=step)[0])  # fmt: skip
        mgr.close()
        del targets, target
    if args.source_dcp_dir:
        _dcp_load(args, ctx, rec, args.source_dcp_dir, args.source_dcp_step, "dcp_load",
                  "dcp.load " + where)  # fmt: skip


WORKERS = {
    "memcpy": worker_memcpy,
    "mtckpt": worker_mtckpt,
    "dcp_async": worker_dcp_async,
    "dcp": worker_dcp,
    "reshard": worker_reshard,
}


def run_rank(args) -> int:
    """The ``--worker MODE`` entry of one rank: build its shard, run, print one JSON line."""
    rec = RankRecorder(args.worker)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    nbytes = 0
    code = 0
    try:
        import torch  # noqa: F401  (before the RSS baseline, so the baseline counts it)

        import mtckpt  # noqa: F401

        shapes = [(n, tuple(s)) for n, s in json.loads(args.shapes_json)]
        ctx = Rank(shapes)
        t0 = time.perf_counter()
        arrays = build_shard(shapes, ctx.world, ctx.rank)
        nbytes = sum(a.nbytes for a in arrays.values())
        rec.notes.append(f"shard built in {time.perf_counter() - t0:.1f} s")
        rec.rss["baseline"] = current_rss()
        WORKERS[args.worker](args, ctx, rec, arrays)
        ctx.barrier()
        ctx.dist.destroy_process_group()
        result = rec.result(nbytes)
    except Exception as exc:  # the parent kills the other ranks, which may wait for this one
        traceback.print_exc()
        result = rec.result(nbytes)
        result["error"] = f"{type(exc).__name__}: {exc}"
        code = 1
    result.update(rank=rank, world=world, extra=rec.extra)
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return code


# --------------------------------------------------------------------------------------
# the parent: launch the worlds, aggregate over ranks, print, write JSON


def aggregate(launch: dict) -> dict:
    """Per metric: each rank's median and the figure, the slowest rank of each repeat
    (its median, min and max over repeats)."""
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
    first = {}
    for metric in ranks[0]["warmup"]:
        if metric in ("restore_same_world", "mtckpt_restore", "mtckpt_restore_local", "dcp_load"):
            first[metric] = max(r["warmup"][metric][0] for r in ranks)
    out["_first_restore_slowest_rank"] = first
    out["_bytes_per_rank"] = [r["bytes"] for r in ranks]
    return out


def reshard_pairs(worlds: list[int]) -> list[tuple[int, int]]:
    if len(worlds) == 1:
        n = worlds[0]
        return [(n, n // 2 if n > 1 else 2)]
    return [(n, m) for n in worlds for m in worlds if n != m]


def fig(summary: dict, metric: str, stat: str = "median"):
    return summary.get(metric, {}).get(stat)


def ratio(a, b):
    return a / b if a is not None and b else None


def render_world_table(world, saves: dict, restores: dict, stat: str) -> str:
    """One world size: its save-phase methods and the restores it made of other worlds."""
    memcpy = saves.get("memcpy", {})
    base = fig(memcpy, "numpy_copyto", stat)
    rows = []  # (label, summary, metric, baseline)
    rows += [("memcpy (np.copyto)", memcpy, "numpy_copyto", base),
             ("memcpy (native copy_many)", memcpy, "native_copy_many", base),
             ("memcpy (np.copyto) in the mtckpt launch", saves.get("mtckpt"), "memcpy_here",
              base),
             ("mtckpt save: blocking", saves.get("mtckpt"), "blocking", base),
             ("mtckpt save: memory durable", saves.get("mtckpt"), "memory_durable", base),
             ("mtckpt save: local durable", saves.get("mtckpt"), "local_durable", base),
             ("mtckpt restore, same world (memory, in place)", saves.get("mtckpt"),
              "restore_same_world", base),
             ("dcp.async_save: blocking", saves.get("dcp_async"), "blocking", base),
             ("dcp.async_save: durable", saves.get("dcp_async"), "local_durable", base),
             ("dcp.save (blocking = durable)", saves.get("dcp"), "blocking", base),
             ("dcp.load, same world", saves.get("dcp") or saves.get("dcp_async"),
              "restore_same_world", base)]  # fmt: skip
    for source, summary in sorted(restores.items()):
        rbase = fig(summary, "numpy_copyto", stat)
        rows += [(f"from world {source}: memcpy (np.copyto)", summary, "numpy_copyto", rbase),
                 (f"from world {source}: mtckpt restore (memory)", summary, "mtckpt_restore",
                  rbase),
                 (f"from world {source}: mtckpt restore (local tier alone)", summary,
                  "mtckpt_restore_local", rbase),
                 (f"from world {source}: dcp.load", summary, "dcp_load", rbase)]  # fmt: skip
    headers = ["operation"] + [f"rank {r}" for r in range(world)]
    headers += ["slowest rank", "x memcpy"]
    lines = []
    for label, summary, metric, baseline in rows:
        if not summary or metric not in summary:
            continue
        entry = summary[metric]
        cells = [label] + [f"{v:.3f}" for v in entry["per_rank_median"]]
        value = entry[stat]
        cells += [f"{value:.3f}", "-" if not baseline else f"{value / baseline:.2f}"]
        lines.append(cells)
    if not lines:
        return "(no results)"
    widths = [max(len(row[i]) for row in lines + [headers]) for i in range(len(headers))]

    def line(cells):
        out = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells)]
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(row) for row in lines])


def target_checks(worlds, pairs, saves, restores) -> list[dict]:
    """The issue's targets, each with its value and PASS / FAIL (n/a where a side is missing)."""
    checks = []

    def add(name, value, limit, kind, explanation):
        if value is None:
            verdict = "n/a"
        elif kind == "max":
            verdict = "PASS" if value <= limit else "FAIL"
        else:
            verdict = "PASS" if value >= limit else "FAIL"
        bound = f"<= {limit}" if kind == "max" else f">= {limit}"
        checks.append({"name": name, "value": value, "target": bound, "verdict": verdict,
                       "explanation": explanation})  # fmt: skip

    for n in worlds:
        s = saves[n]
        blocking = fig(s.get("mtckpt", {}), "blocking")
        add(f"world {n}: mtckpt blocking / memcpy of the rank's bytes",
            ratio(blocking, fig(s.get("memcpy", {}), "numpy_copyto")),
            TARGET_BLOCKING_X_MEMCPY, "max", "slowest rank, median of repeats")  # fmt: skip
        add(f"world {n}: dcp.async_save blocking / mtckpt blocking",
            ratio(fig(s.get("dcp_async", {}), "blocking"), blocking),
            TARGET_X_FASTER_THAN_DCP, "min", "how many times faster mtckpt is")  # fmt: skip
    for n, m in pairs:
        r = restores.get((n, m), {})
        restore = fig(r, "mtckpt_restore")
        add(f"{n} -> {m} ranks: mtckpt restore with resharding / memcpy",
            ratio(restore, fig(r, "numpy_copyto")), TARGET_RESHARD_X_MEMCPY, "max",
            "memcpy of the restoring rank's bytes, same launch")  # fmt: skip
        add(f"{n} -> {m} ranks: dcp.load / mtckpt restore (both resharding)",
            ratio(fig(r, "dcp_load"), restore), TARGET_X_FASTER_THAN_DCP, "min",
            "how many times faster mtckpt is")  # fmt: skip
    return checks


def info_ratios(worlds, pairs, saves, restores) -> dict[str, float | None]:
    """Further comparisons, no target attached."""
    out = {}
    for n in worlds:
        s = saves[n]
        mt, base = s.get("mtckpt", {}), fig(s.get("memcpy", {}), "numpy_copyto")
        out[f"world {n}: mtckpt blocking / native copy_many"] = ratio(
            fig(mt, "blocking"), fig(s.get("memcpy", {}), "native_copy_many"))  # fmt: skip
        out[f"world {n}: mtckpt blocking / memcpy in the mtckpt launch"] = ratio(
            fig(mt, "blocking"), fig(mt, "memcpy_here"))  # fmt: skip
        out[f"world {n}: mtckpt memory durable / memcpy"] = ratio(fig(mt, "memory_durable"), base)
        out[f"world {n}: mtckpt restore (same world) / memcpy"] = ratio(
            fig(mt, "restore_same_world"), base)  # fmt: skip
        dcp_load = fig(s.get("dcp") or s.get("dcp_async") or {}, "restore_same_world")
        out[f"world {n}: dcp.load / mtckpt restore (same world)"] = ratio(
            dcp_load, fig(mt, "restore_same_world"))  # fmt: skip
        out[f"world {n}: dcp.async_save durable / mtckpt local durable"] = ratio(
            fig(s.get("dcp_async", {}), "local_durable"), fig(mt, "local_durable"))  # fmt: skip
        out[f"world {n}: dcp.save / mtckpt local durable"] = ratio(
            fig(s.get("dcp", {}), "blocking"), fig(mt, "local_durable"))  # fmt: skip
    for n, m in pairs:
        r = restores.get((n, m), {})
        out[f"{n} -> {m} ranks: mtckpt restore (local tier alone) / memcpy"] = ratio(
            fig(r, "mtckpt_restore_local"), fig(r, "numpy_copyto"))  # fmt: skip
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gib", type=float, default=1.0, help="total state size (1.0)")
    parser.add_argument("--tensors", type=int, default=200, help="about this many tensors (200)")
    parser.add_argument("--ranks", default="2,4", help="comma list of world sizes (2,4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; median and min (3)")
    parser.add_argument("--memory-root", default=None,
                        help="tmpfs directory for the memory tiers; a fresh directory is made "
                             "inside it (default: /dev/shm)")  # fmt: skip
    parser.add_argument("--local-root", default=None,
                        help="directory on the node's real disk for the local tiers and the DCP "
                             "files; a fresh directory is made inside it (default: the system "
                             "temp dir)")  # fmt: skip
    parser.add_argument("--out", default="bench-out/ranks.json", help="JSON output path")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma list, a subset of {','.join(METHODS)}")  # fmt: skip
    # Worker-only flags (hidden).
    hidden = argparse.SUPPRESS
    parser.add_argument("--worker", choices=WORKER_MODES, help=hidden)
    parser.add_argument("--shapes-json", help=hidden)
    parser.add_argument("--world-memory-root", help=hidden)
    parser.add_argument("--world-local-root", help=hidden)
    parser.add_argument("--dcp-dir", help=hidden)
    parser.add_argument("--scratch-root", help=hidden)
    parser.add_argument("--source-world", type=int, help=hidden)
    parser.add_argument("--source-step", type=int, help=hidden)
    parser.add_argument("--source-dcp-dir", help=hidden)
    parser.add_argument("--source-dcp-step", type=int, help=hidden)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.size_gib <= 0 or args.tensors < 1 or args.repeats < 1:
        parser.error("--size-gib must be > 0, --tensors and --repeats >= 1")
    try:
        worlds = [int(w) for w in args.ranks.split(",") if w.strip()]
    except ValueError:
        parser.error(f"--ranks must be a comma list of integers, got {args.ranks!r}")
    if not worlds or any(w < 1 for w in worlds):
        parser.error("--ranks needs world sizes >= 1")
    args.worlds = list(dict.fromkeys(worlds))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    args.method_list = [m for m in METHODS if m in methods]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_rank(args)

    script = os.path.abspath(__file__)
    pairs = reshard_pairs(args.worlds)
    all_worlds = sorted(set(args.worlds) | {m for _, m in pairs})
    row_multiple = math.lcm(4, *all_worlds)
    size_bytes = int(args.size_gib * GIB)
    shapes = sharded_shapes(size_bytes, args.tensors, row_multiple)
    total = sum(4 * math.prod(s) for _, s in shapes)
    shapes_json = json.dumps(shapes)
    common = ["--shapes-json", shapes_json, "--repeats", str(args.repeats)]
    print(f"workload: {len(shapes)} float32 tensors, {total / GIB:.3f} GiB, first dimensions "
          f"multiples of {row_multiple}; world sizes {args.worlds}, resharding "
          f"{', '.join(f'{n}->{m}' for n, m in pairs)}; repeats {args.repeats}",
          file=sys.stderr)  # fmt: skip

    created: list[Path] = []
    default_memory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    memory_base = make_fresh_dir(args.memory_root, default_memory, "mtckpt-bench-", created)
    local_base = make_fresh_dir(args.local_root, tempfile.gettempdir(), "mtckpt-bench-", created)
    print(f"memory root {memory_base}, local root {local_base}", file=sys.stderr)

    def world_dirs(n: int) -> dict[str, Path]:
        return {"memory": memory_base / f"world-{n}", "local": local_base / f"world-{n}",
                "dcp": local_base / f"dcp-world-{n}",
                "dcp_async": local_base / f"dcp_async-world-{n}"}  # fmt: skip

    def launch(world: int, mode: str, extra: list[str], label: str) -> dict:
        print(f"running {label} on {world} rank(s) ...", file=sys.stderr, flush=True)
        result = spawn_ranks(script, world, ["--worker", mode, *common, *extra])
        status = "FAILED: " + result["error"] if result["error"] else "ok"
        print(f"  {label}: {status} ({result['wall_s']:.1f} s)", file=sys.stderr)
        if result["error"]:
            for rank_result in result["ranks"]:
                if rank_result.get("stderr_tail"):
                    print(f"--- rank {rank_result['rank']}:\n{rank_result['stderr_tail']}",
                          file=sys.stderr)  # fmt: skip
        return result

    started = _dt.datetime.now(_dt.timezone.utc)
    launches: dict[str, dict] = {}
    saves: dict[int, dict[str, dict]] = {}
    restores: dict[tuple[int, int], dict] = {}
    last_steps: dict[int, dict[str, int]] = {}
    try:
        for n in args.worlds:
            dirs = world_dirs(n)
            saves[n], last_steps[n] = {}, {}
            for method in args.method_list:
                extra = ["--world-memory-root", str(dirs["memory"]),
                         "--world-local-root", str(dirs["local"])]  # fmt: skip
                if method in ("dcp", "dcp_async"):
                    dirs[method].mkdir(parents=True)
                    extra = ["--dcp-dir", str(dirs[method])]
                result = launch(n, method, extra, f"{method}, world {n}")
                launches[f"world-{n}/{method}"] = result
                saves[n][method] = aggregate(result)
                if not result["error"] and "last_step" in result["ranks"][0]["extra"]:
                    last_steps[n][method] = result["ranks"][0]["extra"]["last_step"]
        for index, (n, m) in enumerate(pairs):
            dirs = world_dirs(n)
            extra = ["--source-world", str(n)]
            if "mtckpt" in last_steps[n]:
                extra += ["--world-memory-root", str(dirs["memory"]),
                          "--world-local-root", str(dirs["local"]),
                          "--source-step", str(last_steps[n]["mtckpt"])]  # fmt: skip
            dcp_source = next((k for k in ("dcp", "dcp_async") if k in last_steps[n]), None)
            if dcp_source is not None:
                checkpoint = launches[f"world-{n}/{dcp_source}"]["ranks"][0]["extra"]["checkpoint"]
                extra += ["--source-dcp-dir", checkpoint,
                          "--source-dcp-step", str(last_steps[n][dcp_source])]  # fmt: skip
            scratch = local_base / f"scratch-{n}-to-{m}"
            scratch.mkdir()
            extra += ["--scratch-root", str(scratch)]
            result = launch(m, "reshard", extra, f"restore of world {n} on world {m}")
            launches[f"reshard-{n}-to-{m}"] = result
            restores[(n, m)] = aggregate(result)
            shutil.rmtree(scratch, ignore_errors=True)
            if all(source != n for source, _ in pairs[index + 1 :]):
                for path in dirs.values():  # world n's checkpoints are no longer needed
                    shutil.rmtree(path, ignore_errors=True)
    finally:
        clean_up(created)

    restores_by_world: dict[int, dict[int, dict]] = {}
    for (n, m), summary in restores.items():
        restores_by_world.setdefault(m, {})[n] = summary
    tables = {}
    for world in all_worlds:
        for stat in ("median", "min"):
            tables[f"world {world} ({stat})"] = render_world_table(
                world, saves.get(world, {}), restores_by_world.get(world, {}), stat
            )
    checks = target_checks(args.worlds, pairs, saves, restores)
    infos = info_ratios(args.worlds, pairs, saves, restores)
    notes = [
        f"{len(shapes)} float32 tensors, {total} bytes ({total / GIB:.3f} GiB) in all, sharded "
        "Shard(0) over each world size; times in seconds; per rank: median of "
        f"{args.repeats}; slowest rank: the median (or min) over repeats of the slowest "
        "rank's time in each repeat; x memcpy = over the slowest rank's np.copyto of its own "
        "bytes into pre-faulted memory (the 'from world' rows: measured in that launch)",
        f"every save method makes {WARMUP_SAVES} untimed warm-up saves; every restore is "
        "made once untimed first (and verified bit-exact); those times are in the JSON",
        f"this machine has {cpu_count()} CPUs: world sizes above that oversubscribe them "
        "(every rank's copy threads share the same cores)",
    ]
    for key, result in launches.items():
        if not result["error"]:
            for note in result["ranks"][0].get("notes", []):
                notes.append(f"{key}: {note}")

    for name, table in tables.items():
        if name.endswith("(median)"):
            print(f"\n{name.removesuffix(' (median)')} ranks, median of {args.repeats}:")
            print(table)
    print("\ntargets (issue 3, medians, slowest rank):")
    for check in checks:
        shown = "n/a" if check["value"] is None else f"{check['value']:.2f}"
        print(f"  {check['verdict']:4}  {check['name']}: {shown} (target {check['target']})")
    print("\nother ratios (medians, slowest rank):")
    for name, value in infos.items():
        print(f"  {name}: {'n/a' if value is None else f'{value:.2f}'}")
    print()
    for note in notes:
        print("note: " + note)

    report = {
        "benchmark": "ranks",
        "date": started.isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "machine": machine_info(),
        "params": {
            "size_gib": args.size_gib,
            "bytes": total,
            "tensors": len(shapes),
            "tensors_requested": args.tensors,
            "shapes": shapes,
            "worlds": args.worlds,
            "reshard_pairs": pairs,
            "repeats": args.repeats,
            "warmup_saves": WARMUP_SAVES,
            "memory_root": str(memory_base),
            "local_root": str(local_base),
            "methods": args.method_list,
        },
        "launches": launches,
        "summary": {
            "saves": {str(n): s for n, s in saves.items()},
            "reshard": {f"{n}->{m}": s for (n, m), s in restores.items()},
        },
        "targets": checks,
        "ratios": infos,
        "tables": tables,
        "notes": notes,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")

    must_work = ("memcpy", "mtckpt", "reshard")
    fatal = [key for key, result in launches.items()
             if result["error"] and key.split("/")[-1].split("-")[0] in must_work]  # fmt: skip
    if fatal:
        print(f"FAILED: {', '.join(fatal)} (these must work)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
