"""`mtckpt daemon` configured from the shared TOML file and MTCKPT_* variables, flags on top;
`mtckpt restore` finding the daemon through the same file."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("grpc")

from daemons import free_port  # noqa: E402
from mtckpt.daemon.rpc import Client  # noqa: E402


def mtckpt(*args, env=None):
    """Run the command line to its end."""
    return subprocess.run([sys.executable, "-m", "mtckpt", *args], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def start(args, env, log):
    proc = subprocess.Popen([sys.executable, "-m", "mtckpt", "daemon", *args], env=env,
                            stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
    line = proc.stdout.readline()
    if "ready" not in line:
        proc.kill()
        raise AssertionError(f"the daemon did not start: {line!r}")
    return proc


def test_daemon_and_restore_take_their_settings_from_the_config_file(tmp_path):
    port = free_port()
    socket = tmp_path / "d.sock"
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    path = tmp_path / "mtckpt.toml"
    path.write_text(
        'run = "exp"\n'
        f'[memory]\npath = "{tmp_path / "memory"}"\n'
        f'[daemon]\nnode_id = "from-file"\nlisten = "127.0.0.1:{port}"\nsocket = "{socket}"\n'
        f'zone = "rack-a"\nreplicas = 0\ntoken_file = "{token}"\n'
    )
    env = {**os.environ, "MTCKPT_CONFIG": str(path), "MTCKPT_DAEMON_ZONE": "rack-b"}
    env.pop("MTCKPT_NODE_ID", None)
    with open(tmp_path / "daemon.log", "ab") as log:
        proc = start(["--node-id", "from-flag"], env, log)
    try:
        with Client(f"unix://{socket}", token="s3cret-token-0123456789") as client:
            status = client.status(timeout=10)
        assert status.node_id == "from-flag"  # the flag over the file
        assert status.zone == "rack-b"  # the variable over the file
        assert status.memory_root == str(tmp_path / "memory")  # the memory tier's path
        assert status.address == f"127.0.0.1:{port}" and status.replicas == 0

        # `mtckpt restore` finds the daemon, and its token, through the same file: the
        # daemon answers (an empty node: nothing to restore) rather than refusing it.
        result = mtckpt("restore", "--run", "exp", "--json", env=env)
        assert result.returncode == 1
        assert "run 'exp': no step is complete for every rank" in result.stderr
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


@pytest.mark.parametrize(
    "text, args, message, code",
    [
        ("[daemon]\nreplica = 1\n", [], "unknown key daemon.replica", 1),
        ('[daemon]\nkeep = "x"\n', [], "daemon.keep must be of type int", 1),
        ("[daemon]\n", [], "no memory root", 2),
        ('[daemon]\nmemory_root = "/tmp/m"\n', ["--tls-cert", "c.pem"], "go together", 2),
        ('[daemon]\nmemory_root = "/tmp/m"\n', ["--nice", "25"], "nice must be an int in 0..19", 1),
        (
            '[daemon]\nmemory_root = "/tmp/m"\n',
            ["--remote", "bucket"],
            "remote.url must be a URL",
            1,
        ),
        (
            '[daemon]\nmemory_root = "/tmp/m"\n[remote]\nurl = "s3://b"\ncompression = "lz4"\n',
            [],
            "remote.compression must be None or 'zstd'",
            1,
        ),
    ],
)
def test_bad_daemon_settings_exit_non_zero_with_the_reason(tmp_path, text, args, message, code):
    """Bad settings exit 1, a missing or incomplete option (bad usage) 2; one line says why."""
    path = tmp_path / "mtckpt.toml"
    path.write_text(text)
    result = mtckpt("daemon", "--config", str(path), *args)
    assert result.returncode == code
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_restore_without_a_daemon_reads_the_configured_tiers(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTCKPT_")}
    env["MTCKPT_MEMORY_PATH"] = str(tmp_path / "empty")
    result = mtckpt("restore", "--run", "exp", "--json", env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "mtckpt restore: no checkpoint of run 'exp' is complete for every rank in memory tier "
        f"({tmp_path / 'empty'})"
    )


def test_the_daemon_runs_below_the_trainers_cpu_priority(cluster):
    daemons = cluster(["nice-a", "nice-b"], per_node={"nice-b": ["--nice", "0"]})
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, daemons["nice-a"].proc.pid) == min(19, mine + 10)
    assert os.getpriority(os.PRIO_PROCESS, daemons["nice-b"].proc.pid) == mine
