"""The daemon's side of the node's memory budget (tiers/budget.py): before it takes a
peer's replica or parity piece, it keeps room for its own node's next step, dropping its
spare replica and parity files first and refusing the peer's data when even that is not
enough."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import MemoryBudgetError
from ..tiers import budget
from ..tiers.budget import human_size
from ..tiers.memory import release_held
from .holdings import Holdings

log = logging.getLogger(__name__)


REPORTED_FOR = 1.0  # seconds a count shown in Status and metrics stands


class Room:
    def __init__(self, holdings: Holdings, limit: int | None, on_refused=lambda: None,
                 drop_spares: Callable[[], None] | None = None) -> None:  # fmt: skip
        """``drop_spares``: deletes the spare files (default: the spare replica files)."""
        self.holdings, self.limit, self._on_refused = holdings, limit, on_refused
        self._drop_spares = drop_spares or holdings.drop_spares
        self._reported: tuple[float, dict[str, int]] = (-REPORTED_FOR, {})
        self._lock = threading.Lock()

    def usage(self) -> dict[str, int]:
        """What the memory tier holds, for Status and the metrics: counted at most once a
        second (each peer's probe and each trainer's long poll asks)."""
        with self._lock:
            counted, held = self._reported
            if time.monotonic() - counted >= REPORTED_FOR:
                held = self._held_now()
                self._reported = (time.monotonic(), held)
            return held

    def _held_now(self) -> dict[str, int]:
        """What the memory tier holds now, expired files no sender holds any more gone."""
        release_held(self.holdings.root)
        return budget.usage(self.holdings.root)

    def reserve(self, held: dict[str, int]) -> int:
        """Room kept for this node's next step: the data files of its newest step of each
        run, less the trainers' spare slots (a new step takes those first)."""
        own, newest = self.holdings.own, 0
        for run in self.holdings.runs(own):
            for step in own.steps(run)[-1:]:
                where = own.step_path(run, step)
                newest += sum(_size(where / name) for name in own.files(run, step)
                              if name.endswith(".safetensors"))  # fmt: skip
        return max(0, newest - held["slots"])

    def fits(self, size: int) -> bool:
        """Whether ``size`` more bytes keep within the budget, with room left for this
        node's next step."""
        if self.limit is None:
            return True
        held = self._held_now()
        return budget.total(held) + size + self.reserve(held) <= self.limit

    def admit(self, size: int, what: str) -> None:
        """MemoryBudgetError unless ``size`` more bytes for peers fit the budget with room
        left for this node's next step; spare replica and parity files are dropped first."""
        if self.limit is None:
            return
        held = self._held_now()
        reserve = self.reserve(held)
        if budget.total(held) + size + reserve <= self.limit:
            return
        if held["spares"]:
            self._drop_spares()
            log.warning("spare files dropped to stay within the memory budget of %s",
                        human_size(self.limit))  # fmt: skip
            held = self._held_now()
            if budget.total(held) + size + reserve <= self.limit:
                return
        self._on_refused()
        raise MemoryBudgetError(
            f"node {self.holdings.node_id}: {what} ({human_size(size)}) refused: its memory "
            f"tier holds {human_size(budget.total(held))} of its budget of "
            f"{human_size(self.limit)}, with {human_size(reserve)} kept for its own next "
            f"step (held: {budget.describe(held)})"
        )


def _size(path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # expired meanwhile
        return 0
