"""The checkpoint-schedule planner: the analytic goodput, Young's interval for one tier,
the multi-tier optimizer and its constraints, the discrete-event simulation against the
analytic model, the probe, and every bad input named."""

from __future__ import annotations

import json
import math

import pytest

from mtckpt.errors import ConfigError
from mtckpt.plan import (
    PlanInputError,
    PlanInputs,
    TierCost,
    build_inputs,
    evaluate,
    inputs_json,
    optimize,
    read_inputs_file,
    simulate,
    survives,
    young_daly,
)
from mtckpt.plan.probe import probe
from mtckpt.plan.simulate import horizon_seconds
from plan_inputs import HARNESS


def gpu_job(**changes) -> PlanInputs:
    """64 nodes, 2 s steps, a node lost every 1000 node-hours and 4 trainer crashes a day."""
    fields = dict(
        step_seconds=2.0, nodes=64, restart_seconds=120.0,
        failures_per_hour={"node": 64 / 1000, "trainer": 4 / 24},
        tiers=(TierCost("memory", 0.3, 0.6, 2.0), TierCost("peers", 0.0, 20.0, 20.0),
               TierCost("local", 0.5, 10.0, 10.0), TierCost("remote", 5.0, 60.0, 90.0)),
    )  # fmt: skip
    fields.update(changes)
    return PlanInputs(**fields)


def no_peers_job() -> PlanInputs:
    """32 nodes without daemons: node losses go back to object storage."""
    return PlanInputs(
        step_seconds=1.0, nodes=32, restart_seconds=90.0,
        failures_per_hour={"node": 0.5, "trainer": 1.0, "two-nodes": 0.05, "daemon": 3.0},
        tiers=(TierCost("memory", 0.2, 0.4, 1.0), TierCost("local", 0.0, 8.0, 6.0),
               TierCost("remote", 2.0, 60.0, 120.0)),
    )  # fmt: skip


def harness_job() -> PlanInputs:
    return build_inputs({**HARNESS, "tiers": {k: dict(v) for k, v in HARNESS["tiers"].items()}})


# -- the analytic model -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure_class, tolerated, expected",
    [
        ("trainer", 1, {"memory", "peers", "local", "remote"}),
        ("daemon", 1, {"memory", "peers", "local", "remote"}),
        ("node", 1, {"peers", "remote"}),
        ("node", 0, {"remote"}),
        ("two-nodes", 1, {"remote"}),
        ("two-nodes", 2, {"peers", "remote"}),
    ],
)
def test_which_tiers_survive_each_failure_class(failure_class, tolerated, expected):
    tiers = ("memory", "peers", "local", "remote")
    assert {t for t in tiers if survives(t, failure_class, tolerated)} == expected


def test_goodput_and_its_first_order_form_worked_by_hand():
    inputs = PlanInputs(
        step_seconds=1.0, nodes=4, restart_seconds=30.0,
        failures_per_hour={"node": 2.0, "trainer": 1.0, "daemon": 5.0},
        tiers=(TierCost("memory", 0.1, 0.2, 1.0), TierCost("peers", 0.0, 3.0, 4.0),
               TierCost("remote", 2.0, 40.0, 50.0)),
    )  # fmt: skip
    schedule = evaluate(inputs, {"memory": 10, "peers": 10, "remote": 100})
    wall = 1.0 + 0.1 / 10 + 2.0 / 100
    trainer_redone, trainer_down = 10 * wall / 2 + 0.2, 1.0 + 30.0  # memory: the newest
    node_redone, node_down = 10 * wall / 2 + 3.0, 4.0 + 30.0  # peers: remote's is older
    redone = (1.0 * trainer_redone + 2.0 * node_redone) / 3600
    down = (1.0 * trainer_down + 2.0 * node_down) / 3600
    assert schedule.wall_seconds_per_step == pytest.approx(wall)
    assert schedule.goodput == pytest.approx((1.0 / wall) * (1 - redone) * math.exp(-down))
    assert schedule.first_order_goodput == pytest.approx((1.0 / wall) * (1 - redone - down))
    trainer, node = trainer_redone + trainer_down, node_redone + node_down
    recovered = {r.failure_class: (r.tier, r.cost_seconds) for r in schedule.recoveries}
    assert recovered["trainer"] == ("memory", pytest.approx(trainer))
    assert recovered["node"] == ("peers", pytest.approx(node))
    assert recovered["daemon"] == (None, 0.0)  # the trainer goes on


def test_a_single_tier_reproduces_youngs_interval():
    stall, mtbf = 10.0, 36000.0  # C and M: a node lost every 10 hours, 10 s to save
    inputs = PlanInputs(step_seconds=1.0, nodes=8, restart_seconds=0.0,
                        failures_per_hour={"node": 3600 / mtbf},
                        tiers=(TierCost("remote", stall, 0.0, 0.0),))  # fmt: skip
    young = math.sqrt(2 * stall * mtbf)
    assert young_daly(inputs)["remote"].seconds == pytest.approx(young)
    assert young_daly(inputs)["remote"].every == round(young)
    plan = optimize(inputs)
    # the refined optimum: saves every sqrt(2CM) seconds of wall time (stall included)
    assert plan.recommended.interval_seconds("remote") == pytest.approx(young, abs=1.0)
    best = plan.recommended.every["remote"]
    for other in (best - 1, best + 1, round(best * 0.8), round(best * 1.25)):
        assert evaluate(inputs, {"remote": other}).goodput < plan.recommended.goodput


def test_each_level_is_sized_by_the_failures_it_recovers():
    plan = optimize(no_peers_job())
    young = plan.young_daly
    # trainer crashes come back from memory; node losses (both kinds) from remote
    assert young["memory"].rate_per_hour == pytest.approx(1.0)
    assert young["memory"].seconds == pytest.approx(math.sqrt(2 * 0.2 / (1.0 / 3600)))
    assert young["remote"].rate_per_hour == pytest.approx(0.55)
    assert young["remote"].seconds == pytest.approx(math.sqrt(2 * 2.0 / (0.55 / 3600)))
    assert young["local"].seconds == 0.0  # no stall: as often as it keeps up
    every = plan.recommended.every
    assert every["local"] % every["memory"] == 0 and every["remote"] % every["local"] == 0
    assert every["local"] >= 8  # its 8 s transfer at 1 s steps: one in flight at a time
    recovered = {r.failure_class: r.tier for r in plan.recommended.recoveries}
    assert recovered == {"trainer": "memory", "node": "remote", "two-nodes": "remote",
                         "daemon": None}  # fmt: skip


def test_peers_share_memorys_every_and_a_tier_that_recovers_nothing_is_capped():
    plan = optimize(gpu_job())
    every = plan.recommended.every
    assert every["peers"] == every["memory"]
    assert every["peers"] * 2.0 >= 20.0  # peers' 20 s replication keeps up
    # node losses come back from peers, so remote (stall 5 s) recovers none: capped
    assert plan.young_daly["remote"].seconds == math.inf
    assert "remote" in plan.capped and every["remote"] == 3600 / 2.0
    assert every["local"] % every["memory"] == 0 and every["remote"] % every["local"] == 0
    assert plan.configured is None  # no every was given


def test_the_recommended_schedule_beats_the_configured_one_and_its_neighbours():
    inputs = harness_job()
    plan = optimize(inputs)
    assert plan.configured is not None
    assert plan.configured.every == {"memory": 1, "peers": 1, "local": 10, "remote": 20}
    assert plan.recommended.goodput > plan.configured.goodput
    every = plan.recommended.every
    for memory in (every["memory"] - 1, every["memory"] + 1):
        trial = {"memory": memory, "peers": memory, "local": memory * 4, "remote": memory * 8}
        assert evaluate(inputs, trial).goodput < plan.recommended.goodput


# -- the simulation ---------------------------------------------------------------------------


@pytest.mark.parametrize("job", [gpu_job, no_peers_job, harness_job], ids=lambda f: f.__name__)
def test_simulated_goodput_agrees_with_the_analytic_within_a_point(job):
    inputs = job()
    plan = optimize(inputs)
    for schedule in (plan.recommended, plan.configured):
        if schedule is None:
            continue
        result = simulate(inputs, schedule.every, seed=1)  # 5 runs of 2000 failures
        assert abs(result.goodput - schedule.goodput) < 0.01, (schedule, result)
        # the first-order form counts failures during recoveries in full: further off
        assert schedule.first_order_goodput < schedule.goodput
        assert abs(result.goodput - schedule.goodput) < abs(
            result.goodput - schedule.first_order_goodput
        )
        assert result.low <= result.goodput <= result.high
        assert result.high - result.low < 0.02


def test_simulation_without_failures_runs_at_compute_over_wall_time():
    inputs = gpu_job(failures_per_hour={"node": 1e-12})
    every = {"memory": 3, "peers": 3, "local": 6, "remote": 12}
    result = simulate(inputs, every, replications=2, max_steps=1200)
    assert result.failures == 0
    wall = 2.0 + 0.3 / 3 + 0.5 / 6 + 5.0 / 12
    assert result.horizon_seconds == pytest.approx(1200 * wall)
    assert result.goodput == pytest.approx(2.0 / wall, rel=2e-3)  # within a step


def test_simulation_counts_the_durable_lag():
    """A node loss can only use a peer copy once replicated: a longer lag costs goodput, in
    the simulation as in the model."""
    every = {"memory": 10, "peers": 10, "remote": 1000}
    slow, fast = (
        PlanInputs(
            step_seconds=1.0,
            nodes=4,
            restart_seconds=10.0,
            failures_per_hour={"node": 6.0},
            tiers=(
                TierCost("memory", 0.0, 0.0, 1.0),
                TierCost("peers", 0.0, lag, 1.0),
                TierCost("remote", 0.0, 30.0, 10.0),
            ),
        )  # fmt: skip
        for lag in (60.0, 0.0)
    )
    simulated = [simulate(i, every, replications=3, failures=1000).goodput for i in (slow, fast)]
    analytic = [evaluate(i, every).goodput for i in (slow, fast)]
    # 6 node losses an hour, each redoing 60 s more, each recovery 11 s
    assert analytic[1] - analytic[0] == pytest.approx(math.exp(-6 * 11 / 3600) * 6 * 60 / 3600)
    assert simulated[1] - simulated[0] == pytest.approx(analytic[1] - analytic[0], abs=0.01)


def test_simulation_is_reproducible_from_its_seed():
    inputs = harness_job()
    every = inputs.configured_every()
    first = simulate(inputs, every, replications=2, failures=300, seed=7)
    again = simulate(inputs, every, replications=2, failures=300, seed=7)
    other = simulate(inputs, every, replications=2, failures=300, seed=8)
    assert first == again
    assert other.goodput != first.goodput
    assert horizon_seconds(inputs, every, failures=300) == pytest.approx(300 / (30 / 3600))


# -- the inputs -------------------------------------------------------------------------------


def test_inputs_file_round_trips(tmp_path):
    path = tmp_path / "inputs.json"
    path.write_text(json.dumps(HARNESS))
    inputs = build_inputs(read_inputs_file(path))
    assert inputs == harness_job()
    assert inputs.names == ("memory", "peers", "local", "remote")
    path.write_text(json.dumps(inputs_json(inputs)))
    assert build_inputs(read_inputs_file(path)) == inputs


def _with(**changes) -> dict:
    data = json.loads(json.dumps(HARNESS))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = data
        for key in parents:
            target = target[key]
        if value is _DROP:
            del target[last]
        else:
            target[last] = value
    return data


_DROP = object()


@pytest.mark.parametrize(
    "data, message",
    [
        (_with(step_seconds=-1), r"step_seconds \(--step-seconds\): expected a number > 0"),
        (_with(step_seconds=0), r"step_seconds \(--step-seconds\): expected a number > 0"),
        (_with(nodes=0), r"nodes \(--nodes\): expected an integer >= 1"),
        (_with(restart_seconds=-5), r"restart_seconds \(--restart-seconds\)"),
        (_with(failures_per_hour__node=-1.0), r"failures_per_hour.node: expected a number >= 0"),
        (_with(failures_per_hour__cosmic=1.0), r"unknown failure class 'cosmic'"),
        (_with(failures_per_hour={"node": 0.0, "daemon": 2.0}), r"every failure rate is zero"),
        (_with(tiers__tape={"stall_seconds": 0, "durable_seconds": 0, "restore_seconds": 1}),
         r"unknown tier 'tape'"),
        (_with(tiers__local__durable_seconds=-1.0), r"tiers.local.durable_seconds"),
        (_with(tiers__remote__every=25), r"tiers.remote.every: expected a multiple of "
         r"tiers.local.every \(10\)"),
        (_with(tiers__peers__every=2), r"tiers.peers.every: peers replicate every memory step"),
        (_with(tiers__memory=_DROP), r"tiers.peers: .*give the memory tier too"),
        (_with(tiers__peers=_DROP, tiers__remote=_DROP), r"failures_per_hour.node: no configured "
         r"tier survives a node failure"),
        (_with(tiers__remote=_DROP, failures_per_hour={"two-nodes": 1.0}),
         r"two-nodes: no configured tier survives"),
        (_with(peer_losses_tolerated=4), r"peer_losses_tolerated \(--replicas\): at most"),
    ],
)  # fmt: skip
def test_bad_inputs_are_named(data, message):
    raw = {k: v for k, v in data.items() if k != "version"}
    with pytest.raises(PlanInputError, match=message) as caught:
        build_inputs(raw)
    assert isinstance(caught.value, ConfigError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "data, message",
    [
        (_with(version=2), r"version: expected 1, got 2"),
        (_with(version=_DROP), r"version: expected 1, got None"),
        (_with(step_seconds=_DROP), r"missing step_seconds"),
        (_with(tiers__local__restore_seconds=_DROP), r"tiers.local: missing restore_seconds"),
        (_with(tiers__local__speed=3), r"tiers.local: unknown keys speed"),
        (_with(colour="red"), r"unknown keys colour"),
        (_with(tiers=[1, 2]), r"tiers: expected a JSON object"),
    ],
)
def test_bad_inputs_files_are_named(tmp_path, data, message):
    path = tmp_path / "inputs.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanInputError, match=message):
        read_inputs_file(path)


def test_an_unreadable_inputs_file_is_named(tmp_path):
    with pytest.raises(PlanInputError, match="No such file"):
        read_inputs_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanInputError, match="not JSON"):
        read_inputs_file(tmp_path / "bad.json")


def test_a_tier_without_restore_time_is_named():
    raw = {"step_seconds": 1.0, "nodes": 2, "failures_per_hour": {"node": 1.0},
           "tiers": {"remote": {"stall_seconds": 1.0}}}  # fmt: skip
    with pytest.raises(PlanInputError, match=r"tiers.remote.restore_seconds .*required"):
        build_inputs(raw)
    with pytest.raises(PlanInputError, match=r"step_seconds \(--step-seconds\): required"):
        build_inputs({"nodes": 2})


# -- the probe --------------------------------------------------------------------------------


def test_probe_costs_the_state_from_measured_bandwidths(tmp_path):
    state = 64 << 20
    result = probe(state, local_root=str(tmp_path), probe_bytes=4 << 20)
    assert [t.name for t in result.tiers] == ["memory", "local"]
    assert len(result.notes) == 2 and "--link-gbps" in result.notes[0]
    memory = result.tiers[0]
    assert memory.stall_seconds == pytest.approx(state / result.memory_copy_bps)
    local = result.tiers[1]
    assert local.stall_seconds == 0 and local.restore_seconds > 0
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
    result = probe(state, local_root=str(tmp_path), link_gbps=8.0, object_gbps=0.8,
                   replicas=2, probe_bytes=4 << 20)  # fmt: skip
    tiers = {t.name: t for t in result.tiers}
    assert set(tiers) == {"memory", "local", "peers", "remote"} and not result.notes
    assert tiers["peers"].restore_seconds == pytest.approx(state / 1e9)
    assert tiers["remote"].restore_seconds == pytest.approx(state / 1e8)
    # two replicas pushed over the node's link, after the memory tier's commit
    copy = tiers["memory"].stall_seconds
    assert tiers["peers"].durable_seconds == pytest.approx(2 * copy + 2 * state / 1e9)
