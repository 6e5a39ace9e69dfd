"""Sync steps: the steps every node replicates, so that one step survives a node loss when
saves outpace the links.

A daemon whose link is slower than its trainers' saves cannot send every step. If each
daemon sent whichever step was newest when its last transfer ended, the nodes would hold
replicas of different steps, and after a node loss no step would be complete for every
rank. So each daemon measures its *lag* (steps saved while its last transfers ran) and
takes the power of two at or above it as its *stride*. The cluster's stride is the largest
of them, spread through the Status calls daemons already make to the peers they replicate
to (each learnt value holds for ``TTL`` seconds less a second per hop, so one that is no
longer said fades out). A step whose number is a multiple of the cluster's stride is a
*sync step*: a lagging daemon sends only those (and its newest step once the saves pause),
and every daemon keeps its newest ``SYNC_KEPT`` sync steps, its own (in the memory tier's
``.kept``) and its peers' replicas, beyond the newest ``keep``. Strides being powers of
two, the sync steps of a larger stride are sync steps of every smaller one.
"""

from __future__ import annotations

import threading
import time
from collections import deque

MAX_STRIDE = 64
TTL = 30.0  # seconds a stride holds unless said again
HOP = 1.0  # seconds a stride loses each time it is passed on
SYNC_KEPT = 2  # sync steps kept beyond the newest `keep`
LAGS = 4  # transfers the own stride is measured over


def stride_for(lag: int) -> int:
    """The power of two at or above ``lag`` steps (1 for none), at most MAX_STRIDE."""
    stride = 1
    while stride < min(max(lag, 1), MAX_STRIDE):
        stride *= 2
    return stride


def check_stride(stride: int, ttl: float, peer: str) -> tuple[int, float]:
    """A stride and its time to live from a peer's Status: ValueError naming the peer."""
    if not 1 <= stride <= MAX_STRIDE or stride & (stride - 1):
        raise ValueError(f"{peer}: sync stride {stride} is not a power of two in 1..{MAX_STRIDE}")
    if not 0.0 <= ttl <= TTL:
        raise ValueError(f"{peer}: sync stride time to live {ttl} is outside 0..{TTL} s")
    return stride, ttl


class Strides:
    """This node's stride and the largest heard from its peers, each with its expiry."""

    def __init__(self) -> None:
        self._lags: deque[int] = deque(maxlen=LAGS)
        self._heard: dict[str, tuple[int, float]] = {}  # peer -> (stride, monotonic expiry)
        self._lock = threading.Lock()

    @property
    def own(self) -> int:
        with self._lock:
            return stride_for(max(self._lags, default=0))

    def lagged(self, steps: int) -> None:
        """A transfer of this node's ended ``steps`` saves behind the newest."""
        with self._lock:
            self._lags.append(max(0, steps))

    def hear(self, peer: str, stride: int, ttl: float) -> None:
        """``peer`` says the cluster's stride is ``stride`` for ``ttl`` more seconds."""
        with self._lock:
            self._heard[peer] = (stride, time.monotonic() + ttl - HOP)

    def said(self) -> tuple[int, float]:
        """What this daemon says in its Status: the cluster's stride and how long it holds."""
        own = self.own
        now = time.monotonic()
        with self._lock:
            live = [(s, e - now) for s, e in self._heard.values() if e > now and s > own]
        return max(live, default=(own, TTL))

    def cluster(self) -> int:
        return self.said()[0]

    def sends_now(self, step: int) -> bool:
        """Whether this node sends a step saved now as it comes: not while it lags and the
        step is no sync step (it sends sync steps only until the saves pause)."""
        return self.own == 1 or is_sync(step, self.cluster())


def is_sync(step: int, stride: int) -> bool:
    return step % stride == 0


def sync_steps(steps: list[int], stride: int) -> list[int]:
    """The newest SYNC_KEPT sync steps of ``steps``, ascending; none with a stride of 1
    (no daemon lags: the newest ``keep`` steps are enough)."""
    if stride == 1:
        return []
    return sorted(s for s in set(steps) if is_sync(s, stride))[-SYNC_KEPT:]
