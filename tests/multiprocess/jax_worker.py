"""One process of a multi-process JAX job on CPU (jax.distributed, 4 devices per process),
started by spawn.run_ranks; the global mesh is 4 x 2 over both processes' devices.

  save ROOT STEP [STEP...]   save jax_states.make_state for each step
  restore ROOT STEP          restore the newest step all processes hold; check it is STEP
                             and that every local shard holds what was saved
  orbax ROOT STEP [STEP...]  through mtckpt.orbax.CheckpointManager (Orbax's API): save each
                             step as Orbax's example does, then restore the latest in a
                             new manager and check it
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "jax_adapter"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax_states import leaves_by_path, make_state, target  # noqa: E402

import mtckpt  # noqa: E402


def check_local_shards(restored, expected) -> None:
    """Every addressable shard of every array equals the saved one, with the same sharding
    (the arrays span both processes, so no process can read them whole)."""
    got, want = leaves_by_path(restored), leaves_by_path(expected)
    assert list(got) == list(want)
    for path, value in want.items():
        if not isinstance(value, jax.Array):
            assert np.asarray(got[path]).tobytes() == np.asarray(value).tobytes(), path
            continue
        assert got[path].sharding.is_equivalent_to(value.sharding, value.ndim), path
        mine = {s.device: s for s in got[path].addressable_shards}
        for shard in value.addressable_shards:
            data = np.asarray(mine[shard.device].data)
            assert data.tobytes() == np.asarray(shard.data).tobytes(), (path, shard.index)


def orbax_round(root: str, steps: list[int], mesh) -> None:
    import orbax.checkpoint as ocp

    import mtckpt.orbax

    def manager():
        options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=2)
        return mtckpt.orbax.CheckpointManager(os.path.join(root, "orbax"), options=options,
                                              memory=mtckpt.MemoryTier(os.path.join(root, "m")),
                                              collective_timeout=60)  # fmt: skip

    with manager() as mngr:
        for step in steps:
            mngr.save(step, args=ocp.args.StandardSave(make_state(mesh, step)))
        mngr.wait_until_finished()
    with manager() as mngr:
        latest = mngr.latest_step()
        state = mngr.restore(latest, args=ocp.args.StandardRestore(target(mesh)))
        check_local_shards(state, make_state(mesh, latest))
        print(f"orbax restored {latest} of {mngr.all_steps()}")


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    jax.distributed.initialize(
        f"127.0.0.1:{os.environ['MASTER_PORT']}", num_processes=world, process_id=rank
    )
    mode, root, steps = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]]
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    if mode == "orbax":
        orbax_round(root, steps, mesh)
        jax.distributed.shutdown()
        return
    with mtckpt.CheckpointManager("job", mtckpt.MemoryTier(root), collective_timeout=60) as mgr:
        assert (mgr.rank, mgr.world_size) == (rank, world)  # from jax.distributed
        if mode == "save":
            for step in steps:
                mgr.save(step, make_state(mesh, step)).wait()
            print(f"saved {steps}")
        else:
            restored, state = mgr.restore(target(mesh))
            assert restored == steps[0], (restored, steps)
            check_local_shards(state, make_state(mesh, restored))
            print(f"restored {restored}")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
