"""JAX support: pytrees of sharded ``jax.Array`` as checkpoint state, restored onto any mesh.

Importing this module imports jax; the core imports it only when a JAX value or a
JAX-written checkpoint shows up. Each process saves the distinct shards its devices hold
(a shard replicated on several devices is written once, and of the processes on a node
holding the same shard only the lowest writes it), with the global shape and each shard's
offset. Restoring into a pytree of ``jax.ShapeDtypeStruct`` (with shardings) or of arrays
builds new arrays with the target's shardings, reading each device's region from whichever
saved shards overlap it, so a checkpoint restores onto another mesh or device count.
Without a target, arrays come back as numpy arrays. Registered pytree nodes (flax struct
dataclasses such as ``TrainState``, optax states) are containers: without a target they
restore as dicts of their fields.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from .. import _cuda, arrays, coordination
from ..errors import MtckptError
from ..format import shard

__all__ = ["abstract"]

log = logging.getLogger(__name__)


def _dtype_name(dtype: Any) -> str:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        raise ValueError(
            f"a typed PRNG key array ({dtype}) cannot be saved as it is; save "
            "jax.random.key_data(key) and rebuild it with jax.random.wrap_key_data"
        )
    return shard.dtype_name(np.dtype(dtype))


def _place(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple, tuple]:
    """(global offset, shape) of a device's index into an array of ``shape``."""
    bounds = [part.indices(size)[:2] for part, size in zip(index, shape, strict=False)]
    bounds += [(0, size) for size in shape[len(bounds) :]]
    return tuple(lo for lo, _ in bounds), tuple(hi - lo for lo, hi in bounds)


_LAYOUTS: dict[tuple, list] = {}


def _layout(sharding: Any, shape: tuple[int, ...]) -> list[tuple[Any, tuple, tuple, tuple]]:
    """This process's distinct shards of an array of ``shape`` laid out by ``sharding``:
    (the first local device holding it, global offset, shape, processes holding it), in
    device order. Kept per (sharding, shape): working it out visits every device."""
    key = (sharding, shape)
    found = _LAYOUTS.get(key)
    if found is None:
        holders: dict[tuple, set[int]] = {}
        places = {}
        for device, index in sharding.devices_indices_map(shape).items():
            place = places[device] = _place(index, shape)
            holders.setdefault(place, set()).add(device.process_index)
        found, seen = [], set()
        for device in sorted(sharding.addressable_devices, key=lambda d: d.id):
            place = places[device]
            if place not in seen:
                seen.add(place)
                found.append((device, *place, tuple(sorted(holders[place]))))
        _LAYOUTS[key] = found
    return found


def _target_sharding(target: Any) -> Any:
    sharding = getattr(target, "sharding", None)
    return SingleDeviceSharding(jax.local_devices()[0]) if sharding is None else sharding


def _on_default_device(sharding: Any) -> bool:
    return isinstance(sharding, SingleDeviceSharding) and sharding.device_set == {jax.devices()[0]}


class JaxAdapter(arrays.ArrayAdapter):
    kinds = ("jax",)
    name = "jax.Array"

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, (jax.Array, jax.ShapeDtypeStruct))

    def leaf(self, value: jax.Array) -> tuple[str, Any, arrays.Sharding | None]:
        if isinstance(value, jax.ShapeDtypeStruct):
            raise ValueError("a jax.ShapeDtypeStruct has no data to save")
        if value.is_deleted():
            raise ValueError("the jax.Array was deleted (donated to a computation?)")
        _dtype_name(value.dtype)
        shape = tuple(value.shape)
        layout = _layout(value.sharding, shape)
        if not layout:
            raise ValueError("no device of this process holds a shard of the array")
        single = len(layout) == 1 and jax.process_count() == 1 and layout[0][2] == shape
        if single and len(value.sharding.addressable_devices) == 1:
            return "jax", value, None
        shards = {s.device: s for s in value.addressable_shards}
        pieces = tuple(
            (shards[device].data, arrays.Sharding(shape, offset, holders))
            for device, offset, _, holders in layout
        )
        if single:
            return "jax", pieces[0][0], None
        if len(pieces) == 1:
            return "jax", *pieces[0]
        return "jax", arrays.Parts(pieces), None

    def describe(self, value: jax.Array) -> tuple[str, tuple[int, ...], int]:
        return _dtype_name(value.dtype), tuple(value.shape), value.nbytes

    def host_bytes(self, value: jax.Array) -> np.ndarray | None:
        (device,) = value.devices()
        if device.platform != "cpu":
            return None
        return np.asarray(value).reshape(-1).view(np.uint8)  # a view of the device buffer

    def stage(self, items: list[tuple[jax.Array, np.ndarray]]) -> Callable[[], None] | None:
        """CUDA arrays: one DMA each straight into the (page-locked) slot, on mtckpt's own
        stream, once the computations producing them are done; the rest through a host
        copy of each array."""
        by_device: dict[int, list] = {}
        through_host = []
        for value, dst in items:
            ordinal = _cuda_ordinal(value, dst)
            if ordinal is None:
                through_host.append((value, dst))
            else:
                by_device.setdefault(ordinal, []).append((value, dst))
        waits = []
        for ordinal, copies in by_device.items():
            try:
                waits.append(_copy_to_host(ordinal, copies))
            except _cuda.CudaError as exc:
                _stop_direct_copies(exc)
                through_host += copies
        for value, _ in through_host:  # start every device-to-host copy before waiting for one
            value.copy_to_host_async()
        for value, dst in through_host:
            dst[:] = np.asarray(value).reshape(-1).view(np.uint8)
        if not waits:
            return None
        return lambda: [wait() for wait in waits] and None

    def pinner(self, value: jax.Array) -> Callable[[np.ndarray], Callable[[], None]] | None:
        (device,) = value.devices()
        return _page_lock if _is_cuda(device) else None

    def is_target(self, obj: Any) -> bool:
        return self.handles(obj)

    def target_signature(self, target: Any) -> tuple[str, tuple[int, ...], bool]:
        try:  # what JAX can hold: int64 is int32 without jax_enable_x64, as it would make it
            dtype = _dtype_name(jax.dtypes.canonicalize_dtype(target.dtype))
        except ValueError:
            dtype = str(target.dtype)
        return dtype, tuple(target.shape), True

    def target_regions(self, target: Any) -> list[arrays.Region]:
        shape = tuple(target.shape)
        layout = _layout(_target_sharding(target), shape)
        return [arrays.Region(shape, offset, local) for _, offset, local, _ in layout]

    def target_bytes(self, target: Any) -> None:
        return None  # jax arrays are immutable: restore builds new ones

    def fill(self, target: Any, dtype: str, shape, buf: np.ndarray) -> jax.Array:
        return self.fill_regions(target, dtype, [buf])

    def fill_regions(self, target: Any, dtype: str, bufs: list[np.ndarray]) -> jax.Array:
        shape = tuple(target.shape)
        numpy_dtype = shard.numpy_dtype(dtype)
        regions = self.target_regions(target)
        held = {
            (region.global_offset, region.shape): buf.view(numpy_dtype).reshape(region.shape)
            for region, buf in zip(regions, bufs, strict=True)
        }
        sharding = _target_sharding(target)
        if getattr(target, "committed", None) is not True and _on_default_device(sharding):
            # Like the array it stands for (made without a device, as optax's step count
            # is): uncommitted, so that it combines with arrays on any devices.
            return jax.device_put(next(iter(held.values())))
        return jax.make_array_from_callback(
            shape, sharding, lambda index: held[_place(index, shape)]
        )

    def new_value(self, kind: str, dtype: str, shape, buf: np.ndarray) -> np.ndarray:
        return arrays.NUMPY.new_value("ndarray", dtype, shape, buf)


ADAPTER = JaxAdapter()

_DIRECT = {"enabled": True}


def _is_cuda(device: Any) -> bool:
    if device.platform not in ("gpu", "cuda") or not _DIRECT["enabled"]:
        return False
    version = str(getattr(device.client, "platform_version", "")).lower()
    return "rocm" not in version


def _cuda_ordinal(value: jax.Array, dst: np.ndarray) -> int | None:
    """The CUDA device ordinal of a single-device array whose buffer is the dense row-major
    bytes ``dst`` expects (XLA's default layout), or None: it goes through a host copy."""
    (device,) = value.devices()
    if not _is_cuda(device) or dst.size == 0:
        return None
    try:
        fmt = getattr(value, "format", None) or getattr(value, "layout", None)
        layout = getattr(fmt, "layout", None) or getattr(fmt, "device_local_layout", None)
        order = getattr(layout, "major_to_minor", None)
        if order is not None and tuple(order) != tuple(range(value.ndim)):  # row-major
            return None
        if value.on_device_size_in_bytes() != dst.size:
            return None
    except Exception:  # an array kind whose layout jax cannot tell: the safe path
        return None
    return device.local_hardware_id


def _copy_to_host(ordinal: int, copies: list[tuple[jax.Array, np.ndarray]]) -> Callable[[], None]:
    """Enqueue each array's DMA into its slot bytes once the array is computed; returns what
    waits for them to land (holding the arrays alive until then)."""
    jax.block_until_ready([value for value, _ in copies])
    landed = _cuda.copy_to_host(
        ordinal,
        [(dst.ctypes.data, value.unsafe_buffer_pointer(), dst.size) for value, dst in copies],
    )

    def wait() -> None:
        landed()
        copies.clear()

    return wait


def _stop_direct_copies(exc: Exception) -> None:
    if _DIRECT["enabled"]:
        _DIRECT["enabled"] = False
        log.warning(
            "copying jax arrays straight from the GPU into node memory failed (%s); "
            "they go through a host copy from now on, slower", exc,
        )  # fmt: skip


def _page_lock(memory: np.ndarray) -> Callable[[], None]:
    """Page-lock a slot for DMA from the GPU; where that is refused (a memlock limit), the
    copies go to pageable memory: slower and synchronous, but correct."""
    try:
        return _cuda.page_lock(memory.ctypes.data, memory.nbytes)
    except _cuda.CudaError as exc:
        log.warning(
            "cannot page-lock %d bytes of the memory tier for copies from the GPU (%s); "
            "they go through pageable memory, synchronously and slower", memory.nbytes, exc,
        )  # fmt: skip
        return lambda: None


def prepare_target(obj: Any) -> None:
    return None


def already_loaded(obj: Any, state: Any) -> bool:
    return False


def container(obj: Any) -> tuple[list, list, Callable[[list], Any]] | None:
    """A registered pytree node's keys and children, and what rebuilds it (see
    :func:`mtckpt.arrays.container`); None for leaves."""
    if isinstance(obj, (jax.Array, jax.ShapeDtypeStruct)):
        return None
    try:
        found = jax.tree_util.flatten_one_level_with_keys(obj)
    except ValueError:  # not a registered pytree node
        return None
    if found is None:
        return None
    pairs, _ = found
    keys = [_key_name(entry) for entry, _ in pairs]
    children = [child for _, child in pairs]
    treedef = jax.tree_util.tree_structure(obj, is_leaf=lambda x: x is not obj)
    return keys, children, treedef.unflatten


def _key_name(entry: Any) -> Any:
    for attribute in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
        if hasattr(entry, attribute):
            return getattr(entry, attribute)
    return str(entry)


def abstract(state: Any) -> Any:
    """``state`` with every ``jax.Array`` replaced by a ``jax.ShapeDtypeStruct`` of the same
    shape, dtype and sharding: a restore target that holds no memory."""
    return jax.tree_util.tree_map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if isinstance(x, jax.Array)
            else x
        ),
        state,
    )


_COORDINATORS = itertools.count()


def distributed_client() -> Any:
    """The client of an initialised ``jax.distributed``, or None."""
    try:
        from jax._src import distributed
    except ImportError:
        return None
    return getattr(distributed.global_state, "client", None)


def distributed_job() -> tuple[int, int] | None:
    """This process's index and the process count, once jax.distributed is initialised
    (the core asks through :mod:`mtckpt.frameworks`)."""
    if distributed_client() is None:
        return None
    return jax.process_index(), jax.process_count()


def job_coordinator(timeout: float) -> JaxCoordinator | None:
    """The ranks' agreement over jax.distributed, once it is initialised."""
    return JaxCoordinator(timeout) if distributed_client() is not None else None


class JaxCoordinator(coordination.GatheringCoordinator):
    """Restore agreement over jax.distributed's coordination service (its key-value store,
    which gives up after ``timeout`` seconds): no device collective, so it works on every
    backend and from any thread that runs the restore."""

    def __init__(self, timeout: float) -> None:
        self.rank, self.world_size = jax.process_index(), jax.process_count()
        self.timeout = timeout
        self.client = distributed_client()
        # Every process creates its managers in the same order: the same id names them.
        self.prefix = f"mtckpt/coordinator-{next(_COORDINATORS)}"
        self.round = 0

    def current(self) -> bool:
        return distributed_client() is self.client

    def _all_gather(self, value: Any, what: str) -> list[Any]:
        self.round += 1
        prefix = f"{self.prefix}/{self.round}"
        self.client.key_value_set(f"{prefix}/{self.rank}", json.dumps(value))
        gathered = []
        for rank in range(self.world_size):
            try:
                raw = self.client.blocking_key_value_get(
                    f"{prefix}/{rank}", int(self.timeout * 1000)
                )
            except Exception as exc:  # the client raises its own XlaRuntimeError
                raise MtckptError(
                    f"rank {self.rank}: the ranks did not {what} within {self.timeout} s "
                    f"(rank {rank} died or is not restoring): {exc}"
                ) from exc
            gathered.append(json.loads(raw))
        return gathered
