"""The cluster report's arithmetic on a made-up run: a step's own time, goodput over the
whole run and from the first step to the last, the save stall of the steps that saved,
and a failure's time lost."""

from __future__ import annotations

import json

import pytest
from tools.cluster.job import Failure
from tools.cluster.node import Config
from tools.cluster.report import read_events, summarize

STARTED = 1000.0


def made_up_run(tmp_path, every: int = 1) -> dict:
    """One rank: 10 steps, each 0.5 s apart, the first 3 s after the start, a save of
    0.02 s on the steps that save; steps 5 and 6 redone after a node loss at step 6 (a
    2 s restart, a 0.3 s restore); done 1 s after the last step."""
    events, t = [], STARTED + 3.0
    for step in [*range(1, 7), *range(5, 11)]:
        if step == 5 and t > STARTED + 5.0:
            t += 2.0
            events.append({"t": t - 0.3, "rank": 0, "event": "restored", "step": 4,
                           "tier": "peers", "seconds": 0.3})  # fmt: skip
        saved = 0.02 if step % every == 0 else 0.0
        events.append({"t": t, "rank": 0, "event": "step", "step": step, "saved": saved})
        t += 0.5
    events.append({"t": t + 0.5, "rank": 0, "event": "done", "ok": True})
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    failure = Failure("node", [1], STARTED + 3.0 + 5 * 0.5 + 0.1, step=6)
    failure.detected, failure.restarted = failure.injected + 0.1, failure.injected + 0.2
    return {"config": "peers", "events": path, "failures": [failure], "steps": 10,
            "step_seconds": 0.5, "wall": t + 1.0 - STARTED, "started": STARTED, "nodes": 2,
            "state_bytes_per_node": 1 << 20,
            "every": {"memory": every, "peers": every, "local": 10, "remote": 20}}  # fmt: skip


@pytest.mark.parametrize("every", [1, 5])
def test_goodput_counts_the_steps_own_time_over_the_run_and_its_steady_part(tmp_path, every):
    summary = summarize(made_up_run(tmp_path, every))
    cost = 0.5 - (0.02 if every == 1 else 0.0)  # the median interval less its save
    assert summary["step_cost"] == pytest.approx(cost)
    assert summary["goodput"] == pytest.approx(10 * cost / summary["wall"])
    first, last = summary["first_step"], summary["last_step"]
    assert first == pytest.approx(3.0)
    assert last == pytest.approx(3.0 + 11 * 0.5 + 2.0)
    assert summary["goodput_steady"] == pytest.approx(9 * cost / (last - first))
    assert summary["save_stall"] == pytest.approx(0.02)  # the steps that saved only
    (failure,) = summary["failures"]
    assert failure["restored_step"] == 4 and failure["tiers"] == ["peers"]
    assert failure["redone"] == pytest.approx(2 * cost)


@pytest.mark.parametrize(("every", "stride"), [(1, None), (1, 8), (5, 2)])
def test_daemons_behind_the_saves_give_the_planner_a_longer_peers_lag(tmp_path, every, stride):
    """Daemons that fell behind the saves send only steps ``stride`` saves apart: a loss
    redoes on average ``(stride - 1) / 2`` saves' worth more, which the planner, whose
    peers replicate every memory step, is given as lag."""
    run = made_up_run(tmp_path, every)
    run["failures"][0].stride = stride
    summary = summarize(run)
    (failure,) = summary["failures"]
    assert failure["stride"] == stride
    peers = summary["plan_inputs"]["tiers"]["peers"]
    save_wall = every * summary["step_cost"] + summary["save_stall"]  # between two saves
    lag = ((stride or 1) - 1) * save_wall / 2
    assert peers["every"] == every
    assert peers["durable_seconds"] == pytest.approx(failure["restore"] + lag)


@pytest.mark.parametrize(("redundancy", "tolerated"),
                         [("", 1), ("xor:3", 1), ("rs:2+2", 2), ("replicas:2", 2)])  # fmt: skip
def test_the_planner_is_told_how_many_losses_the_peers_survive(tmp_path, redundancy, tolerated):
    config = Config("peers", redundancy=redundancy)
    assert config.peer_losses_tolerated == tolerated
    run = made_up_run(tmp_path) | {"peer_losses_tolerated": config.peer_losses_tolerated}
    assert summarize(run)["plan_inputs"]["peer_losses_tolerated"] == tolerated


def test_events_read_while_a_rank_writes_a_line_leave_that_line_for_the_next_read(tmp_path):
    events = tmp_path / "events.jsonl"
    events.write_text('{"t": 1, "rank": 0, "event": "step"}\n{"t": 2, "rank": 1, "ev')
    assert read_events(events) == [{"t": 1, "rank": 0, "event": "step"}]
    with events.open("a") as f:
        f.write('ent": "step"}\n')
    assert [e["rank"] for e in read_events(events)] == [0, 1]
