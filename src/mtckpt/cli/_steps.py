"""``mtckpt ls | inspect | verify | gc``: what the tiers hold, checked and cleaned."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .. import arrays, catalog, retention
from ..config import LocalTier, MemoryTier, ObjectTier
from ..tiers import budget
from . import _common as common


def add_parsers(commands) -> None:
    ls = commands.add_parser(
        "ls", help="list the steps each tier (and each peer daemon) holds",
        description="Steps per tier: complete, incomplete or damaged (verified with "
        "--verify), the ranks and world size, sizes and ages; with a daemon (--daemon, or "
        "[peers] / [daemon] socket in the config), what it and each peer it knows hold.",
    )  # fmt: skip
    common.selection(ls, "only this run (default: every run)")
    ls.add_argument("--verify", action="store_true", help="check every checksum of complete steps")
    common.daemon_flags(ls)
    ls.set_defaults(handler=_ls)

    i = commands.add_parser("inspect", help="the tree, dtypes, shapes and shards of a step")
    i.add_argument("step", nargs="?", help="a step number or 'latest' (default)")
    common.selection(i)
    i.set_defaults(handler=_inspect)

    v = commands.add_parser(
        "verify", help="check every checksum of a step (or all steps)",
        description="Reads every shard of the step on each tier and checks each chunk's "
        "crc32c. Exit code 1 if any copy is damaged (each problem is named).",
    )  # fmt: skip
    v.add_argument("step", nargs="?", help="a step number or 'latest'")
    v.add_argument("--all", action="store_true", help="every step of every run (or of --run)")
    common.selection(v)
    v.set_defaults(handler=_verify)

    g = commands.add_parser(
        "gc", help="remove expired, damaged and incomplete steps (a dry run unless --apply)",
        description="Per tier and run: damaged steps (a COMMIT or manifest that does not "
        "parse, a shard missing, a data file of the wrong size), incomplete steps older than "
        "the newest committed one, and complete steps beyond the newest KEEP complete ones "
        "(the tier's keep in the config, or --keep; multiples of KEEP_EVERY stay), these "
        "only once the newest complete step passes checksum verification (one that fails "
        "is damaged, and the next older one is considered). The newest good step is never "
        "removed. Prints what it would remove unless --apply.",
    )  # fmt: skip
    common.selection(g, "only this run (default: every run)")
    g.add_argument(
        "--keep",
        type=common.at_least_one,
        help="complete steps to keep per tier "
        "(default: the tier's keep in the config, else 2 (remote: 3))",
    )
    g.add_argument("--keep-every", type=common.at_least_one, metavar="N",
                   help="also keep complete steps that are multiples of N (default: the "
                   "config's remote.keep_every)")  # fmt: skip
    g.add_argument("--apply", action="store_true", help="remove them (default: a dry run)")
    g.set_defaults(handler=_gc)


def _ls(args: argparse.Namespace) -> int:
    tiers = common.chosen_tiers(args)
    rows = []
    for storage in tiers:
        for info in catalog.listing(storage, args.run):
            row = info.to_json()
            if args.verify and info.status == catalog.COMPLETE:
                _, problems = catalog.verify(storage, info.run, info.step)
                row["status"] = "verified" if not problems else catalog.DAMAGED
                row["problems"] += problems
            rows.append(row)
    address = common.daemon_address(args)
    unreachable: list[str] = []
    memory_lines = [f"memory tier {s.root}: holds {budget.describe(budget.usage(s.root))}"
                    for s in tiers if s.name == "memory"]  # fmt: skip
    if address is not None:
        rows += _peer_rows(address, args, unreachable, memory_lines)
    damaged = sum(row["status"] == catalog.DAMAGED for row in rows)
    code = 1 if (args.verify and damaged) or unreachable else 0
    if args.verify and damaged:
        print(f"mtckpt ls: {damaged} damaged cop{'y' if damaged == 1 else 'ies'} found",
              file=sys.stderr)  # fmt: skip
    if unreachable:
        print(f"mtckpt ls: not listed: {', '.join(unreachable)} (could not be reached)",
              file=sys.stderr)  # fmt: skip
    if args.json:
        print(json.dumps(rows))
        return code
    if not rows:
        print(f"no checkpoints in {common.described(tiers)}")
        print("\n".join(memory_lines))
        return code
    now = time.time()
    table = [("TIER", "RUN", "STEP", "STATUS", "RANKS", "WORLD", "SIZE", "AGE")]
    for row in rows:
        age = "-" if row["modified"] is None else common.human_age(now - row["modified"])
        table.append((row["tier"], row["run"], str(row["step"]), row["status"],
                      common.rank_ranges(row["ranks"]), str(row["world_size"] or "-"),
                      common.human_size(row["bytes"]), age))  # fmt: skip
    common.print_table(table)
    for row in rows:
        for problem in row["problems"]:
            print(f"{row['tier']} {row['run']} step {row['step']}: {problem}")
    print("\n".join(memory_lines))
    return code


def _peer_rows(address: tuple[str, str | None], args: argparse.Namespace,
               unreachable: list[str], memory_lines: list[str]) -> list[dict]:  # fmt: skip
    """What this node's daemon and each peer it knows hold: one row per daemon, run,
    step and origin (the node that saved it), and per daemon, run and step the parity it
    holds for its coded group. The daemons that did not answer go in ``unreachable``, each
    with the reason printed; what this node's memory tier holds, by kind and against its
    budget, in ``memory_lines`` (for the daemon's root, in place of the local view)."""
    import grpc

    from ..daemon.auth import read_token
    from ..daemon.rpc import Client

    token = read_token(address[1])
    try:
        with Client(address[0], token=token, timeout=args.timeout) as client:
            status = client.status()
            daemons = [(f"daemon {status.node_id}", client.list_shards(run=args.run or ""))]
    except grpc.RpcError as exc:  # the tiers are listed all the same
        print(f"mtckpt ls: daemon {address[0]}: {exc.details()}", file=sys.stderr)
        unreachable.append(f"daemon {address[0]}")
        return []
    held = {m.kind: m.bytes for m in status.memory}
    limit = status.memory_budget
    of = f" of its budget of {budget.human_size(limit)}" if limit else ""
    memory_lines[:] = [f"memory tier {status.memory_root} (daemon {status.node_id}): holds "
                       f"{budget.human_size(budget.total(held))}{of} ({budget.describe(held)})"]
    for peer in status.peers:  # unreachable ones too: the daemon may not have asked yet
        try:
            with Client(peer.address, token=token, timeout=min(args.timeout, 10)) as client:
                listing = client.list_shards(run=args.run or "")
            daemons.append((f"peer {listing.node_id or peer.address}", listing))
        except grpc.RpcError as exc:
            name = f"peer {peer.node_id or '?'} ({peer.address})"
            print(f"mtckpt ls: {name}: {exc.details()}", file=sys.stderr)
            unreachable.append(name)
    rows: dict[tuple, dict] = {}
    for tier, listing in daemons:
        for held in listing.shards:
            shard = held.shard
            key = (tier, shard.run, shard.step, shard.origin)
            row = rows.setdefault(key, {
                "tier": tier, "run": shard.run, "step": shard.step, "origin": shard.origin,
                "status": f"replica of {shard.origin}" if held.replica else "own",
                "world_size": held.world_size, "ranks": [], "bytes": 0, "modified": None,
                "problems": [],
            })  # fmt: skip
            row["ranks"] = sorted(row["ranks"] + [shard.rank])
            row["bytes"] += held.data_size
        for parity in listing.parities:
            stripe = parity.stripe
            key = (tier, stripe.run, stripe.step, "parity")
            row = rows.setdefault(key, {
                "tier": tier, "run": stripe.run, "step": stripe.step, "origin": "",
                "status": f"{stripe.code} parity", "world_size": parity.world_size,
                "ranks": [], "bytes": 0, "modified": None, "problems": [],
            })  # fmt: skip
            row["bytes"] += parity.size
            if not parity.complete:
                row["status"] = f"{stripe.code} parity (incomplete)"
    return list(rows.values())


def _inspect(args: argparse.Namespace) -> int:
    tiers = common.chosen_tiers(args)
    run = common.run_name(args, tiers)
    step = common.chosen_step(args, tiers, run)
    storage, problems = None, []
    for tier in (t for t in tiers if step in t.steps(run)):
        info = catalog.step_info(tier, run, step)
        if info.status == catalog.DAMAGED:
            problems += info.problems
            continue
        if info.status != catalog.COMPLETE:
            continue
        if not info.ranks:
            problems.append(f"{tier.describe()}: step {step}: no rank manifest")
            continue
        storage = tier
        break
    if storage is None:
        if problems:
            return common.fail(args, f"run {run} step {step} has no readable copy: "
                               + "; ".join(problems))  # fmt: skip
        return common.fail(
            args, f"run {run} step {step} is not complete in {common.described(tiers)}"
        )
    if problems:
        print(f"mtckpt inspect: {'; '.join(problems)}; showing the {storage.name} tier's copy",
              file=sys.stderr)  # fmt: skip
    manifests = catalog.manifests(storage, run, step)
    first = manifests[0]
    leaves: dict[str, dict] = {}
    for manifest in manifests:
        for record in manifest.leaves:
            leaf = leaves.setdefault(record.key, _leaf_json(record))
            for piece in record.parts or (record,):
                if record.kind in arrays.ARRAY_KINDS and piece.global_shape is not None:
                    leaf["shards"].append({"rank": manifest.rank, "shape": list(piece.shape),
                                           "offset": list(piece.global_offset),
                                           "stored_by": piece.stored_by})  # fmt: skip
    result = {
        "run": run, "step": step, "tier": storage.name, "world_size": first.world_size,
        "framework": first.framework, "writer": first.writer,
        "format_version": first.format_version, "created": first.created,
        "ranks": [{"rank": m.rank, "bytes": m.file_size,
                   "stored_bytes": m.stored.size if m.stored else m.file_size,
                   "encoding": m.stored.encoding if m.stored else "identity",
                   "chunks": len(m.chunk_crc32c), "leaves": len(m.leaves)}
                  for m in manifests],
        "leaves": list(leaves.values()),
    }  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"run {run} step {step} in the {storage.name} tier: world size {first.world_size}, "
          f"{first.framework}, written by {first.writer} "
          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(first.created))}")  # fmt: skip
    common.print_table(
        [("RANK", "SIZE", "STORED", "ENCODING", "LEAVES")]
        + [
            (
                str(r["rank"]),
                common.human_size(r["bytes"]),
                common.human_size(r["stored_bytes"]),
                r["encoding"],
                str(r["leaves"]),
            )
            for r in result["ranks"]
        ]
    )
    print()
    table = [("KEY", "KIND", "DTYPE", "SHAPE", "SHARDS")]
    for leaf in result["leaves"]:
        shards = ", ".join(f"rank {s['rank']} {s['shape']}@{s['offset']}" for s in leaf["shards"])
        shape = "-" if leaf["shape"] is None else str(leaf["shape"])
        if "value" in leaf:
            shape = common.shortened(repr(leaf["value"]))
        table.append((leaf["key"], leaf["kind"], leaf["dtype"] or "-", shape, shards or "-"))
    common.print_table(table)
    return 0


def _leaf_json(record) -> dict:
    leaf = {"key": record.key, "kind": record.kind, "dtype": record.dtype,
            "shape": list(record.global_shape or record.shape) if record.shape is not None
            else None, "shards": []}  # fmt: skip
    if record.kind in ("none", "bool", "int", "float", "str"):
        leaf["value"] = record.value
    return leaf


def _verify(args: argparse.Namespace) -> int:
    if (args.step is None) == (not args.all):
        raise common.UsageError("mtckpt verify: give a STEP (or 'latest'), or --all")
    tiers = common.chosen_tiers(args)
    run = None if args.all and args.run is None else common.run_name(args, tiers)
    step = None if args.all else common.chosen_step(args, tiers, run)
    rows = []
    for storage in tiers:
        for info in catalog.listing(storage, run):
            if step is not None and info.step != step:
                continue
            if info.status == catalog.INCOMPLETE:
                rows.append({"tier": storage.name, "run": info.run, "step": info.step,
                             "status": "incomplete", "bytes": 0, "problems": []})  # fmt: skip
                continue
            progress = common.Progress(f"verifying {storage.name} {info.run} step {info.step}",
                                       0, args.json)  # fmt: skip
            try:
                checked, problems = catalog.verify(storage, info.run, info.step,
                                                   progress=progress.add)  # fmt: skip
            finally:
                progress.close()
            rows.append({"tier": storage.name, "run": info.run, "step": info.step,
                         "status": "ok" if not problems else "damaged", "bytes": checked,
                         "problems": problems})  # fmt: skip
    if step is not None and not any(r["status"] != "incomplete" for r in rows):
        return common.fail(
            args, f"run {run} step {step} is not complete in {common.described(tiers)}"
        )
    bad = [r for r in rows if r["status"] == "damaged"]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(
                f"{r['tier']:8} {r['run']} step {r['step']}: {r['status']}"
                + (f" ({common.human_size(r['bytes'])} checked)" if r["status"] == "ok" else "")
            )
            for problem in r["problems"]:
                print(f"    {problem}")
    if bad:
        print(f"mtckpt verify: {len(bad)} of {len(rows)} cop{'y' if len(rows) == 1 else 'ies'} "
              "damaged", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _gc(args: argparse.Namespace) -> int:
    tiers = common.chosen_tiers(args)
    rows = []
    for storage in tiers:
        keep, keep_every = _gc_policy(args, storage.name)
        for run in [args.run] if args.run else storage.runs():
            # rank None: the newest complete step's every shard is verified before an
            # older step goes (the operator removes whole steps)
            progress = common.Progress(f"verifying {storage.name} {run}", 0, args.json)
            try:
                removals = retention.plan(storage, run, keep, keep_every, progress=progress.add)
            finally:
                progress.close()
            for removal in removals:
                if args.apply:
                    catalog.remove_step(storage, run, removal.step)
                rows.append({"tier": storage.name, "run": run, "step": removal.step,
                             "reason": removal.reason, "removed": args.apply})  # fmt: skip
    if args.json:
        print(json.dumps(rows))
        return 0
    verb = "removed" if args.apply else "would remove"
    for r in rows:
        print(f"{verb} {r['tier']} {r['run']} step {r['step']}: {r['reason']}")
    if not rows:
        print("nothing to remove")
    elif not args.apply:
        print("(a dry run: --apply removes them)")
    return 0


_DEFAULT_KEEP = {"memory": MemoryTier.keep, "local": LocalTier.keep, "remote": ObjectTier.keep}


def _gc_policy(args: argparse.Namespace, tier: str) -> tuple[int, int | None]:
    """``keep`` and ``keep_every`` for ``tier``: the flags, else the tier's in the config
    file (and MTCKPT_* variables), else the tier's defaults."""
    tier_cfg = common.config_settings(args).get(tier)
    keep = args.keep if args.keep is not None else getattr(tier_cfg, "keep", _DEFAULT_KEEP[tier])
    keep_every = (args.keep_every if args.keep_every is not None
                  else getattr(tier_cfg, "keep_every", None))  # fmt: skip
    return keep, keep_every
