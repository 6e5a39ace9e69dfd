"""What every command shares: choosing tiers, run and step; argument types; output."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

from .. import catalog, config, options
from ..config import MemoryTier, ObjectTier
from ..daemon import config as daemon_config
from ..errors import StepNotFoundError
from ..format import naming
from ..tiers.base import Storage
from ..tiers.budget import human_size
from ..tiers.directory import DirectoryStorage
from ..tiers.local import LocalStorage


class UsageError(Exception):
    """Bad usage: exit code 2."""


def config_settings(args: argparse.Namespace, daemon: bool = False) -> dict:
    """The config file's settings (with MTCKPT_* variables): the library's, or with
    ``daemon`` the daemon's; each read once per command."""
    cache = vars(args).setdefault("settings", {})
    if daemon not in cache:
        cache[daemon] = (daemon_config.load_daemon if daemon else config.load)(args.config)
    return cache[daemon]


def chosen_tiers(
    args: argparse.Namespace, allow_filter: bool = True, must_exist: bool = True
) -> list[Storage]:
    """The tiers to read, fastest first: those given by --memory / --local / --remote, else
    the config file's and MTCKPT_* variables' (the library's; the memory tier by default),
    narrowed to --tier. A directory given by a flag must exist, unless ``must_exist`` is
    False (restore fills missing ones); a configured one may be gone (a wiped node)."""
    from ..tiers.object import object_storage

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
        settings, daemon = config_settings(args), config_settings(args, daemon=True)
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


def run_name(args: argparse.Namespace, tiers: list[Storage]) -> str:
    """--run, else the config's run, else the one run the tiers hold."""
    if args.run:
        return naming.check_run(args.run)
    configured = config_settings(args).get("run")
    if configured:
        return configured
    runs = sorted({run for storage in tiers for run in storage.runs()})
    if len(runs) == 1:
        return runs[0]
    raise UsageError(f"mtckpt {args.command}: which run? give --run (found: "
                     f"{', '.join(runs) or 'none'} in {described(tiers)})")  # fmt: skip


def chosen_step(args: argparse.Namespace, tiers: list[Storage], run: str) -> int:
    if args.step not in (None, "latest"):
        return step_number(args.step)
    newest = max((s for t in tiers for s in catalog.newest_complete(t, run)), default=None)
    if newest is None:
        raise StepNotFoundError(f"run {run} has no complete step in {described(tiers)}")
    return newest


def step_number(text: str) -> int:
    try:
        return naming.check_step(int(text))
    except ValueError:
        raise UsageError(f"step {text!r}: expected a step number or 'latest'") from None


def daemon_address(args: argparse.Namespace) -> tuple[str, str | None] | None:
    """This node's daemon and its token file: --daemon, else the config file (the
    trainers' [peers] daemon, else the [daemon] socket) and MTCKPT_* variables; None
    if neither names one."""
    if args.daemon:
        return args.daemon, args.token_file
    peers = config_settings(args).get("peers")
    if peers is not None:
        return peers.daemon, args.token_file or peers.token_file
    daemon = config_settings(args, daemon=True)
    if daemon.get("socket"):
        return f"unix://{daemon['socket']}", args.token_file or daemon.get("token_file")
    return None


# -- arguments --------------------------------------------------------------------------------


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


def at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def rank_list(text: str) -> list[int]:
    try:
        return sorted({int(item) for item in options.comma_list(text)})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ranks such as 0,1") from None


# -- output -----------------------------------------------------------------------------------


def emit(args: argparse.Namespace, result: dict, text: str) -> None:
    print(json.dumps(result) if args.json else text)


def fail(args: argparse.Namespace, reason: str) -> int:
    print(f"mtckpt {args.command}: {reason}", file=sys.stderr)
    return 1


def human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def rank_ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2,5``."""
    out, start = [], None
    for i, rank in enumerate(ranks):
        if start is None:
            start = rank
        if i + 1 == len(ranks) or ranks[i + 1] != rank + 1:
            out.append(str(start) if start == rank else f"{start}-{rank}")
            start = None
    return ",".join(out) or "-"


def shortened(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def described(tiers) -> str:
    return ", ".join(t.describe() for t in tiers) or "no tier"


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


class Progress:
    """Bytes done (of ``total``; 0: not known) and the rate, on one line of a terminal's
    stderr (redrawn at most every 0.1 s, and at the end); silent otherwise."""

    def __init__(self, what: str, total: int, quiet: bool) -> None:
        self.what, self.total, self.done = what, total, 0
        self.shown = not quiet and sys.stderr.isatty()
        self.started = self._drawn = time.monotonic()
        self._lock = threading.Lock()  # checks on several threads report

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            if self.shown and time.monotonic() - self._drawn >= 0.1:
                self._draw()

    def _draw(self) -> None:
        self._drawn = now = time.monotonic()
        rate = self.done / max(now - self.started, 1e-6)
        of = f" / {human_size(self.total)}" if self.total else ""
        print(f"\r{self.what}: {human_size(self.done)}{of}  {human_size(rate)}/s   ",
              end="", file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.shown and self.done:
            self._draw()
            print(file=sys.stderr)
