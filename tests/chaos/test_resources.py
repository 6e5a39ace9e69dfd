"""Full disks and unusable tier paths: a clear error, training not stopped by a slower tier,
nothing committed lost, and work resumes once the resource is back."""

import os

import numpy as np
import pytest

from mtckpt import CheckpointManager, ConfigError, LocalTier, MemoryTier, TierError


def state_of(step: int, kib: int) -> dict:
    return {"w": np.full(kib * 256, step, dtype=np.float32), "step": step}


def test_full_local_disk_does_not_stop_training_and_recovers(shm_dir, small_tmpfs):
    disk = small_tmpfs(2048)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (1600 * 1024))
    with CheckpointManager("exp", MemoryTier(str(shm_dir)), LocalTier(str(disk), keep=1)) as mgr:
        handle = mgr.save(0, state_of(0, 800))
        handle.wait("memory")
        with pytest.raises(TierError) as info:
            handle.wait("local")
        message = str(info.value)
        assert "local tier" in message and str(disk) in message and "no space left" in message
        assert info.value.errno == 28
        # no partial file: only the lock the manager holds
        assert [p.name for p in (disk / "exp").rglob("*") if p.is_file()] == [".rank-00000.lock"]
        step, state = mgr.restore()
        assert step == 0 and np.array_equal(state["w"], state_of(0, 800)["w"])

        filler.unlink()  # space is back
        mgr.save(1, state_of(1, 800)).wait()
        assert mgr.steps() == {"memory": [0, 1], "local": [1]}


def test_wait_reports_a_slower_tier_error_but_every_save_still_stages(shm_dir, small_tmpfs):
    disk = small_tmpfs(512)
    with CheckpointManager("exp", MemoryTier(str(shm_dir), keep=3), LocalTier(str(disk))) as mgr:
        handles = [mgr.save(step, state_of(step, 600)) for step in range(3)]
        for handle in handles:
            handle.wait("memory")
        with pytest.raises(TierError, match="no space left"):
            mgr.wait()
        assert mgr.steps() == {"memory": [0, 1, 2], "local": []}


def test_full_memory_tier_fails_save_clearly_and_keeps_committed_steps(small_tmpfs):
    memory = small_tmpfs(1024)
    with CheckpointManager("exp", MemoryTier(str(memory), keep=2)) as mgr:
        mgr.save(0, state_of(0, 600)).wait()
        with pytest.raises(TierError) as info:
            mgr.save(1, state_of(1, 600))
        assert "memory tier" in str(info.value) and "no space left" in str(info.value)
        step, state = mgr.restore()
        assert step == 0 and np.array_equal(state["w"], state_of(0, 600)["w"])
        mgr.save(1, state_of(1, 100)).wait()  # a state that fits goes through
        assert mgr.restore()[0] == 1


def test_unusable_local_path_is_reported_and_retried(shm_dir, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "exp").write_text("a file where the run directory should be")
    with CheckpointManager("exp", MemoryTier(str(shm_dir)), LocalTier(str(local))) as mgr:
        handle = mgr.save(0, state_of(0, 4))
        with pytest.raises(TierError, match=r"local tier .*cannot create .*step-000000000000"):
            handle.wait()
        (local / "exp").unlink()  # the operator fixes it
        mgr.save(1, state_of(1, 4)).wait()
        assert mgr.steps()["local"] == [1]


def test_unusable_memory_root_fails_at_construction(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="memory tier .* is not usable"):
        CheckpointManager("exp", MemoryTier(str(blocker / "sub")))
    assert os.path.isfile(blocker)
