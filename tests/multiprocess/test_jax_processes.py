"""JAX jobs of two processes (jax.distributed on CPU, real processes, 4 devices each):
each process writes only its own distinct shards, replicated shards once; restore agrees
on a step every process holds, and a checkpoint of two processes restores in one."""

import json
import sys
from pathlib import Path

from spawn import TESTS, check_ok, run_ranks

sys.path.insert(0, str(TESTS / "jax_adapter"))
from devices import run_with_devices  # noqa: E402


def said(results) -> list[str]:
    """Each process's last line (gloo prints its connections to stdout before it)."""
    return [result.lines()[-1] for result in results]


def manifest(root: Path, step: int, rank: int) -> dict:
    path = root / "job" / f"step-{step:012d}" / f"rank-{rank:05d}.json"
    return {leaf["key"]: leaf for leaf in json.loads(path.read_text())["leaves"]}


def test_two_processes_write_their_own_shards_and_restore_them(tmp_path):
    saved = check_ok(run_ranks("jax_worker.py", 2, ["save", str(tmp_path), "1", "2"]))
    assert said(saved) == ["saved [1, 2]"] * 2
    first, second = manifest(tmp_path, 2, 0), manifest(tmp_path, 2, 1)
    # w is split 4 x 2 over the 8 devices: each process holds 4 distinct shards
    for rank, records in enumerate((first, second)):
        parts = records["train/params/w"]["parts"]
        assert len(parts) == 4 and all("stored_by" not in part for part in parts)
        rows = {part["global_offset"][0] for part in parts}
        assert rows == ({0, 16} if rank == 0 else {32, 48})
    # bias is replicated on every device: written once, by process 0
    assert "offset" in first["train/params/bias"]
    assert second["train/params/bias"]["stored_by"] == 0
    # emb is split along "model" only: both processes hold both shards; process 0 writes them
    assert all("offset" in part for part in first["train/params/emb"]["parts"])
    assert all(part["stored_by"] == 0 for part in second["train/params/emb"]["parts"])

    restored = check_ok(run_ranks("jax_worker.py", 2, ["restore", str(tmp_path), "2"]))
    assert said(restored) == ["restored 2"] * 2
    # the same checkpoint restored by one process on one device, and on 2
    assert run_with_devices(1, "restore", str(tmp_path), "2", "1", "1") == [
        "restored 2 on 1 devices"
    ]
    assert run_with_devices(2, "restore", str(tmp_path), "2", "1", "2") == [
        "restored 2 on 2 devices"
    ]


def test_processes_agree_on_the_newest_step_both_hold(tmp_path):
    check_ok(run_ranks("jax_worker.py", 2, ["save", str(tmp_path), "1", "2"]))
    # process 1's shard of step 2 is lost: both must restore step 1
    (tmp_path / "job" / f"step-{2:012d}" / "rank-00001.json").unlink()
    restored = check_ok(run_ranks("jax_worker.py", 2, ["restore", str(tmp_path), "1"]))
    assert said(restored) == ["restored 1"] * 2


def test_two_processes_through_the_orbax_manager(tmp_path):
    """Orbax's CheckpointManager API (mtckpt.orbax) in a job of two processes: every step
    Orbax's rule saves, the latest restored by a new manager onto the same mesh."""
    done = check_ok(run_ranks("jax_worker.py", 2, ["orbax", str(tmp_path), *map(str, range(5))]))
    assert said(done) == ["orbax restored 4 of [2, 4]"] * 2
