"""What a manager owns on its node's tiers: files only its user may read, its run and rank
held against a second manager, and a step that waits for the node's other ranks only as
long as they may still come."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest

from mtckpt import (
    CheckpointManager,
    ConfigError,
    LocalTier,
    MemoryTier,
    NodeRanksMissingError,
    RankInUseError,
)
from node import side_by_side


def modes(root) -> dict[str, int]:
    """The permission bits of ``root`` and of everything below it, by relative path."""
    found = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, root)] = stat.S_IMODE(os.stat(path).st_mode)
    return found


def test_checkpoint_files_and_directories_are_the_owners_only(shm_dir, tmp_path):
    memory, local = shm_dir / "made" / "by-mtckpt", tmp_path / "nvme" / "ckpt"
    tiers = MemoryTier(str(memory), keep=1), LocalTier(str(local), keep=1)
    with CheckpointManager("exp", *tiers) as mgr:
        for step in range(3):
            mgr.save(step, {"w": np.arange(1000.0), "s": "x"}).wait()
    for root, tier in ((shm_dir / "made", "by-mtckpt"), (tmp_path / "nvme", "ckpt")):
        found = modes(root)  # from the first directory mtckpt made
        assert {f"{tier}/exp/step-000000000002/rank-00000.safetensors",
                f"{tier}/exp/.rank-00000.lock", f"{tier}/exp/step-000000000002/COMMIT",
                f"{tier}/exp/step-000000000002/rank-00000.json"} <= set(found)  # fmt: skip
        for path, mode in found.items():
            is_dir = os.path.isdir(root / path)
            assert mode == (0o700 if is_dir else 0o600), (root, path, oct(mode))
    slots = memory / "exp" / ".slots" / "rank-00000"
    assert len(os.listdir(slots)) == 1
    # A slot an older version left world-readable is made the owner's when reused.
    os.chmod(slots / os.listdir(slots)[0], 0o644)
    with CheckpointManager("exp", *tiers) as mgr:
        mgr.save(3, {"w": np.arange(1000.0), "s": "x"}).wait()
    data = memory / "exp" / "step-000000000003" / "rank-00000.safetensors"
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o600


def test_a_second_manager_of_the_same_run_and_rank_is_refused(shm_dir, tmp_path):
    memory, local = MemoryTier(str(shm_dir)), LocalTier(str(tmp_path / "local"))
    first = CheckpointManager("exp", memory, local)
    first.save(1, {"x": np.ones(3)}).wait()
    lock = shm_dir / "exp" / ".rank-00000.lock"
    with pytest.raises(RankInUseError) as refused:
        CheckpointManager("exp", memory, local)
    assert str(refused.value) == (
        f"run 'exp' rank 0 is in use on the memory tier ({shm_dir}): {lock} is locked by pid "
        f"{os.getpid()} (this process), a manager of the same run and rank not closed yet; "
        "close it first, or use another run name"
    )
    other_memory = MemoryTier(str(tmp_path / "other-memory"))
    with pytest.raises(RankInUseError, match=r"rank 0 is in use on the local tier \("):
        CheckpointManager("exp", other_memory, local)  # the same local tier
    with CheckpointManager("exp", other_memory) as other:  # its memory is not locked after
        other.save(1, {"x": np.zeros(3)}).wait()
    with CheckpointManager("other-run", memory, local) as other:
        other.save(1, {"x": np.zeros(3)}).wait()
    step, state = first.restore()  # the first works on
    assert step == 1 and np.array_equal(state["x"], np.ones(3))
    first.save(2, {"x": np.full(3, 2.0)}).wait()
    first.close()
    with CheckpointManager("exp", memory, local) as again:
        step, state = again.restore()
    assert step == 2 and np.array_equal(state["x"], np.full(3, 2.0))


def test_a_manager_of_another_process_is_named_by_its_pid(shm_dir):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, mtckpt; m = mtckpt.CheckpointManager('exp', "
         f"mtckpt.MemoryTier({str(shm_dir)!r})); print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "ready\n"
        with pytest.raises(RankInUseError, match=rf"is locked by pid {holder.pid}, a manager"):
            CheckpointManager("exp", MemoryTier(str(shm_dir)))
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    with CheckpointManager("exp", MemoryTier(str(shm_dir))):  # released when it exits
        pass


def test_a_forked_child_does_not_keep_the_lock(shm_dir):
    mgr = CheckpointManager("exp", MemoryTier(str(shm_dir)))
    read, write = os.pipe()
    started, started_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a data loader worker, say: outlives the manager's close for a while
        os.close(write)
        os.write(started_write, b"!")  # its fork handlers have run
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    os.close(started_write)
    try:
        assert os.read(started, 1) == b"!"
        mgr.close()
        with CheckpointManager("exp", MemoryTier(str(shm_dir))):
            pass
    finally:
        os.close(write)
        os.close(started)
        os.waitpid(pid, 0)


def test_a_manager_that_fails_to_start_holds_nothing(shm_dir, tmp_path):
    memory = MemoryTier(str(shm_dir))
    with pytest.raises(ConfigError, match="chunk_size"):
        CheckpointManager("exp", memory, chunk_size=10)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"memory tier .* is not usable: .*\.rank-00000\.lock"):
        CheckpointManager("exp", MemoryTier(str(blocker / "sub")))
    (shm_dir / "exp").mkdir()
    (shm_dir / "exp" / "step-000000000001").write_text("a file where a step should be")
    with pytest.raises(ConfigError, match=r"memory tier .* is not usable: .*Not a directory"):
        CheckpointManager("exp", memory)  # fails once it holds the lock: it lets go
    (shm_dir / "exp" / "step-000000000001").unlink()
    with CheckpointManager("exp", memory) as mgr:
        mgr.save(1, {"x": 1}).wait()


def node_managers(tiers, world, **kwargs):
    managers = []
    for rank in range(world):
        with mock.patch.dict(os.environ, {"LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}):
            managers.append(CheckpointManager("exp", *tiers, rank=rank, world_size=world,
                                              **kwargs))  # fmt: skip
    return managers


def test_ranks_of_a_node_commit_each_step_once_all_wrote_it(shm_dir, tmp_path):
    tiers = MemoryTier(str(shm_dir), keep=3), LocalTier(str(tmp_path / "local"), keep=3)
    managers = node_managers(tiers, 3)

    def save(mgr):
        with mgr:
            for step in range(4):
                mgr.save(step, {"x": np.full(5, mgr.rank)}).wait("memory")
                assert (shm_dir / "exp" / f"step-{step:012d}" / "COMMIT").exists()

    side_by_side(save, managers)


def test_a_step_a_rank_of_the_node_skipped_fails_at_once(shm_dir, caplog):
    """Rank 1 waits for rank 0's step 1; rank 0 saves step 2 instead (its own schedule):
    rank 1's step 1 fails as soon as it sees that, not after the timeout."""
    rank0, rank1 = node_managers((MemoryTier(str(shm_dir)),), 2, collective_timeout=300)
    started = time.monotonic()
    waiting = rank1.save(1, {"x": 1})
    rank0.save(2, {"x": 2})
    with pytest.raises(NodeRanksMissingError) as failed:
        waiting.wait()
    assert time.monotonic() - started < 30
    assert str(failed.value) == (
        f"step 1 of run 'exp' cannot commit in the memory tier ({shm_dir}): rank(s) [0] of this "
        "node saved newer step(s) [2] but not this one; this node's ranks [0, 1] are from "
        "LOCAL_RANK=1, LOCAL_WORLD_SIZE=2 (a rank of this node died, or saves other steps)"
    )
    assert isinstance(failed.value, TimeoutError)
    assert not (shm_dir / "exp" / "step-000000000001").exists()  # rank 1's shard is gone
    handle = rank1.save(2, {"x": 2})
    handle.wait()  # both ranks wrote step 2: it commits
    rank0.wait()
    assert rank0.steps()["memory"] == [2] and rank1.steps()["memory"] == [2]
    rank0.close()
    rank1.close()


def test_a_close_with_a_timeout_abandons_a_step_a_dead_node_mate_never_wrote(shm_dir, tmp_path):
    """Rank 1 died before its shard of step 1: rank 0's close(timeout=) returns within it
    (not after collective_timeout), step 1 stays uncommitted everywhere, its local copy is
    dropped, and the step committed before is untouched."""
    tiers = MemoryTier(str(shm_dir), keep=3), LocalTier(str(tmp_path / "local"), keep=3)
    rank0, rank1 = node_managers(tiers, 2, collective_timeout=300)
    for mgr in (rank0, rank1):
        mgr.save(0, {"x": np.full(5, mgr.rank)})
    rank0.wait()
    rank1.wait()
    rank1.close()  # its process is gone
    pending = rank0.save(1, {"x": np.full(5, 0)})
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        rank0.close(timeout=1.0)
    assert time.monotonic() - started < 10
    with pytest.raises(NodeRanksMissingError, match=r"rank\(s\) \[1\] of this node were still "
                       r"missing at close"):  # fmt: skip
        pending.wait()
    assert not (shm_dir / "exp" / "step-000000000001").exists()
    assert not (tmp_path / "local" / "exp" / "step-000000000001" / "COMMIT").exists()
    with CheckpointManager("exp", *tiers, rank=0, world_size=1) as after:
        assert after.steps()["memory"] == [0] and after.steps()["local"] == [0]
