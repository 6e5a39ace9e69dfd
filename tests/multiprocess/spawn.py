"""The one helper that starts the ranks of a multi-process test: real processes with
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, as torchrun would, on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mtckpt
from ports import free_port

TESTS = Path(__file__).resolve().parents[1]
# The ranks import the tests' helpers and the same mtckpt as the test (a worktree's, not an
# installed one).
PYTHONPATH = os.pathsep.join([str(TESTS), str(Path(mtckpt.__file__).resolve().parents[1])])


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str

    def lines(self) -> list[str]:
        return self.stdout.splitlines()


def run_ranks(
    script: str,
    world: int,
    args: list[str],
    *,
    timeout: float = 180,
    per_rank_env: dict[int, dict[str, str]] | None = None,
) -> list[RankResult]:
    """Run ``world`` ranks of ``tests/multiprocess/{script}`` and wait for all of them; kill
    every rank and fail if they are not done within ``timeout`` seconds (a hang)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        env.update(
            RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), PYTHONPATH=PYTHONPATH, PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",
        )  # fmt: skip
        env.update((per_rank_env or {}).get(rank, {}))
        command = [sys.executable, str(TESTS / "multiprocess" / script), *args]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    deadline = time.monotonic() + timeout
    results = []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            outputs = [p.communicate() for p in procs]
            detail = "\n".join(f"--- rank {r}\n{o}\n{e}" for r, (o, e) in enumerate(outputs))
            raise AssertionError(
                f"ranks still running after {timeout} s (a hang?)\n{detail}"
            ) from None
        results.append(RankResult(rank, proc.returncode, out, err))
    return results


def check_ok(results: list[RankResult]) -> list[RankResult]:
    for result in results:
        assert result.returncode == 0, f"rank {result.rank} failed:\n{result.stderr}"
    return results
