"""mtckpt-cluster: ``python -m tools.cluster`` from the repository root, as root.

Runs the same training job in each configuration (mtckpt with peers, mtckpt without
peers, DCP to S3) on a fresh simulated cluster, injects failures on a schedule, and
writes the goodput and recovery report (Markdown table, JSON, PNG timeline)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from .job import FAILURES, Cluster, Config
from .network import can_make_namespaces
from .report import plot, summarize, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.cluster", description=__doc__)
    parser.add_argument("--nodes", type=int, default=4, help="simulated nodes (4; up to 16)")
    parser.add_argument("--ranks", type=int, default=2, help="trainer ranks per node (2)")
    parser.add_argument("--mib", type=float, default=16, help="state per rank, MiB (16)")
    parser.add_argument("--steps", type=int, default=600, help="training steps (600)")
    parser.add_argument("--step-seconds", type=float, default=0.5, help="compute per step (0.5)")
    parser.add_argument("--every", type=float, default=120, help="seconds between failures")
    parser.add_argument(
        "--failures",
        default="node",
        help=f"comma list, taken in turn: {', '.join(FAILURES)} (node)",
    )
    parser.add_argument("--configs", default="peers,no-peers,dcp")
    parser.add_argument(
        "--remote-every",
        type=int,
        default=20,
        help="steps between object-store checkpoints, mtckpt's and DCP's (20)",
    )
    parser.add_argument(
        "--memory-every",
        type=int,
        default=1,
        help="steps between node-memory checkpoints, which the daemons replicate (1, the "
        "ConfigMap's; `mtckpt plan` recommends one for the run)",
    )
    parser.add_argument(
        "--restart",
        choices=("job", "in-process"),
        default="job",
        help="after a failure, start the whole job again (job: torchrun, a Kubernetes Job) "
        "or only the dead ranks, the others joining a new process group (in-process)",
    )
    parser.add_argument(
        "--spares",
        action="store_true",
        help="in-process restarts: warm spares (a spare node's daemon and ranks already "
        "running, torch imported) take the place of lost ones instead of starting",
    )
    parser.add_argument(
        "--redundancy",
        default="",
        help="the peers configuration's daemons keep this (xor:G, rs:K+M, replicas:R) "
        "instead of the ConfigMap's replicas",
    )
    parser.add_argument("--idle-nodes", type=int, default=0, help="more nodes that run the "
                        "daemon and no trainer, as a DaemonSet's nodes the job does not use (0)")
    parser.add_argument("--shape-mbit", type=float, help="cap every node's link (tc tbf)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=Path("bench-out/cluster"))
    args = parser.parse_args(argv)
    why = can_make_namespaces()
    if why:
        print(f"mtckpt-cluster: {why}", file=sys.stderr)
        return 2
    if not 2 <= args.nodes <= 16 or not 0 <= args.idle_nodes <= 16 - args.nodes:
        parser.error("--nodes, --idle-nodes: expected 2..16 nodes in all, 2 or more training")
    if args.spares and args.restart != "in-process":
        parser.error("--spares: only with --restart in-process (a job restart starts every rank)")
    failures = [f for f in args.failures.split(",") if f]
    unknown = sorted(set(failures) - set(FAILURES))
    if unknown:
        parser.error(f"--failures: unknown {unknown}; expected {', '.join(FAILURES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for name in args.configs.split(","):
        config = Config(name, remote_every=args.remote_every, restart=args.restart,
                        spares=args.spares, memory_every=args.memory_every,
                        redundancy=args.redundancy if name == "peers" else "")  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="mtc-") as root:
            with Cluster(args.nodes, args.ranks, config, Path(root), idle=args.idle_nodes,
                         shaping_mbit=args.shape_mbit) as cluster:  # fmt: skip
                run = cluster.run(
                    args.steps, step_seconds=args.step_seconds, mib=args.mib,
                    every=args.every, failures=failures, timeout=args.timeout,
                )  # fmt: skip
                summaries.append(summarize(run))
                shutil.copy(run["events"], args.out / run["events"].name)
        print(table(summaries[-1:]), flush=True)
    print(table(summaries))
    (args.out / "cluster.json").write_text(json.dumps(summaries, indent=1))
    print(predictions(summaries, args.out))
    if plot(summaries, args.out / "timeline.png"):
        print(f"timeline: {args.out / 'timeline.png'}")
    return 0


def predictions(summaries: list[dict], out: Path) -> str:
    """Each configuration's measurements written as ``mtckpt plan --inputs`` files, and the
    planner's goodput for the configuration that ran beside the measured one."""
    from mtckpt.plan import build_inputs, optimize, simulate
    from mtckpt.plan.inputs import PlanInputError

    lines = [
        "| configuration | measured goodput (first to last step) | planner, analytic | "
        "planner, simulated | planner's recommended every |",
        "|---|---|---|---|---|",
    ]
    for s in summaries:
        raw = s["plan_inputs"]
        path = out / f"plan-inputs-{s['config']}.json"
        path.write_text(json.dumps(raw, indent=1))
        if not raw["failures_per_hour"]:
            continue
        try:  # a tier the run never restored from has no measured costs to plan with
            inputs = build_inputs(raw)
        except PlanInputError as exc:
            lines.append(f"| {s['config']} | {s['goodput_steady']:.3f} | not modelled: {exc} "
                         "| - | - |")  # fmt: skip
            continue
        plan = optimize(inputs)
        ran = plan.configured
        simulated = simulate(inputs, ran.every, replications=3)
        every = ", ".join(f"{k} {v}" for k, v in plan.recommended.every.items())
        sim = f"{simulated.goodput:.3f} ± {simulated.half_width:.3f}"
        lines.append(f"| {s['config']} | {s['goodput_steady']:.3f} | {ran.goodput:.3f} | "
                     f"{sim} | {every} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
