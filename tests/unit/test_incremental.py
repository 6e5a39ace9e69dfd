"""Incremental steps without a network (issue 22): each chunk compared byte for byte with
the previous step's, the manifest's record of what changed and since when, a delta's
record of where every chunk lies (every bad record named), and retention keeping the
steps a kept step's chunks lie in. Object tier through fsspec's file://."""

from __future__ import annotations

import json
import os
from unittest import mock

import numpy as np
import pytest

from mtckpt import (
    CheckpointManager,
    CorruptCheckpointError,
    MemoryTier,
    ObjectTier,
    catalog,
    incremental,
    retention,
)
from mtckpt.errors import MtckptError
from mtckpt.format import naming
from mtckpt.format.encoding import StoredFile
from mtckpt.format.manifest import Changes, RankManifest
from mtckpt.restore import read as restore
from mtckpt.tiers.memory import MemoryStorage
from mtckpt.tiers.object import ObjectStorage
from states import assert_same_state

RUN = "inc"
MIB = 1 << 20
CHUNK = 64 << 10


def frozen_state(step: int, changing: int = 1) -> dict:
    """8 MiB frozen, then ``changing`` chunks' worth of bytes that change every step."""
    frozen = np.random.default_rng(0).integers(0, 255, 8 * MIB, dtype=np.uint8)
    moving = np.random.default_rng(step).integers(0, 255, changing * CHUNK, dtype=np.uint8)
    return {"frozen": frozen, "moving": moving, "step": step}


def manager(memory, url, **remote) -> CheckpointManager:
    with mock.patch.dict(os.environ, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}):
        remote = ObjectTier(url=url, uploader="thread", **remote)
        return CheckpointManager(RUN, rank=0, world_size=1, chunk_size=CHUNK,
                                 memory=MemoryTier(str(memory), keep=2), remote=remote)  # fmt: skip


def saved(tmp_path, shm_dir, steps, keep: int = 5, **remote) -> str:
    """The URL of a file:// object tier a manager saved ``frozen_state`` steps to."""
    url = f"file://{tmp_path}/remote"
    with manager(shm_dir, url, keep=keep, **remote) as mgr:
        for step in steps:
            mgr.save(step, frozen_state(step)).wait()
    return url


def flip(tmp_path, step: int, offset: int) -> None:
    """Flip a bit of the data object of ``step`` on the object tier."""
    path = tmp_path / "remote" / RUN / naming.step_dir(step) / naming.data_file(0)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


def stored(storage, step: int) -> StoredFile:
    return restore.read_manifest(storage, RUN, step, 0).stored


def test_each_step_records_since_when_each_chunk_is_unchanged(tmp_path, shm_dir):
    saved(tmp_path, shm_dir, (1, 2, 3))
    memory = restore.read_manifest(MemoryStorage(shm_dir), RUN, 3, 0)
    two = restore.read_manifest(MemoryStorage(shm_dir), RUN, 2, 0)
    assert memory.changes.lineage == two.changes.lineage
    since = memory.changes.since
    frozen_chunks = [i for i, s in enumerate(since) if s == 1]
    assert len(frozen_chunks) >= 8 * MIB // CHUNK - 2  # the header's chunk may change
    assert since[-1] == 3  # the moving bytes and the step counter are at the end
    assert set(two.changes.since) <= {1, 2}


def test_the_object_tier_gets_only_changed_chunks_and_reads_every_step_whole(tmp_path, shm_dir):
    url = saved(tmp_path, shm_dir, (1, 2, 3))
    storage = ObjectStorage(url)
    full = stored(storage, 1)
    assert full.encoding == "identity"
    for step in (2, 3):
        delta = stored(storage, step)
        assert delta.encoding == "delta" and delta.size <= 3 * CHUNK
        assert set(delta.steps) <= {1, step - 1, step} and delta.depth == step - 1
        info = catalog.step_info(storage, RUN, step)
        assert info.status == catalog.COMPLETE and 1 in info.references
        assert catalog.verify(storage, RUN, step)[1] == []
    with manager(shm_dir / "fresh", url) as mgr:  # node memory gone
        for step in (1, 2, 3):
            restored_step, restored = mgr.restore(step=step)
            assert restored_step == step
            assert_same_state(restored, frozen_state(step))


def test_a_state_that_changes_completely_goes_up_whole(tmp_path, shm_dir):
    url = f"file://{tmp_path}/remote"
    with manager(shm_dir, url, keep=5) as mgr:
        for step in (1, 2):
            rng = np.random.default_rng(step)
            mgr.save(step, {"w": rng.integers(0, 255, 2 * MIB, dtype=np.uint8)}).wait()
    assert stored(ObjectStorage(url), 2).encoding == "identity"


def test_a_whole_step_every_full_every_steps_and_retention_keeps_what_kept_steps_use(
    tmp_path, shm_dir
):
    url = f"file://{tmp_path}/remote"
    with manager(shm_dir, url, keep=1, full_every=3) as mgr:
        for step in range(1, 7):
            mgr.save(step, frozen_state(step)).wait()
            mgr.wait()  # retention too
            storage = ObjectStorage(url)
            kept = storage.steps(RUN)
            if step == 3:  # 3 refers to 1 (its frozen chunks); nothing changed at 2 lasted
                assert kept == [1, 3]
    assert [stored(storage, s).encoding for s in (4, 6)] == ["identity", "delta"]
    assert storage.steps(RUN) == [4, 6]  # 1 and 3 gone once nothing kept refers to them
    plan = retention.plan(storage, RUN, keep=1)  # the operator's gc agrees
    assert plan == []


def test_a_damaged_shared_chunk_is_found_in_every_step_that_uses_it(tmp_path, shm_dir):
    url = saved(tmp_path, shm_dir, range(1, 5), full_every=3)
    storage = ObjectStorage(url)
    flip(tmp_path, 1, 4 * MIB)  # a frozen chunk, in step 1's object only
    chunk = 4 * MIB // CHUNK
    for step in (2, 3):
        problems = catalog.verify(storage, RUN, step)[1]
        assert len(problems) == 1 and f"chunk {chunk} (held by step 1)" in problems[0]
    assert catalog.verify(storage, RUN, 4)[1] == []  # whole again
    with manager(shm_dir / "fresh", url) as mgr:
        assert mgr.restore()[0] == 4
        with pytest.raises(CorruptCheckpointError, match="held by step 1"):
            mgr.restore(step=3)


def test_restore_falls_back_past_steps_a_damaged_shared_block_breaks(tmp_path, shm_dir):
    url = saved(tmp_path, shm_dir, range(1, 6), full_every=3)  # whole at 1 and 4
    flip(tmp_path, 4, 4 * MIB)  # a frozen block, held by 4 for 5 too
    with manager(shm_dir / "fresh", url) as mgr:
        step, restored = mgr.restore()  # 5 and 4 are damaged, 3 is whole (1, 2, 3)
    assert step == 3
    assert_same_state(restored, frozen_state(3))


def test_a_different_writer_does_not_refer_to_another_writers_steps(tmp_path, shm_dir):
    url = saved(tmp_path, shm_dir, (1,))
    with manager(shm_dir / "other", url, keep=5) as mgr:  # a new process: a new lineage
        mgr.save(2, frozen_state(2)).wait()
        mgr.save(3, frozen_state(3)).wait()
    storage = ObjectStorage(url)
    assert stored(storage, 2).encoding == "identity"
    assert set(stored(storage, 3).steps) <= {2, 3}


def manifest_of(tmp_path, shm_dir) -> tuple[dict, RankManifest]:
    url = saved(tmp_path, shm_dir, (1, 2))
    raw = ObjectStorage(url).read_bytes(RUN, 2, naming.manifest_file(0))
    return json.loads(raw), RankManifest.from_json(raw, "test")


def reparse(body: dict):
    body = dict(body)
    body.pop("manifest_crc32c")
    from mtckpt.format.manifest import _self_crc

    body["manifest_crc32c"] = _self_crc(body)
    return RankManifest.from_json(json.dumps(body).encode(), "the manifest")


def own_run(d: dict) -> list:
    return next(run for run in d["stored"]["blocks"] if run[1] == 2)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda d: d["stored"]["blocks"].pop(), "a delta places"),
        (lambda d: d["stored"]["blocks"][0].__setitem__(1, 9), "refers to a later step"),
        (lambda d: own_run(d).__setitem__(2, 1), "at offset 1, expected 0"),
        (lambda d: d["stored"]["blocks"].__setitem__(0, 5), "must hold \\[count, step, offset\\]"),
        (lambda d: d["stored"].__setitem__("size", 1), "holds"),
        (lambda d: d["stored"].__setitem__("depth", -1), "stored.depth must be an int"),
        (lambda d: d["stored"].__setitem__("block_size", 3), "in blocks of 3 bytes"),
        (lambda d: d["changes"]["since"].pop(), "changes name"),
        (lambda d: d["changes"]["since"][0].__setitem__(1, 7), "changes name"),
        (lambda d: d["changes"]["since"].__setitem__(0, 5), "changes.since must hold"),
        (lambda d: d["changes"].__setitem__("lineage", ""), "changes.lineage"),
        (lambda d: d["stored"].__setitem__("encoding", "xdelta"), "unknown to this mtckpt"),
    ],
)
def test_a_bad_incremental_record_is_named(tmp_path, shm_dir, change, says):
    body, _ = manifest_of(tmp_path, shm_dir)
    change(body["data_file"])
    with pytest.raises(MtckptError, match=says) as caught:
        reparse(body)
    assert str(caught.value).startswith("the manifest: ")


def test_change_tracker_compares_with_the_previous_committed_step_only():
    files = {}

    def data_of(step: int) -> bytes:
        if step not in files:
            raise FileNotFoundError(step)
        return files[step]

    tracker = incremental.ChangeTracker(data_of, 4, 1)
    files[1] = b"aaaabbbbcc"
    assert tracker.compare(1, files[1]).since == (1, 1, 1)
    files[2] = b"aaaaXbbbcc"
    assert tracker.compare(2, files[2]).since == (1, 2, 1)
    files[3] = b"aaaaXbbbc"  # the last chunk shorter: changed
    assert tracker.compare(3, files[3]).since == (1, 2, 3)
    tracker.forget(3)  # 3 never committed: 4 is compared with nothing
    files[4] = files[3]
    assert tracker.compare(4, files[4]).since == (4, 4, 4)
    del files[4]  # gone from node memory: 5 is whole
    assert tracker.compare(5, b"aaaa").since == (5,)
    files[5] = b"aaaa"
    lineage = tracker.lineage
    assert tracker.compare(3, b"aaaa").since == (3,)  # taken back: a new lineage
    assert tracker.lineage != lineage
    assert tracker.block == 4  # chunks of 4 bytes: not a multiple of BLOCK_BYTES


def test_changes_and_deltas_are_kept_as_runs():
    changes = Changes("x", 4, (1, 1, 1, 2, 2, 1))
    assert changes.to_json()["since"] == [[3, 1], [2, 2], [1, 1]]
    assert Changes.from_json(changes.to_json(), 2, 24, 8, "here") == changes
    delta = StoredFile("delta", 8, 0, depth=1, block_size=4, steps=(1, 1, 2, 2, 1),
                       offsets=(0, 4, 0, 4, 16))  # fmt: skip
    assert delta.to_json()["blocks"] == [[2, 1, 0], [2, 2, 0], [1, 1, 16]]
    assert StoredFile.from_json(delta.to_json(), 20, 4, "here", 2) == delta


def test_an_incremental_step_exports_as_a_whole_safetensors_file(tmp_path, shm_dir):
    from safetensors.numpy import load_file

    from mtckpt import export

    storage = ObjectStorage(saved(tmp_path, shm_dir, (1, 2, 3)))
    assert stored(storage, 3).encoding == "delta"
    _, manifest, values = export.read_step([storage], RUN, 3)
    export.write("safetensors", manifest, values, tmp_path / "step3.safetensors")
    exported = load_file(str(tmp_path / "step3.safetensors"))
    for key in ("frozen", "moving"):
        assert np.array_equal(exported[key], frozen_state(3)[key])
