"""The simulated cluster and its training job: N nodes (network namespaces), each with the
node daemon and M trainer ranks as the manifests run them, an S3 endpoint (moto_server)
on the hub, failures injected on a schedule, and a supervisor that restarts the whole job
when a rank dies, as torchrun's elastic agent or a Kubernetes Job would."""

from __future__ import annotations

import compileall
import json
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from . import rendezvous
from .network import Network, in_ns
from .node import SRC, ClusterError, Config, Node
from .report import read_events

S3_PORT = 5000
FAILURES = ("trainer", "daemon", "node", "two-nodes", "link", "slow")
BACKOFF_LIMIT = 6  # restarts after failures not injected, as a Job's backoffLimit
RESTART_BOUND = 60.0  # seconds an in-process restart may take before the whole job restarts


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
    stride: int | None = None  # the daemons' replication stride when it was injected


class Cluster:
    """Start with ``with Cluster(...) as cluster:``; ``run(...)`` runs one job."""

    def __init__(self, nodes: int, ranks: int, config: Config, root: Path, *,
                 shaping_mbit: float | None = None, idle: int = 0) -> None:  # fmt: skip
        """``idle``: more nodes that run the daemon and no trainer (a DaemonSet's node the
        job does not use); failures are injected into the job's nodes."""
        self.n, self.ranks, self.cfg, self.root = nodes, ranks, config, root
        self.shaping = shaping_mbit
        self.n_idle = idle
        self.net = Network(nodes + idle)
        self.moto: subprocess.Popen | None = None
        self.store: subprocess.Popen | None = None  # the first node's torchrun agent's
        self.nodes: list[Node] = []
        self.idle: list[Node] = []
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
        # Bytecode as an installed package has it (pip compiles at install), also where
        # PYTHONDONTWRITEBYTECODE is set: each process would compile mtckpt's modules anew.
        for tree in (SRC / "mtckpt", Path(__file__).parent):
            compileall.compile_dir(tree, quiet=1)
        self.net.create()
        s3 = self._start_s3()
        token = secrets.token_urlsafe(24)
        for i in range(self.n + self.n_idle):
            node = Node(i, self.root / f"n{i}", self.net, self.cfg, token, s3)
            node.prepare()
            (self.nodes if i < self.n else self.idle).append(node)
            if self.shaping:
                self.net.shape(i, self.shaping)
        first = self.nodes[0]
        self.store = rendezvous.start(partial(in_ns, first.ns), self.net.links[0].address,
                                      first.spec.master_port)  # fmt: skip
        for node in self.nodes + self.idle:
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
        every = self.nodes + self.idle
        for node in every:
            node.kill_ranks()
            for spare in node.spares.values():
                spare.kill()
            if node.daemon is not None and node.daemon.poll() is None:
                node.daemon.send_signal(signal.SIGTERM)
        for node in every:
            try:
                node.daemon and node.daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill_daemon()
        for proc in (self.moto, self.store):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
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
                and self._pool_ready()
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
                "idle_nodes": self.n_idle,
                "state_bytes_per_node": int(mib * (1 << 20)) * self.ranks,
                "every": {"memory": self.cfg.memory_every, "peers": self.cfg.memory_every,
                          "local": self.cfg.local_every,
                          "remote": self.cfg.remote_every},
                "peer_losses_tolerated": self.cfg.peer_losses_tolerated}  # fmt: skip

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
        stride = self.nodes[0].replication_stride()  # node 0 (the master) is never lost
        failure = Failure(kind, victims, time.time(), _newest_step(events), stride=stride)
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
        full = all(len(n.spares) == self._pool_size for n in self.nodes)
        return not full and self._awaiting is None and _newest_step(events) > 0

    @property
    def _pool_size(self) -> int:
        """A node's warm spares: one per rank, and its daemon's."""
        return self.ranks + (self.cfg.name == "peers")

    def _pool_ready(self) -> bool:
        """With warm spares, whether every node's pool is full and ready: failures come
        after the spare nodes exist, as in a cluster that keeps hot spares."""
        if not self.cfg.spares:
            return True
        return all(len(n.spares) == self._pool_size and all(s.ready for s in n.spares.values())
                   for n in self.nodes)  # fmt: skip

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
        self.generation += 1  # the workers of each restart meet under a store prefix of their own
        if self.cfg.restart == "in-process":
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
            node.launch_daemon(from_pool=True)
        failure.restarted = time.time()
        for node in self.nodes:
            if node not in replaced:
                node.start_ranks(self.ranks, self.n, worker, events, self.generation)
        for node in replaced:  # their ranks wait for their daemon, the others need not
            node.await_daemon()
            node.start_ranks(self.ranks, self.n, worker, events, self.generation, from_pool=True)

    def _count_daemon_bytes(self, node: Node) -> None:
        for key, value in node.daemon_bytes().items():
            self.daemon_bytes[key] = self.daemon_bytes.get(key, 0.0) + value


def _all_restored(events: Path, since: float, world: int) -> bool:
    """Whether every rank restored since ``since`` (the job's last restart is over)."""
    ranks = {e["rank"] for e in read_events(events) if e["event"] == "restored" and e["t"] >= since}
    return len(ranks) == world


def _newest_step(events: Path) -> int:
    return max((e["step"] for e in read_events(events) if e["event"] == "step"), default=0)
