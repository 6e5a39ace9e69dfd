"""The job's rendezvous store, as torchrun's agent on the first node hosts it: a TCPStore
at ``--master-addr:--master-port`` that lives as long as the agent, across restarts of
the workers. Each restart's workers meet under a prefix of their own (``join``); a
worker that survives an in-process restart keeps its connection, and a new one connects
to a store that is already listening (a rank 0 hosting each generation's store made the
others retry their connection for 0.3-1 s). The group forms once every rank has arrived."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta

WAIT = timedelta(seconds=120)  # how long a restart's rendezvous waits for every rank


def start(wrap, address: str, port: int) -> subprocess.Popen:
    """The store's process (``wrap``: into the first node's namespace), once it listens."""
    proc = subprocess.Popen(wrap(sys.executable, __file__, address, str(port)),
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    line = proc.stdout.readline()
    if "listening" not in line:
        proc.kill()
        raise RuntimeError(f"the rendezvous store at {address}:{port} did not start: {line!r}")
    return proc


_client = None


def join(generation: int, collective_timeout: float) -> None:
    """This rank in generation ``generation``'s process group, met through the agent's
    store (connected once per process)."""
    import torch.distributed as dist

    global _client
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if _client is None:
        _client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                world, is_master=False, timeout=WAIT)  # fmt: skip
    store = dist.PrefixStore(f"generation-{generation}", _client)
    # Every rank arrives (within WAIT) before the group forms (within the collective
    # timeout): a survivor still inside a collective that waits out its timeout arrives late.
    if store.add("arrived", 1) == world:
        store.set("all-arrived", "1")
    store.wait(["all-arrived"], WAIT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=collective_timeout))  # fmt: skip


def main() -> None:
    import torch.distributed as dist

    address, port = sys.argv[1], int(sys.argv[2])
    store = dist.TCPStore(address, port, is_master=True, wait_for_workers=False, timeout=WAIT)
    print(f"listening on {address}:{port}", flush=True)
    while store is not None:
        time.sleep(3600)


if __name__ == "__main__":
    main()
