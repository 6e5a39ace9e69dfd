"""A sharded checkpoint on the object tier, zstd-compressed or stored incrementally,
restored onto another world size from a node with empty memory: each region assembled
from the shards of both saving ranks, their files fetched and decoded (or assembled from
the steps holding their blocks) from the object tier and verified."""

from __future__ import annotations

import os
from unittest import mock

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("zstandard")

from mtckpt import CheckpointManager, MemoryTier, ObjectTier, catalog  # noqa: E402
from mtckpt.tiers.object import object_storage  # noqa: E402
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


@pytest.mark.parametrize("compression", ["zstd", None])  # None: step 5 a delta of step 4
def test_a_sharded_checkpoint_restores_onto_one_rank(tmp_path, shm_dir, compression):
    remote = ObjectTier(url=f"file://{tmp_path}/remote", compression=compression)
    state = full_state()
    for rank in range(2):  # two nodes, each holding half the rows
        half = ROWS // 2
        with manager(shm_dir / f"node{rank}", remote, rank, 2) as mgr:
            for step in (4, 5):
                if step == 5:
                    state["b"][rank * half] += 1.0  # one row of each rank's bias changes
                shards = {key: LocalShard(value[rank * half : (rank + 1) * half].clone(),
                                          tuple(value.shape),
                                          (rank * half,) + (0,) * (value.dim() - 1))
                          for key, value in state.items()}  # fmt: skip
                mgr.save(step, shards).wait()
    encodings = {m.stored.encoding for m in catalog.manifests(object_storage(remote), "rs", 5)}
    assert encodings == ({"zstd"} if compression else {"delta"})
    target = {key: torch.zeros_like(value) for key, value in state.items()}
    with manager(shm_dir / "new-node", remote, 0, 1) as mgr:  # nothing in its memory
        step, restored = mgr.restore(target)
    assert step == 5
    for key, value in state.items():
        assert torch.equal(restored[key], value), key
