"""The container image (integrations/container), built here by build.sh from Debian's
packages and PyPI, and run for real with podman: three node containers, each with its own
memory volume, started with the sidecar manifest's daemon command and the ConfigMap's
mtckpt.toml; trainers save through them; one node is lost (its container SIGKILLed, its
volumes gone) and replaced; the operator's walk-through (docs/operations.md) runs inside
the replacement, and its trainer restores bit-exact from node memory.

Needs root, and mmdebstrap, buildah, podman (Debian's packages); marked slow."""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "integrations" / "container" / "build.sh"
KUBERNETES = REPO / "integrations" / "kubernetes" / "base"
TRAINER = Path(__file__).with_name("container_trainer.py")
WALKTHROUGH = REPO / "docs" / "operations.md"
IMAGE = "localhost/mtckpt-test:latest"
NODES = ["node-0", "node-1", "node-2"]
RUN = "exp"  # the walk-through's run name


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {done.returncode}\n"
                             f"{done.stdout}{done.stderr}")  # fmt: skip
    return done


def host_flags() -> list[str]:
    """What podman needs on this kind of host: crun refuses a hybrid cgroup hierarchy (v1
    controllers beside an empty v2) where runc does not, and podman's default rlimits are
    raised past what the host allows (no CAP_SYS_RESOURCE), so they are set within it."""
    flags = ["--runtime", "runc"] if hybrid_cgroups() else []
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536)
    return [*flags, "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"]


def hybrid_cgroups() -> bool:
    return os.path.ismount("/sys/fs/cgroup/unified")


@pytest.fixture(scope="module")
def image():
    tools = ["mmdebstrap", "buildah", "podman", *(["runc"] if hybrid_cgroups() else [])]
    missing = [tool for tool in tools if not shutil.which(tool)]
    assert not missing, f"apt-get install {' '.join(missing)}: the image test needs them"
    done = subprocess.run([str(BUILD), IMAGE], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    return IMAGE


def daemon_container() -> dict:
    docs = yaml.safe_load_all((KUBERNETES / "sidecar-job.yaml").read_text())
    job = next(doc for doc in docs if doc and doc["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    return next(c for c in pod["initContainers"] if c["name"] == "mtckpt-daemon")


def config_toml() -> str:
    configmap = yaml.safe_load((KUBERNETES / "configmap.yaml").read_text())
    return configmap["data"]["mtckpt.toml"]


class Nodes:
    """Node containers on one podman network, found by the DNS name the ConfigMap's
    peers_dns asks for (the Job's headless service, here a network alias)."""

    def __init__(self, image: str, files: Path) -> None:
        self.image = image
        self.prefix = f"mtckpt-test-{os.getpid()}"
        self.network = self.prefix
        (files / "mtckpt.toml").write_text(config_toml())
        (files / "token").write_text(secrets.token_hex(32))
        self.files = files
        self.started: set[str] = set()
        podman("network", "create", self.network)

    def name(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def start(self, node: str) -> None:
        daemon = daemon_container()
        peers_host = re.search(r'peers_dns = "(\w+):', config_toml()).group(1)
        command = daemon["command"]
        podman("run", "--detach", *host_flags(), "--name", self.name(node), "--hostname", node,
               "--network", self.network, "--network-alias", peers_host,
               "--health-interval", "disable",  # run by hand below; no systemd timer here
               "--env", f"MTCKPT_NODE_ID={node}", "--env", "MTCKPT_CONFIG=/etc/mtckpt/mtckpt.toml",
               "--env", f"MTCKPT_RUN={RUN}",
               "--tmpfs", "/mtckpt/memory:rw,size=256m,mode=0700,U",
               "--volume", f"{self.name(node)}-local:/mtckpt/local:U",
               "--volume", f"{self.files / 'mtckpt.toml'}:/etc/mtckpt/mtckpt.toml:ro",
               "--volume", f"{self.files / 'token'}:/etc/mtckpt/token:ro",
               "--volume", f"{TRAINER}:/opt/test/trainer.py:ro",
               "--entrypoint", command[0], self.image, *command[1:])  # fmt: skip
        self.started.add(node)
        self.wait(node, ["python3", "-c", "import urllib.request as r; "
                         "r.urlopen('http://127.0.0.1:9090/readyz', timeout=2)"],
                  what="its daemon ready (/readyz)")  # fmt: skip

    def exec(self, node: str, *command: str, env: dict | None = None, check: bool = True):
        flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
        return podman("exec", *flags, self.name(node), *command, check=check, timeout=300)

    def trainer(self, node: str, *args: str, check: bool = True):
        env = {"RANK": NODES.index(node), "WORLD_SIZE": len(NODES)}
        return self.exec(node, "python3", "/opt/test/trainer.py", *args, env=env, check=check)

    def wait(self, node: str, command: list[str], what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            done = self.exec(node, *command, check=False)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                logs = podman("logs", self.name(node), check=False)
                raise AssertionError(f"{node}: not {what} after {timeout} s\n{done.stderr}\n"
                                     f"{logs.stdout[-4000:]}{logs.stderr[-4000:]}")  # fmt: skip
            time.sleep(1)

    def lose(self, node: str) -> None:
        """The node is gone: its container SIGKILLed, its memory and local volumes with it."""
        podman("kill", "--signal", "KILL", self.name(node))
        podman("rm", self.name(node))
        podman("volume", "rm", f"{self.name(node)}-local")

    def close(self) -> None:
        for node in self.started:
            podman("rm", "--force", "--time", "0", self.name(node), check=False)
            podman("volume", "rm", "--force", f"{self.name(node)}-local", check=False)
        podman("network", "rm", "--force", self.network, check=False)


@pytest.fixture
def nodes(image, tmp_path):
    tmp_path.chmod(0o755)  # the containers' user 1000 reads the config and token
    made = Nodes(image, tmp_path)
    yield made
    made.close()


def test_the_image_runs_the_daemon_as_user_1000_with_the_native_path(image):
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == "1000:1000"
    assert config["Entrypoint"] == ["mtckpt"]
    assert config["Cmd"][0] == "daemon"
    assert "/healthz" in " ".join(inspected["Healthcheck"]["Test"])
    done = podman("run", "--rm", *host_flags(), "--entrypoint", "python3", image, "-c",
                  "import os, grpc, s3fs, mtckpt._native; print(os.getuid(), "
                  "*os.listdir('/opt/mtckpt/wheels'))")  # fmt: skip
    version = re.search(r'^version = "(.*)"', (REPO / "pyproject.toml").read_text(), re.M)[1]
    # the wheel a trainer image with the same Python installs (docs/kubernetes.md)
    assert done.stdout.split() == ["1000", f"mtckpt-{version}-cp311-cp311-linux_x86_64.whl"]


def test_a_lost_node_container_is_replaced_and_restores_bit_exact_from_its_peers(nodes):
    for node in NODES:
        nodes.start(node)
    for node in NODES:
        nodes.trainer(node, "save", "1", "2")
    for node in NODES:
        nodes.wait(node, ["python3", "/opt/test/trainer.py", "replicated", "2"],
                   what="replicated step 2")  # fmt: skip
    assert podman("healthcheck", "run", nodes.name("node-0"), check=False).returncode == 0

    nodes.lose("node-1")
    nodes.start("node-1")  # the replacement: the lost node's id, empty volumes
    nodes.wait("node-1", ["sh", "-c", f"mtckpt ls --run {RUN} | grep -q 'replica of node-1'"],
               what="seeing its shards on its peers")  # fmt: skip

    block = re.search(r"<!-- operator-walkthrough.*?-->\n```bash\n(.*?)```",
                      WALKTHROUGH.read_text(), re.S).group(1)  # fmt: skip
    done = nodes.exec("node-1", "bash", "-euo", "pipefail", "-c", block)
    assert f"run {RUN} step 2: ranks [1] ready in node memory" in done.stdout, done.stdout
    assert f"memory   {RUN} step 2: ok" in done.stdout, done.stdout

    restored = json.loads(nodes.trainer("node-1", "restore").stdout)
    assert restored == {"step": 2, "tier": "memory", "bit_exact": True}
