"""A trainer process for the chaos tests: restore (verifying the state is exactly what that
step saved), then save every step until killed. Prints one line per event."""

import argparse
import sys

from mtckpt import CheckpointManager, LocalTier, MemoryTier, StepNotFoundError
from states import assert_same_state, make_state


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", required=True)
    parser.add_argument("--local", required=True)
    parser.add_argument("--scale", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10_000)
    args = parser.parse_args()
    mgr = CheckpointManager(
        "chaos",
        MemoryTier(args.memory, keep=2),
        LocalTier(args.local, every=3, keep=2),
        chunk_size=256 * 1024,
    )
    try:
        step, state = mgr.restore()
    except StepNotFoundError:
        step = -1
        print("fresh", flush=True)
    else:
        assert_same_state(state, make_state(step, scale=args.scale))
        print(f"restored {step}", flush=True)
    for next_step in range(step + 1, step + 1 + args.steps):
        mgr.save(next_step, make_state(next_step, scale=args.scale))
        print(f"saved {next_step}", flush=True)
    mgr.close()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
