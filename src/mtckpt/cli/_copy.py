"""``mtckpt restore | export``: a step copied, verified, into faster tiers or a directory,
or written in another format."""

from __future__ import annotations

import argparse
import sys

from .. import catalog, export
from ..errors import CorruptCheckpointError
from ..restore import plan
from ..tiers.directory import DirectoryStorage
from . import _common as common


def add_parsers(commands) -> None:
    r = commands.add_parser(
        "restore", help="fetch the newest good checkpoint into this node's tiers",
        description="With this node's daemon (--daemon, or the config's [peers] daemon / "
        "[daemon] socket): the daemon pulls the node's shards from its peers into node "
        "memory. With --from or --to, or without a daemon: the newest complete step is "
        "copied, every chunk verified, from the fastest tier holding it into the faster "
        "configured tiers (or into the directory --to, a tier root of its own); a damaged "
        "copy is skipped for another tier or an older step.",
    )  # fmt: skip
    common.selection(r, "the run (default: the config's run, else the only run found)")
    r.add_argument("--step", help="a step number or 'latest' (default)")
    r.add_argument("--from", dest="from_tier", choices=("memory", "local", "remote"),
                   help="read this tier only (and copy into the faster ones)")  # fmt: skip
    r.add_argument("--to", metavar="DIR", help="copy into this directory instead")
    r.add_argument(
        "--ranks", type=common.rank_list, help="only these ranks (comma list; default: all)"
    )
    common.daemon_flags(r)
    r.set_defaults(handler=_restore)

    e = commands.add_parser(
        "export",
        help="write a step as safetensors, torch.save, DCP or Orbax",
        description="Whole tensors, assembled from every rank's shards.",
    )
    e.add_argument("step", nargs="?", help="a step number, or 'latest' (default): the newest "
                   "step with a good copy (a damaged newer one is reported and skipped)")
    e.add_argument("--format", choices=export.FORMATS, default="safetensors")
    e.add_argument("--out", required=True, help="the file (a directory for dcp)")
    e.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read leaves saved with pickle (only for checkpoints you trust)",
    )
    common.selection(e)
    e.set_defaults(handler=_export)


def _restore(args: argparse.Namespace) -> int:
    """From this node's daemon (peers), or with --from / --to or no daemon configured,
    from the tiers of the config file to the faster ones or an export directory."""
    address = None if args.from_tier or args.to else common.daemon_address(args)
    if address is None:
        return _restore_from_tiers(args)
    import grpc

    from ..daemon.auth import read_token
    from ..daemon.rpc import Client

    step = None if args.step in (None, "latest") else common.step_number(args.step)
    run = common.run_name(args, [])
    with Client(address[0], token=read_token(address[1]), timeout=args.timeout) as client:
        try:
            reply = client.recover(run, step, timeout=args.timeout)
        except grpc.RpcError as exc:
            return common.fail(args, f"daemon {address[0]}: {exc.details()}")
    result = {"run": run, "step": reply.step, "ranks": list(reply.ranks),
              "bytes": reply.bytes, "sources": list(reply.sources)}  # fmt: skip
    source = ", ".join(reply.sources) or "this node (nothing to fetch)"
    common.emit(args, result, f"run {run} step {reply.step}: ranks {list(reply.ranks)} ready in "
                        f"node memory; {common.human_size(reply.bytes)} from {source}")  # fmt: skip
    return 0


def _restore_from_tiers(args: argparse.Namespace) -> int:
    tiers = common.chosen_tiers(args, allow_filter=False, must_exist=False)
    run = common.run_name(args, tiers)
    names = [t.name for t in tiers]
    if args.from_tier is not None and args.from_tier not in names:
        return common.fail(args, f"--from {args.from_tier}: no such tier here (tiers: "
                           f"{', '.join(names)})")  # fmt: skip
    if args.to is not None:
        dests = [DirectoryStorage(args.to, "export", durable=True, populate=True)]
        sources = [t for t in tiers if args.from_tier in (None, t.name)]
    else:
        first = names.index(args.from_tier) if args.from_tier else 0
        sources = tiers[first:]
    holders = {source.name: set(catalog.newest_complete(source, run)) for source in sources}
    complete = sorted(set().union(*holders.values()), reverse=True)
    wanted = None if args.step in (None, "latest") else common.step_number(args.step)
    where = f"every rank in {common.described(sources)}"
    steps = plan.steps_to_try(complete, wanted, run, where)  # StepNotFoundError: exit 1
    problems: list[str] = []
    for step in steps:
        for source in plan.copies(step, sources, holders):
            targets = dests if args.to is not None else tiers[: tiers.index(source)]
            try:
                result = _copy_or_verify(source, targets, run, step, args)
            except CorruptCheckpointError as exc:
                problems.append(str(exc))
                print(f"mtckpt restore: {exc}; trying another copy", file=sys.stderr)
                continue
            common.emit(args, *result)
            return 0
    which = f"step {wanted}" if wanted is not None else "any step"
    return common.fail(args, f"no good copy of {which} of run {run!r} for {where}: "
                       + "; ".join(problems))  # fmt: skip


def _copy_or_verify(source, targets, run, step, args) -> tuple[dict, str]:
    """Copy ``step`` from ``source`` into ``targets``, or with none (``source`` is the
    fastest tier) verify it there: the JSON result and the line to print.
    CorruptCheckpointError if the copy is damaged."""
    if not targets:
        checked, problems = catalog.verify(source, run, step)
        if problems:
            raise CorruptCheckpointError("; ".join(problems))
        result = {"run": run, "step": step, "source": source.name, "to": [], "bytes": checked}
        return result, (f"run {run} step {step} is in the {source.name} tier already, the "
                        "fastest, and verifies: nothing to copy")  # fmt: skip
    copied, size = _copy_to(source, targets, run, step, args.ranks, args)
    result = {"run": run, "step": step, "ranks": copied, "bytes": size,
              "source": source.name, "to": [t.describe() for t in targets]}  # fmt: skip
    return result, (f"run {run} step {step}: ranks {copied} ({common.human_size(size)}, "
                    f"verified) from the {source.name} tier to {common.described(targets)}")


def _copy_to(source, targets, run, step, ranks, args) -> tuple[list[int], int]:
    """Copy ``step`` from ``source`` into the first target, then from it into the others;
    a target that did not hold the step before keeps nothing of a failed copy."""
    total = sum(m.file_size for m in catalog.manifests(source, run, step)
                if ranks is None or m.rank in ranks)  # fmt: skip
    progress = common.Progress(f"step {step}", total * len(targets), args.json)
    origin, copied, size = source, [], 0
    try:
        for target in targets:
            had = step in catalog.newest_complete(target, run)
            try:
                copied, size = catalog.copy_step(origin, target, run, step, ranks, progress.add)
            except BaseException:
                if not had:
                    catalog.remove_step(target, run, step)
                raise
            origin = targets[0]
    finally:
        progress.close()
    return copied, size


def _export(args: argparse.Namespace) -> int:
    """The step asked for, or (none asked) the newest step with a good copy, as
    ``restore`` takes: a damaged newest step is reported and the next older tried."""
    tiers = common.chosen_tiers(args)
    run = common.run_name(args, tiers)
    if args.step in (None, "latest"):
        complete = {s for t in tiers for s in catalog.newest_complete(t, run)}
        steps = plan.steps_to_try(sorted(complete, reverse=True), None, run,
                                  f"every rank in {common.described(tiers)}")  # fmt: skip
    else:
        steps = [common.step_number(args.step)]
    for tried, step in enumerate(steps):
        reading = common.Progress(f"reading run {run} step {step}", 0, args.json)
        try:
            storage, manifest, values = export.read_step(tiers, run, step, args.allow_pickle,
                                                         progress=reading.add)  # fmt: skip
            break
        except CorruptCheckpointError as exc:
            if tried + 1 == len(steps):
                raise
            print(f"mtckpt export: {exc}; trying step {steps[tried + 1]}", file=sys.stderr)
        finally:
            reading.close()
    arrays = sum(getattr(value, "nbytes", 0) for value in values.values())
    writing = common.Progress(f"writing {args.out}", arrays, args.json)
    try:
        export.write(args.format, manifest, values, args.out, progress=writing.add)
    finally:
        writing.close()
    result = {"run": run, "step": step, "format": args.format, "out": str(args.out),
              "source": storage.name}  # fmt: skip
    common.emit(args, result, f"run {run} step {step} from the {storage.name} tier written to "
                        f"{args.out} ({args.format})")  # fmt: skip
    return 0
