"""The ``mtckpt`` command line (also ``python -m mtckpt``).

Exit codes: 0 success; 1 the operation failed (one line on stderr says why); 2 bad usage.
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

from .errors import MtckptError


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
        raise SystemExit(
            "mtckpt daemon: no memory root: give --memory-root, or memory_root in the config "
            "file's [daemon] table, or MTCKPT_DAEMON_MEMORY_ROOT"
        )
    tls_files = [settings.pop(key, None) for key in ("tls_cert", "tls_key", "tls_ca")]
    if any(tls_files) and not all(tls_files):
        raise SystemExit("mtckpt daemon: --tls-cert, --tls-key and --tls-ca go together")
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
    print(
        f"mtckpt daemon {config.node_id} ready: tcp {daemon.address or '-'} "
        f"socket {config.socket or '-'}",
        flush=True,
    )
    daemon.wait()
    return 0


def _restore(args: argparse.Namespace) -> int:
    import grpc

    from .daemon.rpc import Client, read_token

    step = None if args.step in (None, "latest") else int(args.step)
    address, token_file = _daemon_address(args)
    with Client(address, token=read_token(token_file), timeout=args.timeout) as client:
        try:
            reply = client.recover(args.run, step, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"mtckpt restore: {exc.details()}", file=sys.stderr)
            return 1
    result = {"run": args.run, "step": reply.step, "ranks": list(reply.ranks),
              "bytes": reply.bytes, "sources": list(reply.sources)}  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        source = ", ".join(reply.sources) or "this node (nothing to fetch)"
        print(f"run {args.run} step {reply.step}: ranks {list(reply.ranks)} ready in node "
              f"memory; {reply.bytes} bytes from {source}")  # fmt: skip
    return 0


def _daemon_address(args: argparse.Namespace) -> tuple[str, str | None]:
    """This node's daemon and its token file: the flags, else the config file (the
    trainers' [peers] daemon, else the [daemon] socket) and MTCKPT_* variables."""
    if args.daemon:
        return args.daemon, args.token_file
    from .config import load, load_daemon

    peers = load(args.config).get("peers")
    if peers is not None:
        return peers.daemon, args.token_file or peers.token_file
    daemon = load_daemon(args.config)
    if daemon.get("socket"):
        return f"unix://{daemon['socket']}", args.token_file or daemon.get("token_file")
    raise SystemExit(
        "mtckpt restore: which daemon? give --daemon unix:///PATH, or a config file "
        "(--config or $MTCKPT_CONFIG) with [peers] daemon or [daemon] socket"
    )


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
    d.add_argument("--bandwidth", type=float, help="replication cap in bytes/s")
    d.add_argument("--drain-timeout", type=float, help="seconds, on SIGTERM (60)")
    d.add_argument("--scan-interval", type=float,
                   help="seconds between scans for committed steps (0.5)")  # fmt: skip
    d.add_argument("--data-port", type=int, help="bulk data port (0: any free one)")
    d.add_argument("--nice", type=int, help="added to the daemon's nice value, 0..19 (10)")
    d.add_argument("--remote", help="object tier URL trainers' steps are flushed to (default: "
                   "the config file's [remote] table, whose other settings apply too)")  # fmt: skip
    d.set_defaults(handler=_daemon)

    r = commands.add_parser("restore", help="fetch this node's newest good checkpoint")
    r.add_argument("--run", required=True)
    r.add_argument("--step", help="a step number or 'latest' (default)")
    r.add_argument("--daemon", help="unix:///path of this node's daemon")
    r.add_argument("--config", help="TOML file naming the daemon (default: $MTCKPT_CONFIG)")
    r.add_argument("--token-file")
    r.add_argument("--timeout", type=float, default=600.0)
    r.add_argument("--json", action="store_true", help="one JSON object on stdout")
    r.set_defaults(handler=_restore)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return args.handler(args)
    except (ValueError, OSError, MtckptError) as exc:  # a one-line reason, not a traceback
        print(f"mtckpt {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
