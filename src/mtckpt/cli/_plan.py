"""``mtckpt plan``: how often to save to each tier, and the goodput to expect."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .. import plan as planner
from ..plan.probe import probe
from ..plan.simulate import DEFAULT_FAILURES, DEFAULT_REPLICATIONS
from . import _common as common

_FLAG_FIELDS = {"step_seconds": "step_seconds", "nodes": "nodes",
                "restart_seconds": "restart_seconds", "replicas": "peer_losses_tolerated",
                "max_interval": "max_interval_seconds"}  # fmt: skip
_TIER_FLAG_KEYS = {"stall": "stall_seconds", "durable": "durable_seconds",
                   "restore": "restore_seconds", "every": "every"}  # fmt: skip


def add_parsers(commands) -> None:
    p = commands.add_parser(
        "plan", help="recommend every (steps) per tier and the expected goodput",
        description="From the state size, node count, failure rates and each tier's costs: "
        "the every (steps) per tier that maximizes goodput (Young's interval extended to "
        "several tiers, refined numerically), the goodput expected (analytic, and "
        "simulated with a 95% interval), and an mtckpt.toml snippet. See docs/planning.md.",
    )  # fmt: skip
    p.add_argument("--inputs", metavar="FILE.json", help="inputs file (version 1); flags "
                   "override its values; its tiers' every is the configuration that was run, "
                   "whose goodput is predicted beside the recommended one")  # fmt: skip
    p.add_argument("--state-gib", type=_positive, metavar="GIB", help="state per node, GiB")
    p.add_argument("--nodes", type=common.at_least_one, metavar="N", help="nodes in the job")
    p.add_argument("--step-seconds", type=_positive, metavar="S", help="compute seconds per step")
    p.add_argument(
        "--mtbf-hours", type=_positive, metavar="H", help="mean hours between losses of one node"
    )
    p.add_argument("--failures-per-day", type=_non_negative, metavar="N",
                   help="node losses per day, whole job (instead of --mtbf-hours)")  # fmt: skip
    p.add_argument("--trainer-crashes-per-day", type=_non_negative, metavar="N",
                   help="trainer process crashes per day, whole job (0)")  # fmt: skip
    p.add_argument("--two-node-losses-per-day", type=_non_negative, metavar="N",
                   help="losses of two nodes at once per day, whole job (0)")  # fmt: skip
    p.add_argument("--restart-seconds", type=_non_negative, metavar="S", help="the job's restart: "
                   "detection, process start, rendezvous (60)")  # fmt: skip
    p.add_argument(
        "--replicas", type=_count, metavar="N", help="node losses the peers tier survives (1)"
    )
    p.add_argument("--tier", action="append", default=[], type=_tier_flag,
                   metavar="NAME:stall=S,durable=S,restore=S[,every=N]",
                   help="a tier's costs in seconds (memory, peers, local, remote; "
                   "repeatable; tiers not given are not used)")  # fmt: skip
    p.add_argument("--max-interval", type=_positive, metavar="SECONDS",
                   help="the longest interval recommended for any tier (3600)")  # fmt: skip
    p.add_argument("--probe", action="store_true", help="measure memory and local disk here")
    p.add_argument("--probe-mib", type=common.at_least_one, metavar="MIB", default=256,
                   help="MiB copied and written by --probe (256)")  # fmt: skip
    p.add_argument("--local-root", metavar="DIR", help="where --probe writes (a temp dir)")
    p.add_argument(
        "--link-gbps", type=_positive, metavar="GBPS", help="with --probe: each node's link, Gbit/s"
    )
    p.add_argument("--object-gbps", type=_positive, metavar="GBPS",
                   help="with --probe: each node's bandwidth to object storage, "
                   "Gbit/s")  # fmt: skip
    p.add_argument("--runs", type=_replications, metavar="N", default=DEFAULT_REPLICATIONS,
                   help="independent simulated runs (5)")  # fmt: skip
    p.add_argument("--sim-failures", type=common.at_least_one, metavar="N",
                   default=DEFAULT_FAILURES,
                   help="failures per simulated run (2000; at most 1e6 steps)")  # fmt: skip
    p.add_argument("--seed", type=int, metavar="N", default=0, help="the simulation's seed (0)")
    p.add_argument("--json", action="store_true", help="JSON on stdout, for scripts")
    p.set_defaults(handler=_plan)


# -- argument types ---------------------------------------------------------------------------


def _number(text: str, minimum: float, strict: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number "
                                         f"{'>' if strict else '>='} {minimum:g}")  # fmt: skip
    return value


def _positive(text: str) -> float:
    return _number(text, 0.0, strict=True)


def _non_negative(text: str) -> float:
    return _number(text, 0.0, strict=False)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 0")
    return int(text)


def _replications(text: str) -> int:
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 2")
    return int(text)


def _tier_flag(text: str) -> tuple[str, dict]:
    """``NAME:stall=S,durable=S,restore=S[,every=N]`` as (name, TierCost fields)."""
    name, sep, rest = text.partition(":")
    if name not in planner.TIERS:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown tier {name!r} (expected one of "
                                         f"{', '.join(planner.TIERS)})")  # fmt: skip
    fields = {}
    for item in rest.split(",") if sep and rest else ():
        key, eq, value = item.partition("=")
        if key not in _TIER_FLAG_KEYS or not eq:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected KEY=VALUE with KEY one of "
                f"{', '.join(_TIER_FLAG_KEYS)}, got {item!r}"
            )
        if key == "every":
            if not value.isdigit() or int(value) < 1:
                raise argparse.ArgumentTypeError(f"{text!r}: every: expected an integer >= 1")
            fields["every"] = int(value)
        else:
            fields[_TIER_FLAG_KEYS[key]] = _non_negative(value)
    return name, fields


# -- the command ------------------------------------------------------------------------------


def _plan(args: argparse.Namespace) -> int:
    try:
        raw = planner.read_inputs_file(args.inputs) if args.inputs else {"tiers": {}}
        _apply_flags(raw, args)
        inputs = planner.build_inputs(raw)
    except planner.PlanInputError as exc:
        raise common.UsageError(str(exc)) from None
    plan = planner.optimize(inputs)
    schedules = {"recommended": plan.recommended, "configured": plan.configured}
    simulated = {
        label: planner.simulate(
            inputs,
            schedule.every,
            replications=args.runs,
            seed=args.seed,
            failures=args.sim_failures,
        )  # fmt: skip
        for label, schedule in schedules.items()
        if schedule is not None
    }
    report = _report(inputs, plan, simulated)
    if args.json:
        print(json.dumps(report))
    else:
        _print_report(inputs, report)
    return 0


def _apply_flags(raw: dict, args: argparse.Namespace) -> None:
    """The flags over the file's values (``raw``); then the probe's tiers, under any
    ``--tier`` given."""
    for flag, key in _FLAG_FIELDS.items():
        if getattr(args, flag) is not None:
            raw[key] = getattr(args, flag)
    if args.state_gib is not None:
        raw["state_bytes_per_node"] = int(args.state_gib * (1 << 30))
    rates = dict(raw.get("failures_per_hour") or {})
    if args.mtbf_hours is not None and args.failures_per_day is not None:
        raise common.UsageError("give one of --mtbf-hours (per node) and --failures-per-day "
                                "(node losses, whole job)")  # fmt: skip
    if args.mtbf_hours is not None:
        nodes = raw.get("nodes")
        if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
            raise common.UsageError("--mtbf-hours needs --nodes (or the inputs file's nodes)")
        rates["node"] = nodes / args.mtbf_hours
    for flag, failure_class in (("failures_per_day", "node"),
                                ("trainer_crashes_per_day", "trainer"),
                                ("two_node_losses_per_day", "two-nodes")):  # fmt: skip
        if getattr(args, flag) is not None:
            rates[failure_class] = getattr(args, flag) / 24
    raw["failures_per_hour"] = rates
    tiers = raw.setdefault("tiers", {})
    if args.probe:
        for tier in _probed(raw, args):
            fields = {k: getattr(tier, k) for k in ("stall_seconds", "durable_seconds",
                                                     "restore_seconds")}  # fmt: skip
            tiers.setdefault(tier.name, {}).update(fields)
    elif args.local_root or args.link_gbps or args.object_gbps:
        raise common.UsageError("--local-root, --link-gbps and --object-gbps go with --probe")
    for name, fields in args.tier:
        tiers.setdefault(name, {}).update(fields)


def _probed(raw: dict, args: argparse.Namespace) -> tuple:
    if args.local_root and not os.path.isdir(args.local_root):
        raise common.UsageError(f"--local-root {args.local_root}: no such directory")
    state = raw.get("state_bytes_per_node")
    if not isinstance(state, (int, float)) or isinstance(state, bool) or not state > 0:
        raise common.UsageError("--probe needs --state-gib (or the inputs file's "
                                "state_bytes_per_node)")  # fmt: skip
    result = probe(
        state, local_root=args.local_root, link_gbps=args.link_gbps,
        object_gbps=args.object_gbps, replicas=raw.get("peer_losses_tolerated") or 1,
        probe_bytes=args.probe_mib << 20,
    )  # fmt: skip
    print(f"mtckpt plan: probe: memory copy {common.human_size(result.memory_copy_bps)}/s, "
          f"disk write {common.human_size(result.disk_write_bps)}/s, "
          f"read {common.human_size(result.disk_read_bps)}/s", file=sys.stderr)  # fmt: skip
    for note in result.notes:
        print(f"mtckpt plan: probe: {note}", file=sys.stderr)
    return result.tiers


# -- output -----------------------------------------------------------------------------------


def _report(inputs: planner.PlanInputs, plan: planner.Plan, simulated: dict) -> dict:
    recommended, configured = plan.recommended, plan.configured
    tiers = {}
    for name in inputs.names:
        young = plan.young_daly[name]
        tiers[name] = {
            "every": recommended.every[name],
            "interval_seconds": recommended.interval_seconds(name),
            "young_daly_every": young.every,
            "young_daly_seconds": None if math.isinf(young.seconds) else young.seconds,
            "young_daly_rate_per_hour": young.rate_per_hour,
            "configured_every": None if configured is None else configured.every[name],
            "recovers": [r.failure_class for r in recommended.recoveries if r.tier == name],
            "capped": name in plan.capped,
        }
    failures = {
        r.failure_class: {
            "per_hour": inputs.failures_per_hour[r.failure_class],
            "recovered_from": r.tier,
            "redone_seconds": r.redone_seconds,
            "restore_seconds": r.restore_seconds,
            "restart_seconds": r.restart_seconds,
            "cost_seconds": r.cost_seconds,
        }  # fmt: skip
        for r in recommended.recoveries
    }
    goodput = {}
    for label, schedule in (("recommended", recommended), ("configured", configured)):
        if schedule is None:
            goodput[label] = None
            continue
        sim = simulated.get(label)
        goodput[label] = {"analytic": schedule.goodput, "every": schedule.every,
                          "first_order": schedule.first_order_goodput,
                          "simulated": None if sim is None else {
                              "mean": sim.goodput, "low": sim.low, "high": sim.high,
                              "runs": sim.replications, "failures": sim.failures,
                              "horizon_seconds": sim.horizon_seconds}}  # fmt: skip
    return {"inputs": planner.inputs_json(inputs),
            "wall_seconds_per_step": recommended.wall_seconds_per_step, "tiers": tiers,
            "failures": failures, "goodput": goodput,
            "toml": _toml(inputs, recommended.every)}  # fmt: skip


def _toml(inputs: planner.PlanInputs, every: dict[str, int]) -> str:
    lines = []
    for name in inputs.names:
        if name == "peers":
            lines.append(f"# peers: replicate each memory step; survive "
                         f"{inputs.peer_losses_tolerated} lost node(s)")  # fmt: skip
            continue
        lines += [f"[{name}]", f"every = {every[name]}"]
    return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("h", 3600), ("min", 60)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.3g} s"


def _print_report(inputs: planner.PlanInputs, report: dict) -> None:
    state = inputs.state_bytes_per_node
    print(f"{inputs.nodes} nodes"
          + (f", {common.human_size(state)} of state per node" if state else "")
          + f", step {_seconds(inputs.step_seconds)} of compute, restart "
          f"{_seconds(inputs.restart_seconds)}; failures per day: "
          + ", ".join(f"{f} {rate * 24:.3g}" for f, rate in inputs.failures_per_hour.items()
                      if rate > 0))  # fmt: skip
    print()
    table = [("TIER", "EVERY", "INTERVAL", "YOUNG/DALY", "CONFIGURED", "RECOVERS")]
    for name, tier in report["tiers"].items():
        young = "-" if tier["young_daly_every"] is None else str(tier["young_daly_every"])
        if tier["young_daly_seconds"] == 0:
            young += " (no stall)"
        elif tier["young_daly_seconds"] is not None:
            young += f" ({_seconds(tier['young_daly_seconds'])})"
        every = f"{tier['every']}" + (" (capped)" if tier["capped"] else "")
        configured = tier["configured_every"]
        table.append((name, every, _seconds(tier["interval_seconds"]), young,
                      "-" if configured is None else str(configured),
                      ", ".join(tier["recovers"]) or "-"))  # fmt: skip
    common.print_table(table)
    if any(tier["capped"] for tier in report["tiers"].values()):
        print(f"(capped: held at --max-interval, "
              f"{_seconds(inputs.max_interval_seconds)}; Young's interval is longer, or "
              "infinite for a tier that recovers none of the failures given)")  # fmt: skip
    print()
    table = [("FAILURE", "PER DAY", "RECOVERED FROM", "REDONE", "RESTORE", "RESTART", "LOST")]
    for failure_class, f in report["failures"].items():
        table.append((failure_class, f"{f['per_hour'] * 24:.3g}", f["recovered_from"] or
                      "(no restart)", _seconds(f["redone_seconds"]),
                      _seconds(f["restore_seconds"]), _seconds(f["restart_seconds"]),
                      _seconds(f["cost_seconds"])))  # fmt: skip
    common.print_table(table)
    print()
    _print_goodput(report["goodput"])
    print()
    print("# mtckpt.toml")
    print(report["toml"], end="")


def _print_goodput(goodput: dict) -> None:
    table = [("GOODPUT", "ANALYTIC", "FIRST ORDER", "SIMULATED (95%)")]
    sim = None
    for label, entry in goodput.items():
        if entry is None:
            continue
        sim = entry["simulated"]
        simulated = (
            "-"
            if sim is None
            else f"{sim['mean']:.2%} ± {(sim['high'] - sim['low']) / 2 * 100:.2f}"
        )
        table.append((label, f"{entry['analytic']:.2%}", f"{entry['first_order']:.2%}",
                      simulated))  # fmt: skip
    common.print_table(table)
    if sim is not None:
        print(f"(simulated: {sim['runs']} runs of {_seconds(sim['horizon_seconds'])} each; "
              f"goodput is compute time over wall time)")  # fmt: skip
