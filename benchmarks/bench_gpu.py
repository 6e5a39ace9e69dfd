#!/usr/bin/env python
"""CUDA staging benchmark: mtckpt saving and restoring device tensors, next to plain copies.

One workload (a transformer-like state of float32 CUDA tensors, 1 GiB in ~200 tensors by
default), one process, one run. Baselines of the same bytes measured in the same run:
``copy_`` of every tensor into one page-locked host buffer (what the slot should match),
into pageable host memory, and back (host to device); ``torch.save`` of the state into
tmpfs. mtckpt: blocking ``save()`` (returns once the device-to-host copy has landed in the
memory-tier slot), async ``save()`` (returns once the copy is enqueued) and its "staged"
time, the step committed in memory (checksummed), and a verified restore into device
tensors. The first save (slot creation and page-locking) is reported on its own.

    python benchmarks/bench_gpu.py                  # 1 GiB, 200 tensors, 5 repeats
    python benchmarks/bench_gpu.py --size-gib 4

Prints a table and writes JSON (``--out``, default ``bench-out/gpu.json``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from _harness import (
    GIB,
    SEED,
    fig,
    markdown_table,
    ratio,
    stats,
    target_check,
    workload_shapes,
    write_report,
)

import mtckpt

WARMUP_SAVES = 2


def device_state(size_bytes: int, tensors: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(SEED)
    return {
        name: torch.randn(shape, generator=gen, device="cuda")
        for name, shape in workload_shapes(size_bytes, tensors)
    }


def host_views(buffer: torch.Tensor, state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    views, offset = [], 0
    for value in state.values():
        nbytes = value.numel() * value.element_size()
        views.append(buffer[offset : offset + nbytes].view(value.dtype).view(value.shape))
        offset += nbytes
    return views


def timed_sync(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    for d, s in zip(dst, src, strict=True):
        d.copy_(s, non_blocking=True)


def run(args) -> dict:
    size = int(args.size_gib * GIB)
    state = device_state(size, args.tensors)
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    tensors = list(state.values())
    timings: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        timings.setdefault(name, []).append(seconds)

    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.ones(nbytes, dtype=torch.uint8)  # pages touched before timing
    pinned_views, pageable_views = host_views(pinned, state), host_views(pageable, state)
    for i in range(args.repeats + 1):
        for name, views in (("pinned", pinned_views), ("pageable", pageable_views)):
            d2h = timed_sync(lambda views=views: copy_all(views, tensors))
            h2d = timed_sync(lambda views=views: copy_all(tensors, views))
            if i:  # the first round warms up
                record(f"d2h_{name}", d2h)
                record(f"h2d_{name}", h2d)
    cudart = torch.cuda.cudart()
    for _ in range(2):
        t0 = time.perf_counter()
        torch.cuda.check_error(cudart.cudaHostRegister(pageable.data_ptr(), nbytes, 1))
        record("page_lock", time.perf_counter() - t0)
        torch.cuda.check_error(cudart.cudaHostUnregister(pageable.data_ptr()))
    del pinned, pageable, pinned_views, pageable_views

    scratch = Path(tempfile.mkdtemp(prefix="mtckpt-bench-gpu-", dir=args.memory_root))
    try:
        for _ in range(args.repeats):
            path = scratch / "torch_save.pt"
            record("torch_save", timed_sync(lambda path=path: torch.save(state, path)))
            path.unlink()

        targets = {key: torch.zeros_like(value) for key, value in state.items()}
        warmup_saves = []
        for staging in ("blocking", "async"):
            root = scratch / staging
            with mtckpt.CheckpointManager(f"bench-{staging}", mtckpt.MemoryTier(str(root)),
                                          staging=staging) as mgr:  # fmt: skip
                for step in range(1, WARMUP_SAVES + args.repeats + 1):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    h = mgr.save(step, state)
                    returned = time.perf_counter() - t0
                    h.wait("staged")
                    staged = time.perf_counter() - t0
                    h.wait("memory")
                    committed = time.perf_counter() - t0
                    if step <= WARMUP_SAVES and staging == "blocking":
                        warmup_saves.append(returned)
                    if step > WARMUP_SAVES:
                        record(f"mtckpt_{staging}_save_returns", returned)
                        record(f"mtckpt_{staging}_staged", staged)
                        record(f"mtckpt_{staging}_in_memory", committed)
                if staging == "blocking":
                    mgr.restore(targets)  # warm-up
                    for _ in range(args.repeats):
                        record("mtckpt_restore", timed_sync(lambda: mgr.restore(targets)))
                    for key, value in state.items():
                        if not torch.equal(targets[key], value):
                            raise AssertionError(f"restored {key!r} differs from the saved one")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"bytes": nbytes, "timings": timings, "warmup_saves_s": warmup_saves}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="state size (1.0)")
    parser.add_argument("--tensors", type=int, default=200, help="about this many tensors (200)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; median (5)")
    parser.add_argument("--memory-root", default="/dev/shm", help="tmpfs directory (/dev/shm)")
    parser.add_argument("--out", default="bench-out/gpu.json", help="JSON output path")
    args = parser.parse_args(argv)
    started = _dt.datetime.now(_dt.timezone.utc)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device", file=sys.stderr)
        return 1
    result = run(args)
    nbytes = result["bytes"]
    summary = {name: stats(values, nbytes) for name, values in result["timings"].items()}
    rows = [[name, f"{s['median'] * 1e3:.1f}", f"{s['min'] * 1e3:.1f}",
             f"{s['gib_per_s_median']:.2f}"] for name, s in summary.items()]  # fmt: skip
    print(f"{nbytes / GIB:.2f} GiB in {args.tensors} tensors on {torch.cuda.get_device_name()}")
    print(markdown_table(["what", "median ms", "min ms", "GiB/s (median)"], rows))
    first, *later = result["warmup_saves_s"]
    print(
        f"first blocking save (slot created and page-locked): {first:.3f} s; "
        f"then {', '.join(f'{s:.3f}' for s in later)} s (spare slots locked in the background)"
    )

    def med(name):
        return fig(summary, name)

    checks = [
        target_check("blocking save / pinned copy_ (D2H)",
                     ratio(med("mtckpt_blocking_save_returns"), med("d2h_pinned")), 1.2, "max",
                     "save() of device tensors costs about one page-locked device-to-host copy"),
        target_check("async save() return / pinned copy_",
                     ratio(med("mtckpt_async_save_returns"), med("d2h_pinned")), 0.2, "max",
                     "async save() only enqueues the copy"),
        target_check("restore into device tensors / pageable copy_ (H2D)",
                     ratio(med("mtckpt_restore"), med("h2d_pageable")), 1.0, "max",
                     "a verified restore from node memory beats an unverified copy_ from "
                     "host memory (what loading a host checkpoint onto the GPU costs)"),
    ]  # fmt: skip
    print(
        f"restore / page-locked copy_ (H2D): "
        f"{ratio(med('mtckpt_restore'), med('h2d_pinned')):.2f} (the copy alone)"
    )
    for check in checks:
        value = "n/a" if check["value"] is None else f"{check['value']:.2f}"
        print(f"{check['verdict']:4}  {check['name']}: {value} (target {check['target']})")
    write_report(args.out, "gpu", started, {
        "args": vars(args), "device": torch.cuda.get_device_name(),
        "summary": summary, "warmup_saves_s": result["warmup_saves_s"], "checks": checks,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
