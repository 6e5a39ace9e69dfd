"""The Daemon gRPC service as served to trainers (the Unix socket) and to peers (TCP, with
per-peer limits, and with mutual TLS each peer's certificate bound to the shards it may
push or fetch): status long-polls, listings, transfers, and the trainers' own calls."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import time
from typing import TYPE_CHECKING

import grpc

from .. import _fastpath
from ..errors import MemoryBudgetError, MtckptError, StepNotFoundError
from ..format import naming
from ..proto import mtckpt_pb2 as pb
from ..proto import mtckpt_pb2_grpc as pb_grpc
from . import frames, rebuild, reserve
from .bulk import Produced
from .chain import ChainRefused
from .holdings import Outgoing, Shard
from .incoming import NoBase
from .limits import PeerLimits, Progress, certified_node
from .parity import AlreadyHeld
from .rpc import SERVICE, shard_id
from .stripes import StripeKey

if TYPE_CHECKING:  # the daemon owns its servicer
    from .service import Daemon

log = logging.getLogger(__name__)

MAX_STATUS_WAIT = 30.0  # seconds a long-polled Status waits at most
MAX_LIST_WAIT = 5.0  # seconds a ListShards awaiting complete stripes waits at most
MAX_AWAITED = 1024  # stripes one ListShards may await
TRAINER_ONLY = ("Notify", "Flush", "Recover")  # served on the Unix socket, not to peers


def _shard(ident: pb.ShardId, context) -> Shard:
    try:
        return Shard.checked(ident.run, ident.step, ident.rank, ident.origin)
    except ValueError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


class Servicer(pb_grpc.DaemonServicer):
    """The Daemon service as served to trainers (the Unix socket) or to peers (TCP, with
    per-peer limits, and with mutual TLS each peer's certificate bound to the shards it
    may push or fetch)."""

    def __init__(self, daemon: Daemon, peers: PeerLimits | None = None) -> None:
        self.d = daemon
        self.peers = peers  # None: the trainers' service
        self.pool = "trainers" if peers is None else "peers"

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
        if request.brief:
            return self._brief()
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

    def _brief(self) -> pb.StatusReply:
        """Who this daemon is and its sync stride: what a peer's probe asks for."""
        d = self.d
        reply = pb.StatusReply(node_id=d.config.node_id, zone=d.config.zone,
                               address=d.address or "", replicas=d.config.replicas,
                               draining=d.draining, redundancy=str(d.config.scheme))  # fmt: skip
        reply.sync_stride, reply.sync_ttl = d.strides.said()
        return reply

    def _status(self) -> pb.StatusReply:
        d = self.d
        reply = self._brief()
        reply.memory_root = str(d.holdings.root)
        reply.memory_budget = d.config.memory_budget or 0
        reply.local_root = d.config.local_root or ""
        reply.remote_url = d.config.remote.url if d.config.remote is not None else ""
        for kind, size in d.room.usage().items():
            reply.memory.add(kind=kind, bytes=size)
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
        if request.complete:
            self._wait_complete(request, context)
        reply = pb.ListShardsReply(node_id=self.d.config.node_id)
        shards = [] if request.parities_only else self.d.holdings.list(request.run, request.origin)
        for held in shards:
            reply.shards.add(
                shard=shard_id(held.shard),
                world_size=held.world_size, data_size=held.data_size, replica=held.replica,
                manifest_crc=held.manifest_crc,
            )  # fmt: skip
        reply.parities.extend(self.d.parity.listing(request.run, request.origin,
                                                    request.manifests))  # fmt: skip
        return reply

    def _wait_complete(self, request, context) -> None:
        """Until each stripe of ``request.complete`` held here is complete, ``request.wait``
        seconds at most (not at all where no RPC thread is free to wait)."""
        try:
            if len(request.complete) > MAX_AWAITED:
                raise ValueError(f"{len(request.complete)} stripes awaited; at most {MAX_AWAITED}")
            if not 0 <= request.wait <= MAX_LIST_WAIT:  # NaN too
                raise ValueError(f"wait {request.wait} s; expected 0 to {MAX_LIST_WAIT}")
            keys = [StripeKey.checked(ident) for ident in request.complete]
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"ListShards: {exc}")
        changes = self.d.changes
        if not changes.take_waiter(self.pool):
            return
        try:
            deadline = time.monotonic() + request.wait
            while context.is_active() and not changes.closed:
                left = deadline - time.monotonic()
                if left <= 0 or self.d.parity.wait_complete(keys, min(left, 1.0)):
                    return
        finally:
            changes.give_waiter(self.pool)

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
            self._admit(header.data_size, f"a replica of {shard}", context)
            pieces = frames.verified(_push_chunks(request_iterator, shard, progress), str(shard))
            try:
                stored = self.d.holdings.store(shard, header.manifest, pieces, header.data_size)
            except (MtckptError, ValueError) as exc:
                self.d.transfer_failed(exc)
                context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        self.d.metrics.replica_bytes.inc(stored)
        self.d.holdings.expire_replicas(shard.origin, shard.run, self.d.strides.cluster())
        return pb.PushReply(bytes=stored)

    def OpenPush(self, request, context):
        if self.d.bulk is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this daemon has no data port")
        shard = self._header_shard(request, context)
        self._admit(request.data_size, f"a replica of {shard}", context)
        try:
            if request.base_step:
                incoming = self.d.holdings.receive_patch(
                    shard, request.manifest, request.data_size, request.base_step
                )
            else:
                incoming = self.d.holdings.receive(shard, request.manifest, request.data_size)
        except NoBase as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except (MtckptError, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        ticket = self.d.bulk.admit(incoming)
        return pb.BulkTicket(ticket=ticket, port=self.d.bulk.port, tls=self.d.bulk.tls)

    def OpenFetch(self, request, context):
        if self.d.bulk is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this daemon has no data port")
        try:
            if request.HasField("parity") and request.rebuild_for:
                outgoing = self._rebuilt(request, context)
            elif request.HasField("parity"):
                outgoing = self._parity_outgoing(request, context)
            else:
                shard = _shard(request.shard, context)
                if request.offset or request.length:  # a piece, for a group rebuilding one
                    self._check_in_group(shard, context)
                else:
                    self._check_certified(shard, context, "fetch")
                outgoing = self.d.holdings.outgoing(shard, request.offset, request.length)
        except FileNotFoundError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except MtckptError as exc:
            context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        ticket = self.d.bulk.offer(outgoing)
        return pb.BulkTicket(ticket=ticket, port=self.d.bulk.port, tls=self.d.bulk.tls)

    def _parity_outgoing(self, request: pb.FetchRequest, context) -> Outgoing:
        stripe = self.d.parity.complete(request.parity)
        if self.peers is not None and self.d.tls is not None:
            node = certified_node(context)
            if node not in stripe.key.group:
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"{stripe.key}: node {node!r} is not of its group")  # fmt: skip
        offset, length = request.offset, request.length or stripe.size - request.offset
        if offset + length > stripe.size:
            raise ValueError(f"{stripe.key}: {length} bytes at offset {offset} asked for; the "
                             f"parity has {stripe.size}")  # fmt: skip
        return Outgoing(stripe.path, stripe.chunks, offset, length)

    def _rebuilt(self, request: pb.FetchRequest, context) -> Produced:
        """A lost node's piece of a stripe, rebuilt here (daemon/rebuild.py); with mutual
        TLS, for that node only."""
        if self.peers is not None and self.d.tls is not None:
            node = certified_node(context)
            if node != request.rebuild_for:
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"node {node!r} may not have node {request.rebuild_for!r}'s "
                              "piece rebuilt")  # fmt: skip
        return rebuild.helper(self.d.parity, self.d.peers, request.parity, request.rebuild_for)

    def _check_in_group(self, shard: Shard, context) -> None:
        """With mutual TLS, pieces of this node's shards go to the nodes of the coded group
        that protects them (they rebuild a lost member's shards) or to their own node."""
        if self.peers is None or self.d.tls is None:
            return
        node = certified_node(context)
        group = self.d.replicator.group_for(shard.run, shard.step)
        if node != shard.origin and (group is None or node not in group.members):
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{shard}: node {node!r} is not of the group that protects it",
            )

    def _admit(self, size: int, what: str, context) -> None:
        try:
            self.d.room.admit(size, what)
        except MemoryBudgetError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    def OpenContribute(self, request, context):
        if self.d.bulk is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this daemon has no data port")
        if self.peers is not None and self.d.tls is not None:
            node = certified_node(context)
            if node != request.contributor.origin:
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"peer with a certificate for node {node!r} may not contribute "
                              f"pieces of node {request.contributor.origin!r}")  # fmt: skip
        relays = self.d.replicator.relays
        relayed = relays is not None and relays.relays(request.stripe)
        if not relayed:  # a relay holds a few frames at a time, nothing in the memory tier
            self._admit(request.piece_size,
                        f"a parity piece from {request.contributor.origin!r}", context)  # fmt: skip
        try:
            sink = relays.receive(request) if relayed else self.d.parity.receive(request)
        except AlreadyHeld as exc:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except ChainRefused as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except (MtckptError, ValueError, OSError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        ticket = self.d.bulk.admit(sink)
        return pb.BulkTicket(ticket=ticket, port=self.d.bulk.port, tls=self.d.bulk.tls)

    def Notify(self, request, context):
        try:
            naming.check_run(request.run)
            naming.check_step(request.step)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Notify: {exc}")
        self.d.replicator.keep_if_sync(request.run, request.step)
        self.d.replicator.notify()
        return pb.NotifyReply()

    def Reserve(self, request, context):
        """From a trainer: have the peers make room for its node's first steps; from a peer:
        make it here (daemon/reserve.py)."""
        try:
            reserve.check(request)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Reserve: {exc}")
        if self.peers is None:
            return self.d.reservations.ask_peers(request.rank, request.size, request.count)
        try:
            made = self.d.reservations.make_here(request.size, request.count)
        except OSError as exc:  # a full tmpfs: the peer's replicas allocate as they come
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"Reserve: {exc}")
        return pb.ReserveReply(bytes=made)

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
        try:
            naming.check_run(request.run)
            step = request.step if request.HasField("step") else None
            result = self.d.recoveries.recover(request.run, step, request.none_is_an_answer)
        except StepNotFoundError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except (MtckptError, ValueError) as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.RecoverReply(step=result.step, ranks=result.ranks, bytes=result.bytes,
                               sources=result.sources, complete=result.complete,
                               unreachable=result.unreachable)  # fmt: skip


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


def handlers(service: Servicer) -> grpc.GenericRpcHandler:
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
        "OpenContribute": unary(service.OpenContribute, pb.ContributeHeader),
        "Recover": unary(service.Recover, pb.RecoverRequest),
        "Flush": unary(service.Flush, pb.FlushRequest),
        "Reserve": unary(service.Reserve, pb.ReserveRequest),
        "Fetch": grpc.unary_stream_rpc_method_handler(service.Fetch, pb.FetchRequest.FromString),
        "Push": grpc.stream_unary_rpc_method_handler(
            service.Push, response_serializer=pb.PushReply.SerializeToString
        ),
    })  # fmt: skip
