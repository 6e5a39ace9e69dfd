"""SaveHandle: the progress of one save, stage by stage."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class SaveHandle:
    """Progress of one ``save``: ``wait()`` / ``done()`` per stage or for all of them.

    Stages are ``"staged"`` (the saved objects may be modified again), then one per tier the
    step is due for (``h.tiers``). An error of a stage is raised by ``wait``.
    """

    def __init__(
        self,
        step: int,
        tiers: tuple[str, ...],
        configured: tuple[str, ...],
        on_finish: Callable[[str, float, BaseException | None, bool], None] | None = None,
        started: float | None = None,
        skipped_reason: str = "",
    ) -> None:
        self.step = step
        self.skipped_reason = skipped_reason  # why the whole step was not saved ("": it was)
        self._started = time.monotonic() if started is None else started
        self._on_finish = on_finish  # (stage, seconds since save, error, skipped): metrics
        self.tiers = tiers
        self._configured = ("staged",) + configured
        self._events = {name: threading.Event() for name in ("staged",) + tiers}
        self._errors: dict[str, BaseException] = {}
        self._skipped: set[str] = set()
        if skipped_reason:  # nothing to wait for
            self._events["staged"].set()

    def _stages(self, stage: str | None) -> list[str]:
        if stage is None:
            return list(self._events)
        if stage not in self._configured:
            raise ValueError(
                f"unknown stage {stage!r} for step {self.step}: expected one of "
                f"{list(self._configured)} (a tier must be configured to be waited for)"
            )
        return [stage] if stage in self._events else []

    def _finish(self, stage: str, error: BaseException | None = None, skipped: bool = False):
        if error is not None:
            self._errors[stage] = error
        if skipped:
            self._skipped.add(stage)
        if self._on_finish is not None:
            try:
                self._on_finish(stage, time.monotonic() - self._started, error, skipped)
            except Exception:  # a metric must never fail a save
                log.exception("step %d: recording the %s stage's metrics failed", self.step, stage)
        self._events[stage].set()

    def done(self, stage: str | None = None) -> bool:
        """Whether the stage (default: every stage) has finished, successfully or not."""
        return all(self._events[name].is_set() for name in self._stages(stage))

    def wait(self, stage: str | None = None, timeout: float | None = None) -> None:
        """Block until the stage (default: every stage) is done; raise its error if it failed.

        A tier this step is not due for has nothing to wait for and returns at once.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        names = self._stages(stage)
        for name in names:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._events[name].wait(remaining):
                raise TimeoutError(f"step {self.step}: {name} not done after {timeout} s")
        for name in names:
            if name in self._errors:
                raise self._errors[name]

    def exception(self, stage: str | None = None) -> BaseException | None:
        """The first error among finished stages, or None."""
        return next((self._errors[n] for n in self._stages(stage) if n in self._errors), None)

    @property
    def skipped(self) -> frozenset[str]:
        """Tiers that skipped this step because a newer one was due (policy: newest wins)."""
        return frozenset(self._skipped)

    def __repr__(self) -> str:
        state = {
            n: (
                "error"
                if n in self._errors
                else "skipped"
                if n in self._skipped
                else "done"
                if e.is_set()
                else "pending"
            )
            for n, e in self._events.items()
        }
        return f"SaveHandle(step={self.step}, {state})"
