"""Without a node daemon, a helper process of the trainer uploads to the object tier: it is
a real child process, its death fails one flush (and the next starts a new one), and it
does not outlive a trainer killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem
from test_object_tier import RUN, manager, s3_tier, state

from mtckpt import ConfigError, ObjectTier, TierError
from states import assert_same_state

HELPER_MARK = b"from mtckpt.pipeline.uploader import main"


def helpers_of(parent: int) -> list[int]:
    """The upload helper processes whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and HELPER_MARK in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def test_a_helper_killed_mid_upload_fails_that_flush_and_the_next_uses_a_new_one(
    moto, bucket, shm_dir
):
    remote = s3_tier(moto, bucket, part_size=5 << 20, concurrency=1)
    with manager(shm_dir / "a", remote) as mgr:
        mgr.save(1, state(1)).wait()
        (first,) = helpers_of(os.getpid())
        handle = mgr.save(2, state(2, 96 << 20))
        handle.wait("memory")
        time.sleep(0.3)  # its parts are going up (moto takes about 45 MiB/s)
        os.kill(first, signal.SIGKILL)
        with pytest.raises(TierError, match=r"step 2 rank 0: the upload helper process for "
                           r"s3://.* ended before it answered \(exit code -9\)"):  # fmt: skip
            handle.wait("remote")
        mgr.save(3, state(3)).wait()
        assert helpers_of(os.getpid()) not in ([], [first])
        assert mgr.steps()["remote"] == [1, 3]  # step 2 never committed
    assert helpers_of(os.getpid()) == []  # closed with its manager
    with manager(shm_dir / "fresh", remote) as mgr:
        step, restored = mgr.restore()
    assert step == 3
    assert_same_state(restored, state(3))


def test_the_helper_does_not_outlive_a_killed_trainer(moto, bucket, shm_dir, tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = {[str(Path(__file__).parent), str(Path(__file__).parents[1])]!r}
        from test_object_tier import manager, state
        from mtckpt import ObjectTier
        remote = ObjectTier(url="s3://{bucket}/ckpt", storage_options={moto.options()!r})
        mgr = manager({str(shm_dir / "a")!r}, remote)
        mgr.save(1, state(1)).wait()
        print("saved", flush=True)
        time.sleep(600)
    """))  # fmt: skip
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    try:
        assert trainer.stdout.readline() == b"saved\n"
        (helper,) = helpers_of(trainer.pid)
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 10
        while alive(helper) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(helper)
    finally:
        trainer.kill()
        trainer.wait()


def test_the_uploader_option_is_checked(shm_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"remote.uploader must be 'auto', 'process' or "
                       r"'thread', got 'fork'"):  # fmt: skip
        ObjectTier(url=f"file://{tmp_path}", uploader="fork")
    with pytest.raises(ConfigError, match=r"'process' cannot upload to 'memory://x': a "
                       r"memory:// filesystem lives in the trainer's process"):  # fmt: skip
        ObjectTier(url="memory://x", uploader="process")
    unpicklable = ObjectTier(url=f"file://{tmp_path}/ckpt",
                             storage_options={"hook": lambda: None})  # fmt: skip
    with pytest.raises(ConfigError, match="remote.storage_options cannot be sent to the "
                       "upload helper process .* set remote.uploader = 'thread'"):  # fmt: skip
        manager(shm_dir / "a", unpicklable)
    in_trainer = ObjectTier(url=f"file://{tmp_path}/ckpt", uploader="thread",
                            storage_options={"hook": lambda: None})  # fmt: skip
    with manager(shm_dir / "b", in_trainer) as mgr:
        mgr.save(1, state(1)).wait()
        assert helpers_of(os.getpid()) == []
        assert mgr.steps()["remote"] == [1]
    assert (tmp_path / "ckpt" / RUN).is_dir()


def test_a_filesystem_registered_at_run_time_uploads_on_the_trainer_threads(shm_dir, tmp_path):
    class Registered(LocalFileSystem):  # a fresh process would not know it by name
        protocol = ("mtckpttest",)

        def __init__(self, **options) -> None:
            super().__init__(auto_mkdir=True, **options)

    fsspec.register_implementation("mtckpttest", Registered, clobber=True)
    remote = ObjectTier(url=f"mtckpttest://{tmp_path}/ckpt")
    with manager(shm_dir / "a", remote) as mgr:
        mgr.save(1, state(1)).wait()
        assert helpers_of(os.getpid()) == []
        assert mgr.steps()["remote"] == [1]
    with manager(shm_dir / "b", ObjectTier(url=f"file://{tmp_path}/ckpt")) as mgr:
        step, restored = mgr.restore()  # the same files, through a known filesystem
    assert step == 1
    assert_same_state(restored, state(1))
