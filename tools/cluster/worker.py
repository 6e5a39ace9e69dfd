"""One trainer rank of the simulated job (what ``train.py`` is in the manifests): a
torch.distributed (gloo) group across the nodes, a state of ``--mib`` MiB per rank, a step
of ``--step-seconds`` of "compute" (a sleep, then a deterministic update), and a checkpoint
after each step, by mtckpt (``CheckpointManager.from_config()``, the node's config file)
or, as the baseline, by DCP to S3 every ``--dcp-every`` steps. At start it restores the
newest checkpoint. It appends JSON events to ``--events``: start, restored (step, tier,
seconds), each step, done (whether the state is bit-identical to an uninterrupted run)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist


class Events:
    def __init__(self, path: str, rank: int) -> None:
        self.file = open(path, "a")  # noqa: SIM115 (open for the process's life)
        self.rank = rank

    def __call__(self, event: str, **fields) -> None:
        record = {"t": time.time(), "rank": self.rank, "event": event, **fields}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


class TierSeen(logging.Handler):
    """Which tier the restore came from, as mtckpt logs it ("peers" where the node daemon
    first fetched this node's shards from its peers into node memory)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.tier = None
        self.from_peers = False

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        found = re.search(r"from the (\w+) tier", message)
        if found:
            fetched = self.from_peers and found.group(1) == "memory"
            self.tier = "peers" if fetched else found.group(1)
        self.from_peers = self.from_peers or "fetched from peers" in message


def initial(rank: int, mib: float) -> torch.Tensor:
    n = int(mib * (1 << 18))
    return (torch.arange(n, dtype=torch.float32) % 1000) * (rank + 1)


def mtckpt_restore(state: dict, events: Events):
    import mtckpt

    seen = TierSeen()
    logging.getLogger("mtckpt").addHandler(seen)
    logging.getLogger("mtckpt").setLevel(logging.INFO)
    mgr = mtckpt.CheckpointManager.from_config()
    started = time.monotonic()
    try:
        step, _ = mgr.restore(state)
    except mtckpt.StepNotFoundError:
        step = 0
    events("restored", step=step, tier=seen.tier if step else None,
           seconds=time.monotonic() - started)  # fmt: skip
    return mgr, step


def dcp_latest(url: str, options: dict) -> int:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **options)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return 0
    done = [int(n[5:]) for n in names if n.startswith("step-") and n[5:].isdigit()]
    complete = [s for s in done if fs.exists(f"{path}/step-{s}/.metadata")]
    return max(complete, default=0)


def dcp_restore(state: dict, url: str, options: dict, events: Events) -> int:
    import torch.distributed.checkpoint as dcp  # only the baseline pays for importing DCP
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    started = time.monotonic()
    latest = torch.tensor([dcp_latest(url, options) if dist.get_rank() == 0 else 0])
    dist.broadcast(latest, 0)
    step = int(latest.item())
    if step:
        dcp.load(state, storage_reader=FsspecReader(f"{url}/step-{step}", **options))
    events("restored", step=step, tier="remote" if step else None,
           seconds=time.monotonic() - started)  # fmt: skip
    return step


def dcp_save(state: dict, url: str, options: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    dcp.save(state, storage_writer=FsspecWriter(url, **options))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("mtckpt", "dcp"), default="mtckpt")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--step-seconds", type=float, default=0.5)
    parser.add_argument("--mib", type=float, default=16)
    parser.add_argument("--dcp-url")
    parser.add_argument("--dcp-every", type=int, default=10)
    parser.add_argument("--events", required=True)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    events = Events(args.events, rank)
    events("start")
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    events("joined")
    w = initial(rank, args.mib)
    state = {f"rank{rank}.w": w}  # a key per rank: DCP keeps one copy of equal keys
    options = json.loads(os.environ.get("CLUSTER_S3_OPTIONS", "{}"))
    if args.mode == "mtckpt":
        mgr, restored = mtckpt_restore(state, events)
    else:
        mgr, restored = None, dcp_restore(state, args.dcp_url, options, events)
    for step in range(restored + 1, args.steps + 1):
        time.sleep(args.step_seconds)  # the step's compute
        dist.all_reduce(torch.ones(1))  # the gradients' exchange: the ranks go in step
        w.add_(1.0)
        if mgr is not None:
            mgr.save(step, state)
        elif step % args.dcp_every == 0:
            dcp_save(state, f"{args.dcp_url}/step-{step}", options)
        events("step", step=step)
    if mgr is not None:
        mgr.close()
    ok = torch.equal(w, initial(rank, args.mib) + float(args.steps))
    events("done", ok=ok)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
