"""mtckpt.orbax.CheckpointManager: Orbax's documented CheckpointManager example, run with
Orbax's own manager and with the import swapped, gives the same steps and states; restores
onto another mesh; unsupported Orbax features are refused by name."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import mtckpt
import mtckpt.orbax


def orbax_example(CheckpointManager, path, pytree, extra_params):  # noqa: N803 - the swap
    """Orbax's "Checkpointing with CheckpointManager" example (save every 2nd of 11 steps,
    keep 3, a pytree and JSON beside it), as its documentation writes it."""
    abstract_pytree = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, pytree)
    options = ocp.CheckpointManagerOptions(max_to_keep=3, save_interval_steps=2)
    mngr = CheckpointManager(path, options=options, item_names=("state", "extra_params"))
    for step in range(11):  # 0, 1, ..., 10
        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(pytree), extra_params=ocp.args.JsonSave(extra_params)))
    mngr.wait_until_finished()
    latest, steps = mngr.latest_step(), mngr.all_steps()
    restored = mngr.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_pytree), extra_params=ocp.args.JsonRestore()))
    mngr.close()
    return latest, steps, restored


@pytest.fixture
def pytree(mesh):
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
    weights = jax.device_put(jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8), sharding)
    return {"a": weights, "b": {"c": jnp.ones(5, jnp.bfloat16), "d": np.arange(3)}}


def swapped(tmp_path):
    return functools.partial(mtckpt.orbax.CheckpointManager,
                             memory=mtckpt.MemoryTier(str(tmp_path / "memory")))  # fmt: skip


def test_the_documented_example_matches_orbax_with_the_import_swapped(tmp_path, pytree):
    extra_params = {"num_epochs": 3, "learning_rate": 0.001, "name": "mlp"}
    ours = orbax_example(swapped(tmp_path), tmp_path / "ours", pytree, extra_params)
    theirs = orbax_example(ocp.CheckpointManager, tmp_path / "orbax", pytree, extra_params)
    assert ours[:2] == theirs[:2] == (10, [6, 8, 10])
    for got, want in ((ours[2].state, theirs[2].state), (ours[2].state, pytree)):
        flat_got, flat_want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
        assert len(flat_got) == len(flat_want)
        for g, w in zip(flat_got, flat_want, strict=True):
            assert np.asarray(g).dtype == np.asarray(w).dtype
            assert np.array_equal(np.asarray(g), np.asarray(w))
    assert ours[2].state["a"].sharding == pytree["a"].sharding
    assert dict(ours[2].extra_params) == dict(theirs[2].extra_params) == extra_params
    assert "step-000000000010" in {p.name for p in (tmp_path / "ours").rglob("step-*")}


def test_a_standard_save_restores_onto_another_mesh_and_every_step_is_counted(tmp_path,
                                                                              pytree):  # fmt: skip
    options = ocp.CheckpointManagerOptions(save_interval_steps=5, enable_async_checkpointing=False)
    with swapped(tmp_path)(tmp_path / "ckpt", options=options) as mngr:
        saved = [s for s in range(12) if mngr.save(s, args=ocp.args.StandardSave(pytree))]
        assert saved == [0, 5, 10] and mngr.all_steps() == [0, 5, 10]
        assert not mngr.should_save(10) and mngr.should_save(15) and not mngr.should_save(16)
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    other = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("y", "x"))
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, pytree)
    abstract["a"] = jax.ShapeDtypeStruct((64, 8), jnp.float32, sharding=other)
    with swapped(tmp_path)(tmp_path / "ckpt") as again:  # a new process would do this
        assert again.latest_step() == 10
        restored = again.restore(args=ocp.args.StandardRestore(abstract))
    assert restored["a"].sharding == other
    assert np.array_equal(np.asarray(restored["a"]), np.asarray(pytree["a"]))


@pytest.mark.parametrize("options, named", [
    (ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"]), "CheckpointManagerOptions.best_fn"),
    (ocp.CheckpointManagerOptions(keep_period=10), "CheckpointManagerOptions.keep_period"),
])  # fmt: skip
def test_unsupported_orbax_options_are_refused_by_name(tmp_path, options, named):
    with pytest.raises(NotImplementedError, match=f"does not support {named}"):
        swapped(tmp_path)(tmp_path / "ckpt", options=options)


def test_unsupported_arguments_and_items_are_refused_by_name(tmp_path, pytree):
    with pytest.raises(NotImplementedError, match="the item_handlers argument"):
        swapped(tmp_path)(tmp_path / "c", item_handlers=ocp.StandardCheckpointHandler())
    with pytest.raises(NotImplementedError, match="the metadata argument"):
        swapped(tmp_path)(tmp_path / "c", metadata={"model": "mlp"})
    with swapped(tmp_path)(tmp_path / "c") as mngr:
        with pytest.raises(NotImplementedError, match="metrics"):
            mngr.save(0, args=ocp.args.StandardSave(pytree), metrics={"loss": 1.0})
        with pytest.raises(NotImplementedError, match=r"item 'x': ArraySave"):
            mngr.save(0, args=ocp.args.Composite(x=ocp.args.ArraySave(np.ones(2))))
        with pytest.raises(ValueError, match="needs args"):
            mngr.save(0)
        with pytest.raises(FileNotFoundError, match="no checkpoint to restore"):
            mngr.restore()


def test_a_step_exported_as_orbax_is_restored_by_orbax_itself(tmp_path, pytree):
    """`mtckpt export --format orbax`: users leave as easily as they arrive."""
    import subprocess
    import sys

    state = {**pytree, "step": 7, "name": "mlp"}
    with mtckpt.CheckpointManager("leave", memory=mtckpt.MemoryTier(str(tmp_path / "m"))) as mgr:
        mgr.save(7, state).wait()
    out = tmp_path / "orbax-step-7"
    command = [sys.executable, "-m", "mtckpt", "export", "--memory", str(tmp_path / "m"),
               "--format", "orbax", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    abstract = {**jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, pytree),
                "step": 0, "name": ""}  # fmt: skip
    restored = ocp.PyTreeCheckpointer().restore(out, args=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
    assert restored["a"].sharding == pytree["a"].sharding
    for key in ("a",):
        assert np.array_equal(np.asarray(restored[key]), np.asarray(pytree[key]))
    assert np.asarray(restored["b"]["c"]).dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(restored["b"]["d"]), pytree["b"]["d"])
    assert (restored["step"], restored["name"]) == (7, "mlp")
