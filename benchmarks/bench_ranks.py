#!/usr/bin/env python
"""Multi-rank save/restore benchmark: mtckpt next to DCP save / async_save / load and a plain
memcpy, on 2 and 4 gloo ranks holding the same global state, and restore with resharding.

mtckpt runs twice: with the default ``staging="blocking"`` and with ``staging="async"``
(``mtckpt_async``: save() returns once the copy into node memory is started; the saved
tensors may change only after ``h.wait("staged")``).

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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _harness import (
    GIB,
    Rank,
    RankRecorder,
    add_common_args,
    aggregate_ranks,
    build_shard,
    check_shard,
    clean_up,
    cpu_count,
    current_rss,
    fig,
    launch_ranks,
    make_fresh_dir,
    parse_methods,
    peak_rss,
    print_results,
    rank_table,
    ratio,
    run_rank_worker,
    save_changed_once_staged,
    sharded_shapes,
    target_check,
    timed,
    write_report,
)

METHODS = ("memcpy", "mtckpt", "mtckpt_async", "dcp_async", "dcp")
WORKER_MODES = (*METHODS, "reshard")
RUN = "bench"
WARMUP_SAVES = 2  # as in bench_save_restore.py: mtckpt reaches its steady state after two
COLLECTIVE_TIMEOUT_S = 600

# The targets (issue 3, "Targets (benchmark, same run)").
TARGET_BLOCKING_X_MEMCPY = 1.3
TARGET_RESHARD_X_MEMCPY = 4.0
TARGET_X_FASTER_THAN_DCP = 5.0

# --------------------------------------------------------------------------------------
# worker side: one rank (the sharded state and the Rank context are in _harness.py)


def check_step(got, expected: int, where: str) -> None:
    if got != expected:
        raise AssertionError(f"{where}: restored step {got}, expected {expected}")


def worker_memcpy(args, ctx: Rank, rec: RankRecorder, arrays) -> None:
    """The baseline: np.copyto of this rank's bytes into pre-faulted memory, all ranks at once."""
    import mtckpt._native as native

    destinations = ctx.copy_baseline(arrays, rec, "numpy_copyto", args.repeats)
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


def mtckpt_manager(memory_root: str, local_root: str, staging: str = "blocking"):
    import mtckpt

    return mtckpt.CheckpointManager(
        RUN,
        mtckpt.MemoryTier(memory_root, keep=2),
        mtckpt.LocalTier(local_root, keep=2),
        staging=staging,
    )


def worker_mtckpt(args, ctx: Rank, rec: RankRecorder, arrays, staging: str = "blocking") -> None:
    """Warm-up and timed saves: blocking (until save() returns), staged (until the tensors
    may change: the same with staging="blocking", so recorded for "async" only), durable in
    memory and on disk; then restores on the same world (timed for "blocking" only: a
    restore does not depend on how the step was staged). The memcpy baseline is measured
    again in these processes first (``memcpy_here``: machines drift between launches)."""
    ctx.copy_baseline(arrays, rec, "memcpy_here", args.repeats)
    model = ctx.dtensors(arrays)
    mgr = mtckpt_manager(args.world_memory_root, args.world_local_root, staging)
    rec.notes.append(f"mtckpt threads per rank {mgr.threads}, staging={staging!r}")
    last = WARMUP_SAVES + args.repeats
    returned_early = 0
    for index in range(last):
        step = index + 1
        ctx.barrier()
        t0 = time.perf_counter()
        handle = mgr.save(step, {"model": model, "step": step})
        t1 = time.perf_counter()
        returned_early += not handle.done("staged")
        handle.wait("staged")
        t2 = time.perf_counter()
        handle.wait("memory")
        t3 = time.perf_counter()
        handle.wait("local")
        t4 = time.perf_counter()
        mgr.wait()  # garbage collection and the spare slot: each save starts steady
        warmup = index < WARMUP_SAVES
        rec.add("blocking", t1 - t0, warmup)
        if staging != "blocking":
            rec.add("staged", t2 - t0, warmup)
        rec.add("memory_durable", t3 - t0, warmup)
        rec.add("local_durable", t4 - t0, warmup)
    rec.rss["after_save_phase_peak"] = peak_rss()
    if staging != "blocking":
        rec.notes.append(f"save() returned before the copy was done in {returned_early} of "
                         f"{last} saves (rank {ctx.rank})")  # fmt: skip
        last += 1
        save_changed_once_staged(mgr, last, {"model": model, "step": last}, arrays)

    targets = ctx.zero_targets()
    target = {"model": targets, "step": 0}
    where = f"mtckpt (staging={staging}) restore (same world)"
    seconds, (step, restored) = ctx.timed_after_barrier(mgr.restore, target)
    rec.add("restore_same_world" if staging == "blocking" else "restore_check", seconds, True)
    check_step(step, last, where)
    check_step(restored["step"], last, where)
    if any(restored["model"][k] is not targets[k] for k in targets):
        raise AssertionError(f"{where} did not fill the targets in place")
    check_shard(targets, ctx.shapes, ctx.world, ctx.rank, where)
    if staging == "blocking":
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
    "mtckpt_async": lambda *a: worker_mtckpt(*a, staging="async"),
    "dcp_async": worker_dcp_async,
    "dcp": worker_dcp,
    "reshard": worker_reshard,
}


def run_rank(args) -> int:
    """The ``--worker MODE`` entry of one rank: build its shard, run, print one JSON line."""

    def body(rec: RankRecorder) -> None:
        import torch  # noqa: F401  (before the RSS baseline, so the baseline counts it)

        import mtckpt  # noqa: F401

        shapes = [(n, tuple(s)) for n, s in json.loads(args.shapes_json)]
        ctx = Rank(shapes, COLLECTIVE_TIMEOUT_S)
        t0 = time.perf_counter()
        arrays = build_shard(shapes, ctx.world, ctx.rank)
        rec.nbytes = sum(a.nbytes for a in arrays.values())
        rec.notes.append(f"shard built in {time.perf_counter() - t0:.1f} s")
        rec.rss["baseline"] = current_rss()
        WORKERS[args.worker](args, ctx, rec, arrays)
        ctx.barrier()
        ctx.dist.destroy_process_group()

    return run_rank_worker(args.worker, body)


# --------------------------------------------------------------------------------------
# the parent: launch the worlds, aggregate over ranks, print, write JSON

FIRST_RESTORES = ("restore_same_world", "mtckpt_restore", "mtckpt_restore_local", "dcp_load")
ASYNC_CAVEAT = ("staging='async': the training thread is held until save() returns; the "
                "tensors may be modified only after h.wait('staged')")  # fmt: skip


def aggregate(launch: dict) -> dict:
    return aggregate_ranks(launch, FIRST_RESTORES)


def reshard_pairs(worlds: list[int]) -> list[tuple[int, int]]:
    if len(worlds) == 1:
        n = worlds[0]
        return [(n, n // 2 if n > 1 else 2)]
    return [(n, m) for n in worlds for m in worlds if n != m]


def render_world_table(world, saves: dict, restores: dict, stat: str) -> str:
    """One world size: its save-phase methods and the restores it made of other worlds."""
    memcpy, mt, mta = saves.get("memcpy", {}), saves.get("mtckpt"), saves.get("mtckpt_async")
    base = fig(memcpy, "numpy_copyto", stat)
    rows = [  # (label, summary, metric, baseline)
        ("memcpy (np.copyto)", memcpy, "numpy_copyto", base),
        ("memcpy (native copy_many)", memcpy, "native_copy_many", base),
        ("memcpy (np.copyto) in the mtckpt launch", mt, "memcpy_here", base),
        ("mtckpt save: blocking", mt, "blocking", base),
        ("mtckpt save: memory durable", mt, "memory_durable", base),
        ("mtckpt save: local durable", mt, "local_durable", base),
        ("mtckpt restore, same world (memory, in place)", mt, "restore_same_world", base),
        ("memcpy (np.copyto) in the mtckpt_async launch", mta, "memcpy_here", base),
        ("mtckpt_async save: blocking (save() returns)", mta, "blocking", base),
        ("mtckpt_async save: staged (tensors writable)", mta, "staged", base),
        ("mtckpt_async save: memory durable", mta, "memory_durable", base),
        ("mtckpt_async save: local durable", mta, "local_durable", base),
        ("dcp.async_save: blocking", saves.get("dcp_async"), "blocking", base),
        ("dcp.async_save: durable", saves.get("dcp_async"), "local_durable", base),
        ("dcp.save (blocking = durable)", saves.get("dcp"), "blocking", base),
        ("dcp.load, same world", saves.get("dcp") or saves.get("dcp_async"),
         "restore_same_world", base),
    ]  # fmt: skip
    for source, summary in sorted(restores.items()):
        rbase = fig(summary, "numpy_copyto", stat)
        rows += [(f"from world {source}: memcpy (np.copyto)", summary, "numpy_copyto", rbase),
                 (f"from world {source}: mtckpt restore (memory)", summary, "mtckpt_restore",
                  rbase),
                 (f"from world {source}: mtckpt restore (local tier alone)", summary,
                  "mtckpt_restore_local", rbase),
                 (f"from world {source}: dcp.load", summary, "dcp_load", rbase)]  # fmt: skip
    return rank_table(world, rows, stat)


def target_checks(worlds, pairs, saves, restores) -> list[dict]:
    """The issue's targets, each with its value and PASS / FAIL (n/a where a side is missing).
    The blocking targets are checked for both staging modes."""
    checks = []
    for n in worlds:
        s = saves[n]
        memcpy = fig(s.get("memcpy"), "numpy_copyto")
        dcp_blocking = fig(s.get("dcp_async"), "blocking")
        blocking = fig(s.get("mtckpt"), "blocking")
        async_blocking = fig(s.get("mtckpt_async"), "blocking")
        staged = fig(s.get("mtckpt_async"), "staged")
        staged_note = "" if staged is None else f" (staged: {staged:.3f} s)"
        checks += [
            target_check(f"world {n}: mtckpt blocking / memcpy of the rank's bytes",
                         ratio(blocking, memcpy), TARGET_BLOCKING_X_MEMCPY, "max",
                         "staging='blocking' (the default); slowest rank, median of repeats"),
            target_check(f"world {n}: mtckpt_async blocking (save() return) / memcpy of the "
                         "rank's bytes", ratio(async_blocking, memcpy), TARGET_BLOCKING_X_MEMCPY,
                         "max", ASYNC_CAVEAT + staged_note),
            target_check(f"world {n}: dcp.async_save blocking / mtckpt blocking",
                         ratio(dcp_blocking, blocking), TARGET_X_FASTER_THAN_DCP, "min",
                         "staging='blocking'; how many times faster mtckpt is"),
            target_check(f"world {n}: dcp.async_save blocking / mtckpt_async blocking (save() "
                         "return)", ratio(dcp_blocking, async_blocking), TARGET_X_FASTER_THAN_DCP,
                         "min", ASYNC_CAVEAT + staged_note),
        ]  # fmt: skip
    for n, m in pairs:
        r = restores.get((n, m), {})
        restore = fig(r, "mtckpt_restore")
        checks += [
            target_check(f"{n} -> {m} ranks: mtckpt restore with resharding / memcpy",
                         ratio(restore, fig(r, "numpy_copyto")), TARGET_RESHARD_X_MEMCPY, "max",
                         "memcpy of the restoring rank's bytes, same launch"),
            target_check(f"{n} -> {m} ranks: dcp.load / mtckpt restore (both resharding)",
                         ratio(fig(r, "dcp_load"), restore), TARGET_X_FASTER_THAN_DCP, "min",
                         "how many times faster mtckpt is"),
        ]  # fmt: skip
    return checks


def info_ratios(worlds, pairs, saves, restores) -> dict[str, float | None]:
    """Further comparisons, no target attached."""
    out = {}
    for n in worlds:
        s = saves[n]
        mt, mta = s.get("mtckpt"), s.get("mtckpt_async")
        base = fig(s.get("memcpy"), "numpy_copyto")
        out[f"world {n}: mtckpt blocking / native copy_many"] = ratio(
            fig(mt, "blocking"), fig(s.get("memcpy"), "native_copy_many"))  # fmt: skip
        out[f"world {n}: mtckpt blocking / memcpy in the mtckpt launch"] = ratio(
            fig(mt, "blocking"), fig(mt, "memcpy_here"))  # fmt: skip
        out[f"world {n}: mtckpt memory durable / memcpy"] = ratio(fig(mt, "memory_durable"), base)
        out[f"world {n}: mtckpt restore (same world) / memcpy"] = ratio(
            fig(mt, "restore_same_world"), base)  # fmt: skip
        for metric in ("blocking", "staged"):
            out[f"world {n}: mtckpt_async {metric} / memcpy in the mtckpt_async launch"] = ratio(
                fig(mta, metric), fig(mta, "memcpy_here"))  # fmt: skip
        out[f"world {n}: mtckpt_async staged / memcpy"] = ratio(fig(mta, "staged"), base)
        out[f"world {n}: mtckpt_async memory durable / memcpy"] = ratio(
            fig(mta, "memory_durable"), base)  # fmt: skip
        out[f"world {n}: dcp.async_save blocking / mtckpt_async staged"] = ratio(
            fig(s.get("dcp_async"), "blocking"), fig(mta, "staged"))  # fmt: skip
        dcp_load = fig(s.get("dcp") or s.get("dcp_async"), "restore_same_world")
        out[f"world {n}: dcp.load / mtckpt restore (same world)"] = ratio(
            dcp_load, fig(mt, "restore_same_world"))  # fmt: skip
        for label, summary in (("mtckpt", mt), ("mtckpt_async", mta)):
            out[f"world {n}: dcp.async_save durable / {label} local durable"] = ratio(
                fig(s.get("dcp_async"), "local_durable"), fig(summary, "local_durable")
            )
            out[f"world {n}: dcp.save / {label} local durable"] = ratio(
                fig(s.get("dcp"), "blocking"), fig(summary, "local_durable"))  # fmt: skip
    for n, m in pairs:
        r = restores.get((n, m), {})
        out[f"{n} -> {m} ranks: mtckpt restore (local tier alone) / memcpy"] = ratio(
            fig(r, "mtckpt_restore_local"), fig(r, "numpy_copyto"))  # fmt: skip
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, METHODS, "bench-out/ranks.json", "s", "the DCP files")
    parser.add_argument("--ranks", default="2,4", help="comma list of world sizes (2,4)")
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
    args.method_list = parse_methods(parser, args.methods, METHODS)
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
    common = ["--shapes-json", json.dumps(shapes), "--repeats", str(args.repeats)]
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
                "memory_async": memory_base / f"async-world-{n}",
                "local_async": local_base / f"async-world-{n}",
                "dcp": local_base / f"dcp-world-{n}",
                "dcp_async": local_base / f"dcp_async-world-{n}"}  # fmt: skip

    def launch(world: int, mode: str, extra: list[str], label: str) -> dict:
        return launch_ranks(script, world, ["--worker", mode, *common, *extra], label)

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
                suffix = "_async" if method == "mtckpt_async" else ""
                extra = ["--world-memory-root", str(dirs["memory" + suffix]),
                         "--world-local-root", str(dirs["local" + suffix])]  # fmt: skip
                if method in ("dcp", "dcp_async"):
                    dirs[method].mkdir(parents=True)
                    extra = ["--dcp-dir", str(dirs[method])]
                result = launch(n, method, extra, f"{method}, world {n}")
                launches[f"world-{n}/{method}"] = result
                saves[n][method] = aggregate(result)
                if not result["error"] and "last_step" in result["ranks"][0]["extra"]:
                    last_steps[n][method] = result["ranks"][0]["extra"]["last_step"]
                if method == "mtckpt_async":  # no other world restores these: free them now
                    for key in ("memory_async", "local_async"):
                        shutil.rmtree(dirs[key], ignore_errors=True)
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
        "mtckpt_async = staging='async' (separate roots): its blocking is until save() "
        "returns, the time the training thread is held; the tensors may be modified only "
        "after h.wait('staged') (its 'staged' row); one more, untimed save modifies them right "
        "after 'staged' and its restore is verified bit-exact",
        f"this machine has {cpu_count()} CPUs: world sizes above that oversubscribe them "
        "(every rank's copy threads share the same cores)",
    ]
    for key, result in launches.items():
        if not result["error"]:
            for note in result["ranks"][0].get("notes", []):
                notes.append(f"{key}: {note}")

    print_results(
        {k.removesuffix(" (median)") + f" ranks, median of {args.repeats}": t
         for k, t in tables.items() if k.endswith("(median)")},
        ("targets (issue 3, medians, slowest rank)", checks),
        ("other ratios (medians, slowest rank)", infos),
        notes,
    )  # fmt: skip
    write_report(args.out, "ranks", started, {
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
    })  # fmt: skip

    must_work = ("memcpy", "mtckpt", "mtckpt_async", "reshard")
    fatal = [key for key, result in launches.items()
             if result["error"] and key.split("/")[-1].split("-")[0] in must_work]  # fmt: skip
    if fatal:
        print(f"FAILED: {', '.join(fatal)} (these must work)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
