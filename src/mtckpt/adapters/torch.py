"""PyTorch support: tensors of every dtype as checkpoint leaves, and helpers for training state.

Importing this module imports torch; the core imports it only when a torch value or a
torch-written checkpoint shows up. Modules, optimizers and LR schedulers are saved through
their ``state_dict()`` and restored with ``load_state_dict()``; their tensors are filled in
place, so restoring a model costs no second copy of it in host memory.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from .. import _fastpath, arrays
from .torch_job import distributed_job as distributed_job
from .torch_job import job_coordinator as job_coordinator

if TYPE_CHECKING:  # imported on first use, by __getattr__ below
    from .dcp import (
        Reader,
        Writer,
        export_dcp,
        export_torch_save,
        import_dcp,
        import_torch_save,
    )

log = logging.getLogger(__name__)

__all__ = [
    "RNG",
    "LocalShard",
    "Reader",
    "Writer",
    "export_dcp",
    "export_torch_save",
    "import_dcp",
    "import_torch_save",
]

_DTYPE_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
    torch.int32: "I32", torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float32: "F32", torch.float64: "F64", torch.complex64: "C64",
}  # fmt: skip
for _name, _st in {
    "uint16": "U16", "uint32": "U32", "uint64": "U64", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2", "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ", "float8_e8m0fnu": "F8_E8M0",
}.items():  # fmt: skip
    if hasattr(torch, _name):  # newer dtypes, present in recent torch releases
        _DTYPE_NAMES[getattr(torch, _name)] = _st
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype; ValueError if the format has none."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        supported = ", ".join(sorted(str(d).removeprefix("torch.") for d in _DTYPE_NAMES))
        raise ValueError(f"torch dtype {dtype} cannot be saved; supported: {supported}") from None


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (0-d tensors included)."""
    return tensor.reshape(-1).view(torch.uint8)


def _plain(tensor: torch.Tensor, device_type: str) -> bool:
    """Whether the tensor's memory on ``device_type`` holds its values as they are: one
    contiguous run, no lazy conjugation or negation."""
    return (
        tensor.device.type == device_type
        and tensor.is_contiguous()
        and not tensor.is_conj()
        and not tensor.is_neg()
    )


def _typed(buf: np.ndarray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor viewing ``buf`` (uint8) as ``dtype`` and ``shape``."""
    if buf.size == 0:  # torch cannot re-view an empty byte buffer as a wider dtype
        return torch.empty(shape, dtype=_DTYPES[dtype])
    return torch.from_numpy(buf).view(_DTYPES[dtype]).view(shape)


@dataclass(frozen=True)
class LocalShard:
    """This rank's piece of a larger tensor, for sharding schemes without DTensor: saved
    with its global shape and offset, and restorable onto any other split of the tensor
    (as a restore target, the region it describes is filled in ``tensor``)."""

    tensor: torch.Tensor
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]

    def __post_init__(self) -> None:
        shape, global_shape = tuple(self.tensor.shape), tuple(self.global_shape)
        offset = tuple(self.global_offset)
        if (
            len(global_shape) != len(shape)
            or len(offset) != len(shape)
            or any(o < 0 or o + n > g for o, n, g in zip(offset, shape, global_shape, strict=True))
        ):
            raise ValueError(
                f"a shard of shape {shape} at offset {offset} does not fit global shape "
                f"{global_shape}"
            )


class TorchAdapter(arrays.ArrayAdapter):
    kinds = ("torch",)
    name = "torch tensor"

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, (torch.Tensor, LocalShard))

    def leaf(self, value: torch.Tensor) -> tuple[str, Any, arrays.Sharding | None]:
        if isinstance(value, LocalShard):
            kind, local, _ = self.leaf(value.tensor)
            placed = (tuple(value.global_shape), tuple(value.global_offset), ())
            return kind, local, arrays.Sharding(*placed)
        if _is_dtensor(value):
            return _dtensor_leaf(value)
        if value.layout != torch.strided or value.is_quantized or value.is_nested:
            raise ValueError(f"{value.layout} / quantized / nested tensors cannot be saved")
        if value.device.type == "meta":
            raise ValueError("a tensor on the meta device has no data to save")
        dtype_name(value.dtype)
        return "torch", value.detach(), None

    def describe(self, value: torch.Tensor) -> tuple[str, tuple[int, ...], int]:
        return dtype_name(value.dtype), tuple(value.shape), value.numel() * value.element_size()

    def host_bytes(self, value: torch.Tensor) -> np.ndarray | None:
        return _as_bytes(value).numpy() if _plain(value, "cpu") else None

    def stage(self, items: list[tuple[torch.Tensor, np.ndarray]]):
        on_device: dict[torch.device, list] = {}
        for value, dst in items:
            slot = _typed(dst, dtype_name(value.dtype), tuple(value.shape))
            if value.device.type == "cuda":
                on_device.setdefault(value.device, []).append((value, slot))
            else:
                slot.copy_(value)
        waits = [_copy_to_host(device, copies) for device, copies in on_device.items()]
        if not waits:
            return None
        return lambda: [wait() for wait in waits] and None

    def pinner(self, value: torch.Tensor):
        return _page_lock if value.device.type == "cuda" else None

    def is_target(self, obj: Any) -> bool:
        if isinstance(obj, LocalShard):
            obj = obj.tensor
        return isinstance(obj, torch.Tensor) and obj.layout == torch.strided

    def target_signature(self, target: torch.Tensor) -> tuple[str, tuple[int, ...], bool]:
        target = self.target_local(target)
        try:
            dtype = dtype_name(target.dtype)
        except ValueError:
            dtype = str(target.dtype)
        return dtype, tuple(target.shape), not target.is_inference()

    def target_region(self, target: torch.Tensor) -> arrays.Region:
        if isinstance(target, LocalShard):
            shape = tuple(target.tensor.shape)
            return arrays.Region(tuple(target.global_shape), tuple(target.global_offset), shape)
        if _is_dtensor(target):
            shape, offset = _local_shape_and_offset(target)
            return arrays.Region(tuple(target.shape), tuple(offset), tuple(shape))
        return super().target_region(target)

    def target_local(self, target: torch.Tensor) -> torch.Tensor:
        if isinstance(target, LocalShard):
            return target.tensor
        return target.to_local() if _is_dtensor(target) else target

    def target_bytes(self, target: torch.Tensor) -> np.ndarray | None:
        local = self.target_local(target)
        return _as_bytes(local.detach()).numpy() if _plain(local, "cpu") else None

    def fill(self, target: torch.Tensor, dtype: str, shape, buf: np.ndarray) -> torch.Tensor:
        local = self.target_local(target)
        with torch.no_grad():
            if self.fills_from_storage(target):
                _copy_to_device(_as_bytes(local), buf)
            else:
                local.copy_(_typed(buf, dtype, tuple(shape)))
        return target

    def fills_from_storage(self, target: torch.Tensor) -> bool:
        return _plain(self.target_local(target), "cuda")

    def new_value(self, kind: str, dtype: str, shape, buf: np.ndarray) -> Any:
        return _typed(buf, dtype, tuple(shape))


ADAPTER = TorchAdapter()


def prepare_target(obj: Any) -> Callable[[], None] | None:
    """Give an optimizer without state the state its parameters need, as its first step
    would (zero gradients, a learning rate of 0 for that step), so that a checkpoint's
    state restores into it in place, sharded like the parameters; returns what takes that
    state away again (a restore that fails). Other objects: no-op, None."""
    if not isinstance(obj, torch.optim.Optimizer) or obj.state:
        return None
    params = [p for group in obj.param_groups for p in group["params"] if p.requires_grad]
    if not params or any(p.grad is not None for p in params):
        return None
    groups = [dict(group) for group in obj.param_groups]
    for param in params:
        param.grad = torch.zeros_like(param)
    for group in obj.param_groups:
        if "lr" in group:
            group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
    obj.step()
    for group, before in zip(obj.param_groups, groups, strict=True):
        group.clear()
        group.update(before)
    obj.zero_grad(set_to_none=True)

    def revert() -> None:
        obj.state.clear()

    return revert


_SIDE_STREAMS: dict[Any, Any] = {}
_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every device's context


def _copy_to_host(device: torch.device, copies: list[tuple[torch.Tensor, torch.Tensor]]):
    """Enqueue device-to-host copies on the device's side stream, after the work already
    queued on its current stream; returns the function that waits for them. The allocator
    must not reuse a tensor's memory before its copy is done."""
    stream = _side_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for value, slot in copies:
            slot.copy_(value, non_blocking=True)
            value.record_stream(stream)
    done = torch.cuda.Event()
    done.record(stream)
    return done.synchronize


def _clear_cuda_error() -> None:
    """A failed CUDA runtime call leaves its error to be raised by the next kernel launch's
    check, in the trainer; torch has no cudaGetLastError, so launch a no-op here and let
    its check consume the error."""
    try:
        torch.zeros(1, device="cuda")
    except RuntimeError:
        pass


_BOUNCE_BYTES = 64 << 20
_BOUNCES: dict[torch.device, list] = {}
_BOUNCE_LOCK = threading.Lock()
_HOST_COPY_THREADS = min(8, os.cpu_count() or 1)


def _copy_to_device(dst: torch.Tensor, src: np.ndarray) -> None:
    """Copy host bytes into a contiguous uint8 device tensor through two page-locked
    buffers in turn (host copy into one while the other's DMA runs); done on return."""
    if dst.numel() != src.size:
        raise ValueError(f"{src.size} bytes for a device tensor of {dst.numel()}")
    with _BOUNCE_LOCK:
        if dst.device not in _BOUNCES:
            _BOUNCES[dst.device] = [
                (torch.empty(_BOUNCE_BYTES, dtype=torch.uint8, pin_memory=True),
                 torch.cuda.Event())
                for _ in range(2)
            ]  # fmt: skip
        bounces = _BOUNCES[dst.device]
        stream = torch.cuda.current_stream(dst.device)
        for index, start in enumerate(range(0, src.size, _BOUNCE_BYTES)):
            host, free = bounces[index % 2]
            free.synchronize()
            count = min(_BOUNCE_BYTES, src.size - start)
            piece = host[:count]
            _fastpath.backend().copy_many(
                [piece.numpy()], [src[start : start + count]], _HOST_COPY_THREADS
            )
            dst[start : start + count].copy_(piece, non_blocking=True)
            free.record(stream)
        for _, free in bounces:
            free.synchronize()


def _page_lock(memory: np.ndarray):
    """Register host memory with CUDA (page-locked), so copies from a device land in it by
    DMA, asynchronously; returns what unregisters it. Where that is refused (a memlock
    limit), copies go through pageable memory: slower and synchronous, but correct."""
    cudart = torch.cuda.cudart()
    address = memory.ctypes.data
    code = cudart.cudaHostRegister(address, memory.nbytes, _PORTABLE)
    if code != cudart.cudaError.success:
        _clear_cuda_error()
        log.warning(
            "cannot page-lock %d bytes of the memory tier for copies from the GPU (%s); "
            "they go through pageable memory, synchronously and slower",
            memory.nbytes, cudart.cudaGetErrorString(code),
        )  # fmt: skip
        return lambda: None
    return lambda: cudart.cudaHostUnregister(address)


def _side_stream(device: torch.device):
    """One copy stream per device, beside the trainer's own streams."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


def already_loaded(obj: Any, state: Any) -> bool:
    """Whether a module's rebuilt state is its own tensors, filled in place by the restore:
    then ``load_state_dict`` would only copy each parameter onto itself."""
    if not isinstance(obj, torch.nn.Module) or not isinstance(state, dict):
        return False
    for module in obj.modules():  # a hook may do more than copy: let it run
        if getattr(module, "_load_state_dict_pre_hooks", None) or getattr(
            module, "_load_state_dict_post_hooks", None
        ):
            return False
    own = obj.state_dict()
    if list(own) != list(state):
        return False
    return all(
        isinstance(value, torch.Tensor) and _same_memory(value, own[key])
        for key, value in state.items()
    )


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    if _is_dtensor(a) != _is_dtensor(b):
        return False
    if _is_dtensor(a):
        a, b = a.to_local(), b.to_local()
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _is_dtensor(value: torch.Tensor) -> bool:
    return type(value).__name__ == "DTensor" and dist.is_available()


_LAYOUTS: dict[tuple, tuple] = {}


def _layout(value: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset, ranks holding the same shard) of a DTensor. It depends
    only on the mesh, the placements and the global shape, and costs tens of microseconds
    per tensor to work out, so it is kept per layout (the mesh held to keep its id valid)."""
    mesh, placements, shape = value.device_mesh, tuple(value.placements), tuple(value.shape)
    key = (id(mesh), placements, shape)
    cached = _LAYOUTS.get(key)
    if cached is None or cached[0] is not mesh:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
        coordinate = mesh.get_coordinate()
        index = tuple(
            slice(None) if placement.is_replicate() else coordinate[dim]
            for dim, placement in enumerate(placements)
        )
        replicas = tuple(sorted(int(r) for r in mesh.mesh[index].flatten().tolist()))
        cached = _LAYOUTS[key] = (mesh, (tuple(local), tuple(offset), replicas))
    return cached[1]


def _local_shape_and_offset(value: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    local, offset, _ = _layout(value)
    return local, offset


def _dtensor_leaf(value: torch.Tensor) -> tuple[str, torch.Tensor, arrays.Sharding]:
    """A DTensor's local shard, where it sits in the global tensor, and the ranks holding the
    same shard (those differing only along mesh dimensions the tensor is replicated on)."""
    for placement in value.placements:
        if placement.is_partial():
            raise ValueError(
                f"a DTensor with placements {value.placements} holds partial sums; "
                "redistribute it to Shard/Replicate placements before saving"
            )
        if type(placement).__name__ == "_StridedShard":
            raise ValueError(
                f"DTensor placement {placement} (strided sharding, as FSDP + tensor parallel "
                "produce) is not supported yet; save the tensor parallel state alone"
            )
    local = value.to_local().detach()
    dtype_name(local.dtype)
    shape, offset, replicas = _layout(value)
    if tuple(local.shape) != shape:
        raise ValueError(f"local shard of shape {tuple(local.shape)}, expected {shape}")
    return "torch", local, arrays.Sharding(tuple(value.shape), offset, replicas)


class RNG:
    """The random generators of a training process as one stateful object: torch's CPU
    generator, every CUDA device's generator (when CUDA is initialised), Python's ``random``
    and numpy's global generator. Put ``mtckpt.torch.RNG()`` in the saved state; restoring
    it resumes every stream exactly where it was."""

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss_next = random.getstate()
        name, keys, position, has_gauss, cached = np.random.get_state()
        state = {
            "torch_cpu": torch.get_rng_state(),
            "python": {"version": version, "state": np.array(internal, dtype=np.uint64),
                       "gauss_next": gauss_next},
            "numpy": {"name": name, "keys": keys, "position": position,
                      "has_gauss": has_gauss, "cached_gaussian": cached},
        }  # fmt: skip
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        state["torch_cuda"] = [t.cpu() for t in torch.cuda.get_rng_state_all()] if cuda else []
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(torch.as_tensor(state["torch_cpu"], dtype=torch.uint8))
        python = state["python"]
        internal = tuple(int(x) for x in np.asarray(python["state"]))
        random.setstate((python["version"], internal, python["gauss_next"]))
        numpy = state["numpy"]
        keys = np.asarray(numpy["keys"], dtype=np.uint32)
        np.random.set_state(
            (numpy["name"], keys, numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"])
        )
        if state["torch_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8)
                                          for s in state["torch_cuda"]])  # fmt: skip


_DCP_NAMES = ("Reader", "Writer", "export_dcp", "export_torch_save", "import_dcp",
              "import_torch_save")  # fmt: skip


def __getattr__(name: str) -> Any:
    """DCP interop lives in its own module, imported on first use: importing
    torch.distributed.checkpoint takes about a second, which a save need not pay."""
    if name in _DCP_NAMES:
        from . import dcp

        return getattr(dcp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
