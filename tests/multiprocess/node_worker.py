"""One rank (RANK / WORLD_SIZE, no LOCAL_RANK / LOCAL_WORLD_SIZE) on a node of its own:
saves steps into its node's memory tier (``--memory ROOT``: ROOT/node{RANK}, or ROOT
itself for every rank with ``--one-node``; or with ``--daemons A,B,...`` the memory tier of
daemon number RANK) and prints one JSON line per step: what h.wait() raised and after how
many seconds; then one for mgr.wait(). With ``--gloo`` the ranks are a torch.distributed
group first, and a last line says which ranks the manager took for its node and which
step a restore returned."""

import argparse
import json
import os
import sys
import time

import numpy as np

from mtckpt import CheckpointManager, MemoryTier, PeerTier


def outcome(what, wait, started) -> dict:
    try:
        wait()
        error = None
    except Exception as exc:
        error = [type(exc).__name__, str(exc)]
    return {"what": what, "error": error, "seconds": round(time.monotonic() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory")
    parser.add_argument("--daemons")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--collective-timeout", type=float, required=True)
    parser.add_argument("--gloo", action="store_true")
    parser.add_argument("--one-node", action="store_true")
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    if args.gloo:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    if args.daemons:
        tiers = {"peers": PeerTier(daemon=args.daemons.split(",")[rank], replicas=1)}
    else:
        root = args.memory if args.one_node else os.path.join(args.memory, f"node{rank}")
        tiers = {"memory": MemoryTier(root)}
    mgr = CheckpointManager("nodes", collective_timeout=args.collective_timeout, **tiers)
    started = time.monotonic()
    for step in range(args.steps):
        handle = mgr.save(step, {"w": np.full(1000, step, np.float32)})
        print(json.dumps(outcome(f"step {step}", handle.wait, started)), flush=True)
    print(json.dumps(outcome("mgr.wait", mgr.wait, started)), flush=True)
    if args.gloo:
        step, state = mgr.restore()
        print(json.dumps({"what": "restore", "node_ranks": list(mgr.node_ranks), "step": step,
                          "w": float(state["w"][0])}), flush=True)  # fmt: skip
    mgr.close()
    if args.gloo:
        # Every rank tears the group down together: a process that exits while gloo's
        # threads still talk to its peer may abort ("terminate called without an active
        # exception").
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
