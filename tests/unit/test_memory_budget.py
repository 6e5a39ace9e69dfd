"""The node's memory budget (issue 21): what the memory tier holds is counted by kind on a
real tmpfs; a slot that would not fit drops spare slots first, then the save is skipped
with its reason and a metric, and training goes on."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from mtckpt import CheckpointManager, ConfigError, MemoryTier
from mtckpt.daemon.holdings import Holdings
from mtckpt.daemon.room import Room
from mtckpt.daemon.spares import FREE_DIR, ZeroedSpares
from mtckpt.errors import MemoryBudgetError
from mtckpt.tiers import budget
from mtckpt.tiers.memory import MemoryStorage, open_held

MIB = 1 << 20


def write(path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\1" * size)


def test_usage_counts_each_kind_and_a_hard_link_once(shm_dir):
    write(shm_dir / "run" / "step-000000000001" / "rank-00000.safetensors", 3 * MIB)
    write(shm_dir / "run" / ".slots" / "rank-00000" / "slot-a", 2 * MIB)
    write(shm_dir / ".replicas" / "n2" / "run" / "step-000000000001" / "x", MIB)
    write(shm_dir / ".replicas-free" / "spare", MIB)
    write(shm_dir / ".parity" / "run" / "step-000000000001" / "p.parity", MIB // 2)
    (shm_dir / ".kept" / "run" / "step-000000000001").mkdir(parents=True)
    os.link(shm_dir / "run" / "step-000000000001" / "rank-00000.safetensors",
            shm_dir / ".kept" / "run" / "step-000000000001" / "rank-00000.safetensors")  # fmt: skip
    write(shm_dir / ".held" / "x-rank-00000.safetensors", MIB // 4)
    os.link(shm_dir / ".held" / "x-rank-00000.safetensors",
            shm_dir / ".kept" / "run" / "step-000000000001" / "rank-00001.safetensors")  # fmt: skip
    held = budget.usage(shm_dir)
    assert held == {"steps": 3 * MIB + MIB // 4, "slots": 2 * MIB, "replicas": MIB,
                    "spares": MIB, "parity": MIB // 2, "held": 0, "other": 0}  # fmt: skip
    os.unlink(shm_dir / ".kept" / "run" / "step-000000000001" / "rank-00001.safetensors")
    assert budget.usage(shm_dir)["held"] == MIB // 4
    assert "spare slots 2.0 MiB" in budget.describe(held)
    assert budget.usage(shm_dir / "missing") == dict.fromkeys(budget.KINDS, 0)


def test_spare_slots_give_way_before_a_slot_is_refused(shm_dir):
    storage = MemoryStorage(shm_dir, max_bytes=5 * MIB // 2)
    first, second = (storage.acquire("run", 0, MIB) for _ in range(2))
    storage.release(first, "run", 0)
    storage.release(second, "run", 0)
    assert storage.free_slots("run", 0) == 2
    big = storage.acquire("run", 0, 2 * MIB)  # 2 MiB held + 1 MiB more: one spare goes
    assert big.size == 2 * MIB and storage.free_slots("run", 0) == 0
    with pytest.raises(MemoryBudgetError, match=r"rank 0 would take it to 4\.0 MiB, past its "
                       r"budget of 2\.5 MiB \(held: spare slots 2\.0 MiB\)"):  # fmt: skip
        storage.acquire("run", 0, 2 * MIB)
    storage.close()


def state(step: int) -> dict:
    return {"w": np.full(MIB // 4, step, np.float32), "step": step}


def test_a_save_past_the_budget_is_skipped_and_counted_and_training_goes_on(shm_dir):
    tier = MemoryTier(str(shm_dir), keep=1, max_bytes=3 * MIB // 2)  # one step, no more
    with CheckpointManager("run", memory=tier, rank=0, world_size=1) as mgr:
        mgr.save(1, state(1)).wait()
        handle = mgr.save(2, state(2))
        handle.wait()  # nothing to wait for, no error
        assert "past its budget of 1.5 MiB" in handle.skipped_reason
        assert mgr.metrics.samples()['mtckpt_saves_skipped_total{reason="memory budget"}'] == 1
        assert mgr.save(3, state(3)).skipped_reason
        step, restored = mgr.restore()
    assert step == 1 and restored["step"] == 1
    assert budget.total(budget.usage(shm_dir)) <= 3 * MIB // 2


def test_an_expired_step_a_sender_holds_counts_against_the_budget_until_let_go(shm_dir):
    tier = MemoryTier(str(shm_dir), keep=1, max_bytes=5 * MIB // 2)  # two steps
    with CheckpointManager("run", memory=tier, rank=0, world_size=1) as mgr:
        mgr.save(1, state(1)).wait()
        step_1 = shm_dir / "run" / "step-000000000001" / "rank-00000.safetensors"
        sender = open_held(step_1)  # the daemon sending step 1 to a peer
        assert not mgr.save(2, state(2)).skipped_reason  # step 1 expires, still held
        deadline = time.monotonic() + 10
        while step_1.exists() and time.monotonic() < deadline:  # retention follows the commit
            time.sleep(0.01)
        size = os.fstat(sender.fileno()).st_blocks * 512
        assert budget.usage(shm_dir)["held"] == size
        # Steps 1 (held) and 2 and a new slot for 3 would be three: refused, named.
        handle = mgr.save(3, state(3))
        assert "expired steps still being sent 1.0 MiB" in handle.skipped_reason
        sender.close()  # sent: its bytes are freed at the next save's budget check
        assert not mgr.save(4, state(4)).skipped_reason
        assert budget.usage(shm_dir)["held"] == 0
        assert not any((shm_dir / ".held").iterdir())
        assert mgr.restore()[0] == 4
        assert budget.total(budget.usage(shm_dir)) <= 5 * MIB // 2


def test_a_budget_that_fits_keeps_every_step(shm_dir):
    tier = MemoryTier(str(shm_dir), keep=1, max_bytes=3 * MIB)
    with CheckpointManager("run", memory=tier, rank=0, world_size=1) as mgr:
        for step in range(1, 6):
            handle = mgr.save(step, state(step))
            handle.wait()
            assert not handle.skipped_reason
        assert mgr.restore()[0] == 5
        assert budget.total(budget.usage(shm_dir)) <= 3 * MIB


@pytest.mark.parametrize("value", [0, -1, 1.5, "1GiB"])
def test_a_bad_budget_is_named(value):
    with pytest.raises(ConfigError, match="max_bytes must be an int >= 1 or None"):
        MemoryTier(max_bytes=value)


def test_the_daemon_drops_its_spare_parity_files_before_refusing_a_peer(shm_dir):
    spares = ZeroedSpares(shm_dir, fits=lambda size: True)
    spares.want(1, MIB)
    deadline = time.monotonic() + 10
    while not list((shm_dir / FREE_DIR).glob("spare-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert budget.usage(shm_dir)["spares"] == MIB
    room = Room(Holdings("n0", shm_dir, keep=2), MIB + MIB // 2, drop_spares=spares.drop)
    assert not room.fits(MIB)
    room.admit(MIB, "a parity piece")  # fits once the spare is gone
    assert budget.usage(shm_dir)["spares"] == 0 and room.fits(MIB)
    with pytest.raises(MemoryBudgetError, match=r"a larger piece \(2\.0 MiB\) refused"):
        room.admit(2 * MIB, "a larger piece")
    spares.close()


def test_reserve_prepares_the_slots_the_first_saves_take(shm_dir):
    state = {"w": np.ones(MIB, np.uint8), "b": np.arange(1000, dtype=np.float32)}
    with CheckpointManager("r", memory=MemoryTier(str(shm_dir), keep=2)) as mgr:
        reserved = mgr.reserve(state)
        slots = sorted((shm_dir / "r" / ".slots" / "rank-00000").iterdir())
        assert len(slots) == 3 and reserved == 3 * slots[0].stat().st_size
        inodes = {slot.stat().st_ino for slot in slots}
        assert mgr.reserve(state) == 0  # ready already
        for step in (1, 2, 3):
            mgr.save(step, state).wait()
            data = shm_dir / "r" / f"step-{step:012d}" / "rank-00000.safetensors"
            assert data.stat().st_ino in inodes  # a reserved slot, not a new file


def test_reserve_stays_within_the_memory_budget(shm_dir):
    state = {"w": np.ones(MIB, np.uint8)}
    memory = MemoryTier(str(shm_dir), keep=2, max_bytes=2 * MIB + MIB // 2)
    with CheckpointManager("r", memory=memory) as mgr:
        assert 0 < mgr.reserve(state) <= 2 * (MIB + 4096)  # two slots fit, not three
        assert budget.total(budget.usage(shm_dir)) <= 2 * MIB + MIB // 2
