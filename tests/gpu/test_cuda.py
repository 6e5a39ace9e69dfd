"""CUDA tensors: staged device-to-host into the memory-tier slot, page-locked, on a side
stream; restored into device targets bit-exact. Runs on a machine with a GPU only:
``python -m pytest -m gpu tests/gpu`` (the default run deselects the ``gpu`` marker)."""

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mtckpt.torch  # noqa: E402
from models import TinyTransformer  # noqa: E402
from mtckpt import CheckpointManager, LocalTier, MemoryTier  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
          torch.int32, torch.int64, torch.bool, torch.complex64]  # fmt: skip


def random_tensor(dtype, shape, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(
        0, 256, (int(np.prod(shape)) * dtype.itemsize,), dtype=torch.uint8, generator=g
    )
    return raw.view(dtype).reshape(shape).to(device)


def same_bits(a, b):
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
            b.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
        )
    )


def device_state():
    state = {str(d): random_tensor(d, (33, 65), seed=i) for i, d in enumerate(DTYPES)}
    state["transposed"] = random_tensor(torch.float32, (64, 48), seed=50).t()
    state["sliced"] = random_tensor(torch.float32, (64, 48), seed=51)[::2, 5:]
    state["empty"] = torch.zeros(0, 4, device=DEVICE)
    state["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16, device=DEVICE)
    state["host"] = random_tensor(torch.float32, (100,), seed=52, device="cpu")
    state["big"] = torch.randn(4 << 20, device=DEVICE)  # 16 MiB: several chunks
    return state


def zeros_like(state):
    return {key: torch.zeros_like(value) for key, value in state.items()}


@pytest.mark.parametrize("staging", ["blocking", "async"])
def test_device_tensors_roundtrip_into_device_targets(shm_dir, tmp_path, staging):
    state = device_state()
    tiers = [MemoryTier(str(shm_dir)), LocalTier(str(tmp_path))]
    with CheckpointManager("gpu", *tiers, staging=staging) as mgr:
        mgr.save(1, state).wait()
        target = zeros_like(state)
        step, restored = mgr.restore(target)
    assert step == 1
    for key, value in state.items():
        assert restored[key] is target[key]
        assert restored[key].device == value.device, key
        assert same_bits(restored[key], value), key
    # A new manager reads the local tier's copy (verified from disk) into device targets.
    with CheckpointManager("gpu", local=LocalTier(str(tmp_path))) as mgr:
        _, again = mgr.restore(zeros_like(state))
    assert all(same_bits(again[key], value) for key, value in state.items())


def test_restore_without_target_gives_host_arrays(shm_dir):
    state = {"w": random_tensor(torch.bfloat16, (8, 8))}
    with CheckpointManager("gpu", MemoryTier(str(shm_dir))) as mgr:
        mgr.save(1, state)
        _, restored = mgr.restore()
    assert restored["w"].device.type == "cpu"
    assert same_bits(restored["w"], state["w"])


def test_blocking_save_returns_after_the_copy_has_landed(shm_dir):
    """The default: once save() returns the tensors may change; the step keeps the old bytes."""
    w = torch.randn(8 << 20, device=DEVICE)
    before = w.clone()
    with CheckpointManager("gpu", MemoryTier(str(shm_dir))) as mgr:
        mgr.save(1, {"w": w})
        w.add_(1.0)  # queued on the trainer's stream right after save() returns
        _, restored = mgr.restore({"w": torch.zeros_like(w)})
    assert same_bits(restored["w"], before)


def test_async_save_copies_after_queued_work_and_before_later_work(shm_dir):
    """save() enqueues the copy on a side stream after what the trainer's stream already
    holds; after h.wait("staged") the trainer may overwrite the tensors."""
    w = torch.zeros(16 << 20, device=DEVICE)
    with CheckpointManager("gpu", MemoryTier(str(shm_dir)), staging="async") as mgr:
        torch.cuda._sleep(50_000_000)  # the stream is busy, then fills w: the copy must wait
        w.fill_(3.0)
        h = mgr.save(1, {"w": w})
        h.wait("staged")
        w.fill_(7.0)
        h.wait()
        _, restored = mgr.restore({"w": torch.empty_like(w)})
    assert torch.all(restored["w"] == 3.0)


def test_the_slot_is_page_locked(shm_dir):
    cudart = torch.cuda.cudart()
    with CheckpointManager("gpu", MemoryTier(str(shm_dir))) as mgr:
        mgr.save(1, {"w": torch.ones(1 << 20, device=DEVICE)}).wait()
        slot = mgr._memory._bound[("gpu", 1, 0)]
        address, size = slot.view().ctypes.data, slot.size
        # Only registered memory can be unregistered: so the slot was. Register it again.
        assert cudart.cudaHostUnregister(address) == cudart.cudaError.success
        assert cudart.cudaHostRegister(address, size, 0) == cudart.cudaError.success
        mgr.save(2, {"w": torch.full((1 << 20,), 2.0, device=DEVICE)}).wait()
        _, restored = mgr.restore({"w": torch.zeros(1 << 20, device=DEVICE)})
        assert torch.all(restored["w"] == 2.0)


def test_a_refused_page_lock_leaves_no_error_behind(caplog):
    """Registration can be refused (here: the memory is registered already); the copies
    then go through pageable memory and the trainer's next kernel must not see the error."""
    cudart = torch.cuda.cudart()
    memory = np.ones(1 << 20, np.uint8)
    assert cudart.cudaHostRegister(memory.ctypes.data, memory.nbytes, 0) == cudart.cudaError.success
    try:
        undo = mtckpt.torch._page_lock(memory)
        undo()  # nothing to undo
        assert "cannot page-lock 1048576 bytes" in caplog.text
        assert torch.ones(4, device=DEVICE).sum().item() == 4.0
    finally:
        assert cudart.cudaHostUnregister(memory.ctypes.data) == cudart.cudaError.success


def test_model_optimizer_and_rng_on_device_restore_bit_exact(shm_dir):
    torch.manual_seed(0)
    model = TinyTransformer().to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 64, (4, 16), device=DEVICE)
    for _ in range(3):
        loss = model(tokens).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    saved = {"model": model.state_dict(), "opt": opt.state_dict()["state"]}
    saved = torch.utils._pytree.tree_map(
        lambda v: v.clone() if isinstance(v, torch.Tensor) else v, saved
    )
    with CheckpointManager("gpu", MemoryTier(str(shm_dir))) as mgr:
        mgr.save(3, {"model": model, "opt": opt, "rng": mtckpt.torch.RNG()})
        draws = torch.rand(5, device=DEVICE), torch.rand(5)

        torch.manual_seed(123)
        fresh = TinyTransformer().to(DEVICE)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
        mgr.restore({"model": fresh, "opt": fresh_opt, "rng": mtckpt.torch.RNG()})
    assert same_bits(torch.rand(5, device=DEVICE), draws[0])
    assert same_bits(torch.rand(5), draws[1])
    for key, value in saved["model"].items():
        assert fresh.state_dict()[key].device.type == "cuda"
        assert same_bits(fresh.state_dict()[key], value), key
    restored_opt = fresh_opt.state_dict()["state"]
    for index, moments in saved["opt"].items():
        for name, value in moments.items():
            assert same_bits(restored_opt[index][name], value), (index, name)


def test_saves_from_another_thread_and_stream(shm_dir):
    """A trainer thread with its own current stream: the copy waits for that stream."""
    result = {}

    def worker():
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            w = torch.empty(4 << 20, device=DEVICE)
            torch.cuda._sleep(20_000_000)
            w.fill_(5.0)
            with CheckpointManager("gpu", MemoryTier(str(shm_dir))) as mgr:
                mgr.save(1, {"w": w})
                _, result["restored"] = mgr.restore()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert torch.all(result["restored"]["w"] == 5.0)
