"""The frameworks mtckpt adapts, in the one table the core asks instead of naming them.

Each framework has an adapter module (``mtckpt.adapters.torch``, ``mtckpt.adapters.jax``)
that the core imports only once the program has imported the framework itself. An adapter provides
``ADAPTER`` (its :class:`mtckpt.arrays.ArrayAdapter`) and may provide
``distributed_job()`` (this rank and the world size, once its distributed engine is
initialised), ``job_coordinator(timeout)`` (the ranks' agreement over that engine) and
``container(obj)`` (its own containers of arrays, such as JAX pytree nodes).
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Framework:
    name: str  # the leaf kind of its arrays, and the manifest's "framework"
    adapter: str  # the mtckpt module adapting it
    roots: tuple[str, ...]  # top-level modules its values' classes come from


FRAMEWORKS = (
    Framework("torch", "mtckpt.adapters.torch", ("torch",)),
    Framework("jax", "mtckpt.adapters.jax", ("jax", "jaxlib")),
)
BY_NAME = {framework.name: framework for framework in FRAMEWORKS}


def adapter(framework: Framework) -> types.ModuleType:
    """The framework's adapter module, imported on first use (ImportError without it)."""
    return sys.modules.get(framework.adapter) or importlib.import_module(framework.adapter)


def owning(module_name: str) -> Framework | None:
    """The framework a class of module ``module_name`` belongs to (its adapter's too)."""
    top = module_name.split(".", 1)[0]
    for framework in FRAMEWORKS:
        if top in framework.roots or module_name == framework.adapter:
            return framework
    return None


def in_use() -> Iterator[types.ModuleType]:
    """The adapters of the frameworks this program has imported."""
    for framework in FRAMEWORKS:
        if any(sys.modules.get(root) is not None for root in framework.roots):
            try:
                yield adapter(framework)
            except ImportError:  # imported, but broken or blocked: not in use
                continue


def _first(hook: str, *args: Any) -> Any:
    for module in in_use():
        found = getattr(module, hook, None)
        found = found(*args) if found is not None else None
        if found is not None:
            return found
    return None


def distributed_job() -> tuple[int, int] | None:
    """(rank, world size) from the first framework whose distributed engine is up."""
    return _first("distributed_job")


def job_coordinator(timeout: float) -> Any:
    """The ranks' agreement over that engine (a coordination.Coordinator), or None."""
    return _first("job_coordinator", timeout)


def container(obj: Any) -> Any:
    """A framework's own container of ``obj``'s children, or None."""
    return _first("container", obj)
