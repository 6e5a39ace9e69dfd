"""File and directory names of the checkpoint format, built and parsed in this one place.

A checkpoint is ``{root}/{run}/step-{step:012d}/`` holding ``rank-{rank:05d}.safetensors``,
``rank-{rank:05d}.json`` and ``COMMIT``. Names that come from users or peers are validated
here before they are ever joined into a path.
"""

from __future__ import annotations

import numbers
import operator
import os
import re
import uuid

COMMIT = "COMMIT"
MAX_STEP = 10**12 - 1
MAX_RANK = 10**5 - 1

_RUN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_STEP_DIR_RE = re.compile(r"^step-(\d{12})$")
_RANK_FILE_RE = re.compile(r"^rank-(\d{5})\.(safetensors|json)$")
_TEMP_MARK = ".tmp-"


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _RUN_RE.match(value):
        raise ValueError(
            f"{what} {value!r} is invalid: expected 1-128 characters of letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return value


def check_run(run: object) -> str:
    """Return ``run`` if it is a safe run name, else raise ValueError saying what is allowed."""
    return _check_name(run, "run name")


def runs_of(names) -> list[str]:
    """The valid run names among ``names``, sorted."""
    return sorted(name for name in names if isinstance(name, str) and _RUN_RE.match(name))


def check_node_id(node_id: object) -> str:
    """Return ``node_id`` if it is a safe node name (as for runs), else raise ValueError."""
    return _check_name(node_id, "node id")


def check_step(step: object) -> int:
    """``step`` as an int if it is an integer in [0, MAX_STEP] (any integral type but bool:
    ``numpy.int64`` too), else raise ValueError / TypeError."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}")
    step = operator.index(step)
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"step {step} is out of range: expected 0 <= step <= {MAX_STEP}")
    return step


def check_rank(rank: object, world_size: object) -> tuple[int, int]:
    """Validate a (rank, world_size) pair."""
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not 1 <= world_size <= MAX_RANK + 1:
        raise ValueError(f"world_size {world_size} is out of range: expected 1..{MAX_RANK + 1}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is out of range for world_size {world_size}")
    return rank, world_size


def step_dir(step: int) -> str:
    return f"step-{check_step(step):012d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a step directory name, or None if ``name`` is not one."""
    match = _STEP_DIR_RE.match(name)
    return int(match.group(1)) if match else None


def steps_of(names) -> list[int]:
    """The steps of the step directory names among ``names``, ascending."""
    return sorted(s for s in map(parse_step_dir, names) if s is not None)


def check_file_name(name: str) -> str:
    """``name`` if it is a checkpoint file name (COMMIT or a rank file), else ValueError."""
    if name != COMMIT and parse_rank_file(name) is None:
        raise ValueError(f"{name!r} is not a checkpoint file name")
    return name


def data_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def manifest_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def lock_file(rank: int) -> str:
    """The file in a run's directory a rank's manager holds locked while it is open."""
    return f".rank-{rank:05d}.lock"


def parse_rank_file(name: str) -> tuple[int, str] | None:
    """``(rank, "safetensors" | "json")`` for a rank file name, else None."""
    match = _RANK_FILE_RE.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def rank_of_file(name: str) -> int | None:
    """The rank a file in a step directory belongs to, temp files included; None for COMMIT."""
    parsed = parse_rank_file(temp_target(name) or name)
    return parsed[0] if parsed else None


def temp_name(final: str) -> str:
    """A unique hidden name beside ``final``; renamed onto ``final`` once complete."""
    return f".{final}{_TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temp_target(name: str) -> str | None:
    """The final name a temp file was destined for, or None if ``name`` is not a temp file."""
    if not name.startswith(".") or _TEMP_MARK not in name:
        return None
    return name[1:].rsplit(_TEMP_MARK, 1)[0]
