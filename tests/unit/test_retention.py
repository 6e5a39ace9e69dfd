"""Retention never removes the last good copy: damaged steps (truncated or missing files, a
garbage COMMIT, a flipped byte found by verification) never count toward ``keep``, and an
older step goes only once the newest complete one verifies. What was verified is
remembered, so a steady save loop reads no data back."""

from __future__ import annotations

import collections
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from mtckpt import CheckpointManager, LocalTier, MemoryTier, ObjectTier
from mtckpt.format import naming
from mtckpt.tiers.directory import DirectoryStorage
from mtckpt.tiers.object import ObjectStorage
from states import assert_same_state

RUN = "r"


def state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal(40_000, dtype=np.float32), "step": step}


def save_steps(memory: Path, local: Path, steps, keep: int = 10) -> None:
    with CheckpointManager(RUN, memory=MemoryTier(str(memory), keep=keep),
                           local=LocalTier(str(local), keep=keep)) as mgr:  # fmt: skip
        for step in steps:
            mgr.save(step, state(step))
            mgr.wait()  # garbage collection too


def step_path(root: Path, step: int) -> Path:
    return root / RUN / naming.step_dir(step)


def data_of(root: Path, step: int) -> Path:
    return step_path(root, step) / naming.data_file(0)


def steps_on(root: Path) -> list[int]:
    return sorted(naming.steps_of(os.listdir(root / RUN)))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 100)


def flip_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size - 5)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def restored_from_local(local: Path, memory: Path) -> tuple[int, dict]:
    """What a new node (empty memory) restores from ``local``, which it leaves as it is."""
    with CheckpointManager(RUN, memory=MemoryTier(str(memory)),
                           local=LocalTier(str(local), keep=10)) as mgr:  # fmt: skip
        return mgr.restore()


def test_manager_start_keeps_the_good_step_when_the_newer_ones_are_truncated(shm_dir, tmp_path):
    local = tmp_path / "local"
    save_steps(shm_dir / "m", local, [1, 2, 3])
    truncate(data_of(local, 2))
    truncate(data_of(local, 3))
    with CheckpointManager(RUN, memory=MemoryTier(str(shm_dir / "m")),
                           local=LocalTier(str(local), keep=2)):  # fmt: skip
        pass
    assert steps_on(local) == [1]  # the damaged ones removed, the good one kept
    step, restored = restored_from_local(local, shm_dir / "fresh")
    assert step == 1
    assert_same_state(restored, state(1))


def test_damaged_steps_do_not_count_in_the_pipelines_retention(shm_dir, tmp_path, caplog):
    local = tmp_path / "local"
    tiers = MemoryTier(str(shm_dir / "m"), keep=2), LocalTier(str(local), keep=2)
    with CheckpointManager(RUN, *tiers) as mgr, caplog.at_level(logging.WARNING, "mtckpt"):
        for step in (1, 2, 3):
            mgr.save(step, state(step))
            mgr.wait()  # garbage collection too
        assert steps_on(local) == [2, 3]
        truncate(data_of(local, 3))  # the newest on disk goes bad
        mgr.save(4, state(4))
        mgr.wait()
        assert steps_on(local) == [2, 4]  # 3 never counted: 2 is still one of the 2 kept
        assert f"removing run {RUN!r} step 3: damaged:" in caplog.text
        assert "bytes, the manifest records" in caplog.text
        mgr.save(5, state(5))
        mgr.wait()
        assert steps_on(local) == [4, 5]
    step, restored = restored_from_local(local, shm_dir / "fresh")
    assert step == 5
    assert_same_state(restored, state(5))


def test_a_missing_manifest_in_node_memory_does_not_count(shm_dir):
    memory = shm_dir / "m"
    with CheckpointManager(RUN, MemoryTier(str(memory), keep=2)) as mgr:
        mgr.save(1, state(1))
        mgr.wait()
        mgr.save(2, state(2))
        mgr.wait()
        (step_path(memory, 2) / naming.manifest_file(0)).unlink()
        mgr.save(3, state(3))
        mgr.wait()
        assert steps_on(memory) == [1, 3]
        assert mgr.steps()["memory"] == [1, 3]


def test_a_garbage_commit_marker_does_not_count(shm_dir, tmp_path):
    local = tmp_path / "local"
    save_steps(shm_dir / "m", local, [1, 2])
    (step_path(local, 2) / naming.COMMIT).write_bytes(b"\x00garbage{")
    with CheckpointManager(RUN, memory=MemoryTier(str(shm_dir / "m")),
                           local=LocalTier(str(local), keep=1)):  # fmt: skip
        pass
    assert steps_on(local) == [1]
    assert restored_from_local(local, shm_dir / "fresh")[0] == 1


def test_a_flipped_byte_in_the_newest_step_is_found_before_an_older_one_goes(
    shm_dir, tmp_path, caplog
):
    local = tmp_path / "local"
    save_steps(shm_dir / "m", local, [1, 2, 3])
    flip_byte(data_of(local, 3))  # the listing and the sizes look right: only crc32c tells
    with caplog.at_level(logging.WARNING, "mtckpt"), CheckpointManager(
        RUN, memory=MemoryTier(str(shm_dir / "m"), keep=10), local=LocalTier(str(local), keep=1)
    ):  # fmt: skip
        pass
    # 3 failed verification (damaged, removed); 2 verified, so 1 went
    assert steps_on(local) == [2]
    assert "step 3 fails checksum verification" in caplog.text
    assert "has crc32c" in caplog.text
    step, restored = restored_from_local(local, shm_dir / "fresh")
    assert step == 2
    assert_same_state(restored, state(2))


class Reads:
    """Every read of a tier directory's files: (tier, step, file) -> count."""

    def __init__(self, monkeypatch) -> None:
        self.mapped: collections.Counter = collections.Counter()
        self.read: collections.Counter = collections.Counter()
        mapper, reader = DirectoryStorage.map, DirectoryStorage.read_bytes

        def map_counted(storage, run, step, name):
            self.mapped[storage.name, step, name] += 1
            return mapper(storage, run, step, name)

        def read_counted(storage, run, step, name):
            self.read[storage.name, step, name] += 1
            return reader(storage, run, step, name)

        monkeypatch.setattr(DirectoryStorage, "map", map_counted)
        monkeypatch.setattr(DirectoryStorage, "read_bytes", read_counted)


def test_a_step_found_at_start_is_verified_once_and_a_save_loop_reads_no_data(
    shm_dir, tmp_path, monkeypatch
):
    memory, local = shm_dir / "m", tmp_path / "local"
    save_steps(memory, local, [1, 2, 3])
    reads = Reads(monkeypatch)
    tiers = MemoryTier(str(memory), keep=2), LocalTier(str(local), keep=2)
    with CheckpointManager(RUN, *tiers) as mgr:
        # at start: step 1 is beyond keep, so step 3 (not written by this process) is
        # verified once on each tier before step 1 goes
        data = naming.data_file(0)
        assert reads.mapped == {("memory", 3, data): 1, ("local", 3, data): 1}
        assert steps_on(memory) == steps_on(local) == [2, 3]
        reads.mapped.clear()
        reads.read.clear()
        for step in range(4, 14):
            mgr.save(step, state(step))
            mgr.wait()  # garbage collection too
        assert steps_on(memory) == steps_on(local) == [12, 13]
    # the commits and copies checked every chunk: nothing is read back to verify, and
    # each small file (COMMIT, manifest) is read at most once per tier
    assert reads.mapped == {}
    assert max(reads.read.values()) == 1
    assert {(tier, name) for tier, _, name in reads.read} == {
        (tier, name) for tier in ("memory", "local")
        for name in (naming.COMMIT, naming.manifest_file(0))
    }  # fmt: skip


def test_a_step_that_cannot_be_read_now_keeps_the_older_ones(shm_dir, tmp_path, monkeypatch):
    local = tmp_path / "local"
    save_steps(shm_dir / "m", local, [1, 2, 3])

    def unreadable(storage, run, step, name):
        raise PermissionError(13, "Permission denied", str(storage.path(run, step, name)))

    monkeypatch.setattr(DirectoryStorage, "map", unreadable)
    with CheckpointManager(RUN, memory=MemoryTier(str(shm_dir / "m"), keep=10),
                           local=LocalTier(str(local), keep=1)):  # fmt: skip
        pass
    assert steps_on(local) == [1, 2, 3]  # not damaged, not verified: nothing goes


def test_keep_below_one_is_refused_by_retention(tmp_path):
    from mtckpt import retention
    from mtckpt.tiers.local import LocalStorage

    with pytest.raises(ValueError, match="keep must be an int >= 1, got 0"):
        retention.plan(LocalStorage(tmp_path), RUN, 0)


# -- the object tier ------------------------------------------------------------------------


def s3_manager(moto, bucket, memory: Path, keep: int, uploader: str = "auto"):
    remote = ObjectTier(url=f"s3://{bucket}/ckpt", storage_options=moto.options(), keep=keep,
                        uploader=uploader)  # fmt: skip
    return CheckpointManager(RUN, memory=MemoryTier(str(memory), keep=2), remote=remote)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_object_tier_keeps_the_good_step_when_the_newest_is_damaged(moto, bucket, shm_dir,
                                                                    damage):  # fmt: skip
    with s3_manager(moto, bucket, shm_dir / "a", keep=5) as mgr:
        for step in (1, 2):
            mgr.save(step, state(step))
            mgr.wait()  # garbage collection too
    storage = ObjectStorage(f"s3://{bucket}/ckpt", storage_options=moto.options())
    path = storage.path(RUN, 2, naming.data_file(0))
    data = bytearray(storage.fs.cat_file(path))
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[-100:]
    storage.fs.pipe_file(path, bytes(data))
    with s3_manager(moto, bucket, shm_dir / "b", keep=1) as mgr:  # a new node, keep=1
        assert storage.steps(RUN) == [1]
        step, restored = mgr.restore()
    assert step == 1
    assert_same_state(restored, state(1))


def test_object_tier_uploads_are_not_downloaded_again_to_verify(moto, bucket, shm_dir,
                                                                monkeypatch):  # fmt: skip
    fetched = []
    ranged = ObjectStorage.read_range

    def counted(storage, run, step, name, start, end):
        fetched.append((step, name))
        return ranged(storage, run, step, name, start, end)

    monkeypatch.setattr(ObjectStorage, "read_range", counted)
    with s3_manager(moto, bucket, shm_dir / "a", keep=2, uploader="thread") as mgr:
        for step in range(1, 6):
            mgr.save(step, state(step))
            mgr.wait()  # garbage collection too
        assert mgr.steps()["remote"] == [4, 5]
    assert fetched == []
