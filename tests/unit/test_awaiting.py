"""Awaiting a step's stripes at their holders while its pieces are on their way (issue 21):
a holder is marked stored the moment its stripe completes, not after every send has
ended; one whose stripe does not complete, whose send failed or that is down is marked
with the reason. The holder here is a real parity store, asked as ListShards asks it."""

from __future__ import annotations

import threading
import time

import pytest
import test_parity
from test_parity import contribute, header

from mtckpt import _fastpath
from mtckpt.daemon import awaiting
from mtckpt.daemon.awaiting import Held, StripesAwaited
from mtckpt.daemon.parity import ParityStore
from mtckpt.daemon.stripes import StripeKey
from mtckpt.redundancy import Redundancy

saved = test_parity.saved  # the fixture: real saves of ranks of unequal size


@pytest.fixture
def holder(tmp_path):
    return ParityStore(tmp_path, "c", Redundancy.parse("xor:3"), keep=2)


def asking(store: ParityStore, origin: str = "a"):
    """What a ListShards awaiting ``keys`` answers from ``store`` (daemon/servicer.py)."""

    def ask(node: str, keys: list[StripeKey], wait: float) -> dict:
        store.wait_complete(keys, wait)
        stripes = {}
        for info in store.listing(origin=origin):
            mine = next(c for c in info.contributors if c.origin == origin)
            held = Held(tuple(mine.manifest_crcs), info.complete, tuple(info.awaiting))
            stripes[StripeKey.checked(info.stripe)] = held
        return stripes

    return ask


class Marks:
    def __init__(self) -> None:
        self.said: list[tuple[str, str]] = []
        self.changed = threading.Condition()

    def __call__(self, node: str, error: str) -> None:
        with self.changed:
            self.said.append((node, error))
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.said) >= count, timeout), self.said


def awaited_for_a(saved, ask, marks: Marks, up=lambda node: True,
                  crcs: tuple | None = None) -> StripesAwaited:  # fmt: skip
    crcs = crcs or (_fastpath.backend().crc32c(saved[(1, 0)][0]),)  # a's manifest
    return StripesAwaited({"c": [StripeKey.checked(header(saved, 1, "a").stripe)]}, ask, up,
                          crcs, marks, threading.Event())  # fmt: skip


def test_a_holder_is_marked_stored_as_its_stripe_completes_before_the_sends_end(
    saved, holder
):
    marks = Marks()
    stripes = awaited_for_a(saved, asking(holder), marks)
    contribute(holder, saved, 1, "a")
    stripes.begin()  # a's piece is sent; b's is still on its way
    time.sleep(0.2)
    assert marks.said == []  # asked, and waiting there for the stripe
    contribute(holder, saved, 1, "b")
    marks.wait_for(1)  # while the sends have not ended
    assert marks.said == [("c", "")]
    stripes.end()
    assert marks.said == [("c", "")]


def test_a_stripe_that_does_not_complete_in_time_names_the_members_it_awaits(
    saved, holder, monkeypatch
):
    monkeypatch.setattr(awaiting, "COMPLETION_WAIT", 0.3)
    marks = Marks()
    stripes = awaited_for_a(saved, asking(holder), marks)
    contribute(holder, saved, 1, "a")  # b's piece never comes
    stripes.begin()
    started = time.monotonic()
    stripes.end()
    assert time.monotonic() - started < awaiting.COMPLETION_WAIT + awaiting.ASK_WAIT + 1
    assert marks.said == [("c", "1 stripe(s) held by c await the pieces of b")]


def test_a_failed_send_is_marked_and_not_taken_back_by_the_stripe_completing(saved, holder):
    marks = Marks()
    stripes = awaited_for_a(saved, asking(holder), marks)
    stripes.begin()
    stripes.failed("c", "piece to c failed: connection reset")
    contribute(holder, saved, 1, "a")
    contribute(holder, saved, 1, "b")
    stripes.end()
    assert marks.said == [("c", "piece to c failed: connection reset")]


def test_a_stripe_complete_before_its_send_failed_keeps_the_holder_stored(saved, holder):
    marks = Marks()
    stripes = awaited_for_a(saved, asking(holder), marks)
    contribute(holder, saved, 1, "a")
    contribute(holder, saved, 1, "b")
    stripes.begin()
    marks.wait_for(1)
    stripes.failed("c", "piece to c failed: its reply was lost")
    stripes.end()
    assert marks.said == [("c", "")]


def test_a_holder_that_is_down_is_marked_unreachable(saved, holder):
    marks = Marks()
    stripes = awaited_for_a(saved, asking(holder), marks, up=lambda node: False)
    stripes.begin()
    stripes.end()
    assert marks.said == [("c", "peer c unreachable")]


def test_another_save_of_the_step_at_the_holder_is_not_this_one(saved, holder, monkeypatch):
    monkeypatch.setattr(awaiting, "COMPLETION_WAIT", 0.3)
    marks = Marks()
    # this node's save of the step is not the one its holder has
    stripes = awaited_for_a(saved, asking(holder), marks, crcs=(12345,))
    contribute(holder, saved, 1, "a")
    contribute(holder, saved, 1, "b")
    stripes.begin()
    stripes.end()
    assert marks.said == [("c", "1 stripe(s) held by c await other members' pieces")]


def test_a_stripe_its_piece_said_it_completed_marks_the_holder_without_asking(saved, holder):
    marks = Marks()
    asked = []
    stripes = awaited_for_a(saved, lambda *args: asked.append(args), marks)
    key = StripeKey.checked(header(saved, 1, "a").stripe)
    stripes.completed("d", key)  # not a holder awaited: nothing
    stripes.completed("c", key)  # the piece's status: its stripe is complete at c
    assert marks.said == [("c", "")]
    stripes.begin()
    stripes.end()
    assert marks.said == [("c", "")] and asked == []
