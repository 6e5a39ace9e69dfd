"""Waking the callers of a long-polled Status when the daemon's replication or flush state
changes: the replicator and the flusher call ``notify`` after each change, and a Status
call that waits for a change sleeps in ``wait`` instead of the trainer asking again and
again."""

from __future__ import annotations

import threading


class Changes:
    def __init__(self, waiters: int, pools: tuple[str, ...] = ("trainers",)) -> None:
        self.generation = 0  # counts notify calls
        self._cond = threading.Condition()
        # Per pool of RPC threads: the calls that may wait at once; the others answer at once.
        self._free = dict.fromkeys(pools, waiters)
        self._closed = False

    def notify(self) -> None:
        with self._cond:
            self.generation += 1
            self._cond.notify_all()

    def wait(self, generation: int, timeout: float) -> int:
        """Sleep until the generation passes ``generation`` (or ``timeout``, or ``close``);
        the generation now."""
        with self._cond:
            self._cond.wait_for(lambda: self.generation != generation or self._closed, timeout)
            return self.generation

    @property
    def closed(self) -> bool:
        return self._closed

    def take_waiter(self, pool: str = "trainers") -> bool:
        """A waiting slot of ``pool``, if one is free and waiting is still allowed."""
        with self._cond:
            if self._free[pool] <= 0 or self._closed:
                return False
            self._free[pool] -= 1
            return True

    def give_waiter(self, pool: str = "trainers") -> None:
        with self._cond:
            self._free[pool] += 1

    def close(self) -> None:
        """Wake every waiter for good: the daemon stops."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
