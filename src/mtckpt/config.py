"""Tier options and the loader that builds them from a TOML file and ``MTCKPT_*`` variables.

Each tier has a schedule: ``every`` (steps) and/or ``interval`` (seconds) say which steps
it takes, ``keep`` how many complete steps it holds. The same options come from Python,
from a TOML file, or from the environment (which overrides the file).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .format import encoding

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_MEMORY_PATH = "/dev/shm/mtckpt"


def _check_schedule(tier: str, every: Any, interval: Any, keep: Any) -> None:
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ConfigError(f"{tier}.every must be a positive int or None, got {every!r}")
    if interval is not None and (
        isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0
    ):
        raise ConfigError(
            f"{tier}.interval must be a positive number of seconds or None, got {interval!r}"
        )
    if every is None and interval is None:
        raise ConfigError(f"{tier}: set every (steps) and/or interval (seconds); both are None")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"{tier}.keep must be an int >= 1, got {keep!r}")


def _check_path(tier: str, path: Any) -> None:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConfigError(f"{tier}.path must be a non-empty path, got {path!r}")


def is_due(tier: MemoryTier | LocalTier, step: int, seconds_since_last: float | None) -> bool:
    """Whether ``tier``'s schedule takes ``step``, given the time since its last step."""
    if tier.every is not None and step % tier.every == 0:
        return True
    if tier.interval is not None:
        return seconds_since_last is None or seconds_since_last >= tier.interval
    return False


@dataclass(frozen=True)
class MemoryTier:
    """Node memory (a tmpfs directory): where every save is staged. Survives a trainer crash."""

    path: str = DEFAULT_MEMORY_PATH
    every: int | None = 1
    interval: float | None = None
    keep: int = 2

    def __post_init__(self) -> None:
        _check_path("memory", self.path)
        _check_schedule("memory", self.every, self.interval, self.keep)


@dataclass(frozen=True)
class LocalTier:
    """Node-local disk, written from the memory tier in the background with fsync + rename."""

    path: str
    every: int | None = 1
    interval: float | None = None
    keep: int = 2

    def __post_init__(self) -> None:
        _check_path("local", self.path)
        _check_schedule("local", self.every, self.interval, self.keep)


@dataclass(frozen=True)
class PeerTier:
    """Copies on other nodes, made by this node's daemon (``mtckpt daemon``), which also owns
    the memory tier: the manager learns the memory root from it. ``replicas``: the copies
    ``h.wait("peers")`` expects (the daemon must be configured for at least as many; 0: no
    "peers" stage, the daemon only keeps node memory and uploads); ``timeout``: seconds
    it waits for them before failing."""

    daemon: str = "unix:///run/mtckpt/mtckpt.sock"
    replicas: int = 1
    token_file: str | None = None
    timeout: float = 600.0

    def __post_init__(self) -> None:
        if not isinstance(self.daemon, str) or not self.daemon:
            raise ConfigError(f"peers.daemon must be an address, got {self.daemon!r}")
        if (
            isinstance(self.replicas, bool)
            or not isinstance(self.replicas, int)
            or self.replicas < 0
        ):
            raise ConfigError(f"peers.replicas must be an int >= 0, got {self.replicas!r}")
        if (
            isinstance(self.timeout, bool)
            or not isinstance(self.timeout, (int, float))
            or self.timeout <= 0
        ):
            raise ConfigError(f"peers.timeout must be > 0 seconds, got {self.timeout!r}")


@dataclass(frozen=True)
class ObjectTier:
    """Object storage at any fsspec URL (``s3://bucket/prefix``, ``gs://``, ``file://``,
    ``memory://``), flushed from the memory tier in the background. ``keep`` complete steps
    are kept, and every step that is a multiple of ``keep_every`` besides. Files above
    ``part_size`` go up as multipart uploads of ``concurrency`` parts at a time; a failed
    request is retried ``retries`` times with exponential backoff. ``compression="zstd"``
    stores data files as zstd frames of ``compression_level`` (needs ``mtckpt[zstd]``).
    ``backlog``: a step due while a flush still runs replaces older ones waiting ("newest",
    logged) or waits its turn ("queue": each keeps its node-memory copy until it is up).
    ``storage_options`` go to the fsspec filesystem (``endpoint_url``, ``key``, ...).
    ``uploader``: without a node daemon, "process" uploads from a helper process (the
    trainer's GIL stays free), "thread" from the trainer's own threads; "auto" is "process"
    except for ``memory://`` and filesystems registered at run time, which live in the
    trainer's process only."""

    url: str
    every: int | None = 1
    interval: float | None = None
    keep: int = 3
    keep_every: int | None = None
    storage_options: dict = dataclasses.field(default_factory=dict)
    part_size: int = 32 * 1024 * 1024
    concurrency: int = 8
    retries: int = 5
    compression: str | None = None
    compression_level: int = encoding.DEFAULT_LEVEL
    backlog: str = "newest"
    uploader: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or "://" not in self.url:
            raise ConfigError(
                f"remote.url must be a URL such as s3://bucket/prefix, got {self.url!r}"
            )
        _check_schedule("remote", self.every, self.interval, self.keep)
        if self.keep_every is not None and (
            isinstance(self.keep_every, bool) or not isinstance(self.keep_every, int)
            or self.keep_every < 1
        ):  # fmt: skip
            raise ConfigError(
                f"remote.keep_every must be a positive int or None, got {self.keep_every!r}"
            )
        if not isinstance(self.storage_options, dict):
            raise ConfigError(
                f"remote.storage_options must be a table, got {self.storage_options!r}"
            )
        for name, least in (("part_size", 5 * 1024 * 1024), ("concurrency", 1), ("retries", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"remote.{name} must be an int >= {least}, got {value!r}")
        encoding.check_compression(self.compression, self.compression_level, "remote")
        if self.backlog not in ("newest", "queue"):
            raise ConfigError(f"remote.backlog must be 'newest' or 'queue', got {self.backlog!r}")
        if self.uploader not in ("auto", "process", "thread"):
            raise ConfigError(
                f"remote.uploader must be 'auto', 'process' or 'thread', got {self.uploader!r}"
            )
        if self.uploader == "process" and self.url.startswith("memory:"):
            raise ConfigError(
                f"remote.uploader 'process' cannot upload to {self.url!r}: a memory:// "
                "filesystem lives in the trainer's process (use 'auto' or 'thread')"
            )


TIER_CLASSES: dict[str, type] = {
    "memory": MemoryTier, "local": LocalTier, "peers": PeerTier, "remote": ObjectTier,
}  # fmt: skip
_FIELD_KINDS = {"path": str, "every": int, "interval": float, "keep": int, "daemon": str,
                "replicas": int, "token_file": str, "timeout": float, "url": str,
                "keep_every": int, "storage_options": dict, "part_size": int,
                "concurrency": int, "retries": int, "compression": str,
                "compression_level": int, "backlog": str, "uploader": str}  # fmt: skip

# Manager options other than tiers, with the type each takes.
MANAGER_OPTIONS: dict[str, type] = {
    "run": str,
    "rank": int,
    "world_size": int,
    "allow_pickle": bool,
    "chunk_size": int,
    "threads": int,
    "collective_timeout": float,
    "staging": str,
}
_OPTIONAL = {"every", "interval", "rank", "world_size", "threads", "token_file", "keep_every",
             "compression"}  # fmt: skip


# The node daemon's options: its [daemon] table, MTCKPT_DAEMON_* variables and the flags of
# `mtckpt daemon` (the same names, with dashes). MTCKPT_NODE_ID also sets node_id.
DAEMON_OPTIONS: dict[str, type] = {
    "node_id": str, "listen": str, "socket": str, "memory_root": str, "local_root": str,
    "peers": list, "peers_dns": str, "replicas": int, "zone": str, "keep": int,
    "token_file": str, "tls_cert": str, "tls_key": str, "tls_ca": str, "bandwidth": float,
    "drain_timeout": float, "scan_interval": float, "data_port": int, "nice": int,
    "remote": str, "metrics_listen": str, "insecure": bool, "stream_idle_timeout": float,
}  # fmt: skip


def load(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> dict:
    """Read manager keyword arguments from a TOML file and ``MTCKPT_*`` variables.

    ``path`` defaults to ``$MTCKPT_CONFIG``; with neither, only the environment is read.
    Environment variables override the file: ``MTCKPT_RUN``, ``MTCKPT_MEMORY_KEEP``,
    ``MTCKPT_LOCAL_PATH``, ... (``MTCKPT_`` + section + ``_`` + key, upper case). The
    file's ``[daemon]`` table is the daemon's (:func:`load_daemon`).
    """
    env = os.environ if env is None else env
    return _manager_kwargs(*_read(path, env), env)


def _manager_kwargs(settings: dict, source: str, env: Mapping[str, str]) -> dict:
    """:func:`load`'s result from the file's settings (changed in place by the env)."""
    _check_keys(settings, source)
    _apply_env(settings, env)
    kwargs: dict[str, Any] = {k: settings[k] for k in MANAGER_OPTIONS if k in settings}
    for tier, cls in TIER_CLASSES.items():
        if tier in settings:
            try:
                kwargs[tier] = cls(**settings[tier])
            except TypeError as exc:
                raise ConfigError(f"{source}: [{tier}] {exc}") from None
    return kwargs


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
    settings, source = _read(path, env)
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
                daemon[key] = [p.strip() for p in env[name].split(",") if p.strip()]
            else:
                daemon[key] = _parse_env(name, env[name], kind, optional=False)
    url = daemon.pop("remote", None)
    remote = _manager_kwargs(settings, source, env).get("remote")  # the file read once
    if url is not None or remote is not None:
        daemon["remote"] = remote_at(url, remote)
    return daemon


def remote_at(url: str | None, tier: ObjectTier | None) -> ObjectTier:
    """``tier`` (default: an ObjectTier of default settings) at ``url`` if one is given."""
    if tier is None:
        return ObjectTier(url=url)
    return tier if url is None else dataclasses.replace(tier, url=url)


def _checked_daemon_value(where: str, key: str, value: Any) -> Any:
    kind = DAEMON_OPTIONS[key]
    if kind is list:
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
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


def _read(path: str | os.PathLike | None, env: Mapping[str, str]) -> tuple[dict, str]:
    """The TOML file's settings (none without a file) and how to name it in errors."""
    path = path if path is not None else env.get("MTCKPT_CONFIG") or None
    if path is None:
        return {}, "configuration"
    try:
        with open(path, "rb") as f:
            return tomllib.load(f), f"config file {str(path)!r}"
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None


def _check_keys(settings: dict[str, Any], source: str) -> None:
    for key, value in settings.items():
        if key == "daemon":  # the daemon's: load_daemon checks it
            continue
        if key in TIER_CLASSES:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{key}] must be a table")
            fields = {f.name for f in dataclasses.fields(TIER_CLASSES[key])}
            for sub in value:
                if sub not in fields:
                    raise ConfigError(
                        f"{source}: unknown key {key}.{sub}; expected one of {sorted(fields)}"
                    )
        elif key not in MANAGER_OPTIONS:
            raise ConfigError(
                f"{source}: unknown key {key!r}; expected one of "
                f"{sorted(MANAGER_OPTIONS) + sorted(f'[{t}]' for t in [*TIER_CLASSES, 'daemon'])}"
            )


def _apply_env(settings: dict[str, Any], env: Mapping[str, str]) -> None:
    for key, kind in MANAGER_OPTIONS.items():
        name = f"MTCKPT_{key.upper()}"
        if name in env:
            settings[key] = _parse_env(name, env[name], kind, key in _OPTIONAL)
    for tier, cls in TIER_CLASSES.items():
        for f in dataclasses.fields(cls):
            name = f"MTCKPT_{tier.upper()}_{f.name.upper()}"
            if name in env:
                kind = _FIELD_KINDS[f.name]
                section = settings.setdefault(tier, {})
                section[f.name] = _parse_env(name, env[name], kind, f.name in _OPTIONAL)


def _parse_env(name: str, raw: str, kind: type, optional: bool) -> Any:
    text = raw.strip()
    if optional and text.lower() in ("", "none"):
        return None
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(text)
            return lowered in ("1", "true", "yes", "on")
        if kind is str:
            return text
        if kind is dict:
            raise ValueError(text)  # a table: only in the TOML file
        return kind(text)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={raw!r} is not a valid {kind.__name__}"
        ) from None


def expand_path(path: str | os.PathLike) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(str(path))))
