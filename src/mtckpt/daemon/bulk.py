"""Bulk data beside gRPC: a replica's data file over a plain TCP (or TLS) stream.

Python gRPC moves about a third of what a socket does on the same machine, and spends a
core doing it. So a push asks for a ticket over gRPC (OpenPush: the header is validated
and the token checked there), then connects to the peer's data port, sends the ticket and
the file in frames: ``offset`` (u64), ``length`` (u32), ``crc32c`` (u32), little-endian,
then the bytes. Frames are the manifest's chunks and carry the chunk's recorded crc32c,
so the sender never reads the bytes (``sendfile`` from the memory tier to another host;
sent from a mapping over TLS and on loopback: daemon/sockets.py); the receiver takes each
frame straight into the replica file (``splice`` into a reused file over plain TCP, else
into a mapping of it) and checks it while it is in cache. One status byte comes back: 0
stored; 2 stored, and the parity stripe it went to is complete with it (the sink's
``completed``); else 1 and a length-prefixed reason. Recovery runs the other way: OpenFetch
gives a ticket for a held file, and the fetching daemon reads the same frames after a
status.
"""

from __future__ import annotations

import logging
import mmap
import secrets
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator

from .. import _fastpath
from ..errors import MtckptError
from ..format.manifest import RankManifest
from ..tiers.base import close_mapping_later
from ..tiers.memory import open_held
from . import frames, sockets
from .auth import TLSFiles
from .holdings import Outgoing
from .incoming import Incoming
from .sockets import SOCKET_TIMEOUT, BulkError

Sink = Incoming  # or anything with its receiving methods (parity.Contribution, Received)

log = logging.getLogger(__name__)

FRAME = struct.Struct("<QII")  # offset, length, crc32c
MAX_FRAME = 64 << 20  # larger frames from the wire are refused
FRAME_BYTES = 1 << 20  # whole manifest chunks per frame (8 MiB measured no faster here)
TICKET_BYTES = 32
TICKET_SECONDS = 60.0
STATUS = struct.Struct("<BI")  # status, length of the reason that follows
STORED, REFUSED, COMPLETED = 0, 1, 2
MAX_REASON = 4096  # bytes of a refusal's reason
TICKET_TIMEOUT = 10.0  # a connection must show its ticket within this (TLS handshake too)
MAX_CONNECTIONS = 64  # data connections served at once; more are closed at once


class Produced:
    """Bytes made as they are sent (a piece rebuilt from a coded group): ``chunks()``
    yields ``size`` bytes in order; each goes out as a frame with its crc32c."""

    def __init__(self, where: str, size: int, chunks: Callable[[], Iterator]) -> None:
        self.where, self.size, self.chunks = where, size, chunks


SENT = (Outgoing, Produced)  # transfers this side sends; the others are sinks it fills


class BulkServer:
    """Accepts data connections; each starts with a ticket from :meth:`admit` (the peer
    sends a replica here) or :meth:`offer` (the peer fetches a file from here)."""

    def __init__(self, host: str, port: int, tls: TLSFiles | None,
                 on_stored: Callable[[Incoming], None],
                 on_failed: Callable[[Exception], None] = lambda exc: None) -> None:  # fmt: skip
        self._listener = socket.create_server((host, port), reuse_port=False)
        self.port = self._listener.getsockname()[1]
        self.tls = tls is not None
        self._context = None
        if tls is not None:
            self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._context.load_cert_chain(tls.cert, tls.key)
            self._context.load_verify_locations(tls.ca)
            self._context.verify_mode = ssl.CERT_REQUIRED
        self._on_stored, self._on_failed = on_stored, on_failed
        self._pending: dict[bytes, tuple[Sink | Outgoing | Produced, float]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._thread = threading.Thread(target=self._accept, name="mtckpt-bulk", daemon=True)
        self._thread.start()

    def admit(self, incoming: Sink) -> bytes:
        """A one-time ticket for sending ``incoming``'s bytes here."""
        return self._ticket(incoming)

    def offer(self, outgoing: Outgoing | Produced) -> bytes:
        """A one-time ticket for fetching ``outgoing`` from here."""
        return self._ticket(outgoing)

    def _ticket(self, transfer: Sink | Outgoing | Produced) -> bytes:
        ticket = secrets.token_bytes(TICKET_BYTES)
        now = time.monotonic()
        with self._lock:
            expired = [t for t, (_, until) in self._pending.items() if until < now]
            stale = [self._pending.pop(t)[0] for t in expired]
            self._pending[ticket] = (transfer, now + TICKET_SECONDS)
        for old in stale:
            if not isinstance(old, SENT):
                old.close()
        return ticket

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, address = self._listener.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                log.warning("data port: %d connections open already; closed the one from %s",
                            MAX_CONNECTIONS, address[0])  # fmt: skip
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="mtckpt-bulk-conn",
                             daemon=True).start()  # fmt: skip

    def _serve(self, conn: socket.socket) -> None:
        transfer = None
        try:
            conn.settimeout(TICKET_TIMEOUT)
            if self._context is not None:
                conn = self._context.wrap_socket(conn, server_side=True)
            ticket = sockets.recv_exactly(conn, TICKET_BYTES)
            with self._lock:
                transfer = self._pending.pop(ticket, (None, 0))[0]
            if transfer is None:
                raise BulkError("unknown or expired ticket")
            conn.settimeout(SOCKET_TIMEOUT)
            if isinstance(transfer, Produced):
                conn.sendall(STATUS.pack(STORED, 0))
                _send_produced(conn, transfer)
                return
            if isinstance(transfer, SENT):
                with open_held(transfer.path) as f:  # not reused while it is sent
                    if transfer.length is None:
                        conn.sendall(STATUS.pack(STORED, 0))  # accepted: the frames follow
                        _send_frames(conn, f.fileno(), transfer.manifest)
                    else:
                        _send_range(conn, f.fileno(), transfer)
                return
            receive_frames(conn, transfer)
            transfer.commit()
            completed = getattr(transfer, "completed", False)  # a parity stripe's last piece
            conn.sendall(STATUS.pack(COMPLETED if completed else STORED, 0))
            try:  # after the status: the sender need not wait for the housekeeping
                self._on_stored(transfer)
            except Exception as exc:
                log.warning("%s: stored, but the housekeeping after it failed: %s",
                            transfer.where, exc)  # fmt: skip
        except (OSError, MtckptError, ValueError) as exc:
            sink = transfer is not None and not isinstance(transfer, SENT)
            where = f"{transfer.where}: " if sink else ""
            log.warning("bulk transfer failed: %s%s", where, exc)
            self._on_failed(exc)
            reason = f"{where}{exc}".encode()[:MAX_REASON]
            try:
                conn.sendall(STATUS.pack(REFUSED, len(reason)) + reason)
                sockets.drain(conn)
            except OSError:
                pass
        finally:
            if transfer is not None and not isinstance(transfer, SENT):
                transfer.close()
            conn.close()
            self._slots.release()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for transfer, _ in pending:
            if not isinstance(transfer, SENT):
                transfer.close()


def receive_frames(conn: socket.socket, incoming: Sink) -> None:
    """Frames from ``conn`` into ``incoming`` until it has every byte, each checked. Into
    a ``spliceable`` sink's file over plain TCP the bytes are spliced, never copied
    through this process, then read back to be checked."""
    crc32c = _fastpath.backend().crc32c
    header = bytearray(FRAME.size)
    spliced = getattr(incoming, "spliceable", False) and sockets.plain(conn)
    splice = sockets.SocketToFile(conn) if spliced else None
    try:
        while incoming.received < incoming.size:
            sockets.recv_into_exactly(conn, memoryview(header))
            offset, length, sent = FRAME.unpack(header)
            if offset != incoming.received or not 0 < length <= MAX_FRAME:
                raise BulkError(f"a frame of {length} bytes at offset {offset}; expected "
                                f"offset {incoming.received}")  # fmt: skip
            if offset + length > incoming.size:
                raise BulkError(f"more than the {incoming.size} bytes announced")
            whole = incoming.whole_chunks(offset, length)  # then accept() checks each
            if splice is not None:
                splice.receive(*incoming.file_at(offset, length), length)
            if splice is None or not whole:
                with incoming.region(offset, length) as view:  # straight into its pages
                    if splice is None:
                        sockets.recv_into_exactly(conn, view)
                    if not whole and (got := crc32c(view)) != sent:
                        raise BulkError(f"the frame at offset {offset} arrived damaged "
                                        f"(crc32c {got:#010x}, sent {sent:#010x})")  # fmt: skip
            incoming.accept(offset, length)
    finally:
        if splice is not None:
            splice.close()


def _send_frames(conn: socket.socket, fd: int, manifest: RankManifest,
                 bandwidth: float | None = None) -> None:  # fmt: skip
    """The data file ``fd`` as frames of whole manifest chunks, each with the crc32c its
    chunks' recorded ones combine to: the bytes are never read here (``sendfile``, or
    sent from a mapping: ``sockets.copying``)."""
    size, chunk = manifest.file_size, manifest.chunk_size
    per_frame = max(1, FRAME_BYTES // chunk)
    combine = _fastpath.backend().crc32c_combine
    mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size and sockets.copying(conn) else None
    started = time.monotonic()
    try:
        for first in range(0, len(manifest.chunk_crc32c), per_frame):
            offset = first * chunk
            length = min(per_frame * chunk, size - offset)
            crc = 0
            for index in range(first, -(-(offset + length) // chunk)):
                crc = combine(crc, manifest.chunk_crc32c[index], min(chunk, size - index * chunk))
            if mapping is None:
                conn.sendall(FRAME.pack(offset, length, crc))
                sockets.sendfile(conn, fd, offset, length)
            else:
                with memoryview(mapping)[offset : offset + length] as view:
                    sockets.send_frame(conn, FRAME.pack(offset, length, crc), view)
            frames.pace(offset + length, bandwidth, started)
    finally:
        if mapping is not None:  # not before the status is read
            close_mapping_later(mapping)


def _send_produced(conn: socket.socket, produced: Produced,
                   bandwidth: float | None = None) -> None:  # fmt: skip
    crc32c, offset, started = _fastpath.backend().crc32c, 0, time.monotonic()
    for chunk in produced.chunks():
        view = memoryview(chunk).cast("B")
        for lo in range(0, view.nbytes, FRAME_BYTES):
            piece = view[lo : lo + FRAME_BYTES]
            sockets.send_frame(conn, FRAME.pack(offset, piece.nbytes, crc32c(piece)), piece)
            offset += piece.nbytes
            frames.pace(offset, bandwidth, started)
    if offset != produced.size:
        raise BulkError(f"{produced.where}: {offset} bytes made, {produced.size} announced")


def checked_range(view: memoryview, described, start: int, end: int,
                  name: str) -> list[tuple[int, int, int]]:  # fmt: skip
    """``(lo, hi, crc32c)`` of the pieces of ``[start, end)`` of a file mapped as ``view``,
    one per chunk touched, after checking each such chunk against the crc32c that
    ``described`` (a manifest, a parity's record) has for it: BulkError naming ``name``
    and the chunk where one is damaged."""
    size, chunk, crcs = described.file_size, described.chunk_size, described.chunk_crc32c
    crc32c = _fastpath.backend().crc32c
    out = []
    for index in range(start // chunk, -(-end // chunk)):
        first, last = index * chunk, min(size, (index + 1) * chunk)
        whole = crc32c(view[first:last])
        if whole != crcs[index]:
            raise BulkError(f"{name}: chunk {index} is damaged here (crc32c {whole:#010x}, "
                            f"recorded {crcs[index]:#010x})")  # fmt: skip
        lo, hi = max(first, start), min(last, end)
        out.append((lo, hi, whole if (lo, hi) == (first, last) else crc32c(view[lo:hi])))
    return out


def _send_range(conn: socket.socket, fd: int, outgoing: Outgoing) -> None:
    """``outgoing.length`` bytes from ``outgoing.offset`` of the file ``fd``, after checking
    every chunk they touch against its recorded crc32c (a damaged one is refused with a
    status naming it): frames at offsets from 0, one per chunk touched, each with the
    crc32c of its bytes."""
    start = outgoing.offset
    with mmap.mmap(fd, outgoing.manifest.file_size, prot=mmap.PROT_READ) as mapping, \
            memoryview(mapping) as view:  # fmt: skip
        frames_out = checked_range(view, outgoing.manifest, start, start + outgoing.length,
                                   outgoing.path.name)  # fmt: skip
        conn.sendall(STATUS.pack(STORED, 0))
        copying = sockets.copying(conn)
        for lo, hi, crc in frames_out:
            if copying:
                sockets.send_frame(conn, FRAME.pack(lo - start, hi - lo, crc), view[lo:hi])
            else:
                conn.sendall(FRAME.pack(lo - start, hi - lo, crc))
                sockets.sendfile(conn, fd, lo, hi - lo)


def send(host: str, port: int, ticket: bytes, fd: int, manifest: RankManifest, *,
         tls: TLSFiles | None, bandwidth: float | None = None) -> None:  # fmt: skip
    """Send the data file ``fd`` described by ``manifest`` to a peer's data port under
    ``ticket``; the peer checks every chunk against the crc32c sent with it."""
    with sockets.connect(host, port, tls) as conn:
        conn.sendall(ticket)
        _send_frames(conn, fd, manifest, bandwidth=bandwidth)
        _read_status(conn, host, port)


def send_parts(host: str, port: int, ticket: bytes, parts: list[tuple[int, int, int]], *,
               tls: TLSFiles | None, bandwidth: float | None = None) -> bool:  # fmt: skip
    """Send ``(fd, offset, length)`` parts of files, one after the other, as one stream
    of frames (offsets from 0, each with the crc32c of its bytes) to a peer's data port
    under ``ticket``; whether they completed the parity stripe they went to."""
    crc32c = _fastpath.backend().crc32c
    sent, started = 0, time.monotonic()
    with sockets.connect(host, port, tls) as conn:
        conn.sendall(ticket)
        copying = sockets.copying(conn)
        for fd, offset, length in parts:
            if not length:
                continue
            with mmap.mmap(fd, offset + length, prot=mmap.PROT_READ) as mapping, \
                    memoryview(mapping) as view:  # fmt: skip
                for lo in range(offset, offset + length, FRAME_BYTES):
                    hi = min(offset + length, lo + FRAME_BYTES)
                    header = FRAME.pack(sent, hi - lo, crc32c(view[lo:hi]))
                    if copying:
                        sockets.send_frame(conn, header, view[lo:hi])
                    else:
                        conn.sendall(header)
                        sockets.sendfile(conn, fd, lo, hi - lo)
                    sent += hi - lo
                    frames.pace(sent, bandwidth, started)
        return _read_status(conn, host, port)


def send_produced(host: str, port: int, ticket: bytes, produced: Produced, *,
                  tls: TLSFiles | None, bandwidth: float | None = None,
                  send_buffer: int | None = None) -> bool:  # fmt: skip
    """Send ``produced``'s bytes, as they are made, to a peer's data port under ``ticket``
    (frames with the crc32c of their bytes); whether they completed the parity stripe they
    went to."""
    with sockets.connect(host, port, tls, send_buffer) as conn:
        conn.sendall(ticket)
        _send_produced(conn, produced, bandwidth)
        return _read_status(conn, host, port)


def fetch(host: str, port: int, ticket: bytes, incoming: Sink, *,
          tls: TLSFiles | None) -> None:  # fmt: skip
    """Fetch a file from a peer's data port under ``ticket`` into ``incoming`` (checked;
    the caller commits it)."""
    with sockets.connect(host, port, tls) as conn:
        conn.sendall(ticket)
        _read_status(conn, host, port)
        receive_frames(conn, incoming)


def _read_status(conn: socket.socket, host: str, port: int) -> bool:
    """Whether the peer says the parity stripe the transfer went to is complete with it;
    BulkError if it refused the transfer (with its reason) or answered nonsense."""
    status, count = STATUS.unpack(sockets.recv_exactly(conn, STATUS.size))
    if status == REFUSED and count <= MAX_REASON:
        reason = sockets.recv_exactly(conn, count).decode(errors="replace") if count else ""
        raise BulkError(f"the peer at {host}:{port} refused the transfer: {reason}")
    if status not in (STORED, COMPLETED) or count:
        raise BulkError(f"the peer at {host}:{port} answered status {status} with {count} "
                        f"bytes; expected {STORED}, {COMPLETED}, or {REFUSED} with at most "
                        f"{MAX_REASON}")  # fmt: skip
    return status == COMPLETED
