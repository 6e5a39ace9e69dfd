"""How the ranks of a job agree at restore, through the job's own distributed engine.

Restore runs on every rank in the foreground. The ranks first agree on the steps all of
them hold (one collective), then, after each attempt to load a step, on whether every rank
succeeded: if one rank's copies are all damaged, every rank moves on to the next older
step; if one rank hits an error that no older step can fix (a target that does not match),
every rank raises instead of waiting for it. Saves never use a collective.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from . import frameworks
from .errors import AgreementError, MtckptError

log = logging.getLogger(__name__)

OK, RETRY, FATAL = "ok", "retry", "fatal"


@dataclass(frozen=True)
class Outcome:
    """One rank's result of loading a step: OK, RETRY (no good copy here) or FATAL."""

    status: str
    reason: str = ""


class Coordinator:
    """Agreement among the ranks of one job. This one is for a single process."""

    world_size = 1

    def agree(self, steps: list[int], step: int | None = None,
              shared: list[int] = ()) -> list[int]:  # fmt: skip
        """The steps every rank holds, newest first, identical on every rank (``step``:
        the one every rank was asked to restore, if any; ``shared``: those of ``steps``
        committed in a tier every rank writes, hence complete for all)."""
        return sorted(steps, reverse=True)

    def learn_complete(self, complete: list[int], unreachable: list[str]) -> None:
        """What the node daemons say is complete for every rank across them (newest
        first), and which peers they could not ask."""

    def settle(self, step: int, outcome: Outcome) -> list[Outcome]:
        """Every rank's outcome of loading ``step``, in rank order."""
        return [outcome]

    def ranks_sharing(self, identity: str) -> tuple[int, ...] | None:
        """The ranks whose ``identity`` equals this rank's, ascending, identical on each of
        them; None where the ranks cannot be asked."""
        return (0,)

    def current(self) -> bool:
        """Whether this still speaks for the job's ranks: False once the job's process
        group was replaced (an in-process restart) or one came up after this was made."""
        return True

    def release(self) -> None:
        """Let go of what the agreement holds of the job (its connections) until next time."""


class GatheringCoordinator(Coordinator):
    """Agreement by gathering one value from every rank: a distributed engine's part."""

    rank: int

    def _all_gather(self, value: Any, what: str) -> list[Any]:
        """``value`` of every rank, in rank order; MtckptError naming ``what`` the ranks
        were doing if they do not all answer in time."""
        raise NotImplementedError

    def agree(self, steps: list[int], step: int | None = None,
              shared: list[int] = ()) -> list[int]:  # fmt: skip
        held = self._all_gather(sorted(steps), "agree on the steps to restore")
        common = set(held[0]).intersection(*held[1:])
        return sorted(common, reverse=True)

    def settle(self, step: int, outcome: Outcome) -> list[Outcome]:
        gathered = self._all_gather([outcome.status, outcome.reason], f"finish loading step {step}")
        return [Outcome(status, reason) for status, reason in gathered]

    def ranks_sharing(self, identity: str) -> tuple[int, ...] | None:
        ids = self._all_gather(identity, "tell which ranks share a node")
        return tuple(rank for rank, other in enumerate(ids) if other == identity)


class UncoordinatedRanks(Coordinator):
    """Several ranks without an initialised torch.distributed or jax.distributed. With node
    daemons, the ranks agree through them: every daemon that reaches all its peers sees the
    same steps complete across the nodes, and each rank restores the newest of those or of
    the steps committed in a tier every rank writes (the object tier), or raises
    AgreementError where it cannot; a daemon that cannot reach a peer may see fewer, so
    that is an AgreementError too. Without daemons each rank decides alone, which is safe
    only when every rank holds the same steps: said in a warning when a rank holds steps
    outside a shared tier."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.complete: list[int] | None = None
        self.unreachable: list[str] = []

    def learn_complete(self, complete: list[int], unreachable: list[str]) -> None:
        self.complete, self.unreachable = list(complete), list(unreachable)

    def agree(self, steps: list[int], step: int | None = None,
              shared: list[int] = ()) -> list[int]:  # fmt: skip
        if step is not None:  # every rank was asked for the same step: nothing to agree
            return sorted(steps, reverse=True)
        if self.complete is None:
            if set(steps) <= set(shared):  # all in a tier every rank sees the same
                return sorted(steps, reverse=True)
            log.warning(
                "%d ranks restore without torch.distributed or jax.distributed initialised "
                "and without node daemons: each rank picks its own newest good step; "
                "initialise the process group first to have them agree",
                self.world_size,
            )
            return sorted(steps, reverse=True)
        if self.unreachable:
            raise AgreementError(
                f"the {self.world_size} ranks cannot agree on a step through the node "
                f"daemons: {', '.join(self.unreachable)} did not answer, so steps complete "
                "on it may be missing here; bring it back or remove it from the peers, "
                "initialise torch.distributed / jax.distributed, or pass step="
            )
        return sorted(set(self.complete) | set(shared), reverse=True)

    def settle(self, step: int, outcome: Outcome) -> list[Outcome]:
        if self.complete is not None and outcome.status == RETRY:
            raise AgreementError(
                f"step {step} is the newest step complete for every rank across the node "
                f"daemons, but {outcome.reason}; the other ranks may restore it, so this "
                "rank stops instead of restoring an older one"
            )
        return [outcome]

    def ranks_sharing(self, identity: str) -> tuple[int, ...] | None:
        return None

    def current(self) -> bool:
        return frameworks.distributed_job() is None


def for_job(world_size: int, timeout: float) -> Coordinator:
    """The coordinator of the job's distributed engine (looked up only if already imported);
    its collectives give up after ``timeout`` seconds with a clear error."""
    if world_size == 1:
        return Coordinator()
    coordinator = frameworks.job_coordinator(timeout)
    if coordinator is not None:
        return coordinator
    return UncoordinatedRanks(world_size)


def raise_for_others(step: int, outcomes: list[Outcome], rank: int) -> None:
    """On a rank that succeeded or may retry: raise if another rank failed for good."""
    fatal = [(r, o.reason) for r, o in enumerate(outcomes) if o.status == FATAL and r != rank]
    if fatal:
        detail = "; ".join(f"rank {r}: {reason}" for r, reason in fatal)
        raise MtckptError(f"restore of step {step} failed on other ranks: {detail}")
