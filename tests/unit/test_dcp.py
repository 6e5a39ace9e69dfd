"""torch.distributed.checkpoint over mtckpt tiers, and conversions to and from DCP directories
and torch.save files (one process)."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402

import mtckpt  # noqa: E402
import mtckpt.torch as mt  # noqa: E402
from mtckpt import CheckpointManager, LocalTier, MemoryTier, StepNotFoundError  # noqa: E402
from states import flip_byte  # noqa: E402


@pytest.fixture(autouse=True)
def quiet_single_process(single_process):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@pytest.fixture
def mgr(shm_dir, tmp_path):
    with CheckpointManager("dcp", MemoryTier(str(shm_dir)), LocalTier(str(tmp_path / "l"))) as m:
        yield m


def trained(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 6)).pow(2).sum().backward()
    opt.step()
    return model, opt


def test_dcp_save_and_load_through_mtckpt(mgr):
    model, opt = trained(0)
    msd, osd = get_state_dict(model, opt)
    extra = {"epoch": 3, "half": torch.randn(5).to(torch.bfloat16), "name": "run-a"}
    dcp.save({"model": msd, "optim": osd, "extra": extra}, storage_writer=mt.Writer(mgr, 7))
    assert mgr.steps()["memory"] == [7]

    model2, opt2 = trained(1)
    msd2, osd2 = get_state_dict(model2, opt2)
    extra2 = {"epoch": 0, "half": torch.zeros(5, dtype=torch.bfloat16), "name": ""}
    state = {"model": msd2, "optim": osd2, "extra": extra2}
    dcp.load(state, storage_reader=mt.Reader(mgr, 7))
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    for index, per_param in opt.state_dict()["state"].items():
        for name, value in per_param.items():
            assert torch.equal(value, opt2.state_dict()["state"][index][name])
    assert state["extra"]["epoch"] == 3 and state["extra"]["name"] == "run-a"
    assert torch.equal(state["extra"]["half"], extra["half"])


def test_reader_defaults_to_the_newest_step_and_checks_it_exists(mgr):
    with pytest.raises(StepNotFoundError, match="run 'dcp' has no complete step"):
        mt.Reader(mgr)
    dcp.save({"w": torch.ones(3)}, storage_writer=mt.Writer(mgr, 1))
    dcp.save({"w": torch.full((3,), 2.0)}, storage_writer=mt.Writer(mgr, 2))
    state = {"w": torch.zeros(3)}
    dcp.load(state, storage_reader=mt.Reader(mgr))
    assert torch.equal(state["w"], torch.full((3,), 2.0))


def test_the_reader_uses_another_tier_when_a_copy_is_damaged(mgr, shm_dir, tmp_path, caplog):
    from mtckpt import ChecksumMismatchError

    dcp.save({"w": torch.arange(1000.0)}, storage_writer=mt.Writer(mgr, 1, wait=None))
    shard = "dcp/step-000000000001/rank-00000.safetensors"
    flip_byte(shm_dir / shard)
    state = {"w": torch.zeros(1000)}
    dcp.load(state, storage_reader=mt.Reader(mgr, 1))
    assert torch.equal(state["w"], torch.arange(1000.0))
    assert "memory tier" in caplog.text and "trying the next copy" in caplog.text

    flip_byte(tmp_path / "l" / shard)  # now no good copy is left
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(1000)}, storage_reader=mt.Reader(mgr, 1))
    failure = info.value.failures[0][0]  # DCP wraps the rank's error
    assert isinstance(failure, mtckpt.CorruptCheckpointError)
    assert "no usable shard of rank 0" in str(failure) and "crc32c" in str(failure)
    assert issubclass(ChecksumMismatchError, mtckpt.CorruptCheckpointError)


def test_torch_save_files_convert_both_ways(mgr, tmp_path):
    state = {"w": torch.randn(4, 4), "meta": {"step": 5, "lr": 0.5}, "ids": torch.arange(3)}
    source = tmp_path / "in.pt"
    torch.save(state, source)
    mt.import_torch_save(source, mgr, 5)
    _, restored = mgr.restore(step=5)
    assert torch.equal(restored["w"], state["w"]) and restored["meta"] == {"step": 5, "lr": 0.5}
    out = tmp_path / "out.pt"
    assert mt.export_torch_save(mgr, None, out) == 5
    loaded = torch.load(out, weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["ids"], state["ids"])


def test_dcp_directories_convert_both_ways(mgr, tmp_path):
    model, _ = trained(2)
    dcp.save({"model": model.state_dict(), "step": 9}, checkpoint_id=str(tmp_path / "in"))
    mt.import_dcp(tmp_path / "in", mgr, 9)
    _, restored = mgr.restore(step=9)
    for key, value in model.state_dict().items():
        assert torch.equal(restored["model"][key], value)
    mgr.save(10, {"a": np.arange(4.0), "b": torch.ones(2, 2)}).wait()
    assert mt.export_dcp(mgr, 10, tmp_path / "out") == 10
    target = {"a": torch.zeros(4, dtype=torch.float64), "b": torch.zeros(2, 2)}
    dcp.load(target, checkpoint_id=str(tmp_path / "out"))
    assert torch.equal(target["a"], torch.arange(4.0, dtype=torch.float64))
    assert torch.equal(target["b"], torch.ones(2, 2))
