"""Goodput and recovery from a job's events: useful training time (the steps of the final
state times the compute per step) over wall time; per failure the time to detect it,
restart the job and restore, the step restored and the tier each rank restored from, and
the time lost (work redone + restore). A PNG timeline (step vs time, one line per
configuration, failures marked) where matplotlib is installed."""

from __future__ import annotations

import json
from pathlib import Path


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(run: dict) -> dict:
    events = _events(run["events"])
    failures = []
    for failure in run["failures"]:
        after = [e for e in events if failure.restarted and e["t"] >= failure.restarted]
        restored = [e for e in after if e["event"] == "restored"]
        first = {}
        for e in restored:
            first.setdefault(e["rank"], e)
        restored = list(first.values())
        row = {"kind": failure.kind, "nodes": failure.nodes, "step": failure.step,
               "at": failure.injected - run["started"]}  # fmt: skip
        if failure.restarted and restored:
            step = min(e["step"] for e in restored)
            restore = max(e["seconds"] for e in restored)
            done_at = max(e["t"] for e in restored)
            row.update(
                detect=failure.detected - failure.injected,
                restart=done_at - restore - failure.detected,
                restore=restore,
                restored_step=step,
                same_step=len({e["step"] for e in restored}) == 1,
                tiers=sorted({str(e["tier"]) for e in restored}),
                redone=(failure.step - step) * run["step_seconds"],
            )
            row["lost"] = row["redone"] + restore
        failures.append(row)
    done = [e for e in events if e["event"] == "done"]
    useful = run["steps"] * run["step_seconds"]
    return {
        "config": run["config"],
        "wall": run["wall"],
        "useful": useful,
        "goodput": useful / run["wall"],
        "bit_identical": bool(done) and all(e["ok"] for e in done),
        "failures": failures,
        "timeline": [
            (e["t"] - run["started"], e["step"])
            for e in events
            if e["event"] == "step" and e["rank"] == 0
        ],  # fmt: skip
    }


def table(summaries: list[dict]) -> str:
    lines = [
        "| configuration | goodput | wall s | failures | mean lost s | mean restore s | "
        "tiers restored from | bit-identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        handled = [f for f in s["failures"] if "lost" in f]
        lost = sum(f["lost"] for f in handled) / len(handled) if handled else 0.0
        restore = sum(f["restore"] for f in handled) / len(handled) if handled else 0.0
        tiers = sorted({t for f in handled for t in f["tiers"]})
        lines.append(f"| {s['config']} | {s['goodput']:.3f} | {s['wall']:.0f} | "
                     f"{len(s['failures'])} | {lost:.1f} | {restore:.2f} | "
                     f"{', '.join(tiers) or '-'} | {s['bit_identical']} |")  # fmt: skip
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
