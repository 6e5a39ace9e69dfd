"""The daemon process: the Daemon gRPC service (``servicer``) over a Unix socket (trainers,
operators) and TCP (peers), its replicator, its flusher to the object tier, its metrics,
and draining on SIGTERM."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from concurrent import futures

import grpc

from ..errors import ChecksumMismatchError, ConfigError
from ..metrics import Endpoint, Metrics
from ..proto import mtckpt_pb2 as pb
from ..tiers.object import object_storage
from . import recovery
from .absent import AbsentPieces, steps_held
from .auth import TLSFiles, host_of, is_loopback, read_token
from .bulk import BulkServer
from .chain import Relay
from .changes import Changes
from .config import DaemonConfig
from .flusher import Flusher
from .holdings import Holdings
from .limits import PeerLimits
from .parity import Contribution, ParityStore
from .peers import Peers
from .replicator import Replicator
from .reserve import Reservations
from .room import Room
from .rpc import OPTIONS, TokenCheck, is_unix, unix_path
from .servicer import Servicer, handlers
from .sync import Strides

log = logging.getLogger(__name__)

FREE_WORKERS = 8  # RPC threads long-polled Status calls leave to the others


def _credentials(config: DaemonConfig) -> tuple[str | None, TLSFiles | None]:
    """The shared token and the TLS files the daemon serves with; ConfigError unless peers
    are served with at least one of them, or with ``insecure`` on a loopback address
    (tests on one machine)."""
    token = read_token(config.token_file)
    tls = TLSFiles(config.tls_cert, config.tls_key, config.tls_ca) if config.tls_cert else None
    if config.listen is None:
        return token, tls
    if config.insecure and not is_loopback(host_of(config.listen)):
        raise ConfigError(
            f"--insecure is refused on {config.listen}: without authentication anyone who "
            "reaches the port could push forged shards or read checkpoints; it is allowed "
            "on loopback addresses only (127.0.0.1, ::1, localhost)"
        )
    if token is None and tls is None and not config.insecure:
        raise ConfigError(
            f"the daemon would serve peers on {config.listen} without authentication: give "
            "--token-file FILE (a token shared by the daemons) or --tls-cert, --tls-key and "
            "--tls-ca (mutual TLS, a certificate per node naming its node id), or "
            "--insecure with a loopback --listen address (one machine, tests)"
        )
    return token, tls


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.token, self.tls = _credentials(config)
        self.holdings = Holdings(
            config.node_id, config.memory_root, config.keep, local_root=config.local_root
        )
        self.strides = Strides()
        self.room = Room(self.holdings, config.memory_budget,
                         on_refused=lambda: self.metrics.refused.inc(),
                         drop_spares=lambda: (self.holdings.drop_spares(),
                                              self.parity.spares.drop()))  # fmt: skip
        self.parity = ParityStore(config.memory_root, config.node_id, config.scheme, config.keep,
                                  stride=self.strides.cluster, fits=self.room.fits)  # fmt: skip
        self.peers = Peers(config.node_id, config.peers, config.peers_dns,
                           token=self.token, tls=self.tls, strides=self.strides)  # fmt: skip
        self.metrics = DaemonMetrics(self)
        self.absent = AbsentPieces(self.parity, functools.partial(steps_held, self.peers),
                                   completed=self.parity.tidy)  # fmt: skip
        self.recoveries = recovery.Recoveries(self.holdings, self.peers, self._recovered)
        self.changes = Changes(waiters=max(0, config.workers - FREE_WORKERS),
                               pools=("trainers", "peers"))  # fmt: skip
        self.replicator = Replicator(
            self.holdings, self.peers, zone=config.zone, scheme=config.scheme,
            bandwidth=config.bandwidth, scan_interval=config.scan_interval, tls=self.tls,
            metrics=self.metrics, strides=self.strides, on_change=self.changes.notify,
            incremental=config.incremental,
        )  # fmt: skip
        self.reservations = Reservations(self.holdings, self.peers, self.replicator,
                                         self.parity, self.room.fits)  # fmt: skip
        self.flusher: Flusher | None = None
        if config.remote is not None:
            storage = object_storage(config.remote)
            self.flusher = Flusher(self.holdings, config.remote, storage, self.metrics,
                                   on_change=self.changes.notify)  # fmt: skip
        self.address: str | None = None
        self.bulk: BulkServer | None = None
        self.endpoint: Endpoint | None = None
        self.draining = False
        self.serving = False
        self._persisting = futures.ThreadPoolExecutor(1, thread_name_prefix="mtckpt-persist")
        self._spares = futures.ThreadPoolExecutor(1, thread_name_prefix="mtckpt-spares")
        self.limits = PeerLimits(idle_seconds=config.stream_idle_timeout)
        self._servers: list[grpc.Server] = []
        self._stopped = threading.Event()

    def start(self) -> None:
        os.makedirs(self.config.memory_root, exist_ok=True)
        if self.config.local_root:
            os.makedirs(self.config.local_root, exist_ok=True)
        self.holdings.clean_after_crash()
        self.holdings.kept.hold_all()
        self.parity.load()
        if self.config.listen:
            self._serve_peers()
        if self.config.socket:
            self._serve_trainers()
        self.peers.start(self.config.scan_interval)
        self.recoveries.start()  # a replacement node: its shards back before its trainers ask
        self.replicator.start()
        if self.config.scheme.coded and self.config.listen:  # this node holds parities
            self.absent.start()
        if self.flusher is not None:
            self.flusher.start()
        if self.config.metrics_listen:
            self.endpoint = Endpoint(self.config.metrics_listen, self.metrics,
                                     live=lambda: not self._stopped.is_set(),
                                     ready=lambda: self.serving and not self.draining)  # fmt: skip
        self.serving = True
        log.info(
            "mtckpt daemon %s serving on %s %s",
            self.config.node_id,
            self.address,
            self.config.socket,
        )

    def _server(self, service: Servicer, name: str, **options) -> grpc.Server:
        """A gRPC server of its own threads: peers cannot take the trainers' and back."""
        interceptors = [TokenCheck(self.token)] if self.token else []
        pool = futures.ThreadPoolExecutor(self.config.workers, thread_name_prefix=name)
        server = grpc.server(pool, interceptors=interceptors, options=OPTIONS, **options)
        server.add_generic_rpc_handlers((handlers(service),))
        self._servers.append(server)
        return server

    def _serve_peers(self) -> None:
        if self.token is None and self.tls is None:
            log.warning(
                "serving peers on %s WITHOUT AUTHENTICATION (--insecure): any process on "
                "this machine can push forged shards and read checkpoints", self.config.listen,
            )  # fmt: skip
        server = self._server(Servicer(self, self.limits), "mtckpt-peer-rpc",
                              maximum_concurrent_rpcs=4 * self.config.workers)  # fmt: skip
        if self.tls is not None:
            cert, key, ca = self.tls.read()
            credentials = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=True
            )
            port = server.add_secure_port(self.config.listen, credentials)
        else:
            port = server.add_insecure_port(self.config.listen)
        if port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        server.start()
        self.address = f"{self.config.listen.rsplit(':', 1)[0]}:{port}"
        host = host_of(self.config.listen)
        self.bulk = BulkServer(host, self.config.data_port, self.tls, self._stored,
                               self.transfer_failed)  # fmt: skip

    def _serve_trainers(self) -> None:
        socket = self.config.socket
        path = unix_path(socket) if is_unix(socket) else socket
        if os.path.exists(path):
            os.unlink(path)  # a socket left by a killed daemon
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        server = self._server(Servicer(self), "mtckpt-rpc")
        server.add_insecure_port(f"unix://{path}")
        old = os.umask(0o177)  # the socket is created 0600: only this user's trainers
        try:
            server.start()
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    def _recovered(self, run: str, recovered: recovery.Recovered, seconds: float) -> None:
        """Counted, and written to the local tier off the recovery: the trainer restores
        from memory meanwhile."""
        self.metrics.restore_seconds.observe(seconds, tier="peers")
        self.metrics.bytes_read.inc(recovered.bytes, tier="peers")
        if self.holdings.local is None:
            return

        def write() -> None:
            try:
                recovery.persist(self.holdings, run, recovered)
            except Exception as exc:  # the memory copy stands; the next recovery tries again
                log.error("run %r step %d: cannot write the recovered shards to %s: %s",
                          run, recovered.step, self.holdings.local.describe(), exc)  # fmt: skip

        self._persisting.submit(write)

    def _stored(self, incoming) -> None:
        if isinstance(incoming, Relay):  # a chain's sum passing on: nothing stored here
            return
        self.metrics.replica_bytes.inc(incoming.size)
        if isinstance(incoming, Contribution):
            if incoming.completed:
                self.parity.tidy(incoming.stripe.key)
            else:
                self.absent.wake()  # it may wait on a member holding nothing of the step
            return
        self.holdings.expire_replicas(incoming.shard.origin, incoming.shard.run,
                                      self.strides.cluster())  # fmt: skip
        self._spares.submit(self._ready_spare, incoming.file_size)

    def _ready_spare(self, size: int) -> None:
        try:
            self.holdings.ready_spare(size, self.room.fits)
        except OSError as exc:  # a full tmpfs: the next replica allocates as it arrives
            log.warning("no spare replica file made: %s", exc)

    def transfer_failed(self, exc: Exception) -> None:
        """A replica or recovery transfer into this node failed: counted when its bytes
        were damaged on the way."""
        if isinstance(exc, ChecksumMismatchError):
            self.metrics.checksum_failures.inc(tier="peers")

    def stop(self, drain: bool = True) -> bool:
        """Stop; with ``drain``, first finish replication to reachable peers and the
        uploads asked for (bounded by the drain timeout). Whether the drain finished."""
        self.draining = True
        deadline = time.monotonic() + self.config.drain_timeout
        drained = self.replicator.drain(self.config.drain_timeout) if drain else False
        if self.flusher is not None:
            if drain:
                flushed = self.flusher.drain(max(0.0, deadline - time.monotonic()))
                drained = drained and flushed
            self.flusher.stop()
        self.replicator.stop()
        self.absent.stop()
        self.changes.close()  # long-polled Status calls answer now
        self._persisting.shutdown(wait=True)
        self._spares.shutdown(wait=True, cancel_futures=True)
        stopped = [server.stop(grace=5) for server in self._servers]
        for done in stopped:
            done.wait()
        self.limits.close()
        if self.bulk is not None:
            self.bulk.close()
        self.parity.spares.close()
        self.peers.close()
        self._stopped.set()
        if self.endpoint is not None:
            self.endpoint.close()
        return drained

    def wait(self) -> None:
        # In slices: a signal the kernel hands to another thread does not interrupt an
        # endless wait, and Python runs its handler only when the main thread wakes.
        while not self._stopped.wait(0.1):
            pass


class DaemonMetrics(Metrics):
    """The trainer's families, plus the daemon's own: replicas received, and gauges read
    from the replicator, the flusher and the peer list at each scrape."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__()
        self.daemon = daemon
        self.replica_bytes = self.counter(
            "mtckpt_replica_received_bytes", "Bytes of other nodes' shards received and stored."
        )
        self.gauge(
            "mtckpt_replication_lag_seconds",
            "Age of the oldest committed shard that "
            "some chosen peer does not hold yet (0: all replicated).",
            read=self._lag,
        )
        self.gauge(
            "mtckpt_replication_pending_shards",
            "Committed shards not yet held by every chosen peer.",
            read=lambda: len(self._unreplicated()),
        )
        self.gauge(
            "mtckpt_flush_backlog_shards",
            "Shards queued for or being uploaded to the object tier.",
            read=self._backlog,
        )
        self.gauge(
            "mtckpt_replication_stride",
            "The cluster's replication stride: steps this many apart are sent first and kept "
            "(1: every step; more: some daemon's transfers lag behind the saves).",
            read=daemon.strides.cluster,
        )
        self.gauge("mtckpt_peers", "Peer daemons known, by state.", ("state",), read=self._peers)
        self.gauge(
            "mtckpt_memory_bytes",
            "Bytes the node's memory tier holds, by kind (steps, "
            "spare slots, replicas and parity for peers, spare files).",
            ("kind",),
            read=lambda: {(k,): v for k, v in daemon.room.usage().items()},
        )
        self.gauge(
            "mtckpt_memory_budget_bytes",
            "The node's memory budget (0: none).",
            read=lambda: daemon.config.memory_budget or 0,
        )
        self.refused = self.counter(
            "mtckpt_redundancy_refused",
            "Peers' replicas and parity pieces refused to keep within the memory budget.",
        )  # fmt: skip
        self.gauge("mtckpt_draining", "1 while the daemon drains on SIGTERM.",
                   read=lambda: int(daemon.draining))  # fmt: skip

    def _unreplicated(self) -> list:
        return [s for s in self.daemon.replicator.snapshot().values() if not s.complete]

    def _lag(self) -> float:
        return max((time.monotonic() - s.since for s in self._unreplicated()), default=0.0)

    def _backlog(self) -> int:
        if self.daemon.flusher is None:
            return 0
        waiting = (pb.FlushState.QUEUED, pb.FlushState.FLUSHING)
        return sum(f.phase in waiting for f in self.daemon.flusher.snapshot().values())

    def _peers(self) -> dict:
        members = self.daemon.peers.members()
        up = sum(m.reachable for m in members)
        return {("reachable",): up, ("unreachable",): len(members) - up}
