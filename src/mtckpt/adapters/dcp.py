"""torch.distributed.checkpoint (DCP) over mtckpt tiers, and conversions to and from DCP
directories and ``torch.save`` files.

``dcp.save(sd, storage_writer=mtckpt.torch.Writer(mgr, step))`` turns DCP's planned items
into an ordinary mtckpt save of that step: each rank's items, keyed by their fully
qualified names, shards with their global offsets. ``dcp.load(sd,
storage_reader=mtckpt.torch.Reader(mgr, step))`` rebuilds DCP's metadata from the rank
manifests (no metadata file of DCP's own is written) and reads verified slices.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ..errors import StepNotFoundError
from ..format import naming
from ..manager import CheckpointManager
from ..restore import reshard
from .torch import _DTYPES, LocalShard, _typed

__all__ = ["Reader", "Writer", "export_dcp", "export_torch_save", "import_dcp", "import_torch_save"]


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class Writer(StorageWriter):
    """A DCP storage writer that saves into ``manager`` as ``step``.

    ``write_data`` returns once the rank's items are committed in node memory (``wait``:
    the stage of the save to wait for, ``"memory"`` by default; ``None`` for every tier);
    the slower tiers follow in the background as for any save.
    """

    def __init__(self, manager: CheckpointManager, step: int, wait: str | None = "memory"):
        super().__init__()
        self.manager, self.step, self.wait = manager, naming.check_step(step), wait

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def write_data(self, plan, planner) -> Future:
        state: dict[str, Any] = {}
        results = []
        for item in plan.items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                value: Any = data.getvalue()
                size = len(value)
            else:
                tensor = data.detach()
                chunk, size = item.tensor_data.chunk, tensor.numel() * tensor.element_size()
                value = tensor
                if tuple(chunk.sizes) != tuple(item.tensor_data.size):
                    value = LocalShard(tensor, tuple(item.tensor_data.size), tuple(chunk.offsets))
            key = item.index.fqn
            if key in state:  # several chunks of one tensor on this rank
                key = f"{key}@{','.join(map(str, item.index.offset))}"
            state[key] = value
            results.append(WriteResult(index=item.index, size_in_bytes=size, storage_data=key))
        handle = self.manager.save(self.step, state, force=True)
        handle.wait(self.wait)
        return _done(results)

    def finish(self, metadata, results) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False


class Reader(StorageReader):
    """A DCP storage reader of ``step`` (default: the newest complete step) of
    ``manager``'s run, from the fastest of its tiers holding each rank's shard."""

    def __init__(self, manager: CheckpointManager, step: int | None = None):
        super().__init__()
        self.manager = manager
        self.step = manager.latest_step() if step is None else naming.check_step(step)
        if self.step is None:
            raise StepNotFoundError(f"run {manager.run!r} has no complete step to read")
        self.storage_data: dict[MetadataIndex, tuple[int, str]] = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        pass

    def _files(self) -> reshard.StepFiles:
        storages = [storage for _, storage in self.manager._tiers]
        return reshard.StepFiles(storages, self.manager.run, self.step)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        files = self._files()
        state: dict[str, Any] = {}
        storage_data: dict[MetadataIndex, tuple[int, str]] = {}
        try:
            _, first, _ = files.manifest(0)
            for rank in range(first.world_size):
                _, manifest, records = files.manifest(rank)
                for fqn, key in _items(manifest):
                    record = records[key]
                    if record.kind in ("bytes", "bytearray"):
                        state[fqn] = BytesStorageMetadata()
                        storage_data[MetadataIndex(fqn)] = (rank, key)
                        continue
                    meta = state.setdefault(fqn, TensorStorageMetadata(
                        TensorProperties(dtype=_DTYPES[record.dtype]),
                        torch.Size(reshard.region_of(record).global_shape), []))  # fmt: skip
                    for part in record.parts or (record,):
                        if part.stored_by is not None:
                            continue  # a replica: the rank that stored it lists the chunk
                        region = reshard.region_of(part)
                        offsets = torch.Size(region.global_offset)
                        if MetadataIndex(fqn, offsets) not in storage_data:
                            chunk = ChunkStorageMetadata(offsets, torch.Size(region.shape))
                            meta.chunks.append(chunk)
                            storage_data[MetadataIndex(fqn, offsets)] = (rank, part.key)
        finally:
            files.close()
        return Metadata(state_dict_metadata=state, storage_data=storage_data)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs):
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def read_data(self, plan, planner) -> Future:
        files = self._files()
        try:
            for item in plan.items:
                rank, key = self.storage_data[item.storage_index]
                _, _, records = files.manifest(rank)
                record = records[key]
                raw = files.verified_bytes(rank, record)
                if item.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(item, io.BytesIO(raw.tobytes()))
                    continue
                with warnings.catch_warnings():  # read-only mapping: we only read from it
                    warnings.simplefilter("ignore", UserWarning)
                    source = _typed(raw, record.dtype, tuple(record.shape))
                for dim, (start, length) in enumerate(
                    zip(item.storage_offsets, item.lengths, strict=True)
                ):
                    source = source.narrow(dim, start, length)
                target = planner.resolve_tensor(item).detach()
                target.copy_(source)
                planner.commit_tensor(item, target)
        finally:
            files.close()
        return _done(None)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False


def _items(manifest) -> list[tuple[str, str]]:
    """(DCP fully qualified name, mtckpt key path) of every item a Writer saved."""
    tree = manifest.tree
    if tree.type != "dict":
        return []
    items = []
    for name, child in zip(tree.keys, tree.children, strict=True):
        if child.type == "leaf":
            items.append((str(name).split("@", 1)[0], child.name))
    return items


# -- conversions (one process: whole tensors) ------------------------------------------------


def as_torch(value: Any) -> Any:
    """The same tree with numpy arrays as torch tensors (the torch formats store tensors)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, dict):
        return {key: as_torch(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(as_torch(item) for item in value)
    return value


def export_torch_save(manager: CheckpointManager, step: int | None, path: str | os.PathLike):
    """Write ``step`` (default: the newest) as one ``torch.save`` file of whole tensors."""
    step, state = manager.restore(step=step)
    torch.save(as_torch(state), path)
    return step


def import_torch_save(path: str | os.PathLike, manager: CheckpointManager, step: int):
    """Save the state of a ``torch.save`` file (loaded with ``weights_only=True``) as ``step``."""
    state = torch.load(path, weights_only=True, map_location="cpu")
    manager.save(step, state, force=True).wait()


def export_dcp(manager: CheckpointManager, step: int | None, directory: str | os.PathLike):
    """Write ``step`` (default: the newest) as a DCP checkpoint directory of whole tensors."""
    step, state = manager.restore(step=step)
    dcp.save(as_torch(state), checkpoint_id=directory, no_dist=True)
    return step


def import_dcp(directory: str | os.PathLike, manager: CheckpointManager, step: int):
    """Save a DCP checkpoint directory as ``step`` of ``manager``'s run, as whole tensors."""
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(directory),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)  # fmt: skip
    manager.save(step, state, force=True).wait()
