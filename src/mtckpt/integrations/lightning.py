"""PyTorch Lightning's ``CheckpointIO`` over mtckpt, public (:mod:`mtckpt.adapters.lightning`)."""

from ..adapters.lightning import MtckptCheckpointIO as MtckptCheckpointIO

__all__ = ["MtckptCheckpointIO"]
