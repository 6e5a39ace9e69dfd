"""`mtckpt plan` run as a real command: the table, --json, an inputs file with flags over
it, --probe, and exit code 2 with the flag or field named for bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from plan_inputs import HARNESS

TIERS = ["--tier", "memory:stall=0.3,durable=0.6,restore=2",
         "--tier", "peers:durable=20,restore=20",
         "--tier", "local:stall=0.5,durable=10,restore=10",
         "--tier", "remote:stall=5,durable=60,restore=90"]  # fmt: skip
JOB = ["--nodes", "64", "--step-seconds", "2", "--mtbf-hours", "1000", "--trainer-crashes-per-day",
       "4", "--restart-seconds", "120", "--state-gib", "40"]  # fmt: skip
QUICK = ["--runs", "2", "--sim-failures", "300"]


def plan(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTCKPT_")}
    return subprocess.run([sys.executable, "-m", "mtckpt", "plan", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip


@pytest.fixture
def inputs_file(tmp_path):
    path = tmp_path / "inputs.json"
    path.write_text(json.dumps(HARNESS))
    return path


def test_table_toml_and_goodput():
    out = plan(*JOB, *TIERS, *QUICK)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("64 nodes, 40.0 GiB of state per node, step 2 s of compute")
    assert "failures per day: node 1.54, trainer 4" in lines[0]
    header = next(line for line in lines if line.startswith("TIER"))
    assert header.split() == ["TIER", "EVERY", "INTERVAL", "YOUNG/DALY", "CONFIGURED",
                              "RECOVERS"]  # fmt: skip
    rows = {line.split()[0]: line for line in lines if line.split()[:1] in
            (["memory"], ["peers"], ["local"], ["remote"])}  # fmt: skip
    assert rows["memory"].split()[-1] == "trainer" and rows["peers"].split()[-1] == "node"
    assert "(capped)" in rows["remote"]
    every = {line.split()[0][1:-1]: None for line in lines if line.startswith("[")}
    assert list(every) == ["memory", "local", "remote"]
    assert "# peers: replicate each memory step; survive 1 lost node(s)" in lines
    assert next(line for line in lines if line.startswith("GOODPUT")).split() == [
        "GOODPUT", "ANALYTIC", "FIRST", "ORDER", "SIMULATED", "(95%)"]  # fmt: skip
    goodput = next(line for line in lines if line.startswith("recommended")).split()
    assert goodput[1].endswith("%") and goodput[4] == "±"
    assert float(goodput[2][:-1]) <= float(goodput[1][:-1])
    assert abs(float(goodput[1][:-1]) - float(goodput[3][:-1])) < 1.0


def test_json_output():
    out = plan(*JOB, *TIERS, *QUICK, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    tiers = report["tiers"]
    assert list(tiers) == ["memory", "peers", "local", "remote"]
    assert tiers["peers"]["every"] == tiers["memory"]["every"]
    assert tiers["local"]["every"] % tiers["memory"]["every"] == 0
    assert tiers["remote"]["every"] % tiers["local"]["every"] == 0
    assert tiers["memory"]["young_daly_seconds"] == pytest.approx(
        (2 * 0.3 / ((64 / 1000 + 4 / 24) / 3600)) ** 0.5
    )
    assert tiers["remote"]["young_daly_seconds"] is None and tiers["remote"]["capped"]
    assert report["failures"]["node"]["recovered_from"] == "peers"
    assert report["failures"]["node"]["per_hour"] == pytest.approx(0.064)
    recommended = report["goodput"]["recommended"]
    assert 0.9 < recommended["first_order"] < recommended["analytic"] < 1
    assert recommended["simulated"]["runs"] == 2
    assert abs(recommended["simulated"]["mean"] - recommended["analytic"]) < 0.01
    assert report["goodput"]["configured"] is None
    assert f"[memory]\nevery = {tiers['memory']['every']}\n" in report["toml"]
    assert report["inputs"]["state_bytes_per_node"] == 40 << 30


def test_inputs_file_predicts_the_configured_schedule_and_flags_override_it(inputs_file):
    out = plan("--inputs", inputs_file, *QUICK, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    configured = report["goodput"]["configured"]
    assert configured["every"] == {"memory": 1, "peers": 1, "local": 10, "remote": 20}
    assert configured["simulated"]["failures"] > 0
    assert configured["analytic"] < report["goodput"]["recommended"]["analytic"]
    assert [t["configured_every"] for t in report["tiers"].values()] == [1, 1, 10, 20]

    out = plan("--inputs", inputs_file, "--step-seconds", "1.0", "--failures-per-day", "48",
               "--tier", "memory:stall=0.05", *QUICK, "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    inputs = json.loads(out.stdout)["inputs"]
    assert inputs["step_seconds"] == 1.0
    assert inputs["failures_per_hour"] == {"node": 2.0, "trainer": 0.0, "two-nodes": 0.0}
    assert inputs["tiers"]["memory"] == {"stall_seconds": 0.05, "durable_seconds": 0.02,
                                         "restore_seconds": 0.2, "every": 1}  # fmt: skip
    assert inputs["restart_seconds"] == 12.0  # the file's, not the default


def test_probe_measures_this_node(tmp_path):
    out = plan("--probe", "--probe-mib", "4", "--state-gib", "0.0625", "--local-root", tmp_path,
               "--nodes", "4", "--step-seconds", "0.5", "--trainer-crashes-per-day", "24",
               *QUICK, "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "probe: memory copy" in out.stderr
    assert "peers left out: give --link-gbps" in out.stderr
    assert "remote left out: give --object-gbps" in out.stderr
    tiers = json.loads(out.stdout)["inputs"]["tiers"]
    assert list(tiers) == ["memory", "local"]
    assert 0 < tiers["memory"]["stall_seconds"] < tiers["memory"]["durable_seconds"]
    assert tiers["local"]["stall_seconds"] == 0 and tiers["local"]["restore_seconds"] > 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--step-seconds", "-1", "--nodes", "2"],
         "argument --step-seconds: '-1': expected a number > 0"),
        (["--nodes", "0"], "argument --nodes: '0': expected an integer >= 1"),
        (["--tier", "tape:restore=1"], "unknown tier 'tape'"),
        (["--tier", "local:speed=3"], "expected KEY=VALUE with KEY one of"),
        ([*JOB, "--tier", "remote:stall=5"],
         "tiers.remote.restore_seconds (--tier remote:restore=S): required"),
        ([*JOB, "--tier", "memory:stall=0.1,restore=1"],
         "failures_per_hour.node: no configured tier survives a node failure"),
        (["--nodes", "4", "--step-seconds", "1", "--tier", "remote:restore=1"],
         "failures_per_hour (--mtbf-hours / --failures-per-day / --trainer-crashes-per-day): "
         "every failure rate is zero"),
        ([*JOB, "--failures-per-day", "3", *TIERS],
         "give one of --mtbf-hours (per node) and --failures-per-day"),
        (["--step-seconds", "1", "--mtbf-hours", "100", *TIERS], "--mtbf-hours needs --nodes"),
        (["--step-seconds", "1", "--failures-per-day", "3", *TIERS],
         "nodes (--nodes): required"),
        ([*JOB[:-2], "--probe"], "--probe needs --state-gib"),
        ([*JOB, "--probe", "--local-root", "/nonexistent/plan"],
         "--local-root /nonexistent/plan: no such directory"),
        ([*JOB, *TIERS, "--link-gbps", "10"], "--link-gbps and --object-gbps go with --probe"),
        ([*JOB, *TIERS, "--replicas", "64"], "peer_losses_tolerated (--replicas): at most"),
    ],
)  # fmt: skip
def test_bad_flags_exit_2_naming_the_flag(args, message):
    out = plan(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr
    assert out.stdout == ""


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": 2}, "version: expected 1, got 2"),
        ({"failures_per_hour": {"meteor": 1.0}}, "unknown failure class 'meteor'"),
        ({"tiers": {"remote": {"stall_seconds": 1.0, "durable_seconds": 1.0}}},
         "tiers.remote: missing restore_seconds"),
        ({"tiers": {"memory": {"stall_seconds": 0, "durable_seconds": 0, "restore_seconds": 1},
                    "local": {"stall_seconds": 0, "durable_seconds": 1, "restore_seconds": 1}}},
         "no configured tier survives a node failure (configure peers or remote)"),
    ],
)  # fmt: skip
def test_bad_inputs_file_exits_2_naming_the_field(tmp_path, change, message):
    path = tmp_path / "inputs.json"
    path.write_text(json.dumps({**HARNESS, **change}))
    out = plan("--inputs", path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.startswith("mtckpt plan: ") and message in out.stderr
