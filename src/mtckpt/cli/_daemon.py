"""``mtckpt daemon``: the node daemon, configured from flags, MTCKPT_DAEMON_* variables and
the config file."""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import os
import signal
import threading

from .. import options
from ..config import remote_at
from ..daemon.config import DAEMON_OPTIONS, DaemonConfig, load_daemon
from . import _common as common


def add_parsers(commands) -> None:
    d = commands.add_parser(
        "daemon",
        help="run the node daemon",
        description="Run the node daemon. Every option may also come from the config "
        "file's [daemon] table (same names, with underscores) or a MTCKPT_DAEMON_* "
        "variable; flags override variables, which override the file.",
    )
    d.add_argument("--config", help="TOML file (default: $MTCKPT_CONFIG)")
    for field in dataclasses.fields(DaemonConfig):
        d.add_argument(f"--{field.name.replace('_', '-')}", **_flag(field))
    d.set_defaults(handler=_daemon)


def _flag(field: dataclasses.Field) -> dict:
    """argparse keywords of a daemon option's flag: its type, and its meaning with the
    default. Every flag defaults to None: only what is given overrides the file."""
    kind = DAEMON_OPTIONS[field.name]
    text = options.help_of(field)
    if field.default not in (dataclasses.MISSING, None, "", False):
        text = f"{text} ({field.default})"
    if kind is bool:
        return {"action": "store_const", "const": True, "default": None, "help": text}
    if kind is list:
        return {"type": options.comma_list, "help": text}
    return {"type": kind, "help": text}


def _daemon(args: argparse.Namespace) -> int:
    from ..daemon.service import Daemon

    settings = load_daemon(args.config)
    for key in DAEMON_OPTIONS:  # flags override the file and the environment
        if getattr(args, key) is not None and key != "remote":
            settings[key] = getattr(args, key)
    if args.remote is not None:
        settings["remote"] = remote_at(args.remote, settings.get("remote"))
    if "memory_root" not in settings:
        raise common.UsageError(
            "mtckpt daemon: no memory root: give --memory-root, or memory_root in the config "
            "file's [daemon] table, or MTCKPT_DAEMON_MEMORY_ROOT"
        )
    tls_files = [settings.get(key) for key in ("tls_cert", "tls_key", "tls_ca")]
    if any(tls_files) and not all(tls_files):
        raise common.UsageError("mtckpt daemon: --tls-cert, --tls-key and --tls-ca go together")
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
