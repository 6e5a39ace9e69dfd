"""One simulated node of the cluster: its volumes and config file (the ConfigMap's), its
daemon and trainer ranks started with the manifests' command lines and environment, and its
pool of warm spares; what a node loss does to it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from mtckpt.redundancy import Redundancy

from .manifests import NodeSpec, host_path, node_spec
from .network import Network, in_ns
from .standby import Spare

WORKER = Path(__file__).resolve().with_name("worker.py")
SRC = Path(__file__).resolve().parents[2] / "src"
METRICS_PORT = 9090  # the manifests' metrics_listen
IN_PROCESS_COLLECTIVE_TIMEOUT = 20.0
TRAINER_MODULES = "torch,torch.distributed,mtckpt,mtckpt.manager,mtckpt.daemon.rpc,s3fs"
DAEMON_MODULES = "mtckpt.cli._daemon,mtckpt.daemon.service,s3fs"


class ClusterError(RuntimeError):
    """The cluster could not start, or the job did not finish in time: what and why."""


@dataclass
class Config:
    """One configuration of the job: ``peers`` (mtckpt with node daemons), ``no-peers``
    (mtckpt with memory, local and object tiers) or ``dcp`` (DCP to S3, the baseline)."""

    name: str
    remote_every: int = 20  # mtckpt's object tier; DCP's every
    local_every: int = 10
    memory_every: int = 1  # the ConfigMap's: node memory (and so the peers) every step
    restart: str = "job"  # or "in-process": only the dead ranks are started again
    restore_first: bool = False  # restore before the process group is up (mtckpt)
    link_down: float = 5.0  # seconds a "link" failure lasts
    spares: bool = False  # warm spares take the place of lost ranks and daemons
    redundancy: str = ""  # ``peers``: the daemons' (e.g. "xor:3"; "": the ConfigMap's replicas)

    @property
    def peer_losses_tolerated(self) -> int:
        """Node losses the peers' copies survive (in each coded group): the ConfigMap's one
        replica survives one."""
        return Redundancy.parse(self.redundancy or "replicas:1").losses


class Node:
    def __init__(self, index: int, root: Path, net: Network, config: Config, token: str,
                 s3: dict) -> None:  # fmt: skip
        self.index, self.root, self.net, self.cfg = index, root, net, config
        self.ns = net.links[index].ns
        self.token, self.s3 = token, s3
        self.daemon: subprocess.Popen | None = None
        self.ranks: list[subprocess.Popen | None] = []
        self.spares: dict[str, Spare] = {}  # "daemon", "rank0", ...: warm, unassigned
        self.spec: NodeSpec = node_spec(index, root)

    def prepare(self) -> None:
        """The node's volumes, config file and token (again after a loss: empty roots)."""
        for directory in {*self.spec.daemon.mounts.values(), *self.spec.trainer.mounts.values()}:
            directory.mkdir(parents=True, exist_ok=True)
        config = self.spec.config
        if self.cfg.name == "no-peers":
            config = _drop_table(_drop_table(config, "peers"), "daemon")
        config = _set_key(config, "memory", "every", self.cfg.memory_every)
        config = _set_key(config, "local", "every", self.cfg.local_every)
        if self.cfg.redundancy:
            for table in ("peers", "daemon"):
                config = _set_key(config, table, "replicas", self.cfg.redundancy, "redundancy")
        if self.cfg.name != "dcp":
            config += (f'\n[remote]\nurl = "s3://{self.s3["bucket"]}/mtckpt"\n'
                       f"every = {self.cfg.remote_every}\nkeep = 2\n"
                       f"storage_options = {_toml_inline(self.s3['options'])}\n")  # fmt: skip
        path = Path(host_path(self.spec.daemon, self.spec.daemon.env["MTCKPT_CONFIG"]))
        path.write_text(config)
        (path.parent / "token").write_text(self.token + "\n")

    def env(self, container) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MTCKPT_")}
        env.update(container.env)
        env["MTCKPT_CONFIG"] = host_path(container, container.env["MTCKPT_CONFIG"])
        env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
        env["CLUSTER_S3_OPTIONS"] = json.dumps(self.s3["options"])
        return env

    def start_daemon(self) -> None:
        self.launch_daemon()
        self.await_daemon()

    def launch_daemon(self, from_pool: bool = False) -> None:
        """The node's daemon: a new process, or with ``from_pool`` a warm spare's where the node
        has one (a replacement node)."""
        if self.cfg.name != "peers":
            return
        spare = self.spares.pop("daemon", None) if from_pool else None
        if spare is not None:
            self.daemon = spare.assign({})
            return
        command = [sys.executable, "-m", *self.spec.daemon.command]
        command = [host_path(self.spec.daemon, part) for part in command]
        log = open(self.root / "daemon.log", "ab")  # noqa: SIM115 (the child's stderr)
        self.daemon = subprocess.Popen(in_ns(self.ns, *command), env=self.env(self.spec.daemon),
                                       stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip

    def await_daemon(self) -> None:
        """Until the daemon is ready, as the sidecar's startup probe gates the trainer."""
        if self.daemon is None:
            return
        line = self.daemon.stdout.readline()
        if "ready" not in line:
            raise ClusterError(f"node {self.index}: the daemon did not start: "
                               f"{(self.root / 'daemon.log').read_text()[-2000:]}")  # fmt: skip

    def start_ranks(self, ranks: int, nodes: int, worker_args: list[str], events: Path,
                    generation: int = 0, from_pool: bool = False) -> None:  # fmt: skip
        """The node's ranks that are not running (all of them at a job's start): new
        processes, or with ``from_pool`` warm spares where there are any (a replacement node;
        a crashed rank starts again as a new process, as the kubelet restarts it)."""
        if len(self.ranks) != ranks:
            self.ranks = [None] * ranks
        for local in range(ranks):
            if self.ranks[local] is not None and self.ranks[local].poll() is None:
                continue
            spare = self.spares.pop(f"rank{local}", None) if from_pool else None
            if spare is not None:
                self.ranks[local] = spare.assign({"CLUSTER_GENERATION": str(generation)})
                continue
            env = self._rank_env(local, ranks, nodes)
            env["CLUSTER_GENERATION"] = str(generation)
            log = open(self.root / f"rank{local}.log", "ab")  # noqa: SIM115
            command = [sys.executable, str(WORKER), *worker_args, "--events", str(events)]
            self.ranks[local] = subprocess.Popen(in_ns(self.ns, *command), env=env,
                                                 stdout=log, stderr=log)  # fmt: skip

    def _rank_env(self, local: int, ranks: int, nodes: int) -> dict:
        env = self.env(self.spec.trainer)
        env.update(RANK=str(self.index * ranks + local), WORLD_SIZE=str(nodes * ranks),
                   LOCAL_RANK=str(local), LOCAL_WORLD_SIZE=str(ranks),
                   MASTER_ADDR=self.net.links[0].address,
                   MASTER_PORT=str(self.spec.master_port), OMP_NUM_THREADS="1",
                   GLOO_SOCKET_IFNAME=self.net.links[self.index].inside)  # fmt: skip
        if self.cfg.restart == "in-process":
            # a survivor whose node-mate died between the gradients' exchange and its
            # save waits this long for that shard before giving the step up
            env["MTCKPT_COLLECTIVE_TIMEOUT"] = str(IN_PROCESS_COLLECTIVE_TIMEOUT)
        return env

    def warm(self, ranks: int, nodes: int, worker_args: list[str], events: Path) -> None:
        """Warm spares for the node's daemon and each of its ranks, where it has none: the
        processes a spare node taking its place would already be running."""
        spares = self.root / "spares"
        spares.mkdir(exist_ok=True)
        if self.cfg.name == "peers" and "daemon" not in self.spares:
            command = [host_path(self.spec.daemon, part)
                       for part in ["-m", *self.spec.daemon.command]]  # fmt: skip
            log = open(self.root / "daemon.log", "ab")  # noqa: SIM115 (the child's stderr)
            self.spares["daemon"] = Spare(
                command, preload=DAEMON_MODULES, env=self.env(self.spec.daemon),
                assignment=spares / "daemon.json", wrap=partial(in_ns, self.ns),
                stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
        for local in range(ranks):
            if f"rank{local}" in self.spares:
                continue
            log = open(self.root / f"rank{local}.log", "ab")  # noqa: SIM115
            command = [str(WORKER), *worker_args, "--events", str(events)]
            self.spares[f"rank{local}"] = Spare(
                command, preload=TRAINER_MODULES, env=self._rank_env(local, ranks, nodes),
                assignment=spares / f"rank{local}.json", wrap=partial(in_ns, self.ns),
                stdout=log, stderr=log)  # fmt: skip

    def kill_ranks(self) -> None:
        for proc in self.ranks:
            if proc is not None and proc.poll() is None:
                proc.kill()
        for proc in self.ranks:
            if proc is not None:
                proc.wait(timeout=30)

    def daemon_metrics(self) -> str:
        """The node daemon's metrics in the Prometheus text format ("" without a daemon)."""
        if self.daemon is None or self.daemon.poll() is not None:
            return ""
        url = f"http://{self.net.links[self.index].address}:{METRICS_PORT}/metrics"
        code = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=10).read().decode())"
        done = subprocess.run(in_ns(self.ns, sys.executable, "-c", code), capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        return done.stdout

    def daemon_bytes(self) -> dict[str, float]:
        """What the node daemon moved so far, from its metrics: ``peers`` (replicas pushed),
        ``remote`` (its uploads) and ``peers-read`` (shards served to a recovering node)."""
        text, out = self.daemon_metrics(), {}
        for kind, tier, value in re.findall(
            r'^mtckpt_(written|read)_bytes_total\{tier="(\w+)"\} (\S+)$', text, re.M
        ):
            key = tier if kind == "written" else f"{tier}-read"
            out[key] = out.get(key, 0.0) + float(value)
        return out

    def replication_stride(self) -> int | None:
        """The cluster's replication stride as the node daemon knows it (None: no daemon)."""
        found = re.search(r"^mtckpt_replication_stride (\S+)$", self.daemon_metrics(), re.M)
        return int(float(found.group(1))) if found else None

    def kill_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait(timeout=30)
        self.daemon = None

    def lose(self) -> None:
        """Trainer and daemon SIGKILLed, the node's volumes wiped."""
        self.kill_ranks()
        self.kill_daemon()
        for directory in {*self.spec.daemon.mounts.values(), *self.spec.trainer.mounts.values()}:
            shutil.rmtree(directory, ignore_errors=True)


def _drop_table(text: str, name: str) -> str:
    out, skipping = [], False
    for line in text.splitlines():
        if line.startswith("["):
            skipping = line.strip() == f"[{name}]"
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


def _set_key(text: str, table: str, key: str, value, new_key: str = "") -> str:
    """``key = value`` in ``[table]`` of a TOML text (the key's line replaced; by
    ``new_key = value`` if one is given)."""
    out, current = [], None
    for line in text.splitlines():
        if line.startswith("["):
            current = line.strip()
        elif current == f"[{table}]" and line.split("=")[0].strip() == key:
            line = f"{new_key or key} = {_toml_inline(value)}"
        out.append(line)
    return "\n".join(out) + "\n"


def _toml_inline(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_inline(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)
