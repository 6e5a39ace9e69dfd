"""The framework adapters, behind the one table the core asks (:mod:`mtckpt.frameworks`):
``torch`` (tensors, modules, optimizers, RNG, the job's process group), ``jax`` (sharded
arrays, pytrees, jax.distributed), ``dcp`` (PyTorch DCP over mtckpt's tiers),
``lightning`` and ``transformers`` (their trainers' checkpoint hooks); numpy is built into
:mod:`mtckpt.arrays`. Each adapter imports its framework. Users import the public names
from ``mtckpt.torch``, ``mtckpt.jax`` and ``mtckpt.integrations.*``."""
