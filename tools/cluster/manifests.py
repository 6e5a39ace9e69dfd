"""The node daemon's and the trainer's command lines, environment and mounts, read from
the Kubernetes manifests users deploy (``integrations/kubernetes/base/sidecar-job.yaml`` and
``configmap.yaml``), so that the harness runs what they run. Each mount becomes a
directory of the simulated node (``subPathExpr`` included), and the config file's paths
are rewritten from the containers' mount points to those directories."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

KUBERNETES = Path(__file__).resolve().parents[2] / "integrations" / "kubernetes" / "base"
CONFIG_VOLUME = "config"  # the projected volume holding mtckpt.toml and the token


@dataclass
class Container:
    command: list[str]
    env: dict[str, str]  # $(VAR) references expanded, downward-API values filled in
    mounts: dict[str, Path]  # mount path in the container -> directory of the node


@dataclass
class NodeSpec:
    daemon: Container
    trainer: Container
    config: str  # mtckpt.toml with the node's paths
    master_port: int


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def _environment(spec: list[dict], fields: dict[str, str]) -> dict[str, str]:
    """A container's env list: values, and fieldRef values from ``fields`` (the
    downward API: a label or annotation path -> its value on this node)."""
    env: dict[str, str] = {}
    for item in spec:
        if "value" in item:
            env[item["name"]] = _expand(str(item["value"]), env)
        else:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            if path not in fields:
                raise ValueError(f"env {item['name']}: no value for fieldRef {path!r}")
            env[item["name"]] = fields[path]
    return env


def _container(spec: dict, env: dict[str, str], root: Path) -> Container:
    mounts = {}
    for mount in spec.get("volumeMounts", []):
        directory = root / mount["name"]
        if "subPathExpr" in mount:
            directory = directory / _expand(mount["subPathExpr"], env)
        mounts[mount["mountPath"]] = directory
    command = [_expand(part, env) for part in spec.get("command", []) + spec.get("args", [])]
    return Container(command, env, mounts)


def node_spec(index: int, root: Path, job_yaml: Path = KUBERNETES / "sidecar-job.yaml",
              config_yaml: Path = KUBERNETES / "configmap.yaml") -> NodeSpec:  # fmt: skip
    """Node ``index`` of the Indexed Job, its volumes under ``root``."""
    job = next(d for d in _documents(job_yaml) if d["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    fields = {
        "metadata.labels['batch.kubernetes.io/job-name']": job["metadata"]["name"],
        "metadata.annotations['batch.kubernetes.io/job-completion-index']": str(index),
    }
    daemon_spec = next(c for c in pod["initContainers"] if c["name"] == "mtckpt-daemon")
    trainer_spec = next(c for c in pod["containers"] if c["name"] == "trainer")
    daemon_env = _environment(daemon_spec.get("env", []), fields)
    trainer_env = _environment(trainer_spec.get("env", []), fields)
    daemon = _container(daemon_spec, daemon_env, root)
    trainer = _container(trainer_spec, trainer_env, root)
    configmap = next(d for d in _documents(config_yaml) if d["kind"] == "ConfigMap")
    config = _rewrite(configmap["data"]["mtckpt.toml"], {**daemon.mounts, **trainer.mounts})
    port = next(int(a.split("=", 1)[1]) for a in trainer.command if a.startswith("--master-port="))
    return NodeSpec(daemon, trainer, config, port)


def _rewrite(text: str, mounts: dict[str, Path]) -> str:
    """``text`` with every quoted path under a mount point moved to the node's directory."""
    for mount in sorted(mounts, key=len, reverse=True):
        text = re.sub(rf'"(unix://)?{re.escape(mount)}(/[^"]*)?"',
                      lambda m, d=mounts[mount]: f'"{m.group(1) or ""}{d}{m.group(2) or ""}"',
                      text)  # fmt: skip
    return text


def host_path(container: Container, path: str) -> str:
    """A path inside the container as a path of the node."""
    for mount in sorted(container.mounts, key=len, reverse=True):
        if path == mount or path.startswith(mount + "/"):
            return str(container.mounts[mount]) + path[len(mount) :]
    return path


def describe(spec: NodeSpec) -> str:
    return (f"daemon: {shlex.join(spec.daemon.command)}\n"
            f"trainer: {shlex.join(spec.trainer.command)}\n{spec.config}")  # fmt: skip
