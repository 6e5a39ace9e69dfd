"""The redundancy benchmark runs end to end on loopback (small state, two steps): real
daemons under replicas:1 and xor:4, a node lost and recovered under each."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_redundancy.py"


def test_redundancy_benchmark_smoke(tmp_path):
    out = tmp_path / "redundancy.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--mib", "1", "--steps", "2", "--schemes",
         "replicas:1,xor:4", "--root", str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    replicas, xor = report["results"]["replicas:1"], report["results"]["xor:4"]
    for scheme in (replicas, xor):
        assert len(scheme["redundant_s"]) == 2 and min(scheme["redundant_s"]) > 0
        assert scheme["recover_bytes"] > 0 and scheme["recover_s"] > 0
    assert 0 < xor["peer_bytes"] < replicas["peer_bytes"]  # parity, not a whole replica
    names = [c["name"] for c in report["checks"]]
    assert "xor:4 time to redundant / replicas:1" in names, names
