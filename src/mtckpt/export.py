"""A step as one file or directory of whole tensors, for tools outside mtckpt:
safetensors (any framework; values that are not arrays go in its metadata as JSON), a
``torch.save`` file, or a DCP checkpoint directory."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from typing import Any

import numpy as np

from . import arrays, tree
from .errors import CorruptCheckpointError, StepNotFoundError
from .format import commit
from .format.manifest import RankManifest
from .restore import read as restore
from .restore import reshard
from .tiers.base import Storage

FORMATS = ("safetensors", "torch", "dcp", "orbax")


def read_step(
    storages: list[Storage], run: str, step: int, allow_pickle: bool = False, threads: int = 1,
    progress: Callable[[int], None] | None = None,
) -> tuple[Storage, RankManifest, dict[str, Any]]:
    """The leaves of ``step`` by key path, every array whole (assembled from the shards of
    every rank), from the first storage whose copy verifies: ``(storage, the manifest of
    its lowest rank, values)``. Values that are not arrays are that rank's;
    ``tree.unflatten(manifest.tree, values.__getitem__)`` is the state. ``progress`` is
    told the bytes of each chunk checked."""
    problems = []
    files = reshard.StepFiles(storages, run, step, progress)
    try:
        for storage in storages:
            ranks = commit.ranks_present(storage, run, step)
            if not commit.is_committed(storage, run, step) or not ranks:
                continue
            try:
                manifest = restore.read_manifest(storage, run, step, min(ranks))
                for record in manifest.leaves:
                    restore.check_target(record, None, allow_pickle)
                values = reshard.load_values(files, storage, manifest, {}, set(), threads)
            except CorruptCheckpointError as exc:
                problems.append(str(exc))
                continue
            return storage, manifest, values
    finally:
        files.close()
    if problems:
        raise CorruptCheckpointError(f"no good copy of run {run} step {step}: "
                                     + "; ".join(problems))  # fmt: skip
    where = ", ".join(s.describe() for s in storages)
    raise StepNotFoundError(f"run {run} step {step} is not complete in {where}")


def write(fmt: str, manifest: RankManifest, values: dict[str, Any], out: str | os.PathLike,
          progress: Callable[[int], None] | None = None):  # fmt: skip
    """Write the leaves ``values`` (from :func:`read_step`) to ``out`` in ``fmt``;
    ``progress`` is told the bytes of each array written (safetensors: the other formats'
    writers tell nothing until done)."""
    if fmt == "safetensors":
        write_safetensors(manifest, values, out, progress)
        return
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    state = tree.unflatten(manifest.tree, values.__getitem__)
    if fmt == "orbax":
        write_orbax(state, out)
        return
    import torch

    from .adapters.dcp import as_torch

    if fmt == "torch":
        torch.save(as_torch(state), out)
    else:
        import torch.distributed.checkpoint as dcp

        dcp.save(as_torch(state), checkpoint_id=out, no_dist=True)


def write_orbax(state: Any, out: str | os.PathLike) -> None:
    """``state`` as an Orbax checkpoint at ``out`` (a new directory), written by Orbax's
    ``PyTreeCheckpointer`` (strings too, which its ``StandardCheckpointer`` refuses):
    ``ocp.PyTreeCheckpointer().restore(out)`` reads it, arrays as numpy arrays."""
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(out), state)


def write_safetensors(manifest: RankManifest, values: dict[str, Any], out: str | os.PathLike,
                      progress: Callable[[int], None] | None = None):  # fmt: skip
    """One safetensors file: each array under its key path, with the dtype names mtckpt
    records (they are safetensors'); the other leaves in ``__metadata__``, each as JSON
    ``{"kind": ..., "value": ...}`` (bytes in hex)."""
    header: dict[str, Any] = {}
    metadata: dict[str, str] = {}
    blobs: list[np.ndarray] = []
    offset = 0
    for record in manifest.leaves:
        value = values[record.key]
        if record.kind == "pickle":
            raise ValueError(f"key {record.key!r} is a pickled object: safetensors holds "
                             "arrays and plain values; export it as torch")  # fmt: skip
        if record.kind not in arrays.ARRAY_KINDS:
            value = value.hex() if isinstance(value, (bytes, bytearray)) else value
            metadata[record.key] = json.dumps({"kind": record.kind, "value": value})
            continue
        data = _bytes(value)
        shape = list(record.global_shape or record.shape)
        header[record.key] = {"dtype": record.dtype, "shape": shape,
                              "data_offsets": [offset, offset + data.nbytes]}  # fmt: skip
        blobs.append(data)
        offset += data.nbytes
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for data in blobs:
            f.write(memoryview(data))
            if progress is not None:
                progress(data.nbytes)


def _bytes(value: Any) -> np.ndarray:
    """The little-endian bytes of a whole host array (numpy or torch)."""
    adapter = arrays.for_value(value)
    data = adapter.host_bytes(value) if adapter is not None else None
    if data is None:  # not contiguous: numpy copies it
        data = np.ascontiguousarray(np.asarray(value)).reshape(-1).view(np.uint8)
    return data
