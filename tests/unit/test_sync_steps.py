"""Sync steps (issue 26.1): the stride each daemon measures and the cluster's spread with a
time to live; the daemon keeping its node's sync steps after the trainer expires them
(hard links it holds, so the trainer's next saves cannot reuse their files); replicas
keeping their origin's sync steps beyond the newest ``keep``."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from mtckpt import CheckpointManager, MemoryTier
from mtckpt.daemon import sync
from mtckpt.daemon.holdings import Holdings, Shard
from mtckpt.daemon.sync import Strides, check_stride, stride_for, sync_steps
from mtckpt.format import naming

RUN = "exp"


@pytest.mark.parametrize(
    ("lag", "stride"), [(0, 1), (1, 1), (2, 2), (3, 4), (8, 8), (9, 16), (10_000, 64)]
)
def test_the_stride_is_the_power_of_two_at_or_above_the_lag(lag, stride):
    assert stride_for(lag) == stride


@pytest.mark.parametrize(
    ("stride", "ttl", "message"),
    [
        (3, 1.0, r"^peer n2 \(10\.0\.0\.2:7787\): sync stride 3 is not a power of two in 1\.\.64$"),
        (128, 1.0, r"sync stride 128 is not a power of two"),
        (4, -1.0, r"^peer n2 \(10\.0\.0\.2:7787\): sync stride time to live -1\.0 is outside"),
        (4, math.nan, r"time to live nan is outside 0\.\.30\.0 s"),
        (4, 31.0, r"time to live 31\.0 is outside"),
    ],
)
def test_a_stride_from_the_wire_is_checked_and_names_the_peer(stride, ttl, message):
    with pytest.raises(ValueError, match=message):
        check_stride(stride, ttl, "peer n2 (10.0.0.2:7787)")


def test_the_own_stride_follows_the_largest_of_the_last_lags():
    strides = Strides()
    assert strides.own == 1 and strides.said() == (1, sync.TTL)
    for lag in (3, 0, 0, 0):
        strides.lagged(lag)
    assert strides.own == 4  # the 3 is one of the last four
    strides.lagged(0)
    assert strides.own == 1


def test_a_larger_stride_heard_holds_for_its_time_to_live_less_a_hop():
    strides = Strides()
    strides.lagged(2)
    strides.hear("10.0.0.3:7787", 16, sync.HOP + 0.3)
    strides.hear("10.0.0.4:7787", 8, sync.TTL)
    stride, ttl = strides.said()
    assert stride == 16 and 0 < ttl <= 0.3  # passed on with less time than it came with
    time.sleep(0.35)
    assert strides.said()[0] == 8  # the 16 faded out; the 8 holds
    strides.hear("10.0.0.4:7787", 1, sync.TTL)  # that peer now says 1: it replaces its 8
    assert strides.said() == (2, sync.TTL)  # this node's own


def test_sync_steps_are_the_newest_multiples_of_the_stride():
    assert sync_steps(list(range(1, 40)), 8) == [24, 32]
    assert sync_steps([5, 9, 16, 16], 4) == [16]
    assert sync_steps([1, 2, 3], 4) == []
    assert sync_steps([1, 2, 3, 4], 1) == []  # no daemon lags: the newest `keep` do


def state(step: int) -> dict:
    return {"w": np.full(1 << 16, step, np.float32)}


def test_a_kept_sync_step_outlives_the_trainers_retention_unchanged(shm_dir):
    holdings = Holdings("n1", shm_dir, keep=2)
    with CheckpointManager(RUN, MemoryTier(str(shm_dir), keep=1)) as mgr:
        mgr.save(4, state(4)).wait()
        saved = holdings.own.read_bytes(RUN, 4, naming.data_file(0))
        assert holdings.kept.keep(RUN, 4)
        for step in range(5, 9):  # the trainer expires 4, then keeps reusing its slots
            mgr.save(step, state(step)).wait()
        assert mgr.steps()["memory"] == [8]
    kept = holdings.kept.storage
    assert holdings.kept.steps(RUN) == [4]
    assert kept.read_bytes(RUN, 4, naming.data_file(0)) == saved  # no later save wrote it
    assert not holdings.own.step_path(RUN, 4).exists()
    own = {(h.shard.step, h.replica) for h in holdings.list(run=RUN)}
    assert own == {(4, False), (8, False)}  # listed, sent and recovered as its own
    holdings.kept.release(RUN, keep=set())
    assert holdings.kept.steps(RUN) == [] and not kept.step_path(RUN, 4).exists()
    holdings.kept.close()


def test_a_step_the_trainer_expired_already_is_not_kept(shm_dir):
    holdings = Holdings("n1", shm_dir, keep=2)
    with CheckpointManager(RUN, MemoryTier(str(shm_dir), keep=1)) as mgr:
        for step in (4, 5):
            mgr.save(step, state(step)).wait()
    assert not holdings.kept.keep(RUN, 4)
    assert holdings.kept.steps(RUN) == []


def test_replicas_keep_their_origins_newest_sync_steps_beyond_keep(shm_dir, tmp_path):
    origin = tmp_path / "origin"
    with CheckpointManager(RUN, MemoryTier(str(origin), keep=13)) as mgr:
        for step in range(1, 13):
            mgr.save(step, state(step)).wait()
    holder = Holdings("n2", shm_dir, keep=2)
    source = Holdings("n1", origin, keep=13).own
    for step in range(1, 13):
        manifest = source.read_bytes(RUN, step, naming.manifest_file(0))
        data = source.read_bytes(RUN, step, naming.data_file(0))
        holder.store(Shard(RUN, step, 0, "n1"), manifest, [(0, data)])
        holder.expire_replicas("n1", RUN, stride=4)
    assert holder.storage("n1").steps(RUN) == [8, 11, 12]
    holder.expire_replicas("n1", RUN)  # stride 1: the newest `keep` only
    assert holder.storage("n1").steps(RUN) == [11, 12]


def test_a_node_sends_every_step_as_it_comes_unless_it_lags_then_sync_steps_only():
    strides = Strides()
    assert strides.sends_now(7) and strides.sends_now(8)
    strides.lagged(3)  # a transfer ended 3 saves behind: a stride of 4
    assert not strides.sends_now(7) and strides.sends_now(8)  # chains refuse step 7's sums
