"""`mtckpt ls | inspect | verify | restore | gc | export` run as real commands in
subprocesses against real checkpoints: multi-tier, sharded over two ranks, damaged,
incomplete, on the moto S3 endpoint and on daemons. Each checks output and exit code."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

import mtckpt
from daemons import replicated, save, wait_for
from mtckpt.torch import LocalShard
from node import side_by_side

RUN = "exp"
STEPS = (1, 2, 3)


def mtckpt_cli(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    env = env if env is not None else {k: v for k, v in os.environ.items()
                                       if not k.startswith("MTCKPT_")}  # fmt: skip
    cmd = [sys.executable, "-m", "mtckpt", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, **kwargs)


def rank_state(step: int, rank: int) -> dict:
    """Rank ``rank``'s half (rows) of a 8x6 weight, a whole bias and plain values."""
    weight = torch.arange(48, dtype=torch.float32).reshape(8, 6) * step
    return {
        "weight": LocalShard(weight[rank * 4 : rank * 4 + 4].clone(), (8, 6), (rank * 4, 0)),
        "bias": torch.full((6,), float(step), dtype=torch.bfloat16),
        "step": step,
        "name": "mlp",
    }


def save_two_ranks(memory: Path, local: Path, steps=STEPS) -> None:
    """Two ranks of one node save ``steps`` into its memory and local tiers, side by side."""
    managers = []
    for rank in (0, 1):
        env = {"LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
        with mock.patch.dict(os.environ, env):
            managers.append(mtckpt.CheckpointManager(
                RUN, rank=rank, world_size=2, memory=mtckpt.MemoryTier(str(memory), keep=5),
                local=mtckpt.LocalTier(str(local), keep=5)))  # fmt: skip

    def save(mgr):
        with mgr:
            for step in steps:
                mgr.save(step, rank_state(step, mgr.rank)).wait()

    side_by_side(save, managers)


@pytest.fixture
def tiers(tmp_path):
    memory, local = tmp_path / "memory", tmp_path / "local"
    save_two_ranks(memory, local)
    return ["--memory", memory, "--local", local]


def flip_byte(path: Path, at: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def step_dir(root: Path, step: int) -> Path:
    return root / RUN / f"step-{step:012d}"


def test_every_command_has_help():
    for command in ("ls", "inspect", "verify", "restore", "gc", "export", "daemon"):
        done = mtckpt_cli(command, "--help")
        assert done.returncode == 0 and "usage: mtckpt " + command in done.stdout


def test_ls_shows_complete_incomplete_and_damaged_steps_with_sizes(tmp_path, tiers):
    memory = tmp_path / "memory"
    (step_dir(memory, 3) / "COMMIT").unlink()  # a save that never finished
    (step_dir(memory, 3) / ".rank-00000.json.tmp-1-abc").write_text("{")  # and its leftover
    (step_dir(memory, 2) / "rank-00001.json").unlink()  # committed, a shard lost
    flip_byte(step_dir(memory, 1) / "rank-00000.safetensors")
    done = mtckpt_cli("ls", *tiers, "--json")
    assert done.returncode == 0, done.stderr
    rows = {(r["tier"], r["step"]): r for r in json.loads(done.stdout)}
    assert rows["memory", 3]["status"] == "incomplete"
    assert rows["memory", 2]["status"] == "damaged"
    assert "committed rank(s) [1] have no manifest" in rows["memory", 2]["problems"][0]
    assert rows["memory", 1]["status"] == "complete"  # listing reads no data
    assert rows["local", 3] | {"modified": None} == {
        "tier": "local", "run": RUN, "step": 3, "status": "complete", "world_size": 2,
        "ranks": [0, 1], "committed_ranks": [0, 1], "bytes": rows["local", 3]["bytes"],
        "modified": None, "problems": [], "references": [],
    }  # fmt: skip
    data = sum((step_dir(tmp_path / "local", 3) / f"rank-0000{r}.safetensors").stat().st_size
               for r in (0, 1))  # fmt: skip
    assert rows["local", 3]["bytes"] == data

    verified = {(r["tier"], r["step"]): r for r in
                json.loads(mtckpt_cli("ls", *tiers, "--verify", "--json").stdout)}  # fmt: skip
    assert verified["memory", 1]["status"] == "damaged"
    assert "rank 0: chunk 0 has crc32c" in verified["memory", 1]["problems"][0]
    assert verified["local", 1]["status"] == "verified"

    text = mtckpt_cli("ls", *tiers).stdout.splitlines()
    assert text[0].split() == ["TIER", "RUN", "STEP", "STATUS", "RANKS", "WORLD", "SIZE", "AGE"]
    assert text[1].split()[:6] == ["memory", RUN, "1", "complete", "0-1", "2"]


def test_inspect_shows_the_tree_dtypes_shapes_and_each_ranks_shards(tiers):
    done = mtckpt_cli("inspect", "2", *tiers, "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert (info["run"], info["step"], info["tier"], info["world_size"]) == (RUN, 2, "memory", 2)
    assert info["framework"] == "torch" and [r["rank"] for r in info["ranks"]] == [0, 1]
    assert all(r["encoding"] == "identity" and r["bytes"] > 96 for r in info["ranks"])
    leaves = {leaf["key"]: leaf for leaf in info["leaves"]}
    assert leaves["weight"]["dtype"] == "F32" and leaves["weight"]["shape"] == [8, 6]
    assert leaves["weight"]["shards"] == [
        {"rank": 0, "shape": [4, 6], "offset": [0, 0], "stored_by": None},
        {"rank": 1, "shape": [4, 6], "offset": [4, 0], "stored_by": None},
    ]
    assert leaves["bias"]["dtype"] == "BF16" and leaves["bias"]["shards"] == []
    assert leaves["step"]["value"] == 2 and leaves["name"]["value"] == "mlp"

    text = mtckpt_cli("inspect", *tiers).stdout  # latest
    assert text.startswith(f"run {RUN} step 3 in the memory tier: world size 2, torch")
    assert "rank 0 [4, 6]@[0, 0], rank 1 [4, 6]@[4, 0]" in text


def test_verify_names_the_damaged_copy_and_exits_1(tmp_path, tiers):
    good = mtckpt_cli("verify", "3", *tiers)
    assert good.returncode == 0, good.stderr
    assert good.stdout.split("\n")[0].startswith("memory   exp step 3: ok (")
    flip_byte(step_dir(tmp_path / "local", 3) / "rank-00001.safetensors")
    bad = mtckpt_cli("verify", "latest", *tiers, "--json")
    assert bad.returncode == 1
    assert bad.stderr.strip() == "mtckpt verify: 1 of 2 copies damaged"
    rows = {r["tier"]: r for r in json.loads(bad.stdout)}
    assert rows["memory"]["status"] == "ok" and rows["local"]["status"] == "damaged"
    assert rows["local"]["problems"] == [
        f"local tier ({tmp_path / 'local'}): run exp step 3 rank 1: chunk 0 has crc32c "
        + rows["local"]["problems"][0].split("crc32c ", 1)[1]
    ]
    everything = mtckpt_cli("verify", "--all", *tiers, "--json")
    assert everything.returncode == 1 and len(json.loads(everything.stdout)) == 6

    missing = mtckpt_cli("verify", "9", *tiers)
    assert missing.returncode == 1
    assert missing.stderr.startswith("mtckpt verify: run exp step 9 is not complete in memory")
    usage = mtckpt_cli("verify", *tiers)
    assert usage.returncode == 2 and "give a STEP (or 'latest'), or --all" in usage.stderr


def test_restore_refills_the_faster_tier_verified_and_skips_a_damaged_copy(tmp_path, tiers):
    memory, local = tmp_path / "memory", tmp_path / "local"
    subprocess.run(["rm", "-rf", str(memory)], check=True)  # node memory lost (a reboot)
    flip_byte(step_dir(local, 3) / "rank-00000.safetensors")
    done = mtckpt_cli("restore", "--run", RUN, *tiers, "--json")
    assert done.returncode == 0, done.stderr
    assert "local tier" in done.stderr and "chunk 0 has crc32c" in done.stderr
    result = json.loads(done.stdout)
    assert (result["step"], result["ranks"], result["source"]) == (2, [0, 1], "local")
    for rank in (0, 1):
        with mock.patch.dict(os.environ, {"LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}):
            mgr = mtckpt.CheckpointManager(RUN, rank=rank, world_size=2,
                                           memory=mtckpt.MemoryTier(str(memory)))  # fmt: skip
        with mgr:
            step, state = mgr.restore(rank_state(0, rank))
        assert step == 2
        expected = rank_state(2, rank)
        assert torch.equal(state["weight"].tensor, expected["weight"].tensor)
        assert torch.equal(state["bias"], expected["bias"]) and state["step"] == 2

    again = mtckpt_cli("restore", "--run", RUN, *tiers)
    assert again.returncode == 0
    assert "is in the memory tier already, the fastest, and verifies" in again.stdout
    absent = mtckpt_cli("restore", "--run", RUN, "--step", "7", *tiers)
    assert absent.returncode == 1 and (
        "step 7 of run 'exp' is not complete for every rank in memory tier" in absent.stderr
    )


def test_restore_with_every_copy_damaged_names_each_and_exits_1(tmp_path, tiers):
    memory, local = tmp_path / "memory", tmp_path / "local"
    subprocess.run(["rm", "-rf", str(memory)], check=True)
    for step in STEPS:
        flip_byte(step_dir(local, step) / "rank-00001.safetensors")
    done = mtckpt_cli("restore", "--run", RUN, *tiers)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"mtckpt restore: no good copy of any step of run 'exp' for every rank in memory tier "
        f"({memory}), local tier ({local}): "
    ), last
    assert [f"step {s} rank-00001.safetensors: chunk 0" in last for s in STEPS] == [True] * 3
    assert not any(memory.glob(f"{RUN}/step-*"))  # nothing half-copied is left


def test_restore_to_a_directory_makes_a_tier_root_a_manager_restores_from(tmp_path, tiers):
    out = tmp_path / "export"
    done = mtckpt_cli("restore", "--run", RUN, "--step", "2", "--to", out, "--ranks", "1",
                      *tiers, "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ranks"] == [1]
    assert sorted(p.name for p in step_dir(out, 2).iterdir()) == [
        "COMMIT", "rank-00001.json", "rank-00001.safetensors"]  # fmt: skip
    verify = mtckpt_cli("verify", "2", "--local", out)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_restore_shows_progress_on_a_terminal(tmp_path, tiers):
    subprocess.run(["rm", "-rf", str(tmp_path / "memory")], check=True)
    done, shown = on_a_terminal("restore", "--run", RUN, *tiers)
    assert done.returncode == 0
    assert "step 3: " in shown and " / " in shown and "/s" in shown


def on_a_terminal(*args) -> tuple[subprocess.CompletedProcess, str]:
    """Run ``mtckpt ARGS`` with its stderr on a pseudo-terminal: the result and what the
    terminal showed."""
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTCKPT_")}
    command = [sys.executable, "-m", "mtckpt", *map(str, args)]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=follower, env=env, timeout=120)
    os.close(follower)
    shown = os.read(leader, 65536).decode()
    os.close(leader)
    return done, shown


@pytest.mark.parametrize("command, shown", [
    (["verify", "3"], "verifying local exp step 3: "),
    (["gc", "--keep", "1"], "verifying local exp: "),
])  # fmt: skip
def test_verify_and_gc_show_progress_on_a_terminal_only(tiers, command, shown):
    done, terminal = on_a_terminal(*command, *tiers)
    assert done.returncode == 0
    assert shown in terminal and "/s" in terminal
    piped = mtckpt_cli(*command, *tiers)
    assert piped.returncode == 0 and "/s" not in piped.stderr


def test_export_shows_reading_and_writing_on_a_terminal_only(tmp_path, tiers):
    done, terminal = on_a_terminal("export", "3", "--out", tmp_path / "a.safetensors", *tiers)
    assert done.returncode == 0
    assert "reading run exp step 3: " in terminal and "/s" in terminal
    assert f"writing {tmp_path / 'a.safetensors'}: " in terminal and " / " in terminal
    piped = mtckpt_cli("export", "3", "--out", tmp_path / "b.safetensors", *tiers)
    assert piped.returncode == 0 and "/s" not in piped.stderr
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_gc_is_a_dry_run_unless_applied_and_keeps_the_newest(tmp_path, tiers):
    local = tmp_path / "local"
    (step_dir(local, 2) / "COMMIT").unlink()  # an old save that never finished
    plan = mtckpt_cli("gc", *tiers, "--keep", "1", "--tier", "local", "--json")
    assert plan.returncode == 0, plan.stderr
    rows = json.loads(plan.stdout)
    assert [(r["step"], r["removed"]) for r in rows] == [(1, False), (2, False)]
    assert rows[1]["reason"] == "incomplete, older than the newest complete step"
    assert step_dir(local, 1).exists() and step_dir(local, 2).exists()
    applied = mtckpt_cli("gc", *tiers, "--keep", "1", "--tier", "local", "--apply")
    assert applied.returncode == 0
    assert "removed local exp step 1: beyond the newest 1 complete" in applied.stdout
    assert sorted(p.name for p in (local / RUN).glob("step-*")) == ["step-000000000003"]
    assert len(list((tmp_path / "memory" / RUN).glob("step-*"))) == 3  # --tier local only
    assert "nothing to remove" in mtckpt_cli("gc", *tiers, "--keep", "1", "--tier", "local").stdout


@pytest.mark.parametrize(
    ("flag", "value"), [("--keep", "0"), ("--keep", "-2"), ("--keep", "two"), ("--keep-every", "0")]
)
def test_gc_refuses_a_keep_below_one(tmp_path, tiers, flag, value):
    done = mtckpt_cli("gc", *tiers, flag, value, "--apply")
    assert done.returncode == 2
    assert f"mtckpt gc: error: argument {flag}: '{value}': expected an integer >= 1" in done.stderr
    for root in (tmp_path / "memory", tmp_path / "local"):
        assert sorted(p.name for p in (root / RUN).glob("step-*")) == [
            f"step-{s:012d}" for s in STEPS]  # fmt: skip


def test_gc_takes_keep_from_the_config_file_else_the_tier_default(tmp_path, tiers):
    memory, local = tmp_path / "memory", tmp_path / "local"
    config = tmp_path / "mtckpt.toml"
    config.write_text(f'[memory]\npath = "{memory}"\nkeep = 3\n'
                      f'[local]\npath = "{local}"\nkeep = 1\n')  # fmt: skip
    done = mtckpt_cli("gc", "--config", config, "--json")
    assert done.returncode == 0, done.stderr
    assert [(r["tier"], r["step"]) for r in json.loads(done.stdout)] == [("local", 1), ("local", 2)]
    assert json.loads(done.stdout)[0]["reason"] == "beyond the newest 1 complete (step 3 verified)"
    default = mtckpt_cli("gc", *tiers, "--json")  # no config: each tier's default keep, 2
    assert [(r["tier"], r["step"]) for r in json.loads(default.stdout)] == [
        ("memory", 1), ("local", 1)]  # fmt: skip


def test_gc_apply_keeps_the_good_step_when_the_newer_ones_are_damaged(tmp_path, tiers):
    local = tmp_path / "local"
    for step in (2, 3):  # cut short: ls sees it from the sizes
        data = step_dir(local, step) / "rank-00001.safetensors"
        os.truncate(data, data.stat().st_size - 10)
    listed = {r["step"]: r for r in json.loads(mtckpt_cli("ls", *tiers, "--tier", "local",
                                                          "--json").stdout)}  # fmt: skip
    assert [listed[s]["status"] for s in STEPS] == ["complete", "damaged", "damaged"]
    assert "rank-00001.safetensors: " in listed[3]["problems"][0]
    assert "bytes, the manifest records" in listed[3]["problems"][0]
    done = mtckpt_cli("gc", *tiers, "--tier", "local", "--keep", "1", "--apply")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "removed local exp step 2", "removed local exp step 3"]  # fmt: skip
    assert all(": damaged: " in line for line in lines)
    assert sorted(p.name for p in (local / RUN).glob("step-*")) == ["step-000000000001"]
    assert mtckpt_cli("verify", "1", "--local", local).returncode == 0


def test_gc_apply_verifies_the_newest_step_before_removing_older_ones(tmp_path, tiers):
    local = tmp_path / "local"
    flip_byte(step_dir(local, 3) / "rank-00000.safetensors")  # only the checksums tell
    assert mtckpt_cli("ls", *tiers, "--tier", "local", "--json").stdout.count("damaged") == 0
    done = mtckpt_cli("gc", *tiers, "--tier", "local", "--keep", "1", "--apply", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["step"], r["removed"]) for r in rows] == [(1, True), (3, True)]
    assert rows[0]["reason"] == "beyond the newest 1 complete (step 2 verified)"
    assert rows[1]["reason"].startswith("damaged: ") and "has crc32c" in rows[1]["reason"]
    assert sorted(p.name for p in (local / RUN).glob("step-*")) == ["step-000000000002"]


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "dcp"])
def test_export_writes_whole_tensors_assembled_from_every_rank(tmp_path, tiers, fmt):
    out = tmp_path / f"step3.{fmt}"
    done = mtckpt_cli("export", "3", "--format", fmt, "--out", out, *tiers)
    assert done.returncode == 0, done.stderr
    weight = torch.arange(48, dtype=torch.float32).reshape(8, 6) * 3
    if fmt == "safetensors":
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            assert torch.equal(f.get_tensor("weight"), weight)
            assert torch.equal(f.get_tensor("bias"), torch.full((6,), 3.0, dtype=torch.bfloat16))
            assert json.loads(f.metadata()["step"]) == {"kind": "int", "value": 3}
        return
    if fmt == "torch":
        state = torch.load(out, weights_only=True)
    else:
        import torch.distributed.checkpoint as dcp

        state = {"weight": torch.empty(8, 6), "bias": torch.empty(6, dtype=torch.bfloat16),
                 "step": 0, "name": ""}  # fmt: skip
        dcp.load(state, checkpoint_id=str(out), no_dist=True)
    assert torch.equal(state["weight"], weight) and state["bias"].dtype == torch.bfloat16
    assert (state["step"], state["name"]) == (3, "mlp")


def test_export_without_a_step_falls_back_past_a_damaged_newest_step(tmp_path, tiers):
    for root in (tmp_path / "memory", tmp_path / "local"):  # every copy of step 3
        flip_byte(step_dir(root, 3) / "rank-00001.safetensors")
    out = tmp_path / "latest.safetensors"
    done = mtckpt_cli("export", "--out", out, *tiers, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["step"] == 2
    assert "no good copy of run exp step 3" in done.stderr and "trying step 2" in done.stderr
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert torch.equal(f.get_tensor("weight"), torch.arange(48.0).reshape(8, 6) * 2)
    asked = mtckpt_cli("export", "3", "--out", tmp_path / "three.safetensors", *tiers)
    assert asked.returncode == 1 and "no good copy of run exp step 3" in asked.stderr


def test_export_of_a_pickled_leaf_needs_allow_pickle(tmp_path):
    with mtckpt.CheckpointManager(RUN, memory=mtckpt.MemoryTier(str(tmp_path / "m")),
                                  allow_pickle=True) as mgr:  # fmt: skip
        mgr.save(1, {"w": np.ones(3), "obj": {1, 2}}).wait()
    refused = mtckpt_cli("export", "--memory", tmp_path / "m", "--format", "torch",
                         "--out", tmp_path / "x.pt")  # fmt: skip
    assert refused.returncode == 1
    assert "key 'obj' was saved with pickle; pass allow_pickle=True" in refused.stderr
    done = mtckpt_cli("export", "--memory", tmp_path / "m", "--format", "torch",
                      "--out", tmp_path / "x.pt", "--allow-pickle")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert torch.load(tmp_path / "x.pt", weights_only=False)["obj"] == {1, 2}


def test_the_tiers_come_from_the_config_file_and_s3(tmp_path, moto, bucket):
    remote = f"s3://{bucket}/ckpt"
    config = tmp_path / "mtckpt.toml"
    options = "\n".join(f"{k} = {json.dumps(v)}" for k, v in moto.options().items()
                        if k != "client_kwargs")  # fmt: skip
    config.write_text(
        f'run = "{RUN}"\n[memory]\npath = "{tmp_path / "memory"}"\n'
        f'[local]\npath = "{tmp_path / "local"}"\n[remote]\nurl = "{remote}"\n'
        f"[remote.storage_options]\n{options}\n"
        '[remote.storage_options.client_kwargs]\nregion_name = "eu-west-1"\n'
    )
    with mtckpt.CheckpointManager.from_config(config) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": np.full(1000, step, np.float32), "step": step}).wait()
    subprocess.run(["rm", "-rf", str(tmp_path / "memory"), str(tmp_path / "local")], check=True)
    listed = mtckpt_cli("ls", "--config", config, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(r["tier"], r["step"], r["status"]) for r in json.loads(listed.stdout)] == [
        ("remote", 1, "complete"), ("remote", 2, "complete")]  # fmt: skip
    done = mtckpt_cli("restore", "--config", config, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["step"], result["source"], len(result["to"])) == (2, "remote", 2)
    with mtckpt.CheckpointManager(RUN, memory=mtckpt.MemoryTier(str(tmp_path / "memory"))) as mgr:
        step, state = mgr.restore()
    assert step == 2 and np.array_equal(state["w"], np.full(1000, 2, np.float32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTCKPT_")}
    env["MTCKPT_CONFIG"] = str(config)
    assert mtckpt_cli("verify", "2", "--tier", "remote", env=env).returncode == 0


def test_ls_shows_what_the_daemon_and_each_peer_hold(cluster):
    daemons = cluster(["node-a", "node-b"])
    save(daemons["node-a"], 0, 2, [1, 2])
    wait_for(lambda: replicated(daemons["node-a"], "exp", 1, 2), what="replicated")
    a = daemons["node-a"]
    done = mtckpt_cli("ls", "--daemon", f"unix://{a.socket}", "--memory", a.memory_root,
                      "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {(r["tier"], r["step"]): r for r in json.loads(done.stdout)}
    assert rows["memory", 2]["ranks"] == [0] and rows["memory", 2]["status"] == "complete"
    assert rows["daemon node-a", 2]["status"] == "own"
    assert rows["peer node-b", 2]["status"] == "replica of node-a"
    assert rows["peer node-b", 2]["bytes"] == rows["daemon node-a", 2]["bytes"] > 1 << 20


def test_bad_selection_exits_2_with_the_reason(tmp_path, tiers):
    done = mtckpt_cli("inspect", "--memory", tmp_path / "memory", "--tier", "remote")
    assert done.returncode == 2
    assert done.stderr.strip() == "mtckpt inspect: --tier remote: not configured (tiers: memory)"
    bad_ranks = mtckpt_cli("restore", "--run", RUN, "--ranks", "0,x", *tiers)
    assert bad_ranks.returncode == 2 and "'0,x': expected ranks such as 0,1" in bad_ranks.stderr
    bad_step = mtckpt_cli("inspect", "two", *tiers)
    assert bad_step.returncode == 2 and "step 'two': expected a step number" in bad_step.stderr
    (tmp_path / "memory" / "other").mkdir()
    (step_dir(tmp_path / "memory", 1).parent.parent / "other" / "step-000000000001").mkdir()
    which = mtckpt_cli("inspect", *tiers)
    assert which.returncode == 2 and "which run? give --run (found: exp, other" in which.stderr


def test_inspect_of_a_garbage_manifest_names_the_file_and_exits_1(tmp_path, tiers):
    memory, local = tmp_path / "memory", tmp_path / "local"
    (step_dir(memory, 3) / "rank-00001.json").write_bytes(b"\x00garbage{")
    done = mtckpt_cli("inspect", "3", *tiers, "--json")  # the local tier's copy is good
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tier"] == "local"
    assert done.stderr.startswith(f"mtckpt inspect: memory tier ({memory}): step 3 "
                                  "rank-00001.json: manifest is not valid JSON")  # fmt: skip
    (step_dir(local, 3) / "rank-00000.json").write_text("[]")
    bad = mtckpt_cli("inspect", "3", *tiers)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith(
        f"mtckpt inspect: run exp step 3 has no readable copy: memory tier ({memory}): step 3 "
        "rank-00001.json: manifest is not valid JSON"
    ), bad.stderr
    assert f"local tier ({local}): step 3 rank-00000.json: manifest is not a JSON object" in (
        bad.stderr
    )
    assert "Traceback" not in bad.stderr


def test_ls_verify_exits_1_when_a_copy_is_damaged(tmp_path, tiers):
    assert mtckpt_cli("ls", *tiers, "--verify").returncode == 0
    flip_byte(step_dir(tmp_path / "local", 2) / "rank-00000.safetensors")
    for extra in ([], ["--json"]):
        done = mtckpt_cli("ls", *tiers, "--verify", *extra)
        assert done.returncode == 1
        assert done.stderr == "mtckpt ls: 1 damaged copy found\n"
    assert mtckpt_cli("ls", *tiers).returncode == 0  # listing alone reads no data


def test_a_tier_directory_given_that_does_not_exist_is_an_error(tmp_path, tiers):
    gone = tmp_path / "nonexistent"
    for command in (["ls"], ["ls", "--verify"], ["inspect"], ["verify", "--all"], ["gc"],
                    ["export", "--out", tmp_path / "x.safetensors"]):  # fmt: skip
        for flag in ("--memory", "--local"):
            given = ["--memory", tmp_path / "memory", "--local", tmp_path / "local"]
            given[given.index(flag) + 1] = gone
            done = mtckpt_cli(*command, *given)
            assert done.returncode == 2, (command, flag, done.stdout)
            assert done.stderr == f"mtckpt {command[0]}: {flag} {gone}: no such directory\n"
    # restore fills a tier that is gone (a node's memory after a reboot)
    done = mtckpt_cli("restore", "--run", RUN, "--memory", gone, "--local", tmp_path / "local")
    assert done.returncode == 0, done.stderr
    assert (step_dir(gone, 3) / "COMMIT").exists()


def test_ls_lists_the_tiers_and_exits_1_when_the_daemon_does_not_answer(tmp_path, tiers):
    gone = f"unix://{tmp_path / 'no.sock'}"
    done = mtckpt_cli("ls", *tiers, "--daemon", gone, "--timeout", "5", "--json")
    assert done.returncode == 1
    assert len(json.loads(done.stdout)) == 6
    assert done.stderr.startswith(f"mtckpt ls: daemon {gone}: ")
    assert done.stderr.endswith(f"mtckpt ls: not listed: daemon {gone} (could not be reached)\n")


def test_ls_with_a_wrong_or_no_token_or_a_peer_gone_exits_1_naming_it(cluster, tmp_path):
    token, wrong = tmp_path / "token", tmp_path / "wrong"
    token.write_text("s3cret-token-0123456789\n")
    wrong.write_text("not-the-token-0123456789\n")
    daemons = cluster(["ls-a", "ls-b"], extra=["--token-file", str(token)])
    a, b = daemons["ls-a"], daemons["ls-b"]
    where = ["--daemon", f"unix://{a.socket}", "--memory", a.memory_root, "--timeout", "10"]
    assert mtckpt_cli("ls", *where, "--token-file", token).returncode == 0
    for given in (["--token-file", wrong], []):
        done = mtckpt_cli("ls", *where, *given)
        assert done.returncode == 1, (given, done.stdout)
        assert done.stderr.startswith(f"mtckpt ls: daemon unix://{a.socket}: "), done.stderr
        assert "not listed: daemon unix://" in done.stderr
        assert "no checkpoints in" in done.stdout  # its own tiers are listed all the same
    b.kill()
    done = mtckpt_cli("ls", *where, "--token-file", token)
    assert done.returncode == 1
    assert f"mtckpt ls: not listed: peer ls-b ({b.address}) (could not be reached)" in done.stderr


def test_restore_from_a_daemon_that_does_not_answer_exits_1_naming_it(tmp_path):
    gone = f"unix://{tmp_path / 'no.sock'}"
    done = mtckpt_cli("restore", "--run", RUN, "--daemon", gone, "--timeout", "5")
    assert done.returncode == 1
    assert done.stderr.startswith(f"mtckpt restore: daemon {gone}: "), done.stderr
