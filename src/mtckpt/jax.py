"""JAX support, public: ``abstract``. The adapter is :mod:`mtckpt.adapters.jax`."""

from typing import Any

from .adapters import jax as _adapter
from .adapters.jax import abstract as abstract

__all__ = list(_adapter.__all__)


def __getattr__(name: str) -> Any:
    return getattr(_adapter, name)
