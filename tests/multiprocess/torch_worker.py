"""One rank of a multi-process PyTorch test: gloo on CPU, started by spawn.run_ranks.

Scenarios (first argument):
  train     DDP training of a small transformer with AdamW, checkpointing every step
  resume    restore a step into fresh objects, then train on; same output as ``train``
  save      save small rank-specific states for the given steps
  restore   restore and check the rank-specific state; optional faults on one rank
  busy      saves in flight while the trainer runs its own collectives
  die       rank 1 is killed (SIGKILL) in the middle of a save
  rejoin    an in-process restart: the ranks keep their manager, leave the process group
            (rank 0 without saving the last step) and restore through a new one
  fsdp      FSDP2 (fully_shard) training, checkpointing every step; or, with --step,
            restore that step (any world size) and train on
  mesh2d    DTensors on a 2-D mesh, replicated along one dimension: save, then restore
  dcp       FSDP2 state saved with dcp.save through mtckpt.torch.Writer; with --step,
            loaded with dcp.load through mtckpt.torch.Reader (any world size)
"""

import argparse
import contextlib
import hashlib
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import mtckpt
import mtckpt.torch
from models import TinyTransformer


def manager(args, rank, **kwargs):
    root = os.path.join(args.root, f"node{rank}") if args.node_per_rank else args.root
    return mtckpt.CheckpointManager(
        "job",
        mtckpt.MemoryTier(os.path.join(root, "shm"), keep=2),
        mtckpt.LocalTier(os.path.join(root, "disk"), every=3, keep=2),
        collective_timeout=args.timeout,
        **kwargs,
    )


def training_objects(seed):
    torch.manual_seed(seed)
    model = TinyTransformer()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    state = {"model": model, "opt": opt, "sched": sched, "rng": mtckpt.torch.RNG()}
    return ddp, opt, sched, state


def train_step(ddp, opt, sched, rank, step):
    data = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own batches
    tokens = torch.randint(0, 64, (4, 12), generator=data)
    loss = torch.nn.functional.cross_entropy(ddp(tokens).flatten(0, 1), tokens.flatten())
    opt.zero_grad()
    loss.backward()  # DDP all-reduces the gradients: the trainer's own collectives
    opt.step()
    sched.step()
    return loss.item()


def fingerprint(model):
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


class KilledWhileSaving:
    """A stateful object whose state_dict() is where this process gets SIGKILLed, inside
    save(): a rank dying mid-save, deterministically."""

    def state_dict(self):
        os.kill(os.getpid(), signal.SIGKILL)

    def load_state_dict(self, state):
        pass


def sharded_training(seed):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = TinyTransformer()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in (model.embed, model.block, model.head):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    return model, opt, {"model": model, "opt": opt, "step": 0}


def global_fingerprint(state):
    """A hash of the whole (unsharded) model and optimizer state; the same on every rank."""
    digest = hashlib.sha256()
    tensors = list(state["model"].state_dict().items())
    for index, per_param in sorted(state["opt"].state_dict()["state"].items()):
        tensors += [(f"{index}.{name}", value) for name, value in sorted(per_param.items())]
    for name, value in tensors:
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        digest.update(name.encode() + full.detach().numpy().tobytes())
    return digest.hexdigest()[:16]


def sharded_step(model, opt, rank, step):
    data = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, 64, (4, 12), generator=data)
    model.train(False)  # no dropout: runs of other world sizes see the same computation
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def mesh_state(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2))
    full = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    return {
        "rows": distribute_tensor(full, mesh, [Shard(0), Replicate()]),
        "cols": distribute_tensor(full * 2, mesh, [Replicate(), Shard(1)]),
        "both": distribute_tensor(full * 3, mesh, [Shard(0), Shard(1)]),
    }


def rank_state(rank, step):
    return {"w": torch.full((1000,), float(rank * 100 + step)), "step": step, "rank": rank}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario")
    parser.add_argument("--root", required=True)
    parser.add_argument("--node-per-rank", action="store_true")
    parser.add_argument("--steps", type=int, nargs="*", default=[])
    parser.add_argument("--step", type=int)
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--wrong-shape-on", type=int)
    parser.add_argument("--exit-early-on", type=int)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mgr = manager(args, rank)

    if args.scenario in ("train", "resume"):
        ddp, opt, sched, state = training_objects(seed=0 if args.scenario == "train" else 99)
        first = 1
        if args.scenario == "resume":
            first, _ = mgr.restore(state, step=args.step)
            print(f"restored {first}", flush=True)
            first += 1
        for step in range(first, args.steps[0] + 1):
            loss = train_step(ddp, opt, sched, rank, step)
            mgr.save(step, state)
            print(f"step {step} loss {loss!r}", flush=True)
        mgr.wait()
        print(f"final {fingerprint(state['model'])}", flush=True)

    elif args.scenario == "fsdp":
        model, opt, state = sharded_training(seed=0 if args.step is None else 99)
        first = 1
        if args.step is not None:
            first, _ = mgr.restore(state, step=args.step)
            print(f"restored {first} {global_fingerprint(state)}", flush=True)
            first += 1
        for step in range(first, args.steps[0] + 1):
            loss = sharded_step(model, opt, rank, step)
            state["step"] = step
            mgr.save(step, state)
            print(f"step {step} loss {loss!r} {global_fingerprint(state)}", flush=True)
        mgr.wait()

    elif args.scenario == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model, opt, state = sharded_training(seed=0 if args.step is None else 99)
        if args.step is None:
            for step in (1, 2):
                sharded_step(model, opt, rank, step)
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save(
                {"model": model_sd, "optim": optim_sd}, storage_writer=mtckpt.torch.Writer(mgr, 2)
            )
            mgr.wait()
        else:
            model_sd, optim_sd = get_state_dict(model, opt)
            loaded = {"model": model_sd, "optim": optim_sd}
            dcp.load(loaded, storage_reader=mtckpt.torch.Reader(mgr, args.step))
            set_state_dict(
                model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"]
            )
        print(f"dcp {global_fingerprint(state)}", flush=True)

    elif args.scenario == "mesh2d":
        state = mesh_state(rank)
        if args.step is None:
            mgr.save(1, state).wait()
        else:
            target = {k: torch.zeros_like(v) for k, v in state.items()}
            mgr.restore(target, step=args.step)
            for key, tensor in state.items():
                assert torch.equal(target[key].to_local(), tensor.to_local()), key
                assert target[key].placements == tensor.placements
            print("mesh2d restored", flush=True)

    elif args.scenario == "save":
        for step in args.steps:
            mgr.save(step, rank_state(rank, step))
        mgr.wait()

    elif args.scenario == "restore":
        if rank == args.exit_early_on:
            os._exit(3)  # a rank that dies before restoring: the others must not wait forever
        target = rank_state(rank, 0)
        if rank == args.wrong_shape_on:
            target["w"] = torch.zeros(7)
        try:
            step, state = mgr.restore(target)
        except mtckpt.MtckptError as exc:
            print(f"error {type(exc).__name__}: {exc}", flush=True)
            untouched = torch.equal(target["w"], rank_state(rank, 0)["w"])
            print(f"target untouched: {untouched}", flush=True)
            mgr.close()
            dist.destroy_process_group()  # every rank gets here: tear down together
            return 1
        assert torch.equal(state["w"], rank_state(rank, step)["w"]) and state["rank"] == rank
        print(f"restored {step}", flush=True)

    elif args.scenario == "busy":
        big = {"w": torch.randn(16 * 1024 * 1024 // 4)}
        total = torch.zeros(1)
        for step in range(1, 6):
            big["w"].add_(1.0)
            mgr.save(step, big)  # checksums, commit and the local copy run in the background
            for _ in range(20):
                value = torch.ones(1)
                dist.all_reduce(value)  # the trainer's own collectives, meanwhile
                total += value
        mgr.wait()
        print(f"busy done {total.item()}", flush=True)

    elif args.scenario == "rejoin":
        for step in (1, 2):
            mgr.save(step, rank_state(rank, step)).wait()
        pending = mgr.save(3, rank_state(rank, 3)) if rank == 1 else None  # rank 0 "died"
        dist.destroy_process_group()
        store = dist.FileStore(os.path.join(args.root, "generation-1"), 2)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
        step, _ = mgr.restore(rank_state(rank, 0))
        print(f"restored {step}", flush=True)
        if pending is not None:
            try:
                pending.wait(timeout=0)
            except mtckpt.NodeRanksMissingError as exc:
                print(f"given up: {exc}", flush=True)
        mgr.save(3, rank_state(rank, 3)).wait()  # the ranks go on from step 2
        step, state = mgr.restore(rank_state(rank, 0))
        assert torch.equal(state["w"], rank_state(rank, 3)["w"])
        print(f"then restored {step}", flush=True)

    elif args.scenario == "die":
        for step in (1, 2):
            mgr.save(step, rank_state(rank, step)).wait()
        if rank == 1:
            mgr.save(3, {**rank_state(rank, 3), "dies": KilledWhileSaving()})
        handle = mgr.save(3, rank_state(rank, 3))
        try:
            handle.wait()  # the node's other rank never writes its shard
        except mtckpt.NodeRanksMissingError as exc:
            print(f"survivor: {exc}", flush=True)
        with contextlib.suppress(mtckpt.NodeRanksMissingError):
            mgr.close()  # raises the pending work's error once more, after shutting down
        os._exit(0)  # the process group's peer is gone: skip its teardown

    mgr.close()
    # Every rank tears the group down together: a process that exits while gloo's threads
    # still talk to its peer may abort ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
