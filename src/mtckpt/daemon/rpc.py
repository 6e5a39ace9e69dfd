"""gRPC plumbing shared by the daemon and its clients: addresses, credentials, the shared
token, message sizes, and a small client for the Daemon service."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Iterator

import grpc

from ..proto import mtckpt_pb2 as pb
from ..proto import mtckpt_pb2_grpc as pb_grpc
from . import frames
from .auth import TLSFiles

MAX_MESSAGE = 64 * 1024 * 1024  # manifests travel whole in one message
TOKEN_HEADER = "mtckpt-token"
SERVICE = "mtckpt.v1.Daemon"
MAX_RESERVED_STEPS = 64  # steps one Reserve may have files made for (daemon/reserve.py)
PUSH, FETCH = f"/{SERVICE}/Push", f"/{SERVICE}/Fetch"
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    # A peer that restarts is retried within seconds (gRPC's default backoff grows to 2 min).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5000),
]


def shard_id(shard) -> pb.ShardId:
    """The wire form of a holdings.Shard."""
    return pb.ShardId(run=shard.run, step=shard.step, rank=shard.rank, origin=shard.origin)


def error_text(exc: Exception) -> str:
    """``CODE: details`` of a failed call, for logs and status; other errors' own text."""
    if not isinstance(exc, grpc.RpcError):
        return str(exc)
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'error'}: {details}"


def is_unix(address: str) -> bool:
    return address.startswith("unix:")


def unix_path(address: str) -> str:
    """``unix:///run/x.sock`` or ``unix:/run/x.sock`` -> ``/run/x.sock``."""
    return "/" + address[len("unix:") :].lstrip("/")


class TokenCheck(grpc.ServerInterceptor):
    """Rejects every call that does not carry the shared token (UNAUTHENTICATED)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong mtckpt token")

        self._deny = {
            (False, False): grpc.unary_unary_rpc_method_handler(deny),
            (False, True): grpc.unary_stream_rpc_method_handler(deny),
            (True, False): grpc.stream_unary_rpc_method_handler(deny),
            (True, True): grpc.stream_stream_rpc_method_handler(deny),
        }

    def intercept_service(self, continuation, handler_call_details):
        sent = dict(handler_call_details.invocation_metadata or ()).get(TOKEN_HEADER, "")
        handler = continuation(handler_call_details)
        if hmac.compare_digest(sent.encode(), self._token) or handler is None:
            return handler
        return self._deny[(handler.request_streaming, handler.response_streaming)]


class Client:
    """The Daemon service at ``address`` (``host:port`` or ``unix:///path``)."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls: TLSFiles | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.address = address
        self.timeout = timeout
        if tls is not None and not is_unix(address):
            cert, key, ca = tls.read()
            credentials = grpc.ssl_channel_credentials(ca, key, cert)
            self._channel = grpc.secure_channel(address, credentials, options=OPTIONS)
        else:
            self._channel = grpc.insecure_channel(address, options=OPTIONS)
        self._stub = pb_grpc.DaemonStub(self._channel)
        # The data-carrying calls send and receive frames encoded by hand (frames.py).
        self._push = self._channel.stream_unary(
            PUSH, request_serializer=None, response_deserializer=pb.PushReply.FromString
        )
        self._fetch = self._channel.unary_stream(
            FETCH, request_serializer=pb.FetchRequest.SerializeToString, response_deserializer=None
        )
        self._metadata = ((TOKEN_HEADER, token),) if token else ()

    def status(
        self,
        timeout: float | None = None,
        wait_for_ready: bool = False,
        *,
        changed_since: int = 0,
        wait: float = 0.0,
        brief: bool = False,
    ) -> pb.StatusReply:
        """``wait_for_ready``: wait (within ``timeout``) for a peer that is still starting
        or reconnecting, rather than failing at once. With ``wait`` seconds and the
        ``version`` of an earlier reply, the daemon answers once its replication or flush
        state differs from that reply's (or the time is up). ``brief``: only who it is
        and its sync stride (a peer's probe)."""
        request = pb.StatusRequest(changed_since=changed_since, wait_seconds=wait, brief=brief)
        return self._stub.Status(
            request,
            timeout=(timeout or self.timeout) + wait,
            metadata=self._metadata,
            wait_for_ready=wait_for_ready,
        )

    def list_shards(self, run: str = "", origin: str = "", manifests: bool = False,
                    parities_only: bool = False, complete=(), wait: float = 0.0,
                    timeout: float | None = None) -> pb.ListShardsReply:  # fmt: skip
        """What the peer holds; ``complete``: stripe ids whose parities it is to wait for
        (``wait`` seconds at most) before it replies; ``timeout``: other than the client's."""
        request = pb.ListShardsRequest(run=run, origin=origin, manifests=manifests,
                                       parities_only=parities_only, complete=complete,
                                       wait=wait)  # fmt: skip
        timeout = self.timeout if timeout is None else timeout
        return self._stub.ListShards(request, timeout=timeout + wait,
                                     metadata=self._metadata)  # fmt: skip

    def fetch(
        self, shard: pb.ShardId, *, manifest: bool = False, offset: int = 0, length: int = 0
    ) -> Iterator[tuple[int, memoryview, int]]:
        """``(offset, data, crc32c sent with it)`` pieces of a file the daemon holds."""
        request = pb.FetchRequest(shard=shard, manifest=manifest, offset=offset, length=length)
        for frame in self._fetch(request, metadata=self._metadata):
            yield frames.read_data_chunk(frame)

    def push(self, messages: Iterable[bytes]) -> pb.PushReply:
        """Stream encoded PushMessage frames (frames.push_header, then frames.push_chunk)."""
        return self._push(iter(messages), metadata=self._metadata)

    def open_push(self, header: pb.PushHeader) -> pb.BulkTicket:
        return self._stub.OpenPush(header, timeout=self.timeout, metadata=self._metadata)

    def open_fetch(
        self, shard: pb.ShardId | None = None, *, offset: int = 0, length: int = 0,
        parity: pb.StripeId | None = None, rebuild_for: str = "",
    ) -> pb.BulkTicket:  # fmt: skip
        """A ticket for a held data file (``length`` bytes from ``offset``; 0: to its end),
        for this node's ``parity`` of a stripe, or for node ``rebuild_for``'s piece of that
        stripe rebuilt by this node."""
        request = pb.FetchRequest(shard=shard, offset=offset, length=length, parity=parity,
                                  rebuild_for=rebuild_for)  # fmt: skip
        return self._stub.OpenFetch(request, timeout=self.timeout, metadata=self._metadata)

    def open_contribute(self, header: pb.ContributeHeader) -> pb.BulkTicket:
        return self._stub.OpenContribute(header, timeout=self.timeout, metadata=self._metadata)

    def notify(self, run: str, step: int) -> None:
        self._stub.Notify(
            pb.NotifyRequest(run=run, step=step), timeout=self.timeout, metadata=self._metadata
        )

    def flush(self, shard: pb.ShardId) -> None:
        self._stub.Flush(pb.FlushRequest(shard=shard), timeout=self.timeout,
                         metadata=self._metadata)  # fmt: skip

    def reserve(self, rank: int, size: int, count: int,
                timeout: float | None = None) -> pb.ReserveReply:  # fmt: skip
        request = pb.ReserveRequest(rank=rank, size=size, count=count)
        return self._stub.Reserve(request, timeout=timeout or self.timeout,
                                  metadata=self._metadata)  # fmt: skip

    def recover(self, run: str, step: int | None = None, timeout: float | None = None,
                none_is_an_answer: bool = False):  # fmt: skip
        request = pb.RecoverRequest(run=run, none_is_an_answer=none_is_an_answer)
        if step is not None:
            request.step = step
        return self._stub.Recover(request, timeout=timeout, metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
