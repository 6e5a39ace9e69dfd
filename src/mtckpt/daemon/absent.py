"""Stripes waiting on a member that holds nothing of their step.

Groups are cut from every daemon identified (daemon/encoder.py), so a daemon whose
trainers saved nothing of a step (an idle node of a DaemonSet, a node that joined before
its trainer's first save, one that skipped the step under its memory budget or no longer
keeps it) is a data node of some of that step's stripes all the same, and they would never
complete. A parity holder asks each data node whose piece a stripe awaits what it holds
of the run, once nothing of the stripe is arriving and it has waited ASK_AFTER seconds
since its first piece came (at once for a member found idle before).
One that holds no shard of the step is recorded with an empty piece (zeros), and the
stripe completes without it: at once where that member holds a newer step (it will not
save this one) or was found holding nothing of the run for an earlier step and still holds
nothing of it (an idle node); otherwise once the stripe has waited ABSENT_AFTER seconds
since its first piece came (a slow trainer saves within that). Rebuilding takes an empty
piece as zeros (daemon/rebuild.py); a save of the step the member makes later after all
replaces the stripe, as any other save does, and the other members send theirs again. A
member that cannot be asked, or that holds the step, is awaited as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import grpc

from .parity import ParityStore
from .peers import Peers
from .rpc import error_text
from .stripes import StripeKey

log = logging.getLogger(__name__)

ASK_AFTER = 0.5  # seconds a stripe waits with nothing arriving before its missing are asked
ABSENT_AFTER = 5.0  # seconds from a stripe's first piece before any member may count as empty
CHECK_EVERY = 0.25  # seconds between two looks at the stripes waiting
ASK_TIMEOUT = 5.0  # seconds a member has to say what it holds
KEPT = 4096  # entries of each memory below, at most


class AbsentPieces:
    """The holder's side: a thread that completes the stripes whose missing pieces belong
    to members holding nothing of the step; ``completed(key)`` hears of each."""

    def __init__(self, parity: ParityStore, steps_of: Callable[[str, str], set[int] | None],
                 completed: Callable[[StripeKey], None] = lambda key: None) -> None:  # fmt: skip
        """``steps_of(node, run)``: the steps of ``run`` that ``node`` holds shards of its
        own of, None if it cannot say now (:func:`steps_held`)."""
        self.parity, self.steps_of, self.completed = parity, steps_of, completed
        self._stopping = threading.Event()
        self._idle: set[tuple[str, str]] = set()  # (node, run) found holding none of the run
        self._holding: dict[tuple[str, str, int], float] = {}  # (node, run, step) -> when said
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mtckpt-absent", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """A piece came in that did not complete its stripe: look now."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=ASK_TIMEOUT + 1)

    def _run(self) -> None:
        while True:
            self._wake.wait(CHECK_EVERY)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self.check()
            except Exception:  # the next look tries again
                log.exception("looking at the stripes waiting for pieces failed")

    def check(self, ask_after: float = ASK_AFTER, absent_after: float = ABSENT_AFTER):
        """Complete each stripe waiting ``ask_after`` seconds or more whose missing pieces
        are of members holding nothing of its step (as the module says); the stripes
        completed."""
        held: dict[tuple[str, str], set[int] | None] = {}  # (node, run) -> its steps
        done = []
        for key, generation, missing, waited in self.parity.stalled(0.0):
            for node in missing:
                if waited < ask_after and (node, key.run) not in self._idle:
                    continue  # an idle member is asked at once, another once it waited
                said = self._holding.get((node, key.run, key.step))
                if said is not None and time.monotonic() - said < absent_after:
                    continue  # it holds the step: its piece is coming, or it lags
                if (node, key.run) not in held:
                    held[(node, key.run)] = self.steps_of(node, key.run)
                steps = held[(node, key.run)]
                if steps is None:
                    continue
                if key.step in steps:
                    self._said_holding(node, key.run, key.step)
                    continue
                idle = not steps and (node, key.run) in self._idle
                if not (idle or max(steps, default=0) > key.step or waited >= absent_after):
                    continue
                if not idle:  # said once, not at every step of an idle node
                    log.info("run %r step %d: node %s holds no shard of the step (%s); its "
                             "pieces of the step's stripes count as zeros", key.run, key.step,
                             node, newest_of(steps))  # fmt: skip
                if not steps:
                    self._found_idle(node, key.run)
                if self.parity.absent(key, generation, node):
                    done.append(key)
                    self.completed(key)
        return done

    def _said_holding(self, node: str, run: str, step: int) -> None:
        if len(self._holding) >= KEPT:
            self._holding.clear()
        self._holding[(node, run, step)] = time.monotonic()

    def _found_idle(self, node: str, run: str) -> None:
        if len(self._idle) >= KEPT:
            self._idle.clear()
        self._idle.add((node, run))


def steps_held(peers: Peers, node: str, run: str) -> set[int] | None:
    """The steps of ``run`` that ``node`` holds shards of its own of, as it says; None if
    it cannot be asked now."""
    member = peers.by_node(node)
    if member is None or not member.reachable:
        return None
    try:
        reply = peers.client(member.address).list_shards(run=run, origin=node,
                                                         timeout=ASK_TIMEOUT)  # fmt: skip
    except grpc.RpcError as exc:
        log.info("cannot ask %s what it holds of run %r: %s", member.name(), run,
                 error_text(exc))  # fmt: skip
        return None
    if reply.node_id != node:  # another daemon at its address now
        return None
    return {s.shard.step for s in reply.shards if s.shard.origin == node and not s.replica}


def newest_of(steps: Iterable[int]) -> str:
    """What a member holding no shard of a step holds of its run, said."""
    steps = list(steps)
    return f"its newest is step {max(steps)}" if steps else "nor of the run"
