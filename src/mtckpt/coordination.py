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
from .errors import MtckptError

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

    def agree(self, steps: list[int]) -> list[int]:
        """The steps every rank holds, newest first, identical on every rank."""
        return sorted(steps, reverse=True)

    def settle(self, step: int, outcome: Outcome) -> list[Outcome]:
        """Every rank's outcome of loading ``step``, in rank order."""
        return [outcome]

    def ranks_sharing(self, identity: str) -> tuple[int, ...] | None:
        """The ranks whose ``identity`` equals this rank's, ascending, identical on each of
        them; None where the ranks cannot be asked."""
        return (0,)


class GatheringCoordinator(Coordinator):
    """Agreement by gathering one value from every rank: a distributed engine's part."""

    rank: int

    def _all_gather(self, value: Any, what: str) -> list[Any]:
        """``value`` of every rank, in rank order; MtckptError naming ``what`` the ranks
        were doing if they do not all answer in time."""
        raise NotImplementedError

    def agree(self, steps: list[int]) -> list[int]:
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
    """Several ranks without an initialised torch.distributed or jax.distributed: each rank
    decides alone, which is safe only when every rank holds the same steps."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        log.warning(
            "%d ranks restore without torch.distributed or jax.distributed initialised: each "
            "rank picks its own newest good step; initialise the process group first to "
            "have them agree",
            world_size,
        )

    def ranks_sharing(self, identity: str) -> tuple[int, ...] | None:
        return None


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
