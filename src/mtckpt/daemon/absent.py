"""Stripes waiting on a member that holds nothing of their step.

Groups are cut from every daemon identified (daemon/encoder.py), so a daemon whose
trainers saved nothing of a step (an idle node of a DaemonSet, a node that joined before
its trainer's first save, one that skipped the step under its memory budget or no longer
keeps it) is a data node of some of that step's stripes all the same, and they would never
complete. A parity holder asks each data node whose piece a stripe still awaits
ABSENT_AFTER seconds after its first piece came what it holds of the run; one that holds
no shard of the step is recorded with an empty piece (zeros), and the stripe completes
without it. Rebuilding takes that piece as zeros (daemon/rebuild.py); a save of the step
that member makes later replaces the stripe, as any other save does, and the other members
send their pieces again. A member that cannot be asked, or that holds the step, is awaited
as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc

from .parity import ParityStore
from .peers import Peers
from .rpc import error_text
from .stripes import StripeKey

log = logging.getLogger(__name__)

ABSENT_AFTER = 5.0  # seconds a stripe waits for a piece before its node is asked
CHECK_EVERY = 1.0  # seconds between two looks at the stripes waiting
ASK_TIMEOUT = 5.0  # seconds a member has to say what it holds
SAID_KEPT = 4096  # (node, run, step) logged once each, at most this many remembered


class AbsentPieces:
    """The holder's side: a thread that completes the stripes whose missing pieces belong
    to members holding nothing of the step; ``completed(key)`` hears of each."""

    def __init__(self, parity: ParityStore, peers: Peers,
                 completed: Callable[[StripeKey], None] = lambda key: None) -> None:  # fmt: skip
        self.parity, self.peers, self.completed = parity, peers, completed
        self._stopping = threading.Event()
        self._said: set[tuple[str, str, int]] = set()  # (node, run, step) logged as empty
        self._thread = threading.Thread(target=self._run, name="mtckpt-absent", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=ASK_TIMEOUT + 1)

    def _run(self) -> None:
        while not self._stopping.wait(CHECK_EVERY):
            try:
                self.check()
            except Exception:  # the next look tries again
                log.exception("looking at the stripes waiting for pieces failed")

    def check(self, after: float = ABSENT_AFTER) -> list[StripeKey]:
        """Complete each stripe waiting ``after`` seconds or more whose missing pieces are
        of members holding nothing of its step; the stripes completed."""
        held: dict[tuple[str, str], set[int] | None] = {}  # (node, run) -> its steps
        done = []
        for key, generation, missing in self.parity.stalled(after):
            for node in missing:
                if (node, key.run) not in held:
                    held[(node, key.run)] = self._steps_of(node, key.run)
                steps = held[(node, key.run)]
                if steps is None or key.step in steps:
                    continue
                if (node, key.run, key.step) not in self._said:
                    if len(self._said) >= SAID_KEPT:
                        self._said.clear()
                    self._said.add((node, key.run, key.step))
                    log.info("run %r step %d: node %s holds no shard of the step (%s); "
                             "its pieces of the step's stripes count as zeros", key.run,
                             key.step, node, _newest(steps))  # fmt: skip
                if self.parity.absent(key, generation, node):
                    done.append(key)
                    self.completed(key)
        return done

    def _steps_of(self, node: str, run: str) -> set[int] | None:
        """The steps of ``run`` that ``node`` holds shards of its own of; None if it
        cannot say now."""
        member = self.peers.by_node(node)
        if member is None or not member.reachable:
            return None
        try:
            reply = self.peers.client(member.address).list_shards(run=run, origin=node,
                                                                  timeout=ASK_TIMEOUT)  # fmt: skip
        except grpc.RpcError as exc:
            log.info("cannot ask %s what it holds of run %r: %s", member.name(), run,
                     error_text(exc))  # fmt: skip
            return None
        if reply.node_id != node:  # another daemon at its address now
            return None
        return {s.shard.step for s in reply.shards if s.shard.origin == node and not s.replica}


def _newest(steps: set[int]) -> str:
    return f"its newest is step {max(steps)}" if steps else "nor of the run"
