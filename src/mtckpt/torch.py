"""PyTorch support, public: ``RNG``, ``LocalShard`` and DCP interop (``Reader``,
``Writer``, ``export_dcp`` ...). The adapter is :mod:`mtckpt.adapters.torch`; DCP's names
are imported on first use."""

from typing import Any

from .adapters import torch as _adapter
from .adapters.torch import RNG as RNG
from .adapters.torch import LocalShard as LocalShard

__all__ = list(_adapter.__all__)


def __getattr__(name: str) -> Any:
    return getattr(_adapter, name)
