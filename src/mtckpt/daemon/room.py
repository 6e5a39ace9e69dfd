"""The daemon's side of the node's memory budget (tiers/budget.py): before it takes a
peer's replica or parity piece, it keeps room for its own node's next step, dropping its
spare replica files first and refusing the peer's data when even that is not enough."""

from __future__ import annotations

import logging

from ..errors import MemoryBudgetError
from ..tiers import budget
from .holdings import Holdings

log = logging.getLogger(__name__)


class Room:
    def __init__(self, holdings: Holdings, limit: int | None, on_refused=lambda: None) -> None:
        self.holdings, self.limit, self._on_refused = holdings, limit, on_refused

    def usage(self) -> dict[str, int]:
        return budget.usage(self.holdings.root)

    def reserve(self, held: dict[str, int]) -> int:
        """Room kept for this node's next step: the size of its newest step of each run,
        less the trainers' spare slots (a new step takes those first)."""
        newest: dict[str, tuple[int, int]] = {}
        for h in self.holdings.list(origin=self.holdings.node_id):
            step, size = newest.get(h.shard.run, (-1, 0))
            if h.shard.step > step:
                newest[h.shard.run] = (h.shard.step, h.data_size)
            elif h.shard.step == step:
                newest[h.shard.run] = (step, size + h.data_size)
        return max(0, sum(size for _, size in newest.values()) - held["slots"])

    def admit(self, size: int, what: str) -> None:
        """MemoryBudgetError unless ``size`` more bytes for peers fit the budget with room
        left for this node's next step; spare replica files are dropped first."""
        if self.limit is None:
            return
        held = self.usage()
        reserve = self.reserve(held)
        if budget.total(held) + size + reserve <= self.limit:
            return
        if held["spares"]:
            self.holdings.drop_spares()
            log.warning("spare replica files dropped to stay within the memory budget of %s",
                        budget.human(self.limit))  # fmt: skip
            held = self.usage()
            if budget.total(held) + size + reserve <= self.limit:
                return
        self._on_refused()
        raise MemoryBudgetError(
            f"node {self.holdings.node_id}: {what} ({budget.human(size)}) refused: its memory "
            f"tier holds {budget.human(budget.total(held))} of its budget of "
            f"{budget.human(self.limit)}, with {budget.human(reserve)} kept for its own next "
            f"step (held: {budget.describe(held)})"
        )
