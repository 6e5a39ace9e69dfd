#!/usr/bin/env python
"""JAX save/restore benchmark: mtckpt next to Orbax's StandardCheckpointer (async) and a
plain memcpy, on one pytree of sharded jax.Arrays.

The workload is the save/restore benchmark's (float32 arrays, 1 GiB in ~200 arrays by
default) as ``jax.Array``s on 8 CPU devices in a 4 x 2 ("data", "model") mesh: arrays whose
rows divide by 4 are split along "data" and replicated along "model", the rest replicated
everywhere (each distinct shard is written once by both libraries). Each method runs in its
own subprocess. Reported: the time the training thread is blocked, until the checkpoint is
durable in memory and on local disk (Orbax: ``wait_until_finished``), and restore times
into an abstract target of the same shardings (new arrays), from memory and from local
disk (warm, and cold after evicting the page cache). Every figure sits next to the
plain-memcpy baseline of the same run.

    python benchmarks/bench_jax.py                                    # 1 GiB, 3 repeats
    python benchmarks/bench_jax.py --size-gib 0.05 --tensors 20 --repeats 1   # smoke

Prints a table and writes JSON (``--out``, default ``bench-out/jax.json``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _harness import (
    GIB,
    Recorder,
    add_common_args,
    clean_up,
    evict_page_cache,
    fig,
    make_fresh_dir,
    markdown_table,
    parse_methods,
    prefaulted_like,
    print_results,
    ratio,
    run_methods,
    run_worker_here,
    summarise,
    target_check,
    timed,
    write_report,
)

METHODS = ("memcpy", "mtckpt", "mtckpt_async", "orbax")
RUN = "bench"
WARMUP_SAVES = 2
DEVICES = 8


def jax_state(arrays: dict[str, np.ndarray]) -> dict:
    """The numpy arrays as jax.Arrays on the mesh; the numpy copies are dropped."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if jax.default_backend() == "cpu":
        mesh, rows = jax.make_mesh((4, 2), ("data", "model")), 4
    else:  # every accelerator of the machine along "data"
        rows = len(jax.devices())
        mesh = jax.make_mesh((rows,), ("data",))
    state = {}
    for name in list(arrays):
        value = arrays.pop(name)
        spec = P("data") if value.shape[0] % rows == 0 else P()
        state[name] = jax.device_put(value, NamedSharding(mesh, spec))
        state[name].block_until_ready()
    return state


def abstract(state: dict) -> dict:
    import mtckpt.jax

    return mtckpt.jax.abstract(state)


def check(restored: dict, state: dict, where: str) -> None:
    import jax

    for name, value in state.items():
        got = restored[name]
        if not isinstance(got, jax.Array) or got.sharding != value.sharding:
            raise AssertionError(f"{where}: {name} is not a jax.Array of the saved sharding")
        for mine, saved in zip(got.addressable_shards, value.addressable_shards, strict=True):
            if not np.array_equal(np.asarray(mine.data), np.asarray(saved.data)):
                raise AssertionError(f"{where}: {name} differs from what was saved")


def save_phase(rec: Recorder, repeats: int, save) -> int:
    for index in range(WARMUP_SAVES + repeats):
        for metric, seconds in save(index + 1).items():
            rec.add(metric, seconds, warmup=index < WARMUP_SAVES)
    return WARMUP_SAVES + repeats


def restores(rec: Recorder, repeats: int, metric: str, restore, state, root=None) -> None:
    """One untimed, checked restore, then the timed ones (``root``: evict it first)."""
    check(restore(), state, metric)
    for _ in range(repeats):
        if root is not None:
            evict_page_cache(root)
        seconds, restored = timed(restore)
        rec.add(metric, seconds)
        del restored


def worker_memcpy(args, arrays, rec: Recorder) -> None:
    destinations = prefaulted_like(arrays)

    def copy():
        for name, src in arrays.items():
            np.copyto(destinations[name], src)

    rec.add("numpy_copyto", timed(copy)[0], warmup=True)
    for _ in range(args.repeats):
        rec.add("numpy_copyto", timed(copy)[0])

    path = Path(args.local_root) / "plain.bin"

    def write_and_fsync():  # what any durable copy on this disk costs at least
        with open(path, "wb") as f:
            for value in arrays.values():
                f.write(memoryview(value).cast("B"))
            f.flush()
            os.fsync(f.fileno())

    for index in range(WARMUP_SAVES + args.repeats):
        path.unlink(missing_ok=True)
        rec.add("write_fsync", timed(write_and_fsync)[0], warmup=index < WARMUP_SAVES)
    path.unlink(missing_ok=True)
    destinations.clear()  # the host copies go before the state moves to the devices
    if args.platform != "cpu":
        device_to_host(args, jax_state(arrays), rec)


def device_to_host(args, state: dict, rec: Recorder) -> None:
    """Accelerator baselines: the state's bytes to new host arrays (``jax.device_get``:
    pageable memory) and to page-locked host memory (``jax.device_put`` to the
    ``pinned_host`` memory kind), each waited for."""
    import jax

    def pinned(value):
        return value.sharding.with_memory_kind("pinned_host")

    def to_pinned() -> None:
        jax.block_until_ready(jax.device_put(state, jax.tree.map(pinned, state)))

    def fresh():  # a jax.Array keeps the host copy device_get made: time new arrays
        return jax.block_until_ready(jax.tree.map(lambda value: value.copy(), state))

    for index in range(WARMUP_SAVES + args.repeats):
        rec.add("device_get", timed(functools.partial(jax.device_get, fresh()))[0],
                warmup=index < WARMUP_SAVES)  # fmt: skip
        rec.add("d2h_pinned", timed(to_pinned)[0], warmup=index < WARMUP_SAVES)


def worker_mtckpt(args, arrays, rec: Recorder, staging: str = "blocking") -> None:
    import mtckpt

    state = jax_state(arrays)
    local_root = Path(args.local_root) / "tier"
    mgr = mtckpt.CheckpointManager(
        RUN,
        mtckpt.MemoryTier(str(Path(args.memory_root) / "tier"), keep=2),
        mtckpt.LocalTier(str(local_root), keep=2),
        staging=staging,
    )
    rec.notes.append(f"threads {mgr.threads}, staging={staging!r}")

    def save(step: int) -> dict:
        t0 = time.perf_counter()
        handle = mgr.save(step, state)
        t1 = time.perf_counter()
        handle.wait("staged")
        t2 = time.perf_counter()
        handle.wait("memory")
        t3 = time.perf_counter()
        handle.wait("local")
        t4 = time.perf_counter()
        mgr.wait()
        return {"blocking": t1 - t0, "staged": t2 - t0, "memory_durable": t3 - t0,
                "local_durable": t4 - t0}  # fmt: skip

    last = save_phase(rec, args.repeats, save)
    target = abstract(state)
    restores(rec, args.repeats, "restore_memory", lambda: mgr.restore(target)[1], state)
    mgr.close()
    local = mtckpt.CheckpointManager(
        RUN,
        mtckpt.MemoryTier(str(Path(args.memory_root) / "empty")),
        mtckpt.LocalTier(str(local_root), keep=2),
    )
    if local.steps()["memory"] or last not in local.steps()["local"]:
        raise AssertionError(f"the second manager sees {local.steps()}")
    restores(rec, args.repeats, "restore_local_warm", lambda: local.restore(target)[1], state)
    cold = lambda: local.restore(target)[1]  # noqa: E731
    restores(rec, args.repeats, "restore_local_cold", cold, state, local_root)
    local.close()


def worker_mtckpt_async(args, arrays, rec: Recorder) -> None:
    worker_mtckpt(args, arrays, rec, staging="async")


def worker_orbax(args, arrays, rec: Recorder) -> None:
    import orbax.checkpoint as ocp

    state = jax_state(arrays)
    root = Path(args.local_root) / "orbax"
    root.mkdir()
    checkpointer = ocp.StandardCheckpointer()
    rec.notes.append(f"orbax-checkpoint {ocp.__version__}, StandardCheckpointer (async)")

    def save(step: int) -> dict:
        previous = root / f"step-{step - 1}"
        if previous.exists():
            shutil.rmtree(previous)  # one checkpoint on disk at a time, as mtckpt keeps
        t0 = time.perf_counter()
        checkpointer.save(root / f"step-{step}", state)
        t1 = time.perf_counter()
        checkpointer.wait_until_finished()
        t2 = time.perf_counter()
        return {"blocking": t1 - t0, "local_durable": t2 - t0}

    last = save_phase(rec, args.repeats, save)
    target = abstract(state)
    path = root / f"step-{last}"
    restore = lambda: checkpointer.restore(path, target)  # noqa: E731
    restores(rec, args.repeats, "restore_local_warm", restore, state)
    restores(rec, args.repeats, "restore_local_cold", restore, state, path)
    checkpointer.close()


WORKERS = {"memcpy": worker_memcpy, "mtckpt": worker_mtckpt,
           "mtckpt_async": worker_mtckpt_async, "orbax": worker_orbax}  # fmt: skip
COLUMNS = [
    ("blocking", "blocking"), ("staged", "staged"), ("mem durable", "memory_durable"),
    ("local durable", "local_durable"), ("rst mem", "restore_memory"),
    ("rst disk warm", "restore_local_warm"), ("rst disk cold", "restore_local_cold"),
]  # fmt: skip


def render_table(results, summary, stat: str) -> str:
    rows = []
    for method in METHODS:
        if method == "memcpy" or method not in results:
            continue
        if results[method].get("error"):
            rows.append([method, "FAILED: " + results[method]["error"][:80]] + [""] * 7)
            continue
        cells = [fig(summary.get(method), metric, stat) for _, metric in COLUMNS]
        rows.append([method] + ["-" if c is None else f"{c:.3f}" for c in cells])
    baseline = fig(summary.get("memcpy"), "numpy_copyto", stat)
    if baseline is not None:
        rows.append(["np.copyto (baseline)", f"{baseline:.3f}"] + ["-"] * 6)
    written = fig(summary.get("memcpy"), "write_fsync", stat)
    if written is not None:
        rows.append(["file write + fsync (baseline)", "-", "-", "-", f"{written:.3f}"] + ["-"] * 3)
    for label, metric in (("jax.device_get (baseline)", "device_get"),
                          ("device_put to pinned_host (baseline)", "d2h_pinned")):  # fmt: skip
        copied = fig(summary.get("memcpy"), metric, stat)
        if copied is not None:
            rows.append([label, f"{copied:.3f}"] + ["-"] * 6)
    return markdown_table(["method"] + [h for h, _ in COLUMNS], rows)


def comparisons(summary) -> tuple[list[dict], dict]:
    mt, mta, orbax = (summary.get(m) for m in ("mtckpt", "mtckpt_async", "orbax"))
    copy = fig(summary.get("memcpy"), "numpy_copyto")
    local = ratio(fig(orbax, "local_durable"), fig(mt, "local_durable"))
    warm = ratio(fig(orbax, "restore_local_warm"), fig(mt, "restore_local_warm"))
    cold = ratio(fig(orbax, "restore_local_cold"), fig(mt, "restore_local_cold"))
    memory = ratio(fig(orbax, "restore_local_warm"), fig(mt, "restore_memory"))
    checks = [
        target_check("Orbax time to durable local copy / mtckpt's", local, 5, "min",
                     "mtckpt at least 5x faster to a durable copy on local disk"),
        target_check("Orbax restore (disk, warm) / mtckpt restore (memory)", memory, 5, "min",
                     "mtckpt's restore after a trainer restart (from node memory) vs Orbax's"),
        target_check("Orbax restore (disk, warm) / mtckpt restore (disk, warm)", warm, 5, "min",
                     "both from local disk, files in the page cache"),
        target_check("Orbax restore (disk, cold) / mtckpt restore (disk, cold)", cold, 5, "min",
                     "both from local disk, page cache evicted"),
    ]  # fmt: skip
    ratios = {
        "mtckpt blocking / np.copyto": ratio(fig(mt, "blocking"), copy),
        "mtckpt_async blocking / np.copyto": ratio(fig(mta, "blocking"), copy),
        "mtckpt blocking / Orbax blocking": ratio(fig(mt, "blocking"), fig(orbax, "blocking")),
        "mtckpt_async blocking / Orbax blocking": ratio(fig(mta, "blocking"),
                                                        fig(orbax, "blocking")),
        "mtckpt memory durable / np.copyto": ratio(fig(mt, "memory_durable"), copy),
        "mtckpt local durable / file write + fsync": ratio(
            fig(mt, "local_durable"), fig(summary.get("memcpy"), "write_fsync")),
        "Orbax local durable / file write + fsync": ratio(
            fig(orbax, "local_durable"), fig(summary.get("memcpy"), "write_fsync")),
        "mtckpt restore (memory) / np.copyto": ratio(fig(mt, "restore_memory"), copy),
    }  # fmt: skip
    pinned = fig(summary.get("memcpy"), "d2h_pinned")
    if pinned is not None:  # on an accelerator: staging against the bare copy to the host
        ratios |= {
            "mtckpt blocking / device_put to pinned_host": ratio(fig(mt, "blocking"), pinned),
            "mtckpt staged / device_put to pinned_host": ratio(fig(mt, "staged"), pinned),
            "mtckpt_async blocking / device_put to pinned_host": ratio(fig(mta, "blocking"),
                                                                       pinned),
            "jax.device_get / device_put to pinned_host": ratio(
                fig(summary.get("memcpy"), "device_get"), pinned),
            "Orbax blocking / device_put to pinned_host": ratio(fig(orbax, "blocking"), pinned),
        }  # fmt: skip
    return checks, ratios


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, METHODS, "bench-out/jax.json", "", "Orbax's checkpoints")
    parser.add_argument("--platform", choices=("cpu", "gpu"), default=None,
                        help="where the arrays live: 8 CPU devices (the default) or every "
                             "CUDA GPU of the machine")  # fmt: skip
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size_gib <= 0 or args.tensors < 1 or args.repeats < 1:
        parser.error("--size-gib must be > 0, --tensors and --repeats >= 1")
    args.method_list = parse_methods(parser, args.methods, METHODS)
    if args.platform is None:  # a worker: its parent's choice
        args.platform = "gpu" if os.environ.get("JAX_PLATFORMS") == "cuda" else "cpu"
    os.environ["JAX_PLATFORMS"] = "cuda" if args.platform == "gpu" else "cpu"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}"
        imports = ("mtckpt", "jax", "orbax.checkpoint" if args.worker == "orbax" else "mtckpt")
        size = int(args.size_gib * GIB)
        return run_worker_here(args.worker, WORKERS[args.worker], args, size, args.tensors, imports)

    created: list[Path] = []
    default_memory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    memory_base = make_fresh_dir(args.memory_root, default_memory, "mtckpt-bench-", created)
    local_base = make_fresh_dir(args.local_root, tempfile.gettempdir(), "mtckpt-bench-", created)
    started = _dt.datetime.now(_dt.timezone.utc)
    try:
        results = run_methods(__file__, args, memory_base, local_base)
    finally:
        clean_up(created)

    summary = summarise(results)
    checks, ratios = comparisons(summary)
    tables = {"median (s)": render_table(results, summary, "median"),
              "min (s)": render_table(results, summary, "min")}  # fmt: skip
    where = "every GPU" if args.platform == "gpu" else f"{DEVICES} CPU devices (4 x 2 mesh)"
    notes = [
        f"{args.size_gib} GiB of float32 jax.Arrays on {where}; "
        f"median / min of {args.repeats} after {WARMUP_SAVES} untimed saves",
        "mtckpt_async = staging='async': save() returns before the copy into node memory "
        "(jax arrays are immutable, so nothing has to wait for 'staged')",
        "Orbax local durable = StandardCheckpointer.save + wait_until_finished; restores build "
        "new jax.Arrays with the target's shardings in both libraries",
    ]
    for method, result in results.items():
        notes += [f"{method}: {note}" for note in result.get("notes", [])]
    print_results(tables, ("targets", checks), ("ratios (median)", ratios), notes)
    write_report(args.out, "jax", started, {"results": results, "summary": summary,
                                            "targets": checks, "ratios": ratios,
                                            "notes": notes})  # fmt: skip
    failed = [m for m, r in results.items() if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
