"""Exceptions raised by mtckpt. Each one names the key path, step, file or peer at fault."""

from __future__ import annotations


class MtckptError(Exception):
    """Root of every error mtckpt raises on purpose."""


class ConfigError(MtckptError, ValueError):
    """A tier option, config file key or ``MTCKPT_*`` variable is missing or invalid."""


class UnsupportedLeafError(MtckptError, TypeError):
    """A state leaf has a type mtckpt cannot save (or pickle was needed but not allowed)."""


class KeyCollisionError(MtckptError, ValueError):
    """Two leaves of a state flatten to the same key path."""


class StepNotFoundError(MtckptError, FileNotFoundError):
    """No tier holds a complete checkpoint for the requested step (or any step)."""


class StepExistsError(MtckptError, FileExistsError):
    """A step was saved twice, or is older than a step this manager already saved."""


class FormatVersionError(MtckptError, ValueError):
    """A manifest was written by a newer (or unknown) format version."""


class CorruptCheckpointError(MtckptError, ValueError):
    """A checkpoint file is missing, truncated or malformed."""


class ChecksumMismatchError(CorruptCheckpointError):
    """Stored bytes do not match the crc32c recorded when they were written."""


class StateMismatchError(MtckptError, ValueError):
    """The restore target does not match the saved state (keys, shapes, dtypes, kinds)."""


class TierError(MtckptError, OSError):
    """A tier could not be written or read (full disk, permission, unreachable store)."""


class MemoryBudgetError(TierError):
    """A save would take the node's memory tier past its budget (``MemoryTier(max_bytes=)``
    or the daemon's ``--memory-budget``): the step is skipped, training goes on."""


class ClosedError(MtckptError, RuntimeError):
    """The CheckpointManager was used after close()."""


class NodeRanksMissingError(MtckptError, TimeoutError):
    """Ranks this node's storage expects never wrote their shard of a step there: a rank
    of the node died or saves other steps, or ranks of several nodes were taken to share
    one (``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` not set as torchrun sets them)."""


class AgreementError(MtckptError, RuntimeError):
    """The ranks of a job cannot agree on one step to restore."""


class RankInUseError(MtckptError, RuntimeError):
    """Another CheckpointManager (in this process or another) already holds this run and
    rank on a node-local tier."""
