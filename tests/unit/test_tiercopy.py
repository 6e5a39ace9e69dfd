"""A committed shard copied between tiers: bit-exact, and never with changed bytes."""

from __future__ import annotations

import numpy as np
import pytest

from mtckpt import (
    CheckpointManager,
    ChecksumMismatchError,
    CorruptCheckpointError,
    MemoryTier,
    tiercopy,
)
from mtckpt.format import naming
from mtckpt.tiers.local import LocalStorage
from mtckpt.tiers.memory import MemoryStorage
from mtckpt.tiers.object import ObjectStorage

RUN = "copy"


@pytest.fixture
def memory(shm_dir):
    state = {"w": np.arange(3 << 20, dtype=np.float32), "step": 7}
    with CheckpointManager(RUN, memory=MemoryTier(str(shm_dir)), chunk_size=1 << 20) as mgr:
        mgr.save(7, state).wait()
    return MemoryStorage(shm_dir)


def test_a_shard_is_copied_whole(memory, tmp_path):
    local = LocalStorage(tmp_path)
    size = tiercopy.copy_shard(memory, local, RUN, 7, 0)
    for name in (naming.data_file(0), naming.manifest_file(0)):
        assert local.read_bytes(RUN, 7, name) == memory.read_bytes(RUN, 7, name)
    assert size == len(local.read_bytes(RUN, 7, naming.data_file(0)))


def test_a_changed_chunk_is_not_copied(memory, tmp_path):
    path = memory.path(RUN, 7, naming.data_file(0))
    with open(path, "r+b") as f:
        f.seek((2 << 20) + 5)  # in chunk 2
        byte = f.read(1)
        f.seek((2 << 20) + 5)
        f.write(bytes([byte[0] ^ 0x10]))
    local = LocalStorage(tmp_path)
    with pytest.raises(ChecksumMismatchError, match=r"step 7 rank-00000.safetensors: chunk 2 "):
        tiercopy.copy_shard(memory, local, RUN, 7, 0)
    assert local.files(RUN, 7) == []  # neither the data file nor a temporary one


def test_a_truncated_data_file_is_not_copied(memory, tmp_path):
    path = memory.path(RUN, 7, naming.data_file(0))
    with open(path, "r+b") as f:
        f.truncate(1 << 20)
    with pytest.raises(CorruptCheckpointError, match="1048576 bytes, the manifest records"):
        tiercopy.copy_shard(memory, LocalStorage(tmp_path), RUN, 7, 0)


class SlotReusedDuringUpload(ObjectStorage):
    """A file:// object tier during whose upload the trainer writes the next step into the
    same memory slot (what the daemon's flusher may meet when no trainer pins the step)."""

    def __init__(self, url: str, slot_path) -> None:
        super().__init__(url)
        self.slot_path = slot_path

    def write_stream(self, run, step, name, size, chunks):
        super().write_stream(run, step, name, size, chunks)
        with open(self.slot_path, "r+b") as f:
            f.seek(1 << 20)
            f.write(b"next step")


def test_a_file_that_changes_during_its_upload_is_not_kept(memory, tmp_path):
    remote = SlotReusedDuringUpload(f"file://{tmp_path}/remote",
                                    memory.path(RUN, 7, naming.data_file(0)))  # fmt: skip
    with pytest.raises(ChecksumMismatchError, match="changed while it was uploaded"):
        tiercopy.copy_shard(memory, remote, RUN, 7, 0, recheck=True)
    assert remote.files(RUN, 7) == []  # neither the data file nor a manifest is left
