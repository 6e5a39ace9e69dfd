"""A JAX training state for the tests: a flax TrainState (sharded parameters, an optax Adam
state after one update) beside numpy arrays, Python values and a raw PRNG key; every value
follows from the step, so any process can rebuild what was saved."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mtckpt.jax

# Saved on a ("data", "model") mesh: 8 distinct shards, 2 shards replicated 4 times, one
# array replicated everywhere, 4 shards replicated twice.
SPECS = {
    "w": P("data", "model"),
    "emb": P(None, "model"),
    "bias": P(),
    "ids": P("data"),
}


def global_params(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {
        "w": rng.standard_normal((64, 32), dtype=np.float32),
        "emb": rng.standard_normal((16, 8)).astype(jnp.bfloat16),
        "bias": rng.standard_normal(32).astype(np.float32),
        "ids": rng.integers(-1000, 1000, (8, 4), dtype=np.int32),
    }


def apply(params, x):
    return x @ params["w"] + params["bias"]


def make_state(mesh, step: int, specs=SPECS) -> dict:
    params = {
        name: jax.device_put(value, NamedSharding(mesh, specs[name]))
        for name, value in global_params(step).items()
    }
    tx = optax.adam(1e-2)
    train = train_state.TrainState.create(apply_fn=apply, params=params, tx=tx)
    grads = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32) * 0.5, params)
    grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
    _, opt_state = tx.update(grads, train.opt_state, params)
    train = train.replace(step=step, opt_state=opt_state)
    return {
        "train": train,
        "meta": {"lr": 0.01, "name": f"step {step}", "seen": np.full(4, step, dtype=np.int64)},
        "key": jax.random.PRNGKey(step),
    }


def target(mesh, specs=SPECS) -> dict:
    """A restore target like make_state's, of ShapeDtypeStructs on ``mesh`` with ``specs``."""
    return mtckpt.jax.abstract(make_state(mesh, 0, specs))


def leaves_by_path(tree) -> dict[str, object]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


def assert_same(actual, expected) -> None:
    """Same structure, dtypes and values (bit for bit); jax arrays also the same sharding."""
    got, want = leaves_by_path(actual), leaves_by_path(expected)
    assert list(got) == list(want)
    for path, value in want.items():
        if isinstance(value, (jax.Array, np.ndarray)):
            assert got[path].dtype == value.dtype, path
            assert np.asarray(got[path]).tobytes() == np.asarray(value).tobytes(), path
            if isinstance(value, jax.Array):
                assert isinstance(got[path], jax.Array), path
                assert got[path].sharding.is_equivalent_to(value.sharding, value.ndim), path
        else:
            assert got[path] == value, path
