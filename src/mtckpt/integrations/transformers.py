"""A Hugging Face ``Trainer`` callback over mtckpt, public (:mod:`mtckpt.adapters.transformers`)."""

from ..adapters.transformers import MtckptCallback as MtckptCallback

__all__ = ["MtckptCallback"]
