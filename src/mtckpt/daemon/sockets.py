"""Moving bytes through the data port's sockets (daemon/bulk.py): connecting (TLS too),
sending a file's bytes (``sendfile``, or from a mapping where copying is faster), receiving
them straight into a file (``splice``), and exact reads, each bounded by the socket's
timeout."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import select
import socket
import ssl
import time

from ..errors import MtckptError
from .auth import TLSFiles

SOCKET_TIMEOUT = 60.0


class BulkError(MtckptError):
    """A bulk transfer failed; the message says where and why."""


def plain(conn: socket.socket) -> bool:
    return not isinstance(conn, ssl.SSLSocket)  # TLS decrypts in user space: no splice


def copying(conn: socket.socket) -> bool:
    """Whether to send from a mapping rather than by ``sendfile``: over TLS (encrypted in
    user space), and to a peer on loopback. There the receiving kernel copies every byte
    anyway, and ``sendfile``'s page references made a GiB take 0.38-0.58 s against
    0.25-0.29 s copied (a NIC reads the pages itself: ``sendfile`` is kept)."""
    if not plain(conn):
        return True
    try:
        host = conn.getpeername()[0]
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except (OSError, ValueError, IndexError):
        return False


class SocketToFile:
    """Bytes from a TCP socket into a file at an offset by ``splice(2)`` through a pipe of
    this connection's: the kernel moves them; this process never reads them."""

    PIPE_BYTES = 1 << 20

    def __init__(self, conn: socket.socket) -> None:
        self.conn, self.timeout = conn, conn.gettimeout()
        self.out, self.into = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.into, fcntl.F_SETPIPE_SZ, self.PIPE_BYTES)
        except OSError:  # above /proc/sys/fs/pipe-max-size for this user: the default
            pass
        self.capacity = fcntl.fcntl(self.into, fcntl.F_GETPIPE_SZ)
        self._readable: select.poll | None = None

    def receive(self, fd: int, offset: int, length: int) -> None:
        """The next ``length`` bytes of the connection into ``fd`` at ``offset``."""
        while length:
            queued = self._from_socket(min(length, self.capacity))
            length -= queued
            while queued:
                moved = os.splice(self.out, fd, queued, offset_dst=offset)
                offset, queued = offset + moved, queued - moved

    def _from_socket(self, count: int) -> int:
        while True:
            try:
                moved = os.splice(self.conn.fileno(), self.into, count)
            except BlockingIOError:  # a socket with a timeout is non-blocking underneath
                if self._readable is None:
                    self._readable = select.poll()
                    self._readable.register(self.conn.fileno(), select.POLLIN)
                if not self._readable.poll(None if self.timeout is None else self.timeout * 1000):
                    raise BulkError(f"the peer sent nothing for {self.timeout:.0f} s") from None
                continue
            if moved == 0:
                raise BulkError("the connection closed in the middle of a frame")
            return moved

    def close(self) -> None:
        os.close(self.out)
        os.close(self.into)


def connect(host: str, port: int, tls: TLSFiles | None,
            send_buffer: int | None = None) -> socket.socket:  # fmt: skip
    """``send_buffer``: the socket's send buffer in bytes (None: the kernel's, growing)."""
    raw = (socket.create_connection((host, port), timeout=SOCKET_TIMEOUT)
           if send_buffer is None else connect_with_buffer(host, port, send_buffer))  # fmt: skip
    if tls is None:
        return raw
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
    context.load_cert_chain(tls.cert, tls.key)
    return context.wrap_socket(raw, server_hostname=host)


def connect_with_buffer(host: str, port: int, send_buffer: int) -> socket.socket:
    """A TCP connection whose send buffer is ``send_buffer`` bytes, set before connecting
    so that the window is sized for it."""
    failure: OSError = OSError(f"{host}: no address")
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        raw = socket.socket(family, kind, proto)
        try:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
            raw.settimeout(SOCKET_TIMEOUT)
            raw.connect(address)
            return raw
        except OSError as exc:
            raw.close()
            failure = exc
    raise failure


def send_frame(conn: socket.socket, header: bytes, payload: memoryview) -> None:
    """A frame's header and bytes in one system call where the socket allows (plain TCP)."""
    if not plain(conn):
        conn.sendall(header)
        conn.sendall(payload)
        return
    sent = conn.sendmsg([header, payload])
    if sent < len(header):
        conn.sendall(header[sent:])
        sent = len(header)
    if sent - len(header) < payload.nbytes:
        conn.sendall(payload[sent - len(header) :])


def drain(conn: socket.socket, seconds: float = 10.0) -> None:
    """Read and drop what the peer still sends, so that closing does not reset the
    connection and lose the status it has yet to read."""
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(seconds)
    buffer = bytearray(1 << 20)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and conn.recv_into(buffer):
        pass


def sendfile(conn: socket.socket, fd: int, offset: int, length: int) -> None:
    """``length`` bytes of the file ``fd`` from ``offset``; the socket's send buffer
    waited out (within SOCKET_TIMEOUT) when full."""
    end = offset + length
    writable = None
    while offset < end:
        try:
            sent = os.sendfile(conn.fileno(), fd, offset, end - offset)
        except BlockingIOError:  # a socket with a timeout is non-blocking underneath
            if writable is None:
                writable = select.poll()
                writable.register(conn.fileno(), select.POLLOUT)
            if not writable.poll(SOCKET_TIMEOUT * 1000):
                raise BulkError(f"the peer took no data for {SOCKET_TIMEOUT:.0f} s") from None
            continue
        if sent == 0:
            raise BulkError("the data file ended early")
        offset += sent


def recv_exactly(conn: socket.socket, count: int) -> bytes:
    buf = bytearray(count)
    recv_into_exactly(conn, memoryview(buf))
    return bytes(buf)


def recv_into_exactly(conn: socket.socket, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        n = conn.recv_into(view[got:])
        if n == 0:
            raise BulkError(f"the connection closed after {got} of {view.nbytes} bytes")
        got += n
