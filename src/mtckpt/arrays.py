"""Array leaves of every framework behind one small interface.

The core stages and restores array bytes without knowing numpy from torch: each framework
has an :class:`ArrayAdapter` saying how to describe a value, where its host bytes are (or
how to copy it out), how to fill a restore target in place, and how to build a new value
from verified bytes. Framework adapters are imported only when a value or a checkpoint of
theirs shows up; the core imports no framework.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import frameworks
from .errors import UnsupportedLeafError
from .format import shard, structure

ARRAY_KINDS = structure.ARRAY_KINDS  # the leaf kinds an adapter here handles


@dataclass(frozen=True)
class Sharding:
    """Where one shard sits in its global array, and the ranks that hold this same shard
    (this rank included; empty: this rank alone): of those on one node, only the lowest
    stores it."""

    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    replicas: tuple[int, ...]


@dataclass(frozen=True)
class Parts:
    """A sharded array held here as several distinct shards (a JAX array over several
    local devices): each local shard's array and its :class:`Sharding`."""

    pieces: tuple[tuple[Any, Sharding], ...]


@dataclass(frozen=True)
class Region:
    """The part of a global array a restore target holds."""

    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    shape: tuple[int, ...]


class ArrayAdapter:
    """How one framework's arrays are saved and restored. Offsets and sizes are in bytes;
    ``buf`` / ``dst`` are contiguous uint8 numpy arrays."""

    kinds: tuple[str, ...] = ()
    name = "array"  # what its arrays are called in messages

    def handles(self, obj: Any) -> bool:
        """Whether ``obj`` is an array of this framework (supported or not)."""
        raise NotImplementedError

    def leaf(self, value: Any) -> tuple[str, Any, Sharding | None]:
        """(leaf kind, the local array to save, its sharding or None for a whole array);
        the local array may be :class:`Parts` (and the sharding None) for an array held here
        as several shards. ValueError if the value cannot be saved."""
        raise NotImplementedError

    def describe(self, value: Any) -> tuple[str, tuple[int, ...], int]:
        """(safetensors dtype, shape, nbytes) of a value to save."""
        raise NotImplementedError

    def host_bytes(self, value: Any) -> np.ndarray | None:
        """A uint8 view of the value's bytes in host memory, if it has one without a copy."""
        raise NotImplementedError

    def stage(self, items: list[tuple[Any, np.ndarray]]) -> Callable[[], None] | None:
        """Copy values without ``host_bytes`` (strided, on a device) into their ``dst``, given
        as ``(value, dst)`` pairs. Copies only enqueued (from a device) return a function that
        waits for them to land."""
        raise NotImplementedError

    def pinner(self, value: Any) -> Callable[[np.ndarray], Callable[[], None]] | None:
        """For values whose copies to host memory need it to run asynchronously at full
        speed (a device's), the function that page-locks host memory and returns what undoes
        it; None for host values."""
        return None

    def is_target(self, obj: Any) -> bool:
        """Whether ``obj`` is an array of this framework that a restore can fill."""
        raise NotImplementedError

    def target_signature(self, target: Any) -> tuple[str, tuple[int, ...], bool]:
        """(dtype, shape, writable) of a restore target."""
        raise NotImplementedError

    def target_region(self, target: Any) -> Region:
        """The part of the global array the target holds (all of it, unless sharded)."""
        shape = self.target_signature(target)[1]
        return Region(tuple(shape), (0,) * len(shape), tuple(shape))

    def target_regions(self, target: Any) -> list[Region]:
        """The distinct parts of the global array the target holds here (one, unless it is
        spread over several local devices)."""
        return [self.target_region(target)]

    def target_local(self, target: Any) -> Any:
        """The target's local array (itself, unless sharded)."""
        return target

    def target_bytes(self, target: Any) -> np.ndarray | None:
        """A writable uint8 view of the (local) target's memory, if bytes can go straight in."""
        raise NotImplementedError

    def fill(self, target: Any, dtype: str, shape: tuple[int, ...], buf: np.ndarray) -> Any:
        """Copy verified bytes into a target without ``target_bytes``; returns the restored
        value: the target, or a new array like it for immutable targets (JAX)."""
        raise NotImplementedError

    def fill_regions(self, target: Any, dtype: str, bufs: list[np.ndarray]) -> Any:
        """:meth:`fill` for a target of several regions: ``bufs`` hold the verified bytes of
        each of :meth:`target_regions`."""
        (region,) = self.target_regions(target)
        return self.fill(target, dtype, region.shape, bufs[0])

    def fills_from_storage(self, target: Any) -> bool:
        """Whether ``fill`` should read the stored bytes in place, once verified, rather
        than a host copy of them (a device target: one copy to the device, no second host
        copy of the state)."""
        return False

    def new_value(self, kind: str, dtype: str, shape: tuple[int, ...], buf: np.ndarray) -> Any:
        """A new value of ``kind`` viewing (or holding) the verified bytes ``buf``."""
        raise NotImplementedError


class NumpyAdapter(ArrayAdapter):
    kinds = ("ndarray", "npscalar")
    name = "numpy array"

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, (np.ndarray, np.generic))

    def leaf(self, value: np.ndarray | np.generic) -> tuple[str, Any, None]:
        array = np.asarray(value)
        shard.dtype_name(array.dtype)  # ValueError names the supported dtypes
        return ("ndarray" if isinstance(value, np.ndarray) else "npscalar"), array, None

    def describe(self, value: np.ndarray) -> tuple[str, tuple[int, ...], int]:
        return shard.dtype_name(value.dtype), value.shape, value.nbytes

    def host_bytes(self, value: np.ndarray) -> np.ndarray | None:
        if value.flags.c_contiguous and value.dtype.byteorder != ">":
            return value.reshape(-1).view(np.uint8)
        return None

    def stage(self, items: list[tuple[np.ndarray, np.ndarray]]) -> None:
        for value, dst in items:
            little = value.dtype.newbyteorder("<")
            np.copyto(dst.view(little).reshape(value.shape), value, casting="equiv")
        return None

    def is_target(self, obj: Any) -> bool:
        return isinstance(obj, np.ndarray)

    def target_signature(self, target: np.ndarray) -> tuple[str, tuple[int, ...], bool]:
        try:
            dtype = shard.dtype_name(target.dtype)
        except ValueError:
            dtype = str(target.dtype)
        return dtype, target.shape, bool(target.flags.writeable)

    def target_bytes(self, target: np.ndarray) -> np.ndarray | None:
        if target.flags.c_contiguous and target.dtype.byteorder != ">":
            return target.reshape(-1).view(np.uint8)
        return None

    def fill(self, target: np.ndarray, dtype: str, shape, buf: np.ndarray) -> np.ndarray:
        np.copyto(target, buf.view(shard.numpy_dtype(dtype)).reshape(shape))
        return target

    def new_value(self, kind: str, dtype: str, shape, buf: np.ndarray) -> Any:
        numpy_dtype = shard.numpy_dtype(dtype)
        if numpy_dtype is None:
            raise UnsupportedLeafError(
                f"dtype {dtype} has no numpy equivalent without the ml_dtypes package; "
                "install it, or restore into a target of that dtype"
            )
        array = buf.view(numpy_dtype).reshape(shape)
        return array[()] if kind == "npscalar" else array


NUMPY = NumpyAdapter()


def for_value(obj: Any) -> ArrayAdapter | None:
    """The adapter of an array of any framework, or None if ``obj`` is no array."""
    if NUMPY.handles(obj):
        return NUMPY
    framework = _framework_of(obj)
    if framework is None:
        return None
    adapter = frameworks.adapter(framework).ADAPTER
    return adapter if adapter.handles(obj) else None


def for_target(obj: Any) -> ArrayAdapter | None:
    """The adapter that can fill ``obj`` in place on restore, or None (a new value is made)."""
    adapter = for_value(obj)
    return adapter if adapter is not None and adapter.is_target(obj) else None


def container(obj: Any) -> tuple[list, list, Callable[[list], Any]] | None:
    """A framework's own container (a JAX pytree node: flax struct dataclasses, TrainState):
    its keys, its children and the function that builds it from new children; None if
    ``obj`` is none (only asked once the framework is imported: else no object can be)."""
    return frameworks.container(obj)


def prepare_target(obj: Any) -> Callable[[], None] | None:
    """Let a framework give a stateful restore target the state the checkpoint has for it
    (a torch optimizer that has not stepped yet); if ``obj`` changed, the function that
    reverts it (for a restore that fails), else None."""
    framework = _framework_of(obj)
    return None if framework is None else frameworks.adapter(framework).prepare_target(obj)


def load_state(obj: Any, state: Any) -> None:
    """``obj.load_state_dict(state)``, unless its framework sees that the restore already
    filled the object's own memory with ``state`` (a module restored in place)."""
    framework = _framework_of(obj)
    if framework is None or not frameworks.adapter(framework).already_loaded(obj, state):
        obj.load_state_dict(state)


def _framework_of(obj: Any) -> frameworks.Framework | None:
    """The framework ``obj``'s class, or a base class, comes from (a user's
    torch.nn.Module subclass is torch's)."""
    for cls in type(obj).__mro__[:-1]:
        framework = frameworks.owning(cls.__module__)
        if framework is not None:
            return framework
    return None


def for_kind(kind: str) -> ArrayAdapter:
    """The adapter that builds values of a saved leaf kind: the framework's own when it is
    installed, numpy otherwise (a torch checkpoint read without torch gives numpy arrays)."""
    framework = frameworks.BY_NAME.get(kind)
    if framework is None:
        return NUMPY
    try:
        return frameworks.adapter(framework).ADAPTER
    except ImportError:
        return NUMPY
