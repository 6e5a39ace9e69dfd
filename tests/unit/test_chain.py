"""Chained encoding (issue 21) without the network: a data node takes its upstream's sum
of a stripe's pieces frame by frame, adds its own piece and passes the sum on to the
holder, which takes it as one contribution of both; every wait is bounded, a late sum is
refused, a broken sender fails the forwarding, and every refused header says why."""

from __future__ import annotations

import os
import threading
import time

import pytest
import test_parity
from test_parity import GROUP, contribute, header, piece_of, xor_of_pieces

from mtckpt.daemon import chain
from mtckpt.daemon.chain import ChainError, ChainRefused, OwnPiece, Relays, summed_frames
from mtckpt.daemon.encoder import Encoder
from mtckpt.daemon.holdings import Holdings
from mtckpt.daemon.parity import ParityError, ParityStore
from mtckpt.daemon.peers import Peers
from mtckpt.daemon.stripes import StripeKey
from mtckpt.proto import mtckpt_pb2 as pb
from mtckpt.redundancy import Redundancy

saved = test_parity.saved  # the fixture: real saves of ranks of unequal size
XOR3 = Redundancy.parse("xor:3")  # stripe 0: a's piece, then b's, summed on to c


def feed(relay, data: bytes, frame: int = 1000, commit: bool = True) -> None:
    """What bulk.receive_frames does with a sender's frames (each checked before)."""
    for offset in range(0, len(data), frame):
        chunk = data[offset : offset + frame]
        relay.region(offset, len(chunk))[:] = chunk
        relay.accept(offset, len(chunk))
    if commit:
        relay.commit()


@pytest.fixture
def own_piece(tmp_path):
    """An OwnPiece over ``data`` written to a file (as the rank files of a step are)."""
    opened = []

    def make(data: bytes) -> OwnPiece:
        path = tmp_path / f"own-{len(opened)}"
        path.write_bytes(b"x" * 5 + data)  # the piece starts inside the file
        fd = os.open(path, os.O_RDONLY)
        opened.append(fd)
        return OwnPiece([(fd, 5, len(data))])

    yield make
    for fd in opened:
        os.close(fd)


def key_of(step: int = 1) -> StripeKey:
    return StripeKey.checked(pb.StripeId(run="run", step=step, code="xor:3", group=GROUP,
                                         stripe=0))  # fmt: skip


def test_a_relayed_sum_completes_the_holders_stripe_as_the_xor_of_the_pieces(
    tmp_path, saved, own_piece
):
    relays = Relays("b", XOR3)
    relay = relays.receive(header(saved, 1, "a"))
    sender = threading.Thread(target=feed, args=(relay, piece_of(saved, 1, "a")))
    sender.start()
    taken = relays.claim(key_of())
    own = own_piece(piece_of(saved, 1, "b"))
    summed = b"".join(bytes(view) for view in summed_frames(taken, own))
    own.close()
    assert summed == xor_of_pieces(saved, 1)

    store = ParityStore(tmp_path / "c", "c", XOR3, keep=2)
    b = header(saved, 1, "b")
    sum_header = pb.ContributeHeader(stripe=b.stripe, contributor=b.contributor,
                                     upstream=[c.info(manifests=True) for c in taken.contributors],
                                     piece_size=len(summed))  # fmt: skip
    contribution = store.receive(sum_header)
    contribution.region(0, len(summed))[:] = summed
    contribution.accept(0, len(summed))
    contribution.commit()
    contribution.close()
    taken.finish(contribution.completed)  # as the encoder does with the holder's status
    taken.finish(False)  # its cleanup after: only the first call counts
    sender.join()
    assert relay.completed  # the status a's stream gets: the stripe is complete
    (info,) = store.listing(manifests=True)
    assert info.complete and [c.origin for c in info.contributors] == ["a", "b"]
    assert [c.manifests[0] for c in info.contributors] == [saved[(1, 0)][0], saved[(1, 1)][0]]
    assert store.complete(info.stripe).path.read_bytes() == xor_of_pieces(saved, 1)


def test_a_relays_status_waits_a_bounded_time_to_say_whether_its_stripe_completed(
    saved, monkeypatch
):
    monkeypatch.setattr(chain, "FORWARD_WAIT", 0.2)
    relays = Relays("b", XOR3)
    relay = relays.receive(header(saved, 1, "a"))
    taken = relays.claim(key_of())
    started = time.monotonic()
    piece = piece_of(saved, 1, "a")
    feed(relay, piece, frame=len(piece))  # its encoder never says: the status is "stored"
    assert 0.2 <= time.monotonic() - started < 5 and not relay.completed
    assert len(b"".join(bytes(v) for _, v in taken.frames())) == relay.size


def test_a_chain_that_starts_here_sends_the_own_piece_alone(saved, own_piece):
    own = own_piece(piece_of(saved, 1, "a"))
    assert b"".join(bytes(v) for v in summed_frames(None, own)) == piece_of(saved, 1, "a")
    own.close()


def test_a_sum_not_taken_on_in_time_fails_its_sender_and_a_later_one_is_refused(saved, monkeypatch):
    monkeypatch.setattr(chain, "CHAIN_WAIT", 0.1)
    relays = Relays("b", XOR3)
    relay = relays.receive(header(saved, 1, "a"))
    with pytest.raises(ChainError, match="relayed by 'b': not taken on within 0.1 s"):
        feed(relay, piece_of(saved, 1, "a"))
    relay.close()
    with pytest.raises(ChainRefused, match="'b' started its chain meanwhile"):
        relays.receive(header(saved, 1, "a"))
    assert relays.claim(key_of(), wait=0.01) is None


def test_a_sum_that_comes_after_its_node_waited_in_vain_is_refused(saved):
    relays = Relays("b", XOR3)
    assert relays.claim(key_of(), wait=0.05) is None  # b starts the chain from its own piece
    with pytest.raises(ChainRefused, match="stripe 0 .*: 'b' started its chain meanwhile"):
        relays.receive(header(saved, 1, "a"))
    relays.receive(header(saved, 2, "a"))  # another step's is taken


def test_a_sum_for_a_step_its_node_will_not_save_is_refused_at_once(saved):
    why = {1: "it holds no shard of the step (its newest is step 2)", 2: ""}
    relays = Relays("b", XOR3, why_not_add=lambda run, step: why[step])
    with pytest.raises(ChainRefused, match="'b' adds no piece to it now: it holds no shard of the"):
        relays.receive(header(saved, 1, "a"))  # its sender sends it to the holder instead
    assert relays.claim(key_of(), wait=5) is None  # refused: b starts its own chain at once
    relays.receive(header(saved, 2, "a"))


def test_a_sender_that_breaks_off_fails_the_forwarding(saved, own_piece):
    relays = Relays("b", XOR3)
    relay = relays.receive(header(saved, 1, "a"))
    taken = relays.claim(key_of())
    feed(relay, piece_of(saved, 1, "a")[:1000], commit=False)
    relay.close()  # the connection dropped
    frames = summed_frames(taken, own_piece(piece_of(saved, 1, "b")))
    next(frames)  # the frame that came
    with pytest.raises(ChainError, match="its sender failed after 1000 bytes"):
        next(frames)


def test_a_relay_whose_forwarding_failed_fails_its_sender(saved, monkeypatch):
    monkeypatch.setattr(chain, "WINDOW", 2)
    relays = Relays("b", XOR3)
    relay = relays.receive(header(saved, 1, "a"))
    relays.claim(key_of()).finish(False)
    with pytest.raises(ChainError, match="relayed by 'b': could not be sent on"):
        feed(relay, piece_of(saved, 1, "a"), frame=100)


@pytest.mark.parametrize(
    "node, change, says",
    [("a", {}, "sums are relayed by ['b'], not 'a'"),
     ("b", {"code": "rs:2+1"}, "this daemon keeps xor:3; only xor groups chain"),
     ("b", {"piece": 7}, "7 bytes of the piece of 'a'; their steps' sizes make "),
     ("b", {"origin": "b"}, "a sum comes from the data nodes before it, ['a']")],
)  # fmt: skip
def test_a_bad_sum_header_says_what_is_wrong(saved, node, change, says):
    relays = Relays(node, XOR3)
    bad = header(saved, 1, change.pop("origin", "a"), **change)
    with pytest.raises(ValueError) as raised:
        relays.receive(bad)
    assert says in str(raised.value)


def test_a_sum_is_taken_only_under_xor_and_a_piece_arriving_twice_is_refused(tmp_path, saved):
    rs = ParityStore(tmp_path / "rs", "c", Redundancy.parse("rs:2+1"), keep=2)
    b = header(saved, 1, "b", code="rs:2+1")
    b.upstream.append(header(saved, 1, "a").contributor)
    b.piece_size = max(b.piece_size, header(saved, 1, "a").piece_size)
    with pytest.raises(ValueError, match=r"the sum of \['a', 'b'\]'s pieces summed; only xor"):
        rs.receive(b)
    store = ParityStore(tmp_path / "xor", "c", XOR3, keep=2)
    arriving = store.receive(header(saved, 1, "a"))
    with pytest.raises(ParityError, match="the piece of 'a' arriving already"):
        store.receive(header(saved, 1, "a"))
    arriving.close()  # failed: the stripe is cleared and a takes it again
    contribute(store, saved, 1, "a")


def test_sums_arriving_at_once_are_bounded(saved, monkeypatch):
    monkeypatch.setattr(chain, "MAX_ARRIVING", 2)
    relays = Relays("b", XOR3)
    relays.receive(header(saved, 1, "a"))
    relays.receive(header(saved, 2, "a"))
    with pytest.raises(ValueError, match="2 sums are arriving at 'b' already; at most 2"):
        relays.receive(header(saved, 3, "a"))
    with pytest.raises(ValueError, match="a sum is arriving at 'b' already"):
        relays.receive(header(saved, 1, "a"))
    relays.claim(key_of(1))
    relays.receive(header(saved, 3, "a"))  # one was taken on: room for another


def test_a_chain_skips_only_members_taken_as_idle_at_an_earlier_step(tmp_path):
    encoder = Encoder(Holdings("a", tmp_path, keep=2), Peers("a", []), XOR3, "", tls=None,
                      bandwidth=None)  # fmt: skip
    encoder._note_idle(key_of(step=50), {"b"})  # b's piece of step 50 counted as zeros
    assert encoder._idle_member("run", 51, "b") and not encoder._idle_member("run", 51, "c")
    # a step not after it: the job went back to an older step, where b may save
    assert not encoder._idle_member("run", 50, "b") and not encoder._idle_member("run", 41, "b")
