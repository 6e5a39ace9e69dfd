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
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def launch(args: argparse.Namespace, memory: Path, local: Path) -> subprocess.Popen:
    command = [sys.executable, __file__, "--trainer", "--memory", str(memory), "--local",
               str(local), "--steps", str(args.steps), "--seed", str(args.seed)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def run_to_end(proc: subprocess.Popen, echo: str) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if not line.startswith("step ") or line.startswith(f"step {echo}"):
            print(f"   | {line.strip()}")
    if proc.wait() != 0:
        raise SystemExit(f"trainer failed with exit status {proc.returncode}")
    return lines


def demo(args: argparse.Namespace) -> int:
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mtckpt-jax-demo-"))
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else base
    memory = Path(tempfile.mkdtemp(prefix="mtckpt-jax-demo-", dir=shm))
    kill_at = args.kill_at or random.Random(args.seed).randint(args.steps // 4, 3 * args.steps // 4)
    print(f"checkpoints: memory tier {memory}, local tier {base / 'local'}")
    try:
        print(f"1. training for {args.steps} steps on a 4 x 2 mesh; SIGKILL after step {kill_at}")
        proc = launch(args, memory, base / "local")
        for line in proc.stdout:
            if line.startswith(f"step {kill_at} "):
                time.sleep(random.uniform(0, 0.003))  # land inside the next save, sometimes
                proc.send_signal(signal.SIGKILL)
                print(f"   | {line.strip()}\n   | -- killed (SIGKILL) --")
                break
        proc.wait()

        print("2. restarting the trainer: it resumes from the newest good checkpoint")
        resumed = run_to_end(launch(args, memory, base / "local"), echo=str(args.steps))

        print("3. the same training without interruption, for reference")
        ref_memory = Path(tempfile.mkdtemp(prefix="mtckpt-jax-demo-ref-", dir=shm))
        try:
            reference = run_to_end(
                launch(args, ref_memory, base / "reference"), echo=str(args.steps)
            )
        finally:
            shutil.rmtree(ref_memory, ignore_errors=True)

        resumed_step = int(next(line for line in resumed if line.startswith("resumed")).split()[3])
        same_final = resumed[-1] == reference[-1]
        after = [line for line in resumed if line.startswith("step ")]
        steps = [line for line in reference if line.startswith("step ")]
        same_losses = after == steps[resumed_step : resumed_step + len(after)]
        print(
            f"4. resumed at step {resumed_step} after the kill at step {kill_at}; "
            f"{len(after)} steps retrained"
        )
        print(f"   final parameters bit-identical to the uninterrupted run: {same_final}")
        print(f"   losses after the resume identical step by step: {same_losses}")
        return 0 if same_final and same_losses and resumed_step >= 1 else 1
    finally:
        shutil.rmtree(memory, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="keep the local tier and reference run here")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-at", type=int, help="step after which to kill (default: random)")
    parser.add_argument("--trainer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    parser.add_argument("--local", help=argparse.SUPPRESS)
    args = parser.parse_args()
    return trainer(args) if args.trainer else demo(args)


if __name__ == "__main__":
    sys.exit(main())
