"""SIGKILL at random instants never leaves a checkpoint that restores wrong, and never
loses a committed step: each restart restores bit-exact, at a step no older than before."""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mtckpt import CheckpointManager, LocalTier, MemoryTier
from states import assert_same_state, make_state

TESTS = Path(__file__).resolve().parents[1]


def _pythonpath() -> str:
    """The tests' helpers, then what this process imports mtckpt from (a work tree's src)."""
    return os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))


def start_trainer(memory, local, scale, steps=10_000):
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "PYTHONUNBUFFERED": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    command = [
        sys.executable,
        str(TESTS / "chaos" / "trainer.py"),
        "--memory",
        str(memory),
        "--local",
        str(local),
        "--scale",
        str(scale),
        "--steps",
        str(steps),
    ]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def kill_cycles(memory, local, cycles, seed, scale=64):
    chooser = random.Random(seed)
    restored = []
    for cycle in range(cycles):
        proc = start_trainer(memory, local, scale)
        first = proc.stdout.readline().strip()
        if first != "fresh" and not first.startswith("restored "):
            proc.kill()
            raise AssertionError(f"cycle {cycle} (seed {seed}): {first!r}\n{proc.stderr.read()}")
        restored.append(-1 if first == "fresh" else int(first.split()[1]))
        for _ in range(chooser.randint(1, 6)):
            line = proc.stdout.readline()
            assert line.startswith("saved "), f"cycle {cycle}: {line!r} {proc.stderr.read()}"
        time.sleep(chooser.uniform(0, 0.05))  # land anywhere: staging, checksum, fsync, rename
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return restored


def check_final_state(memory, local, scale=64):
    with CheckpointManager("chaos", MemoryTier(str(memory)), LocalTier(str(local), every=3)) as mgr:
        step, state = mgr.restore()
        assert_same_state(state, make_state(step, scale=scale))
    for path in Path(local, "chaos").glob("step-*/.*"):
        raise AssertionError(f"leftover temporary file after a clean start: {path}")
    return step


def run_scenario(shm_dir, tmp_path, cycles, seed):
    memory, local = shm_dir, tmp_path / "local"
    restored = kill_cycles(memory, local, cycles, seed)
    assert restored[0] == -1
    assert all(b >= a for a, b in zip(restored, restored[1:], strict=False)), (
        f"went backwards: {restored}"
    )
    assert restored[-1] >= 1, f"no progress survived the kills: {restored}"
    final = check_final_state(memory, local)
    assert final >= restored[-1]


def test_sigkill_mid_save_short(shm_dir, tmp_path):
    run_scenario(shm_dir, tmp_path, cycles=6, seed=20261122)


def test_sigkill_with_memory_tier_lost(shm_dir, tmp_path):
    """Kill, then wipe node memory (a reboot): restore comes from the local tier."""
    import shutil

    memory, local = shm_dir, tmp_path / "local"
    kill_cycles(memory, local, cycles=3, seed=7)
    # On a loaded machine every kill may land before the first local commit: one more
    # run, killed once the local tier holds a committed step.
    proc = start_trainer(memory, local, scale=64)
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # never block its prints
    deadline = time.monotonic() + 120
    while not list(Path(local, "chaos").glob("step-*/COMMIT")):
        assert time.monotonic() < deadline, "no step committed in the local tier within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shutil.rmtree(memory)
    memory.mkdir()
    with CheckpointManager("chaos", MemoryTier(str(memory)), LocalTier(str(local), every=3)) as mgr:
        assert mgr.steps()["memory"] == []
        step, state = mgr.restore()
        assert step % 3 == 0
        assert_same_state(state, make_state(step, scale=64))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sigkill_soak(shm_dir, tmp_path):
    run_scenario(shm_dir, tmp_path, cycles=60, seed=int(os.environ.get("MTCKPT_SOAK_SEED", "1")))
