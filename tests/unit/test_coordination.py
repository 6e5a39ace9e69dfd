"""Ranks without a process group (issue 26.2): the steps they restore come from what the
daemons say is complete across the nodes and from the tiers every rank writes; the
warning that each rank decides alone comes only when a rank holds steps nothing vouches
for."""

from __future__ import annotations

import logging

import pytest

from mtckpt import AgreementError
from mtckpt.coordination import UncoordinatedRanks

ALONE = "each rank picks its own"


def test_the_daemons_steps_and_the_shared_tiers_steps_together(caplog):
    ranks = UncoordinatedRanks(4)
    ranks.learn_complete([7, 5], [])
    assert ranks.agree([9, 8, 7, 5], shared=[8, 4]) == [8, 7, 5, 4]
    assert ALONE not in caplog.text


def test_nothing_complete_across_the_daemons_is_an_answer(caplog):
    ranks = UncoordinatedRanks(4)
    ranks.learn_complete([], [])  # the job's first start
    assert ranks.agree([]) == []
    assert ranks.agree([3]) == []  # this rank's own step 3 is not everyone's
    assert ALONE not in caplog.text


def test_an_unreachable_peer_is_an_agreement_error_naming_it():
    ranks = UncoordinatedRanks(4)
    ranks.learn_complete([5], ["peer n3 (10.0.0.3:7787)"])
    with pytest.raises(AgreementError, match=r"peer n3 \(10\.0\.0\.3:7787\) did not answer"):
        ranks.agree([5], shared=[4])


def test_without_daemons_steps_of_a_shared_tier_need_no_warning(caplog):
    caplog.set_level(logging.WARNING, logger="mtckpt")
    ranks = UncoordinatedRanks(4)
    assert ranks.agree([6, 3], shared=[3, 6]) == [6, 3]
    assert ALONE not in caplog.text
    assert ranks.agree([7, 6], shared=[6]) == [7, 6]  # 7: in this node's tiers only
    assert "4 ranks restore without torch.distributed" in caplog.text and ALONE in caplog.text


def test_a_step_asked_for_needs_no_agreement(caplog):
    ranks = UncoordinatedRanks(2)
    assert ranks.agree([3, 2], step=2) == [3, 2]
    assert ALONE not in caplog.text
