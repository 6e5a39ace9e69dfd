"""A parity holder's stripes waiting on a member that holds nothing of their step
(daemon/absent.py), without the network: what the member says it holds decides when its
piece counts as zeros."""

from __future__ import annotations

import pytest
import test_parity
from test_parity import contribute

from mtckpt.daemon.absent import AbsentPieces
from mtckpt.daemon.parity import ParityStore
from mtckpt.redundancy import Redundancy

saved = test_parity.saved  # the fixture: real saves of a's and b's ranks
NEVER = 3600.0  # an absent_after no test reaches: only what b holds decides


@pytest.fixture
def waiting(tmp_path, saved):
    """A holder (c) with a's piece of steps 1 and 2 in, b's awaited; what b says it holds
    (``holds["b"]``) and the askings."""
    store = ParityStore(tmp_path, "c", Redundancy.parse("xor:3"), keep=4)
    holds, asked = {"b": set()}, []

    def steps_of(node: str, run: str):
        asked.append((node, run))
        return holds[node]

    absent = AbsentPieces(store, steps_of)
    contribute(store, saved, 1, "a")
    return store, absent, holds, asked


def complete_steps(store) -> list[int]:
    return sorted(i.stripe.step for i in store.listing() if i.complete)


def test_a_member_holding_nothing_of_the_run_counts_as_zeros_once_the_stripe_waited(waiting):
    store, absent, holds, _ = waiting
    assert absent.check(ask_after=0, absent_after=NEVER) == []  # it may still be saving
    assert absent.check(ask_after=0, absent_after=0)  # waited long enough
    assert complete_steps(store) == [1]


def test_a_member_found_idle_counts_as_zeros_at_once_in_the_next_steps(waiting, saved):
    store, absent, holds, _ = waiting
    absent.check(ask_after=0, absent_after=0)
    contribute(store, saved, 2, "a")
    assert absent.check(ask_after=NEVER, absent_after=NEVER)  # asked at once: still idle
    assert complete_steps(store) == [1, 2]


def test_a_member_holding_a_newer_step_counts_as_zeros_at_once(waiting):
    store, absent, holds, _ = waiting
    holds["b"] = {2}  # it saved step 2, not step 1: it never will
    assert absent.check(ask_after=0, absent_after=NEVER)
    assert complete_steps(store) == [1]


def test_a_member_holding_the_step_is_awaited_and_not_asked_at_every_look(waiting):
    store, absent, holds, asked = waiting
    holds["b"] = {1}
    for _ in range(3):
        assert absent.check(ask_after=0, absent_after=NEVER) == []
    assert asked == [("b", "run")]  # once: it said it holds the step
    assert absent.check(ask_after=0, absent_after=0) == []  # asked again, and still awaited
    assert len(asked) == 2 and complete_steps(store) == []


def test_a_member_that_cannot_be_asked_is_awaited(waiting):
    store, absent, holds, _ = waiting
    holds["b"] = None
    assert absent.check(ask_after=0, absent_after=0) == []
    assert complete_steps(store) == []


def test_nothing_is_asked_before_the_stripe_waited(waiting):
    store, absent, holds, asked = waiting
    assert absent.check(ask_after=NEVER, absent_after=0) == [] and asked == []
