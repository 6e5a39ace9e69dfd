"""The few CUDA driver calls that staging JAX arrays from a GPU needs, through ctypes: no
CUDA toolkit or framework package, only the driver library every CUDA program loads.

JAX (XLA) allocates in each device's primary context; mtckpt retains the same context,
page-locks memory-tier slots with ``cuMemHostRegister`` (portable) and copies device
buffers into them with ``cuMemcpyDtoHAsync`` on a stream of its own, so the copy is one
DMA straight into the slot. ctypes releases the GIL for every call.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable

from .errors import MtckptError

LIBRARY = "libcuda.so.1"
_HOST_REGISTER_PORTABLE = 1
_STREAM_NON_BLOCKING = 1
_LOCK = threading.Lock()
_DRIVER: ctypes.CDLL | None = None
_CONTEXTS: dict[int, ctypes.c_void_p] = {}
_STREAMS: dict[int, ctypes.c_void_p] = {}


class CudaError(MtckptError, RuntimeError):
    """A CUDA driver call failed (or the driver could not be loaded)."""


def _driver() -> ctypes.CDLL:
    global _DRIVER
    if _DRIVER is None:
        try:
            driver = ctypes.CDLL(LIBRARY)
        except OSError as exc:
            raise CudaError(f"the CUDA driver ({LIBRARY}) cannot be loaded: {exc}") from exc
        driver.cuMemcpyDtoHAsync_v2.argtypes = [
            ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p,
        ]  # fmt: skip
        driver.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        driver.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
        driver.cuStreamSynchronize.argtypes = [ctypes.c_void_p]
        driver.cuCtxPushCurrent_v2.argtypes = [ctypes.c_void_p]
        _DRIVER = driver
        _check(driver.cuInit(0), "cuInit")
    return _DRIVER


def _check(code: int, call: str) -> None:
    if code != 0:
        text = ctypes.c_char_p()
        _DRIVER.cuGetErrorString(code, ctypes.byref(text))
        name = text.value.decode() if text.value else "unknown error"
        raise CudaError(f"{call} failed: CUDA error {code} ({name})")


def _context(ordinal: int) -> ctypes.c_void_p:
    """The device's primary context (the one JAX allocates in), retained once."""
    with _LOCK:
        if ordinal not in _CONTEXTS:
            driver = _driver()
            device = ctypes.c_int()
            _check(driver.cuDeviceGet(ctypes.byref(device), ordinal), f"cuDeviceGet({ordinal})")
            context = ctypes.c_void_p()
            _check(driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), device),
                   f"cuDevicePrimaryCtxRetain({ordinal})")  # fmt: skip
            _CONTEXTS[ordinal] = context
        return _CONTEXTS[ordinal]


class _Current:
    """The device's primary context made current in this thread for a block."""

    def __init__(self, ordinal: int) -> None:
        self.context = _context(ordinal)

    def __enter__(self) -> ctypes.CDLL:
        _check(_DRIVER.cuCtxPushCurrent_v2(self.context), "cuCtxPushCurrent")
        return _DRIVER

    def __exit__(self, *exc_info) -> None:
        _DRIVER.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))


def page_lock(address: int, nbytes: int, ordinal: int = 0) -> Callable[[], None]:
    """Register host memory as page-locked for every context; returns what unregisters it."""
    with _Current(ordinal) as driver:
        _check(driver.cuMemHostRegister_v2(address, nbytes, _HOST_REGISTER_PORTABLE),
               f"cuMemHostRegister of {nbytes} bytes")  # fmt: skip

    def unlock() -> None:
        with _Current(ordinal) as driver:
            driver.cuMemHostUnregister(address)

    return unlock


def _stream(ordinal: int) -> ctypes.c_void_p:
    with _LOCK:
        stream = _STREAMS.get(ordinal)
    if stream is None:
        stream = ctypes.c_void_p()
        with _Current(ordinal) as driver:
            _check(driver.cuStreamCreate(ctypes.byref(stream), _STREAM_NON_BLOCKING),
                   "cuStreamCreate")  # fmt: skip
        with _LOCK:
            stream = _STREAMS.setdefault(ordinal, stream)
    return stream


def copy_to_host(ordinal: int, copies: list[tuple[int, int, int]]) -> Callable[[], None]:
    """Enqueue ``(host address, device address, nbytes)`` copies from device ``ordinal`` on
    mtckpt's stream for it; returns the function that waits until they have landed."""
    stream = _stream(ordinal)
    with _Current(ordinal) as driver:
        for host, device, nbytes in copies:
            _check(driver.cuMemcpyDtoHAsync_v2(host, device, nbytes, stream),
                   f"cuMemcpyDtoHAsync of {nbytes} bytes")  # fmt: skip

    def wait() -> None:
        with _Current(ordinal) as driver:
            _check(driver.cuStreamSynchronize(stream), "cuStreamSynchronize")

    return wait
