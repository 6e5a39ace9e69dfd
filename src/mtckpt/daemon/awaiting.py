"""Awaiting the stripes of a step's pieces at their holders while the pieces are on their
way (daemon/encoder.py): once this node's first piece is sent, each holder is asked, on a
thread of its own, with a long-polled ListShards that answers as its stripes complete, and
asked again while they are not. A holder is marked stored the moment its stripes are
complete with this save's pieces, instead of in a round of questions after every send has
ended (a chain's last hop, or another member's piece, often completes a stripe sooner).
Sooner still where a piece's own status says it completed its stripe (a chain passes the
holder's word back along it): that stripe is not awaited any more."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from .stripes import StripeKey

COMPLETION_WAIT = 2.0  # seconds a step's stripes are awaited after its pieces are sent
ASK_WAIT = 1.0  # seconds a holder waits before it answers that they are not complete yet
POLL = 0.01  # between two questions to a holder that could not wait


class Held(NamedTuple):
    """What a holder says of a stripe of this node's pieces: the manifests' crc32c of this
    node's piece there, whether the stripe is complete, and the data nodes whose pieces it
    still awaits."""

    crcs: tuple
    complete: bool
    awaiting: tuple[str, ...] = ()


# (holder, stripes awaited, wait) -> None if unreachable, else {stripe: Held}
Ask = Callable[[str, list[StripeKey], float], dict[StripeKey, Held] | None]


class StripesAwaited:
    """The holders awaited for one step, each watched on a thread of its own until its
    stripes are complete (``mark(node, "")``), it is down, or COMPLETION_WAIT has passed
    since :meth:`end`."""

    def __init__(self, awaited: dict[str, list[StripeKey]], ask: Ask, up: Callable[[str], bool],
                 crcs: tuple, mark: Callable[[str, str], None],
                 stopping: threading.Event) -> None:  # fmt: skip
        """``awaited``: holder -> the stripes of this node's pieces to complete there."""
        self._ask, self._up, self._crcs, self._mark = ask, up, crcs, mark
        self._stopping = stopping
        self._lock = threading.Lock()
        self._pending = {node: list(keys) for node, keys in awaited.items()}
        self._awaiting: dict[str, list[str]] = {}  # holder -> the members it said it awaits
        self._stored: set[str] = set()
        self._ended: float | None = None  # when the sends ended
        self._begun = False
        self._pool = ThreadPoolExecutor(max(1, len(awaited)), thread_name_prefix="mtckpt-await")

    def begin(self) -> None:
        """Start asking the holders (once: the first piece is sent, or the sends ended)."""
        with self._lock:
            if self._begun:
                return
            self._begun = True
            nodes = list(self._pending)
        for node in nodes:
            self._pool.submit(self._watch, node)

    def completed(self, node: str, key: StripeKey) -> None:
        """``node`` said (a piece's status) that stripe ``key`` is complete with this node's
        piece: it is stored once every stripe awaited there is, without asking it."""
        with self._lock:
            keys = self._pending.get(node)
            if keys is None or key not in keys:
                return
            keys.remove(key)
            if keys:
                return
        self._settle(node, "")

    def failed(self, node: str, error: str) -> None:
        """A send to ``node`` failed: it is not stored, unless its stripes completed."""
        with self._lock:
            if node in self._stored:
                return
            self._pending.pop(node, None)
        self._mark(node, error)

    def end(self) -> None:
        """The sends have ended: wait up to COMPLETION_WAIT more for the holders still
        awaited, and say why each that did not complete is not stored."""
        with self._lock:
            self._ended = time.monotonic()
        self.begin()
        self._pool.shutdown(wait=True)
        with self._lock:
            left, self._pending = self._pending, {}
        if self._stopping.is_set():
            return
        for node, keys in left.items():
            members = self._awaiting.get(node)
            whose = f"the pieces of {', '.join(members)}" if members else "other members' pieces"
            self._mark(node, f"{len(keys)} stripe(s) held by {node} await {whose}")

    def _watch(self, node: str) -> None:
        while not self._stopping.is_set():
            with self._lock:
                keys, ended = list(self._pending.get(node, ())), self._ended
            wait = ASK_WAIT if ended is None else COMPLETION_WAIT - (time.monotonic() - ended)
            if not keys or wait <= 0:
                return
            if not self._up(node):
                self._settle(node, f"peer {node} unreachable")
                return
            stripes = self._ask(node, keys, min(wait, ASK_WAIT))
            if stripes is not None:
                held = [stripes.get(k) for k in keys]
                if all(h is not None and h.crcs == self._crcs and h.complete for h in held):
                    self._settle(node, "")
                    return
                with self._lock:
                    self._awaiting[node] = sorted({n for h in held if h for n in h.awaiting})
            time.sleep(POLL)  # one that could not wait (no RPC thread free) is asked again

    def _settle(self, node: str, error: str) -> None:
        with self._lock:
            if self._pending.pop(node, None) is None:
                return
            if not error:
                self._stored.add(node)
        self._mark(node, error)
