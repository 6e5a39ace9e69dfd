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

from . import options
from .errors import ConfigError
from .format import encoding, naming
from .format.manifest import DEFAULT_CHUNK_SIZE
from .options import option
from .redundancy import RULE as REDUNDANCY_RULE

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_MEMORY_PATH = "/dev/shm/mtckpt"


def _check_schedule(tier: Any, section: str) -> None:
    options.validate(tier, f"{section}.")
    if tier.every is None and tier.interval is None:
        raise ConfigError(f"{section}: set every (steps) and/or interval (seconds); both are None")


def is_due(tier: MemoryTier | LocalTier, step: int, seconds_since_last: float | None) -> bool:
    """Whether ``tier``'s schedule takes ``step``, given the time since its last step."""
    if tier.every is not None and step % tier.every == 0:
        return True
    if tier.interval is not None:
        return seconds_since_last is None or seconds_since_last >= tier.interval
    return False


_EVERY = (
    "Take every step that is a multiple of this. `every` and `interval` may both be set; at "
    "least one must be."
)
_INTERVAL = "Also take a step when this many seconds have passed since the tier's last one."
_KEEP = (
    "Complete steps kept on the tier; older ones go once the newest complete one has passed "
    "checksum verification there."
)
_SECONDS = options.optional(
    options.Rule(options.POSITIVE_SECONDS.test, "a positive number of seconds")
)


def _every() -> Any:
    return option(1, help=_EVERY, rule=options.optional(options.POSITIVE_INT))


def _interval() -> Any:
    return option(None, help=_INTERVAL, rule=_SECONDS)


def _keep(default: int) -> Any:
    return option(default, help=_KEEP, rule=options.int_at_least(1))


@dataclass(frozen=True)
class MemoryTier:
    """Node memory (a tmpfs directory): where every save is staged. Survives a trainer crash."""

    path: str = option(
        DEFAULT_MEMORY_PATH,
        help="The node's memory tier: a tmpfs directory. Every save is staged here. With "
        "`peers=` leave `memory` out: the daemon's memory root is used.",
        rule=options.PATH,
    )
    every: int | None = _every()
    interval: float | None = _interval()
    keep: int = _keep(2)
    max_bytes: int | None = option(
        None,
        help="The node's memory budget in bytes: staging slots, steps, and (with a daemon) "
        "replicas and parity. A save that would exceed it is skipped, logged and counted "
        "(spare slots are dropped first). With `peers=`, the daemon's --memory-budget.",
        rule=options.optional(options.int_at_least(1)),
    )

    def __post_init__(self) -> None:
        _check_schedule(self, "memory")


@dataclass(frozen=True)
class LocalTier:
    """Node-local disk, written from the memory tier in the background with fsync + rename."""

    path: str = option(
        help="The node-local disk directory, written from the memory tier in the background "
        "(fsync, then rename). Required.",
        rule=options.PATH,
    )
    every: int | None = _every()
    interval: float | None = _interval()
    keep: int = _keep(2)

    def __post_init__(self) -> None:
        _check_schedule(self, "local")


@dataclass(frozen=True)
class PeerTier:
    """Copies on other nodes, made by this node's daemon (``mtckpt daemon``), which also owns
    the memory tier: the manager learns the memory root from it."""

    daemon: str = option(
        "unix:///run/mtckpt/mtckpt.sock",
        help="Address of this node's daemon: `unix:///PATH` or `HOST:PORT`.",
        rule=options.Rule(options.TEXT.test, "an address"),
    )
    replicas: int = option(
        1,
        help='Copies on peers that `h.wait("peers")` expects; the daemon must make at least '
        'as many. 0: no "peers" stage (the daemon only holds node memory and uploads).',
        rule=options.int_at_least(0),
    )
    redundancy: str | None = option(
        None,
        help="The redundancy the daemon must keep (`replicas:R`, `xor:G`, `rs:K+M`, as its "
        '--redundancy): checked when the manager starts; `h.wait("peers")` then waits for '
        "it. Default: the daemon's, with at least `replicas` copies when that is replicas.",
        rule=REDUNDANCY_RULE,
    )
    token_file: str | None = option(
        None,
        help="File holding the daemon's shared token, sent with every call.",
        rule=options.optional(options.PATH),
    )
    timeout: float = option(
        600.0,
        help="Seconds the trainer waits for its replicas, the daemon's uploads or a recovery "
        "before it fails.",
        rule=options.POSITIVE_SECONDS,
    )

    def __post_init__(self) -> None:
        options.validate(self, "peers.")

    @property
    def replicating(self) -> bool:
        """Whether saves have a "peers" stage: the daemon keeps some redundancy."""
        if self.redundancy is not None:
            return self.redundancy.strip() != "replicas:0"
        return self.replicas > 0


@dataclass(frozen=True)
class ObjectTier:
    """Object storage at any fsspec URL (``s3://bucket/prefix``, ``gs://``, ``file://``,
    ``memory://``), flushed from the memory tier in the background."""

    url: str = option(
        help="Any fsspec URL: `s3://bucket/prefix`, `gs://`, `file://`, `memory://`. Required.",
        rule=options.Rule(
            lambda v: isinstance(v, str) and "://" in v, "a URL such as s3://bucket/prefix"
        ),
    )
    every: int | None = _every()
    interval: float | None = _interval()
    keep: int = _keep(3)
    keep_every: int | None = option(
        None,
        help="Also keep every complete step that is a multiple of this.",
        rule=options.optional(options.POSITIVE_INT),
    )
    storage_options: dict = option(
        help="Passed to the fsspec filesystem (`endpoint_url`, `key`, ...). A table: TOML only.",
        rule=options.TABLE,
        factory=dict,
    )
    part_size: int = option(
        32 * 1024 * 1024,
        help="Files larger than this go up as multipart uploads of parts this size (at least "
        "5 MiB).",
        rule=options.int_at_least(5 * 1024 * 1024),
    )
    concurrency: int = option(
        8, help="Parts uploaded, and ranged reads made, at a time.", rule=options.int_at_least(1)
    )
    retries: int = option(
        5,
        help="Times a failed request is retried, with exponential backoff.",
        rule=options.int_at_least(0),
    )
    compression: str | None = option(
        None,
        help='`"zstd"` stores data files as zstd frames (needs `mtckpt[zstd]`); unset: as they '
        "are.",
    )
    compression_level: int = option(
        encoding.DEFAULT_LEVEL, help="The zstd level, -7..22: higher compresses more, slower."
    )
    backlog: str = option(
        "newest",
        help='`"newest"`: a step due while a flush runs replaces older waiting ones (logged). '
        '`"queue"`: every due step waits its turn, keeping its node-memory copy.',
        rule=options.one_of("newest", "queue"),
    )
    incremental: bool = option(
        True,
        help="Upload only the blocks changed since the newest step of the same writer already "
        "there (compared byte for byte in node memory); every step still reads as whole. "
        "Data files stored with `compression` go up whole.",
        rule=options.BOOL,
    )
    full_every: int = option(
        10,
        help="With `incremental`: a rank's data file goes up whole at least every this many "
        "steps, so that a step refers to few older ones.",
        rule=options.int_at_least(2),
    )
    uploader: str = option(
        "auto",
        help='Without a node daemon: `"process"` uploads from a helper process (the '
        "trainer's GIL stays free), `\"thread\"` on the trainer's threads (`storage_options` "
        'that do not pickle). `"auto"`: `"process"`, except for `memory://` and filesystems '
        "registered at run time.",
        rule=options.one_of("auto", "process", "thread"),
    )

    def __post_init__(self) -> None:
        _check_schedule(self, "remote")
        encoding.check_compression(self.compression, self.compression_level, "remote")
        if self.uploader == "process" and self.url.startswith("memory:"):
            raise ConfigError(
                f"remote.uploader 'process' cannot upload to {self.url!r}: a memory:// "
                "filesystem lives in the trainer's process (use 'auto' or 'thread')"
            )


TIER_CLASSES: dict[str, type] = {
    "memory": MemoryTier, "local": LocalTier, "peers": PeerTier, "remote": ObjectTier,
}  # fmt: skip


@dataclass(frozen=True)
class ManagerOptions:
    """The :class:`~mtckpt.CheckpointManager`'s options other than its tiers (its keyword
    arguments; ``run`` and these keys at the top of the config file)."""

    run: str = option(
        help="The run's name: its directory on every tier. 1-128 letters, digits, `.`, `_` "
        "or `-`, starting with a letter or digit. Required (`from_config` refuses a file "
        "without it).",
    )
    rank: int | None = option(
        None,
        help="This process's rank. Unset: `torch.distributed` or `jax.distributed` when "
        "initialised, else `RANK`, else 0.",
    )
    world_size: int | None = option(
        None,
        help="The number of ranks. Unset: `torch.distributed` or `jax.distributed` when "
        "initialised, else `WORLD_SIZE`, else 1.",
    )
    allow_pickle: bool = option(
        False,
        help="Save (and restore) leaves of other types with pickle. Needed on both sides; only "
        "for checkpoints you trust.",
    )
    chunk_size: int = option(
        DEFAULT_CHUNK_SIZE,
        help="Bytes per crc32c chunk of a data file (at least 4096). A restore verifies the "
        "whole chunks under the bytes it reads.",
        rule=options.int_at_least(4096),
    )
    threads: int | None = option(
        None,
        help="Threads for staging copies, checksums and verification. Unset: the CPU count, "
        "at most 8.",
        rule=options.optional(options.POSITIVE_INT),
    )
    collective_timeout: float = option(
        600.0,
        help="Seconds a rank waits for the others: restore's agreement on a step, and the "
        "node's other ranks before a step is committed (`NodeRanksMissingError`).",
        rule=options.POSITIVE_SECONDS,
    )
    staging: str = option(
        "blocking",
        help='`"blocking"`: `save` returns once the arrays may be modified. `"async"`: once '
        'the copy into node memory is started; modify them after `h.wait("staged")`.',
        rule=options.one_of("blocking", "async"),
    )

    def __post_init__(self) -> None:
        try:
            naming.check_run(self.run)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        options.validate(self)


# Manager options other than tiers, with the type each takes.
MANAGER_OPTIONS: dict[str, type] = {n: k.base for n, k in options.kinds(ManagerOptions).items()}


def load(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> dict:
    """Read manager keyword arguments from a TOML file and ``MTCKPT_*`` variables.

    ``path`` defaults to ``$MTCKPT_CONFIG``; with neither, only the environment is read.
    Environment variables override the file: ``MTCKPT_RUN``, ``MTCKPT_MEMORY_KEEP``,
    ``MTCKPT_LOCAL_PATH``, ... (``MTCKPT_`` + section + ``_`` + key, upper case). The
    file's ``[daemon]`` table is the daemon's (:func:`mtckpt.daemon.config.load_daemon`).
    """
    env = os.environ if env is None else env
    return manager_kwargs(*read_file(path, env), env)


def manager_kwargs(settings: dict, source: str, env: Mapping[str, str]) -> dict:
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


def remote_at(url: str | None, tier: ObjectTier | None) -> ObjectTier:
    """``tier`` (default: an ObjectTier of default settings) at ``url`` if one is given."""
    if tier is None:
        return ObjectTier(url=url)
    return tier if url is None else dataclasses.replace(tier, url=url)


def read_file(path: str | os.PathLike | None, env: Mapping[str, str]) -> tuple[dict, str]:
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
    for key, kind in options.kinds(ManagerOptions).items():
        name = f"MTCKPT_{key.upper()}"
        if name in env:
            settings[key] = parse_env(name, env[name], kind.base, kind.optional)
    for tier, cls in TIER_CLASSES.items():
        for field, kind in options.kinds(cls).items():
            name = f"MTCKPT_{tier.upper()}_{field.upper()}"
            if name in env:
                section = settings.setdefault(tier, {})
                section[field] = parse_env(name, env[name], kind.base, kind.optional)


def parse_env(name: str, raw: str, kind: type, optional: bool) -> Any:
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
