"""The save/restore benchmark runs end to end (small size, the methods needing no torch)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_save_restore.py"


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--size-gib", "0.02", "--tensors", "20", "--repeats", "1",
         "--methods", "memcpy,mtckpt,mtckpt_async", "--local-root", str(tmp_path),
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    for method in ("mtckpt", "mtckpt_async"):  # staging="blocking" and "async"
        assert not report["results"][method]["error"], method
        timings = report["summary"][method]
        for metric in ("blocking", "staged", "memory_durable", "local_durable",
                       "restore_memory_in_place", "restore_local_cold"):  # fmt: skip
            assert timings[metric]["median"] > 0, (method, metric)
    assert report["ratios"]["mtckpt blocking / memcpy"] > 0
    assert report["ratios"]["mtckpt_async blocking (save() returns) / memcpy"] > 0
