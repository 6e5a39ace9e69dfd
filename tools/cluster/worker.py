"""One trainer rank of the simulated job (what ``train.py`` is in the manifests): a
torch.distributed (gloo) group across the nodes, a state of ``--mib`` MiB per rank, a step
of ``--step-seconds`` of "compute" (a sleep, then a deterministic update), and a checkpoint
after each step, by mtckpt (``CheckpointManager.from_config()``, the node's config file)
or, as the baseline, by DCP to S3 every ``--dcp-every`` steps. At start it restores the
newest checkpoint. It appends JSON events to ``--events``: start, restored (step, tier,
seconds), each step, done (whether the state is bit-identical to an uninterrupted run)."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

LAUNCHED = time.time()  # before torch's import: the report splits a restart into its phases
CLOSE_AFTER_FAULT = 5.0  # seconds a manager may finish its work after a peer's death

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from rendezvous import join  # noqa: E402


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


def mtckpt_restore(state: dict, events: Events, mgr=None):
    """Restore by ``mgr``, or by a new manager (its build timed) where None: a survivor of
    an in-process restart keeps its own, which agrees through the new process group."""
    import mtckpt

    seen = TierSeen()
    logging.getLogger("mtckpt").addHandler(seen)
    logging.getLogger("mtckpt").setLevel(logging.INFO)
    started = time.monotonic()
    built = mgr is None
    if built:
        mgr = mtckpt.CheckpointManager.from_config()
    events("manager", seconds=time.monotonic() - started)
    started = time.monotonic()
    try:
        step, _ = mgr.restore(state)
    except mtckpt.StepNotFoundError:
        step = 0
    except BaseException:
        if built:  # not handed back: its rank's lock goes with it, the next manager takes it
            mgr.close()
        raise
    finally:
        logging.getLogger("mtckpt").removeHandler(seen)
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


def dcp_save(state: dict, url: str, options: dict, events: Events) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    dcp.save(state, storage_writer=FsspecWriter(url, **options))
    events("written", tiers={"remote": sum(t.numel() * t.element_size() for t in state.values())})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("mtckpt", "dcp"), default="mtckpt")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--step-seconds", type=float, default=0.5)
    parser.add_argument("--mib", type=float, default=16)
    parser.add_argument("--dcp-url")
    parser.add_argument("--dcp-every", type=int, default=10)
    parser.add_argument("--events", required=True)
    parser.add_argument("--rendezvous", help="in-process restarts: the generation file "
                        "the supervisor writes; without it a fault ends the process")  # fmt: skip
    parser.add_argument("--restore-first", action="store_true", help="restore before the "
                        "process group is up (the ranks agree through the daemons)")  # fmt: skip
    args = parser.parse_args()
    args.s3_options = json.loads(os.environ.get("CLUSTER_S3_OPTIONS", "{}"))
    logging.basicConfig(level=logging.WARNING)  # mtckpt's warnings in the rank's log
    rank = int(os.environ["RANK"])
    events = Events(args.events, rank)
    warm = os.environ.get("CLUSTER_WARM_SINCE")  # a warm spare's: ready since then
    events("start", launched=LAUNCHED, warm_since=float(warm) if warm else None)
    w = initial(rank, args.mib)
    state = {f"rank{rank}.w": w}  # a key per rank: DCP keeps one copy of equal keys
    generation = int(os.environ.get("CLUSTER_GENERATION", "0"))
    mgr, restored = None, None  # a survivor keeps its manager across in-process restarts
    if args.restore_first:
        mgr, restored = restore(args, rank, state, events, mgr)
    timeout = 10 if args.rendezvous else 120
    while True:
        try:
            join(generation, timeout)
            events("joined", generation=generation)
            if restored is None:  # a restore before the group: once only
                mgr, restored = restore(args, rank, state, events, mgr)
            ok = train(args, state, events, mgr, restored)
            dist.barrier()  # the others are done too (or one died: its restart restores)
            break
        except Exception as exc:  # a peer died: gloo's errors, mtckpt's (a lost agreement)
            if not args.rendezvous:
                close(mgr, events, timeout=CLOSE_AFTER_FAULT)
                raise
            events("fault", error=str(exc)[:300])
            events("written", tiers=written(mgr))  # so far: this process may be lost next
            restored = None
        leave()
        generation = next_generation(args.rendezvous, generation)
    close(mgr, events)
    events("done", ok=ok)
    dist.destroy_process_group()
    return 0 if ok else 3


def leave() -> None:
    """Out of the process group, its connections closed (the peers blocked on this rank
    learn of the fault from that), once nothing refers to it."""
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def next_generation(path: str, current: int, timeout: float = 120) -> int:
    """The supervisor's next generation, once it has replaced the dead ranks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            generation = json.loads(Path(path).read_text())["generation"]
        except (OSError, ValueError):
            generation = current
        if generation > current:
            return generation
        time.sleep(0.05)
    raise TimeoutError(f"rank {os.environ['RANK']}: no restart generation after {current} "
                       f"in {path} within {timeout} s")  # fmt: skip


class Written:
    """Bytes this process's manager wrote, by tier, since the last time asked."""

    def __init__(self) -> None:
        self.told: dict[str, float] = {}

    def __call__(self, mgr) -> dict[str, float]:
        if mgr is None:
            return {}
        samples = mgr.metrics.samples()
        found = (re.fullmatch(r'mtckpt_written_bytes_total\{tier="(\w+)"\}', k) for k in samples)
        now = {m.group(1): samples[m.group(0)] for m in found if m}
        since = {tier: value - self.told.get(tier, 0.0) for tier, value in now.items()}
        self.told = now
        return since


written = Written()


def close(mgr, events: Events, timeout: float | None = None) -> None:
    """The manager closed (after a fault, within ``timeout``: a dead node-mate's shard
    never comes) and the bytes it wrote since last told."""
    if mgr is None:
        return
    try:
        mgr.close(timeout=timeout)
    except Exception as exc:
        if timeout is None:
            raise
        events("close-failed", error=str(exc)[:300])
    events("written", tiers=written(mgr))


def restore(args, rank: int, state: dict, events: Events, mgr) -> tuple:
    """The newest checkpoint restored into ``state`` (the initial state where there is
    none) by ``mgr`` (a new manager where None; None for DCP): the manager and the step."""
    if args.mode == "mtckpt":
        mgr, step = mtckpt_restore(state, events, mgr)
    else:
        mgr, step = None, dcp_restore(state, args.dcp_url, args.s3_options, events)
    if not step:
        state[f"rank{rank}.w"].copy_(initial(rank, args.mib))
    return mgr, step


def train(args, state: dict, events: Events, mgr, restored: int) -> bool:
    """Train from step ``restored`` to the end, and whether the state is the uninterrupted
    run's."""
    (w,) = state.values()
    for step in range(restored + 1, args.steps + 1):
        time.sleep(args.step_seconds)  # the step's compute
        dist.all_reduce(torch.ones(1))  # the gradients' exchange: the ranks go in step
        w.add_(1.0)
        saving = time.monotonic()
        if mgr is not None:
            mgr.save(step, state)
        elif step % args.dcp_every == 0:
            dcp_save(state, f"{args.dcp_url}/step-{step}", args.s3_options, events)
        events("step", step=step, saved=time.monotonic() - saving)
    return torch.equal(w, initial(int(os.environ["RANK"]), args.mib) + float(args.steps))


if __name__ == "__main__":
    sys.exit(main())
