"""The analytic goodput of a checkpoint schedule, and the schedule that maximizes it.

Notation: ``s`` step compute seconds; per tier ``i``: ``e_i`` steps between saves (``every``),
``c_i`` stall (blocking seconds per save), ``d_i`` durable lag (seconds from ``save()``
until the tier holds the step), ``r_i`` restore seconds; ``R`` the job's restart seconds;
per failure class ``f``: ``λ_f`` failures per second of wall time and ``S_f`` the tiers
that survive it.

    W   = s + Σ_i c_i / e_i                    wall seconds per step
    L_i = e_i·W/2 + d_i                         expected seconds of work redone when tier i
                                                gives the step (saves every e_i·W seconds,
                                                usable d_i after; the failure uniform
                                                between them)
    k_f = argmin_{i∈S_f} L_i                    the tier class f restores from (the newest)
    L_f = L_{k_f},  D_f = r_{k_f} + R           redone, and down, seconds per failure
    G   = (s/W) · (1 − Σ_f λ_f·L_f) · exp(−Σ_f λ_f·D_f)      goodput: compute over wall time

Derivation (renewal reward): between two resumes the job runs for an exponential time
(mean ``1/λ``, ``λ = Σ_f λ_f``), of which ``L`` is redone after the failure; the recovery
needs ``D`` seconds without a failure and starts over at each one, so it takes
``(e^{λD} − 1)/λ`` on average. Compute over wall time is then
``(1/λ − L) / (1/λ + (e^{λD} − 1)/λ) = (1 − λL)·e^{−λD}``, times ``s/W`` for the stalls;
with several classes ``λL`` and ``λD`` become the rate-weighted sums. To first order in
``λ·C`` this is Young's and Daly's model,
``G₁ = (s/W) · (1 − Σ_f λ_f·C_f)`` with ``C_f = L_f + D_f`` the cost of a failure, which
the planner reports too: ``G₁`` counts a failure that strikes during a recovery at full
cost and so understates ``G`` by about ``λD·(λL + λD/2)`` (2 to 3 points when failures
take a fifth of the time). Both take the minimum of the tiers' expected losses rather
than the expected minimum. :mod:`mtckpt.plan.simulate` checks ``G``.

Optimum: per level (memory and peers share one ``every``: peers replicate memory's steps),
``Λ`` is the rate of the failures whose fastest surviving tier is in that level, ``c`` its
stall, and Young's interval ``τ = sqrt(2·c/Λ)`` (``sqrt(2·C·M)`` with ``M = 1/Λ``) is the
starting point, in steps ``τ/s``. Maximizing ``G`` exactly for one level puts the saves
``sqrt(2·c·M·(1 − λ·d))`` seconds of wall time apart (stall included), Young's interval
to first order. The integer ``every`` values are then refined by coordinate descent on
``G`` under three constraints:
each level's ``every`` a multiple of the faster level's (a step goes to a slower tier only
once a faster one holds it); at least ``ceil(d_i/s)`` (one transfer in flight per tier);
at most ``max_interval_seconds/s`` (a tier that recovers none of the modelled failures,
such as remote beside peers, is still what survives losing the whole cluster).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .inputs import PlanInputs

_LEVELS = (("memory", "peers"), ("local",), ("remote",))
_SEARCH_FACTORS = (0.5, 0.7, 0.85, 1.2, 1.4, 2.0)
_MAX_ROUNDS = 200


@dataclass(frozen=True)
class Recovery:
    """How a failure class is recovered under a schedule: the tier whose step is restored
    and the seconds lost (``tier`` None: no restart, as for a daemon crash)."""

    failure_class: str
    tier: str | None
    redone_seconds: float
    restore_seconds: float
    restart_seconds: float

    @property
    def cost_seconds(self) -> float:
        return self.redone_seconds + self.restore_seconds + self.restart_seconds


@dataclass(frozen=True)
class Schedule:
    """A schedule (``every`` per tier) and its analytic goodput."""

    every: dict[str, int]
    goodput: float
    first_order_goodput: float
    wall_seconds_per_step: float
    recoveries: tuple[Recovery, ...]

    def interval_seconds(self, tier: str) -> float:
        return self.every[tier] * self.wall_seconds_per_step


@dataclass(frozen=True)
class YoungDaly:
    """Young's interval for a tier's level: ``seconds`` is ``sqrt(2·stall/rate)`` (0 when
    its saves do not stall; infinite when they do and the level recovers none of the
    failures); ``every`` is it in steps (at least 1; None when infinite)."""

    seconds: float
    every: int | None
    rate_per_hour: float
    stall_seconds: float


@dataclass(frozen=True)
class Plan:
    """The recommended schedule beside Young's per tier, and the configured one if known."""

    recommended: Schedule
    young_daly: dict[str, YoungDaly]
    capped: tuple[str, ...]
    configured: Schedule | None


def levels(inputs: PlanInputs) -> tuple[tuple[str, ...], ...]:
    """The configured tiers grouped by shared ``every``, fastest first."""
    grouped = (tuple(n for n in group if n in inputs.names) for group in _LEVELS)
    return tuple(g for g in grouped if g)


def wall_seconds_per_step(inputs: PlanInputs, every: dict[str, int]) -> float:
    """``W``: compute plus each tier's stall spread over its ``every``."""
    return inputs.step_seconds + sum(t.stall_seconds / every[t.name] for t in inputs.tiers)


def recovery(inputs: PlanInputs, every: dict[str, int], failure_class: str) -> Recovery:
    """The surviving tier whose step is newest on average (the faster restore on a tie),
    and the seconds a failure of ``failure_class`` loses under ``every``."""
    if failure_class == "daemon":
        return Recovery(failure_class, None, 0.0, 0.0, 0.0)
    wall = wall_seconds_per_step(inputs, every)
    options = []
    for name in inputs.survivors(failure_class):
        tier = inputs.tier(name)
        options.append((every[name] * wall / 2 + tier.durable_seconds, tier.restore_seconds,
                        name))  # fmt: skip
    redone, restore, name = min(options)
    return Recovery(failure_class, name, redone, restore, inputs.restart_seconds)


def evaluate(inputs: PlanInputs, every: dict[str, int]) -> Schedule:
    """The analytic goodput ``G`` of ``every``, and ``G₁`` (see the module docstring); 0
    where the failures cost more than all the time there is."""
    goodput, first_order = _goodput(inputs, every)
    return Schedule(dict(every), max(0.0, goodput), max(0.0, first_order),
                    wall_seconds_per_step(inputs, every),
                    tuple(recovery(inputs, every, f) for f in _classes(inputs)))  # fmt: skip


def _classes(inputs: PlanInputs) -> tuple[str, ...]:
    return tuple(f for f, rate in inputs.failures_per_hour.items() if rate > 0)


def _goodput(inputs: PlanInputs, every: dict[str, int]) -> tuple[float, float]:
    """``G`` and ``G₁``, unclamped."""
    redone = down = 0.0
    for failure_class in inputs.restarting_classes:
        rate = inputs.rate_per_second(failure_class)
        lost = recovery(inputs, every, failure_class)
        redone += rate * lost.redone_seconds
        down += rate * (lost.restore_seconds + lost.restart_seconds)
    compute = inputs.step_seconds / wall_seconds_per_step(inputs, every)
    return compute * (1.0 - redone) * math.exp(-down), compute * (1.0 - redone - down)


def young_daly(inputs: PlanInputs) -> dict[str, YoungDaly]:
    """Young's interval per tier: its level's stall and the rate of the failures whose
    fastest surviving tier is in the level."""
    recovering_rate: dict[str, float] = {}
    for failure_class in inputs.restarting_classes:
        first = inputs.survivors(failure_class)[0]
        rate = inputs.rate_per_second(failure_class)
        recovering_rate[first] = recovering_rate.get(first, 0.0) + rate
    out = {}
    for group in levels(inputs):
        rate = sum(recovering_rate.get(n, 0.0) for n in group)
        stall = sum(inputs.tier(n).stall_seconds for n in group)
        if stall == 0:
            seconds = 0.0  # a save that costs the training nothing: as often as allowed
        elif rate == 0:
            seconds = math.inf
        else:
            seconds = math.sqrt(2 * stall / rate)
        every = None if math.isinf(seconds) else max(1, round(seconds / inputs.step_seconds))
        for name in group:
            out[name] = YoungDaly(seconds, every, rate * 3600, stall)
    return out


def optimize(inputs: PlanInputs) -> Plan:
    """Young's intervals, snapped to the constraints, refined by coordinate descent on the
    analytic goodput (see the module docstring)."""
    groups = levels(inputs)
    bounds = [_bounds(inputs, group) for group in groups]
    young = young_daly(inputs)
    start = []
    for group, (low, high) in zip(groups, bounds, strict=True):
        analytic = young[group[0]].every
        start.append(high if analytic is None else min(max(analytic, low), high))
    best = _snap(start, bounds)
    best_goodput = _goodput(inputs, _per_tier(groups, best))[0]
    for _ in range(_MAX_ROUNDS):
        improved = False
        for k in range(len(groups)):
            for candidate in _neighbours(best, k, bounds):
                goodput = _goodput(inputs, _per_tier(groups, candidate))[0]
                if goodput > best_goodput + 1e-12:
                    best, best_goodput, improved = candidate, goodput, True
        if not improved:
            break
    capped = tuple(
        name
        for group, value, (low, high) in zip(groups, best, bounds, strict=True)
        if value == high and high > low and (young[group[0]].every or math.inf) > high
        for name in group
    )
    configured = inputs.configured_every()
    return Plan(
        recommended=evaluate(inputs, _per_tier(groups, best)),
        young_daly=young,
        capped=capped,
        configured=None if configured is None else evaluate(inputs, configured),
    )


def _bounds(inputs: PlanInputs, group: tuple[str, ...]) -> tuple[int, int]:
    """The fewest steps between saves (one transfer in flight: ``ceil(d/s)``) and the most
    (``max_interval_seconds``)."""
    low = max(max(1, math.ceil(inputs.tier(n).durable_seconds / inputs.step_seconds - 1e-9))
              for n in group)  # fmt: skip
    high = max(low, math.floor(inputs.max_interval_seconds / inputs.step_seconds))
    return low, high


def _per_tier(groups, values) -> dict[str, int]:
    return {name: value for group, value in zip(groups, values, strict=True) for name in group}


def _snap(values, bounds) -> tuple[int, ...]:
    """``values`` made to nest: each level a multiple of the faster one's, within its
    bounds where a multiple allows."""
    out: list[int] = []
    for value, (low, high) in zip(values, bounds, strict=True):
        base = out[-1] if out else 1
        snapped = max(1, round(value / base)) * base
        while snapped < low:
            snapped += base
        while snapped > high and snapped - base >= max(base, low):
            snapped -= base
        out.append(snapped)
    return tuple(out)


def _neighbours(best: tuple[int, ...], k: int, bounds) -> list[tuple[int, ...]]:
    """Schedules that move level ``k`` to nearby multiples of the faster level's ``every``;
    the slower levels keep their intervals, snapped."""
    base = best[k - 1] if k else 1
    ratio = best[k] // base
    ratios = {ratio - 2, ratio - 1, ratio + 1, ratio + 2}
    ratios |= {round(ratio * f) for f in _SEARCH_FACTORS}
    out = []
    for j in sorted(r for r in ratios if r >= 1 and r != ratio):
        candidate = _snap(best[:k] + (j * base,) + best[k + 1 :], bounds)
        if candidate != best:
            out.append(candidate)
    return out
