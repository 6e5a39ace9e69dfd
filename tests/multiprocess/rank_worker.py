"""One rank of a multi-process run (rank and world size from RANK / WORLD_SIZE): saves
steps of its own state, or restores and checks it."""

import argparse
import os
import sys

from mtckpt import CheckpointManager, LocalTier, MemoryTier
from states import assert_same_state, make_state


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["save", "restore"])
    parser.add_argument("--memory", required=True)
    parser.add_argument("--local", required=True)
    parser.add_argument("--steps", type=int, nargs="*", default=[])
    parser.add_argument("--collective-timeout", type=float, default=600.0)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    with CheckpointManager("ranks", MemoryTier(args.memory), LocalTier(args.local),
                           collective_timeout=args.collective_timeout) as mgr:  # fmt: skip
        assert (mgr.rank, mgr.world_size) == (rank, int(os.environ["WORLD_SIZE"]))
        if args.mode == "save":
            for step in args.steps:
                mgr.save(step, make_state(step, rng_seed=rank + 1))
            mgr.wait()
        else:
            step, state = mgr.restore()
            assert_same_state(state, make_state(step, rng_seed=rank + 1))
            print(f"rank {rank} restored {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
