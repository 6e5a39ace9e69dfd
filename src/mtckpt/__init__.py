"""mtckpt: multi-tier checkpointing for ML training.

A save costs one memory copy on the training thread; checksums, manifests, commits and the
slower tiers (local disk, ...) follow in the background. Restore takes the newest complete,
checksum-verified step from the fastest tier that has a good copy.
"""

from .config import LocalTier, MemoryTier, ObjectTier, PeerTier
from .errors import (
    AgreementError,
    ChecksumMismatchError,
    ClosedError,
    ConfigError,
    CorruptCheckpointError,
    FormatVersionError,
    KeyCollisionError,
    MtckptError,
    NodeRanksMissingError,
    RankInUseError,
    StateMismatchError,
    StepExistsError,
    StepNotFoundError,
    TierError,
    UnsupportedLeafError,
)
from .manager import CheckpointManager
from .pipeline.handle import SaveHandle

__all__ = [
    "AgreementError",
    "CheckpointManager",
    "ChecksumMismatchError",
    "ClosedError",
    "ConfigError",
    "CorruptCheckpointError",
    "FormatVersionError",
    "KeyCollisionError",
    "LocalTier",
    "MemoryTier",
    "ObjectTier",
    "MtckptError",
    "NodeRanksMissingError",
    "PeerTier",
    "RankInUseError",
    "SaveHandle",
    "StateMismatchError",
    "StepExistsError",
    "StepNotFoundError",
    "TierError",
    "UnsupportedLeafError",
]
