"""What one peer may hold of a daemon: a few streams and waiting calls at a time, and no
stream that stops moving. Peers are told apart by their certificate's node id (mutual TLS)
or else their address; over the limit a call is refused (RESOURCE_EXHAUSTED) naming the
peer and the limit. A watchdog cancels any stream that made no progress (a frame sent or
received) for ``idle_seconds``, which frees the RPC thread it held: an unread Fetch
otherwise blocks its thread for as long as the client keeps the connection open."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

log = logging.getLogger(__name__)

STREAMS_PER_PEER = 4  # Fetch / Push streams one peer may have open at once
WAITS_PER_PEER = 2  # long-polled Status calls one peer may have waiting at once
IDLE_SECONDS = 30.0  # a stream with no progress for this long is cancelled


def peer_identity(context) -> str:
    """Who is calling: ``node n1`` (the certificate's common name, with mutual TLS), else
    the address the call came from (``10.0.0.3``; the Unix socket: ``local``)."""
    names = (context.auth_context() or {}).get("x509_common_name") or []
    if names:
        return f"node {names[0].decode(errors='replace')}"
    address = context.peer() or ""
    if address.startswith("unix:"):
        return "local"
    kind, _, rest = address.partition(":")  # ipv4:1.2.3.4:5678, ipv6:[::1]:5678
    return rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else address


def certified_node(context) -> str | None:
    """The node id in the calling peer's certificate (its common name); None without one."""
    names = (context.auth_context() or {}).get("x509_common_name") or []
    return names[0].decode(errors="replace") if names else None


class Progress:
    """A watched stream: :meth:`moved` after each frame."""

    def __init__(self, context, what: str) -> None:
        self.context, self.what = context, what
        self.last = time.monotonic()
        self.cancelled = False

    def moved(self) -> None:
        self.last = time.monotonic()


class PeerLimits:
    def __init__(self, streams: int = STREAMS_PER_PEER, waits: int = WAITS_PER_PEER,
                 idle_seconds: float = IDLE_SECONDS) -> None:  # fmt: skip
        self.limits = {"streams": streams, "waiting calls": waits}
        self.idle_seconds = idle_seconds
        self._held: dict[tuple[str, str], int] = {}
        self._watched: set[Progress] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="mtckpt-stream-watchdog",
                                          daemon=True)  # fmt: skip
        self._watchdog.start()

    @contextmanager
    def hold(self, context, kind: str, what: str) -> Iterator[Progress]:
        """Count one ``kind`` ("streams" or "waiting calls") against the calling peer for
        the block, or abort the call if it has its limit already; streams are watched."""
        key = (peer_identity(context), kind)
        limit = self.limits[kind]
        with self._lock:
            held = self._held.get(key, 0)
            if held < limit:
                self._held[key] = held + 1
        if held >= limit:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"peer {key[0]} has {limit} {kind} open already, the most one peer may have",
            )
        progress = Progress(context, f"{what} from peer {key[0]}")
        if kind == "streams":
            with self._lock:
                self._watched.add(progress)
        try:
            yield progress
        finally:
            with self._lock:
                self._watched.discard(progress)
                self._held[key] -= 1
                if not self._held[key]:
                    del self._held[key]

    def held(self, peer: str, kind: str) -> int:
        with self._lock:
            return self._held.get((peer, kind), 0)

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.idle_seconds / 4)):
            now = time.monotonic()
            with self._lock:
                idle = [p for p in self._watched
                        if not p.cancelled and now - p.last > self.idle_seconds]  # fmt: skip
            for progress in idle:
                progress.cancelled = True
                log.warning("%s made no progress for %.0f s: cancelled", progress.what,
                            now - progress.last)  # fmt: skip
                progress.context.cancel()

    def close(self) -> None:
        self._stop.set()
