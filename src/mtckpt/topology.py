"""Who this process is: rank and world size, and which ranks share this node's storage."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import frameworks
from .errors import ConfigError
from .format import naming
from .tiers.directory import make_private_dirs


def detect(
    rank: int | None = None, world_size: int | None = None, env: Mapping[str, str] | None = None
) -> tuple[int, int]:
    """(rank, world size): explicit values, else torch.distributed or jax.distributed when
    initialised, else the ``RANK`` / ``WORLD_SIZE`` environment, else (0, 1).

    Frameworks are only consulted if the program already imported them.
    """
    env = os.environ if env is None else env
    if rank is None and world_size is None:
        found = frameworks.distributed_job() or _from_env(env)
        rank, world_size = found if found else (0, 1)
    elif rank is None or world_size is None:
        raise ConfigError("give both rank and world_size, or neither")
    naming.check_rank(rank, world_size)
    return rank, world_size


def local_ranks_given(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment says which ranks share this node (as torchrun does)."""
    env = os.environ if env is None else env
    return "LOCAL_WORLD_SIZE" in env and "LOCAL_RANK" in env


def node_identity(root: Path, daemon_node: str | None = None) -> str:
    """What the ranks sharing this node's tiers have in common: the node daemon's id, else
    this machine's boot id with the device and inode of the memory root (so ranks in
    network namespaces of one machine, each with its own root, are nodes apart)."""
    if daemon_node:
        return f"daemon {daemon_node}"
    try:
        machine = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        machine = socket.gethostname()
    found = root.stat()
    return f"{machine} {found.st_dev}:{found.st_ino}"


GATHERED = (
    "those that shared this node's memory root when the manager started (every rank was "
    "asked, as LOCAL_RANK / LOCAL_WORLD_SIZE are not set): a rank of this node died, or "
    "saves other steps"
)


def find_node_ranks(
    rank: int, world_size: int, memory_root: Path, daemon_node: str | None, coordinator: Any
) -> tuple[tuple[int, ...], str]:
    """The ranks that share this node's memory (and local) tier, and where that came from:
    LOCAL_RANK / LOCAL_WORLD_SIZE, else every rank's :func:`node_identity` gathered by
    ``coordinator`` (a collective: every rank builds its manager), else the world."""
    if world_size > 1 and not local_ranks_given():
        try:
            make_private_dirs(memory_root)
            identity = node_identity(memory_root, daemon_node)
        except OSError as exc:  # the memory tier's preparation reports it next
            identity = f"unusable memory root: {exc}"
        found = coordinator.ranks_sharing(identity)
        if found is not None:
            return found, GATHERED
    return node_ranks(rank, world_size), node_ranks_origin()


def node_ranks(rank: int, world_size: int, env: Mapping[str, str] | None = None) -> tuple[int, ...]:
    """Ranks on this node (sharing its memory and local tiers), from ``LOCAL_RANK`` and
    ``LOCAL_WORLD_SIZE`` as torchrun sets them; without them, all ranks."""
    env = os.environ if env is None else env
    if not local_ranks_given(env):
        return tuple(range(world_size))
    try:
        local_rank, local_world = int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"])
    except ValueError:
        raise ConfigError(
            f"LOCAL_RANK={env['LOCAL_RANK']!r} / LOCAL_WORLD_SIZE={env['LOCAL_WORLD_SIZE']!r} "
            "are not integers"
        ) from None
    first = rank - local_rank
    if not (0 <= local_rank < local_world and first >= 0 and first + local_world <= world_size):
        raise ConfigError(
            f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world} do not fit rank {rank} "
            f"of world size {world_size}"
        )
    return tuple(range(first, first + local_world))


def node_ranks_origin(env: Mapping[str, str] | None = None) -> str:
    """Where :func:`node_ranks` took this node's ranks from, for messages."""
    env = os.environ if env is None else env
    if "LOCAL_WORLD_SIZE" in env and "LOCAL_RANK" in env:
        return (
            f"from LOCAL_RANK={env['LOCAL_RANK']}, LOCAL_WORLD_SIZE={env['LOCAL_WORLD_SIZE']} "
            "(a rank of this node died, or saves other steps)"
        )
    return (
        "the whole world, as LOCAL_RANK / LOCAL_WORLD_SIZE are not set (with ranks on "
        "several nodes, set them as torchrun does)"
    )


def _from_env(env: Mapping[str, str]) -> tuple[int, int] | None:
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    try:
        return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(
            f"RANK={env.get('RANK')!r} / WORLD_SIZE={env.get('WORLD_SIZE')!r} are not integers"
        ) from None
