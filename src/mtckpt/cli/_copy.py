"""``mtckpt restore | export``: a step copied, verified, into faster tiers or a directory,
or written in another format."""

from __future__ import annotations

import argparse
import sys

from .. import catalog, export
from ..errors import CorruptCheckpointError
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
        help="write a step as safetensors, torch.save or DCP",
        description="Whole tensors, assembled from every rank's shards.",
    )
    e.add_argument("step", nargs="?", help="a step number or 'latest' (default)")
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
            return common.fail(args, exc.details())
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
    complete = {source.name: set(catalog.newest_complete(source, run)) for source in sources}
    steps = sorted(set().union(*complete.values()), reverse=True)
    if args.step not in (None, "latest"):
        wanted = common.step_number(args.step)
        if wanted not in steps:
            listed = steps[:10] or "none"
            return common.fail(args, f"run {run} step {wanted} is not complete in "
                               f"{common.described(sources)} (complete: {listed})")  # fmt: skip
        steps = [wanted]
    if not steps:
        return common.fail(args, f"run {run} has no complete step in {common.described(sources)}")
    ranks = args.ranks
    for step in steps:
        for source in sources:
            if step not in complete[source.name]:
                continue
            targets = dests if args.to is not None else tiers[: tiers.index(source)]
            if not targets:  # already in the fastest tier: good if it verifies
                checked, problems = catalog.verify(source, run, step)
                if problems:
                    print(f"mtckpt restore: {'; '.join(problems)}; trying another copy",
                          file=sys.stderr)  # fmt: skip
                    continue
                result = {"run": run, "step": step, "source": source.name, "to": [],
                          "bytes": checked}  # fmt: skip
                common.emit(
                    args,
                    result,
                    f"run {run} step {step} is in the {source.name} tier already, "
                    "the fastest, and verifies: nothing to copy",
                )
                return 0
            try:
                copied, size = _copy_to(source, targets, run, step, ranks, args)
            except CorruptCheckpointError as exc:
                print(f"mtckpt restore: {exc}; trying another copy", file=sys.stderr)
                continue
            result = {"run": run, "step": step, "ranks": copied, "bytes": size,
                      "source": source.name, "to": [t.describe() for t in targets]}  # fmt: skip
            common.emit(
                args,
                result,
                f"run {run} step {step}: ranks {copied} ({common.human_size(size)}, "
                f"verified) from the {source.name} tier to "
                f"{common.described(targets)}",
            )
            return 0
    return common.fail(
        args, f"run {run}: no good copy of step(s) {steps[:10]} in {common.described(sources)}"
    )


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
    tiers = common.chosen_tiers(args)
    run = common.run_name(args, tiers)
    step = common.chosen_step(args, tiers, run)
    storage, manifest, values = export.read_step(tiers, run, step, args.allow_pickle)
    export.write(args.format, manifest, values, args.out)
    result = {"run": run, "step": step, "format": args.format, "out": str(args.out),
              "source": storage.name}  # fmt: skip
    common.emit(args, result, f"run {run} step {step} from the {storage.name} tier written to "
                        f"{args.out} ({args.format})")  # fmt: skip
    return 0
