"""The ``mtckpt`` command line (also ``python -m mtckpt``).

Exit codes: 0 success; 1 the operation failed, or ``verify`` found a damaged copy (one
line on stderr says why); 2 bad usage (which flag, and what was expected).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time

from . import arrays, catalog, config, export, retention
from .config import LocalTier, MemoryTier, ObjectTier
from .errors import CorruptCheckpointError, MtckptError, StepNotFoundError
from .format import naming
from .tiers.base import Storage
from .tiers.directory import DirectoryStorage
from .tiers.local import LocalStorage


class UsageError(Exception):
    """Bad usage: exit code 2."""


def _daemon(args: argparse.Namespace) -> int:
    from .config import DAEMON_OPTIONS, load_daemon, remote_at
    from .daemon import Daemon, DaemonConfig
    from .daemon.rpc import TLSFiles, read_token

    settings = load_daemon(args.config)
    for key in DAEMON_OPTIONS:  # flags override the file and the environment
        if getattr(args, key) is not None and key != "remote":
            settings[key] = getattr(args, key)
    if args.remote is not None:
        settings["remote"] = remote_at(args.remote, settings.get("remote"))
    if "memory_root" not in settings:
        raise UsageError(
            "mtckpt daemon: no memory root: give --memory-root, or memory_root in the config "
            "file's [daemon] table, or MTCKPT_DAEMON_MEMORY_ROOT"
        )
    tls_files = [settings.pop(key, None) for key in ("tls_cert", "tls_key", "tls_ca")]
    if any(tls_files) and not all(tls_files):
        raise UsageError("mtckpt daemon: --tls-cert, --tls-key and --tls-ca go together")
    settings["tls"] = TLSFiles(*tls_files) if all(tls_files) else None
    settings["token"] = read_token(settings.pop("token_file", None))
    settings.setdefault("node_id", os.uname().nodename)
    config = DaemonConfig(**settings)
    os.nice(config.nice)
    daemon = Daemon(config)
    daemon.start()

    def on_signal(signum, frame):  # drain off the signal handler; main waits for it
        threading.Thread(target=daemon.stop, name="mtckpt-drain").start()

    faulthandler.register(signal.SIGUSR1)  # kill -USR1: every thread's stack, on stderr
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    metrics = daemon.endpoint.address if daemon.endpoint is not None else "-"
    print(
        f"mtckpt daemon {config.node_id} ready: tcp {daemon.address or '-'} "
        f"socket {config.socket or '-'} metrics {metrics}",
        flush=True,
    )
    daemon.wait()
    return 0


def _restore(args: argparse.Namespace) -> int:
    """From this node's daemon (peers), or with --from / --to or no daemon configured,
    from the tiers of the config file to the faster ones or an export directory."""
    address = None if args.from_tier or args.to else _daemon_address(args)
    if address is None:
        return _restore_from_tiers(args)
    import grpc

    from .daemon.rpc import Client, read_token

    step = None if args.step in (None, "latest") else _step_number(args.step)
    run = _run_name(args, [])
    with Client(address[0], token=read_token(address[1]), timeout=args.timeout) as client:
        try:
            reply = client.recover(run, step, timeout=args.timeout)
        except grpc.RpcError as exc:
            return _fail(args, exc.details())
    result = {"run": run, "step": reply.step, "ranks": list(reply.ranks),
              "bytes": reply.bytes, "sources": list(reply.sources)}  # fmt: skip
    source = ", ".join(reply.sources) or "this node (nothing to fetch)"
    _emit(args, result, f"run {run} step {reply.step}: ranks {list(reply.ranks)} ready in "
                        f"node memory; {_size(reply.bytes)} from {source}")  # fmt: skip
    return 0


def _restore_from_tiers(args: argparse.Namespace) -> int:
    tiers = _tiers(args, allow_filter=False, must_exist=False)
    run = _run_name(args, tiers)
    names = [t.name for t in tiers]
    if args.from_tier is not None and args.from_tier not in names:
        return _fail(args, f"--from {args.from_tier}: no such tier here (tiers: "
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
        wanted = _step_number(args.step)
        if wanted not in steps:
            listed = steps[:10] or "none"
            return _fail(args, f"run {run} step {wanted} is not complete in "
                               f"{_described(sources)} (complete: {listed})")  # fmt: skip
        steps = [wanted]
    if not steps:
        return _fail(args, f"run {run} has no complete step in {_described(sources)}")
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
                _emit(args, result, f"run {run} step {step} is in the {source.name} tier already, "
                                    "the fastest, and verifies: nothing to copy")  # fmt: skip
                return 0
            try:
                copied, size = _copy_to(source, targets, run, step, ranks, args)
            except CorruptCheckpointError as exc:
                print(f"mtckpt restore: {exc}; trying another copy", file=sys.stderr)
                continue
            result = {"run": run, "step": step, "ranks": copied, "bytes": size,
                      "source": source.name, "to": [t.describe() for t in targets]}  # fmt: skip
            _emit(args, result, f"run {run} step {step}: ranks {copied} ({_size(size)}, "
                                f"verified) from the {source.name} tier to "
                                f"{_described(targets)}")  # fmt: skip
            return 0
    return _fail(args, f"run {run}: no good copy of step(s) {steps[:10]} in {_described(sources)}")


def _copy_to(source, targets, run, step, ranks, args) -> tuple[list[int], int]:
    """Copy ``step`` from ``source`` into the first target, then from it into the others;
    a target that did not hold the step before keeps nothing of a failed copy."""
    total = sum(m.file_size for m in catalog.manifests(source, run, step)
                if ranks is None or m.rank in ranks)  # fmt: skip
    progress = Progress(f"step {step}", total * len(targets), args.json)
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


class Progress:
    """Bytes copied and the rate, on one line of a terminal's stderr; silent otherwise."""

    def __init__(self, what: str, total: int, quiet: bool) -> None:
        self.what, self.total, self.done = what, total, 0
        self.shown = not quiet and sys.stderr.isatty()
        self.started = time.monotonic()

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        if self.shown:
            rate = self.done / max(time.monotonic() - self.started, 1e-6)
            print(f"\r{self.what}: {_size(self.done)} / {_size(self.total)}  "
                  f"{_size(rate)}/s   ", end="", file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.shown and self.done:
            print(file=sys.stderr)


def _ls(args: argparse.Namespace) -> int:
    tiers = _tiers(args)
    rows = []
    for storage in tiers:
        for info in catalog.listing(storage, args.run):
            row = info.to_json()
            if args.verify and info.status == catalog.COMPLETE:
                _, problems = catalog.verify(storage, info.run, info.step)
                row["status"] = "verified" if not problems else catalog.DAMAGED
                row["problems"] += problems
            rows.append(row)
    address = _daemon_address(args)
    if address is not None:
        rows += _peer_rows(address, args)
    damaged = sum(row["status"] == catalog.DAMAGED for row in rows)
    code = 1 if args.verify and damaged else 0
    if code:
        print(f"mtckpt ls: {damaged} damaged cop{'y' if damaged == 1 else 'ies'} found",
              file=sys.stderr)  # fmt: skip
    if args.json:
        print(json.dumps(rows))
        return code
    if not rows:
        print(f"no checkpoints in {_described(tiers)}")
        return 0
    now = time.time()
    table = [("TIER", "RUN", "STEP", "STATUS", "RANKS", "WORLD", "SIZE", "AGE")]
    for row in rows:
        age = "-" if row["modified"] is None else _age(now - row["modified"])
        table.append((row["tier"], row["run"], str(row["step"]), row["status"],
                      _ranges(row["ranks"]), str(row["world_size"] or "-"),
                      _size(row["bytes"]), age))  # fmt: skip
    _print_table(table)
    for row in rows:
        for problem in row["problems"]:
            print(f"{row['tier']} {row['run']} step {row['step']}: {problem}")
    return code


def _peer_rows(address: tuple[str, str | None], args: argparse.Namespace) -> list[dict]:
    """What this node's daemon and each peer it knows hold: one row per daemon, run,
    step and origin (the node that saved it)."""
    import grpc

    from .daemon.rpc import Client, read_token

    token = read_token(address[1])
    try:
        with Client(address[0], token=token, timeout=args.timeout) as client:
            status = client.status()
            daemons = [(f"daemon {status.node_id}", client.list_shards(run=args.run or ""))]
    except grpc.RpcError as exc:  # the tiers are listed all the same
        print(f"mtckpt ls: daemon {address[0]}: {exc.details()}", file=sys.stderr)
        return []
    for peer in status.peers:  # unreachable ones too: the daemon may not have asked yet
        try:
            with Client(peer.address, token=token, timeout=min(args.timeout, 10)) as client:
                listing = client.list_shards(run=args.run or "")
            daemons.append((f"peer {listing.node_id or peer.address}", listing))
        except grpc.RpcError as exc:
            print(f"mtckpt ls: peer {peer.node_id or '?'} ({peer.address}): {exc.details()}",
                  file=sys.stderr)  # fmt: skip
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
    return list(rows.values())


def _inspect(args: argparse.Namespace) -> int:
    tiers = _tiers(args)
    run = _run_name(args, tiers)
    step = _chosen_step(args, tiers, run)
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
            return _fail(args, f"run {run} step {step} has no readable copy: "
                               + "; ".join(problems))  # fmt: skip
        return _fail(args, f"run {run} step {step} is not complete in {_described(tiers)}")
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
    _print_table([("RANK", "SIZE", "STORED", "ENCODING", "LEAVES")] + [
        (str(r["rank"]), _size(r["bytes"]), _size(r["stored_bytes"]), r["encoding"],
         str(r["leaves"])) for r in result["ranks"]])  # fmt: skip
    print()
    table = [("KEY", "KIND", "DTYPE", "SHAPE", "SHARDS")]
    for leaf in result["leaves"]:
        shards = ", ".join(f"rank {s['rank']} {s['shape']}@{s['offset']}" for s in leaf["shards"])
        shape = "-" if leaf["shape"] is None else str(leaf["shape"])
        if "value" in leaf:
            shape = _short(repr(leaf["value"]))
        table.append((leaf["key"], leaf["kind"], leaf["dtype"] or "-", shape, shards or "-"))
    _print_table(table)
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
        raise UsageError("mtckpt verify: give a STEP (or 'latest'), or --all")
    tiers = _tiers(args)
    run = None if args.all and args.run is None else _run_name(args, tiers)
    step = None if args.all else _chosen_step(args, tiers, run)
    rows = []
    for storage in tiers:
        for info in catalog.listing(storage, run):
            if step is not None and info.step != step:
                continue
            if info.status == catalog.INCOMPLETE:
                rows.append({"tier": storage.name, "run": info.run, "step": info.step,
                             "status": "incomplete", "bytes": 0, "problems": []})  # fmt: skip
                continue
            checked, problems = catalog.verify(storage, info.run, info.step)
            rows.append({"tier": storage.name, "run": info.run, "step": info.step,
                         "status": "ok" if not problems else "damaged", "bytes": checked,
                         "problems": problems})  # fmt: skip
    if step is not None and not any(r["status"] != "incomplete" for r in rows):
        return _fail(args, f"run {run} step {step} is not complete in {_described(tiers)}")
    bad = [r for r in rows if r["status"] == "damaged"]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['tier']:8} {r['run']} step {r['step']}: {r['status']}"
                  + (f" ({_size(r['bytes'])} checked)" if r["status"] == "ok" else ""))  # fmt: skip
            for problem in r["problems"]:
                print(f"    {problem}")
    if bad:
        print(f"mtckpt verify: {len(bad)} of {len(rows)} cop{'y' if len(rows) == 1 else 'ies'} "
              "damaged", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _gc(args: argparse.Namespace) -> int:
    tiers = _tiers(args)
    rows = []
    for storage in tiers:
        keep, keep_every = _gc_policy(args, storage.name)
        for run in [args.run] if args.run else storage.runs():
            # rank None: the newest complete step's every shard is verified before an
            # older step goes (the operator removes whole steps)
            for removal in retention.plan(storage, run, keep, keep_every):
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


def _export(args: argparse.Namespace) -> int:
    tiers = _tiers(args)
    run = _run_name(args, tiers)
    step = _chosen_step(args, tiers, run)
    storage, manifest, values = export.read_step(tiers, run, step, args.allow_pickle)
    export.write(args.format, manifest, values, args.out)
    result = {"run": run, "step": step, "format": args.format, "out": str(args.out),
              "source": storage.name}  # fmt: skip
    _emit(args, result, f"run {run} step {step} from the {storage.name} tier written to "
                        f"{args.out} ({args.format})")  # fmt: skip
    return 0


# -- selection: tiers, run, step ------------------------------------------------------------

_DEFAULT_KEEP = {"memory": MemoryTier.keep, "local": LocalTier.keep, "remote": ObjectTier.keep}


def _gc_policy(args: argparse.Namespace, tier: str) -> tuple[int, int | None]:
    """``keep`` and ``keep_every`` for ``tier``: the flags, else the tier's in the config
    file (and MTCKPT_* variables), else the tier's defaults."""
    tier_cfg = _settings(args).get(tier)
    keep = args.keep if args.keep is not None else getattr(tier_cfg, "keep", _DEFAULT_KEEP[tier])
    keep_every = (args.keep_every if args.keep_every is not None
                  else getattr(tier_cfg, "keep_every", None))  # fmt: skip
    return keep, keep_every


def _settings(args: argparse.Namespace, daemon: bool = False) -> dict:
    """The config file's settings (with MTCKPT_* variables): the library's, or with
    ``daemon`` the daemon's; each read once per command."""
    cache = vars(args).setdefault("settings", {})
    if daemon not in cache:
        cache[daemon] = (config.load_daemon if daemon else config.load)(args.config)
    return cache[daemon]


def _tiers(
    args: argparse.Namespace, allow_filter: bool = True, must_exist: bool = True
) -> list[Storage]:
    """The tiers to read, fastest first: those given by --memory / --local / --remote, else
    the config file's and MTCKPT_* variables' (the library's; the memory tier by default),
    narrowed to --tier. A directory given by a flag must exist, unless ``must_exist`` is
    False (restore fills missing ones); a configured one may be gone (a wiped node)."""
    from .tiers.object import object_storage

    storages: list[Storage] = []
    given = {"memory": args.memory, "local": args.local, "remote": args.remote}
    if any(given.values()):
        memory, local = given["memory"], given["local"]
        for flag in ("memory", "local"):
            path = given[flag]
            if must_exist and path and not config.expand_path(path).is_dir():
                raise UsageError(f"mtckpt {args.command}: --{flag} {path}: no such directory")
        remote = ObjectTier(url=given["remote"]) if given["remote"] else None
    else:
        settings, daemon = _settings(args), _settings(args, daemon=True)
        memory = (settings["memory"].path if "memory" in settings
                  else daemon.get("memory_root", MemoryTier.path))  # fmt: skip
        local = settings["local"].path if "local" in settings else daemon.get("local_root")
        remote = settings.get("remote")
    if memory:
        storages.append(DirectoryStorage(config.expand_path(memory), "memory", durable=False,
                                         populate=False))  # fmt: skip
    if local:
        storages.append(LocalStorage(config.expand_path(local)))
    if remote is not None:
        storages.append(object_storage(remote))
    if allow_filter and args.tier is not None:
        chosen = [s for s in storages if s.name == args.tier]
        if not chosen:
            raise UsageError(f"mtckpt {args.command}: --tier {args.tier}: not configured (tiers: "
                             f"{', '.join(s.name for s in storages)})")  # fmt: skip
        return chosen
    return storages


def _run_name(args: argparse.Namespace, tiers: list[Storage]) -> str:
    """--run, else the config's run, else the one run the tiers hold."""
    if args.run:
        return naming.check_run(args.run)
    configured = _settings(args).get("run")
    if configured:
        return configured
    runs = sorted({run for storage in tiers for run in storage.runs()})
    if len(runs) == 1:
        return runs[0]
    raise UsageError(f"mtckpt {args.command}: which run? give --run (found: "
                     f"{', '.join(runs) or 'none'} in {_described(tiers)})")  # fmt: skip


def _chosen_step(args: argparse.Namespace, tiers: list[Storage], run: str) -> int:
    if args.step not in (None, "latest"):
        return _step_number(args.step)
    newest = max((s for t in tiers for s in catalog.newest_complete(t, run)), default=None)
    if newest is None:
        raise StepNotFoundError(f"run {run} has no complete step in {_described(tiers)}")
    return newest


def _step_number(text: str) -> int:
    try:
        return naming.check_step(int(text))
    except ValueError:
        raise UsageError(f"step {text!r}: expected a step number or 'latest'") from None


def _daemon_address(args: argparse.Namespace) -> tuple[str, str | None] | None:
    """This node's daemon and its token file: --daemon, else the config file (the
    trainers' [peers] daemon, else the [daemon] socket) and MTCKPT_* variables; None
    if neither names one."""
    if args.daemon:
        return args.daemon, args.token_file
    peers = _settings(args).get("peers")
    if peers is not None:
        return peers.daemon, args.token_file or peers.token_file
    daemon = _settings(args, daemon=True)
    if daemon.get("socket"):
        return f"unix://{daemon['socket']}", args.token_file or daemon.get("token_file")
    return None


# -- output ---------------------------------------------------------------------------------


def _emit(args: argparse.Namespace, result: dict, text: str) -> None:
    print(json.dumps(result) if args.json else text)


def _fail(args: argparse.Namespace, reason: str) -> int:
    print(f"mtckpt {args.command}: {reason}", file=sys.stderr)
    return 1


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def _ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2,5``."""
    out, start = [], None
    for i, rank in enumerate(ranks):
        if start is None:
            start = rank
        if i + 1 == len(ranks) or ranks[i + 1] != rank + 1:
            out.append(str(start) if start == rank else f"{start}-{rank}")
            start = None
    return ",".join(out) or "-"


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _described(tiers) -> str:
    return ", ".join(t.describe() for t in tiers) or "no tier"


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def _rank_list(text: str) -> list[int]:
    try:
        return sorted({int(item) for item in _comma_list(text)})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ranks such as 0,1") from None


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mtckpt", description="multi-tier checkpointing")
    top.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = top.add_subparsers(dest="command", required=True)

    d = commands.add_parser(
        "daemon",
        help="run the node daemon",
        description="Run the node daemon. Every option may also come from the config "
        "file's [daemon] table (same names, with underscores) or a MTCKPT_DAEMON_* "
        "variable; flags override variables, which override the file.",
    )
    d.add_argument("--config", help="TOML file (default: $MTCKPT_CONFIG)")
    d.add_argument("--node-id", help="this node's id (default: $MTCKPT_NODE_ID or hostname)")
    d.add_argument("--listen", help="HOST:PORT for peers (127.0.0.1:7787)")
    d.add_argument("--socket", help="Unix socket path for trainers and operators")
    d.add_argument("--memory-root", help="the node's memory tier directory")
    d.add_argument("--local-root", help="the node's local tier directory (recovered steps too)")
    d.add_argument("--peers", type=_comma_list, help="comma list of peer HOST:PORT")
    d.add_argument("--peers-dns", help="NAME:PORT resolving to every daemon")
    d.add_argument("--replicas", type=int, help="copies of each shard on peers (1)")
    d.add_argument("--zone", help="failure-domain label (zone, rack)")
    d.add_argument("--keep", type=int, help="steps of each run kept as replicas (2)")
    d.add_argument("--token-file", help="file holding the shared token")
    d.add_argument("--tls-cert", help="PEM certificate of this daemon (mTLS)")
    d.add_argument("--tls-key", help="PEM key of that certificate")
    d.add_argument("--tls-ca", help="PEM CA that signs every daemon's certificate")
    d.add_argument("--insecure", action="store_const", const=True, default=None,
                   help="serve peers without authentication: loopback addresses only, "
                        "for tests on one machine")  # fmt: skip
    d.add_argument("--bandwidth", type=float, help="replication cap in bytes/s")
    d.add_argument("--drain-timeout", type=float, help="seconds, on SIGTERM (60)")
    d.add_argument("--scan-interval", type=float,
                   help="seconds between scans for committed steps (0.5)")  # fmt: skip
    d.add_argument("--data-port", type=int, help="bulk data port (0: any free one)")
    d.add_argument("--stream-idle-timeout", type=float,
                   help="seconds a peer's Fetch or Push stream may make no progress before "
                        "it is cancelled (30)")  # fmt: skip
    d.add_argument("--nice", type=int, help="added to the daemon's nice value, 0..19 (10)")
    d.add_argument("--metrics-listen", help="HOST:PORT serving Prometheus /metrics, /healthz "
                   "and /readyz (default: none)")  # fmt: skip
    d.add_argument("--remote", help="object tier URL trainers' steps are flushed to (default: "
                   "the config file's [remote] table, whose other settings apply too)")  # fmt: skip
    d.set_defaults(handler=_daemon)

    def selection(sub: argparse.ArgumentParser, run_help: str = "the run (default: the "
                  "config's run, else the only run found)") -> None:  # fmt: skip
        sub.add_argument("--run", help=run_help)
        sub.add_argument("--config", help="TOML file of the tiers, as the library reads it "
                         "(default: $MTCKPT_CONFIG; MTCKPT_* variables apply)")  # fmt: skip
        sub.add_argument("--memory", metavar="DIR", help="a memory tier root (instead of the "
                         "config's tiers)")  # fmt: skip
        sub.add_argument("--local", metavar="DIR", help="a local tier root")
        sub.add_argument("--remote", metavar="URL", help="an object tier URL (s3://, file://, ...)")
        sub.add_argument("--tier", choices=("memory", "local", "remote"),
                         help="only this tier")  # fmt: skip
        sub.add_argument("--json", action="store_true", help="JSON on stdout, for scripts")

    def daemon_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--daemon", help="unix:///PATH (or HOST:PORT) of this node's daemon")
        sub.add_argument("--token-file", help="the daemon's shared token")
        sub.add_argument("--timeout", type=float, default=600.0, help="seconds (600)")

    ls = commands.add_parser(
        "ls", help="list the steps each tier (and each peer daemon) holds",
        description="Steps per tier: complete, incomplete or damaged (verified with "
        "--verify), the ranks and world size, sizes and ages; with a daemon (--daemon, or "
        "[peers] / [daemon] socket in the config), what it and each peer it knows hold.",
    )  # fmt: skip
    selection(ls, "only this run (default: every run)")
    ls.add_argument("--verify", action="store_true", help="check every checksum of complete steps")
    daemon_flags(ls)
    ls.set_defaults(handler=_ls)

    i = commands.add_parser("inspect", help="the tree, dtypes, shapes and shards of a step")
    i.add_argument("step", nargs="?", help="a step number or 'latest' (default)")
    selection(i)
    i.set_defaults(handler=_inspect)

    v = commands.add_parser(
        "verify", help="check every checksum of a step (or all steps)",
        description="Reads every shard of the step on each tier and checks each chunk's "
        "crc32c. Exit code 1 if any copy is damaged (each problem is named).",
    )  # fmt: skip
    v.add_argument("step", nargs="?", help="a step number or 'latest'")
    v.add_argument("--all", action="store_true", help="every step of every run (or of --run)")
    selection(v)
    v.set_defaults(handler=_verify)

    r = commands.add_parser(
        "restore", help="fetch the newest good checkpoint into this node's tiers",
        description="With this node's daemon (--daemon, or the config's [peers] daemon / "
        "[daemon] socket): the daemon pulls the node's shards from its peers into node "
        "memory. With --from or --to, or without a daemon: the newest complete step is "
        "copied, every chunk verified, from the fastest tier holding it into the faster "
        "configured tiers (or into the directory --to, a tier root of its own); a damaged "
        "copy is skipped for another tier or an older step.",
    )  # fmt: skip
    selection(r, "the run (default: the config's run, else the only run found)")
    r.add_argument("--step", help="a step number or 'latest' (default)")
    r.add_argument("--from", dest="from_tier", choices=("memory", "local", "remote"),
                   help="read this tier only (and copy into the faster ones)")  # fmt: skip
    r.add_argument("--to", metavar="DIR", help="copy into this directory instead")
    r.add_argument("--ranks", type=_rank_list, help="only these ranks (comma list; default: all)")
    daemon_flags(r)
    r.set_defaults(handler=_restore)

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
    selection(g, "only this run (default: every run)")
    g.add_argument(
        "--keep",
        type=_at_least_one,
        help="complete steps to keep per tier "
        "(default: the tier's keep in the config, else 2 (remote: 3))",
    )
    g.add_argument("--keep-every", type=_at_least_one, metavar="N",
                   help="also keep complete steps that are multiples of N (default: the "
                   "config's remote.keep_every)")  # fmt: skip
    g.add_argument("--apply", action="store_true", help="remove them (default: a dry run)")
    g.set_defaults(handler=_gc)

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
    selection(e)
    e.set_defaults(handler=_export)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return args.handler(args)
    except UsageError as exc:
        message = str(exc)
        prefix = f"mtckpt {args.command}: "
        print(message if message.startswith(prefix) else prefix + message, file=sys.stderr)
        return 2
    except (ValueError, OSError, MtckptError) as exc:  # a one-line reason, not a traceback
        print(f"mtckpt {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
