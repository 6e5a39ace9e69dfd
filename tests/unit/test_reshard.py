"""Restoring sharded tensors onto another world size or split, in one process: the ranks
are managers with explicit rank and world_size (the multi-process runs are in
tests/multiprocess). Every region is assembled from the overlapping slices of the saved
shards, verified; a damaged source file is replaced by the same rank's copy in the next
tier, or the restore moves to an older step."""

import logging
import os

import pytest

torch = pytest.importorskip("torch")

from mtckpt import (  # noqa: E402
    CheckpointManager,
    CorruptCheckpointError,
    LocalTier,
    MemoryTier,
    StepNotFoundError,
)
from mtckpt.format.manifest import RankManifest  # noqa: E402
from mtckpt.torch import LocalShard  # noqa: E402
from node import side_by_side  # noqa: E402

pytestmark = pytest.mark.usefixtures("backend")

CHUNK = 4096  # many chunks per file, so that pieces start and end inside chunks
ROWS, COLS = 90, 70


def full_state(step):
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(ROWS, COLS, generator=g),
        "v": torch.randint(-(2**15), 2**15, (ROWS, 3, 5), dtype=torch.int16, generator=g),
        "b": torch.randn(ROWS, generator=g, dtype=torch.float64),
    }


def split(tensor, rank, world, dim):
    """The piece of ``tensor`` rank ``rank`` of ``world`` holds (uneven splits allowed)."""
    pieces = torch.tensor_split(tensor, world, dim=dim % tensor.dim())
    offset = [0] * tensor.dim()
    offset[dim % tensor.dim()] = sum(p.shape[dim % tensor.dim()] for p in pieces[:rank])
    return LocalShard(pieces[rank].clone(), tuple(tensor.shape), tuple(offset))


def shards(state, rank, world, dim):
    return {key: split(value, rank, world, 0 if value.dim() == 1 else dim) for key, value in
            state.items()}  # fmt: skip


@pytest.fixture
def tiers(shm_dir, tmp_path):
    return MemoryTier(str(shm_dir), keep=3), LocalTier(str(tmp_path / "local"), keep=3)


def manager(tiers, rank, world):
    return CheckpointManager("rs", *tiers, rank=rank, world_size=world, chunk_size=CHUNK, threads=2)


def save_on(tiers, world, dim, steps=(1,), state=full_state):
    """Every rank of a ``world``-rank node saves ``steps``, side by side."""

    def save(rank):
        with manager(tiers, rank, world) as mgr:
            for step in steps:
                mgr.save(step, shards(state(step), rank, world, dim)).wait()

    side_by_side(save, range(world))


def restore_on(tiers, world, dim, step=None):
    """Each rank's (step, restored shards), restored into zeroed targets in place."""
    results = []
    for rank in range(world):
        target = shards(full_state(0), rank, world, dim)
        for shard in target.values():
            shard.tensor.zero_()
        with manager(tiers, rank, world) as mgr:
            got, state = mgr.restore(target, step=step)
        assert all(state[key] is target[key] for key in target)  # filled in place
        results.append((got, target))
    return results


def data_file(tiers, tier, step, rank):
    root = tiers[0 if tier == "memory" else 1].path
    return os.path.join(root, "rs", f"step-{step:012d}", f"rank-{rank:05d}.safetensors")


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x20]))


def assert_restored(results, world, dim, step):
    expected = full_state(step)
    for rank, (got, target) in enumerate(results):
        assert got == step
        for key, value in shards(expected, rank, world, dim).items():
            assert target[key].global_offset == value.global_offset
            assert torch.equal(target[key].tensor, value.tensor), (rank, key)


@pytest.mark.parametrize(
    ("saved", "restored"),
    [((4, 0), (2, 0)), ((2, 0), (4, 0)), ((4, 0), (3, 0)), ((3, 1), (2, 0)), ((2, 0), (5, 1))],
    ids=["4to2", "2to4", "4to3", "3cols-to-2rows", "2rows-to-5cols"],
)
def test_shards_restore_bit_exact_on_another_world_and_split(tiers, saved, restored):
    save_on(tiers, *saved)
    assert_restored(restore_on(tiers, *restored), *restored, step=1)


def test_restore_from_the_local_tier_alone(tiers, tmp_path):
    save_on(tiers, 4, 0)
    only_local = (MemoryTier(str(tmp_path / "empty-memory")), tiers[1])
    assert_restored(restore_on(only_local, 3, 1), 3, 1, step=1)


def test_whole_tensors_from_a_sharded_checkpoint(tiers):
    save_on(tiers, 3, 1)
    expected = full_state(1)
    target = {key: torch.zeros_like(value) for key, value in expected.items()}
    with manager(tiers, 0, 1) as mgr:
        mgr.restore(target)
        _, untargeted = mgr.restore()
    for key, value in expected.items():
        assert torch.equal(target[key], value)
        assert torch.equal(torch.as_tensor(untargeted[key]), value)


@pytest.mark.parametrize(
    ("world", "dim"), [(4, 0), (3, 1)], ids=["contiguous-pieces", "strided-pieces"]
)
def test_a_damaged_source_file_is_read_from_the_next_tier(tiers, caplog, world, dim):
    save_on(tiers, 2, 0)
    # In rank 1's file in memory, a byte of its first tensor's data: every tensor of
    # rank 1's rows is needed by some rank of the new world.
    flip_byte(data_file(tiers, "memory", 1, 1), 4096 + 100)
    with caplog.at_level(logging.WARNING, logger="mtckpt"):
        results = restore_on(tiers, world, dim)
    assert_restored(results, world, dim, step=1)
    assert "rank-00001.safetensors: chunk 1" in caplog.text
    assert "trying the next copy" in caplog.text


def test_a_source_file_damaged_in_every_tier_moves_restore_to_the_older_step(tiers, caplog):
    save_on(tiers, 2, 0, steps=(1, 2))
    for tier in ("memory", "local"):
        flip_byte(data_file(tiers, tier, 2, 1), 4096 + 7)
    with caplog.at_level(logging.WARNING, logger="mtckpt"):
        results = restore_on(tiers, 3, 1)
    assert_restored(results, 3, 1, step=1)
    assert "no usable shard of rank 1" in caplog.text


def test_only_the_chunks_a_region_reads_are_checked(tiers, caplog):
    """Rank 0 of 4 (rows) reads the first half of the rows rank 0 of 2 saved: a damaged
    chunk in the second half does not stop it, while rank 1 of 4, which reads it, moves
    to the local tier's copy."""

    def one_tensor(step):
        return {"w": full_state(step)["w"].repeat(4, 1)}  # 360 rows: many chunks per half

    save_on(tiers, 2, 0, state=one_tensor)
    path = data_file(tiers, "memory", 1, 0)
    with open(path.replace(".safetensors", ".json"), "rb") as f:
        record = next(r for r in RankManifest.from_json(f.read(), path).leaves if r.key == "w")
    flip_byte(path, 4096 + record.offset + record.nbytes * 3 // 4)
    for rank in range(2):
        target = shards(one_tensor(0), rank, 4, 0)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mtckpt"), manager(tiers, rank, 4) as mgr:
            mgr.restore(target)
        assert torch.equal(target["w"].tensor, shards(one_tensor(1), rank, 4, 0)["w"].tensor)
        assert ("trying the next copy" in caplog.text) == (rank == 1), caplog.text


def test_missing_source_file_in_every_tier_names_the_rank(tiers):
    save_on(tiers, 3, 0)
    target = shards(full_state(0), 0, 2, 1)
    with manager(tiers, 0, 2) as mgr, pytest.raises(CorruptCheckpointError, match="rank 2"):
        for tier in ("memory", "local"):  # after the manager's retention, which removes it
            os.remove(data_file(tiers, tier, 1, 2))
        mgr.restore(target)


def test_retention_removes_a_step_missing_a_data_file_and_says_which(tiers, caplog):
    save_on(tiers, 3, 0)
    for tier in ("memory", "local"):
        os.remove(data_file(tiers, tier, 1, 2))
    with manager(tiers, 0, 2) as mgr, pytest.raises(StepNotFoundError, match="'rs'"):
        mgr.restore(shards(full_state(0), 0, 2, 1))
    assert caplog.text.count("step 1 rank-00002.safetensors: the data file is missing") == 2


@pytest.mark.parametrize("damaged", [0, 1])
@pytest.mark.parametrize("dim", [0, 1], ids=["contiguous-pieces", "strided-pieces"])
def test_a_failed_resharded_restore_leaves_the_target_untouched(tiers, damaged, dim):
    """World 2 restored on one rank: a whole tensor of rank 0's own file is read directly,
    the sharded ones assembled from both files. With the only step's rank ``damaged`` file
    damaged in every tier, no byte of either lands in the target."""

    def with_plain(step):
        return {"plain": torch.arange(5000, dtype=torch.float32) + step}

    save_on(tiers, 2, dim, state=lambda step: {**full_state(step), **with_plain(step)})
    for tier in ("memory", "local"):
        path = data_file(tiers, tier, 1, damaged)
        with open(path.replace(".safetensors", ".json"), "rb") as f:
            manifest = RankManifest.from_json(f.read(), path)
        record = next(r for r in manifest.leaves if r.key == "w")
        flip_byte(path, manifest.data_start + record.offset + record.nbytes // 2)
    target = {**shards(full_state(0), 0, 1, dim), **with_plain(0)}
    target["plain"].fill_(-1.0)
    before = {key: (value.tensor if isinstance(value, LocalShard) else value).clone()
              for key, value in target.items()}  # fmt: skip
    expected = f"no usable shard of rank {damaged}"
    with manager(tiers, 0, 1) as mgr, pytest.raises(CorruptCheckpointError, match=expected):
        mgr.restore(target)
    for key, value in target.items():
        tensor = value.tensor if isinstance(value, LocalShard) else value
        assert tensor.numpy().tobytes() == before[key].numpy().tobytes(), key
