"""The node daemon's options, declared once (:mod:`mtckpt.options`), and their loader: the
config file's ``[daemon]`` table, ``MTCKPT_DAEMON_*`` variables and (in the CLI) the flags
of ``mtckpt daemon``, which are made from the same declarations. No gRPC here."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import options
from ..config import ObjectTier, manager_kwargs, parse_env, read_file, remote_at
from ..errors import ConfigError
from ..format import naming
from ..options import option
from ..redundancy import RULE as REDUNDANCY_RULE
from ..redundancy import Redundancy


@dataclass
class DaemonConfig:
    """The node daemon's options (``mtckpt daemon``): each is a flag (``--memory-root``), a
    key of the config file's ``[daemon]`` table (``memory_root``) and a ``MTCKPT_DAEMON_*``
    variable (``MTCKPT_NODE_ID`` sets ``node_id`` too); flags override variables, which
    override the file."""

    node_id: str = option(
        help="This node's id (default: $MTCKPT_NODE_ID, else the host name). A replacement "
        "node takes the id of the node it replaces."
    )
    memory_root: str = option(
        help="The node's memory tier directory (default: the file's `[memory] path`); required.",
        rule=options.PATH,
    )
    local_root: str | None = option(
        None,
        help="The node's local tier directory (default: the file's `[local] path`): its steps "
        "are listed and served, recovered steps are written there too.",
    )
    listen: str | None = option("127.0.0.1:7787", help="HOST:PORT for peers.")
    socket: str | None = option(None, help="Unix socket path for trainers and operators.")
    peers: list[str] = option(help="Comma list of peer HOST:PORT.", factory=list)
    peers_dns: str | None = option(
        None, help="NAME:PORT resolving to every daemon (a headless service), re-read every scan."
    )
    replicas: int = option(
        1,
        help="Copies of each shard on peers: the same as redundancy `replicas:N`.",
        rule=options.int_at_least(0),
    )
    redundancy: str | None = option(
        None,
        help="How a node's shards survive its loss: `replicas:R` (R whole copies on peers), "
        "`xor:G` (groups of G nodes keep parity: any one loss per group, about 1/(G-1) of a "
        "shard in peer memory) or `rs:K+M` (Reed-Solomon in groups of K+M: any M losses, "
        "M/K of a shard). Default: `replicas:` the replicas option.",
        rule=REDUNDANCY_RULE,
    )
    memory_budget: int | None = option(
        None,
        help="Bytes the node's memory tier may hold: the trainers' slots and steps, replicas "
        "and parity for peers. Spare files give way first, then peers' new replicas and "
        "parity are refused, then trainers skip a step (logged and counted). Default: none.",
        rule=options.optional(options.int_at_least(1)),
    )
    zone: str = option("", help="Failure-domain label (zone, rack): replicas go to others first.")
    keep: int = option(2, help="Steps of each run kept as replicas.", rule=options.int_at_least(1))
    token_file: str | None = option(
        None, help="File holding the shared token (16 to 4096 printable characters)."
    )
    tls_cert: str | None = option(
        None, help="PEM certificate of this daemon (mTLS); its CN is the node id."
    )
    tls_key: str | None = option(None, help="PEM key of that certificate.")
    tls_ca: str | None = option(None, help="PEM CA that signs every daemon's certificate.")
    insecure: bool = option(
        False,
        help="Serve peers without authentication: loopback addresses only, for tests on one "
        "machine.",
    )
    incremental: bool = option(
        True,
        help="Send a peer only the blocks of a step changed since the replica of an earlier "
        "step it holds (where the trainers recorded what changed); it rebuilds the rest.",
        rule=options.BOOL,
    )
    bandwidth: float | None = option(
        None,
        help="Replication cap in bytes/s.",
        rule=options.optional(options.Rule(options.POSITIVE_SECONDS.test, "> 0 bytes/s")),
    )
    drain_timeout: float = option(
        60.0, help="Seconds replication may drain on SIGTERM.", rule=options.POSITIVE_SECONDS
    )
    scan_interval: float = option(
        0.5, help="Seconds between scans for committed steps.", rule=options.POSITIVE_SECONDS
    )
    data_port: int = option(
        0, help="Bulk data port (0: any free one).", rule=options.int_between(0, 65535)
    )
    stream_idle_timeout: float = option(
        30.0,
        help="Seconds a peer's Fetch or Push stream may make no progress before it is cancelled.",
        rule=options.POSITIVE_SECONDS,
    )
    workers: int = option(
        32,
        help="Threads of each gRPC server (the peers' and the trainers'); all but 8 may hold a "
        "long-polled Status.",
        rule=options.int_at_least(1),
    )
    nice: int = option(
        10,
        help="Added to the daemon's nice value, 0..19: training goes first.",
        rule=options.int_between(0, 19),
    )
    metrics_listen: str | None = option(
        None, help="HOST:PORT serving Prometheus /metrics, /healthz and /readyz (default: none)."
    )
    remote: ObjectTier | None = option(
        None,
        help="Object tier URL trainers' steps are flushed to (default: the config file's "
        "[remote] table, whose other settings apply too).",
        kind=str,
    )

    def __post_init__(self) -> None:
        try:
            naming.check_node_id(self.node_id)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        options.validate(self)
        if self.redundancy is not None:
            scheme = Redundancy.parse(self.redundancy)
            self.replicas = scheme.data if scheme.kind == "replicas" else 0
        if self.listen is None and self.socket is None:
            raise ConfigError("the daemon needs a TCP address (listen) or a Unix socket")
        tls = (self.tls_cert, self.tls_key, self.tls_ca)
        if any(tls) and not all(tls):
            raise ConfigError("tls_cert, tls_key and tls_ca go together")

    @property
    def scheme(self) -> Redundancy:
        """The redundancy the daemon keeps: ``redundancy``, else ``replicas:`` replicas."""
        if self.redundancy is None:
            return Redundancy.replicas(self.replicas)
        return Redundancy.parse(self.redundancy)


# The daemon's options with the type each takes in the file, a variable or a flag.
DAEMON_OPTIONS: dict[str, type] = {n: k.base for n, k in options.kinds(DaemonConfig).items()}


def load_daemon(
    path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The daemon's settings: the ``[daemon]`` table of the TOML file (``path``, default
    ``$MTCKPT_CONFIG``) overridden by ``MTCKPT_DAEMON_*`` variables (``MTCKPT_NODE_ID``
    for ``node_id`` too); only the keys set. ``peers`` is a list of ``HOST:PORT`` (in a
    variable: a comma list). Without ``memory_root`` (``local_root``), the file's
    ``[memory] path`` (``[local] path``): the daemon shares the trainers' tiers. ``remote``
    is the ObjectTier the daemon uploads to: the file's ``[remote]`` table (and
    ``MTCKPT_REMOTE_*``), at the URL ``daemon.remote`` when that is set."""
    env = os.environ if env is None else env
    settings, source = read_file(path, env)
    table = settings.get("daemon", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [daemon] must be a table")
    daemon: dict[str, Any] = {}
    for key, value in table.items():
        if key not in DAEMON_OPTIONS:
            raise ConfigError(
                f"{source}: unknown key daemon.{key}; expected one of {sorted(DAEMON_OPTIONS)}"
            )
        daemon[key] = _checked_daemon_value(f"{source}: daemon.{key}", key, value)
    for tier in ("memory", "local"):
        section, key = settings.get(tier), f"{tier}_root"
        if key not in daemon and isinstance(section, dict) and "path" in section:
            daemon[key] = _checked_daemon_value(f"{source}: {tier}.path", key, section["path"])
    if "MTCKPT_NODE_ID" in env:
        daemon["node_id"] = env["MTCKPT_NODE_ID"].strip()
    for key, kind in DAEMON_OPTIONS.items():
        name = f"MTCKPT_DAEMON_{key.upper()}"
        if name in env:
            if kind is list:
                daemon[key] = options.comma_list(env[name])
            else:
                daemon[key] = parse_env(name, env[name], kind, optional=False)
    url = daemon.pop("remote", None)
    remote = manager_kwargs(settings, source, env).get("remote")  # the file read once
    if url is not None or remote is not None:
        daemon["remote"] = remote_at(url, remote)
    return daemon


def _checked_daemon_value(where: str, key: str, value: Any) -> Any:
    kind = DAEMON_OPTIONS[key]
    if kind is list:
        if isinstance(value, str):
            value = options.comma_list(value)
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise ConfigError(f"{where} must be a list of HOST:PORT strings, got {value!r}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and isinstance(value, bool):
        return value
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{where} must be of type {kind.__name__}, got {value!r}")
    return value
