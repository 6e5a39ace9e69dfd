"""Laying a flattened state out in a rank's data file and copying it into a node-memory
slot: the leaves whose bytes go in the file, their manifest records, and the copy itself
(host arrays in one multi-threaded native copy, device arrays by their framework)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .. import _fastpath, arrays, frameworks, tree
from ..format import shard
from ..format.manifest import LeafRecord
from ..format.structure import BYTES_KINDS
from ..tiers.memory import Slot


def data_items(
    leaves: list[tree.Leaf], stored_by: dict[str, int]
) -> list[tuple[str, str, tuple[int, ...], int]]:
    items = []
    for leaf in leaves:
        if leaf.key in stored_by:
            continue
        if leaf.kind in arrays.ARRAY_KINDS:
            items.append((leaf.key, *arrays.for_kind(leaf.kind).describe(leaf.value)))
        elif leaf.kind in BYTES_KINDS:
            items.append((leaf.key, "U8", (len(leaf.value),), len(leaf.value)))
    return items


def leaf_records(
    leaves: list[tree.Leaf], layout: shard.Layout, stored_by: dict[str, int]
) -> list[LeafRecord]:
    entries = {entry.key: entry for entry in layout.entries}
    records = []
    for leaf in leaves:
        if leaf.parts:
            parts = tuple(leaf_records(list(leaf.parts), layout, stored_by))
            shape = parts[0].global_shape
            records.append(LeafRecord(leaf.key, leaf.kind, dtype=parts[0].dtype, shape=shape,
                                      global_shape=shape, global_offset=(0,) * len(shape),
                                      parts=parts))  # fmt: skip
            continue
        sharding = leaf.sharding
        placed = {}
        if sharding is not None:
            placed = dict(global_shape=sharding.global_shape, global_offset=sharding.global_offset)
        if leaf.key in stored_by:
            dtype, shape, _ = arrays.for_kind(leaf.kind).describe(leaf.value)
            where = dict(dtype=dtype, shape=tuple(shape), stored_by=stored_by[leaf.key])
            records.append(LeafRecord(leaf.key, leaf.kind, **where, **placed))
        elif leaf.key in entries:
            entry = entries[leaf.key]
            where = dict(dtype=entry.dtype, shape=entry.shape, offset=entry.offset,
                         nbytes=entry.nbytes)  # fmt: skip
            records.append(LeafRecord(leaf.key, leaf.kind, **where, **placed))
        else:
            records.append(LeafRecord(leaf.key, leaf.kind, value=leaf.value))
    return records


def stage_into_slot(
    slot: Slot, layout: shard.Layout, leaves: list[tree.Leaf], threads: int
) -> Callable[[], None]:
    """Start copying the header and every leaf's bytes into the slot; returns the function
    that finishes it. Strided and byte-swapped arrays are copied now by their framework and
    device arrays enqueued on a copy stream; what finishes is one multi-threaded native
    copy of everything in host memory and contiguous, and waiting for the device copies."""
    view = slot.view()
    view[: len(layout.header)] = np.frombuffer(layout.header, np.uint8)
    leaf_of = {leaf.key: leaf for leaf in leaves}
    destinations, sources, waits = [], [], []
    framework_copies: dict[arrays.ArrayAdapter, list] = {}
    for entry in layout.entries:
        leaf = leaf_of[entry.key]
        start = layout.data_start + entry.offset
        dst = view[start : start + entry.nbytes]
        if leaf.kind in BYTES_KINDS:
            destinations.append(dst)
            sources.append(leaf.value)
            continue
        adapter = arrays.for_kind(leaf.kind)
        source = adapter.host_bytes(leaf.value)
        if source is None:
            framework_copies.setdefault(adapter, []).append((leaf.value, dst))
        else:
            destinations.append(dst)
            sources.append(source)
    del view
    for adapter, items in framework_copies.items():
        pinner = next(filter(None, (adapter.pinner(value) for value, _ in items)), None)
        if pinner is not None:
            slot.pin(adapter.name, pinner)
        pending = adapter.stage(items)
        if pending is not None:
            waits.append(pending)

    def finish() -> None:
        _fastpath.backend().copy_many(destinations, sources, threads)
        for wait in waits:
            wait()
        destinations.clear()  # drop the views of the slot

    return finish


def framework_of(leaves: list[tree.Leaf]) -> str:
    """What wrote the state, for the manifest: the framework of its arrays."""
    kinds = {leaf.kind for leaf in leaves}
    return next((f.name for f in frameworks.FRAMEWORKS if f.name in kinds), "numpy")


def replica_owners(leaves: list[tree.Leaf], rank: int, node_ranks: Sequence[int]) -> dict[str, int]:
    """Keys of shards whose bytes another rank stores: of the ranks holding the same shard
    on this node, the lowest stores it (each node keeps a whole copy)."""
    owners = {}
    for leaf in leaves:
        if leaf.sharding is not None:
            holders = [r for r in leaf.sharding.replicas if r in node_ranks]
            if holders and min(holders) != rank:
                owners[leaf.key] = min(holders)
    return owners


def plan_save(state, step: int, *, run: str, rank: int, world_size: int,
              node_ranks: Sequence[int], allow_pickle: bool):  # fmt: skip
    """``state`` flattened for ``step``: its tree node, leaves, data leaves, the keys other
    ranks store (replica_owners), and its data file's layout."""
    node, leaves = tree.flatten(state, allow_pickle=allow_pickle)
    data_leaves = tree.data_leaves(leaves)
    stored_by = replica_owners(data_leaves, rank, node_ranks)
    layout = shard.plan(data_items(data_leaves, stored_by),
                        shard_metadata(run, step, rank, world_size))  # fmt: skip
    return node, leaves, data_leaves, stored_by, layout


def shard_metadata(run: str, step: int, rank: int, world_size: int) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` of a rank's data file."""
    return {"format": "mtckpt", "run": run, "step": str(step), "rank": str(rank),
            "world_size": str(world_size)}  # fmt: skip
