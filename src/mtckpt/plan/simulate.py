"""A discrete-event simulation of a schedule, the check on the analytic model.

A run trains from step 0 for a fixed wall time. Step ``k`` ends ``s`` seconds of compute
after the previous one plus the stalls of the saves taken at it (tier ``i`` saves at the
multiples of ``e_i``, each stalling ``c_i``); a save is usable by a failure only ``d_i``
seconds after it. Failures of each class arrive as a Poisson process at their rates (in
wall time, recoveries included). At a failure, the tiers that do not survive its class
lose what they held, the job restores the newest usable step any surviving tier holds
(from the one that restores it fastest) after ``R + r`` seconds, and the steps after it
are done again; the node-local tiers get the restored step back (restore fills the
faster tiers). A failure during a recovery starts another. Goodput is the steps reached
times ``s`` over the wall time; independent replications give its mean and a 95%
interval (Student's t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .inputs import TIERS, PlanInputs
from .model import wall_seconds_per_step

DEFAULT_FAILURES = 2000
DEFAULT_MAX_STEPS = 1_000_000
DEFAULT_REPLICATIONS = 5
# Student's t, two-sided 95%, by degrees of freedom (1.96 beyond)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip
_NODE_LOCAL = ("memory", "local")


@dataclass(frozen=True)
class SimulationResult:
    """Simulated goodput: the mean over ``replications`` runs of ``horizon_seconds`` each,
    and its 95% interval [``low``, ``high``]; ``failures``: how many struck in all."""

    goodput: float
    low: float
    high: float
    replications: int
    failures: int
    horizon_seconds: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def horizon_seconds(inputs: PlanInputs, every: dict[str, int],
                    failures: int = DEFAULT_FAILURES,
                    max_steps: int = DEFAULT_MAX_STEPS) -> float:  # fmt: skip
    """Wall time for about ``failures`` failures or ``max_steps`` steps, the shorter."""
    rate = sum(inputs.rate_per_second(f) for f in inputs.restarting_classes)
    return min(failures / rate, max_steps * wall_seconds_per_step(inputs, every))


def simulate(
    inputs: PlanInputs,
    every: dict[str, int],
    *,
    replications: int = DEFAULT_REPLICATIONS,
    seed: int = 0,
    failures: int = DEFAULT_FAILURES,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> SimulationResult:
    """Simulated goodput of ``every`` over ``replications`` independent runs (numpy
    Generators spawned from ``seed``)."""
    if replications < 2:
        raise ValueError(f"replications: expected at least 2, got {replications}")
    horizon = horizon_seconds(inputs, every, failures, max_steps)
    runs, struck = [], 0
    for sequence in np.random.SeedSequence(seed).spawn(replications):
        goodput, count = _run(inputs, every, horizon, np.random.default_rng(sequence))
        runs.append(goodput)
        struck += count
    mean = float(np.mean(runs))
    t95 = _T95[replications - 2] if replications - 2 < len(_T95) else 1.96
    half = t95 * float(np.std(runs, ddof=1)) / math.sqrt(replications)
    return SimulationResult(mean, mean - half, mean + half, replications, struck, horizon)


class _Segment:
    """Training resumed at step ``start`` at time ``resumed``: when each later step ends."""

    def __init__(self, inputs: PlanInputs, every: dict[str, int], start: int, resumed: float):
        self.start, self.resumed, self.step = start, resumed, inputs.step_seconds
        self.stalls = [(every[t.name], t.stall_seconds) for t in inputs.tiers if t.stall_seconds]
        self.wall = wall_seconds_per_step(inputs, every)
        self.spread = math.ceil(sum(c for _, c in self.stalls) / self.step) + 2

    def ends(self, k: int) -> float:
        """When step ``k`` (> start) ends: its compute done, before its own save's stall."""
        stalls = sum(c * ((k - 1) // e - self.start // e) for e, c in self.stalls)
        return self.resumed + (k - self.start) * self.step + stalls

    def reached(self, t: float) -> int:
        """The last step ended by time ``t`` (``start`` if none)."""
        if t < self.resumed + self.step:
            return self.start
        guess = self.start + int((t - self.resumed) / self.wall)
        low = max(self.start, guess - self.spread)
        high = guess + self.spread
        if low > self.start and self.ends(low) > t:
            low = self.start
        while self.ends(high) <= t:
            high += self.spread
        while high - low > 1:
            middle = (low + high) // 2
            if self.ends(middle) <= t:
                low = middle
            else:
                high = middle
        return low


def _run(inputs: PlanInputs, every: dict[str, int], horizon: float, rng) -> tuple[float, int]:
    """One run's goodput and its number of failures."""
    classes = inputs.restarting_classes
    rates = np.array([inputs.rate_per_second(f) for f in classes])
    count = int(rng.poisson(rates.sum() * horizon))
    times = np.sort(rng.uniform(0.0, horizon, count))
    kinds = rng.choice(len(classes), size=count, p=rates / rates.sum())
    survivors = [set(inputs.survivors(f)) for f in classes]
    tiers = inputs.tiers
    held = {t.name: 0 for t in tiers}  # step 0 (the initial state) needs no checkpoint
    segment = _Segment(inputs, every, 0, 0.0)
    for t_fail, kind in zip(times.tolist(), kinds.tolist(), strict=True):
        now = {}
        for tier in tiers:
            name = tier.name
            if name not in survivors[kind]:
                now[name] = -1
                continue
            reached = segment.reached(t_fail - tier.durable_seconds)
            newest = reached // every[name] * every[name]
            now[name] = newest if newest > segment.start else held[name]
        step = max(0, *now.values())
        restore = 0.0
        if step > 0:
            source = min((t for t in tiers if now[t.name] == step),
                         key=lambda t: t.restore_seconds)  # fmt: skip
            restore = source.restore_seconds
            for name in _NODE_LOCAL:
                if name in now and TIERS.index(name) < TIERS.index(source.name):
                    now[name] = max(now[name], step)
        held = now
        segment = _Segment(inputs, every, step, t_fail + inputs.restart_seconds + restore)
    final = segment.reached(horizon) if horizon >= segment.resumed else segment.start
    return final * inputs.step_seconds / horizon, count
