"""What the planner is given: the job (step time, nodes, restart time), the failure rate of
each class, and each tier's measured costs. Checked on construction; also read from the
version-1 JSON inputs file (``mtckpt plan --inputs``, written by the cluster harness)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

TIERS = ("memory", "peers", "local", "remote")  # fastest first
FAILURE_CLASSES = ("trainer", "daemon", "node", "two-nodes")
INPUTS_VERSION = 1
DEFAULT_RESTART_SECONDS = 60.0
DEFAULT_MAX_INTERVAL_SECONDS = 3600.0
DEFAULT_PEER_LOSSES_TOLERATED = 1

# how each field is given on the command line, for error messages
FLAGS = {
    "step_seconds": "--step-seconds",
    "nodes": "--nodes",
    "state_bytes_per_node": "--state-gib",
    "restart_seconds": "--restart-seconds",
    "peer_losses_tolerated": "--replicas",
    "max_interval_seconds": "--max-interval",
    "failures_per_hour": "--mtbf-hours / --failures-per-day / --trainer-crashes-per-day",
    "tiers": "--tier",
}
TIER_KEYS = {"stall_seconds": "stall", "durable_seconds": "durable",
             "restore_seconds": "restore", "every": "every"}  # fmt: skip
_TOP_KEYS = {
    "version", "step_seconds", "nodes", "state_bytes_per_node", "restart_seconds",
    "failures_per_hour", "peer_losses_tolerated", "max_interval_seconds", "tiers",
}  # fmt: skip


class PlanInputError(ConfigError):
    """A planner input is missing or invalid; the message names the field (and its flag)
    and what was expected."""


@dataclass(frozen=True)
class TierCost:
    """One tier's measured costs. ``stall_seconds``: the blocking part of a save, on the
    training thread; ``durable_seconds``: from ``save()`` until the tier holds the step
    (a failure can use the step only after that); ``restore_seconds``: reading the step
    back; ``every``: the configuration that was run, if known."""

    name: str
    stall_seconds: float
    durable_seconds: float
    restore_seconds: float
    every: int | None = None


@dataclass(frozen=True)
class PlanInputs:
    """The job, its failure rates (per hour, whole job, by class) and its tiers."""

    step_seconds: float
    nodes: int
    failures_per_hour: Mapping[str, float]
    tiers: tuple[TierCost, ...]
    restart_seconds: float = DEFAULT_RESTART_SECONDS
    peer_losses_tolerated: int = DEFAULT_PEER_LOSSES_TOLERATED
    state_bytes_per_node: int | None = None
    max_interval_seconds: float = DEFAULT_MAX_INTERVAL_SECONDS
    names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_job(self)
        _check_tiers(self)
        tiers = tuple(sorted(self.tiers, key=lambda t: TIERS.index(t.name)))
        object.__setattr__(self, "tiers", tiers)
        object.__setattr__(self, "names", tuple(t.name for t in tiers))
        _check_failures(self)

    def tier(self, name: str) -> TierCost:
        """The configured tier ``name`` (KeyError if it is not used)."""
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(name)

    def rate_per_second(self, failure_class: str) -> float:
        """Failures of ``failure_class`` per second of wall time, whole job."""
        return self.failures_per_hour.get(failure_class, 0.0) / 3600.0

    def survivors(self, failure_class: str) -> tuple[str, ...]:
        """The configured tiers, fastest first, that still hold their steps after a
        failure of ``failure_class``."""
        return tuple(n for n in self.names if survives(n, failure_class,
                                                       self.peer_losses_tolerated))  # fmt: skip

    @property
    def restarting_classes(self) -> tuple[str, ...]:
        """The failure classes that restart the job and have a rate above zero."""
        return tuple(c for c in FAILURE_CLASSES
                     if c != "daemon" and self.failures_per_hour.get(c, 0.0) > 0)  # fmt: skip

    def configured_every(self) -> dict[str, int] | None:
        """The ``every`` of each tier that was run (peers: memory's), or None if a tier
        lacks one."""
        every = {t.name: t.every for t in self.tiers}
        if "peers" in every and every["peers"] is None:
            every["peers"] = every.get("memory")
        if any(v is None for v in every.values()):
            return None
        return every


def survives(tier: str, failure_class: str, peer_losses_tolerated: int) -> bool:
    """Whether ``tier`` keeps its steps through a failure of ``failure_class``."""
    if failure_class in ("trainer", "daemon"):
        return True
    if tier == "remote":
        return True
    if tier == "peers":
        return peer_losses_tolerated >= (1 if failure_class == "node" else 2)
    return False  # memory and local disk go with the node


def _named(name: str) -> str:
    flag = FLAGS.get(name)
    return f"{name} ({flag})" if flag else name


def _number(value, name: str, minimum: float = 0.0, strict: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value <= minimum):
        expected = f"a number {'>' if strict else '>='} {minimum:g}"
        raise PlanInputError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


def _integer(value, name: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PlanInputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def _check_job(inputs: PlanInputs) -> None:
    _number(inputs.step_seconds, _named("step_seconds"), strict=True)
    _integer(inputs.nodes, _named("nodes"), 1)
    _number(inputs.restart_seconds, _named("restart_seconds"))
    _integer(inputs.peer_losses_tolerated, _named("peer_losses_tolerated"), 0)
    _number(inputs.max_interval_seconds, _named("max_interval_seconds"), strict=True)
    if inputs.state_bytes_per_node is not None:
        _number(inputs.state_bytes_per_node, _named("state_bytes_per_node"), strict=True)


def _check_tiers(inputs: PlanInputs) -> None:
    if not inputs.tiers:
        raise PlanInputError(f"tiers ({FLAGS['tiers']}): expected at least one of "
                             f"{', '.join(TIERS)}")  # fmt: skip
    seen = set()
    for tier in inputs.tiers:
        if tier.name not in TIERS:
            raise PlanInputError(f"tiers: unknown tier {tier.name!r} (expected one of "
                                 f"{', '.join(TIERS)})")  # fmt: skip
        if tier.name in seen:
            raise PlanInputError(f"tiers: {tier.name} given twice")
        seen.add(tier.name)
        for key in ("stall_seconds", "durable_seconds", "restore_seconds"):
            name = f"tiers.{tier.name}.{key} (--tier {tier.name}:{TIER_KEYS[key]}=S)"
            _number(getattr(tier, key), name)
        if tier.every is not None:
            _integer(tier.every, f"tiers.{tier.name}.every", 1)
    if "peers" in seen:
        if "memory" not in seen:
            raise PlanInputError("tiers.peers: peers replicate the memory tier's steps: "
                                 "give the memory tier too")  # fmt: skip
        if inputs.nodes < 2:
            raise PlanInputError(f"tiers.peers: needs {_named('nodes')} >= 2, "
                                 f"got {inputs.nodes}")  # fmt: skip
        if inputs.peer_losses_tolerated > inputs.nodes - 1:
            raise PlanInputError(
                f"{_named('peer_losses_tolerated')}: at most nodes - 1 = {inputs.nodes - 1}, "
                f"got {inputs.peer_losses_tolerated}"
            )
    _check_configured_every(inputs)


def _check_configured_every(inputs: PlanInputs) -> None:
    """A configured ``every`` must nest: each a multiple of the faster tier's (a step goes
    to a slower tier only once a faster one holds it); peers replicate memory's steps."""
    every = {t.name: t.every for t in inputs.tiers if t.every is not None}
    if "peers" in every and every["peers"] != every.get("memory", every["peers"]):
        raise PlanInputError(
            f"tiers.peers.every: peers replicate every memory step, so it "
            f"must be memory's every ({every['memory']}), got {every['peers']}"
        )
    base_name, base = None, None
    for name in ("memory", "local", "remote"):
        if name not in every:
            continue
        if base is not None and every[name] % base:
            raise PlanInputError(
                f"tiers.{name}.every: expected a multiple of "
                f"tiers.{base_name}.every ({base}), got {every[name]}"
            )
        base_name, base = name, every[name]


def _check_failures(inputs: PlanInputs) -> None:
    name = _named("failures_per_hour")
    for failure_class, rate in inputs.failures_per_hour.items():
        if failure_class not in FAILURE_CLASSES:
            raise PlanInputError(
                f"failures_per_hour: unknown failure class {failure_class!r} "
                f"(expected one of {', '.join(FAILURE_CLASSES)})"
            )
        _number(rate, f"failures_per_hour.{failure_class}")
    if not inputs.restarting_classes:
        raise PlanInputError(
            f"{name}: every failure rate is zero (daemon crashes cost "
            "nothing): give a node, trainer or two-nodes rate above zero"
        )
    if inputs.failures_per_hour.get("two-nodes", 0) > 0 and inputs.nodes < 2:
        raise PlanInputError(f"failures_per_hour.two-nodes: needs {_named('nodes')} >= 2")
    for failure_class in inputs.restarting_classes:
        if not inputs.survivors(failure_class):
            hint = {"node": "peers or remote", "two-nodes": "remote, or peers with "
                    "--replicas 2"}.get(failure_class, "a tier")  # fmt: skip
            raise PlanInputError(
                f"failures_per_hour.{failure_class}: no configured tier "
                f"survives a {failure_class} failure (configure {hint})"
            )


# -- the JSON inputs file ---------------------------------------------------------------------


def read_inputs_file(path: str | Path) -> dict:
    """The version-1 inputs file as the keyword arguments of :class:`PlanInputs` (``tiers``
    a dict of name to :class:`TierCost` fields); its structure checked, not its values."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise PlanInputError(f"inputs {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise PlanInputError(f"inputs {path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PlanInputError(f"inputs {path}: expected a JSON object")
    if data.get("version") != INPUTS_VERSION:
        raise PlanInputError(f"inputs {path}: version: expected {INPUTS_VERSION}, got "
                             f"{data.get('version')!r}")  # fmt: skip
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise PlanInputError(f"inputs {path}: unknown keys {', '.join(unknown)} (known: "
                             f"{', '.join(sorted(_TOP_KEYS))})")  # fmt: skip
    for key in ("step_seconds", "nodes", "failures_per_hour", "tiers"):
        if key not in data:
            raise PlanInputError(f"inputs {path}: missing {key}")
    raw = {k: v for k, v in data.items() if k not in ("version", "tiers", "failures_per_hour")}
    raw["failures_per_hour"] = _object(data["failures_per_hour"], path, "failures_per_hour")
    raw["tiers"] = {}
    for name, entry in _object(data["tiers"], path, "tiers").items():
        entry = _object(entry, path, f"tiers.{name}")
        unknown = sorted(set(entry) - set(TIER_KEYS))
        if unknown:
            raise PlanInputError(
                f"inputs {path}: tiers.{name}: unknown keys "
                f"{', '.join(unknown)} (known: {', '.join(TIER_KEYS)})"
            )
        missing = [k for k in TIER_KEYS if k != "every" and k not in entry]
        if missing:
            raise PlanInputError(f"inputs {path}: tiers.{name}: missing {', '.join(missing)}")
        raw["tiers"][name] = dict(entry)
    return raw


def _object(value, path, name: str) -> dict:
    if not isinstance(value, dict):
        raise PlanInputError(f"inputs {path}: {name}: expected a JSON object")
    return value


def build_inputs(raw: Mapping) -> PlanInputs:
    """:class:`PlanInputs` from keyword arguments whose ``tiers`` is a dict of name to
    :class:`TierCost` fields (as :func:`read_inputs_file` returns, flags merged in); a
    missing required value is named."""
    for key in ("step_seconds", "nodes"):
        if raw.get(key) is None:
            raise PlanInputError(f"{_named(key)}: required (a flag or the inputs file)")
    tiers = []
    for name, fields in (raw.get("tiers") or {}).items():
        if fields.get("restore_seconds") is None:
            raise PlanInputError(
                f"tiers.{name}.restore_seconds (--tier {name}:restore=S): "
                "required: how long restoring a step from this tier takes"
            )
        tiers.append(TierCost(name=name, stall_seconds=fields.get("stall_seconds", 0.0),
                              durable_seconds=fields.get("durable_seconds", 0.0),
                              restore_seconds=fields["restore_seconds"],
                              every=fields.get("every")))  # fmt: skip
    optional = ("restart_seconds", "peer_losses_tolerated", "state_bytes_per_node",
                "max_interval_seconds")  # fmt: skip
    return PlanInputs(
        step_seconds=raw["step_seconds"],
        nodes=raw["nodes"],
        failures_per_hour=dict(raw.get("failures_per_hour") or {}),
        tiers=tuple(tiers),
        **{k: raw[k] for k in optional if raw.get(k) is not None},
    )


def inputs_json(inputs: PlanInputs) -> dict:
    """``inputs`` in the version-1 file's form."""
    tiers = {}
    for t in inputs.tiers:
        tiers[t.name] = {"stall_seconds": t.stall_seconds, "durable_seconds": t.durable_seconds,
                         "restore_seconds": t.restore_seconds}  # fmt: skip
        if t.every is not None:
            tiers[t.name]["every"] = t.every
    return {"version": INPUTS_VERSION, "step_seconds": inputs.step_seconds,
            "nodes": inputs.nodes, "state_bytes_per_node": inputs.state_bytes_per_node,
            "restart_seconds": inputs.restart_seconds,
            "failures_per_hour": dict(inputs.failures_per_hour),
            "peer_losses_tolerated": inputs.peer_losses_tolerated,
            "max_interval_seconds": inputs.max_interval_seconds, "tiers": tiers}  # fmt: skip
