"""JAX arrays on a CUDA GPU: staged by one DMA each straight into the page-locked
memory-tier slot, restored bit-exact onto the device. Runs on a machine with a GPU only:
``python -m pytest -m gpu tests/gpu`` (the default run deselects the ``gpu`` marker)."""

import os

import numpy as np
import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory to torch's tests
jax = pytest.importorskip("jax")

import mtckpt.jax  # noqa: E402
from mtckpt import CheckpointManager, LocalTier, MemoryTier, _cuda  # noqa: E402


def _gpus() -> list:
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def needs_a_gpu():
    """Asked only when a test runs: asking at import would start jax's CPU backend before
    tests/jax_adapter sets its device count."""
    if not _gpus():
        pytest.skip("needs a JAX GPU device")


DTYPES = ["float32", "bfloat16", "float16", "int8", "uint8", "int16", "int32", "uint32", "bool"]


def device_state(seed: int = 0) -> dict:
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(seed)
    gpu = _gpus()[0]
    state = {}
    for index, dtype in enumerate(DTYPES):
        raw = rng.integers(0, 256, (33, 65) + ((2,) if dtype.endswith("16") else (4,)), np.uint8)
        if dtype in ("int8", "uint8", "bool"):
            raw = raw[..., 0] % 2 if dtype == "bool" else raw[..., 0]
        host = raw.view(jnp.dtype(dtype)).reshape(33, 65)
        state[dtype] = jax.device_put(host, gpu)
        assert state[dtype].dtype == jnp.dtype(dtype), index
    state["scalar"] = jax.device_put(np.float32(2.5), gpu)
    state["empty"] = jax.device_put(np.zeros((0, 4), np.float32), gpu)
    state["big"] = jax.device_put(rng.standard_normal(16 << 20, np.float32), gpu)  # 64 MiB
    mesh = jax.make_mesh((1,), ("data",), devices=[gpu])
    state["sharded"] = jax.device_put(
        rng.standard_normal((256, 64), np.float32), NamedSharding(mesh, P("data"))
    )
    return state


def assert_same(restored: dict, state: dict) -> None:
    for key, value in state.items():
        got = restored[key]
        assert isinstance(got, jax.Array), key
        assert got.sharding == value.sharding, key
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert np.asarray(got).tobytes() == np.asarray(value).tobytes(), key


@pytest.fixture
def copies(monkeypatch):
    """How many arrays went straight from the GPU into a slot (the direct path)."""
    counted = []
    real = _cuda.copy_to_host

    def counting(ordinal, items):
        counted.extend(items)
        return real(ordinal, items)

    monkeypatch.setattr(_cuda, "copy_to_host", counting)
    return counted


@pytest.mark.parametrize("staging", ["blocking", "async"])
def test_device_arrays_go_straight_into_the_slot_and_restore_bit_exact(
    shm_dir, tmp_path, copies, staging
):
    state = device_state()
    tiers = [MemoryTier(str(shm_dir)), LocalTier(str(tmp_path))]
    with CheckpointManager("gpu", *tiers, staging=staging) as mgr:
        mgr.save(1, state).wait()
        assert len(copies) == len(state) - 1  # every array but the empty one
        step, restored = mgr.restore(mtckpt.jax.abstract(state))
    assert step == 1
    assert_same(restored, state)
    # A new manager reads the local tier's copy (verified from disk) onto the device.
    with CheckpointManager("gpu", local=LocalTier(str(tmp_path))) as mgr:
        _, again = mgr.restore(mtckpt.jax.abstract(state))
    assert_same(again, state)


def test_the_slot_is_page_locked(shm_dir):
    driver = _cuda._driver()
    with CheckpointManager("gpu", MemoryTier(str(shm_dir))) as mgr:
        mgr.save(1, {"w": jax.device_put(np.ones(1 << 20, np.float32), _gpus()[0])}).wait()
        slot = mgr._memory._bound[("gpu", 1, 0)]
        address, size = slot.view().ctypes.data, slot.size
        # Only registered memory can be unregistered: so the slot was. Register it again.
        with _cuda._Current(0):
            assert driver.cuMemHostUnregister(address) == 0
        _cuda.page_lock(address, size)
        w = jax.device_put(np.full(1 << 20, 2.0, np.float32), _gpus()[0])
        mgr.save(2, {"w": w}).wait()
        _, restored = mgr.restore({"w": mtckpt.jax.abstract(w)})
    assert np.all(np.asarray(restored["w"]) == 2.0)


def test_the_copy_waits_for_the_computation_that_makes_the_array(shm_dir, copies):
    """save() right after dispatching a long computation: the slot gets its result."""
    x = jax.device_put(np.full((4096, 4096), 1e-4, np.float32), _gpus()[0])

    @jax.jit
    def slow(x):
        for _ in range(50):
            x = x @ x + 1e-4
        return x

    y = slow(x)  # dispatched, not waited for
    with CheckpointManager("gpu", MemoryTier(str(shm_dir))) as mgr:
        mgr.save(1, {"y": y}).wait()
        _, restored = mgr.restore()
    assert len(copies) == 1
    assert restored["y"].tobytes() == np.asarray(y).tobytes()


def test_a_failing_direct_copy_falls_back_to_a_host_copy(shm_dir, monkeypatch, caplog):
    def refuse(ordinal, items):
        raise _cuda.CudaError("cuMemcpyDtoHAsync failed: refused by the test")

    monkeypatch.setattr(_cuda, "copy_to_host", refuse)
    monkeypatch.setitem(mtckpt.jax._DIRECT, "enabled", True)
    state = device_state(seed=1)
    with CheckpointManager("gpu", MemoryTier(str(shm_dir))) as mgr:
        mgr.save(1, state).wait()
        _, restored = mgr.restore(mtckpt.jax.abstract(state))
    assert "refused by the test" in caplog.text
    assert not mtckpt.jax._DIRECT["enabled"]
    assert_same(restored, state)


def test_restore_without_target_gives_host_arrays(shm_dir):
    state = device_state(seed=2)
    with CheckpointManager("gpu", MemoryTier(str(shm_dir))) as mgr:
        mgr.save(1, state)
        _, restored = mgr.restore()
    for key, value in state.items():
        assert isinstance(restored[key], np.ndarray | np.generic), key
        assert np.asarray(restored[key]).tobytes() == np.asarray(value).tobytes(), key
