"""``mtckpt daemon``: the node daemon, configured from flags, MTCKPT_DAEMON_* variables and
the config file."""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import threading

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
    d.add_argument("--node-id", help="this node's id (default: $MTCKPT_NODE_ID or hostname)")
    d.add_argument("--listen", help="HOST:PORT for peers (127.0.0.1:7787)")
    d.add_argument("--socket", help="Unix socket path for trainers and operators")
    d.add_argument("--memory-root", help="the node's memory tier directory")
    d.add_argument("--local-root", help="the node's local tier directory (recovered steps too)")
    d.add_argument("--peers", type=common.comma_list, help="comma list of peer HOST:PORT")
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


def _daemon(args: argparse.Namespace) -> int:
    from ..config import DAEMON_OPTIONS, load_daemon, remote_at
    from ..daemon.rpc import TLSFiles, read_token
    from ..daemon.service import Daemon, DaemonConfig

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
    tls_files = [settings.pop(key, None) for key in ("tls_cert", "tls_key", "tls_ca")]
    if any(tls_files) and not all(tls_files):
        raise common.UsageError("mtckpt daemon: --tls-cert, --tls-key and --tls-ca go together")
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
