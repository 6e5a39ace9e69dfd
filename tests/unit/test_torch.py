"""PyTorch state in one process: tensors of every dtype, modules, optimizers, schedulers and
RNG, restored in place; training resumed from a checkpoint matches an uninterrupted run."""

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mtckpt.torch  # noqa: E402
from models import TinyTransformer  # noqa: E402
from mtckpt import (  # noqa: E402
    CheckpointManager,
    MemoryTier,
    StateMismatchError,
    UnsupportedLeafError,
)

pytestmark = pytest.mark.usefixtures("backend")


@pytest.fixture
def mgr(shm_dir):
    with CheckpointManager("torch", MemoryTier(str(shm_dir))) as manager:
        yield manager


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64]  # fmt: skip
NEWER = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
         "uint16", "uint32", "uint64")  # fmt: skip
DTYPES += [getattr(torch, name) for name in NEWER if hasattr(torch, name)]


def random_tensor(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(
        0, 256, (int(np.prod(shape)) * dtype.itemsize,), dtype=torch.uint8, generator=g
    )
    return raw.view(dtype).reshape(shape)  # every bit pattern, NaNs included


def same_bits(a, b):
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8),
            b.contiguous().reshape(-1).view(torch.uint8),
        )
    )


def test_every_dtype_roundtrips_bit_exact(mgr):
    state = {str(d): random_tensor(d, (3, 5), seed=i) for i, d in enumerate(DTYPES)}
    state["scalar"] = torch.tensor(1.5, dtype=torch.bfloat16)
    state["empty"] = torch.zeros(0, 4, dtype=torch.float16)
    mgr.save(0, state)
    _, fresh = mgr.restore()
    targets = {k: torch.zeros_like(v) for k, v in state.items()}
    _, filled = mgr.restore(targets)
    for key, tensor in state.items():
        assert same_bits(fresh[key], tensor), key
        assert filled[key] is targets[key] and same_bits(targets[key], tensor), key


def test_strided_conjugate_and_grad_tensors_are_saved_by_value(mgr):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    z = torch.complex(torch.randn(4), torch.randn(4))
    param = torch.nn.Parameter(torch.randn(3, 3))
    state = {"t": base.t(), "slice": base[::2, 1::3], "conj": z.conj(), "param": param}
    mgr.save(0, state)
    _, restored = mgr.restore()
    assert torch.equal(restored["t"], base.t()) and torch.equal(restored["slice"], base[::2, 1::3])
    assert torch.equal(restored["conj"], z.conj().resolve_conj())
    assert torch.equal(restored["param"], param.detach()) and not restored["param"].requires_grad


def test_non_contiguous_targets_are_filled(mgr):
    mgr.save(0, {"w": torch.arange(12.0).reshape(3, 4)})
    base = torch.zeros(4, 3)
    view = base.t()
    _, restored = mgr.restore({"w": view})
    assert restored["w"] is view and torch.equal(base, torch.arange(12.0).reshape(3, 4).t())


def test_numpy_and_torch_leaves_restore_into_each_other(mgr):
    mgr.save(0, {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": torch.arange(4)})
    a, b = torch.zeros(2, 3), np.zeros(4, dtype=np.int64)
    _, restored = mgr.restore({"a": a, "b": b})
    assert restored["a"] is a and torch.equal(a, torch.arange(6.0).reshape(2, 3))
    assert restored["b"] is b and np.array_equal(b, np.arange(4))


def test_mismatches_name_the_key(mgr):
    mgr.save(0, {"w": torch.zeros(2, 3), "n": 1})
    with pytest.raises(
        StateMismatchError,
        match=r"key 'w': the checkpoint holds F32 \(2, 3\), the target expects F32 \(3, 2\)",
    ):
        mgr.restore({"w": torch.zeros(3, 2), "n": 0})
    with pytest.raises(StateMismatchError, match=r"key 'w': .* expects BF16 \(2, 3\)"):
        mgr.restore({"w": torch.zeros(2, 3, dtype=torch.bfloat16), "n": 0})
    with pytest.raises(StateMismatchError, match="key 'n': the target is a torch tensor"):
        mgr.restore({"w": torch.zeros(2, 3), "n": torch.zeros(1)})
    with torch.inference_mode():
        frozen = torch.zeros(2, 3)
    with pytest.raises(StateMismatchError, match="key 'w': the target array is read-only"):
        mgr.restore({"w": frozen, "n": 0})


@pytest.mark.parametrize(
    "value, message",
    [
        (torch.zeros(3, 3).to_sparse(), "sparse"),
        (torch.zeros(2, device="meta"), "meta device"),
        (torch.zeros(2, dtype=torch.complex128), "torch dtype torch.complex128 cannot be saved"),
    ],
)
def test_unsupported_tensors_are_refused_by_key(mgr, value, message):
    with pytest.raises(UnsupportedLeafError, match=f"key 'x/bad': .*{message}"):
        mgr.save(0, {"x": {"bad": value}})


def train_steps(model, opt, sched, steps):
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 50, (4, 12))  # drawn from the (checkpointed) torch RNG
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def fresh_training(seed):
    torch.manual_seed(seed)
    model = TinyTransformer(vocab=50)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def test_resumed_training_matches_an_uninterrupted_run(mgr):
    model, opt, sched = fresh_training(0)
    train_steps(model, opt, sched, 3)
    state = {"model": model, "opt": opt, "sched": sched, "rng": mtckpt.torch.RNG(), "step": 3}
    mgr.save(3, state).wait()
    expected = train_steps(model, opt, sched, 4)
    expected_params = [p.detach().clone() for p in model.parameters()]

    model2, opt2, sched2 = fresh_training(1)  # other weights, no optimizer state yet
    pointers = [p.data_ptr() for p in model2.parameters()]
    step, restored = mgr.restore(
        {"model": model2, "opt": opt2, "sched": sched2, "rng": mtckpt.torch.RNG(), "step": 0}
    )
    assert step == 3 and restored["step"] == 3 and restored["model"] is model2
    assert [p.data_ptr() for p in model2.parameters()] == pointers  # filled in place
    assert train_steps(model2, opt2, sched2, 4) == expected  # bit-exact losses (dropout too)
    for a, b in zip(model2.parameters(), expected_params, strict=True):
        assert torch.equal(a, b)


def test_rng_state_resumes_every_stream(mgr):
    import random

    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    mgr.save(0, {"rng": mtckpt.torch.RNG()})
    first = (torch.rand(3), random.random(), np.random.rand(2))
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    mgr.restore({"rng": mtckpt.torch.RNG()})
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert np.array_equal(first[2], again[2])


def test_module_missing_a_parameter_lists_it(mgr):
    mgr.save(0, {"model": torch.nn.Linear(3, 2)})
    with pytest.raises(
        StateMismatchError,
        match=r"missing from the checkpoint: none; keys not in the target: \['model/bias'\]",
    ):
        mgr.restore({"model": torch.nn.Linear(3, 2, bias=False)})


def test_a_torch_checkpoint_read_without_torch(shm_dir):
    with CheckpointManager("torch", MemoryTier(str(shm_dir))) as manager:
        manager.save(0, {"f": torch.arange(4.0), "b": torch.ones(2, dtype=torch.bfloat16)})
    script = f"""
import sys
sys.modules["torch"] = None  # as on a machine without torch
sys.modules["ml_dtypes"] = None  # nor ml_dtypes (a JAX install brings it)
import numpy as np, mtckpt
with mtckpt.CheckpointManager("torch", mtckpt.MemoryTier({str(shm_dir)!r})) as mgr:
    try:
        mgr.restore()
    except mtckpt.UnsupportedLeafError as exc:
        print("error:", exc)
    _, state = mgr.restore({{"f": None}}, strict=False)
    print(type(state["f"]).__name__, state["f"].dtype, state["f"].tolist())
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("error: key 'b' has dtype BF16, which numpy can only read with")
    assert lines[1] == "ndarray float32 [0.0, 1.0, 2.0, 3.0]"


def test_a_module_restored_in_place_is_not_copied_onto_itself(mgr, monkeypatch):
    model = TinyTransformer(vocab=50)
    mgr.save(0, {"model": model})
    calls = []
    fresh = TinyTransformer(vocab=50)
    monkeypatch.setattr(fresh, "load_state_dict", lambda *a, **k: calls.append(a))
    mgr.restore({"model": fresh})
    assert calls == []  # every tensor was filled in place already
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    hooked = TinyTransformer(vocab=50)
    hooked.register_load_state_dict_post_hook(lambda module, keys: calls.append("hook"))
    mgr.restore({"model": hooked})
    assert calls == ["hook"]  # a module with load hooks still gets load_state_dict
