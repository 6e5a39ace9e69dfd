"""A quick measure of this node's tiers, turned into costs for a node's state.

memory: the bandwidth of a copy into pre-faulted memory (numpy); a save stalls for one copy
of the state, is durable after a second pass (the checksum runs at about copy speed) and
restores in two passes (read and verify). local: a temporary file written and fsynced,
then read back after asking the kernel to drop it from the page cache; saves run in the
background (no stall). peers and remote: from the link and object-store bandwidths given,
``replicas`` copies pushed over the node's link; no stall.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from .inputs import TierCost

DEFAULT_PROBE_BYTES = 256 << 20
_CHUNK = 16 << 20


@dataclass(frozen=True)
class ProbeResult:
    """The tiers measured (or computed from the bandwidths given), the bandwidths in bytes
    per second, and a note for each tier left out."""

    tiers: tuple[TierCost, ...]
    memory_copy_bps: float
    disk_write_bps: float | None
    disk_read_bps: float | None
    notes: tuple[str, ...]


def probe(
    state_bytes: float,
    *,
    local_root: str | None = None,
    link_gbps: float | None = None,
    object_gbps: float | None = None,
    replicas: int = 1,
    probe_bytes: int = DEFAULT_PROBE_BYTES,
) -> ProbeResult:
    """Measure this node (about ``probe_bytes`` of memory copy and of disk I/O under
    ``local_root``, default a temporary directory) and cost each tier for
    ``state_bytes`` per node."""
    copy_bps = memory_copy_bandwidth(probe_bytes)
    copy = state_bytes / copy_bps
    tiers = [TierCost("memory", stall_seconds=copy, durable_seconds=2 * copy,
                      restore_seconds=2 * copy)]  # fmt: skip
    notes = []
    write_bps, read_bps = disk_bandwidth(probe_bytes, local_root)
    tiers.append(TierCost("local", stall_seconds=0.0,
                          durable_seconds=2 * copy + state_bytes / write_bps,
                          restore_seconds=state_bytes / read_bps))  # fmt: skip
    if link_gbps:
        link = link_gbps * 1e9 / 8
        tiers.append(TierCost("peers", stall_seconds=0.0,
                              durable_seconds=2 * copy + max(replicas, 1) * state_bytes / link,
                              restore_seconds=state_bytes / link))  # fmt: skip
    else:
        notes.append("peers left out: give --link-gbps (the node's link to its peers)")
    if object_gbps:
        upload = object_gbps * 1e9 / 8
        tiers.append(TierCost("remote", stall_seconds=0.0,
                              durable_seconds=2 * copy + state_bytes / upload,
                              restore_seconds=state_bytes / upload))  # fmt: skip
    else:
        notes.append("remote left out: give --object-gbps (per node, to object storage)")
    return ProbeResult(tuple(tiers), copy_bps, write_bps, read_bps, tuple(notes))


def memory_copy_bandwidth(nbytes: int, repeats: int = 3) -> float:
    """Bytes per second of the best of ``repeats`` copies of ``nbytes`` into memory
    already written once (pre-faulted, as the memory tier's slots are)."""
    source = np.ones(max(nbytes, 1 << 20), dtype=np.uint8)
    target = np.zeros_like(source)
    np.copyto(target, source)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return source.nbytes / max(best, 1e-9)


def disk_bandwidth(nbytes: int, root: str | None = None) -> tuple[float, float]:
    """Bytes per second writing ``nbytes`` to a new file under ``root`` with fsync, and
    reading it back once dropped from the page cache (where the kernel allows)."""
    nbytes = max(nbytes, 1 << 20)
    chunk = np.full(min(_CHUNK, nbytes), 7, dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="mtckpt-probe-", dir=root) as folder:
        path = os.path.join(folder, "probe.bin")
        started = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            left = nbytes
            while left > 0:
                left -= f.write(memoryview(chunk)[: min(left, chunk.nbytes)])
            os.fsync(f.fileno())
        write_seconds = time.perf_counter() - started
        with open(path, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            buffer = bytearray(chunk.nbytes)
            started = time.perf_counter()
            while f.readinto(buffer):
                pass
            read_seconds = time.perf_counter() - started
    return nbytes / max(write_seconds, 1e-9), nbytes / max(read_seconds, 1e-9)
