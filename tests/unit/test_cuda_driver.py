"""The CUDA driver binding used for JAX staging fails with a named error where there is no
driver, and JAX then copies through host memory (tests/gpu covers the driver itself)."""

import pytest

from mtckpt import _cuda


def test_a_missing_driver_is_a_named_error(monkeypatch):
    monkeypatch.setattr(_cuda, "_DRIVER", None)
    monkeypatch.setattr(_cuda, "LIBRARY", "libmtckpt-no-such-driver.so.1")
    with pytest.raises(_cuda.CudaError, match=r"libmtckpt-no-such-driver\.so\.1.*cannot be loaded"):
        _cuda.page_lock(0, 4096)
