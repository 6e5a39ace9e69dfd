"""The JAX benchmark runs end to end at a small size: mtckpt beside Orbax, every restore
checked against what was saved."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_jax.py"


def test_jax_benchmark_smoke(tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--size-gib", "0.01", "--tensors", "10", "--repeats", "1",
         "--local-root", str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert not any(r["error"] for r in report["results"].values())
    for metric in ("blocking", "memory_durable", "local_durable", "restore_memory",
                   "restore_local_warm", "restore_local_cold"):  # fmt: skip
        assert report["summary"]["mtckpt"][metric]["median"] > 0, metric
    for metric in ("blocking", "local_durable", "restore_local_warm", "restore_local_cold"):
        assert report["summary"]["orbax"][metric]["median"] > 0, metric
    assert [check["verdict"] for check in report["targets"]] != ["n/a"] * 4
