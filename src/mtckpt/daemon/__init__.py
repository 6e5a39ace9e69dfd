"""The node daemon: owns the memory tier beside the trainers, replicates committed shards to
peer daemons over gRPC and pulls them back after the loss of a node."""

from .service import Daemon, DaemonConfig

__all__ = ["Daemon", "DaemonConfig"]
