"""JAX pytrees of sharded arrays on 8 CPU devices: what is written, restore onto the same or
other meshes and device counts, restore without a target, and every bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import run_with_devices
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax_states import apply, assert_same, global_params, make_state, target

import mtckpt
import mtckpt.jax
from mtckpt.errors import StateMismatchError, UnsupportedLeafError


def manager(root):
    return mtckpt.CheckpointManager("job", mtckpt.MemoryTier(root))


def step_dir(root, step):
    return root / "job" / f"step-{step:012d}"


def test_train_state_restores_bit_exact_with_its_shardings(mesh, shm_dir):
    state = make_state(mesh, 5)
    with manager(shm_dir) as mgr:
        mgr.save(5, state).wait()
        step, restored = mgr.restore(target(mesh))
    assert step == 5
    assert isinstance(restored["train"], train_state.TrainState)
    assert restored["train"].apply_fn is apply  # static fields come from the target
    assert restored["train"].step == 5
    assert_same(restored, state)
    # the restored state trains on: the optimizer state has the parameters' structure
    grads = jax.tree_util.tree_map(jnp.zeros_like, restored["train"].params)
    restored["train"].apply_gradients(grads=grads)


def test_each_distinct_shard_is_written_once_and_readable_by_safetensors(mesh, shm_dir):
    from safetensors import safe_open

    with manager(shm_dir) as mgr:
        mgr.save(1, make_state(mesh, 1)).wait()
    manifest = json.loads((step_dir(shm_dir, 1) / "rank-00000.json").read_text())
    records = {leaf["key"]: leaf for leaf in manifest["leaves"]}
    parts = {key: [part["key"] for part in leaf.get("parts", [])] for key, leaf in records.items()}
    assert len(parts["train/params/w"]) == 8  # 4 x 2 shards
    assert len(parts["train/params/emb"]) == 2  # split along "model", replicated along "data"
    assert parts["train/params/bias"] == []  # replicated on all 8 devices: one whole array
    assert len(parts["train/params/ids"]) == 4
    expected = global_params(1)
    data_bytes = manifest["data_file"]["size"] - manifest["data_file"]["data_start"]
    params_bytes = sum(value.nbytes for value in expected.values())
    assert params_bytes * 3 < data_bytes < params_bytes * 3 + 4096  # params, mu, nu, once each
    with safe_open(step_dir(shm_dir, 1) / "rank-00000.safetensors", "np") as f:
        for part in records["train/params/w"]["parts"]:
            rows, cols = part["global_offset"]
            want = expected["w"][rows : rows + 16, cols : cols + 16]
            np.testing.assert_array_equal(f.get_tensor(part["key"]), want)
        np.testing.assert_array_equal(f.get_tensor("train/params/bias"), expected["bias"])


def test_restore_without_a_target_gives_numpy_arrays_and_dicts(mesh, shm_dir):
    with manager(shm_dir) as mgr:
        mgr.save(2, make_state(mesh, 2)).wait()
        _, restored = mgr.restore()
    train = restored["train"]
    assert set(train) == {"step", "params", "opt_state"}  # a TrainState's fields
    for name, value in global_params(2).items():
        assert isinstance(train["params"][name], np.ndarray)
        assert train["params"][name].dtype == value.dtype
        assert train["params"][name].tobytes() == value.tobytes()
    adam = train["opt_state"][0]
    assert type(adam).__name__ == "ScaleByAdamState" and adam.mu["w"].shape == (64, 32)
    assert restored["meta"]["name"] == "step 2"


def test_restores_onto_another_mesh_and_other_partition_specs(mesh, shm_dir):
    other = {"w": P("model", "data"), "emb": P("data"), "bias": P("model"), "ids": P(None)}
    mesh2 = jax.make_mesh((2, 4), ("data", "model"))
    with manager(shm_dir) as mgr:
        mgr.save(3, make_state(mesh, 3)).wait()
        _, restored = mgr.restore(target(mesh2, other))
    assert_same(restored, make_state(mesh2, 3, other))


@pytest.mark.parametrize("rows, cols", [(2, 1), (1, 1)])
def test_saved_on_eight_devices_restores_on_fewer(mesh, shm_dir, rows, cols):
    with manager(shm_dir) as mgr:
        mgr.save(4, make_state(mesh, 4)).wait()
    lines = run_with_devices(rows * cols, "restore", str(shm_dir), "4", str(rows), str(cols))
    assert lines == [f"restored 4 on {rows * cols} devices"]


def test_saved_on_two_devices_restores_on_eight_and_as_numpy_without_jax_devices(mesh, shm_dir):
    assert run_with_devices(2, "save", str(shm_dir), "6", "2", "1") == ["saved 6 on 2 devices"]
    with manager(shm_dir) as mgr:
        _, restored = mgr.restore(target(mesh))
    assert_same(restored, make_state(mesh, 6))
    assert run_with_devices(1, "numpy", str(shm_dir), "6") == ["restored 6 as numpy"]


def test_abstract_state_is_a_target_without_memory(mesh, shm_dir):
    state = {"w": jax.device_put(np.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("data")))}
    abstract = mtckpt.jax.abstract(state)
    assert isinstance(abstract["w"], jax.ShapeDtypeStruct)
    with manager(shm_dir) as mgr:
        mgr.save(1, state).wait()
        _, restored = mgr.restore(abstract)
    assert_same(restored, state)


def test_a_torch_checkpoint_restores_into_jax_arrays(mesh, shm_dir):
    torch = pytest.importorskip("torch")
    saved = {
        "w": torch.randn(16, 8, generator=torch.Generator().manual_seed(0)),
        "h": torch.randn(8, 4).to(torch.bfloat16),
        "n": torch.arange(6, dtype=torch.int64),
    }
    with manager(shm_dir) as mgr:
        mgr.save(1, saved).wait()
        sharding = NamedSharding(mesh, P("data", "model"))
        wanted = {
            "w": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=sharding),
            "h": jax.ShapeDtypeStruct((8, 4), jnp.bfloat16, sharding=sharding),
        }
        _, restored = mgr.restore(wanted, strict=False)
        assert restored["w"].sharding == sharding
        assert np.asarray(restored["w"]).tobytes() == saved["w"].numpy().tobytes()
        h = saved["h"].view(torch.int16).numpy().tobytes()
        assert np.asarray(restored["h"]).view(np.int16).tobytes() == h
        # without jax_enable_x64, JAX has no int64 array to put the int64 tensor in
        int32 = jax.ShapeDtypeStruct((6,), jnp.int32, sharding=NamedSharding(mesh, P()))
        with pytest.raises(StateMismatchError, match=r"'n'.*holds I64 \(6,\).*expects I32 \(6,\)"):
            mgr.restore({"n": int32}, strict=False)
        # nor does an int64 target make one: it would be cut to int32 without a word
        int64 = jax.ShapeDtypeStruct((6,), np.int64, sharding=NamedSharding(mesh, P()))
        with pytest.raises(StateMismatchError, match=r"'n'.*holds I64 \(6,\).*expects I32 \(6,\)"):
            mgr.restore({"n": int64}, strict=False)


# -- bad input ---------------------------------------------------------------------------


def test_a_target_of_another_structure_names_the_differing_paths(mesh, shm_dir):
    with manager(shm_dir) as mgr:
        mgr.save(1, make_state(mesh, 1)).wait()
        wrong = target(mesh)
        params = dict(wrong["train"].params)
        params["extra"] = params.pop("bias")
        wrong["train"] = wrong["train"].replace(params=params)
        with pytest.raises(StateMismatchError) as error:
            mgr.restore(wrong)
    message = str(error.value)
    assert "missing from the checkpoint: ['train/params/extra'" in message
    assert "not in the target: ['train/params/bias'" in message


def test_a_target_of_another_dtype_or_shape_is_refused(mesh, shm_dir):
    sharding = NamedSharding(mesh, P("data"))
    with manager(shm_dir) as mgr:
        mgr.save(1, {"w": jax.device_put(np.zeros((8, 4), np.float32), sharding)}).wait()
        half = jax.ShapeDtypeStruct((8, 4), jnp.float16, sharding=sharding)
        with pytest.raises(StateMismatchError, match=r"'w'.*holds F32 \(8, 4\).*expects F16"):
            mgr.restore({"w": half})
        wide = jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=sharding)
        with pytest.raises(StateMismatchError, match=r"'w'.*\(8, 4\).*expects F32 \(8, 8\)"):
            mgr.restore({"w": wide})


def test_a_target_sharding_that_does_not_fit_the_global_shape_is_refused(mesh, shm_dir):
    with manager(shm_dir) as mgr:
        mgr.save(1, {"v": jnp.zeros(6)}).wait()
        four_ways = jax.ShapeDtypeStruct((6,), jnp.float32, sharding=NamedSharding(mesh, P("data")))
        with pytest.raises(StateMismatchError, match=r"'v'.*sharding.*global shape \(6,\)"):
            mgr.restore({"v": four_ways})


def test_values_that_cannot_be_saved_name_their_key(mesh, shm_dir):
    with manager(shm_dir) as mgr:
        with pytest.raises(UnsupportedLeafError, match=r"'rng'.*typed PRNG key.*key_data"):
            mgr.save(1, {"rng": jax.random.key(0)})
        with pytest.raises(UnsupportedLeafError, match=r"'spec'.*ShapeDtypeStruct has no data"):
            mgr.save(1, {"spec": jax.ShapeDtypeStruct((2,), jnp.float32)})
        donated = jnp.ones(4)
        jax.jit(lambda x: x * 2, donate_argnums=0)(donated)
        assert donated.is_deleted()
        with pytest.raises(UnsupportedLeafError, match=r"'x'.*deleted"):
            mgr.save(1, {"x": donated})


def test_arrays_as_targets_give_their_shardings_and_async_staging_saves_them(mesh, shm_dir):
    saved = {"w": jax.device_put(np.arange(256.0).reshape(16, 16), NamedSharding(mesh, P("data")))}
    rows = NamedSharding(mesh, P(None, "model"))  # another layout, taken from the target array
    target = {"w": jax.device_put(np.zeros((16, 16)), rows)}
    with mtckpt.CheckpointManager("job", mtckpt.MemoryTier(shm_dir), staging="async") as mgr:
        handle = mgr.save(1, saved)
        handle.wait()
        _, restored = mgr.restore(target)
    assert restored["w"].sharding == rows
    assert np.asarray(restored["w"]).tobytes() == np.asarray(saved["w"]).tobytes()
    assert not np.asarray(target["w"]).any()  # jax arrays are immutable: a new one is made
