"""Chained encoding for ``xor`` groups (after ECPipe): a stripe's parity is summed along its
data nodes on its way to the node that holds it.

Data node i of stripe s (``members[(s + i) % n]``, daemon/groups.py) receives from data
node i - 1 the sum of pieces 0..i-1 (a :class:`Relay`), adds its own piece frame by frame
as it sends the sum on to data node i + 1, and the last data node sends it to the parity
holder, which takes it as one contribution of all those nodes (daemon/parity.py). Every
hop is from member t to member t + 1, so each node sends to one neighbour only, as with
replicas, and no two nodes' sends meet on a link.

A relay holds at most WINDOW frames; its sender then waits (TCP) until this node's
encoder takes them on. Every wait is bounded: a node whose upstream sum has not come
within CHAIN_WAIT starts the stripe's chain from its own piece, and refuses that sum if
it comes later (its sender then sends it to the holder directly); a relay not taken on
within CHAIN_WAIT fails its sender. A node that will not add its piece to a sum now (it
holds none of the step and no step of the run or a newer one, or it lags and sends sync
steps only, daemon/sync.py) refuses it at once. A chain skips the members its holders
took as holding nothing of the run's last step before (daemon/absent.py): a node sends
its sum on to the next data node after them, and waits for none from them. A chain that
breaks part way leaves the step to the encoder's next cycle, which sends each piece to
its holder directly.

The holder's status says whether the sum completed the stripe; each hop passes that back
in its own status to its upstream (waiting FORWARD_WAIT at most), so every data node
hears of it in the status it waits for anyway, besides asking the holder
(daemon/awaiting.py).
"""

from __future__ import annotations

import mmap
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

from .. import _fastpath
from ..errors import MtckptError
from ..proto import mtckpt_pb2 as pb
from ..redundancy import Redundancy
from .incoming import check_next
from .sockets import SOCKET_TIMEOUT
from .stripes import Contributor, StripeKey, pieces_of, summed

CHAIN_WAIT = 1.0  # seconds a node waits for its upstream's sum, and a sum to be taken on
FORWARD_WAIT = 2.0  # seconds a sum's status waits to say whether its stripe completed
# Each hop holds a frame whole before it passes it on: frames carry about FRAME_SECONDS of
# the stream (64 KiB on a link shared at 30 MB/s; more on a fast one, fewer to handle).
FRAME_SECONDS = 0.002
MIN_FRAME, MAX_FRAME = 64 << 10, 1 << 20
WINDOW = 16  # frames a relay holds before its sender waits
REFUSED_KEPT = 256  # stripes whose late sums are refused, newest kept
MAX_ARRIVING = 32  # sums arriving at once (each holds WINDOW frames at most)


class ChainError(MtckptError):
    """A chain's sum failed on its way; the message says where and why."""


class ChainRefused(ValueError):
    """This node takes no sum of that stripe now: the sender sends it to the holder."""


class Relay:
    """The sum of the upstream pieces of a stripe, arriving from the previous data node
    (the sink bulk.receive_frames fills, each frame checked against its crc32c), for this
    node's encoder to take on frame by frame (:meth:`frames`)."""

    def __init__(self, relays: Relays, key: StripeKey, contributors: list[Contributor],
                 size: int) -> None:  # fmt: skip
        self.relays, self.key, self.contributors, self.size = relays, key, contributors, size
        self.where = f"{key}: {pieces_of(contributors)} relayed by {relays.node_id!r}"
        self.received = 0
        self.opened = time.monotonic()
        self.taken = False  # guarded by relays.lock
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._made = 0
        self._ready: queue.SimpleQueue[tuple[int, int, bytearray] | None] = queue.SimpleQueue()
        self._current = bytearray()
        self._done = False
        self._finished = threading.Event()  # the encoder is done with it (or failed)
        self.completed = False  # the sum completed its stripe (the sender is told)

    def whole_chunks(self, offset: int, length: int) -> bool:
        return False  # each frame's own crc32c is checked

    def region(self, offset: int, length: int) -> memoryview:
        check_next(self.where, offset, length, self.received, self.size, ChainError)
        if length > MAX_FRAME:
            raise ChainError(f"{self.where}: a frame of {length} bytes; at most {MAX_FRAME}")
        self._current = self._buffer()
        if len(self._current) < length:
            self._current = bytearray(length)
        return memoryview(self._current)[:length]

    def accept(self, offset: int, length: int) -> None:
        self._ready.put((offset, length, self._current))
        self.received += length

    def commit(self) -> None:
        if self.received != self.size:
            raise ChainError(f"{self.where}: {self.received} of {self.size} bytes arrived")
        self.relays.await_taken(self)
        self._done = True
        self._finished.wait(FORWARD_WAIT)  # for the status: did the stripe complete?

    def close(self) -> None:
        if not self._done:
            self.relays.drop(self)
            self._ready.put(None)  # the encoder forwarding it fails

    def finish(self, completed: bool) -> None:
        """The encoder is done with this sum: ``completed`` if the holder said its stripe
        is complete with it (its sender is told so); a sender still sending fails at its
        next frame, its sum going no further. Only the first call counts."""
        if not self._finished.is_set():
            self.completed = completed
            self._finished.set()

    def frames(self) -> Iterator[tuple[int, memoryview]]:
        """``(offset, bytes)`` of each frame as it arrives; a frame's buffer is reused
        once the next is asked for."""
        got = 0
        while got < self.size:
            try:
                item = self._ready.get(timeout=SOCKET_TIMEOUT)
            except queue.Empty:
                raise ChainError(f"{self.where}: nothing arrived for {SOCKET_TIMEOUT:.0f} s "
                                 f"after {got} of {self.size} bytes") from None  # fmt: skip
            if item is None:
                raise ChainError(f"{self.where}: its sender failed after {got} bytes")
            offset, length, buffer = item
            with memoryview(buffer)[:length] as view:
                yield offset, view
            self._free.put(buffer)
            got += length

    def _buffer(self) -> bytearray:
        if self._made < WINDOW:
            self._made += 1
            return bytearray(MIN_FRAME)
        waited = time.monotonic()
        while True:
            try:
                return self._free.get(timeout=0.05)
            except queue.Empty:
                pass
            if self._finished.is_set():
                raise ChainError(f"{self.where}: could not be sent on")
            if not self.relays.taken_in_time(self):
                raise ChainError(f"{self.where}: not taken on within {CHAIN_WAIT} s")
            if time.monotonic() - waited > SOCKET_TIMEOUT:
                raise ChainError(f"{self.where}: its frames not taken for {SOCKET_TIMEOUT:.0f} s")


class Relays:
    """The sums arriving at this node, by stripe, until its encoder takes them on."""

    def __init__(self, node_id: str, scheme: Redundancy,
                 why_not_add: Callable[[str, int], str] = lambda run, step: "",
                 ) -> None:  # fmt: skip
        """``why_not_add(run, step)``: why this node will not add its piece of that step to
        a sum now ("" if it will): such a sum is refused at once, and its sender sends it
        to the holder instead of waiting CHAIN_WAIT for it to be taken on."""
        self.node_id, self.scheme, self.why_not_add = node_id, scheme, why_not_add
        self.lock = threading.Condition()
        self._arriving: dict[StripeKey, Relay] = {}
        self._refused: OrderedDict[StripeKey, None] = OrderedDict()

    def relays(self, ident: pb.StripeId) -> bool:
        """Whether sums of that stripe pass through this node (else: it holds the parity,
        or the stripe is refused by the parity store, which says why)."""
        try:
            key = StripeKey.checked(ident)
        except ValueError:
            return False
        return self.node_id in key.group_of.data_nodes(key.stripe)[1:]

    def receive(self, header: pb.ContributeHeader) -> Relay:
        """The sink of an upstream sum of this node's stripe, after checking its header:
        ValueError naming what is wrong; ChainRefused if this node started that stripe's
        chain itself meanwhile."""
        key = StripeKey.checked(header.stripe)
        if key.code != str(self.scheme) or self.scheme.kind != "xor":
            raise ValueError(f"{key}: this daemon keeps {self.scheme}; only xor groups chain")
        data_nodes = key.group_of.data_nodes(key.stripe)
        if self.node_id not in data_nodes[1:]:
            raise ValueError(f"{key}: sums are relayed by {data_nodes[1:]}, not "
                             f"{self.node_id!r}")  # fmt: skip
        contributors = summed(header, key, data_nodes)
        index = data_nodes.index(self.node_id)
        if any(data_nodes.index(c.origin) >= index for c in contributors):  # idle ones skipped
            raise ValueError(f"{key}: {pieces_of(contributors)} sent to {self.node_id!r}; a "
                             f"sum comes from the data nodes before it, "
                             f"{data_nodes[:index]}")  # fmt: skip
        why = self.why_not_add(key.run, key.step)
        if why:
            with self.lock:
                self._refuse(key)
            raise ChainRefused(f"{key}: {self.node_id!r} adds no piece to it now: {why}")
        with self.lock:
            if key in self._refused:
                raise ChainRefused(f"{key}: {self.node_id!r} started its chain meanwhile")
            if key in self._arriving:
                raise ValueError(f"{key}: a sum is arriving at {self.node_id!r} already")
            if len(self._arriving) >= MAX_ARRIVING:
                raise ValueError(f"{key}: {len(self._arriving)} sums are arriving at "
                                 f"{self.node_id!r} already; at most {MAX_ARRIVING}")  # fmt: skip
            relay = self._arriving[key] = Relay(self, key, contributors, header.piece_size)
            self.lock.notify_all()
        return relay

    def claim(self, key: StripeKey, wait: float = CHAIN_WAIT) -> Relay | None:
        """The upstream sum of ``key`` once it arrives, taken on; None if it has not come
        within ``wait`` seconds (then refused should it come later), or came and was
        dropped, not taken on in time."""
        with self.lock:
            if key in self._refused or not self.lock.wait_for(
                lambda: key in self._arriving, timeout=wait
            ):
                self._refuse(key)
                return None
            relay = self._arriving.pop(key)
            relay.taken = True
            self.lock.notify_all()
            return relay

    def taken_in_time(self, relay: Relay) -> bool:
        """Whether ``relay`` is taken on, or may still be; one that may not is dropped."""
        with self.lock:
            if relay.taken or time.monotonic() - relay.opened < CHAIN_WAIT:
                return True
            self._drop(relay)
            return False

    def await_taken(self, relay: Relay) -> None:
        """Wait (at most CHAIN_WAIT from its start) until ``relay`` is taken on; ChainError
        if it is not."""
        with self.lock:
            left = CHAIN_WAIT - (time.monotonic() - relay.opened)
            if not self.lock.wait_for(lambda: relay.taken, timeout=max(0.0, left)):
                self._drop(relay)
                raise ChainError(f"{relay.where}: not taken on within {CHAIN_WAIT} s")

    def drop(self, relay: Relay) -> None:
        with self.lock:
            self._drop(relay)

    def _drop(self, relay: Relay) -> None:
        if self._arriving.get(relay.key) is relay:
            del self._arriving[relay.key]
            self._refuse(relay.key)

    def _refuse(self, key: StripeKey) -> None:
        self._refused[key] = None
        while len(self._refused) > REFUSED_KEPT:
            self._refused.popitem(last=False)


class OwnPiece:
    """This node's piece of a stripe, read from its rank files (``(fd, offset, length)``
    parts, in order) through read-only mappings."""

    def __init__(self, parts: list[tuple[int, int, int]]) -> None:
        self.size = sum(length for _, _, length in parts)
        self._parts = [(mmap.mmap(fd, offset + length, prot=mmap.PROT_READ), offset, length)
                       for fd, offset, length in parts if length]  # fmt: skip

    def views(self, start: int, end: int) -> Iterator[tuple[int, memoryview]]:
        """``(position in the piece, bytes)`` covering ``[start, end)`` of the piece."""
        at = 0
        for mapping, offset, length in self._parts:
            lo, hi = max(start, at), min(end, at + length)
            if lo < hi:
                with memoryview(mapping)[offset + lo - at : offset + hi - at] as view:
                    yield lo, view
            at += length

    def close(self) -> None:
        for mapping, _, _ in self._parts:
            mapping.close()


def summed_frames(relay: Relay | None, own: OwnPiece) -> Iterator[memoryview]:
    """The bytes to send on: the relay's sum with ``own`` piece added frame by frame (the
    longer of the two), or ``own`` alone where the chain starts here, in frames sized to
    the rate it goes out at."""
    xor = _fastpath.backend().gf256_muladd
    end = 0
    if relay is not None:
        for offset, view in relay.frames():
            for at, mine in own.views(offset, offset + view.nbytes):
                xor(view[at - offset : at - offset + mine.nbytes], mine, 1)
            yield view
            end = offset + view.nbytes
    first, started, frame = end, time.monotonic(), MIN_FRAME
    while end < own.size:
        for _, mine in own.views(end, min(own.size, end + frame)):
            yield mine
        end = min(own.size, end + frame)
        rate = (end - first) / max(time.monotonic() - started, 1e-6)
        frame = min(MAX_FRAME, max(MIN_FRAME, int(rate * FRAME_SECONDS) & ~0xFFFF))
