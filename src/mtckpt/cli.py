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
    from .daemon import Daemon, DaemonConfig
    from .daemon.rpc import TLSFiles, read_token

    token = read_token(args.token_file)
    tls = None
    if args.tls_cert or args.tls_key or args.tls_ca:
        if not (args.tls_cert and args.tls_key and args.tls_ca):
            raise SystemExit("mtckpt daemon: --tls-cert, --tls-key and --tls-ca go together")
        tls = TLSFiles(args.tls_cert, args.tls_key, args.tls_ca)
    config = DaemonConfig(
        node_id=args.node_id or os.environ.get("MTCKPT_NODE_ID") or os.uname().nodename,
        memory_root=args.memory_root,
        listen=args.listen,
        socket=args.socket,
        peers=[p for p in (args.peers or "").split(",") if p],
        peers_dns=args.peers_dns,
        replicas=args.replicas,
        zone=args.zone or "",
        keep=args.keep,
        token=token,
        tls=tls,
        bandwidth=args.bandwidth,
        drain_timeout=args.drain_timeout,
        scan_interval=args.scan_interval,
    )
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
    with Client(args.daemon, token=read_token(args.token_file), timeout=args.timeout) as client:
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


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mtckpt", description="multi-tier checkpointing")
    top.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = top.add_subparsers(dest="command", required=True)

    d = commands.add_parser("daemon", help="run the node daemon")
    d.add_argument("--node-id", help="this node's id (default: $MTCKPT_NODE_ID or hostname)")
    d.add_argument("--listen", default="127.0.0.1:7787", help="HOST:PORT for peers")
    d.add_argument("--socket", help="Unix socket path for trainers and operators")
    d.add_argument("--memory-root", required=True, help="the node's memory tier directory")
    d.add_argument("--peers", help="comma list of peer HOST:PORT")
    d.add_argument("--peers-dns", help="NAME:PORT resolving to every daemon")
    d.add_argument("--replicas", type=int, default=1, help="copies of each shard on peers")
    d.add_argument("--zone", help="failure-domain label (zone, rack)")
    d.add_argument("--keep", type=int, default=2, help="steps of each run kept as replicas")
    d.add_argument("--token-file", help="file holding the shared token")
    d.add_argument("--tls-cert")
    d.add_argument("--tls-key")
    d.add_argument("--tls-ca")
    d.add_argument("--bandwidth", type=float, help="replication cap in bytes/s")
    d.add_argument("--drain-timeout", type=float, default=60.0, help="seconds, on SIGTERM")
    d.add_argument("--scan-interval", type=float, default=0.5,
                   help="seconds between scans for committed steps")  # fmt: skip
    d.set_defaults(handler=_daemon)

    r = commands.add_parser("restore", help="fetch this node's newest good checkpoint")
    r.add_argument("--run", required=True)
    r.add_argument("--step", help="a step number or 'latest' (default)")
    r.add_argument("--daemon", required=True, help="unix:///path of this node's daemon")
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
