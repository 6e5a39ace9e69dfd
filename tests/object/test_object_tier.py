"""The object tier against a real S3 endpoint (moto_server over HTTP through s3fs), and
through fsspec's file:// and memory://: flush in the background, COMMIT last, retention,
restore after the faster tiers are gone, damaged objects, an endpoint that goes away."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from unittest import mock

import numpy as np
import pytest
import zstandard

from mtckpt import (
    CheckpointManager,
    ChecksumMismatchError,
    ConfigError,
    CorruptCheckpointError,
    LocalTier,
    MemoryTier,
    ObjectTier,
    TierError,
    checksum,
    tiercopy,
)
from mtckpt.format import naming
from mtckpt.restore import read as restore
from mtckpt.tiers import object as object_tier
from mtckpt.tiers.local import LocalStorage
from mtckpt.tiers.object import ObjectStorage
from states import assert_same_state

RUN = "obj"


def state(step: int, nbytes: int = 3 << 20) -> dict:
    rng = np.random.default_rng(step)
    return {"w": rng.integers(0, 255, nbytes, dtype=np.uint8),
            "b": rng.standard_normal(1000).astype(np.float32), "step": step}  # fmt: skip


def manager(memory_dir, remote: ObjectTier, rank: int = 0, world: int = 1) -> CheckpointManager:
    with mock.patch.dict(os.environ, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}):
        memory = MemoryTier(str(memory_dir), keep=2)
        return CheckpointManager(RUN, rank=rank, world_size=world, memory=memory, remote=remote)


def s3_tier(moto, bucket: str, **kwargs) -> ObjectTier:
    return ObjectTier(url=f"s3://{bucket}/ckpt", storage_options=moto.options(), **kwargs)


def test_steps_flushed_to_s3_restore_after_node_memory_is_gone(moto, bucket, shm_dir, caplog):
    remote = s3_tier(moto, bucket, keep=3)
    with manager(shm_dir / "a", remote) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state(step)).wait()
        assert mgr.steps()["remote"] == [1, 2, 3]
    storage = ObjectStorage(remote.url, storage_options=moto.options())
    assert storage.files(RUN, 3) == sorted(
        [naming.COMMIT, naming.data_file(0), naming.manifest_file(0)]
    )
    caplog.set_level(logging.INFO, logger="mtckpt")
    with manager(shm_dir / "fresh", remote) as mgr:  # a new node: nothing in memory
        step, restored = mgr.restore()
    assert step == 3
    assert_same_state(restored, state(3))
    assert "restored step 3 from the remote tier" in caplog.text


@pytest.mark.parametrize("compression", [None, "zstd"])  # zstd: parts sent as frames come
def test_large_files_go_up_as_multipart_uploads(moto, bucket, shm_dir, compression):
    remote = s3_tier(moto, bucket, part_size=5 << 20, concurrency=3, compression=compression)
    with manager(shm_dir / "a", remote) as mgr:
        mgr.save(1, state(1, 13 << 20)).wait()
    storage = ObjectStorage(remote.url, storage_options=moto.options())
    info = storage.fs.info(storage.path(RUN, 1, naming.data_file(0)))
    assert info["ETag"].strip('"').endswith("-3")  # S3's mark of an object made of 3 parts
    with manager(shm_dir / "fresh", remote) as mgr:
        assert_same_state(mgr.restore()[1], state(1, 13 << 20))


def test_retention_keeps_the_newest_and_the_long_term_steps(moto, bucket, shm_dir):
    remote = s3_tier(moto, bucket, keep=2, keep_every=2, part_size=5 << 20)
    with manager(shm_dir / "a", remote) as mgr:
        for step in range(1, 7):
            mgr.save(step, state(step, 1 << 20)).wait()
        assert mgr.steps()["remote"] == [2, 4, 5, 6]
    storage = ObjectStorage(remote.url, storage_options=moto.options())
    assert storage.steps(RUN) == [2, 4, 5, 6]  # nothing left of the others


def test_one_listing_names_every_steps_files_as_a_listing_per_step_does(moto, bucket, shm_dir):
    remote = s3_tier(moto, bucket, keep=3)
    with manager(shm_dir / "a", remote) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state(step, 1 << 16)).wait()
    storage = ObjectStorage(remote.url, storage_options=moto.options())
    storage.write_bytes(RUN, 4, naming.manifest_file(0), b"{}")  # a step not committed
    storage.write_bytes("other", 1, naming.COMMIT, b"{}")  # another run: not listed
    listing = storage.files_by_step(RUN)
    assert listing == {step: storage.files(RUN, step) for step in storage.steps(RUN)}
    assert sorted(listing) == [1, 2, 3, 4] and naming.COMMIT not in listing[4]
    assert naming.COMMIT in listing[3] and naming.manifest_file(0) in listing[3]
    assert storage.files_by_step("none-yet") == {}


def test_commit_waits_for_every_rank_of_the_world(moto, bucket, shm_dir):
    remote = s3_tier(moto, bucket)
    storage = ObjectStorage(remote.url, storage_options=moto.options())
    with manager(shm_dir / "node0", remote, rank=0, world=2) as rank0:
        rank0.save(1, state(1)).wait()
        assert storage.files(RUN, 1) == sorted([naming.data_file(0), naming.manifest_file(0)])
        assert rank0.steps()["remote"] == []
        with manager(shm_dir / "node1", remote, rank=1, world=2) as rank1:
            rank1.save(1, state(1)).wait()
            assert naming.COMMIT in storage.files(RUN, 1)  # written by the last rank
            assert rank0.steps()["remote"] == rank1.steps()["remote"] == [1]


@pytest.mark.parametrize("compression", [None, "zstd"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_object_is_detected_and_an_older_step_used(moto, bucket, shm_dir, damage,
                                                              compression, caplog):  # fmt: skip
    remote = s3_tier(moto, bucket, compression=compression)
    with manager(shm_dir / "a", remote) as mgr:
        for step in (1, 2):
            mgr.save(step, state(step)).wait()
    storage = ObjectStorage(remote.url, storage_options=moto.options())
    path = storage.path(RUN, 2, naming.data_file(0))
    data = bytearray(storage.fs.cat_file(path))
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[len(data) - 1000 :]
    storage.fs.pipe_file(path, bytes(data))
    with manager(shm_dir / "fresh", remote) as mgr:
        step, restored = mgr.restore()
    assert step == 1
    assert_same_state(restored, state(1))
    assert "remote tier" in caplog.text and "step 2" in caplog.text


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_damaged_object_leaves_the_target_untouched(moto, bucket, shm_dir, compression):
    """Pieces fetched one at a time, in file order: the damage is in the last one, after
    the others verified; none of their bytes lands in the target."""
    remote = s3_tier(moto, bucket, compression=compression, part_size=5 << 20, concurrency=1)
    with manager(shm_dir / "a", remote) as mgr:
        mgr.save(1, state(1, 13 << 20)).wait()
    storage = ObjectStorage(remote.url, storage_options=moto.options())
    path = storage.path(RUN, 1, naming.data_file(0))
    data = bytearray(storage.fs.cat_file(path))
    data[-3000] ^= 0x01
    storage.fs.pipe_file(path, bytes(data))
    target = {"w": np.zeros(13 << 20, np.uint8), "b": np.full(1000, 3.0, np.float32), "step": 0}
    with manager(shm_dir / "fresh", remote) as mgr, pytest.raises(CorruptCheckpointError) as info:
        mgr.restore(target)
    assert "remote tier" in str(info.value) and "step 1" in str(info.value)
    assert not target["w"].any()
    assert target["b"].tobytes() == np.full(1000, 3.0, np.float32).tobytes()
    with manager(shm_dir / "b", remote) as mgr:  # a good copy restores into the same target
        mgr.save(2, state(2, 13 << 20)).wait()
    with manager(shm_dir / "fresh2", remote) as mgr:
        assert mgr.restore(target)[0] == 2
    assert_same_state(target, state(2, 13 << 20) | {"step": 0})


def test_parts_are_cut_at_part_size_across_buffers():
    chunks = [b"a" * 3, b"b" * 10, b"", b"c" * 2, b"d" * 4]
    parts = [bytes(p) for p in object_tier._parts(chunks, 4)]
    assert parts == [b"aaab", b"bbbb", b"bbbb", b"bccd", b"ddd"]
    assert [bytes(p) for p in object_tier._parts([b"x" * 8], 4)] == [b"xxxx", b"xxxx"]
    assert list(object_tier._parts([], 4)) == []


def compressible_state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"w": np.arange(13 << 20, dtype=np.uint8) % (step + 7),  # compresses well
            "noise": rng.integers(0, 255, 1 << 20, dtype=np.uint8), "step": step}  # fmt: skip


def test_zstd_frames_round_trip_and_any_zstd_reads_the_object(moto, bucket, shm_dir, tmp_path):
    remote = s3_tier(moto, bucket, compression="zstd", compression_level=5,
                     part_size=5 << 20, concurrency=3)  # fmt: skip
    with manager(shm_dir / "a", remote) as mgr:
        for step in (1, 2):
            mgr.save(step, compressible_state(step)).wait()
        raw = mgr._tiers[0][1].read_bytes(RUN, 2, naming.data_file(0))
    storage = ObjectStorage(remote.url, storage_options=moto.options())
    manifest = restore.read_manifest(storage, RUN, 2, 0)
    stored = storage.fs.cat_file(storage.path(RUN, 2, naming.data_file(0)))
    assert manifest.stored.encoding == "zstd" and manifest.stored.level == 5
    assert len(stored) == manifest.stored.size < len(raw) // 3
    assert checksum.crc32c(stored) == manifest.stored.crc32c
    assert len(manifest.stored.frames) == -(-len(raw) // manifest.stored.frame_size) > 1
    plain = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(stored)
    assert plain == raw  # the stored object is one zstd stream of the safetensors file
    with manager(shm_dir / "fresh", remote) as mgr:  # ranged GETs of frames, in parallel
        step, restored = mgr.restore()
    assert step == 2
    assert_same_state(restored, compressible_state(2))
    local = LocalStorage(tmp_path / "local")  # a whole-file copy back to a node tier
    tiercopy.copy_shard(storage, local, RUN, 2, 0)
    assert local.read_bytes(RUN, 2, naming.data_file(0)) == raw
    assert restore.read_manifest(local, RUN, 2, 0).stored is None


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_partial_restore_fetches_only_the_pieces_it_needs(moto, bucket, shm_dir, compression):
    remote = s3_tier(moto, bucket, compression=compression, part_size=5 << 20)
    with manager(shm_dir / "a", remote) as mgr:
        mgr.save(1, state(1, 13 << 20)).wait()
    fetched = []
    read_range = ObjectStorage.read_range

    def counting(self, run, step, name, start, end):
        fetched.append(end - start)
        return read_range(self, run, step, name, start, end)

    target = {"b": np.zeros(1000, np.float32)}  # 4 kB of a 13 MiB file
    with mock.patch.object(ObjectStorage, "read_range", counting):
        with manager(shm_dir / "fresh", remote) as mgr:
            mgr.restore(target, strict=False)
    assert_same_state(target["b"], state(1, 13 << 20)["b"])
    manifest = restore.read_manifest(ObjectStorage(remote.url, storage_options=moto.options()),
                                     RUN, 1, 0)  # fmt: skip
    assert len(fetched) == 1 and fetched[0] < manifest.stored.size * 2 / 3  # one piece of 2 or 3


def test_the_stored_bytes_crc32c_is_checked_on_whole_file_reads(moto, bucket, shm_dir, tmp_path):
    remote = s3_tier(moto, bucket)
    with manager(shm_dir / "a", remote) as mgr:
        mgr.save(1, state(1)).wait()
    storage = ObjectStorage(remote.url, storage_options=moto.options())
    path = storage.path(RUN, 1, naming.data_file(0))
    data = bytearray(storage.fs.cat_file(path))
    data[9] ^= 0x10
    storage.fs.pipe_file(path, bytes(data))
    with pytest.raises(ChecksumMismatchError, match="the stored bytes have crc32c"):
        tiercopy.copy_shard(storage, LocalStorage(tmp_path), RUN, 1, 0)
    assert LocalStorage(tmp_path).files(RUN, 1) == []


def test_a_restore_from_the_object_tier_can_populate_the_node_tiers(moto, bucket, shm_dir,
                                                                     tmp_path, caplog):  # fmt: skip
    remote = s3_tier(moto, bucket, compression="zstd")
    with manager(shm_dir / "a", remote) as mgr:
        for step in (1, 2):
            mgr.save(step, state(step)).wait()
    caplog.set_level(logging.INFO, logger="mtckpt")

    def node_manager() -> CheckpointManager:  # a new node: empty memory and disk
        memory = MemoryTier(str(shm_dir / "fresh"), keep=2)
        local = LocalTier(str(tmp_path / "local"), keep=2)
        return CheckpointManager(RUN, rank=0, world_size=1, memory=memory, local=local,
                                 remote=remote)  # fmt: skip

    with node_manager() as mgr:
        step, restored = mgr.restore(populate=True)
        mgr.wait()
        assert mgr.steps() == {"memory": [2], "local": [2], "remote": [1, 2]}
    assert "restored step 2 from the remote tier" in caplog.text
    assert_same_state(restored, state(2))
    caplog.clear()
    with node_manager() as mgr:  # the next restart: from node memory
        step, restored = mgr.restore()
    assert "restored step 2 from the memory tier" in caplog.text
    assert_same_state(restored, state(2))


def test_unfinished_uploads_of_a_killed_writer_are_aborted(moto, bucket, shm_dir):
    storage = ObjectStorage(f"s3://{bucket}/ckpt", storage_options=moto.options())
    mine, theirs = (storage.path(RUN, 5, naming.data_file(r)).split("/", 1)[1] for r in (0, 1))
    for key in (mine, theirs):  # what a writer killed mid-upload leaves
        storage.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)

    def unfinished() -> list[str]:
        listing = storage.fs.call_s3("list_multipart_uploads", Bucket=bucket)
        return sorted(upload["Key"] for upload in listing.get("Uploads", []))

    # moto dates every upload in 2010: the age limit is moved instead of the clock.
    with mock.patch("mtckpt.tiers.object.STALE_UPLOAD_SECONDS", 1e12):
        manager(shm_dir / "a", s3_tier(moto, bucket)).close()
    assert unfinished() == sorted([mine, theirs])  # young: perhaps still under way
    with mock.patch("mtckpt.tiers.object.STALE_UPLOAD_SECONDS", 0):
        manager(shm_dir / "b", s3_tier(moto, bucket)).close()  # rank 0 aborts its own
    assert unfinished() == [theirs]


def test_a_bucket_that_does_not_exist_is_a_clear_error(moto, shm_dir):
    remote = ObjectTier(url="s3://no-such-bucket/ckpt", storage_options=moto.options())
    with pytest.raises(ConfigError, match="the bucket 'no-such-bucket' does not exist"):
        manager(shm_dir / "a", remote)


def test_an_endpoint_gone_mid_flush_stops_nothing_and_flushing_resumes(own_moto, shm_dir,
                                                                       caplog):  # fmt: skip
    bucket = own_moto.make_bucket("resume")
    remote = s3_tier(own_moto, bucket, part_size=5 << 20, concurrency=1, retries=1)
    fast_failing = {**remote.storage_options, "config_kwargs": {"connect_timeout": 2,
                    "read_timeout": 10, "retries": {"max_attempts": 1}}}  # fmt: skip
    remote = dataclasses.replace(remote, storage_options=fast_failing)
    with manager(shm_dir / "a", remote) as mgr:
        mgr.save(1, state(1)).wait()
        handle = mgr.save(2, state(2, 40 << 20))
        handle.wait("memory")
        time.sleep(0.3)  # the upload of step 2 has begun
        own_moto.stop()
        with pytest.raises(TierError, match="remote tier"):
            handle.wait("remote")
        handle = mgr.save(3, state(3))
        handle.wait("memory")  # training goes on: memory still takes steps
        assert mgr.steps()["memory"][-1] == 3
        with pytest.raises(TierError, match="remote tier"):
            handle.wait("remote")
        own_moto.start()  # the endpoint is back (moto keeps nothing: a new bucket)
        own_moto.make_bucket("resume")
        mgr.save(4, state(4)).wait()
        assert mgr.steps()["remote"] == [4]
    with manager(shm_dir / "fresh", remote) as mgr:
        step, restored = mgr.restore()
    assert step == 4
    assert_same_state(restored, state(4))


@pytest.mark.parametrize("backlog", ["newest", "queue"])
def test_the_backlog_policy_when_steps_come_faster_than_flushes(backlog, moto, bucket, shm_dir,
                                                                caplog):  # fmt: skip
    remote = s3_tier(moto, bucket, keep=10, backlog=backlog)
    with mock.patch.dict(os.environ, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}):
        memory = MemoryTier(str(shm_dir / "a"), keep=1)
        with CheckpointManager(RUN, rank=0, world_size=1, memory=memory, remote=remote) as mgr:
            handles = [mgr.save(step, state(step, 8 << 20)) for step in range(1, 7)]
            mgr.wait()
            flushed = mgr.steps()["remote"]
    skipped = [h.step for h in handles if "remote" in h.skipped]
    assert sorted(flushed + skipped) == [1, 2, 3, 4, 5, 6] and 6 in flushed
    if backlog == "queue":
        assert skipped == [] and "skipping step" not in caplog.text
    else:  # six saves of 8 MiB in a row outrun their uploads (moto: about 45 MiB/s)
        assert skipped and all(f"skipping step {s}" in caplog.text for s in skipped)


@pytest.mark.parametrize("scheme,uploader", [("file", "auto"), ("file", "thread"),
                                             ("memory", "auto")])  # fmt: skip
def test_any_fsspec_url(scheme, uploader, tmp_path, shm_dir):
    where = f"file://{tmp_path}/ckpt" if scheme == "file" else f"memory://mt-{uuid.uuid4().hex}"
    remote = ObjectTier(url=where, uploader=uploader)
    with manager(shm_dir / "a", remote) as mgr:
        for step in (1, 2):
            mgr.save(step, state(step)).wait()
    with manager(shm_dir / "fresh", remote) as mgr:
        step, restored = mgr.restore()
    assert step == 2
    assert_same_state(restored, state(2))
