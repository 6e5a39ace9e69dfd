"""The simulated cluster and its training job: N nodes (network namespaces), each with the
node daemon and M trainer ranks as the manifests run them, an S3 endpoint (moto_server)
on the hub, failures injected on a schedule, and a supervisor that restarts the whole job
when a rank dies, as torchrun's elastic agent or a Kubernetes Job would."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from .manifests import NodeSpec, host_path, node_spec
from .network import Network, in_ns
from .report import read_events
from .standby import Spare

WORKER = Path(__file__).resolve().with_name("worker.py")
SRC = Path(__file__).resolve().parents[2] / "src"
S3_PORT = 5000
METRICS_PORT = 9090  # the manifests' metrics_listen
IN_PROCESS_COLLECTIVE_TIMEOUT = 20.0
FAILURES = ("trainer", "daemon", "node", "two-nodes", "link", "slow")
BACKOFF_LIMIT = 6  # restarts after failures not injected, as a Job's backoffLimit
RESTART_BOUND = 60.0  # seconds an in-process restart may take before the whole job restarts
TRAINER_MODULES = "torch,torch.distributed,mtckpt,mtckpt.manager,mtckpt.daemon.link,s3fs"
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


@dataclass
class Failure:
    kind: str
    nodes: list[int]
    injected: float
    step: int = 0  # the newest step done when it was injected
    detected: float | None = None
    restarted: float | None = None
    restored: float | None = None
    restored_step: int | None = None
    tiers: list[str | None] = field(default_factory=list)
    whole: bool = False  # an in-process restart did not finish: the whole job restarted


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

    def launch_daemon(self) -> None:
        if self.cfg.name != "peers":
            return
        spare = self.spares.pop("daemon", None)
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
                    generation: int = 0) -> None:  # fmt: skip
        """The node's ranks that are not running (all of them at a job's start): warm spares
        where there are any, new processes otherwise."""
        if len(self.ranks) != ranks:
            self.ranks = [None] * ranks
        for local in range(ranks):
            if self.ranks[local] is not None and self.ranks[local].poll() is None:
                continue
            spare = self.spares.pop(f"rank{local}", None)
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

    def daemon_bytes(self) -> dict[str, float]:
        """What the node daemon moved so far, from its metrics: ``peers`` (replicas pushed),
        ``remote`` (its uploads) and ``peers-read`` (shards served to a recovering node)."""
        if self.daemon is None or self.daemon.poll() is not None:
            return {}
        url = f"http://{self.net.links[self.index].address}:{METRICS_PORT}/metrics"
        code = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=10).read().decode())"
        done = subprocess.run(in_ns(self.ns, sys.executable, "-c", code), capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        out: dict[str, float] = {}
        for kind, tier, value in re.findall(
            r'^mtckpt_(written|read)_bytes_total\{tier="(\w+)"\} (\S+)$', done.stdout, re.M
        ):
            key = tier if kind == "written" else f"{tier}-read"
            out[key] = out.get(key, 0.0) + float(value)
        return out

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


def _set_key(text: str, table: str, key: str, value: int) -> str:
    """``key = value`` in ``[table]`` of a TOML text (the key's line replaced)."""
    out, current = [], None
    for line in text.splitlines():
        if line.startswith("["):
            current = line.strip()
        elif current == f"[{table}]" and line.split("=")[0].strip() == key:
            line = f"{key} = {value}"
        out.append(line)
    return "\n".join(out) + "\n"


def _toml_inline(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_inline(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


class Cluster:
    """Start with ``with Cluster(...) as cluster:``; ``run(...)`` runs one job."""

    def __init__(self, nodes: int, ranks: int, config: Config, root: Path, *,
                 shaping_mbit: float | None = None) -> None:  # fmt: skip
        self.n, self.ranks, self.cfg, self.root = nodes, ranks, config, root
        self.shaping = shaping_mbit
        self.net = Network(nodes)
        self.moto: subprocess.Popen | None = None
        self.nodes: list[Node] = []
        self.rendezvous = root / "rendezvous.json"  # in-process restarts' generation
        self.generation = 0
        self.last_restart = 0.0
        self._awaiting: float | None = None  # an in-process restart's start, until it is done
        self._next_check = 0.0
        self._next_spares = 0.0
        self.daemon_bytes: dict[str, float] = {}  # what the daemons moved, those lost included

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.net.create()
        s3 = self._start_s3()
        token = secrets.token_urlsafe(24)
        for i in range(self.n):
            node = Node(i, self.root / f"n{i}", self.net, self.cfg, token, s3)
            node.prepare()
            self.nodes.append(node)
            if self.shaping:
                self.net.shape(i, self.shaping)
        for node in self.nodes:
            node.start_daemon()

    def _start_s3(self) -> dict:
        host = self.net.hub_address
        command = [sys.executable, "-m", "moto.server", "-H", host, "-p", str(S3_PORT)]
        self.moto = subprocess.Popen(in_ns(self.net.hub, *command), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        url = f"http://{host}:{S3_PORT}"
        options = {"endpoint_url": url, "key": "testing", "secret": "testing",
                   "client_kwargs": {"region_name": "eu-west-1"}}  # fmt: skip
        probe = ("import s3fs,sys,json,time\nfor _ in range(300):\n try:\n  s3fs.S3FileSystem("
                 "**json.loads(sys.argv[1])).mkdir('ckpt'); break\n except Exception:\n"
                 "  time.sleep(0.1)\nelse: sys.exit(1)")  # fmt: skip
        done = subprocess.run(in_ns(self.net.hub, sys.executable, "-c", probe, json.dumps(options)),
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        if done.returncode != 0:
            raise ClusterError(f"the S3 endpoint did not start: {done.stderr[-2000:]}")
        return {"bucket": "ckpt", "options": options, "url": url}

    def stop(self) -> None:
        for node in self.nodes:
            node.kill_ranks()
            for spare in node.spares.values():
                spare.kill()
            if node.daemon is not None and node.daemon.poll() is None:
                node.daemon.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.daemon and node.daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill_daemon()
        if self.moto is not None and self.moto.poll() is None:
            self.moto.kill()
            self.moto.wait(timeout=30)
        self.net.destroy()

    def run(self, steps: int, *, step_seconds: float, mib: float, every: float,
            failures: list[str], timeout: float, limit: int | None = None,
            from_step: int = 0) -> dict:  # fmt: skip
        """Train ``steps`` steps with a failure every ``every`` seconds (kinds taken in
        turn from ``failures``; at most ``limit``; none before step ``from_step``); the
        events of every rank and the failures."""
        events = self.root / f"events-{self.cfg.name}.jsonl"
        worker = [
            "--mode", "dcp" if self.cfg.name == "dcp" else "mtckpt", "--steps", str(steps),
            "--step-seconds", str(step_seconds), "--mib", str(mib), "--dcp-url",
            "s3://ckpt/dcp", "--dcp-every", str(self.cfg.remote_every),
        ]  # fmt: skip
        if self.cfg.restart == "in-process":
            worker += ["--rendezvous", str(self.rendezvous)]
        if self.cfg.restore_first:
            worker.append("--restore-first")
        started = time.time()
        deadline = time.monotonic() + timeout
        self._start_job(worker, events)
        done: list[Failure] = []
        next_failure = time.monotonic() + every if failures else float("inf")
        pending: Failure | None = None
        while True:
            if time.monotonic() > deadline:
                raise ClusterError(f"the job did not finish within {timeout} s")
            codes = [p.poll() if p else None for n in self.nodes for p in n.ranks]
            if all(code == 0 for code in codes):
                break
            if any(code not in (None, 0) for code in codes):
                if pending is None and sum(f.kind == "crash" for f in done) >= BACKOFF_LIMIT:
                    raise ClusterError(f"the job failed {BACKOFF_LIMIT + 1} times by itself; "
                                       f"the last rank log: {self._crash_log()}")  # fmt: skip
                pending = pending or Failure("crash", [], time.time(), _newest_step(events))
                pending.detected = time.time()
                self._restart(worker, events, pending)
                done.append(pending)
                pending = None
            elif self._spares_due(events):
                for node in self.nodes:
                    node.warm(self.ranks, self.n, worker, events)
            elif self._restart_stuck(events):
                print(f"cluster: the in-process restart of {done[-1].kind} did not finish in "
                      f"{RESTART_BOUND:.0f} s: the whole job restarts", flush=True)  # fmt: skip
                done[-1].whole = True
                self._restart(worker, events, done[-1], whole=True)
            elif (
                time.monotonic() >= next_failure
                and pending is None
                and (limit is None or len(done) < limit)
                and (not from_step or _newest_step(events) >= from_step)
            ):
                kind = failures[len(done) % len(failures)]
                pending = self._inject(kind, len(done), events)
                next_failure = time.monotonic() + every
                if kind in ("daemon", "link", "slow"):  # the job goes on: nothing to restart
                    done.append(pending)
                    pending = None
            time.sleep(0.05)
        wall = time.time() - started
        for node in self.nodes:
            self._count_daemon_bytes(node)
        return {"daemon_bytes": self.daemon_bytes,
                "config": self.cfg.name, "wall": wall, "started": started, "events": events,
                "failures": done, "steps": steps, "step_seconds": step_seconds, "nodes": self.n,
                "state_bytes_per_node": int(mib * (1 << 20)) * self.ranks,
                "every": {"memory": self.cfg.memory_every, "peers": self.cfg.memory_every,
                          "local": self.cfg.local_every,
                          "remote": self.cfg.remote_every}}  # fmt: skip

    def _crash_log(self) -> str:
        for node in self.nodes:
            for local, proc in enumerate(node.ranks):
                if proc is not None and proc.poll() not in (None, 0):
                    return (node.root / f"rank{local}.log").read_text()[-3000:]
        return "(none)"

    def _start_job(self, worker: list[str], events: Path) -> None:
        for node in self.nodes:
            node.start_ranks(self.ranks, self.n, worker, events)

    def _inject(self, kind: str, count: int, events: Path) -> Failure:
        victim = 1 + count % (self.n - 1) if self.n > 1 else 0  # not node 0: the master
        victims = [victim]
        if kind == "two-nodes" and self.n > 2:
            victims.append(1 + (victim % (self.n - 1)))
        if kind in ("daemon", "node", "two-nodes"):
            for index in victims:
                self._count_daemon_bytes(self.nodes[index])  # before its counters are lost
        failure = Failure(kind, victims, time.time(), _newest_step(events))  # the kill's time
        node = self.nodes[victim]
        if kind == "trainer":
            node.ranks[0].kill()
        elif kind == "daemon":
            node.kill_daemon()
            node.start_daemon()  # the kubelet restarts the sidecar
        elif kind in ("node", "two-nodes"):
            for index in failure.nodes:
                self.nodes[index].lose()
        elif kind == "link":
            self.net.cut(victim)
            time.sleep(self.cfg.link_down)
            self.net.heal(victim)
        elif kind == "slow":
            self.net.shape(victim, 50)
        else:
            raise ValueError(f"failure kind {kind!r}: expected one of {FAILURES}")
        return failure

    def _spares_due(self, events: Path) -> bool:
        """Whether to refill the pool of warm spares (looked at once a second): once the
        job has made its first step, and no restart is under way (the spares' start would
        compete with it for the cores)."""
        if not self.cfg.spares or time.monotonic() < self._next_spares:
            return False
        self._next_spares = time.monotonic() + 1.0
        ready = all(len(n.spares) == self.ranks + (self.cfg.name == "peers") for n in self.nodes)
        return not ready and self._awaiting is None and _newest_step(events) > 0

    def _restart_stuck(self, events: Path) -> bool:
        """Whether the last in-process restart has not brought every rank back within
        RESTART_BOUND seconds (looked at once a second)."""
        if self._awaiting is None or time.monotonic() < self._next_check:
            return False
        self._next_check = time.monotonic() + 1.0
        if _all_restored(events, self._awaiting, self.n * self.ranks):
            self._awaiting = None
            return False
        return time.time() - self._awaiting > RESTART_BOUND

    def _restart(self, worker: list[str], events: Path, failure: Failure,
                 whole: bool = False) -> None:  # fmt: skip
        """Tear the job down and start it again (in-process: start the dead ranks again and
        tell the others the next generation); lost nodes come back empty, same ids
        (``whole``: a stuck in-process restart redone as a job restart, nodes as they are)."""
        in_process = self.cfg.restart == "in-process" and not whole
        if in_process and not _all_restored(events, self.last_restart, self.n * self.ranks):
            in_process = False  # a failure during a restart: the whole job starts again
        if in_process and any(p and p.poll() == 0 for n in self.nodes for p in n.ranks):
            in_process = False  # ranks that finished cannot join: the job starts again
        self.last_restart = time.time()
        self._awaiting = self.last_restart if in_process else None
        if self.cfg.restart == "in-process":
            self.generation += 1
            pending = self.rendezvous.with_suffix(".tmp")
            pending.write_text(json.dumps({"generation": self.generation}))
            pending.rename(self.rendezvous)
        if not in_process:
            for node in self.nodes:
                node.kill_ranks()
        lost = failure.kind in ("node", "two-nodes") and not whole
        replaced = [self.nodes[i] for i in failure.nodes if lost]
        for node in replaced:
            node.prepare()
            node.launch_daemon()
        failure.restarted = time.time()
        for node in self.nodes:
            if node not in replaced:
                node.start_ranks(self.ranks, self.n, worker, events, self.generation)
        for node in replaced:  # their ranks wait for their daemon, the others need not
            node.await_daemon()
            node.start_ranks(self.ranks, self.n, worker, events, self.generation)

    def _count_daemon_bytes(self, node: Node) -> None:
        for key, value in node.daemon_bytes().items():
            self.daemon_bytes[key] = self.daemon_bytes.get(key, 0.0) + value


def _all_restored(events: Path, since: float, world: int) -> bool:
    """Whether every rank restored since ``since`` (the job's last restart is over)."""
    ranks = {e["rank"] for e in read_events(events) if e["event"] == "restored" and e["t"] >= since}
    return len(ranks) == world


def _newest_step(events: Path) -> int:
    return max((e["step"] for e in read_events(events) if e["event"] == "step"), default=0)
