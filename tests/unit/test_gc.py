"""Garbage collection of incomplete and expired steps, crash leftovers, and memory slots."""

import os
from pathlib import Path

import numpy as np

from mtckpt import CheckpointManager, LocalTier, MemoryTier
from mtckpt.tiers.memory import MemoryStorage


def listing(root: Path, run: str = "exp") -> dict[str, list[str]]:
    """Every step directory of a run with its files (slots excluded)."""
    run_dir = root / run
    return {
        d.name: sorted(os.listdir(d))
        for d in sorted(run_dir.iterdir())
        if d.name.startswith("step-")
    }


def test_crash_leftovers_are_removed_at_start(shm_dir, tmp_path):
    local = tmp_path / "local"
    with CheckpointManager("exp", MemoryTier(str(shm_dir)), LocalTier(str(local))) as mgr:
        mgr.save(1, {"x": np.ones(3)}).wait()
    step1 = local / "exp" / "step-000000000001"
    # What a killed process leaves: temporary files in a committed step, a commit marker it
    # never renamed, and a newer step it had only partly written.
    (step1 / ".rank-00000.safetensors.tmp-999-abcdef12").write_bytes(b"partial")
    (step1 / ".COMMIT.tmp-999-abcdef12").write_bytes(b"{}")
    step2 = local / "exp" / "step-000000000002"
    step2.mkdir()
    (step2 / "rank-00000.safetensors").write_bytes(b"complete data, no manifest yet")
    (step2 / ".rank-00000.json.tmp-999-0badf00d").write_bytes(b"{")
    # Another rank's committed-elsewhere file in an incomplete step is not ours to remove.
    step3 = local / "exp" / "step-000000000003"
    step3.mkdir()
    (step3 / "rank-00001.json").write_text("{}")

    tiers = (MemoryTier(str(shm_dir)), LocalTier(str(local)))
    with CheckpointManager("exp", *tiers, rank=0, world_size=2):
        pass
    assert listing(local) == {
        "step-000000000001": ["COMMIT", "rank-00000.json", "rank-00000.safetensors"],
        "step-000000000003": ["rank-00001.json"],
    }
    # With a world of one, rank 1 is outside the world: its leftovers go too.
    with CheckpointManager("exp", *tiers, rank=0, world_size=1):
        pass
    assert "step-000000000003" not in listing(local)


def test_rank_one_of_two_keeps_rank_zeros_files(shm_dir, tmp_path):
    local = tmp_path / "local"
    step = local / "exp" / "step-000000000004"
    step.mkdir(parents=True)
    (step / "rank-00000.safetensors").write_bytes(b"x")
    (step / "rank-00001.safetensors").write_bytes(b"y")
    with CheckpointManager(
        "exp", MemoryTier(str(shm_dir)), LocalTier(str(local)), rank=1, world_size=2
    ):
        pass
    assert listing(local) == {"step-000000000004": ["rank-00000.safetensors"]}


def test_incomplete_steps_older_than_the_newest_commit_are_removed_while_running(shm_dir, tmp_path):
    local = tmp_path / "local"
    with CheckpointManager("exp", MemoryTier(str(shm_dir)), LocalTier(str(local), keep=3)) as mgr:
        mgr.save(1, {"x": 1}).wait()
        stray = local / "exp" / "step-000000000002"
        stray.mkdir()
        (stray / "rank-00000.safetensors").write_bytes(b"orphan of another run attempt")
        mgr.save(3, {"x": 3})
        mgr.wait()  # the step is durable, and garbage collection has run
        assert list(listing(local)) == ["step-000000000001", "step-000000000003"]


def test_expired_steps_leave_no_files_behind(shm_dir, tmp_path):
    local = tmp_path / "local"
    with CheckpointManager(
        "exp", MemoryTier(str(shm_dir), keep=1), LocalTier(str(local), keep=1)
    ) as mgr:
        for step in range(5):
            mgr.save(step, {"w": np.full(1000, step)}).wait()
    assert list(listing(local)) == ["step-000000000004"]
    assert list(listing(shm_dir)) == ["step-000000000004"]


def test_slots_are_adopted_by_the_next_process(shm_dir):
    memory = MemoryTier(str(shm_dir), keep=2)
    state = {"w": np.ones(1 << 18, np.float32)}
    slot_dir = shm_dir / "exp" / ".slots" / "rank-00000"
    with CheckpointManager("exp", memory) as mgr:
        for step in range(4):
            mgr.save(step, state).wait()
    files_before = {p.stat().st_ino for p in (shm_dir / "exp").rglob("*") if p.is_file()
                    and p.suffix != ".json" and p.name != "COMMIT"}  # fmt: skip
    with CheckpointManager("exp", memory) as mgr:
        for step in range(4, 8):
            mgr.save(step, state).wait()
    files_after = {p.stat().st_ino for p in (shm_dir / "exp").rglob("*") if p.is_file()
                   and p.suffix != ".json" and p.name != "COMMIT"}  # fmt: skip
    assert files_after == files_before  # the same three files, never a new one
    assert len(os.listdir(slot_dir)) == 1


def test_slots_follow_a_state_that_grows_and_shrinks(shm_dir):
    with CheckpointManager("exp", MemoryTier(str(shm_dir), keep=1)) as mgr:
        for step, size in enumerate([1000, 500_000, 10, 500_000, 0]):
            state = {"w": np.arange(size, dtype=np.float32)}
            mgr.save(step, state).wait()
            restored_step, restored = mgr.restore()
            assert restored_step == step and np.array_equal(restored["w"], state["w"])
        data = shm_dir / "exp" / "step-000000000004" / "rank-00000.safetensors"
        assert data.stat().st_size == 4096  # header only: slots are cut to the exact size


def test_page_locked_slots_unlock_when_unmapped_and_spares_lock_alike(shm_dir):
    """A framework's device copies need the slot page-locked: once per mapping, undone
    before it is unmapped; the spare the memory worker prepares is locked like the slot
    it follows (so no save pays for it on the training thread)."""
    storage = MemoryStorage(shm_dir)
    events = []

    def pinner(view):
        address = view.ctypes.data
        events.append(("lock", address, view.nbytes))
        return lambda: events.append(("unlock", address, None))

    slot = storage.acquire("exp", 0, 1 << 20)
    address = slot.view().ctypes.data
    slot.pin("torch", pinner)
    slot.pin("torch", pinner)
    assert events == [("lock", address, 1 << 20)]

    storage.prepare_spare("exp", 0, like=slot)
    spare = storage.acquire("exp", 0, 1 << 20)
    spare_address = spare.view().ctypes.data
    assert spare_address != address
    assert events[1:] == [("lock", spare_address, 1 << 20)]
    spare.pin("torch", pinner)
    assert len(events) == 2  # already locked

    storage.release(spare, "exp", 0)
    storage.acquire("exp", 0, 2 << 20)  # the spare, resized: mapped anew, so unlocked first
    assert events[2:] == [("unlock", spare_address, None)]
    storage.release(slot, "exp", 0)
    storage.close()
    assert events[3:] == [("unlock", address, None)]


def _racing_gc(storage, monkeypatch):
    """Each step directory made is removed once, right away, as another rank starting up
    removes an uncommitted step's directory while it is empty."""
    made = storage.make_step_dir
    removed = set()

    def make_then_lose(run, step):
        path = made(run, step)
        if step not in removed:
            removed.add(step)
            os.rmdir(path)
        return path

    monkeypatch.setattr(storage, "make_step_dir", make_then_lose)
    return removed


def test_a_step_directory_removed_by_another_ranks_gc_is_made_again(tmp_path, monkeypatch):
    from mtckpt.tiers.local import LocalStorage
    from mtckpt.tiers.memory import MemoryStorage

    disk = LocalStorage(tmp_path / "disk")
    assert _racing_gc(disk, monkeypatch) is not None
    disk.write_bytes("exp", 1, "rank-00001.json", b"{}")
    assert disk.read_bytes("exp", 1, "rank-00001.json") == b"{}"

    memory = MemoryStorage(tmp_path / "memory")
    removed = _racing_gc(memory, monkeypatch)
    slot = memory.acquire("exp", 3, 4096)
    memory.publish(slot, "exp", 0, 3)
    assert removed == {0}
    assert (tmp_path / "memory" / "exp" / "step-000000000000" / "rank-00003.safetensors").exists()
    memory.close()
