"""A sharded checkpoint on the object tier, zstd-compressed, restored onto another world
size from a node with empty memory: each region assembled from the shards of both saving
ranks, their files fetched and decoded from the object tier and verified."""

from __future__ import annotations

import os
from unittest import mock

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("zstandard")

from mtckpt import CheckpointManager, MemoryTier, ObjectTier  # noqa: E402
from mtckpt.torch import LocalShard  # noqa: E402

ROWS, COLS = 96, 40


def full_state() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(ROWS, COLS, generator=g),
            "b": torch.randn(ROWS, generator=g, dtype=torch.float64)}  # fmt: skip


def manager(memory_dir, remote, rank: int, world: int) -> CheckpointManager:
    env = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}  # every rank on a node of its own
    with mock.patch.dict(os.environ, env):
        return CheckpointManager("rs", rank=rank, world_size=world, chunk_size=4096,
                                 memory=MemoryTier(str(memory_dir)), remote=remote)  # fmt: skip


def test_a_sharded_zstd_checkpoint_restores_onto_one_rank(tmp_path, shm_dir):
    remote = ObjectTier(url=f"file://{tmp_path}/remote", compression="zstd")
    state = full_state()
    for rank in range(2):  # two nodes, each holding half the rows
        half = ROWS // 2
        shards = {key: LocalShard(value[rank * half : (rank + 1) * half].clone(),
                                  tuple(value.shape), (rank * half,) + (0,) * (value.dim() - 1))
                  for key, value in state.items()}  # fmt: skip
        with manager(shm_dir / f"node{rank}", remote, rank, 2) as mgr:
            mgr.save(5, shards).wait()
    target = {key: torch.zeros_like(value) for key, value in state.items()}
    with manager(shm_dir / "new-node", remote, 0, 1) as mgr:  # nothing in its memory
        step, restored = mgr.restore(target)
    assert step == 5
    for key, value in state.items():
        assert torch.equal(restored[key], value), key
