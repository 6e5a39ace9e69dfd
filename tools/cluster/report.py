"""Goodput and recovery from a job's events: useful training time (the steps of the final
state times a step's own time: compute and the gradients' all-reduce, without checkpoints
or failures) over wall time; per failure the time to detect it, restart the job (in
phases) and restore, the step restored and the tier each rank restored from, and the time
lost (work redone + restore); bytes written per tier; the run's inputs for ``mtckpt
plan``. A PNG timeline (step vs time, one line per configuration, failures marked) where
matplotlib is installed."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from mtckpt.plan import FAILURE_CLASSES


def read_events(path: Path) -> list[dict]:
    """Every rank's events so far, in the order written (none before the file exists)."""
    if not path.exists():
        return []
    text = path.read_text()
    written = text[: text.rfind("\n") + 1]  # a line still being written: read next time
    return [json.loads(line) for line in written.splitlines() if line.strip()]


PHASES = ("replacement", "python", "import", "rendezvous", "manager", "restore")


def phases(failure, after: list[dict]) -> dict:
    """Where a restart's time went, each phase ending when the last rank got through it:
    the replacement node's daemon started (before its ranks may start), the interpreter
    started, torch imported, the process group joined, the checkpoint manager built, the
    restore done."""
    first: dict[tuple[str, int], dict] = {}
    for e in after:
        first.setdefault((e["event"], e["rank"]), e)

    def last(event: str, key: str = "t") -> float | None:
        times = [e[key] for (name, _), e in first.items() if name == event]
        return max(times) if times else None

    marks = [failure.detected, failure.restarted, last("start", "launched"), last("start"),
             last("joined"), last("manager"), last("restored")]  # fmt: skip
    out, previous = {}, marks[0]
    for name, mark in zip(PHASES, marks[1:], strict=True):
        if mark is not None:
            out[name] = mark - previous
            previous = mark
    return out


def summarize(run: dict) -> dict:
    events = read_events(run["events"])
    steps = [e for e in events if e["event"] == "step"]
    cost = step_cost(steps) or run["step_seconds"]
    failures = []
    restarts = [f.restarted for f in run["failures"] if f.restarted]
    for failure in run["failures"]:
        until = min((t for t in restarts if failure.restarted and t > failure.restarted),
                    default=float("inf"))  # fmt: skip
        after = [e for e in events if failure.restarted and failure.restarted <= e["t"] < until]
        restored = [e for e in after if e["event"] == "restored"]
        first = {}
        for e in restored:
            first.setdefault(e["rank"], e)
        restored = list(first.values())
        row = {"kind": failure.kind, "nodes": failure.nodes, "step": failure.step,
               "at": failure.injected - run["started"], "whole": failure.whole,
               "stride": failure.stride}  # fmt: skip
        if failure.restarted and restored:
            step = min(e["step"] for e in restored)
            split = phases(failure, after)
            # the job's restore: from its last rank ready (joined, manager built) to its
            # last rank restored; a rank's own restore time also counts its wait for others
            restore = split.get("restore", max(e["seconds"] for e in restored))
            done_at = max(e["t"] for e in restored)
            row.update(
                detect=failure.detected - failure.injected,
                restart=done_at - restore - failure.detected,
                phases=split,
                restore=restore,
                restored_step=step,
                same_step=len({e["step"] for e in restored}) == 1,
                tiers=sorted({str(e["tier"]) for e in restored}),
                redone=(failure.step - step) * cost,
            )
            row["lost"] = row["redone"] + restore
        failures.append(row)
    done = [e for e in events if e["event"] == "done"]
    useful = run["steps"] * cost
    times = [e["t"] - run["started"] for e in steps]
    first_step, last_step = min(times, default=0.0), max(times, default=run["wall"])
    steady = max(last_step - first_step, 1e-9)
    stall = _mean([e["saved"] for e in steps if _saves(run, e["step"])])
    return {
        "config": run["config"],
        "wall": run["wall"],
        "step_cost": cost,
        "useful": useful,
        "goodput": useful / run["wall"],
        # from the first step to the last: the job's start and its close left out, as a
        # long job sees them (once in days)
        "goodput_steady": (useful - cost) / steady,
        "first_step": first_step,
        "last_step": last_step,
        "bytes": bytes_moved(run, events),
        "save_stall": stall,
        "plan_inputs": plan_inputs(run, failures, cost, stall, steady),
        "bit_identical": bool(done) and all(e["ok"] for e in done),
        "failures": failures,
        "timeline": [
            (e["t"] - run["started"], e["step"])
            for e in events
            if e["event"] == "step" and e["rank"] == 0
        ],  # fmt: skip
    }


def step_cost(steps: list[dict]) -> float | None:
    """A training step's own time, its compute and the gradients' all-reduce without the
    checkpoint: the median time between rank 0's consecutive steps, less the later one's
    save (the intervals a failure interrupted fall outside the median)."""
    ranked = [e for e in steps if e["rank"] == 0]
    own = sorted(b["t"] - a["t"] - b.get("saved", 0.0)
                 for a, b in zip(ranked, ranked[1:], strict=False)
                 if b["step"] == a["step"] + 1)  # fmt: skip
    return own[len(own) // 2] if own else None


def bytes_moved(run: dict, events: list[dict]) -> dict[str, float]:
    """Bytes written per tier by the ranks' checkpointing (each process's, summed) and the
    daemons (replicas pushed to peers, uploads; ``peers-read``: served to recovering
    nodes), a lost daemon's counted before it was lost."""
    out: dict[str, float] = dict(run.get("daemon_bytes", {}))
    for e in events:
        if e["event"] == "written":
            for tier, value in e["tiers"].items():
                out[tier] = out.get(tier, 0.0) + value
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _saves(run: dict, step: int) -> bool:
    """Whether ``step`` saved on the training thread: mtckpt's node-memory steps (the
    memory tier's copy), DCP's steps only."""
    every = run["every"]["remote" if run["config"] == "dcp" else "memory"]
    return step % every == 0


def plan_inputs(run: dict, failures: list[dict], step_cost: float, stall: float,
                training: float) -> dict:  # fmt: skip
    """The run's measurements as ``mtckpt plan --inputs`` reads them (version 1): the
    step's own time, failures per hour of ``training`` (an uninjected crash counts as a
    trainer's), the restart (injection to restore start), and per tier the ``stall`` of a
    save, the restore (the job's, from the failures that used the tier), and the durable
    lag, taken as the restore's time (the same bytes over the same path). Daemons that fell
    behind the saves send only steps ``stride`` saves apart (the median of the strides
    read at the failures), so a loss redoes ``(stride - 1) / 2`` saves' worth more on
    average: the planner, whose peers take every save of node memory, gets it as lag."""
    handled = [f for f in failures if "lost" in f]
    rates: dict[str, float] = {}
    for failure in failures:
        name = "trainer" if failure["kind"] == "crash" else failure["kind"]
        if name in FAILURE_CLASSES:
            rates[name] = rates.get(name, 0.0) + 3600 / training
    names = ["remote"] if run["config"] == "dcp" else ["memory", "local", "remote"]
    if run["config"] == "peers":
        names.insert(1, "peers")
    every = run["every"]
    strides = [f["stride"] for f in failures if f.get("stride")]
    stride = statistics.median_low(strides) if strides else 1
    save_wall = every["peers"] * step_cost + stall  # wall seconds between two saves
    tiers = {}
    for name in names:
        restores = [f["restore"] for f in handled if name in f["tiers"]]
        if restores or name == names[0]:
            restore = _mean(restores) or stall
            first = name == names[0]  # the tier whose copy is the save's stall
            lag = (stride - 1) * save_wall / 2 if name == "peers" else 0.0
            tiers[name] = {"every": every[name], "stall_seconds": stall if first else 0.0,
                           "durable_seconds": stall if first else restore + lag,
                           "restore_seconds": restore}  # fmt: skip
    return {
        "version": 1,
        "step_seconds": step_cost,
        "nodes": run["nodes"],
        "state_bytes_per_node": run["state_bytes_per_node"],
        "restart_seconds": _mean([f["detect"] + f["restart"] for f in handled]),
        "peer_losses_tolerated": run.get("peer_losses_tolerated", 1),
        "failures_per_hour": rates,
        "tiers": tiers,
    }


def table(summaries: list[dict]) -> str:
    lines = [
        "| configuration | goodput | first to last step | wall s | failures | mean lost s | "
        "mean restore s | restart phases, mean s | tiers restored from | MiB written per "
        "tier | bit-identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        handled = [f for f in s["failures"] if "lost" in f]
        lost = _mean([f["lost"] for f in handled])
        restore = _mean([f["restore"] for f in handled])
        tiers = sorted({t for f in handled for t in f["tiers"]})
        spent = {p: [f["phases"][p] for f in handled if p in f["phases"]] for p in PHASES}
        split = ", ".join(f"{p} {_mean(v):.1f}" for p, v in spent.items() if v)
        moved = ", ".join(f"{k} {v / (1 << 20):.0f}" for k, v in sorted(s["bytes"].items()))
        lines.append(f"| {s['config']} | {s['goodput']:.3f} | {s['goodput_steady']:.3f} | "
                     f"{s['wall']:.0f} | "
                     f"{len(s['failures'])} | {lost:.1f} | {restore:.2f} | {split or '-'} | "
                     f"{', '.join(tiers) or '-'} | {moved or '-'} | "
                     f"{s['bit_identical']} |")  # fmt: skip
    return "\n".join(lines)


def plot(summaries: list[dict], path: Path) -> bool:
    """The timeline as a PNG; False where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for s in summaries:
        times, steps = zip(*s["timeline"], strict=True) if s["timeline"] else ((), ())
        (line,) = ax.plot(times, steps, label=f"{s['config']} (goodput {s['goodput']:.2f})")
        for f in s["failures"]:
            ax.axvline(f["at"], color=line.get_color(), alpha=0.3, linestyle="--")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("step (rank 0)")
    ax.set_title("Training progress with failures (dashed: a failure injected)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
