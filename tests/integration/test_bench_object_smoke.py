"""The object-tier benchmark runs end to end (small sizes, zstd, the moto S3 endpoint and
the node daemon included)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("moto")
pytest.importorskip("zstandard")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_object.py"


def test_object_benchmark_smoke(tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--size-gib", "0.01", "--repeats", "1",
         "--loop-steps", "20", "--loop-save-every", "10", "--loop-size-gib", "0.005",
         "--loop-rounds", "1", "--compression", "zstd", "--local-root", str(tmp_path),
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    for figures in report["results"].values():
        assert figures["flush_s"][0] > 0 and figures["restore_s"] > 0
        assert 0 < figures["stored_bytes"] < figures["bytes"]  # zstd shrank the weights
    assert len(report["loops"]["flushing to S3, by the node daemon"]) == 20
