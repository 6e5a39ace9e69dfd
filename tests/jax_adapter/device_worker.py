"""A process with its own number of CPU devices (XLA_FLAGS set by the test), for saving and
restoring JAX state on a device count the test process does not have.

  save ROOT STEP ROWS COLS      save jax_states.make_state(STEP) on a ROWS x COLS mesh
  restore ROOT STEP ROWS COLS   restore the newest step onto a ROWS x COLS mesh and check it
  numpy ROOT STEP               restore without a target and check the numpy arrays
"""

import sys

import jax
import numpy as np
from jax_states import assert_same, global_params, make_state, target

import mtckpt


def main() -> None:
    mode, root, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mgr = mtckpt.CheckpointManager("job", mtckpt.MemoryTier(root))
    with mgr:
        if mode == "numpy":
            restored, state = mgr.restore()
            for name, value in global_params(step).items():
                got = state["train"]["params"][name]
                assert isinstance(got, np.ndarray) and got.dtype == value.dtype, name
                assert got.tobytes() == value.tobytes(), name
            print(f"restored {restored} as numpy")
            return
        mesh = jax.make_mesh((int(sys.argv[4]), int(sys.argv[5])), ("data", "model"))
        if mode == "save":
            mgr.save(step, make_state(mesh, step)).wait()
            print(f"saved {step} on {mesh.size} devices")
        else:
            restored, state = mgr.restore(target(mesh))
            assert restored == step, (restored, step)
            assert_same(state, make_state(mesh, step))
            print(f"restored {restored} on {mesh.size} devices")


if __name__ == "__main__":
    main()
