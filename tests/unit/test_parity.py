"""A daemon's parity store (issue 21) without the network: contributions checked against
the stripe layout and their manifests, multiplied into the parity frame by frame,
complete with a record once every piece is in, cleared when one fails, kept for the
newest steps and sync steps; every refused header says why."""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest

from daemons import wait_for
from mtckpt import CheckpointManager, MemoryTier, _fastpath
from mtckpt.daemon.groups import piece_range
from mtckpt.daemon.parity import AlreadyHeld, ParityError, ParityStore
from mtckpt.daemon.spares import FREE_DIR
from mtckpt.daemon.stripes import StripeKey
from mtckpt.format import naming
from mtckpt.proto import mtckpt_pb2 as pb
from mtckpt.redundancy import Redundancy

GROUP = ["a", "b", "c"]  # xor:3: stripe 0 takes pieces of a and b, its parity is on c


@pytest.fixture
def saved(shm_dir):
    """``{(step, rank): (manifest bytes, data bytes)}`` of real saves, ranks of unequal size."""
    out = {}
    for rank in (0, 1):
        root = shm_dir / f"rank{rank}"  # each rank alone on its node
        with mock.patch.dict(os.environ, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}), \
                CheckpointManager("run", memory=MemoryTier(str(root), keep=10), rank=rank,
                                  world_size=2) as mgr:  # fmt: skip
            for step in range(1, 5):
                rng = np.random.default_rng(step * 10 + rank)
                mgr.save(step, {"w": rng.integers(0, 255, 3000 + 1000 * rank, np.uint8)}).wait()
        for step in range(1, 5):
            where = root / "run" / naming.step_dir(step)
            out[(step, rank)] = ((where / naming.manifest_file(rank)).read_bytes(),
                                 (where / naming.data_file(rank)).read_bytes())  # fmt: skip
    return out


def header(saved, step: int, origin: str, *, code="xor:3", group=GROUP, stripe=0,
           piece=None) -> pb.ContributeHeader:  # fmt: skip
    rank = GROUP.index(origin)
    manifest, data = saved[(step, rank)]
    size = piece_range(len(data), 2, rank)[1] if piece is None else piece
    return pb.ContributeHeader(
        stripe=pb.StripeId(run="run", step=step, code=code, group=group, stripe=stripe),
        contributor=pb.Contributor(origin=origin, manifests=[manifest]), piece_size=size,
    )  # fmt: skip


def contribute(store, saved, step: int, origin: str, commit: bool = True):
    contribution = store.receive(header(saved, step, origin))
    rank = GROUP.index(origin)
    data = saved[(step, rank)][1]
    offset, length = piece_range(len(data), 2, rank)
    contribution.region(0, length)[:] = data[offset : offset + length]
    contribution.accept(0, length)
    if commit:
        contribution.commit()
        contribution.close()
        if contribution.completed:  # as the daemon does once the sender has its status
            store.tidy(contribution.stripe.key)
    return contribution


def xor_of_pieces(saved, step: int) -> bytes:
    pieces = []
    for rank in (0, 1):
        data = saved[(step, rank)][1]
        offset, length = piece_range(len(data), 2, rank)
        pieces.append(np.frombuffer(data[offset : offset + length], np.uint8))
    expected = np.zeros(max(p.size for p in pieces), np.uint8)  # the shorter counts as zeros
    for piece in pieces:
        expected[: piece.size] ^= piece
    return expected.tobytes()


def spare_files(root) -> list:
    """The spare parity files ready (a file being made has a hidden name)."""
    return sorted((root / FREE_DIR).glob("spare-*"))


def test_a_stripe_is_the_xor_of_its_pieces_once_every_piece_is_in(tmp_path, saved):
    store = ParityStore(tmp_path, "c", Redundancy.parse("xor:3"), keep=2)
    assert not contribute(store, saved, 1, "a").completed  # its sender's status: stored
    (info,) = store.listing()
    assert not info.complete and [c.origin for c in info.contributors] == ["a"]
    assert contribute(store, saved, 1, "b").completed  # its sender's: the stripe complete
    (info,) = store.listing(manifests=True)
    assert info.complete and info.world_size == 2
    assert [c.manifests[0] for c in info.contributors] == [saved[(1, 0)][0], saved[(1, 1)][0]]
    stripe = store.complete(info.stripe)
    assert stripe.path.read_bytes() == xor_of_pieces(saved, 1)
    again = ParityStore(tmp_path, "c", Redundancy.parse("xor:3"), keep=2)  # a restarted daemon
    again.load()
    (reloaded,) = again.listing()
    assert reloaded.complete and again.complete(info.stripe).chunks == stripe.chunks


def test_a_chains_sum_checksums_each_chunk_of_the_parity_as_it_fills(tmp_path, saved):
    store = ParityStore(tmp_path, "c", Redundancy.parse("xor:3"), keep=2)
    summed = header(saved, 1, "b")  # b's piece is the longer one
    summed.upstream.append(header(saved, 1, "a").contributor)
    expected = xor_of_pieces(saved, 1)
    with mock.patch("mtckpt.daemon.parity.CHUNK_BYTES", 512):
        contribution = store.receive(summed)
        for offset in range(0, len(expected), 300):  # frames across the chunks' ends
            frame = expected[offset : offset + 300]
            contribution.region(offset, len(frame))[:] = frame
            contribution.accept(offset, len(frame))
        assert len(contribution.chunk_crcs) == len(expected) // 512  # each full chunk, filled
        contribution.commit()
        contribution.close()
    (info,) = store.listing()
    stripe = store.complete(info.stripe)
    parity = stripe.path.read_bytes()
    assert parity == expected and len(parity) % 512  # a partial last chunk
    crc32c = _fastpath.backend().crc32c
    assert stripe.chunks.chunk_crc32c == tuple(crc32c(parity[i : i + 512])
                                               for i in range(0, len(parity), 512))  # fmt: skip


def test_the_next_steps_stripe_starts_in_a_zeroed_spare_made_when_one_completed(tmp_path, saved):
    store = ParityStore(tmp_path, "c", Redundancy.parse("xor:3"), keep=2)
    contribute(store, saved, 1, "a")
    assert not spare_files(tmp_path)  # made once a stripe is complete, not before
    contribute(store, saved, 1, "b")
    (info,) = store.listing()
    (spare,) = wait_for(lambda: spare_files(tmp_path), 10, "a spare parity file")
    assert spare.stat().st_size == info.size and not any(spare.read_bytes())
    contribute(store, saved, 2, "a")
    assert spare.name not in {p.name for p in spare_files(tmp_path)}  # taken, not a new file
    contribute(store, saved, 2, "b")
    (_, step2) = sorted(store.listing(), key=lambda i: i.stripe.step)
    assert store.complete(step2.stripe).path.read_bytes() == xor_of_pieces(saved, 2)
    wait_for(lambda: spare_files(tmp_path), 10, "the next step's spare (made in the background)")
    store.spares.drop()
    assert not (tmp_path / FREE_DIR).exists()
    store.spares.close()


def test_no_spare_is_made_past_the_memory_budget(tmp_path, saved):
    asked = []
    store = ParityStore(tmp_path, "c", Redundancy.parse("xor:3"), keep=2,
                        fits=lambda size: asked.append(size) or False)  # fmt: skip
    contribute(store, saved, 1, "a")
    contribute(store, saved, 1, "b")
    wait_for(lambda: asked, 10, "the budget asked for a spare's room")
    (info,) = store.listing()
    assert asked == [info.size] and not spare_files(tmp_path)
    store.spares.close()


def test_a_contribution_that_fails_part_way_clears_the_stripe(tmp_path, saved):
    store = ParityStore(tmp_path, "c", Redundancy.parse("xor:3"), keep=2)
    contribute(store, saved, 1, "a")
    broken = contribute(store, saved, 1, "b", commit=False)
    broken.close()  # the connection dropped before the end
    (info,) = store.listing()
    assert not info.complete and not info.contributors
    with pytest.raises(ParityError, match="cleared meanwhile"):
        broken.accept(0, 1)


def piece_of(saved, step: int, origin: str) -> bytes:
    rank = GROUP.index(origin)
    data = saved[(step, rank)][1]
    offset, length = piece_range(len(data), 2, rank)
    return data[offset : offset + length]


def test_a_member_holding_nothing_of_the_step_counts_as_zeros(tmp_path, saved):
    store = ParityStore(tmp_path, "c", Redundancy.parse("xor:3"), keep=2)
    contribute(store, saved, 1, "a")
    assert store.stalled(after=60) == []  # not waited long enough
    ((key, generation, missing, _),) = store.stalled(after=0)
    assert missing == ["b"]
    assert not store.absent(key, generation + 1, "b")  # of a stripe cleared meanwhile
    assert store.absent(key, generation, "b")
    (info,) = store.listing()
    assert info.complete and info.world_size == 2  # the world of the pieces that are in
    assert [(c.origin, list(c.ranks)) for c in info.contributors] == [("a", [0]), ("b", [])]
    assert store.complete(info.stripe).path.read_bytes() == piece_of(saved, 1, "a")
    assert store.stalled(after=0) == []
    again = ParityStore(tmp_path, "c", Redundancy.parse("xor:3"), keep=2)  # a restarted daemon
    again.load()
    (reloaded,) = again.listing()
    assert reloaded.complete and [list(c.ranks) for c in reloaded.contributors] == [[0], []]


def test_a_late_save_of_a_member_counted_as_zeros_replaces_the_stripe(tmp_path, saved):
    store = ParityStore(tmp_path, "c", Redundancy.parse("xor:3"), keep=2)
    contribute(store, saved, 1, "a")
    ((key, generation, _, _),) = store.stalled(after=0)
    store.absent(key, generation, "b")
    assert not contribute(store, saved, 1, "b").completed  # the stripe starts again
    (info,) = store.listing()
    assert not info.complete and [c.origin for c in info.contributors] == ["b"]
    assert store.stalled(after=0)[0][2] == ["a"]  # a sends its piece again
    assert contribute(store, saved, 1, "a").completed
    assert store.complete(info.stripe).path.read_bytes() == xor_of_pieces(saved, 1)


def test_the_same_piece_twice_is_refused_as_held(tmp_path, saved):
    store = ParityStore(tmp_path, "c", Redundancy.parse("xor:3"), keep=2)
    contribute(store, saved, 1, "a")
    with pytest.raises(AlreadyHeld, match="the piece of 'a' is here already"):
        store.receive(header(saved, 1, "a"))


def test_the_newest_steps_and_sync_steps_are_kept(tmp_path, saved):
    stride = [1]
    store = ParityStore(tmp_path, "c", Redundancy.parse("xor:3"), keep=1,
                        stride=lambda: stride[0])  # fmt: skip
    stride[0] = 2  # a daemon lags: steps 2 and 4 are sync steps
    for step in range(1, 5):
        contribute(store, saved, step, "a")
        contribute(store, saved, step, "b")
    assert sorted(i.stripe.step for i in store.listing()) == [2, 4]
    assert sorted(p.name for p in (tmp_path / ".parity" / "run").iterdir()) == [
        naming.step_dir(2), naming.step_dir(4)]  # fmt: skip


@pytest.mark.parametrize(
    "node, change, says",
    [("a", {}, "its parities are held by ['c'], not 'a'"),
     ("c", {"origin": "c"}, "pieces of ['c']; expected distinct nodes of ['a', 'b']"),
     ("c", {"piece": 7}, "7 bytes of the piece of 'a'; their steps' sizes make "),
     ("c", {"code": "xor:4"}, "a group of 3 distinct node(s)"),
     ("c", {"code": "rs:2+1"}, "this daemon keeps xor:3, not rs:2+1"),
     ("c", {"code": "mirror"}, "expected 'replicas:R'"),
     ("c", {"group": ["a", "a", "c"]}, "a group of 3 distinct node(s)"),
     ("c", {"stripe": 3}, "stripe 3 of a group of 3"),
     ("c", {"step": 2}, "manifests of ranks [0] (in order, of run 'run' step 2)")],
)  # fmt: skip
def test_a_bad_contribution_header_says_what_is_wrong(tmp_path, saved, node, change, says):
    store = ParityStore(tmp_path, node, Redundancy.parse("xor:3"), keep=2)
    origin = change.pop("origin", "a")
    step = change.pop("step", None)
    bad = header(saved, 1, origin if origin != "c" else "a", **change)
    if origin == "c":
        bad.contributor.origin = "c"
    if step is not None:
        bad.stripe.step = step
    with pytest.raises(ValueError) as raised:
        store.receive(bad)
    assert says in str(raised.value)


def test_a_sum_of_more_pieces_than_the_stripe_has_is_refused(tmp_path, saved):
    store = ParityStore(tmp_path, "c", Redundancy.parse("xor:3"), keep=2)
    bad = header(saved, 1, "b")
    bad.upstream.extend([header(saved, 1, "a").contributor] * 2)
    with pytest.raises(ValueError, match="3 pieces summed; the stripe has 2"):
        store.receive(bad)


def test_a_stripe_key_names_its_group():
    key = StripeKey.checked(pb.StripeId(run="run", step=3, code="xor:3", group=GROUP, stripe=1))
    assert str(key) == "run 'run' step 3 stripe 1 of the xor:3 group a, b, c"
