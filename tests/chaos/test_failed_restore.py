"""A restore that fails leaves the caller's state exactly as it was: no byte of the step
lands in the target's arrays, tensors or stateful objects before every chunk the restore
reads has verified. A tier that cannot be written (mounted read-only) is fallen back past
like any other: its damaged copy is reported, and the restore goes on to an older step."""

from __future__ import annotations

import logging
import os
import subprocess
import uuid

import numpy as np
import pytest

from mtckpt import CheckpointManager, CorruptCheckpointError, LocalTier, MemoryTier
from mtckpt.format import naming
from mtckpt.format.manifest import RankManifest
from states import assert_same_state, flip_byte

pytestmark = pytest.mark.usefixtures("backend")

CHUNK = 64 * 1024
RUN = "exp"


def layered_state(step: int) -> dict:
    """Three arrays of several chunks each, laid out in this order in the data file."""
    rng = np.random.default_rng(step)
    return {
        "a": rng.standard_normal(50_000).astype(np.float32),
        "b": rng.integers(-(2**40), 2**40, 30_000, dtype=np.int64),
        "c": rng.standard_normal(40_000),
        "step": step,
    }


def manager(memory_root, local_root=None) -> CheckpointManager:
    local = None if local_root is None else LocalTier(str(local_root), keep=3)
    return CheckpointManager(RUN, MemoryTier(str(memory_root), keep=3), local,
                             chunk_size=CHUNK, threads=2)  # fmt: skip


def data_path(root, step: int) -> str:
    return os.path.join(root, RUN, naming.step_dir(step), naming.data_file(0))


def flip_in_leaf(root, step: int, key: str, where: float = 0.5) -> None:
    """Flip a byte ``where`` of the way into ``key``'s bytes in the data file."""
    path = data_path(root, step)
    with open(os.path.join(os.path.dirname(path), naming.manifest_file(0)), "rb") as f:
        manifest = RankManifest.from_json(f.read(), path)
    record = next(r for r in manifest.leaves if r.key == key)
    flip_byte(path, manifest.data_start + record.offset + int(record.nbytes * where), mask=0x20)


def numpy_target() -> dict:
    return {key: np.full_like(value, 7) if isinstance(value, np.ndarray) else 0
            for key, value in layered_state(0).items()}  # fmt: skip


def torch_target() -> dict:
    torch = pytest.importorskip("torch")
    return {key: torch.full(value.shape, 7, dtype=torch.from_numpy(value).dtype)
            if isinstance(value, np.ndarray) else 0
            for key, value in layered_state(0).items()}  # fmt: skip


def raw_bytes(target: dict) -> dict:
    """Every array's bytes, copied."""
    out = {}
    for key, value in target.items():
        if hasattr(value, "numpy"):
            value = value.numpy()
        if isinstance(value, np.ndarray):
            out[key] = value.tobytes()
    return out


@pytest.mark.parametrize("make_target", [numpy_target, torch_target], ids=["numpy", "torch"])
@pytest.mark.parametrize(
    ("key", "where"), [("a", 0.0), ("b", 0.5), ("c", 0.99)], ids=["first", "middle", "last"]
)
def test_the_only_copy_damaged_leaves_the_target_untouched(shm_dir, make_target, key, where):
    with manager(shm_dir) as mgr:
        mgr.save(1, layered_state(1)).wait()
    flip_in_leaf(shm_dir, 1, key, where)
    target = make_target()
    before = raw_bytes(target)
    with manager(shm_dir) as mgr, pytest.raises(CorruptCheckpointError) as info:
        mgr.restore(target)
    assert "no good copy of any step of run 'exp'" in str(info.value)
    assert "crc32c" in str(info.value)
    assert raw_bytes(target) == before  # every array, every byte, as it was
    assert target["step"] == 0


def test_a_good_older_step_is_restored_after_a_damaged_newer_one(shm_dir):
    with manager(shm_dir) as mgr:
        mgr.save(1, layered_state(1)).wait()
        mgr.save(2, layered_state(2)).wait()
    flip_in_leaf(shm_dir, 2, "c", 0.9)
    target = numpy_target()
    with manager(shm_dir) as mgr:
        step, state = mgr.restore(target)
    assert step == 1
    assert all(state[key] is target[key] for key in ("a", "b", "c"))  # in place
    assert_same_state(state, layered_state(1))


class Counter:
    """A stateful object outside any framework."""

    def __init__(self) -> None:
        self.loaded = 0
        self.value = np.zeros(8)

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.loaded += 1
        self.value = np.array(state["value"])


def test_stateful_objects_are_not_loaded_when_the_restore_fails(shm_dir):
    torch = pytest.importorskip("torch")

    def training(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, opt

    model, opt = training(1)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    counter = Counter()
    counter.value = np.arange(8.0)
    saved = {"model": model, "opt": opt, "counter": counter, "last": torch.randn(100_000)}
    with manager(shm_dir) as mgr:
        mgr.save(1, saved).wait()
    flip_in_leaf(shm_dir, 1, "last", 0.5)

    model, opt = training(2)  # a fresh optimizer: restore would give it state first
    groups = [dict(group) for group in opt.param_groups]
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    counter = Counter()
    last = torch.zeros(100_000)
    target = {"model": model, "opt": opt, "counter": counter, "last": last}
    with manager(shm_dir) as mgr, pytest.raises(CorruptCheckpointError):
        mgr.restore(target)
    for name, param in model.named_parameters():
        assert torch.equal(param, params[name]), name
        assert param.grad is None
    assert len(opt.state) == 0 and opt.param_groups == groups
    assert counter.loaded == 0 and counter.value.tobytes() == np.zeros(8).tobytes()
    assert torch.equal(last, torch.zeros(100_000))

    with manager(shm_dir) as mgr:  # the same target restores once there is a good copy
        assert mgr.latest_step() is None  # the damaged step 1 was decommitted
        mgr.save(2, saved).wait()
        assert mgr.restore(target)[0] == 2
    assert counter.loaded == 1 and counter.value.tobytes() == np.arange(8.0).tobytes()
    assert torch.equal(last, saved["last"])
    wanted = saved["model"].state_dict()
    assert all(torch.equal(got, wanted[name]) for name, got in model.state_dict().items())
    first, saved_first = opt.param_groups[0]["params"][0], saved["opt"].param_groups[0]["params"][0]
    assert torch.equal(opt.state[first]["exp_avg"], saved["opt"].state[saved_first]["exp_avg"])


@pytest.fixture
def read_only(tmp_path):
    """``read_only(path)``: a read-only bind mount of ``path`` (root can write through
    chmod, not through a read-only mount); unmounted afterwards."""
    mounts = []

    def mount(path) -> str:
        view = tmp_path / f"ro-{uuid.uuid4().hex[:6]}"
        view.mkdir()
        done = subprocess.run(["mount", "--bind", str(path), str(view)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot bind-mount here: {done.stderr.decode().strip()}")
        mounts.append(view)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        return str(view)

    yield mount
    busy = []
    for view in reversed(mounts):
        if subprocess.run(["umount", str(view)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(view)], check=True)  # leave no mount behind
            busy.append(str(view))
    assert not busy, f"still in use after the test (a file left open or mapped): {busy}"


def test_a_damaged_step_on_a_read_only_tier_falls_back_to_the_older_one(
    shm_dir, tmp_path, read_only, caplog
):
    disk = tmp_path / "disk"
    with manager(shm_dir / "node", disk) as mgr:
        mgr.save(1, layered_state(1)).wait()
        mgr.save(2, layered_state(2)).wait()
    flip_in_leaf(disk, 2, "b", 0.5)
    mounted = read_only(disk)
    with pytest.raises(OSError, match="Read-only file system"):
        open(os.path.join(mounted, "probe"), "wb")
    target = numpy_target()
    with caplog.at_level(logging.WARNING, logger="mtckpt"):
        with manager(shm_dir / "fresh", mounted) as mgr:  # a new node, its disk read-only
            step, state = mgr.restore(target)
            assert mgr.steps()["local"] == [1, 2]  # the damaged step could not be decommitted
    assert step == 1
    assert_same_state(state, layered_state(1))
    assert "restored step 1 from the local tier: no good copy of newer step(s) [2]" in caplog.text
    assert (f"local tier ({mounted}): step 2 is damaged (" in caplog.text
            and "but cannot be marked incomplete there" in caplog.text
            and "Read-only file system" in caplog.text), caplog.text  # fmt: skip
