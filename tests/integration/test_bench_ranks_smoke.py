"""The multi-rank benchmark runs end to end: 2 gloo ranks save (mtckpt with both staging
modes), 1 rank restores with resharding (small size, mtckpt and memcpy only)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_ranks.py"


def test_bench_ranks_smoke(tmp_path):
    out = tmp_path / "ranks.json"
    memory_root = tmp_path / "shm"
    memory_root.mkdir()
    result = subprocess.run(
        [sys.executable, str(BENCH), "--size-gib", "0.02", "--tensors", "20", "--ranks", "2",
         "--repeats", "1", "--methods", "memcpy,mtckpt,mtckpt_async",
         "--memory-root", str(memory_root),
         "--local-root", str(tmp_path / "disk"), "--out", str(out)],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["params"]["worlds"] == [2]
    assert report["params"]["reshard_pairs"] == [[2, 1]]
    for key, launch in report["launches"].items():
        assert launch["error"] is None, key
    assert len(report["launches"]["world-2/mtckpt"]["ranks"]) == 2

    save = report["summary"]["saves"]["2"]
    for metric in ("blocking", "memory_durable", "local_durable", "restore_same_world"):
        assert save["mtckpt"][metric]["median"] > 0, metric
        assert len(save["mtckpt"][metric]["per_rank_median"]) == 2, metric
    for metric in ("blocking", "staged", "memory_durable", "local_durable"):
        assert save["mtckpt_async"][metric]["median"] > 0, metric
    assert "restore_same_world" not in save["mtckpt_async"]  # checked once, not timed
    assert save["memcpy"]["numpy_copyto"]["median"] > 0

    reshard = report["summary"]["reshard"]["2->1"]
    for metric in ("numpy_copyto", "mtckpt_restore", "mtckpt_restore_local"):
        assert reshard[metric]["median"] > 0, metric
    assert "dcp_load" not in reshard  # not asked for

    checks = {check["name"]: check for check in report["targets"]}
    blocking = checks["world 2: mtckpt blocking / memcpy of the rank's bytes"]
    assert blocking["value"] > 0 and blocking["verdict"] in ("PASS", "FAIL")
    for name in (
        "world 2: mtckpt_async blocking (save() return) / memcpy of the rank's bytes",
        "world 2: dcp.async_save blocking / mtckpt_async blocking (save() return)",
    ):
        assert checks[name]["verdict"] in ("PASS", "FAIL", "n/a"), name
    restore = checks["2 -> 1 ranks: mtckpt restore with resharding / memcpy"]
    assert restore["value"] > 0 and restore["verdict"] in ("PASS", "FAIL")
    assert list(memory_root.iterdir()) == []  # the checkpoints it made are gone
