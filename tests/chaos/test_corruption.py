"""A flipped byte, a truncated or missing file in any tier is detected; restore falls back to
another tier or an older step, says so, and returns exactly what that step saved."""

import json
import logging
import os

import pytest

from mtckpt import (
    CheckpointManager,
    ChecksumMismatchError,
    CorruptCheckpointError,
    FormatVersionError,
    LocalTier,
    MemoryTier,
)
from mtckpt.format.manifest import _self_crc
from states import assert_same_state, flip_byte, make_state

pytestmark = pytest.mark.usefixtures("backend")


@pytest.fixture
def saved(shm_dir, tmp_path, monkeypatch):
    """Steps 1 and 2 committed in both tiers; returns a function giving a manager."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    memory = MemoryTier(str(shm_dir), keep=2)
    local = LocalTier(str(tmp_path / "local"), keep=2)

    def open_manager():
        return CheckpointManager("exp", memory, local, chunk_size=64 * 1024)

    with open_manager() as mgr:
        mgr.save(1, make_state(1, scale=8)).wait()
        mgr.save(2, make_state(2, scale=8)).wait()
    open_manager.paths = {
        tier: os.path.join(cfg.path, "exp") for tier, cfg in (("memory", memory), ("local", local))
    }
    return open_manager


def file_of(saved, tier, step, name="rank-00000.safetensors"):
    return os.path.join(saved.paths[tier], f"step-{step:012d}", name)


@pytest.mark.parametrize(
    "offset", [0, 9, 4096, 4096 + 12345, -1], ids=["len", "header", "data0", "data", "last"]
)
def test_flipped_byte_in_memory_falls_back_to_local(saved, caplog, offset):
    flip_byte(file_of(saved, "memory", 2), offset, mask=0x40)
    with saved() as mgr, caplog.at_level(logging.WARNING, logger="mtckpt"):
        step, state = mgr.restore()
        assert step == 2
        assert_same_state(state, make_state(2, scale=8))
        assert "memory tier" in caplog.text and "trying the next copy" in caplog.text
        assert "restored step 2 from the local tier" not in caplog.text  # same step: not a fallback
        assert mgr.steps()["memory"] == [1]  # the bad copy is no longer committed


def test_flipped_bytes_in_every_tier_fall_back_to_the_older_step(saved, caplog):
    flip_byte(file_of(saved, "memory", 2), 5000, mask=0x40)
    flip_byte(file_of(saved, "local", 2), 70_000, mask=0x40)
    with saved() as mgr, caplog.at_level(logging.WARNING, logger="mtckpt"):
        step, state = mgr.restore()
    assert step == 1
    assert_same_state(state, make_state(1, scale=8))
    assert "chunk 1 (bytes 65536-131072)" in caplog.text  # the local copy's bad chunk
    assert "restored step 1 from the memory tier: no good copy of newer step(s) [2]" in caplog.text


def test_explicit_step_with_no_good_copy_raises_with_every_reason(saved):
    flip_byte(file_of(saved, "memory", 2), 5000, mask=0x40)
    flip_byte(file_of(saved, "local", 2), 5000, mask=0x40)
    with saved() as mgr:
        with pytest.raises(CorruptCheckpointError) as info:
            mgr.restore(step=2)
    message = str(info.value)
    assert "no good copy of step 2 of run 'exp'" in message
    assert "memory tier" in message and "local tier" in message and "crc32c" in message
    assert isinstance(info.value, CorruptCheckpointError)


def test_no_good_copy_of_any_step_raises_with_every_reason(saved):
    with saved() as mgr, pytest.raises(CorruptCheckpointError) as info:
        # damaged once the manager runs (at its start, retention removes damaged steps)
        flip_byte(file_of(saved, "memory", 2), 5000, mask=0x40)
        os.unlink(file_of(saved, "local", 2))
        os.unlink(file_of(saved, "memory", 1))
        os.unlink(file_of(saved, "local", 1))
        mgr.restore()
    assert "no good copy of any step" in str(info.value)
    assert "the data file is missing" in str(info.value) and "crc32c" in str(info.value)
    assert issubclass(ChecksumMismatchError, CorruptCheckpointError)


@pytest.mark.parametrize(
    "damage", ["truncate", "extend", "manifest-byte", "manifest-missing", "data-missing"]
)
def test_damaged_files_fall_back(saved, damage):
    data, manifest = file_of(saved, "memory", 2), file_of(saved, "memory", 2, "rank-00000.json")
    if damage == "truncate":
        os.truncate(data, os.path.getsize(data) - 1)
    elif damage == "extend":
        with open(data, "ab") as f:
            f.write(b"\0")
    elif damage == "manifest-byte":
        text = open(manifest, "rb").read().replace(b'"step": 2', b'"step": 3')
        open(manifest, "wb").write(text)
    elif damage == "manifest-missing":
        os.unlink(manifest)
    else:
        os.unlink(data)
    with saved() as mgr:
        step, state = mgr.restore()
    assert step == 2
    assert_same_state(state, make_state(2, scale=8))


def test_manifest_from_a_newer_format_is_an_error_not_a_fallback(saved):
    path = file_of(saved, "memory", 2, "rank-00000.json")
    body = json.loads(open(path).read())
    body.pop("manifest_crc32c")
    body["format_version"] = 99
    body["manifest_crc32c"] = _self_crc(body)
    open(path, "w").write(json.dumps(body))
    with saved() as mgr, pytest.raises(FormatVersionError, match="format version 99.*upgrade"):
        mgr.restore()


def test_manifest_of_another_step_is_detected(saved):
    import shutil

    shutil.copy(
        file_of(saved, "local", 1, "rank-00000.json"), file_of(saved, "local", 2, "rank-00000.json")
    )
    flip_byte(file_of(saved, "memory", 2), 5000, mask=0x40)
    with saved() as mgr:
        step, state = mgr.restore()
    assert step == 1  # step 2 has no good copy left: memory flipped, local mislabelled
    assert_same_state(state, make_state(1, scale=8))
