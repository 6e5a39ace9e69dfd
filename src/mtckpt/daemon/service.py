"""The daemon process: the Daemon gRPC service over a Unix socket (trainers, operators)
and TCP (peers), its replicator, its flusher to the object tier, and draining on
SIGTERM."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import threading
import time
from concurrent import futures

import grpc

from .. import _fastpath
from ..errors import ChecksumMismatchError, ConfigError, MtckptError, StepNotFoundError
from ..format import naming
from ..metrics import Endpoint, Metrics
from ..proto import mtckpt_pb2 as pb
from ..proto import mtckpt_pb2_grpc as pb_grpc
from ..tiers.object import object_storage
from . import frames, recovery
from .auth import TLSFiles, host_of, is_loopback, read_token
from .bulk import BulkServer
from .changes import Changes
from .config import DaemonConfig
from .flusher import Flusher
from .holdings import Holdings, Shard
from .limits import PeerLimits, Progress, certified_node
from .peers import Peers
from .replicator import Replicator
from .rpc import OPTIONS, SERVICE, TokenCheck, is_unix, shard_id, unix_path

log = logging.getLogger(__name__)

MAX_STATUS_WAIT = 30.0  # seconds a long-polled Status waits at most
FREE_WORKERS = 8  # RPC threads long-polled Status calls leave to the others
TRAINER_ONLY = ("Notify", "Flush", "Recover")  # served on the Unix socket, not to peers


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


def _shard(ident: pb.ShardId, context) -> Shard:
    try:
        return Shard.checked(ident.run, ident.step, ident.rank, ident.origin)
    except ValueError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


class _Service(pb_grpc.DaemonServicer):
    """The Daemon service as served to trainers (the Unix socket) or to peers (TCP, with
    per-peer limits, and with mutual TLS each peer's certificate bound to the shards it
    may push or fetch)."""

    def __init__(self, daemon: Daemon, peers: PeerLimits | None = None) -> None:
        self.d = daemon
        self.peers = peers  # None: the trainers' service
        self.pool = "trainers" if peers is None else "peers"
        self._recovering: dict[str, threading.Lock] = {}  # per run: one recovery at a time
        self._recovering_lock = threading.Lock()

    def _held(self, context, kind: str, what: str):
        """Count a stream or waiting call against the calling peer (trainers: no limit)."""
        if self.peers is None:
            return contextlib.nullcontext(Progress(context, what))
        return self.peers.hold(context, kind, what)

    def _check_certified(self, shard: Shard, context, action: str) -> None:
        """With mutual TLS, a peer may push or fetch only shards saved by the node its
        certificate names: no node can forge or read another's state."""
        if self.peers is None or self.d.tls is None:
            return
        node = certified_node(context)
        if node != shard.origin:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{shard}: peer {context.peer()} with a certificate for node {node!r} may not "
                f"{action} shards of node {shard.origin!r}",
            )

    def Status(self, request, context):
        changes = self.d.changes
        generation = changes.generation
        reply = self._status()
        if request.wait_seconds <= 0 or reply.version != request.changed_since:
            return reply
        with self._held(context, "waiting calls", "a long-polled Status"):
            return self._wait_for_change(request, context, reply, generation)

    def _wait_for_change(self, request, context, reply, generation: int) -> pb.StatusReply:
        changes = self.d.changes
        if not changes.take_waiter(self.pool):
            return reply
        try:
            deadline = time.monotonic() + min(request.wait_seconds, MAX_STATUS_WAIT)
            while reply.version == request.changed_since and context.is_active():
                left = deadline - time.monotonic()
                if left <= 0 or changes.closed:
                    break
                # Woken by each change; once a second anyway, to see a cancelled call.
                generation = changes.wait(generation, min(left, 1.0))
                reply = self._status()
        finally:
            changes.give_waiter(self.pool)
        return reply

    def _status(self) -> pb.StatusReply:
        d = self.d
        reply = pb.StatusReply(
            node_id=d.config.node_id, zone=d.config.zone, address=d.address or "",
            memory_root=str(d.holdings.root), replicas=d.config.replicas, draining=d.draining,
            local_root=d.config.local_root or "",
            remote_url=d.config.remote.url if d.config.remote is not None else "",
        )  # fmt: skip
        for member in d.peers.members():
            reply.peers.add(address=member.address, node_id=member.node_id, zone=member.zone,
                            reachable=member.reachable, error=member.error)  # fmt: skip
        for shard, state in sorted(
            d.replicator.snapshot().items(), key=lambda i: (i[0].run, i[0].step, i[0].rank)
        ):
            reply.replication.add(
                shard=shard_id(shard),
                targets=state.targets, stored=sorted(state.stored), error=state.error,
            )  # fmt: skip
        if d.flusher is not None:
            for shard, flush in sorted(
                d.flusher.snapshot().items(), key=lambda i: (i[0].run, i[0].step, i[0].rank)
            ):
                reply.flushes.add(shard=shard_id(shard), phase=flush.phase, error=flush.error)
        reply.version = _fingerprint(reply)
        return reply

    def ListShards(self, request, context):
        for name, check in (("run", naming.check_run), ("origin", naming.check_node_id)):
            value = getattr(request, name)
            if value:
                try:
                    check(value)
                except ValueError as exc:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        reply = pb.ListShardsReply(node_id=self.d.config.node_id)
        for held in self.d.holdings.list(run=request.run, origin=request.origin):
            reply.shards.add(
                shard=shard_id(held.shard),
                world_size=held.world_size, data_size=held.data_size, replica=held.replica,
            )  # fmt: skip
        return reply

    def Fetch(self, request, context):
        shard = _shard(request.shard, context)
        self._check_certified(shard, context, "fetch")
        with self._held(context, "streams", f"a Fetch of {shard}") as progress:
            try:
                pieces = self.d.holdings.read(
                    shard, request.manifest, request.offset, request.length
                )
                crc32c = _fastpath.backend().crc32c
                for offset, view in pieces:
                    yield frames.data_chunk(offset, view, crc32c(view))
                    progress.moved()
            except FileNotFoundError as exc:
                context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    def _header_shard(self, header: pb.PushHeader, context) -> Shard:
        shard = _shard(header.shard, context)
        if shard.origin == self.d.config.node_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{shard}: this node's own shard cannot be pushed to it")  # fmt: skip
        self._check_certified(shard, context, "push")
        return shard

    def Push(self, request_iterator, context):
        with self._held(context, "streams", "a Push") as progress:
            try:
                header = frames.read_push(next(request_iterator, b""))
            except ValueError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a malformed push: {exc}")
            if not isinstance(header, pb.PushHeader):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a push starts with its header")
            shard = self._header_shard(header, context)
            pieces = frames.verified(_push_chunks(request_iterator, shard, progress), str(shard))
            try:
                stored = self.d.holdings.store(shard, header.manifest, pieces, header.data_size)
            except (MtckptError, ValueError) as exc:
                self.d.transfer_failed(exc)
                context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        self.d.metrics.replica_bytes.inc(stored)
        self.d.holdings.expire_replicas(shard.origin, shard.run)
        return pb.PushReply(bytes=stored)

    def OpenPush(self, request, context):
        if self.d.bulk is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this daemon has no data port")
        shard = self._header_shard(request, context)
        try:
            incoming = self.d.holdings.receive(shard, request.manifest, request.data_size)
        except (MtckptError, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        ticket = self.d.bulk.admit(incoming)
        return pb.BulkTicket(ticket=ticket, port=self.d.bulk.port, tls=self.d.bulk.tls)

    def OpenFetch(self, request, context):
        if self.d.bulk is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this daemon has no data port")
        shard = _shard(request.shard, context)
        self._check_certified(shard, context, "fetch")
        try:
            outgoing = self.d.holdings.outgoing(shard)
        except FileNotFoundError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except MtckptError as exc:
            context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        ticket = self.d.bulk.offer(outgoing)
        return pb.BulkTicket(ticket=ticket, port=self.d.bulk.port, tls=self.d.bulk.tls)

    def Notify(self, request, context):
        self.d.replicator.notify()
        return pb.NotifyReply()

    def Flush(self, request, context):
        if self.d.flusher is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this daemon has no object tier (start it with --remote URL)",
            )
        shard = _shard(request.shard, context)
        if shard.origin != self.d.config.node_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{shard}: only this node's own shards are flushed here")  # fmt: skip
        self.d.flusher.request(shard)
        return pb.FlushReply()

    def Recover(self, request, context):
        started = time.monotonic()
        try:
            naming.check_run(request.run)
            step = request.step if request.HasField("step") else None
            with self._recovering_lock:
                lock = self._recovering.setdefault(request.run, threading.Lock())
            # Every rank of the node asks; the first fetches, the others then find it here.
            with lock:
                result = recovery.recover(self.d.holdings, self.d.peers, request.run, step)
            self.d.persist(request.run, result)
            self.d.metrics.restore_seconds.observe(time.monotonic() - started, tier="peers")
            self.d.metrics.bytes_read.inc(result.bytes, tier="peers")
        except StepNotFoundError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except (MtckptError, ValueError) as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.RecoverReply(step=result.step, ranks=result.ranks, bytes=result.bytes,
                               sources=result.sources)  # fmt: skip


def _push_chunks(request_iterator, shard: Shard, progress: Progress):
    """The data chunks of a push after its header, each a sign of progress."""
    for frame in request_iterator:
        progress.moved()
        try:
            chunk = frames.read_push(frame)
        except ValueError as exc:
            raise MtckptError(f"{shard}: a malformed chunk: {exc}") from None
        if isinstance(chunk, pb.PushHeader):
            raise MtckptError(f"{shard}: a second header in one push")
        yield chunk


def _fingerprint(reply: pb.StatusReply) -> int:
    """What a long-polled Status compares: the replication and flush states, as 8 bytes."""
    digest = hashlib.blake2b(digest_size=8)
    for entry in itertools.chain(reply.replication, reply.flushes):
        digest.update(entry.SerializeToString(deterministic=True))
    return int.from_bytes(digest.digest(), "little") or 1


def _trainers_only(name: str):
    def refuse(request, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED,
                      f"{name} is served to this node's trainers only, on the daemon's Unix "
                      "socket")  # fmt: skip

    return refuse


def _handlers(service: _Service) -> grpc.GenericRpcHandler:
    """The Daemon service's methods, with Push and Fetch taking and giving frames encoded
    by hand (frames.py) instead of protobuf objects; the trainers' own methods refused to
    peers."""

    def unary(method, request):
        if service.peers is not None and method.__name__ in TRAINER_ONLY:
            method = _trainers_only(method.__name__)
        return grpc.unary_unary_rpc_method_handler(
            method, request.FromString, lambda reply: reply.SerializeToString()
        )

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Status": unary(service.Status, pb.StatusRequest),
        "ListShards": unary(service.ListShards, pb.ListShardsRequest),
        "Notify": unary(service.Notify, pb.NotifyRequest),
        "OpenPush": unary(service.OpenPush, pb.PushHeader),
        "OpenFetch": unary(service.OpenFetch, pb.FetchRequest),
        "Recover": unary(service.Recover, pb.RecoverRequest),
        "Flush": unary(service.Flush, pb.FlushRequest),
        "Fetch": grpc.unary_stream_rpc_method_handler(service.Fetch, pb.FetchRequest.FromString),
        "Push": grpc.stream_unary_rpc_method_handler(
            service.Push, response_serializer=pb.PushReply.SerializeToString
        ),
    })  # fmt: skip


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.token, self.tls = _credentials(config)
        self.holdings = Holdings(
            config.node_id, config.memory_root, config.keep, local_root=config.local_root
        )
        self.peers = Peers(config.node_id, config.peers, config.peers_dns,
                           token=self.token, tls=self.tls)  # fmt: skip
        self.metrics = DaemonMetrics(self)
        self.changes = Changes(waiters=max(0, config.workers - FREE_WORKERS),
                               pools=("trainers", "peers"))  # fmt: skip
        self.replicator = Replicator(
            self.holdings, self.peers, zone=config.zone, replicas=config.replicas,
            bandwidth=config.bandwidth, scan_interval=config.scan_interval, tls=self.tls,
            metrics=self.metrics, on_change=self.changes.notify,
        )  # fmt: skip
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
        self.limits = PeerLimits(idle_seconds=config.stream_idle_timeout)
        self._servers: list[grpc.Server] = []
        self._stopped = threading.Event()

    def start(self) -> None:
        os.makedirs(self.config.memory_root, exist_ok=True)
        if self.config.local_root:
            os.makedirs(self.config.local_root, exist_ok=True)
        self.holdings.clean_after_crash()
        if self.config.listen:
            self._serve_peers()
        if self.config.socket:
            self._serve_trainers()
        self.replicator.start()
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

    def _server(self, service: _Service, name: str, **options) -> grpc.Server:
        """A gRPC server of its own threads: peers cannot take the trainers' and back."""
        interceptors = [TokenCheck(self.token)] if self.token else []
        pool = futures.ThreadPoolExecutor(self.config.workers, thread_name_prefix=name)
        server = grpc.server(pool, interceptors=interceptors, options=OPTIONS, **options)
        server.add_generic_rpc_handlers((_handlers(service),))
        self._servers.append(server)
        return server

    def _serve_peers(self) -> None:
        if self.token is None and self.tls is None:
            log.warning(
                "serving peers on %s WITHOUT AUTHENTICATION (--insecure): any process on "
                "this machine can push forged shards and read checkpoints", self.config.listen,
            )  # fmt: skip
        server = self._server(_Service(self, self.limits), "mtckpt-peer-rpc",
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
        server = self._server(_Service(self), "mtckpt-rpc")
        server.add_insecure_port(f"unix://{path}")
        old = os.umask(0o177)  # the socket is created 0600: only this user's trainers
        try:
            server.start()
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    def persist(self, run: str, recovered: recovery.Recovered) -> None:
        """Write a recovered step to the local tier, off the Recover call: the trainer
        restores from memory meanwhile."""
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
        self.metrics.replica_bytes.inc(incoming.size)
        self.holdings.expire_replicas(incoming.shard.origin, incoming.shard.run)

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
        self.changes.close()  # long-polled Status calls answer now
        self._persisting.shutdown(wait=True)
        stopped = [server.stop(grace=5) for server in self._servers]
        for done in stopped:
            done.wait()
        self.limits.close()
        if self.bulk is not None:
            self.bulk.close()
        self.peers.close()
        self._stopped.set()
        if self.endpoint is not None:
            self.endpoint.close()
        return drained

    def wait(self) -> None:
        # In slices: a signal the kernel hands to another thread does not interrupt an
        # endless wait, and Python runs its handler only when the main thread wakes.
        while not self._stopped.wait(0.5):
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
        self.gauge("mtckpt_peers", "Peer daemons known, by state.", ("state",), read=self._peers)
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
