"""Train with JAX on a device mesh, get killed, resume: mtckpt with JAX, flax and optax.

A small MLP (flax ``TrainState``, optax Adam) learns a fixed teacher function on 8 CPU
devices arranged as a 4 x 2 mesh: the batch is split over "data", the hidden layer over
"model", so every parameter and Adam moment is a sharded ``jax.Array``. The trainer
checkpoints every step into node memory and every 20 steps onto local disk. This script

1. starts the trainer and SIGKILLs it at a random step, possibly in the middle of a save,
2. starts it again: it restores the newest complete, verified checkpoint onto the mesh
   (``mgr.restore(mtckpt.jax.abstract(state))``) and trains on,
3. runs the same training uninterrupted in another directory,
4. checks that the resumed run ends bit-identical to the uninterrupted one.

    python examples/train_resume_jax.py [--dir DIR] [--steps 200] [--seed 0]

Exit status 0 when the resumed run is bit-exact, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys

FEATURES, HIDDEN, BATCH = 128, 512, 64


def trainer(args: argparse.Namespace) -> int:
    """The training process: restore if a checkpoint exists, then train and checkpoint."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax.training import train_state
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import mtckpt
    import mtckpt.jax

    logging.basicConfig(stream=sys.stdout, format="mtckpt: %(message)s")
    logging.getLogger("mtckpt").setLevel(logging.INFO)
    auto = (jax.sharding.AxisType.Auto,) * 2  # the compiler propagates shardings
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=auto)
    teacher = np.random.default_rng(12345).standard_normal((FEATURES, 1)).astype(np.float32)

    def batch(step: int):
        rng = np.random.default_rng([args.seed, step])  # the data of a step, from its number
        x = rng.standard_normal((BATCH, FEATURES), dtype=np.float32)
        y = (np.tanh(x @ teacher) + 0.1 * np.sin(3 * x[:, :1])).astype(np.float32)
        rows = NamedSharding(mesh, P("data"))
        return jax.device_put(x, rows), jax.device_put(y, rows)

    def apply(params, x):
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        return h @ params["w2"] + params["b2"]

    def init(key):
        k1, k2 = jax.random.split(key)
        params = {
            "w1": jax.random.normal(k1, (FEATURES, HIDDEN)) / np.sqrt(FEATURES),
            "b1": jnp.zeros(HIDDEN),
            "w2": jax.random.normal(k2, (HIDDEN, 1)) / np.sqrt(HIDDEN),
            "b2": jnp.zeros(1),
        }
        specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model"), "b2": P()}
        params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
        return train_state.TrainState.create(apply_fn=apply, params=params, tx=optax.adam(1e-3))

    @jax.jit
    def train_step(state, x, y):
        def loss_fn(params):
            return jnp.mean((state.apply_fn(params, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    def fingerprint(state) -> str:
        digest = hashlib.sha256()
        for leaf in jax.tree_util.tree_leaves(state.params):
            digest.update(np.asarray(leaf).tobytes())
        return digest.hexdigest()[:16]

    state = init(jax.random.PRNGKey(args.seed))
    manager = mtckpt.CheckpointManager(
        "mlp-jax",
        memory=mtckpt.MemoryTier(args.memory, every=1, keep=2),
        local=mtckpt.LocalTier(args.local, every=20, keep=2),
    )
    first = 1
    if manager.latest_step() is not None:
        # A target of shapes, dtypes and shardings: new arrays are built on the mesh.
        step, state = manager.restore(mtckpt.jax.abstract(state))
        first = step + 1
        print(f"resumed from step {step} ({fingerprint(state)})", flush=True)
    for step in range(first, args.steps + 1):
        state, loss = train_step(state, *batch(step))
        manager.save(step, state)
        print(f"step {step} loss {float(loss):.9f}", flush=True)
    manager.close()
    print(f"final {fingerprint(state)}", flush=True)
    return 0


if __name__ == "__main__":
    from train_resume import main  # the same demo: kill, resume, compare

    sys.exit(main(trainer, __file__, steps=200, doc=__doc__))
